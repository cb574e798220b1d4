package ipcache

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// quietMap is a fakeMap that is also a QuietWriter: its loud writes and
// its settles are recorded among the ops ("bump", "settle").
type quietMap struct {
	*fakeMap
	settleErr error
}

func (q *quietMap) bump(op string) {
	q.mu.Lock()
	q.ops = append(q.ops, op)
	q.mu.Unlock()
}

func (q *quietMap) UpsertIPCache(p netip.Prefix, id uint32, host netip.Addr) error {
	if err := q.fakeMap.UpsertIPCache(p, id, host); err != nil {
		return err
	}
	q.bump("bump")
	return nil
}

func (q *quietMap) DeleteIPCache(p netip.Prefix) error {
	if err := q.fakeMap.DeleteIPCache(p); err != nil {
		return err
	}
	q.bump("bump")
	return nil
}

func (q *quietMap) UpsertIPCacheQuiet(p netip.Prefix, id uint32, host netip.Addr) error {
	return q.fakeMap.UpsertIPCache(p, id, host)
}

func (q *quietMap) DeleteIPCacheQuiet(p netip.Prefix) error { return q.fakeMap.DeleteIPCache(p) }

func (q *quietMap) Settle() error {
	if q.settleErr != nil {
		return q.settleErr
	}
	q.bump("settle")
	return nil
}

// count returns how many ops are op, and whether the last op is last.
func count(ops []string, op string) int {
	n := 0
	for _, o := range ops {
		if o == op {
			n++
		}
	}
	return n
}

// TestBulkWritesSettleOnce: a bulk operation writes its entries without
// making each take effect for established flows, and settles once, after
// the last write (a 30,000-entry list cost three syscalls per entry);
// single writes still take effect one by one; a failed settle is retried.
func TestBulkWritesSettleOnce(t *testing.T) {
	q := &quietMap{fakeMap: newFakeMap()}
	c := New(q, nil)
	set := map[netip.Prefix]Entry{}
	for i := range 1000 {
		set[netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)}), 32)] = Entry{Identity: 70000 + uint32(i)}
	}
	if err := c.Replace(RemoteEndpoint, set); err != nil {
		t.Fatal(err)
	}
	ops := q.takeOps()
	if count(ops, "bump") != 0 || count(ops, "settle") != 1 || ops[len(ops)-1] != "settle" || len(ops) != 1001 {
		t.Fatalf("Replace of 1,000 entries: %d ops, %d bumps, %d settles, last %q; want 1,000 quiet writes then one settle",
			len(ops), count(ops, "bump"), count(ops, "settle"), ops[len(ops)-1])
	}
	if err := c.Replace(RemoteEndpoint, set); err != nil {
		t.Fatal(err)
	}
	if ops := q.takeOps(); len(ops) != 0 {
		t.Fatalf("Replace of an unchanged set wrote %v", ops)
	}

	// Apply: deletions and upserts, one settle.
	var del []netip.Prefix
	up := map[netip.Prefix]Entry{}
	for p := range set {
		if len(del) < 2 {
			del = append(del, p)
		} else if len(up) < 5 {
			up[p] = Entry{Identity: 1 << 20}
		}
	}
	up[netip.MustParsePrefix("10.8.0.1/32")] = Entry{Identity: 0} // refused
	err := c.Apply(RemoteEndpoint, up, del)
	if err == nil || !strings.Contains(err.Error(), "identity 0") {
		t.Fatalf("Apply with an identity-0 entry: err %v, want it refused", err)
	}
	ops = q.takeOps()
	if len(ops) != 8 || count(ops, "settle") != 1 || ops[len(ops)-1] != "settle" || !strings.HasPrefix(ops[0], "delete") {
		t.Fatalf("Apply of 2 deletions and 5 upserts: %v; want the deletions, the upserts, one settle", ops)
	}
	for _, p := range del {
		if _, ok := q.get(p); ok {
			t.Errorf("%s not deleted by Apply", p)
		}
	}

	// A single write takes effect by itself.
	if err := c.Upsert(RemoteEndpoint, netip.MustParsePrefix("10.8.0.2/32"), Entry{Identity: 70001}); err != nil {
		t.Fatal(err)
	}
	if ops := q.takeOps(); !slices.Equal(ops, []string{"upsert 10.8.0.2/32 70001 invalid IP", "bump"}) {
		t.Fatalf("Upsert: %v, want one loud write", ops)
	}

	// A settle that fails is said, and retried by Retry.
	q.settleErr = errors.New("rev map write failed")
	err = c.Apply(RemoteEndpoint, map[netip.Prefix]Entry{netip.MustParsePrefix("10.8.0.3/32"): {Identity: 70002}}, nil)
	if err == nil || !strings.Contains(err.Error(), "established flows") {
		t.Fatalf("Apply with a failing settle: err %v, want it said", err)
	}
	q.takeOps()
	q.settleErr = nil
	if err := c.Retry(); err != nil {
		t.Fatal(err)
	}
	if ops := q.takeOps(); !slices.Equal(ops, []string{"settle"}) {
		t.Fatalf("Retry after a failed settle: %v, want one settle", ops)
	}

	// Nothing written, nothing settled.
	q.failAll = true
	if err := c.Replace(RemoteEndpoint, map[netip.Prefix]Entry{netip.MustParsePrefix("10.8.0.4/32"): {Identity: 70003}}); err == nil {
		t.Fatal("Replace with every write failing: no error")
	}
	if ops := q.takeOps(); count(ops, "settle") != 0 {
		t.Fatalf("settled with no write done: %v", ops)
	}
	q.failAll = false
	if err := c.Retry(); err != nil {
		t.Fatal(err)
	}
	ops = q.takeOps()
	if len(ops) == 0 || ops[len(ops)-1] != "settle" || count(ops, "bump") != 0 {
		t.Fatalf("Retry: %v; want quiet writes and one settle", ops)
	}
}

