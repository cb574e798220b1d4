package ipcache

import (
	"encoding/binary"
	"net/netip"
	"runtime"
	"testing"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/store"
)

// countWriter is a Writer that only counts, so that the benchmarks measure
// the cache and not a fake map.
type countWriter struct{ writes int }

func (w *countWriter) UpsertIPCache(netip.Prefix, uint32, netip.Addr) error { w.writes++; return nil }
func (w *countWriter) DeleteIPCache(netip.Prefix) error                     { w.writes++; return nil }

const (
	benchEntries = 300_000
	benchNodes   = 1000 // 300 endpoints per node
)

func addr4(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// benchNodeIP is node i's address; benchEndpoint is endpoint j of node i,
// inside the node's /23 (10.0.0.0 + 512·i).
func benchNodeIP(i int) netip.Addr      { return addr4(0xAC100000 + uint32(i)) } // 172.16.0.0 + i
func benchEndpoint(i, j int) netip.Addr { return addr4(0x0A000000 + uint32(i)*512 + uint32(j) + 1) }
func benchNodeCIDR(i int) netip.Prefix  { return netip.PrefixFrom(addr4(0x0A000000+uint32(i)*512), 23) }
func benchIdentity(n int) uint32        { return uint32(identity.Make(3, 256+uint32(n%20000))) }
func benchSetEntry(n int) (netip.Prefix, Entry) {
	i, j := n%benchNodes, n/benchNodes
	return netip.PrefixFrom(benchEndpoint(i, j), 32), Entry{Identity: benchIdentity(n), HostIP: benchNodeIP(i)}
}

// benchSet is the remote set of a 300,000-entry fleet; every n-th entry's
// identity is changed when churn > 0.
func benchSet(churn int) map[netip.Prefix]Entry {
	set := make(map[netip.Prefix]Entry, benchEntries)
	for n := range benchEntries {
		p, e := benchSetEntry(n)
		if churn > 0 && n%churn == 0 {
			e.Identity++
		}
		set[p] = e
	}
	return set
}

// heapBytesPerEntry measures the heap the cache holds for the set.
func heapBytesPerEntry(set map[netip.Prefix]Entry) float64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	c := New(&countWriter{}, nil)
	_ = c.Replace(RemoteEndpoint, set)
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(c)
	return float64(after.HeapAlloc-before.HeapAlloc) / float64(len(set))
}

// BenchmarkReplace300k replaces the remote entries of a 300,000-entry
// fleet: "initial" fills an empty cache (every entry written), "unchanged"
// gives the same list again (nothing written), "churn1pct" alternates
// between two lists that differ in 1% of the identities (3,000 writes).
// B/entry is the heap the cache holds per entry.
func BenchmarkReplace300k(b *testing.B) {
	a, changed := benchSet(0), benchSet(100)
	perEntry := heapBytesPerEntry(a)

	b.Run("initial", func(b *testing.B) {
		w := &countWriter{}
		for b.Loop() {
			c := New(w, nil)
			if err := c.Replace(RemoteEndpoint, a); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(w.writes)/float64(b.N), "writes/op")
		b.ReportMetric(perEntry, "B/entry")
	})
	b.Run("unchanged", func(b *testing.B) {
		w := &countWriter{}
		c := New(w, nil)
		_ = c.Replace(RemoteEndpoint, a)
		w.writes = 0
		for b.Loop() {
			if err := c.Replace(RemoteEndpoint, a); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(w.writes)/float64(b.N), "writes/op")
		b.ReportMetric(perEntry, "B/entry")
	})
	b.Run("churn1pct", func(b *testing.B) {
		w := &countWriter{}
		c := New(w, nil)
		_ = c.Replace(RemoteEndpoint, a)
		w.writes = 0
		sets := [2]map[netip.Prefix]Entry{changed, a}
		i := 0
		for b.Loop() {
			if err := c.Replace(RemoteEndpoint, sets[i%2]); err != nil {
				b.Fatal(err)
			}
			i++
		}
		b.ReportMetric(float64(w.writes)/float64(b.N), "writes/op")
		b.ReportMetric(perEntry, "B/entry")
	})
}

// BenchmarkRemote300k checks a store list of 300,000 ipcache records from
// 1,000 nodes.
func BenchmarkRemote300k(b *testing.B) {
	self := Self{Node: "self", Cluster: "prod", ClusterID: 3, Addrs: []netip.Addr{addr("192.0.2.1")}, CIDRs: []netip.Prefix{pfx("10.200.0.0/24")}}
	nodeKVs := make([]store.KV, 0, benchNodes)
	for i := range benchNodes {
		name := "node-" + benchNodeIP(i).String()
		nodeKVs = append(nodeKVs, jsonKV(store.NodeKey("prod", name), nodeRec(name, []string{benchNodeIP(i).String()}, []string{benchNodeCIDR(i).String()})))
	}
	nodes, rej := Nodes(nodeKVs, self)
	if len(rej) != 0 || len(nodes) != benchNodes {
		b.Fatalf("nodes: %d, rejected %v", len(nodes), rej[:min(len(rej), 3)])
	}
	kvs := make([]store.KV, 0, benchEntries)
	for n := range benchEntries {
		i := n % benchNodes
		p, e := benchSetEntry(n)
		kvs = append(kvs, jsonKV(store.IPKey("prod", p.Addr()),
			ipRec(p.Addr().String(), e.Identity, e.HostIP.String(), "node-"+benchNodeIP(i).String())))
	}
	for b.Loop() {
		set, rej := Remote(kvs, nodes, self)
		if len(set) != benchEntries || len(rej) != 0 {
			b.Fatalf("set %d, rejected %v", len(set), rej[:min(len(rej), 3)])
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchEntries, "ns/entry")
}
