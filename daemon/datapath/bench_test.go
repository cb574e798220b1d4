package datapath

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

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

// The scaling benchmark's address plan: exact ipcache entries from
// 10.128.0.0 upwards (identity 100000 + i%1000, so the identities the flows
// carry are the same whatever the ipcache size), and scalePrefixes /24
// prefixes from 10.64.0.0 (CIDR identity 200000 + i) that no exact entry
// covers.
const (
	scaleIdentityBase = 100000
	scaleIdentities   = 1000
	scaleCIDRBase     = 200000
	scalePrefixes     = 1000
	scaleFlows        = 10240
)

func scaleExactAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(128 + i>>16), byte(i >> 8), byte(i)})
}

func scalePrefix(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(64 + i>>8), byte(i), 0}), 24)
}

// fillIPCache adds n exact entries in batches, and the prefixes.
func fillIPCache(b *testing.B, d *Datapath, n int) {
	const batch = 10000
	for start := 0; start < n; start += batch {
		var (
			keys []ipKey
			vals []ipcacheValue
		)
		for i := start; i < min(start+batch, n); i++ {
			keys = append(keys, newIPKey(scaleExactAddr(i)))
			vals = append(vals, ipcacheValue{Identity: uint32(scaleIdentityBase + i%scaleIdentities)})
		}
		if _, err := d.maps["rw_ipcache"].BatchUpdate(keys, vals, nil); err != nil {
			b.Fatalf("fill ipcache: %v", err)
		}
	}
	for i := range scalePrefixes {
		if err := d.UpsertIPCache(scalePrefix(i), uint32(scaleCIDRBase+i), netip.Addr{}); err != nil {
			b.Fatal(err)
		}
	}
}

// scalePolicy is the policy every flow of the ring is decided by: port
// ranges (two block sizes and more), an exact deny inside an allowed range,
// identity denies (one for any protocol, one for TCP), a CIDR identity deny,
// one identity-specific allow, and the egress wildcard. With extra > 0 it
// adds that many entries on ports no flow uses, for the identities the
// flows carry (every tenth a deny), which only make the map larger: the
// same block sizes and deny flag, so a packet takes the same lookups.
func scalePolicy(extra int) []Entry {
	es := []Entry{
		{Direction: Ingress, Proto: protoTCP, Port: 8192, EndPort: 8447},
		{Direction: Ingress, Proto: protoTCP, Port: 9000, EndPort: 9099},
		{Direction: Ingress, Proto: protoTCP, Port: 8200, Deny: true},
		{Identity: scaleIdentityBase + 50, Direction: Ingress, Deny: true},
		{Identity: scaleIdentityBase + 100, Direction: Ingress, Proto: protoTCP, Deny: true},
		{Direction: Ingress, Proto: protoUDP, Port: 53},
		{Identity: scaleIdentityBase + 1, Direction: Ingress, Proto: protoTCP, Port: 443},
		{Direction: Ingress, Proto: protoICMP, Port: 8},
		{Identity: scaleCIDRBase + 7, Direction: Ingress, Deny: true},
		{Direction: Egress},
	}
	for i := range extra {
		es = append(es, Entry{Identity: uint32(scaleIdentityBase + i%scaleIdentities), Direction: Ingress,
			Proto: protoTCP, Port: uint16(20000 + i/scaleIdentities), Deny: i%10 == 9})
	}
	return es
}

// scaleRing is scaleFlows distinct new flows to dst (TCP SYNs mostly, some
// UDP), 80% from exact ipcache entries drawn from the first n, 20% from the
// prefixes; destination ports spread over the ranges, the deny inside
// them, port 443 (allowed for one identity) and random ports.
func scaleRing(dst netip.Addr, n int) []pkt {
	r := rand.New(rand.NewPCG(1, 2))
	seen := map[[3]uint32]bool{}
	var ring []pkt
	for len(ring) < scaleFlows {
		var src netip.Addr
		if r.IntN(5) == 0 {
			a := scalePrefix(r.IntN(scalePrefixes)).Addr().As4()
			a[3] = byte(1 + r.IntN(254))
			src = netip.AddrFrom4(a)
		} else {
			src = scaleExactAddr(r.IntN(n))
		}
		p := pkt{src: src, dst: dst, proto: protoTCP, sport: uint16(1024 + r.IntN(64000)), tcpFlags: tcpSYN, payloadLen: 10}
		switch x := r.IntN(100); {
		case x < 50:
			p.dport = uint16(8192 + r.IntN(256))
		case x < 70:
			p.dport = uint16(9000 + r.IntN(100))
		case x < 75:
			p.dport = 8200
		case x < 85:
			p.dport = 443
		case x < 95:
			p.proto, p.dport, p.tcpFlags = protoUDP, 53, 0
		default:
			p.dport = uint16(1 + r.IntN(65535))
		}
		k := [3]uint32{binary.BigEndian.Uint32(p.src.AsSlice()), uint32(p.sport)<<16 | uint32(p.dport), uint32(p.proto)}
		if !seen[k] {
			seen[k] = true
			ring = append(ring, p)
		}
	}
	return ring
}

