package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/internal/testenv"
)

// benchCase is one datapath configuration measured by BenchmarkScaling.
type benchCase struct {
	name string
	d    *Datapath
	p    pkt
	ct   ct4Key
}

// newFlowCost returns the mean in-kernel cost of n new flows: the CT entry
// the previous packet created is deleted (outside the timed part) so every
// packet takes the full path: CT miss, ipcache, policy, CT create.
func (c benchCase) newFlowCost(b *testing.B, n int) time.Duration {
	data := c.p.bytes()
	var total time.Duration
	for range n {
		if err := c.d.maps["rw_ct4_tcp"].Delete(c.ct); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			b.Fatal(err)
		}
		ret, dur, err := c.d.to.Benchmark(data, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		if ret != passRet {
			b.Fatalf("%s: verdict %#x, want pass", c.name, ret)
		}
		total += dur
	}
	return total / time.Duration(n)
}

func benchEndpoint(b *testing.B, d *Datapath, id uint16, ip netip.Addr, policy []Entry) {
	d.mu.Lock()
	err := d.addEndpointLocked(EndpointSpec{ID: id, IfIndex: 1, IPs: []netip.Addr{ip}, Identity: epIdentity})
	d.mu.Unlock()
	if err != nil {
		b.Fatal(err)
	}
	if err := d.SetPolicy(id, policy); err != nil {
		b.Fatal(err)
	}
}

// fillIPCache adds n /32 entries (10.128.0.0 upwards) in batches.
func fillIPCache(b *testing.B, d *Datapath, n int) {
	const batch = 10000
	for start := 0; start < n; start += batch {
		var (
			keys []ipKey
			vals []ipcacheValue
		)
		for i := start; i < min(start+batch, n); i++ {
			a := netip.AddrFrom4([4]byte{10, byte(128 + i>>16), byte(i >> 8), byte(i)})
			keys = append(keys, newIPKey(a))
			vals = append(vals, ipcacheValue{Identity: uint32(100000 + i%5000)})
		}
		if _, err := d.maps["rw_ipcache"].BatchUpdate(keys, vals, nil); err != nil {
			b.Fatalf("fill ipcache: %v", err)
		}
	}
}

// BenchmarkScaling prints the per-packet cost of a new flow through
// rw_to_endpoint (BPF_PROG_TEST_RUN) with 10 vs 100,000 policy entries and
// with 1,000 vs 300,000 ipcache entries, as ratios measured in the same run,
// alternating the configurations in rounds and taking medians. Run with
//
//	go test ./daemon/datapath -run '^$' -bench Scaling -benchtime 1x
func BenchmarkScaling(b *testing.B) {
	testenv.RequireRoot(b)
	const (
		rounds  = 7
		packets = 3000
	)
	small := openTest(b, Options{PolicyMaxEntries: 131072, IPCacheMaxEntries: 4096})
	large := openTest(b, Options{PolicyMaxEntries: 131072, IPCacheMaxEntries: 524288})
	fillIPCache(b, small, 1000)
	fillIPCache(b, large, 300000)

	peer := netip.AddrFrom4([4]byte{10, 128, 1, 44}) // in both ipcaches
	ep10 := netip.MustParseAddr("10.77.0.10")
	ep100k := netip.MustParseAddr("10.77.0.11")
	allow := Entry{Identity: 100000 + 300%5000, Direction: Ingress, Proto: protoTCP, Port: 443}
	// 10 entries: the matching one and 9 others.
	few := []Entry{allow}
	for i := range 9 {
		few = append(few, Entry{Identity: uint32(200000 + i), Direction: Ingress, Proto: protoTCP, Port: 443})
	}
	// 100,000 entries: 25,000 identities x 4 ports, plus the matching one.
	many := []Entry{allow}
	for i := range 99999 {
		many = append(many, Entry{Identity: uint32(300000 + i/4), Direction: Ingress, Proto: protoTCP, Port: uint16(1000 + i%4)})
	}
	benchEndpoint(b, small, 10, ep10, few)
	benchEndpoint(b, small, 11, ep100k, many)
	benchEndpoint(b, large, 10, ep10, few)

	mk := func(name string, d *Datapath, id uint16, dst netip.Addr) benchCase {
		p := pkt{src: peer, dst: dst, proto: protoTCP, sport: 40000, dport: 443, tcpFlags: tcpSYN, payloadLen: 10}
		return benchCase{name: name, d: d, p: p, ct: ct4Key{
			SAddr: peer.As4(), DAddr: dst.As4(), SPort: toBE16(40000), DPort: toBE16(443),
			Proto: protoTCP, Direction: uint8(Ingress), Endpoint: id,
		}}
	}
	cases := []benchCase{
		mk("policy=10 ipcache=1000", small, 10, ep10),
		mk("policy=100000 ipcache=1000", small, 11, ep100k),
		mk("policy=10 ipcache=300000", large, 10, ep10),
	}
	for _, c := range cases { // warm up
		c.newFlowCost(b, 200)
	}
	b.ResetTimer()
	res := make([][]float64, len(cases))
	for range b.N {
		for range rounds {
			for i, c := range cases {
				res[i] = append(res[i], float64(c.newFlowCost(b, packets).Nanoseconds()))
			}
		}
	}
	b.StopTimer()
	med := make([]float64, len(cases))
	for i := range cases {
		slices.Sort(res[i])
		med[i] = res[i][len(res[i])/2]
		fmt.Printf("new flow, %-28s %7.0f ns/pkt (median of %d rounds x %d packets)\n", cases[i].name, med[i], len(res[i]), packets)
	}
	for _, c := range cases {
		c.newFlowCost(b, 1) // leaves the CT entry: every packet below is established
		_, dur, err := c.d.to.Benchmark(c.p.bytes(), 100000, nil)
		if err != nil {
			b.Fatal(err)
		}
		fmt.Printf("established, %-25s %7d ns/pkt (CT hit, no policy lookup)\n", c.name, dur.Nanoseconds())
	}
	fmt.Printf("ratio policy 100000/10:   %.3f (goal <= 1.05)\n", med[1]/med[0])
	fmt.Printf("ratio ipcache 300000/1000: %.3f (goal <= 1.10)\n", med[2]/med[0])
	b.ReportMetric(med[0], "ns/pkt-base")
	b.ReportMetric(med[1]/med[0], "ratio-policy")
	b.ReportMetric(med[2]/med[0], "ratio-ipcache")
}