// batchMap is a quietMap that is also a BatchWriter: a batch is one op
// ("batch N"); it stops at the first prefix whose write fails.
type batchMap struct {
	*quietMap
}

func (b *batchMap) UpsertIPCacheBatchQuiet(hosts []netip.Addr, ids []uint32, hostIPs []netip.Addr) (int, error) {
	b.bump(fmt.Sprintf("batch %d", len(hosts)))
	for i, a := range hosts {
		p := netip.PrefixFrom(a, a.BitLen())
		if err := b.fakeMap.UpsertIPCache(p, ids[i], hostIPs[i]); err != nil {
			return i, err
		}
	}
	return len(hosts), nil
}

// TestBulkWritesBatch: with a BatchWriter, a bulk operation writes its
// host entries in batches of batchSize (one syscall each, where a write
// was a syscall per entry) and the rest one by one, every write of a
// prefix in the order its wishes changed (a deletion goes after the
// queued upserts); what a failed batch did not write is written one by
// one, so that only the prefix that fails is failing, and retried.
func TestBulkWritesBatch(t *testing.T) {
	b := &batchMap{&quietMap{fakeMap: newFakeMap()}}
	c := New(b, nil)
	set := map[netip.Prefix]Entry{netip.MustParsePrefix("10.9.0.0/16"): {Identity: 69999}}
	for i := range 3000 {
		set[netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)}), 32)] = Entry{Identity: 70000 + uint32(i)}
	}
	if err := c.Replace(RemoteEndpoint, set); err != nil {
		t.Fatal(err)
	}
	ops := b.takeOps()
	var batched, single int
	for _, o := range ops {
		var n int
		if _, err := fmt.Sscanf(o, "batch %d", &n); err == nil {
			batched += n
		} else if strings.HasPrefix(o, "upsert ") {
			single++
		}
	}
	// Each batch op is followed by its entries' fake upserts.
	if count(ops, "settle") != 1 || ops[len(ops)-1] != "settle" || batched != 3000 || single != 3001 {
		t.Fatalf("Replace of 3,000 hosts and a /16: %d batched, %d writes, %d settles; want 3,000 in batches, the /16 alone, one settle", batched, single-batched, count(ops, "settle"))
	}
	for p, e := range set {
		if got, ok := b.get(p); !ok || got != e {
			t.Fatalf("%s = %+v, %v after Replace; want %+v", p, got, ok, e)
		}
	}

	// A deletion and an upsert of the same prefix in one Apply reach the
	// map in that order.
	p := netip.MustParsePrefix("10.9.0.7/32")
	up := map[netip.Prefix]Entry{p: {Identity: 1 << 20}, netip.MustParsePrefix("10.9.0.8/32"): {Identity: 1 << 20}}
	if err := c.Apply(RemoteEndpoint, up, []netip.Prefix{p}); err != nil {
		t.Fatal(err)
	}
	if got, ok := b.get(p); !ok || got.Identity != 1<<20 {
		t.Fatalf("%s after a deletion and an upsert = %+v, %v", p, got, ok)
	}
	b.takeOps()

	// A batch that fails part way: the rest is written one by one, and
	// only the prefix that fails is failing.
	bad := netip.MustParsePrefix("10.7.0.5/32")
	b.mu.Lock()
	b.fail[bad] = true
	b.mu.Unlock()
	more := map[netip.Prefix]Entry{}
	for p, e := range set {
		more[p] = e
	}
	for i := range 10 {
		more[netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 7, 0, byte(i)}), 32)] = Entry{Identity: 80000}
	}
	if err := c.Replace(RemoteEndpoint, more); err == nil || !strings.Contains(err.Error(), "10.7.0.5") {
		t.Fatalf("Replace with a failing prefix: err %v, want it named", err)
	}
	if c.Failing() != 1 {
		t.Fatalf("%d prefixes failing after a batch that stopped at one; want 1", c.Failing())
	}
	for i := range 10 {
		q := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 7, 0, byte(i)}), 32)
		if _, ok := b.get(q); ok != (q != bad) {
			t.Fatalf("%s written %v after the failed batch", q, ok)
		}
	}
	b.mu.Lock()
	delete(b.fail, bad)
	b.mu.Unlock()
	if err := c.Retry(); err != nil || c.Failing() != 0 {
		t.Fatalf("Retry: %v, %d failing", err, c.Failing())
	}
	if _, ok := b.get(bad); !ok {
		t.Fatalf("%s not written by Retry", bad)
	}
}
