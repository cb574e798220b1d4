// Package endpoint owns the workloads of one host: the endpoint table, the
// veth pairs that plug each network namespace into the host, their
// addresses, routes and static neighbours, and the JSON state files under
// <state_dir>/endpoints/ that let the agent find them again after a restart.
//
// Only Manager changes endpoints, and only through Add, Delete and Restore;
// the API server, the CLI (through the API) and the CNI plugin call those.
// The package reaches the eBPF datapath, the identity allocator and the
// agent's policy enforcement through three small interfaces (Datapath,
// Identities, Enforcer) defined here, so that it never imports BPF code or
// the concrete allocator (TestPureGo) and can be tested with fakes; the
// adapters live in the wiring (daemon/adapters.go).
//
// Fail closed: Add creates the veth with its host side down, attaches the
// datapath (which creates the policy map closed), lets the Enforcer write
// the endpoint's policy and addresses (Admit), and only then brings the
// host side up with its routes. Nothing reaches or leaves a new endpoint
// before its policy is in force (docs/enforcement.md).
//
// On restart, New reads the state files (a corrupt one is moved aside and
// logged, never fatal) and Restore re-adopts every endpoint whose host-side
// veth still exists, without re-creating links or maps: forwarding never
// stops while the agent is down. An endpoint whose veth vanished is kept and
// marked lost so that its id and addresses stay reserved until an operator
// deletes it.
//
// On bad input (a bad name or label, a missing namespace, an address outside
// the CIDRs or in use, an exhausted CIDR) Add fails before it touches the
// kernel. Any later failure rolls back everything Add already did (veth,
// routes, datapath entries, state file, identity reference): nothing is ever
// left half-created. docs/endpoints.md describes the addressing design.
//
// # Network namespace paths
//
// The agent opens Request.NetnsPath as root on behalf of its API callers,
// so the path is checked before the file is used for anything (setns, a
// netlink handle), and the open itself can have no side effect:
//
//   - The path must be absolute, at most MaxNetnsPath (4095) bytes, without
//     NUL: anything else is refused before a system call.
//   - It is first opened with O_PATH|O_NOFOLLOW, which neither blocks on a
//     FIFO nor reaches a device driver (no /dev/watchdog arming, no tape
//     rewind, no controlling terminal), and does not follow a final symlink.
//   - A final symlink is refused, except one on procfs: measured on Linux
//     6.x, /proc/PID/ns/net (a magic link) opened with O_NOFOLLOW fails with
//     ELOOP, and O_PATH|O_NOFOLLOW gets the link itself, on procfs; so a
//     symlink on procfs is opened again with O_PATH, following it. Whatever that
//     lands on must pass the checks below: /proc/PID/ns/net and
//     /proc/PID/task/TID/ns/net work, /proc/PID/ns/mnt or /proc/PID/fd/N of
//     a FIFO do not. A symlink on any other file system (even one to
//     /run/netns/NAME) is refused. Directories on the way may be symlinks
//     (/var/run -> /run): they are resolved without opening anything.
//   - The file must be on nsfs (fstatfs: NSFS_MAGIC). /run/netns/NAME, a
//     bind mount of an nsfs file made by `ip netns add`, is one; its mount
//     is crossed with O_NOFOLLOW as any mount is.
//   - Only then is it opened for real (O_RDONLY|O_NONBLOCK|O_NOCTTY) through
//     /proc/self/fd/N of the O_PATH descriptor, which reopens the very file
//     checked even if the path was swapped meanwhile, and
//     ioctl(NS_GET_NSTYPE) must say CLONE_NEWNET.
//
// Every refusal is the same error, NetnsMsg (errors.Is ErrNoNetns), which
// does not say what the path is or whether it exists; the reason goes to
// the agent's log.
package endpoint

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
)

// Sentinel errors; test with errors.Is. The wrapping message says what to do.
var (
	ErrExists        = errors.New("endpoint exists")
	ErrNotFound      = errors.New("endpoint not found")
	ErrNoNetns       = errors.New("no such network namespace")
	ErrCIDRExhausted = errors.New("workload CIDR exhausted")
	ErrIPInUse       = errors.New("address in use")
	ErrIPOutsideCIDR = errors.New("address outside the workload CIDRs")
	ErrBadName       = errors.New("bad endpoint name")
	ErrBadLabels     = identity.ErrBadLabels
	ErrIDsExhausted  = errors.New("endpoint ids exhausted")
)

