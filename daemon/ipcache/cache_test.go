package ipcache

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
)

// entryOf is the distinct entry each source wants in the order tests.
func entryOf(s Source) Entry {
	return Entry{Identity: 1000 + uint32(s), HostIP: netip.AddrFrom4([4]byte{192, 0, 2, byte(s)})}
}

type event struct {
	src Source
	add bool
}

func (e event) String() string {
	if e.add {
		return "+" + e.src.String()
	}
	return "-" + e.src.String()
}

// interleavings returns every sequence of adding and removing each source
// of srcs once, where a source is added before it is removed.
func interleavings(srcs []Source) [][]event {
	var out [][]event
	var rec func(seq []event, added, removed map[Source]bool)
	rec = func(seq []event, added, removed map[Source]bool) {
		if len(seq) == 2*len(srcs) {
			out = append(out, slices.Clone(seq))
			return
		}
		for _, s := range srcs {
			switch {
			case !added[s]:
				added[s] = true
				rec(append(seq, event{s, true}), added, removed)
				added[s] = false
			case !removed[s]:
				removed[s] = true
				rec(append(seq, event{s, false}), added, removed)
				removed[s] = false
			}
		}
	}
	rec(nil, map[Source]bool{}, map[Source]bool{})
	return out
}

func subsets(n int) [][]Source {
	var out [][]Source
	all := Sources()
	var rec func(start int, cur []Source)
	rec = func(start int, cur []Source) {
		if len(cur) == n {
			out = append(out, slices.Clone(cur))
			return
		}
		for i := start; i < len(all); i++ {
			rec(i+1, append(cur, all[i]))
		}
	}
	rec(0, nil)
	return out
}

// runEvents plays seq on one prefix and checks, after every step, that
// the map holds the highest present source's entry (nothing when none is
// left), that Lookup agrees, and that nothing was written when the entry
// in force did not change.
func runEvents(t *testing.T, seq []event) {
	t.Helper()
	f := newFakeMap()
	c := New(f, nil)
	p := pfx("10.0.0.5/32")
	present := map[Source]bool{}
	want := func() (Entry, Source, bool) {
		for _, s := range Sources() {
			if present[s] {
				return entryOf(s), s, true
			}
		}
		return Entry{}, 0, false
	}
	for i, ev := range seq {
		before, _, hadBefore := want()
		var err error
		if ev.add {
			present[ev.src] = true
			err = c.Upsert(ev.src, p, entryOf(ev.src))
		} else {
			delete(present, ev.src)
			err = c.Delete(ev.src, p)
		}
		if err != nil {
			t.Fatalf("%v step %d: %v", seq, i, err)
		}
		e, src, ok := want()
		got, gotOK := f.get(p)
		if ok != gotOK || got != e {
			t.Fatalf("%v after step %d (%v): map holds %v (%v), want %v (%v) of %s", seq, i, ev, got, gotOK, e, ok, src)
		}
		le, lsrc, lok := c.Lookup(p.Addr())
		if lok != ok || le != e || lsrc != src {
			t.Fatalf("%v after step %d: Lookup = %v %s %v, want %v %s %v", seq, i, le, lsrc, lok, e, src, ok)
		}
		ops := f.takeOps()
		if hadBefore == ok && before == e && len(ops) != 0 {
			t.Fatalf("%v step %d (%v): the entry in force did not change but the map was written: %v", seq, i, ev, ops)
		}
		if (hadBefore != ok || before != e) && len(ops) != 1 {
			t.Fatalf("%v step %d (%v): want one write, got %v", seq, i, ev, ops)
		}
	}
	if f.dump() != "" {
		t.Fatalf("%v: map not empty at the end: %s", seq, f.dump())
	}
	checkInvariants(t, c)
	if st := c.Stats(); st[LocalEndpoint]+st[Host]+st[RemoteEndpoint]+st[RemoteNode]+st[PolicyCIDR] != 0 {
		t.Fatalf("%v: stats not empty at the end: %v", seq, st)
	}
}

