package ipcache

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"testing"
)

// fakeMap is a Writer that keeps the map in memory and can fail on demand.
type fakeMap struct {
	mu      sync.Mutex
	m       map[netip.Prefix]Entry
	fail    map[netip.Prefix]bool // writes of these prefixes fail
	failAll bool
	ops     []string // "upsert 10.0.0.1/32 7 10.1.1.1", "delete 10.0.0.1/32"
}

var errFake = errors.New("fake map write failed")

func newFakeMap() *fakeMap {
	return &fakeMap{m: map[netip.Prefix]Entry{}, fail: map[netip.Prefix]bool{}}
}

func (f *fakeMap) check(p netip.Prefix) error {
	if np, err := normalize(p); err != nil || np != p {
		return fmt.Errorf("write of a prefix that is not normalised: %v", p)
	}
	if f.failAll || f.fail[p] {
		return errFake
	}
	return nil
}

func (f *fakeMap) UpsertIPCache(p netip.Prefix, id uint32, host netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(p); err != nil {
		return err
	}
	f.ops = append(f.ops, fmt.Sprintf("upsert %s %d %s", p, id, host))
	f.m[p] = Entry{Identity: id, HostIP: host}
	return nil
}

func (f *fakeMap) DeleteIPCache(p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(p); err != nil {
		return err
	}
	f.ops = append(f.ops, fmt.Sprintf("delete %s", p))
	delete(f.m, p)
	return nil
}

// takeOps returns and forgets the writes made so far.
func (f *fakeMap) takeOps() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	ops := f.ops
	f.ops = nil
	return ops
}

func (f *fakeMap) get(p netip.Prefix) (Entry, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.m[p]
	return e, ok
}

func (f *fakeMap) dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for p, e := range f.m {
		out = append(out, fmt.Sprintf("%s=%d/%s", p, e.Identity, e.HostIP))
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

func pfx(s string) netip.Prefix {
	if !strings.Contains(s, "/") {
		a := netip.MustParseAddr(s)
		return netip.PrefixFrom(a, a.BitLen())
	}
	return netip.MustParsePrefix(s)
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// checkInvariants compares the cache's internal bookkeeping with a
// recount: counts, multi, plen and host references.
func checkInvariants(t *testing.T, c *Cache) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	var count [numSources + 1]int
	var plen [2][129]uint32
	refs := map[uint32]uint32{}
	for k, s := range c.slots {
		if s.have == 0 {
			t.Fatalf("slot %s with no source", k.prefix())
		}
		plen[k.family()][k.bits]++
		m, multi := c.multi[k]
		if n := popcount(s.have); (n > 1) != multi {
			t.Fatalf("slot %s: %d sources, in multi: %v", k.prefix(), n, multi)
		}
		for _, src := range Sources() {
			if s.have&(1<<(src-1)) == 0 {
				continue
			}
			count[src]++
			if multi {
				refs[m[src-1].host]++
			} else {
				refs[s.top.host]++
			}
		}
		if multi && s.top != m[topSource(s.have)-1] {
			t.Fatalf("slot %s: top is not the highest source's wish", k.prefix())
		}
	}
	for k := range c.multi {
		if _, ok := c.slots[k]; !ok {
			t.Fatalf("multi holds %s, slots does not", k.prefix())
		}
	}
	if count != c.count {
		t.Fatalf("counts %v, recounted %v", c.count, count)
	}
	if plen != c.plen {
		t.Fatal("prefix length counts differ from a recount")
	}
	delete(refs, 0)
	for i, n := range refs {
		if c.hosts.refs[i] != n {
			t.Fatalf("host %d (%s): %d references, recounted %d", i, c.hosts.addrs[i], c.hosts.refs[i], n)
		}
	}
	if len(c.hosts.index) != len(refs) {
		t.Fatalf("host table holds %d addresses, %d are referenced", len(c.hosts.index), len(refs))
	}
}

func popcount(b uint8) int {
	n := 0
	for ; b != 0; b &= b - 1 {
		n++
	}
	return n
}