// Gateway addresses every endpoint routes through. They live on no
// interface: the endpoint holds a permanent neighbour entry that maps them to
// the MAC of its host-side veth, so the host receives and routes everything
// the endpoint sends (see docs/endpoints.md).
var (
	GatewayIPv4 = netip.MustParseAddr("169.254.1.1")
	GatewayIPv6 = netip.MustParseAddr("fe80::1")
)

// RouteProtocol marks the host routes the manager installs
// (`ip route show proto 114`), so that they are told apart from others'.
const RouteProtocol = 114

// PeerIfName is the default name of the endpoint side of the veth, in its
// namespace; a container runtime may ask for another (Request.IfName).
const PeerIfName = "eth0"

// State is an endpoint's lifecycle state.
type State string

const (
	// StateCreating is written before Add touches the kernel; a state file
	// still in this state at Restore means the agent died mid-Add, and
	// Restore removes whatever that Add left.
	StateCreating State = "creating"
	// StateReady is a working endpoint.
	StateReady State = "ready"
	// StateLost is an endpoint whose host-side veth vanished while the agent
	// was down (typically: its namespace was deleted). Its id and addresses
	// stay reserved until it is deleted.
	StateLost State = "lost"
	// StatePending is an endpoint plugged before its labels are known
	// (Docker's Join carries none). It fails closed: its policy map stays
	// closed in both directions, its identity is reserved:init, and
	// Endpoint.Pending says why, until SetLabels gives it its identity.
	StatePending State = "labels-pending"
)

// DockerAttachment is Docker's key of an endpoint its network driver
// plugged: the libnetwork network and endpoint ids, and the sandbox (the
// container's network namespace) it joined.
type DockerAttachment struct {
	NetworkID  string `json:"network_id"`
	EndpointID string `json:"endpoint_id"`
	SandboxKey string `json:"sandbox_key,omitempty"`
}

// Endpoint is one workload plugged into this host. It is also the JSON
// content of its state file and what the API returns.
type Endpoint struct {
	ID    uint16 `json:"id"`
	Name  string `json:"name"`
	Netns string `json:"netns"`
	State State  `json:"state"`

	Labels identity.Labels `json:"labels"`
	// IdentityLabels is Labels filtered by [datapath] identity_labels; it
	// is what Identity was allocated for.
	IdentityLabels identity.Labels `json:"identity_labels"`
	Identity       identity.ID     `json:"identity"`

	IPv4 netip.Addr `json:"ipv4,omitzero"`
	IPv6 netip.Addr `json:"ipv6,omitzero"`

	// HostIfName/HostIfIndex/HostMAC describe the host side of the veth,
	// in the host namespace; MAC is the endpoint's eth0.
	HostIfName  string `json:"host_ifname"`
	HostIfIndex int    `json:"host_ifindex"`
	HostMAC     string `json:"host_mac"`
	MAC         string `json:"mac"`

	Created time.Time `json:"created"`

	// IfName is the endpoint side of the veth in its namespace ("" is
	// PeerIfName). ContainerID and Network are set for endpoints plugged by
	// a container runtime (CNI, Docker): with IfName they are the
	// runtime's key of the attachment.
	IfName      string `json:"ifname,omitempty"`
	ContainerID string `json:"container_id,omitempty"`
	Network     string `json:"network,omitempty"`

	// Pending says why a StatePending endpoint has no identity yet.
	Pending string `json:"pending,omitempty"`
	// Docker is set for the endpoints Docker's network driver plugged.
	Docker *DockerAttachment `json:"docker,omitempty"`
}

// PeerName returns the name of the endpoint side of the veth.
func (e Endpoint) PeerName() string {
	if e.IfName == "" {
		return PeerIfName
	}
	return e.IfName
}

