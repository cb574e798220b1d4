// Package datapath is the only package that touches BPF objects: it loads
// the programs of bpf/, owns the maps pinned under the pin directory
// (default /sys/fs/bpf/rackwire) and turns the desired state the daemon
// computes (endpoints, policy entries, ipcache) into map updates and
// tc/tcx attachments. The daemon wiring calls it; policy and identity never
// import it. The contracts it implements are in docs/datapath.md.
//
// API in short:
//
//	d, err := datapath.Open(datapath.OptionsFromConfig(cfg.Datapath), log)
//	d.AttachEndpoint(datapath.EndpointSpec{ID: 794, IfIndex: idx, IPs: ips, Identity: id})
//	d.SetPolicy(794, []datapath.Entry{{Identity: 70101, Direction: datapath.Ingress, Proto: 6, Port: 8000, EndPort: 8099}})
//	d.UpsertIPCache(netip.MustParsePrefix("10.250.2.7/32"), 70101, hostIP)
//	d.Policy(794) / d.IPCache() / d.LookupIPCache(ip) / d.CT() / d.FlushCT(id) / d.Metrics() / d.Events(ctx)
//	d.AllowAll(794, false)   // emergency open; true reverts
//	d.PolicyMapID(794)       // kernel id of the policy map in force
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
// Host routing (hostrt.go, bpf/hostrt.h, bpf/from_uplink.c): with
// Options.HostRouting "bpf" (or "auto" where Features().HostRouting),
// rw_from_endpoint sends allowed packets for non-local destinations to
// their next hop with bpf_fib_lookup + bpf_redirect, and rw_from_uplink,
// attached by SetUplinks to the ingress of the uplinks, decides a local
// endpoint's ingress for packets from other hosts and delivers them with
// bpf_redirect_peer. Data: the mode is a load-time constant
// (rw_host_routing), chosen at Open (HostRouting() says which and why);
// the uplink attachments are pinned under links/rw_uplink_NAME (tcx) or are
// clsact filters of priority 0x7275 recorded by a directory of that name,
// so a restarted agent finds, keeps or detaches them; only SetUplinks
// changes them (the agent on start, on reload of [datapath] uplinks, and
// when the default routes change). Anything the fast paths do not handle
// (TTL, MTU, unknown neighbour, non-forward FIB answers, host traffic)
// passes untouched to the host stack, counted in rw_hostrt
// (HostRoutingCounters); an uplink that cannot be attached leaves its
// traffic to the stack, where rw_to_endpoint enforces as before.
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
// Policy updates are fail-closed and atomic; the invariant is that an
// endpoint's policy in force is never wider than intended:
//
//   - Data: per endpoint, the map in force is the one rw_policy_maps[id]
//     holds, and the pin rw_policy_NNNNN always names that same map (so
//     bpftool on the pin reads and edits what is enforced); d.policy[id] is
//     the agent's handle on it. PolicyMapID reports its kernel id, which
//     changes when (and only when) SetPolicy replaces the map.
//   - A new endpoint's map (AttachEndpoint) is created closed: only the two
//     meta entries, no allow entry, so nothing passes in either direction
//     until the agent writes the endpoint's policy. A direction for which
//     SetPolicy gets no entry stays closed; OpenEntries opens both.
//   - SetPolicy never edits the map in force. It reads it (one batch
//     lookup), and if it already holds the desired set (counters aside:
//     same entries, same emergency state, same meta entries) does nothing,
//     so a restart without policy changes keeps every map and its id.
//     Otherwise it creates a new map from the template (the size and flags
//     of the map in force), fills it completely (entries, AllowAll's
//     entries whose keys the policy does not use, the emergency-open flags,
//     the meta entries, the counters of entries that stay, re-read just
//     before the swap), pins it as rw_policy_NNNNN_new, renames that over
//     rw_policy_NNNNN (rename(2) on bpffs replaces the pin atomically),
//     then points rw_policy_maps[id] at it and closes the old map. The
//     outer-map update is one pointer swap, so every packet is decided by
//     the old map or by the new one, never a mix; the kernel waits for
//     running programs before the update returns, so when SetPolicy returns
//     no packet is decided by the old map any more. Two maps exist for a
//     moment, but no map ever needs room for both policies.
//   - Who changes what: the agent through SetPolicy (replaces), PutEntry,
//     DeleteEntry and AllowAll (edit the map in force in place, one entry
//     at a time); operators with bpftool on the pin (edits the map in
//     force). d.mu serialises all of them within the agent. Entries written
//     by PutEntry or bpftool are gone after the next SetPolicy (the map then
//     differs from the desired set, so even an unchanged policy swaps);
//     AllowAll's state survives every SetPolicy until AllowAll(id, true).
//   - Crash and restart: before the rename nothing visible has changed (a
//     leftover rw_policy_NNNNN_new is removed when the endpoint's map is
//     next adopted). After the rename and before the outer update the old
//     map still enforces, but the pin names the new, complete one; the
//     restarted agent's AttachEndpoint re-registers the pinned map, so the
//     newest policy is the one in force. Re-adopting never changes a map.
//   - Bad input: a policy that needs more keys than the map holds (with the
//     two meta entries) returns ErrPolicyTooLarge before anything is
//     created; any kernel error while building or pinning deletes the half
//     built map and its temporary pin; if the outer update itself fails the
//     pin is made to name the old map again. In every case the map in force
//     stays in force, unchanged.
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
// policy too large for its map returns ErrPolicyTooLarge; PutEntry on a
// full map returns the kernel's error wrapped with the step. An
// AttachEndpoint that fails half way is rolled back by DetachEndpoint, which
// tolerates missing pieces.
//
// Events (bpf/events.h, events.go). Every drop, audit verdict and sampled
// trace goes through one per-endpoint token bucket in rw_event_limit
// (rate and burst are [datapath] events_rate / events_burst, load-time
// constants); over budget the event is counted as suppressed and not
// written, so a flood costs a map lookup and a spin lock per packet instead
// of a record in the transport and a decode in the agent. The verdict is
// made before and never depends on the limiter. The entry is the
// program's: it creates it on an endpoint's first event; the agent only
// reads it (EventCounts, with BPF_F_LOCK) and it is pinned, so counters
// survive restarts. Endpoint 0 is every packet no endpoint was found for.
//
// Transport: one compiled object per program, not two variants. Open
// chooses ("auto": the ring buffer where features.HaveMapType(RingBuf)
// succeeds, else the perf event array; "ringbuf" and "perf" force one) and,
// for perf, rewrites the rw_events spec into a PERF_EVENT_ARRAY (one entry
// per possible CPU) and sets the constant rw_events_perf before loading.
// events.h branches on that constant; the constant lives in the frozen
// .rodata, so the verifier knows the branch and removes the other one
// before it resolves helper calls: a kernel before 5.8 never meets
// bpf_ringbuf_output, and the map it would name is a perf array by then.
// TestEventTransports checks the program the kernel kept (bpftool's
// xlated dump) calls only its own transport's helper. Two variants would
// double the generated objects and every map-compatibility check for no
// gain. The map is pinned as rw_events (ring buffer) or rw_events_perf, so
// switching transports never meets a pinned map of the other type; Open
// unpins the other one (programs still attached keep it until replaced).
// Events reads either with the matching cilium/ebpf reader into the same
// Event.
//
// Services (service.go, maglev.go, bpf/sock_lb.c; docs/datapath.md
// "Services: socket load balancing"): connect-time socket load balancing.
// Cgroup-v2 hooks on [datapath] service_cgroup rewrite a socket's
// destination VIP:port to one active backend at connect()/sendmsg() and
// the backend back to the VIP at recvmsg()/getpeername(), so the client
// address is kept, replies need no per-packet NAT and the endpoint
// programs (untouched) decide policy against the backend's identity.
// Data: rw_services, rw_svc_maglev (one Maglev table per service),
// rw_svc_backends, written only by SyncServices (the whole table, diffed,
// undone on a kernel error, invalid parts skipped and listed by
// SkippedServices); rw_svc_revnat, written by the programs. Restart: the
// hooks are pinned links and keep balancing; SyncServices adopts the
// pinned maps and rewrites nothing that is unchanged. Cleanup detaches.
//
// North-south (northsouth.go, bpf/northsouth.h, bpf/northsouth_lb.h;
// docs/datapath.md "Services: north-south"): traffic that arrives on an
// uplink for a VIP:port (the router sends it once [bgp]
// announce_service_vips announces the VIP) is balanced by rw_from_uplink
// over the service's active backends on this host (a second Maglev table
// per service, svc_value.local, built by SyncServices from Backend.Local),
// DNATed, and then handled as any packet for that endpoint; the backend's
// replies get VIP:port back as their source in rw_from_endpoint, after CT
// passed them as replies. A VIP:port without a local backend drops ("no
// service backend", ingress). Data: rw_svc_nat (LRU, both directions of
// each flow), written only by the programs; it survives restarts like CT.
// SetNorthSouth (the agent: [bgp] enabled && announce_service_vips) puts
// rw_from_uplink on the uplinks also with host routing "legacy", where it
// only balances; NorthSouth says whether it runs and why.
//
// All methods are safe for concurrent use, except Close, which must be
// the last call.
package datapath
