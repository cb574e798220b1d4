// Package bpf holds the eBPF C sources of the rackwire datapath and the Go
// bindings bpf2go generates from them, with their compiled objects, so that
// `go build` needs no clang. Only daemon/datapath imports it.
//
// Two programs attach to the host-side veth of every endpoint:
// rw_from_endpoint (from_endpoint.c, tc/tcx ingress: the endpoint's egress)
// and rw_to_endpoint (to_endpoint.c, tc/tcx egress: the endpoint's ingress).
// With the load-time constant rw_redirect_peer set, rw_from_endpoint also
// decides a local destination endpoint's ingress and delivers the packet
// with bpf_redirect_peer (rw_local_deliver in datapath.h).
// The shared structs live in datapath_types.h, the maps in datapath_maps.h.
//
// Regenerate with `make generate` (or `go generate ./bpf`, which runs
// generate.sh) after changing any C file; the output is deterministic and CI
// fails when the committed files differ. The objects are little-endian
// (bpfel) only.
package bpf

//go:generate sh generate.sh
