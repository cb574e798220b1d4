// Package fleet runs a fleet of rackwired agents on one machine against a
// three-server Consul and measures what the store pays for it: cold
// convergence, requests and bytes Consul serves in steady state and per
// single endpoint change as the ipcache grows, a fleet-wide restart
// through `rackwired prestart` with the gate on and off, and the fleet's
// faults (the Consul leader killed during convergence, 10% of the agents
// restarted in a loop).
//
// Every agent is a simulated host: its own network namespace (a veth on a
// bridge in the root namespace), config, state directory, API socket and
// BPF pin directory, with a few real endpoints (namespaces plugged in with
// `rackwire endpoint add`). Consul's three servers listen on loopback;
// each has a counting reverse proxy on the bridge address in front of its
// HTTP API, and the agents are spread over the three proxies, so every
// request and every byte an agent gets from Consul is counted (the agents
// talk to the servers directly here, as a host without a local client
// agent would; with a client agent per host the servers serve the same
// lists to the client agents over RPC).
//
// The suite is behind the build tag rackwire_fleet (`make bench-fleet`)
// because it takes minutes and most of the machine. RACKWIRE_FLEET_AGENTS
// sets the number of agents (default 100). Figures are printed (lines
// starting with BENCH), never asserted: the machine is shared. Invariants
// (no agent exits, no duplicate identity, no lost ipcache entry) are
// asserted.
package fleet
