package datapath

import (
	"errors"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
)

// Features is what the kernel offers the datapath and what it falls back to.
type Features struct {
	TCX          bool   `json:"tcx"`           // tcx links (6.6+); else legacy clsact tc
	RingBuf      bool   `json:"ringbuf"`       // ring buffer maps (5.8+); else events on a perf event array
	RedirectPeer bool   `json:"redirect_peer"` // bpf_redirect_peer (5.10+)
	LPM          bool   `json:"lpm"`           // LPM trie maps; else prefixes are unsupported
	BTF          bool   `json:"btf"`           // kernel BTF at /sys/kernel/btf/vmlinux
	HashOfMaps   bool   `json:"hash_of_maps"`  // required: per-endpoint policy maps
	AttachMode   string `json:"attach_mode"`   // tcx or tc, as chosen by Open
	// LocalRedirect: Open chose bpf_redirect_peer for local endpoint-to-
	// endpoint traffic (RedirectPeer and not Options.NoRedirectPeer).
	LocalRedirect bool `json:"local_redirect"`
	// HostRouting: the kernel has what host routing "bpf" needs:
	// bpf_fib_lookup (4.18), bpf_redirect_peer (5.10), bpf_check_mtu (5.12).
	HostRouting bool `json:"host_routing"`
	// HostRoutingMode is the mode Open chose ("bpf" or "legacy") and
	// HostRoutingWhy the reason ([datapath] host_routing, or the kernel).
	HostRoutingMode string `json:"host_routing_mode"`
	HostRoutingWhy  string `json:"host_routing_why"`
	// fibLookup, checkMTU: the single probes, for the reason in HostRoutingWhy.
	fibLookup, checkMTU, redirectPeer bool
	// coarseClock: bpf_ktime_get_coarse_ns (5.11), connection tracking's
	// clock where the kernel has it (bpf/ct.h rw_coarse_clock).
	coarseClock bool
	// Events is the event transport Open chose ("ringbuf" or "perf") and
	// EventsWhy the reason ([datapath] events, or what the kernel has).
	Events    string   `json:"events"`
	EventsWhy string   `json:"events_why"`
	Fallbacks []string `json:"fallbacks,omitempty"`
}

func probeFeatures() Features {
	var f Features
	// Querying tcx on loopback changes nothing and fails without tcx.
	_, err := link.QueryPrograms(link.QueryOptions{Target: 1, Attach: ebpf.AttachTCXIngress})
	f.TCX = err == nil
	f.RingBuf = features.HaveMapType(ebpf.RingBuf) == nil
	f.LPM = features.HaveMapType(ebpf.LPMTrie) == nil
	f.HashOfMaps = features.HaveMapType(ebpf.HashOfMaps) == nil
	// The local fast path needs both: the MTU check keeps too-big packets
	// on the host stack, which reports them.
	f.redirectPeer = features.HaveProgramHelper(ebpf.SchedCLS, asm.FnRedirectPeer) == nil
	f.checkMTU = features.HaveProgramHelper(ebpf.SchedCLS, asm.FnCheckMtu) == nil
	f.fibLookup = features.HaveProgramHelper(ebpf.SchedCLS, asm.FnFibLookup) == nil
	f.coarseClock = features.HaveProgramHelper(ebpf.SchedCLS, asm.FnKtimeGetCoarseNs) == nil
	f.RedirectPeer = f.redirectPeer && f.checkMTU
	f.HostRouting = f.RedirectPeer && f.fibLookup
	_, err = os.Stat("/sys/kernel/btf/vmlinux")
	f.BTF = !errors.Is(err, os.ErrNotExist) && err == nil
	if !f.TCX {
		f.Fallbacks = append(f.Fallbacks, "legacy clsact tc filters instead of tcx links")
	}
	if !f.RingBuf {
		f.Fallbacks = append(f.Fallbacks, "no ring buffer (5.8+): events on a perf event array")
	}
	if !f.RedirectPeer {
		f.Fallbacks = append(f.Fallbacks, "local delivery through the host stack")
	}
	if !f.HostRouting {
		f.Fallbacks = append(f.Fallbacks, "traffic to and from other hosts through the host stack (no "+f.hostRoutingMissing()+")")
	}
	if !f.BTF {
		f.Fallbacks = append(f.Fallbacks, "no kernel BTF: objects carry their own BTF, nothing lost")
	}
	return f
}

// hostRoutingMissing names the helpers host routing "bpf" lacks.
func (f Features) hostRoutingMissing() string {
	var miss []string
	for _, h := range []struct {
		ok   bool
		name string
	}{{f.fibLookup, "bpf_fib_lookup (4.18)"}, {f.redirectPeer, "bpf_redirect_peer (5.10)"}, {f.checkMTU, "bpf_check_mtu (5.12)"}} {
		if !h.ok {
			miss = append(miss, h.name)
		}
	}
	if len(miss) == 0 {
		return "nothing"
	}
	return strings.Join(miss, ", ")
}
