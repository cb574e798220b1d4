// Package multihost proves rackwire across several hosts on one machine:
// each simulated host is a network namespace (rwm-hA, rwm-hB, ...) with
// its own rackwired (own config, pin directory under /sys/fs/bpf/rwm-*,
// API socket, state directory), all connected through a routing namespace
// (rwm-rt) with static routes, and all sharing one real Consul agent that
// listens on the root namespace (loopback and 10.213.255.1, reached over
// the rwm-root veth). Endpoints are plugged in through the real CLI and
// real TCP crosses the hosts.
//
// The package holds only tests. Whoever changes the Consul store, the
// identity allocator, the agent's watches or the CLI keeps them passing.
// They need root, bpffs, iproute2, nsenter, python3 and the cached Consul
// binary (internal/testenv: skipped outside CI, failing under CI=true).
// Everything they create carries the prefix "rwm-" and is removed when a
// test ends, also on failure: agents and helpers are killed by pid,
// `rackwired cleanup` removes each host's datapath, namespaces and the
// root veth are deleted; leftovers of a killed run are removed before a
// test starts.
//
// Addresses: host i has the uplink 10.213.254.(4i+2)/30 and the workload
// CIDR 10.213.i.0/24; the root namespace holds one route, 10.213.0.0/16
// via the router, on the rwm-root link (it goes with the link).
//
//	go test ./tests/multihost/                 all tests (TestOutage stops Consul for 60 s)
//	go test -tags rackwire_bench -count=1 -v -run TestBench -timeout 20m ./tests/multihost/
//	                                           300,000 ipcache entries into one agent; propagation to 10 agents
//
// Figures (request rates, recovery bound, sync time and memory,
// propagation percentiles) are printed with t.Logf, never asserted as
// timings; the assertions are about what must hold: no request of the
// flow lost, agents up, keys back, verdicts by identity.
package multihost