// swapPolicies returns two disjoint policies of n entries each (n/10
// identities x 10 ports, plus the egress wildcard), so applying one after
// the other replaces every entry.
func swapPolicies(n int) [2][]Entry {
	var out [2][]Entry
	for v := range 2 {
		p := []Entry{{Direction: Egress}}
		for i := range n - 1 {
			p = append(p, Entry{
				Identity:  uint32(100000 + v*1000000 + i/10),
				Direction: Ingress, Proto: protoTCP, Port: uint16(8000 + i%10),
			})
		}
		out[v] = p
	}
	return out
}

// reportLatencies reports the median and the 99th percentile of ds in ms.
func reportLatencies(b *testing.B, ds []time.Duration, what string) {
	slices.Sort(ds)
	q := func(p float64) float64 {
		return float64(ds[min(int(p*float64(len(ds))), len(ds)-1)].Microseconds()) / 1000
	}
	b.ReportMetric(q(0.5), "ms-p50-"+what)
	b.ReportMetric(q(0.99), "ms-p99-"+what)
	b.ReportMetric(float64(ds[len(ds)-1].Microseconds())/1000, "ms-max-"+what)
}

// BenchmarkPolicySwap times SetPolicy replacing a 10,000-entry policy by
// another one (every entry changes, so every call builds and swaps in a
// new map): for one endpoint, and for 100 endpoints one after the other,
// as the agent writes them. Goal: p99 <= 50 ms per endpoint. Run with
//
//	go test ./daemon/datapath -run '^$' -bench PolicySwap -benchtime 20x
func BenchmarkPolicySwap(b *testing.B) {
	testenv.RequireRoot(b)
	const entries = 10000
	policies := swapPolicies(entries)
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("endpoints=%d", n), func(b *testing.B) {
			d := openTest(b, Options{PolicyMaxEntries: 16384})
			for i := range n {
				ip := netip.AddrFrom4([4]byte{10, 79, byte(i >> 8), byte(i)})
				benchEndpoint(b, d, uint16(1000+i), ip, policies[0])
			}
			var per, rounds []time.Duration
			b.ResetTimer()
			for i := range b.N {
				p := policies[(i+1)%2]
				start := time.Now()
				for ep := range n {
					t0 := time.Now()
					if err := d.SetPolicy(uint16(1000+ep), p); err != nil {
						b.Fatal(err)
					}
					per = append(per, time.Since(t0))
				}
				rounds = append(rounds, time.Since(start))
			}
			b.StopTimer()
			reportLatencies(b, per, "endpoint")
			if n > 1 {
				reportLatencies(b, rounds, "all")
			}
		})
	}
}