// TestOrderTwoAndThreeSources plays every interleaving of adding and
// removing every pair and every triple of the five sources on one prefix.
func TestOrderTwoAndThreeSources(t *testing.T) {
	n := 0
	for _, k := range []int{2, 3} {
		for _, srcs := range subsets(k) {
			for _, seq := range interleavings(srcs) {
				runEvents(t, seq)
				n++
			}
		}
	}
	// 10 pairs × 6 interleavings + 10 triples × 90 interleavings.
	if n != 10*6+10*90 {
		t.Fatalf("played %d sequences, want 960", n)
	}
}

// TestOrderAllSources adds the five sources in every order and removes
// them in every order.
func TestOrderAllSources(t *testing.T) {
	perms := permutations(Sources())
	for _, add := range perms {
		for _, rm := range perms {
			seq := make([]event, 0, 10)
			for _, s := range add {
				seq = append(seq, event{s, true})
			}
			for _, s := range rm {
				seq = append(seq, event{s, false})
			}
			runEvents(t, seq)
		}
	}
}

func permutations(s []Source) [][]Source {
	if len(s) <= 1 {
		return [][]Source{slices.Clone(s)}
	}
	var out [][]Source
	for i := range s {
		rest := append(slices.Clone(s[:i]), s[i+1:]...)
		for _, p := range permutations(rest) {
			out = append(out, append([]Source{s[i]}, p...))
		}
	}
	return out
}

