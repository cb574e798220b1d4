// Package datapath is the only package that touches BPF objects: it loads
// the programs of bpf/, owns the maps pinned under the pin directory
// (default /sys/fs/bpf/rackwire) and turns the desired state the daemon
// computes (endpoints, policy entries, ipcache) into map updates and
// tc/tcx attachments. The daemon wiring calls it; policy and identity never
// import it. The contracts it implements are DESIGN.md "The datapath" and
// docs/datapath.md.
//
// API in short:
//
//	d, err := datapath.Open(datapath.OptionsFromConfig(cfg.Datapath), log)
//	d.AttachEndpoint(datapath.EndpointSpec{ID: 794, IfIndex: idx, IPs: ips, Identity: id})
//	d.SetPolicy(794, []datapath.Entry{{Identity: 70101, Direction: datapath.Ingress, Proto: 6, Port: 8000, EndPort: 8099}})
//	d.UpsertIPCache(netip.MustParsePrefix("10.250.2.7/32"), 70101, hostIP)
//	d.Policy(794) / d.IPCache() / d.LookupIPCache(ip) / d.CT() / d.Metrics() / d.Events(ctx)
//	d.AllowAll(794, false)   // emergency open; true reverts
//	d.DetachEndpoint(794, idx)
//	d.Close()                // leaves pins and attachments: forwarding goes on
//	datapath.Cleanup(pinDir) // removes every pin (tcx links detach)
//
// Per-endpoint maps: every endpoint has its own hash map rw_policy_NNNNN
// (pinned under that name), and the programs reach it through
// rw_policy_maps, a BPF hash-of-maps keyed by the endpoint id as a u32.
// Each program finds the endpoint of a packet in rw_endpoints by the
// endpoint's address (source for what it sends, destination for what it
// receives), so one loaded pair of programs serves every endpoint.
//
// Local delivery: when the kernel has bpf_redirect_peer and bpf_check_mtu
// (Features().RedirectPeer) and Options.NoRedirectPeer is false,
// rw_from_endpoint also decides the ingress policy of a local destination
// endpoint (one in rw_endpoints with its MAC and host-side MAC known) and
// redirects the packet straight into its namespace; everything else takes
// the host stack and rw_to_endpoint as before. Features().LocalRedirect
// says which was chosen; it is a load-time constant of the programs.
//
// Port ranges keep the 8-byte key: a range is split into the fewest aligned
// power-of-two blocks, and bits 1-4 of the key's direction byte hold log2 of
// the block size (0 = one port; the dport field holds the block's first
// port). 8000-8099 becomes 8000 (2^6 ports), 8064 (2^5), 8096 (2^2): three keys. A
// per-direction meta entry (direction byte 0x80|dir, everything else zero)
// tells the programs which block sizes exist and whether deny entries exist,
// so a map without ranges or denies costs no extra lookups. The agent
// rewrites the meta entries on every change; a map without them (written by
// hand) is searched for every block size, with deny precedence.
//
// Restart: Open never re-creates a pinned map (same map ids; a pinned map
// whose size differs from the config is kept and a warning logged; one whose
// type or key/value size differs is ErrIncompatibleMap and needs Cleanup).
// The daemon then calls AttachEndpoint for every restored endpoint, which
// re-adopts the endpoint's policy map and atomically replaces the programs
// behind its pinned tcx links (or its tc filters) with the new ones. Between
// exit and re-adoption the old programs keep enforcing.
//
// Bad input: invalid entries (a port without a protocol, an end port below
// the port, a direction other than ingress/egress) return ErrInvalidEntry
// and change nothing; an unknown endpoint returns ErrUnknownEndpoint; a
// full map returns the kernel's error wrapped with the step. An
// AttachEndpoint that fails half way is rolled back by DetachEndpoint, which
// tolerates missing pieces.
//
// All methods are safe for concurrent use, except Close, which must be
// the last call.
package datapath
