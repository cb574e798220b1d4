// Package bgp is the end-to-end proof of the BIRD integration with the real
// agent: two hosts, each a network namespace running its own BIRD and its
// own rackwired (bin built from this tree), peer with one top-of-rack
// namespace running BIRD with `merge paths`. The suite drives the agents
// only through the operator CLI (`rackwire status`, `rackwire bgp ...`,
// `rackwire endpoint add`) and checks the ToR's kernel routing table.
//
// It needs root, bpffs, ip, nsenter and bird; under CI=true a missing one
// fails the test with the command that installs it. Everything it creates
// (namespaces rwn-*, pins /sys/fs/bpf/rwn-*, processes, temp dirs) is
// removed at cleanup, processes by pid. Run it alone: go test ./tests/bgp/
package bgp
