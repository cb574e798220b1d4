// Package docker is rackwire's Docker network driver and IPAM driver: it
// serves Docker's remote plugin protocols ("NetworkDriver" and
// "IpamDriver", JSON over HTTP on a unix socket, by default
// /run/docker/plugins/rackwire.sock, where dockerd discovers plugins) and
// turns them into endpoint.Manager calls, so that
//
//	docker network create --driver rackwire --ipam-driver rackwire NAME
//	docker run --network NAME --label app=web ...
//
// gives the container an address from the host's [ipam] cidrs and an
// identity from its labels. The agent wires it (daemon/docker.go) when
// [docker] enabled is true; only the agent imports it.
//
// # Data owned
//
// None of its own on disk. Every endpoint the driver creates is an
// ordinary endpoint of endpoint.Manager, persisted in the endpoint state
// files with Docker's network id, endpoint id and sandbox key
// (endpoint.DockerAttachment) and, once known, the container id. Address
// reservations (see below) live in the manager's memory; which endpoints
// already have their gateway neighbours is this package's memory.
//
// # The flow of `docker run`, and the design problems it poses
//
//  1. IpamDriver.RequestAddress: the manager reserves an address (the
//     lowest free one of the host's CIDRs, or the one asked for) for a few
//     minutes. It is answered as a /32 (/128): the container gets no
//     on-link subnet and sends everything through its gateway, exactly as
//     endpoints added with `rackwire endpoint add`. RequestPool answers
//     the host's IPv6 CIDR, and for IPv4 0.0.0.0/0 (or the host's CIDR
//     named by --subnet): dockerd checks an IPv4 pool it did not name
//     against the host's routes and asks again, forever, on an overlap,
//     and the host routes its endpoints' /32s inside its CIDR; 0.0.0.0/0
//     is the one pool it does not check. The gateway is the link-local
//     169.254.1.1/32 (fe80::1/128), so no workload address is spent on it.
//  2. NetworkDriver.CreateEndpoint: the manager creates the endpoint,
//     taking over the reservation: a veth pair with BOTH sides in the host
//     namespace (Request.Detach), the programs attached to the host side
//     with the policy map closed, the host side up with its /32 route and
//     its permanent neighbour for the container's MAC, which the driver
//     returns to Docker so that Docker keeps it.
//  3. NetworkDriver.Join: Docker's Join carries no labels and no container
//     id, only the sandbox key. The endpoint is therefore created fail
//     closed (endpoint.StatePending, identity reserved:init, no Admit:
//     nothing passes in either direction) and says so while it lasts:
//     `endpoint list` shows the state labels-pending with the reason, the
//     rackwire_endpoints{state="labels-pending"} metric counts it, the log
//     warns. Join records the sandbox key, then looks the container up
//     (lookup, below, bounded to 2 s): usually it finds it, and the
//     endpoint's identity and policy are in force before Join returns, so
//     before the container runs. Join answers the peer's name (Docker
//     moves it into the sandbox and renames it after Join returns), the
//     gateway 169.254.1.1 (fe80::1) and a connected static route to it,
//     because the container's /32 has no subnet through which Docker
//     could reach the gateway. The programs are on the host side before
//     Join returns either way.
//  4. After Join, asynchronously, the resolver (resolve.go):
//     a. once the peer is up in the sandbox, adds the permanent neighbour
//     entries gateway -> host-side MAC there (the host side answers no
//     ARP or ND: it has no address, docs/endpoints.md). Docker moves and
//     configures the interface only after Join returns, and a move
//     flushes a device's neighbours, so this cannot happen in Join.
//     b. for an endpoint still pending, retries the lookup: GET
//     /networks/{id} lists the endpoint (under "ep-<endpoint id>" with
//     the container's name while it joins, under the container id once
//     joined), and GET /containers/json filtered by that name gives the
//     container's id and labels. Both are served without the container's
//     lock. GET /containers/{id}/json is never used: measured with
//     dockerd 20.10.24, made from inside Join it blocks until Join
//     returns (dockerd holds the container while it starts it; a 5 s
//     client timeout expired), a deadlock until the plugin call times
//     out. The resolver polls fast (every 100 ms) while an endpoint is
//     younger than a minute, then every few seconds, forever: an
//     endpoint whose labels cannot be read stays closed and says why
//     (Engine API unreachable, container without an identity-relevant
//     label, ...).
//     c. Manager.SetLabels takes the identity and lets the agent admit
//     the endpoint: its policy goes into its map; from then on it is an
//     endpoint like any other.
//
// Docker's DeleteEndpoint deletes the endpoint and re-reserves its
// addresses until Docker's ReleaseAddress, so that an address is never
// handed out twice while Docker still counts it as allocated. A
// DeleteEndpoint, Leave or ReleaseAddress for something unknown succeeds
// (Docker repeats them after its own crashes).
//
// # Restart
//
// rackwired: the endpoints are restored by the manager like every other
// (forwarding and enforcement never stop; a pending endpoint stays closed),
// the plugin socket is served again once the restore is done (dockerd
// retries its calls meanwhile), and the resolver picks the pending
// endpoints up again. dockerd: containers may die without Leave or
// DeleteEndpoint. The reconciler (every 10 s, and at start) asks the
// Engine API about every Docker endpoint: an endpoint whose network is
// gone, or that the network no longer lists 30 s after its creation, is
// deleted. An Engine API that does not answer deletes nothing.
//
// # Bad input
//
// Every request body is bounded and decoded strictly enough to refuse
// garbage with an error that says what to do (pools other than the host's
// CIDRs, a network created with another IPAM driver, ids that are not 64
// hex digits). Errors go back in the protocol's error field ("Err" for
// the network driver, "Error" for IPAM), so `docker` prints them.
package docker