// scaleCase is one configuration of BenchmarkScaling: a datapath and the
// ring of flows to its endpoint.
type scaleCase struct {
	name     string
	d        *Datapath
	ring     [][]byte // new flows
	est      [][]byte // the ring's allowed flows again, ACK: established
	passed   int
	verdicts map[Reason]uint64
}

// runRing sends every packet once (PROG_TEST_RUN, repeat 1) and returns
// the mean in-kernel time per packet and how many passed.
func runRing(b *testing.B, d *Datapath, ring [][]byte) (time.Duration, int) {
	var (
		total  time.Duration
		passed int
	)
	for _, data := range ring {
		ret, dur, err := d.to.Benchmark(data, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		if ret == passRet {
			passed++
		}
		total += dur
	}
	return total / time.Duration(len(ring)), passed
}

// newFlows flushes connection tracking (untimed) and sends the ring:
// every packet is a CT miss, decided by ipcache and policy.
func (c *scaleCase) newFlows(b *testing.B) time.Duration {
	flushCT(b, c.d)
	dur, passed := runRing(b, c.d, c.ring)
	if passed != c.passed {
		b.Fatalf("%s: %d of %d new flows passed, %d in the first pass", c.name, passed, len(c.ring), c.passed)
	}
	return dur
}

// established sends the allowed flows again (after newFlows): CT hits.
func (c *scaleCase) established(b *testing.B) time.Duration {
	dur, passed := runRing(b, c.d, c.est)
	if passed != len(c.est) {
		b.Fatalf("%s: %d of %d established packets passed", c.name, passed, len(c.est))
	}
	return dur
}

// prepare sends the ring once, keeps the allowed flows for the
// established ring, and counts the verdicts by reason.
func (c *scaleCase) prepare(b *testing.B, ring []pkt) {
	flushCT(b, c.d)
	before := metricCounts(b, c.d)
	for _, p := range ring {
		data := p.bytes()
		c.ring = append(c.ring, data)
		ret, _, err := c.d.to.Benchmark(data, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		if ret == passRet {
			c.passed++
			if p.proto == protoTCP {
				p.tcpFlags = tcpACK
			}
			c.est = append(c.est, p.bytes())
		}
	}
	c.verdicts = map[Reason]uint64{}
	for k, n := range metricCounts(b, c.d) {
		if d := n - before[k]; d > 0 {
			c.verdicts[k] += d
		}
	}
}

func metricCounts(b *testing.B, d *Datapath) map[Reason]uint64 {
	ms, err := d.Metrics()
	if err != nil {
		b.Fatal(err)
	}
	out := map[Reason]uint64{}
	for _, m := range ms {
		if m.Direction == Ingress {
			out[m.Reason] += m.Packets
		}
	}
	return out
}

// BenchmarkScaling prints the per-packet cost through rw_to_endpoint
// (BPF_PROG_TEST_RUN) of 10,240 distinct flows, for new flows (CT miss,
// ipcache, policy, CT create) and established ones (CT hit), with 10 vs
// 100,000 policy entries and with 1,000 vs 300,000 exact ipcache entries
// (1,000 prefixes in the trie in every configuration; both ipcache maps
// have the default size, so only their content differs). The flows come
// from many identities and addresses, hit port ranges, an exact deny
// inside a range, identity and CIDR denies and random ports, so the
// lookups spread over the maps instead of hitting one cache-hot key. The
// configurations alternate in rounds (order rotating); the figures are
// medians of the per-round means. RW_BENCH_QUICK=1 runs 3 rounds. Run with
//
//	go test ./daemon/datapath -run '^$' -bench Scaling -benchtime 1x
func BenchmarkScaling(b *testing.B) {
	testenv.RequireRoot(b)
	rounds := 15
	if os.Getenv("RW_BENCH_QUICK") != "" {
		rounds = 3
	}
	small := openTest(b, Options{PolicyMaxEntries: 131072, IPCacheMaxEntries: 524288, CTMaxEntries: 65536})
	large := openTest(b, Options{PolicyMaxEntries: 131072, IPCacheMaxEntries: 524288, CTMaxEntries: 65536})
	fillIPCache(b, small, 1000)
	fillIPCache(b, large, 300000)
	ep10 := netip.MustParseAddr("10.77.0.10")
	ep100k := netip.MustParseAddr("10.77.0.11")
	benchEndpoint(b, small, 10, ep10, scalePolicy(0))
	benchEndpoint(b, small, 11, ep100k, scalePolicy(99990))
	benchEndpoint(b, large, 10, ep10, scalePolicy(0))

	cases := []*scaleCase{
		{name: "policy=10 ipcache=1000", d: small},
		{name: "policy=100000 ipcache=1000", d: small},
		{name: "policy=10 ipcache=300000", d: large},
	}
	cases[0].prepare(b, scaleRing(ep10, 1000))
	cases[1].prepare(b, scaleRing(ep100k, 1000))
	cases[2].prepare(b, scaleRing(ep10, 300000))
	for _, c := range cases {
		fmt.Printf("flows %-28s %d distinct, %d allowed; verdicts %v\n", c.name+":", len(c.ring), c.passed, c.verdicts)
	}
	// The floor: an ARP packet returns right after parsing; what
	// PROG_TEST_RUN itself costs per call is in every figure below.
	floor, _ := runRing(b, small, [][]byte{arpFrame()})
	for range 999 {
		f, _ := runRing(b, small, [][]byte{arpFrame()})
		floor = min(floor, f)
	}

	b.ResetTimer()
	newNS := make([][]float64, len(cases))
	estNS := make([][]float64, len(cases))
	for range b.N {
		for round := range rounds {
			for i := range cases {
				idx := (i + round) % len(cases)
				c := cases[idx]
				newNS[idx] = append(newNS[idx], float64(c.newFlows(b).Nanoseconds()))
				estNS[idx] = append(estNS[idx], float64(c.established(b).Nanoseconds()))
			}
		}
	}
	b.StopTimer()
	med := func(xs []float64) float64 {
		s := slices.Clone(xs)
		slices.Sort(s)
		return s[len(s)/2]
	}
	fmt.Printf("floor (ARP, parse only): %d ns/call of PROG_TEST_RUN, in every figure below\n", floor.Nanoseconds())
	for i, c := range cases {
		fmt.Printf("new flow,    %-28s %6.0f ns/pkt (median of %d rounds x %d flows)\n", c.name, med(newNS[i]), len(newNS[i]), len(c.ring))
	}
	for i, c := range cases {
		fmt.Printf("established, %-28s %6.0f ns/pkt (median of %d rounds x %d flows)\n", c.name, med(estNS[i]), len(estNS[i]), len(c.est))
	}
	for _, g := range []struct {
		what  string
		i     int
		goal  float64
		ns    [][]float64
		label string
	}{
		{"policy 100000/10", 1, 1.05, newNS, "new flow"},
		{"ipcache 300000/1000", 2, 1.10, newNS, "new flow"},
		{"policy 100000/10", 1, 1.05, estNS, "established"},
		{"ipcache 300000/1000", 2, 1.10, estNS, "established"},
	} {
		r := med(g.ns[g.i]) / med(g.ns[0])
		verdict := "met"
		if r > g.goal {
			verdict = "NOT MET"
		}
		fmt.Printf("ratio %-12s %-20s %.3f  goal <= %.2f: %s\n", g.label, g.what, r, g.goal, verdict)
		b.ReportMetric(r, fmt.Sprintf("ratio-%s-%s", strings.Fields(g.what)[0], strings.Fields(g.label)[0]))
	}
	b.ReportMetric(med(newNS[0]), "ns/pkt-new")
	b.ReportMetric(med(estNS[0]), "ns/pkt-est")
}

// arpFrame is an ARP request: the programs pass it right after parsing.
func arpFrame() []byte {
	f := make([]byte, 42)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], []byte{2, 0, 0, 0, 0, 1})
	binary.BigEndian.PutUint16(f[12:], 0x0806)
	return f
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

// BenchmarkUplinkPass measures, in BPF_PROG_TEST_RUN, what rw_from_uplink
// costs a packet that is for no service frontend and no local endpoint:
// the host's own traffic on an uplink (BGP, SSH), which it parses, looks
// up as a frontend and as an endpoint, and passes. Run with
// -bench BenchmarkUplinkPass (root).
func BenchmarkUplinkPass(b *testing.B) {
	testenv.RequireRoot(b)
	d := openTest(b, Options{HostRouting: HostRoutingAuto})
	if d.uplink == nil {
		b.Fatalf("rw_from_uplink did not load: %v", d.uplinkErr)
	}
	data := pkt{src: netip.MustParseAddr("192.0.2.1"), dst: netip.MustParseAddr("198.51.100.1"),
		proto: protoTCP, sport: 40000, dport: 179, tcpFlags: tcpACK, payloadLen: 10}.bytes()
	const repeat = 10000
	var total time.Duration
	b.ResetTimer()
	for range b.N {
		ret, dur, err := d.uplink.Benchmark(data, repeat, nil)
		if err != nil {
			b.Fatal(err)
		}
		if ret != passRet {
			b.Fatalf("rw_from_uplink returned %d for the host's own traffic, want %d (pass)", ret, passRet)
		}
		total += dur
	}
	b.StopTimer()
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/pkt")
}

// BenchmarkIPCacheBulkWrite: 30,000 ipcache entries written one by one
// (each bumps the policy revision: three syscalls) against quietly and one
// Settle at the end (ipcache.QuietWriter: one syscall per entry), and in
// batches of 1,024 (ipcache.BatchWriter: one syscall per batch), in
// alternating rounds of one run; the ratios are quiet/loud and
// batch/quiet.
func BenchmarkIPCacheBulkWrite(b *testing.B) {
	testenv.RequireRoot(b)
	const n = 30000
	d := openTest(b, Options{IPCacheMaxEntries: 65536})
	var loud, quiet time.Duration
	round := func(id uint32, write func(p netip.Prefix, id uint32) error, settle bool) time.Duration {
		start := time.Now()
		for i := range n {
			if err := write(netip.PrefixFrom(scaleExactAddr(i), 32), id+uint32(i%scaleIdentities)); err != nil {
				b.Fatal(err)
			}
		}
		if settle {
			if err := d.Settle(); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(start)
	}
	batch := func(id uint32) time.Duration {
		hosts, ids, hostIPs := make([]netip.Addr, 0, 1024), make([]uint32, 0, 1024), make([]netip.Addr, 1024)
		start := time.Now()
		for i := range n {
			hosts, ids = append(hosts, scaleExactAddr(i)), append(ids, id+uint32(i%scaleIdentities))
			if len(hosts) == 1024 || i == n-1 {
				if _, err := d.UpsertIPCacheBatchQuiet(hosts, ids, hostIPs[:len(hosts)]); err != nil {
					b.Fatal(err)
				}
				hosts, ids = hosts[:0], ids[:0]
			}
		}
		if err := d.Settle(); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	var batched time.Duration
	for i := range b.N {
		id := uint32(scaleIdentityBase + (i%2)*scaleIdentities)
		loud += round(id, func(p netip.Prefix, id uint32) error { return d.UpsertIPCache(p, id, netip.Addr{}) }, false)
		quiet += round(id+7, func(p netip.Prefix, id uint32) error { return d.UpsertIPCacheQuiet(p, id, netip.Addr{}) }, true)
		batched += batch(id + 11)
	}
	b.ReportMetric(float64(loud.Nanoseconds())/float64(b.N*n), "ns/entry-loud")
	b.ReportMetric(float64(quiet.Nanoseconds())/float64(b.N*n), "ns/entry-quiet")
	b.ReportMetric(float64(batched.Nanoseconds())/float64(b.N*n), "ns/entry-batch")
	b.ReportMetric(float64(quiet)/float64(loud), "quiet/loud")
	b.ReportMetric(float64(batched)/float64(quiet), "batch/quiet")
}