// TestCIDRNamingEndpoint is the collision the cache exists for: a /32
// toCIDR rule naming an endpoint's address must not replace the endpoint's
// identity, and withdrawing the rule must not delete the entry.
func TestCIDRNamingEndpoint(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	ep := Entry{Identity: 0x01000123, HostIP: addr("10.1.1.10")}
	cidr := Entry{Identity: 0x00000101}
	p := pfx("10.250.1.5/32")

	if err := c.Upsert(LocalEndpoint, p, ep); err != nil {
		t.Fatal(err)
	}
	f.takeOps()
	if err := c.Upsert(PolicyCIDR, p, cidr); err != nil {
		t.Fatal(err)
	}
	if got, _ := f.get(p); got != ep {
		t.Fatalf("map holds %v after the CIDR rule, want the endpoint's %v", got, ep)
	}
	if ops := f.takeOps(); len(ops) != 0 {
		t.Fatalf("the CIDR identity was written under the endpoint: %v", ops)
	}
	if err := c.Delete(PolicyCIDR, p); err != nil {
		t.Fatal(err)
	}
	if got, ok := f.get(p); !ok || got != ep {
		t.Fatalf("map holds %v %v after the rule was withdrawn, want the endpoint's %v", got, ok, ep)
	}
	// The rule again, then the endpoint goes: the CIDR identity takes over.
	if err := c.Upsert(PolicyCIDR, p, cidr); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(LocalEndpoint, p); err != nil {
		t.Fatal(err)
	}
	if got, _ := f.get(p); got != cidr {
		t.Fatalf("map holds %v after the endpoint left, want the CIDR identity %v", got, cidr)
	}

	// The same for a host address and a node address: removing the CIDR
	// rule leaves them, rewritten if needed.
	h := pfx("10.1.1.10/32")
	host := Entry{Identity: 1, HostIP: addr("10.1.1.10")}
	node := Entry{Identity: 6, HostIP: addr("10.1.1.11")}
	n := pfx("10.1.1.11/32")
	for _, err := range []error{
		c.Upsert(PolicyCIDR, h, cidr), c.Upsert(Host, h, host),
		c.Upsert(RemoteNode, n, node), c.Upsert(PolicyCIDR, n, cidr),
		c.Delete(PolicyCIDR, h), c.Delete(PolicyCIDR, n),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := f.get(h); got != host {
		t.Fatalf("host address holds %v, want %v", got, host)
	}
	if got, _ := f.get(n); got != node {
		t.Fatalf("node address holds %v, want %v", got, node)
	}
	checkInvariants(t, c)
}

func TestNormalise(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	e := Entry{Identity: 300}
	if err := c.Upsert(PolicyCIDR, pfx("10.0.0.77/24"), e); err != nil {
		t.Fatal(err)
	}
	if err := c.Upsert(RemoteEndpoint, pfx("::ffff:10.9.9.9/128"), Entry{Identity: 0x01000200, HostIP: addr("::ffff:10.1.1.1")}); err != nil {
		t.Fatal(err)
	}
	if err := c.Upsert(PolicyCIDR, pfx("::ffff:10.8.0.0/112"), e); err != nil {
		t.Fatal(err)
	}
	want := "10.0.0.0/24=300/invalid IP 10.8.0.0/16=300/invalid IP 10.9.9.9/32=16777728/10.1.1.1"
	if got := f.dump(); got != want {
		t.Fatalf("map:\n got %s\nwant %s", got, want)
	}
	// Deleting under another spelling of the same prefix.
	for _, p := range []string{"10.0.0.1/24", "10.9.9.9/32", "10.8.1.2/16"} {
		src := PolicyCIDR
		if p == "10.9.9.9/32" {
			src = RemoteEndpoint
		}
		if err := c.Delete(src, pfx(p)); err != nil {
			t.Fatal(err)
		}
	}
	if got := f.dump(); got != "" {
		t.Fatalf("map not empty: %s", got)
	}

	// Bad input changes nothing.
	for name, err := range map[string]error{
		"invalid prefix":   c.Upsert(Host, netip.Prefix{}, Entry{Identity: 1}),
		"mapped /90":       c.Upsert(Host, pfx("::ffff:10.0.0.0/90"), Entry{Identity: 1}),
		"identity 0":       c.Upsert(Host, pfx("10.0.0.1"), Entry{}),
		"unknown source":   c.Upsert(Source(9), pfx("10.0.0.1"), Entry{Identity: 1}),
		"unclaimed source": c.Upsert(Unclaimed, pfx("10.0.0.1"), Entry{Identity: 1}),
		"delete invalid":   c.Delete(Host, netip.Prefix{}),
		"delete unknown":   c.Delete(Source(0), pfx("10.0.0.1")),
		"replace unknown":  c.Replace(Source(6), nil),
	} {
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if got := f.dump(); got != "" {
		t.Fatalf("bad input wrote: %s", got)
	}
	// Deleting what a source does not have writes nothing.
	f.takeOps()
	if err := c.Delete(Host, pfx("10.0.0.1")); err != nil || len(f.takeOps()) != 0 {
		t.Fatalf("delete of nothing: %v", err)
	}
	checkInvariants(t, c)
}

func remoteSet(n int, change func(i int, e Entry) Entry) map[netip.Prefix]Entry {
	set := make(map[netip.Prefix]Entry, n)
	for i := range n {
		ip := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		e := Entry{Identity: 0x01000100 + uint32(i%5000), HostIP: netip.AddrFrom4([4]byte{172, 16, byte(i % 1000 >> 8), byte(i % 1000)})}
		if change != nil {
			e = change(i, e)
		}
		if e.Identity != 0 {
			set[netip.PrefixFrom(ip, 32)] = e
		}
	}
	return set
}

func TestReplaceDiff(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	set := remoteSet(1000, nil)
	if err := c.Replace(RemoteEndpoint, set); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeOps(); len(ops) != 1000 {
		t.Fatalf("first replace wrote %d entries, want 1000", len(ops))
	}
	// The same list again writes nothing.
	if err := c.Replace(RemoteEndpoint, remoteSet(1000, nil)); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeOps(); len(ops) != 0 {
		t.Fatalf("an unchanged list wrote %v", ops)
	}
	// Three changed, two removed, one added.
	next := remoteSet(1000, func(i int, e Entry) Entry {
		switch i {
		case 1, 2:
			e.Identity++
		case 3:
			e.HostIP = addr("172.16.9.9")
		case 10, 11:
			e.Identity = 0 // left out
		}
		return e
	})
	next[pfx("10.99.0.1")] = Entry{Identity: 0x01000999}
	if err := c.Replace(RemoteEndpoint, next); err != nil {
		t.Fatal(err)
	}
	ops := f.takeOps()
	slices.Sort(ops)
	want := []string{
		"delete 10.0.0.10/32", "delete 10.0.0.11/32",
		"upsert 10.0.0.1/32 16777474 172.16.0.1", "upsert 10.0.0.2/32 16777475 172.16.0.2",
		"upsert 10.0.0.3/32 16777475 172.16.9.9", "upsert 10.99.0.1/32 16779673 invalid IP",
	}
	if !slices.Equal(ops, want) {
		t.Fatalf("writes:\n got %q\nwant %q", ops, want)
	}
	if st := c.Stats(); st[RemoteEndpoint] != 999 {
		t.Fatalf("stats %v, want 999 remote entries", st)
	}

	// A higher source over some of the list: the list's changes there
	// write nothing, and its removal there restores the higher source
	// only in memory (it was already in force).
	ep := Entry{Identity: 0x01000001 + 0x100, HostIP: addr("10.1.1.1")}
	if err := c.Upsert(LocalEndpoint, pfx("10.0.0.20"), ep); err != nil {
		t.Fatal(err)
	}
	f.takeOps()
	delete(next, pfx("10.0.0.20"))
	if err := c.Replace(RemoteEndpoint, next); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeOps(); len(ops) != 0 {
		t.Fatalf("removing a shadowed entry wrote %v", ops)
	}
	// A lower source under the list: removing the list's entry writes it.
	cidr := Entry{Identity: 0x00000105}
	if err := c.Upsert(PolicyCIDR, pfx("10.0.0.30"), cidr); err != nil {
		t.Fatal(err)
	}
	delete(next, pfx("10.0.0.30"))
	if err := c.Replace(RemoteEndpoint, next); err != nil {
		t.Fatal(err)
	}
	if got, _ := f.get(pfx("10.0.0.30")); got != cidr {
		t.Fatalf("after the list dropped it, 10.0.0.30 holds %v, want the CIDR identity", got)
	}
	// An empty list removes everything of the source and nothing else.
	if err := c.Replace(RemoteEndpoint, nil); err != nil {
		t.Fatal(err)
	}
	if got := f.dump(); got != "10.0.0.20/32=16777473/10.1.1.1 10.0.0.30/32=261/invalid IP" {
		t.Fatalf("after an empty list the map holds %s", got)
	}
	checkInvariants(t, c)
}

func TestReplaceBadKeys(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	err := c.Replace(PolicyCIDR, map[netip.Prefix]Entry{
		pfx("10.0.0.1/24"):        {Identity: 300},
		pfx("10.0.0.2/24"):        {Identity: 301}, // the same prefix
		pfx("10.1.0.0/16"):        {Identity: 0},   // refused
		{}:                        {Identity: 302}, // invalid
		pfx("10.2.0.9/16"):        {Identity: 303}, // masked
		pfx("::ffff:1.0.0.0/104"): {Identity: 304},
	})
	if err == nil {
		t.Fatal("no error for the bad keys")
	}
	for _, s := range []string{"given twice", "identity 0", "not valid"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
	want := "1.0.0.0/8=304/invalid IP 10.0.0.0/24=300/invalid IP 10.2.0.0/16=303/invalid IP"
	if got := f.dump(); got != want {
		t.Fatalf("map:\n got %s\nwant %s", got, want)
	}
	checkInvariants(t, c)
}

func TestWriteFailureAndRetry(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	p := pfx("10.0.0.1")
	ep := Entry{Identity: 0x01000100, HostIP: addr("10.1.1.1")}

	f.fail[p] = true
	if err := c.Upsert(LocalEndpoint, p, ep); !errors.Is(err, errFake) {
		t.Fatalf("upsert error %v, want the writer's", err)
	}
	if c.Failing() != 1 {
		t.Fatalf("failing = %d, want 1", c.Failing())
	}
	// The wish is kept.
	if e, src, ok := c.Lookup(p.Addr()); !ok || e != ep || src != LocalEndpoint {
		t.Fatalf("lookup after a failed write: %v %s %v", e, src, ok)
	}
	if err := c.Retry(); !errors.Is(err, errFake) || c.Failing() != 1 {
		t.Fatalf("retry while the map still fails: %v, failing %d", err, c.Failing())
	}
	delete(f.fail, p)
	if err := c.Retry(); err != nil || c.Failing() != 0 {
		t.Fatalf("retry: %v, failing %d", err, c.Failing())
	}
	if got, _ := f.get(p); got != ep {
		t.Fatalf("map holds %v after retry, want %v", got, ep)
	}

	// A failed delete is retried as a delete.
	f.fail[p] = true
	if err := c.Delete(LocalEndpoint, p); err == nil {
		t.Fatal("delete did not fail")
	}
	if _, _, ok := c.Lookup(p.Addr()); ok {
		t.Fatal("the withdrawn wish is still in memory")
	}
	delete(f.fail, p)
	if err := c.Retry(); err != nil {
		t.Fatal(err)
	}
	if _, ok := f.get(p); ok || c.Failing() != 0 {
		t.Fatalf("entry still in the map after the retried delete (failing %d)", c.Failing())
	}

	// A failed write shadowed by a lower source's restore: the retry
	// writes what is in force now, not what failed.
	cidr := Entry{Identity: 0x00000100}
	if err := c.Upsert(PolicyCIDR, p, cidr); err != nil {
		t.Fatal(err)
	}
	f.fail[p] = true
	_ = c.Upsert(LocalEndpoint, p, ep) // fails: the map keeps the CIDR entry
	_ = c.Delete(LocalEndpoint, p)     // the CIDR entry is in force again
	delete(f.fail, p)
	if err := c.Retry(); err != nil {
		t.Fatal(err)
	}
	if got, _ := f.get(p); got != cidr {
		t.Fatalf("after retry the map holds %v, want %v", got, cidr)
	}

	// A new wish for a failing prefix is written at once and clears it.
	f.fail[p] = true
	_ = c.Upsert(PolicyCIDR, p, Entry{Identity: 0x00000101})
	delete(f.fail, p)
	if err := c.Upsert(PolicyCIDR, p, Entry{Identity: 0x00000102}); err != nil || c.Failing() != 0 {
		t.Fatalf("upsert over a failing prefix: %v, failing %d", err, c.Failing())
	}

	// A whole list against a full map: every failure is remembered, the
	// error stays short, and one retry converges.
	f.failAll = true
	err := c.Replace(RemoteEndpoint, remoteSet(100, nil))
	if err == nil || !strings.Contains(err.Error(), "and 92 more ipcache errors") {
		t.Fatalf("replace error %v", err)
	}
	if c.Failing() != 100 {
		t.Fatalf("failing = %d, want 100", c.Failing())
	}
	f.failAll = false
	if err := c.Retry(); err != nil || c.Failing() != 0 {
		t.Fatalf("retry: %v, failing %d", err, c.Failing())
	}
	// 10.0.0.1 is in the list too: the remote entry now ranks over the
	// CIDR identity there.
	if got, _ := f.get(p); len(f.m) != 100 || got.Identity != 0x01000101 {
		t.Fatalf("map holds %d entries (10.0.0.1: %v), want 100", len(f.m), got)
	}
	checkInvariants(t, c)
}

func TestAdoptAndPrune(t *testing.T) {
	f := newFakeMap()
	// What the pinned map held when the agent started.
	old := map[netip.Prefix]Entry{
		pfx("10.0.0.1"):       {Identity: 0x01000100, HostIP: addr("10.1.1.1")}, // claimed unchanged
		pfx("10.0.0.2"):       {Identity: 0x01000100, HostIP: addr("10.1.1.1")}, // claimed changed
		pfx("10.0.0.3"):       {Identity: 0x01000100, HostIP: addr("10.1.1.1")}, // gone while the agent was down
		pfx("10.250.1.5"):     {Identity: 0x01000200, HostIP: addr("10.1.1.9")}, // local endpoint, same
		pfx("192.168.0.0/16"): {Identity: 0x00000100},                           // CIDR identity, renumbered
	}
	for p, e := range old {
		f.m[p] = e
	}
	c := New(f, nil)
	c.Adopt(old)
	if st := c.Stats(); st[Unclaimed] != 5 {
		t.Fatalf("stats %v, want 5 unclaimed", st)
	}
	if e, src, ok := c.Lookup(addr("10.0.0.3")); !ok || src != Unclaimed || e != old[pfx("10.0.0.3")] {
		t.Fatalf("lookup of an adopted entry: %v %s %v", e, src, ok)
	}
	if _, src, ok := c.Lookup(addr("192.168.7.7")); !ok || src != Unclaimed {
		t.Fatalf("lookup inside an adopted prefix: %s %v", src, ok)
	}

	if err := c.Upsert(LocalEndpoint, pfx("10.250.1.5"), old[pfx("10.250.1.5")]); err != nil {
		t.Fatal(err)
	}
	if err := c.Replace(RemoteEndpoint, map[netip.Prefix]Entry{
		pfx("10.0.0.1"): {Identity: 0x01000100, HostIP: addr("10.1.1.1")},
		pfx("10.0.0.2"): {Identity: 0x01000101, HostIP: addr("10.1.1.1")},
	}); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeOps(); !slices.Equal(ops, []string{"upsert 10.0.0.2/32 16777473 10.1.1.1"}) {
		t.Fatalf("claiming adopted entries wrote %q, want only the changed one", ops)
	}

	// Not every source has spoken: nothing is pruned.
	n, err := c.Prune()
	if !errors.Is(err, ErrNotReported) || n != 0 {
		t.Fatalf("prune before every source reported: %d, %v", n, err)
	}
	if !strings.Contains(err.Error(), "local-endpoint, host, remote-node, policy-cidr") {
		t.Fatalf("prune error %q does not name the sources it waits for", err)
	}
	if _, ok := f.get(pfx("10.0.0.3")); !ok {
		t.Fatal("an unclaimed entry was deleted before every source reported")
	}
	c.MarkReported(LocalEndpoint)
	// Whole lists report by themselves.
	if err := c.Replace(Host, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Replace(RemoteNode, nil); err != nil {
		t.Fatal(err)
	}
	// The policy sync's first pass, before the store's policies are
	// listed: wishes, but not yet a report.
	if err := c.Upsert(PolicyCIDR, pfx("192.168.0.0/16"), Entry{Identity: 0x00000107}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Prune(); !errors.Is(err, ErrNotReported) {
		t.Fatalf("prune with policy-cidr not reported: %v", err)
	}
	if w := c.Waiting(); !slices.Equal(w, []Source{PolicyCIDR}) {
		t.Fatalf("waiting for %v", w)
	}
	c.MarkReported(PolicyCIDR)
	f.takeOps()
	if n, err := c.Prune(); err != nil || n != 1 {
		t.Fatalf("prune: %d, %v", n, err)
	}
	if ops := f.takeOps(); !slices.Equal(ops, []string{"delete 10.0.0.3/32"}) {
		t.Fatalf("prune wrote %q", ops)
	}
	want := "10.0.0.1/32=16777472/10.1.1.1 10.0.0.2/32=16777473/10.1.1.1 10.250.1.5/32=16777728/10.1.1.9 192.168.0.0/16=263/invalid IP"
	if got := f.dump(); got != want {
		t.Fatalf("map after prune:\n got %s\nwant %s", got, want)
	}
	if st := c.Stats(); st[Unclaimed] != 0 {
		t.Fatalf("stats after prune %v", st)
	}
	// Pruning again is a no-op.
	if n, err := c.Prune(); err != nil || n != 0 {
		t.Fatalf("second prune: %d, %v", n, err)
	}
	checkInvariants(t, c)
}

func TestAdoptAfterSources(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	ep := Entry{Identity: 0x01000100, HostIP: addr("10.1.1.1")}
	if err := c.Upsert(LocalEndpoint, pfx("10.0.0.1"), ep); err != nil {
		t.Fatal(err)
	}
	f.takeOps()
	// The map (read late) still held an older entry for the prefix.
	c.Adopt(map[netip.Prefix]Entry{pfx("10.0.0.1"): {Identity: 0x01000999}, pfx("10.0.0.2"): {Identity: 7}})
	if ops := f.takeOps(); !slices.Equal(ops, []string{"upsert 10.0.0.1/32 16777472 10.1.1.1"}) {
		t.Fatalf("adopt wrote %q", ops)
	}
	if st := c.Stats(); st[Unclaimed] != 1 || st[LocalEndpoint] != 1 {
		t.Fatalf("stats %v", st)
	}
}

func TestLookupLongestPrefix(t *testing.T) {
	c := New(newFakeMap(), nil)
	for _, x := range []struct {
		src Source
		p   string
		id  uint32
	}{
		{PolicyCIDR, "10.0.0.0/8", 300}, {PolicyCIDR, "10.1.0.0/16", 301},
		{RemoteEndpoint, "10.1.2.3", 0x01000100}, {PolicyCIDR, "2001:db8::/32", 302},
		{LocalEndpoint, "2001:db8::5", 0x01000101}, {PolicyCIDR, "0.0.0.0/0", 303},
	} {
		if err := c.Upsert(x.src, pfx(x.p), Entry{Identity: x.id}); err != nil {
			t.Fatal(err)
		}
	}
	for ip, want := range map[string]uint32{
		"10.1.2.3": 0x01000100, "10.1.9.9": 301, "::ffff:10.1.9.9": 301, "10.2.0.1": 300,
		"11.0.0.1": 303, "2001:db8::5": 0x01000101, "2001:db8::6": 302, "2001:db9::1": 0,
	} {
		e, _, ok := c.Lookup(addr(ip))
		if ok != (want != 0) || e.Identity != want {
			t.Errorf("Lookup(%s) = %d %v, want %d", ip, e.Identity, ok, want)
		}
	}
	if _, _, ok := c.Lookup(netip.Addr{}); ok {
		t.Error("lookup of the zero address found something")
	}
}

func TestStatsAndHostInterning(t *testing.T) {
	c := New(newFakeMap(), nil)
	set := remoteSet(5000, nil)
	if err := c.Replace(RemoteEndpoint, set); err != nil {
		t.Fatal(err)
	}
	nodes := map[netip.Prefix]Entry{}
	for i := range 1000 {
		ip := netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})
		nodes[netip.PrefixFrom(ip, 32)] = Entry{Identity: 6, HostIP: ip}
	}
	if err := c.Replace(RemoteNode, nodes); err != nil {
		t.Fatal(err)
	}
	if got := len(c.hosts.index); got != 1000 {
		t.Fatalf("%d host IPs interned, want 1000", got)
	}
	want := map[Source]int{LocalEndpoint: 0, Host: 0, RemoteEndpoint: 5000, RemoteNode: 1000, PolicyCIDR: 0, Unclaimed: 0}
	if got := c.Stats(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("stats %v, want %v", got, want)
	}
	checkInvariants(t, c)
	if err := c.Replace(RemoteEndpoint, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Replace(RemoteNode, nil); err != nil {
		t.Fatal(err)
	}
	if len(c.hosts.index) != 0 || len(c.slots) != 0 || len(c.multi) != 0 {
		t.Fatalf("left behind: %d hosts, %d slots, %d multi", len(c.hosts.index), len(c.slots), len(c.multi))
	}
	checkInvariants(t, c)
}

func TestForWriter(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	var w Writer = c.For(LocalEndpoint)
	if err := w.UpsertIPCache(pfx("10.0.0.1"), 0x01000100, addr("10.1.1.1")); err != nil {
		t.Fatal(err)
	}
	if err := c.Upsert(PolicyCIDR, pfx("10.0.0.1"), Entry{Identity: 300}); err != nil {
		t.Fatal(err)
	}
	if err := w.DeleteIPCache(pfx("10.0.0.1")); err != nil {
		t.Fatal(err)
	}
	if got, _ := f.get(pfx("10.0.0.1")); got.Identity != 300 {
		t.Fatalf("map holds %v", got)
	}
	if err := w.UpsertIPCache(pfx("10.0.0.1"), 0, netip.Addr{}); err == nil {
		t.Fatal("identity 0 accepted")
	}
}

// TestConcurrent runs every source on overlapping prefixes at once; the
// map must end as the sources left it.
func TestConcurrent(t *testing.T) {
	f := newFakeMap()
	c := New(f, nil)
	var wg sync.WaitGroup
	for _, src := range Sources() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 50 {
				for i := range 64 {
					p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 32)
					if (i+round)%2 == 0 {
						_ = c.Upsert(src, p, entryOf(src))
					} else {
						_ = c.Delete(src, p)
					}
				}
				_ = c.Replace(src, nil)
				_, _, _ = c.Lookup(addr("10.0.0.1"))
			}
			// Every source ends wanting the even addresses.
			for i := 0; i < 64; i += 2 {
				_ = c.Upsert(src, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 32), entryOf(src))
			}
		}()
	}
	wg.Wait()
	if len(f.m) != 32 {
		t.Fatalf("map holds %d entries, want 32", len(f.m))
	}
	for p, e := range f.m {
		if e != entryOf(LocalEndpoint) {
			t.Fatalf("%s holds %v, want the local endpoint's", p, e)
		}
	}
	checkInvariants(t, c)
}
