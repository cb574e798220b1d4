// Package e2e drives the real rackwired agent and the real rackwire CLI on
// one host: it builds both binaries once, starts the agent with a config
// whose every path lives in a temporary directory, plugs network namespaces
// in as endpoints through the CLI and sends real TCP, UDP and ICMP traffic
// between them (and to plain namespaces that are not endpoints).
//
// The package holds only tests; whoever changes the agent's wiring, the CLI,
// the datapath or the policy engine keeps these passing. They need root,
// bpffs and bpftool (internal/testenv skips outside CI and fails under
// CI=true). Every namespace, pin directory and temporary directory is named
// with the prefix "rwg-" and removed when a test ends, also on failure: the
// agent is killed by pid, `rackwired cleanup` removes its datapath, and the
// namespaces are deleted. A restart test kills the agent with SIGKILL on
// purpose and checks that the traffic never notices. Tests run one after the
// other: endpoint veth names (rwNNNNN) are per host, not per agent.
//
// RACKWIRE_TEST_EVENTS=perf (or ringbuf, auto) sets [datapath] events in
// every test agent's config; `make test` runs the whole suite once more
// with perf (test-e2e-perf), the transport of kernels before 5.8.
package e2e
