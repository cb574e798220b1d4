package ipcache

import (
	"errors"
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