// IPs returns the endpoint's addresses, IPv4 first.
func (e Endpoint) IPs() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{e.IPv4, e.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

func (e Endpoint) clone() Endpoint {
	e.Labels = append(identity.Labels(nil), e.Labels...)
	e.IdentityLabels = append(identity.Labels(nil), e.IdentityLabels...)
	if e.Docker != nil {
		d := *e.Docker
		e.Docker = &d
	}
	return e
}

// Request asks for a new endpoint.
type Request struct {
	// Name is unique on the host: 1..63 of letters, digits, '.', '_', '-',
	// starting with a letter or digit, not all digits (an all-digit
	// argument is an endpoint id).
	Name string
	// NetnsPath is a network namespace file: /run/netns/NAME or
	// /proc/PID/ns/net. The manager creates eth0 in it.
	NetnsPath string
	Labels    identity.Labels
	// IP optionally asks for a given address (IPv4 or IPv6); IPv6
	// optionally asks for a given IPv6 address. Zero values allocate.
	IP   netip.Addr
	IPv6 netip.Addr
	// IfName names the endpoint side in its namespace; "" is PeerIfName.
	IfName string
	// ContainerID and Network, when ContainerID is set, make the request
	// a container runtime's attachment (see Manager.Add).
	ContainerID string
	Network     string

	// Detach, for a runtime that moves the endpoint side into its sandbox
	// itself (Docker), creates the endpoint side in the host namespace,
	// down and unconfigured, named Manager.DetachedPeerName(id);
	// NetnsPath is then unused. MAC optionally sets its MAC.
	Detach bool
	MAC    net.HardwareAddr
	// Pending plugs the endpoint without labels, fail closed
	// (StatePending), and says why; SetLabels completes it.
	Pending string
	// Reserved says that IP and IPv6 may be addresses this caller
	// reserved with Reserve; Add takes them over.
	Reserved bool
	// Docker is Docker's key of the endpoint; Add of an existing one
	// returns it.
	Docker *DockerAttachment
}

// AttachSpec is what the datapath needs to enforce policy on an endpoint.
type AttachSpec struct {
	ID uint16
	// IfIndex and IfName are the host side of the veth, where the programs
	// attach; PeerMAC is the endpoint's eth0, HostMAC the host side.
	IfIndex  int
	IfName   string
	HostMAC  net.HardwareAddr
	PeerMAC  net.HardwareAddr
	IPs      []netip.Addr
	Identity identity.ID
	Audit    bool
}

// Datapath is the part of the eBPF datapath the manager drives.
//
// AttachEndpoint must be idempotent with "ensure" semantics: called for an
// endpoint whose pinned policy map and links already exist (Restore), it
// re-adopts them and neither flushes nor re-creates them; called for a new
// endpoint, it creates its policy map closed (nothing passes in either
// direction). DetachEndpoint of something absent returns nil and gets
// ifindex 0 when the veth is already gone.
type Datapath interface {
	AttachEndpoint(spec AttachSpec) error
	DetachEndpoint(id uint16, ifindex int) error
}

// Enforcer puts an endpoint's policy and addresses in force; the agent
// implements it (policy sync and the ipcache owner). The manager calls it
// at the points where an endpoint may start to carry traffic or stops.
type Enforcer interface {
	// Admit is called during Add once the datapath is attached (the policy
	// map closed) and before the host side of the veth goes up: nothing
	// reaches or leaves the endpoint before Admit returns. It returns once
	// the endpoint's computed policy is in its map, or the directions that
	// could not be written are closed. An error rolls the Add back.
	Admit(ctx context.Context, ep Endpoint) error
	// Readopt is called by Restore for every endpoint it re-adopts. It must
	// not widen the endpoint's map: the policy sources are not loaded yet.
	Readopt(ep Endpoint)
	// Gone is called once an endpoint was deleted, or a failed Add rolled
	// back after Admit.
	Gone(ep Endpoint)
}

// noEnforcer leaves new endpoints closed; tests and tools that drive the
// datapath themselves use it.
type noEnforcer struct{}

func (noEnforcer) Admit(context.Context, Endpoint) error { return nil }
func (noEnforcer) Readopt(Endpoint)                      {}
func (noEnforcer) Gone(Endpoint)                         {}

// Identities allocates security identities for identity-relevant label
// sets. Every Allocate is balanced by one Release of the same labels.
type Identities interface {
	Allocate(ctx context.Context, labels identity.Labels) (identity.ID, error)
	Release(ctx context.Context, labels identity.Labels) error
}
