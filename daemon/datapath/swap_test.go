package datapath

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/internal/testenv"
)

// inForce returns the id of the map rw_policy_maps holds for the endpoint,
// of the map its pin names and the one PolicyMapID reports, and fails
// unless they are the same map and no temporary pin is left.
func inForce(t *testing.T, d *Datapath, id uint16) ebpf.MapID {
	t.Helper()
	var outer uint32 // a hash of maps reads back the inner map's id
	if err := d.maps["rw_policy_maps"].Lookup(uint32(id), &outer); err != nil {
		t.Fatalf("look up endpoint %d in rw_policy_maps: %v", id, err)
	}
	pm, err := ebpf.LoadPinnedMap(filepath.Join(d.PinDir(), policyMapName(id)), nil)
	if err != nil {
		t.Fatalf("load pinned %s: %v", policyMapName(id), err)
	}
	defer pm.Close()
	info, err := pm.Info()
	if err != nil {
		t.Fatal(err)
	}
	pinned, _ := info.ID()
	api, err := d.PolicyMapID(id)
	if err != nil {
		t.Fatalf("PolicyMapID(%d) = %v", id, err)
	}
	if ebpf.MapID(outer) != pinned || api != pinned {
		t.Fatalf("endpoint %d: rw_policy_maps holds map %d, the pin names %d, PolicyMapID says %d; want one map",
			id, outer, pinned, api)
	}
	if _, err := os.Stat(d.policyTempPin(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary pin %s: %v, want none", d.policyTempPin(id), err)
	}
	return pinned
}

// probeAll runs each packet (in: through rw_to_endpoint, out: through
// rw_from_endpoint) on a clean CT and checks the verdict.
type probeCase struct {
	p    pkt
	out  bool
	pass bool
}

func probeAll(t *testing.T, d *Datapath, when string, cases ...probeCase) {
	t.Helper()
	for _, c := range cases {
		flushCT(t, d)
		prog, want := d.to, uint32(dropRet)
		if c.out {
			prog = d.from
		}
		if c.pass {
			want = passRet
		}
		if got := run(t, prog, c.p); got != want {
			t.Errorf("%s: %+v (out %v) = %#x, want %#x", when, c.p, c.out, got, want)
		}
	}
}

// TestNewPolicyMapClosed: a new endpoint's map holds only the meta entries
// and drops everything in both directions until SetPolicy opens it.
func TestNewPolicyMapClosed(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	if got, err := d.Policy(epID); err != nil || len(got) != 0 {
		t.Fatalf("Policy() of a new endpoint = %+v, %v; want no entries", got, err)
	}
	d.mu.Lock()
	keys, vals, err := dumpPolicyMap(d.policy[epID])
	d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || !isMeta(keys[0]) || !isMeta(keys[1]) || vals[0] != (policyValue{}) || vals[1] != (policyValue{}) {
		t.Errorf("new map holds %v: %v, want only the two meta entries, zero", keys, vals)
	}
	probes := func(pass bool) []probeCase {
		return []probeCase{
			{p: in(peerV4, protoTCP, 80), pass: pass},
			{p: in(unknown4, protoUDP, 53), pass: pass},
			{p: in(peerV6, protoICMPv6, 128), pass: pass},
			{p: out(peerV4, protoTCP, 80), out: true, pass: pass},
			{p: out(netV6, protoUDP, 53), out: true, pass: pass},
		}
	}
	probeAll(t, d, "new endpoint", probes(false)...)
	inForce(t, d, epID)
	if err := d.SetPolicy(epID, OpenEntries()); err != nil {
		t.Fatal(err)
	}
	probeAll(t, d, "after SetPolicy(OpenEntries())", probes(true)...)
	inForce(t, d, epID)
	// No entries for a direction closes it again.
	if err := d.SetPolicy(epID, []Entry{{Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	probeAll(t, d, "egress only", probeCase{p: in(peerV4, protoTCP, 80)}, probeCase{p: out(peerV4, protoTCP, 80), out: true, pass: true})
}

// TestPolicyTooLarge: a policy that does not fit is refused with
// ErrPolicyTooLarge and the map in force stays, unchanged.
func TestPolicyTooLarge(t *testing.T) {
	testenv.RequireRoot(t)
	const size = 64
	d := openTest(t, Options{PolicyMaxEntries: size})
	setupEndpoint(t, d, false)
	small := []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80}, {Direction: Egress}}
	if err := d.SetPolicy(epID, small); err != nil {
		t.Fatal(err)
	}
	before := inForce(t, d, epID)
	policy := func(n int) []Entry {
		var out []Entry
		for i := range n {
			out = append(out, Entry{Identity: uint32(10000 + i), Direction: Ingress, Proto: protoTCP, Port: 443})
		}
		return out
	}
	for _, big := range [][]Entry{
		policy(size - 1),
		// 61 keys, and a range of 16 more.
		append(policy(size-3), Entry{Direction: Ingress, Proto: protoUDP, Port: 1, EndPort: 65535}),
	} {
		err := d.SetPolicy(epID, big)
		if !errors.Is(err, ErrPolicyTooLarge) {
			t.Fatalf("SetPolicy(%d entries) into a map of %d = %v, want ErrPolicyTooLarge", len(big), size, err)
		}
		if after := inForce(t, d, epID); after != before {
			t.Errorf("map in force %d after a refused policy, want %d", after, before)
		}
		got, err := d.Policy(epID)
		if err != nil || len(got) != 2 {
			t.Errorf("Policy() after a refused policy = %+v, %v; want the 2 old entries", got, err)
		}
		probeAll(t, d, "refused policy",
			probeCase{p: in(peerV4, protoTCP, 80), pass: true},
			probeCase{p: in(peerV4, protoTCP, 81)},
			probeCase{p: out(netV4, protoUDP, 9), out: true, pass: true})
	}
	// Exactly full (62 keys and the two meta entries) fits.
	if err := d.SetPolicy(epID, policy(size-2)); err != nil {
		t.Fatalf("SetPolicy(%d entries) into a map of %d = %v, want it to fit", size-2, size, err)
	}
	probeAll(t, d, "full map", probeCase{p: in(peerV4, protoTCP, 80)}, probeCase{p: out(netV4, protoUDP, 9), out: true})
}

// TestPolicySwapNeedsNoRoomForBoth: a policy that fills the map can be
// replaced by another, disjoint one of the same size. (Written before the
// swap: the add-then-delete update needed room for both and failed.)
func TestPolicySwapNeedsNoRoomForBoth(t *testing.T) {
	testenv.RequireRoot(t)
	const size, n = 64, 60
	d := openTest(t, Options{PolicyMaxEntries: size})
	setupEndpoint(t, d, false)
	mk := func(port uint16, base uint32) []Entry {
		out := []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: port}}
		for i := range n - 1 {
			out = append(out, Entry{Identity: base + uint32(i), Direction: Ingress, Proto: protoTCP, Port: port})
		}
		return out
	}
	a, b := mk(80, 100000), mk(443, 200000)
	for i, c := range []struct {
		policy     []Entry
		pass, drop uint16
	}{{a, 80, 443}, {b, 443, 80}, {a, 80, 443}} {
		if err := d.SetPolicy(epID, c.policy); err != nil {
			t.Fatalf("step %d: SetPolicy(%d entries) into a map of %d = %v", i, len(c.policy), size, err)
		}
		probeAll(t, d, "swap", probeCase{p: in(peerV4, protoTCP, c.pass), pass: true}, probeCase{p: in(peerV4, protoTCP, c.drop)})
		got, err := d.Policy(epID)
		if err != nil || len(got) != n {
			t.Errorf("step %d: Policy() has %d entries (%v), want %d", i, len(got), err, n)
		}
		inForce(t, d, epID)
	}
}

// TestAllowAllSurvivesSwap: an emergency open stays through policy
// changes until it is reverted.
func TestAllowAllSurvivesSwap(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	deny := Entry{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 22, Deny: true}
	dns := Entry{Identity: peerID, Direction: Egress, Proto: protoUDP, Port: 53}
	if err := d.SetPolicy(epID, []Entry{deny}); err != nil {
		t.Fatal(err)
	}
	if err := d.AllowAll(epID, false); err != nil {
		t.Fatal(err)
	}
	open := []probeCase{
		{p: in(peerV4, protoTCP, 22), pass: true},
		{p: in(unknown4, protoUDP, 5), pass: true},
		{p: out(netV4, protoTCP, 80), out: true, pass: true},
	}
	probeAll(t, d, "allow-all", open...)
	before := inForce(t, d, epID)
	// The same policy again: nothing to do, the emergency entries stay.
	if err := d.SetPolicy(epID, []Entry{deny}); err != nil {
		t.Fatal(err)
	}
	if id := inForce(t, d, epID); id != before {
		t.Errorf("unchanged policy replaced map %d by %d", before, id)
	}
	// Another policy: a new map, still open.
	if err := d.SetPolicy(epID, []Entry{deny, dns}); err != nil {
		t.Fatal(err)
	}
	if id := inForce(t, d, epID); id == before {
		t.Fatalf("changed policy kept map %d, want a new one", id)
	}
	probeAll(t, d, "allow-all after a policy change", open...)
	entries, _ := d.Policy(epID)
	emergency := 0
	for _, e := range entries {
		if e.Emergency {
			emergency++
		}
	}
	if len(entries) != 4 || emergency != 2 {
		t.Errorf("Policy() = %+v, want the deny, the DNS entry and the two emergency entries", entries)
	}
	if err := d.AllowAll(epID, true); err != nil {
		t.Fatal(err)
	}
	probeAll(t, d, "allow-all reverted",
		probeCase{p: in(peerV4, protoTCP, 22)},
		probeCase{p: in(unknown4, protoUDP, 5)},
		probeCase{p: out(netV4, protoTCP, 80), out: true},
		probeCase{p: out(peerV4, protoUDP, 53), out: true, pass: true})
	entries, _ = d.Policy(epID)
	if len(entries) != 2 {
		t.Errorf("Policy() after revert = %+v, want the deny and the DNS entry", entries)
	}

	// A policy that itself allows everything in while open: the revert
	// keeps what the policy wants.
	if err := d.AllowAll(epID, false); err != nil {
		t.Fatal(err)
	}
	if err := d.SetPolicy(epID, []Entry{{Direction: Ingress}, deny}); err != nil {
		t.Fatal(err)
	}
	if err := d.AllowAll(epID, true); err != nil {
		t.Fatal(err)
	}
	probeAll(t, d, "policy-wide ingress after revert",
		probeCase{p: in(unknown4, protoUDP, 5), pass: true},
		probeCase{p: in(peerV4, protoTCP, 22)},
		probeCase{p: out(netV4, protoTCP, 80), out: true})
}

// TestPolicyPinNamesMapInForce: after every swap the pin, rw_policy_maps
// and PolicyMapID agree, and an operator's write through the pin is
// enforced (until the next policy update replaces it).
func TestPolicyPinNamesMapInForce(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	ids := []ebpf.MapID{inForce(t, d, epID)}
	policies := [][]Entry{
		{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80}},
		{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 81}, {Direction: Egress}},
		{{Identity: netID, Direction: Ingress}},
	}
	for _, p := range policies {
		if err := d.SetPolicy(epID, p); err != nil {
			t.Fatal(err)
		}
		id := inForce(t, d, epID)
		if slices.Contains(ids, id) {
			t.Errorf("map id %d after a policy change was used before (%v)", id, ids)
		}
		ids = append(ids, id)
	}
	pm, err := ebpf.LoadPinnedMap(filepath.Join(d.PinDir(), policyMapName(epID)), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	if err := pm.Update(policyKey{}, policyValue{}, ebpf.UpdateNoExist); err != nil {
		t.Fatal(err)
	}
	probeAll(t, d, "operator's all-zero key", probeCase{p: in(unknown4, protoTCP, 8080), pass: true})
	if err := d.SetPolicy(epID, policies[2]); err != nil {
		t.Fatal(err)
	}
	inForce(t, d, epID)
	probeAll(t, d, "next policy update",
		probeCase{p: in(unknown4, protoTCP, 8080)},
		probeCase{p: in(netV4, protoTCP, 8080), pass: true})
}

// TestUnchangedPolicyKeepsMap: a SetPolicy with what the map holds, also
// after a restart, keeps the map (same id) and its counters.
func TestUnchangedPolicyKeepsMap(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testPinDir(t)
	d1 := openTest(t, Options{PinDir: dir})
	setupEndpoint(t, d1, false)
	policy := []Entry{
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80, EndPort: 90},
		{Direction: Egress},
		{Identity: netID, Direction: Ingress, Proto: protoUDP, Port: 53, Deny: true},
	}
	if err := d1.SetPolicy(epID, policy); err != nil {
		t.Fatal(err)
	}
	id := inForce(t, d1, epID)
	probeAll(t, d1, "policy", probeCase{p: in(peerV4, protoTCP, 85), pass: true})
	counted := func(d *Datapath) uint64 {
		t.Helper()
		entries, err := d.Policy(epID)
		if err != nil {
			t.Fatal(err)
		}
		var n uint64
		for _, e := range entries {
			n += e.Packets
		}
		return n
	}
	reversed := slices.Clone(policy)
	slices.Reverse(reversed)
	if err := d1.SetPolicy(epID, reversed); err != nil {
		t.Fatal(err)
	}
	if got := inForce(t, d1, epID); got != id {
		t.Errorf("same policy: map %d, want %d kept", got, id)
	}
	if n := counted(d1); n != 1 {
		t.Errorf("counters after the same policy: %d packets, want 1", n)
	}
	d1.Close()

	d2 := openTest(t, Options{PinDir: dir})
	setupEndpoint(t, d2, false) // re-adopts
	if got := inForce(t, d2, epID); got != id {
		t.Errorf("after restart: map %d, want %d", got, id)
	}
	if err := d2.SetPolicy(epID, policy); err != nil {
		t.Fatal(err)
	}
	if got := inForce(t, d2, epID); got != id {
		t.Errorf("same policy after restart: map %d, want %d kept", got, id)
	}
	if n := counted(d2); n != 1 {
		t.Errorf("counters after restart: %d packets, want 1", n)
	}
	// A real change swaps and carries the counter of the entry that stays.
	if err := d2.SetPolicy(epID, policy[:2]); err != nil {
		t.Fatal(err)
	}
	if got := inForce(t, d2, epID); got == id {
		t.Errorf("changed policy kept map %d", got)
	}
	if n := counted(d2); n != 1 {
		t.Errorf("counters after a swap: %d packets, want 1 (carried)", n)
	}
}

// TestPolicySwapFailureLeavesOld: a swap that fails half way (here: the
// temporary pin cannot be created) leaves the old map in force and pinned,
// and nothing of the new one behind.
func TestPolicySwapFailureLeavesOld(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	a := []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80}}
	b := []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 443}}
	if err := d.SetPolicy(epID, a); err != nil {
		t.Fatal(err)
	}
	before := inForce(t, d, epID)
	tmp := d.policyTempPin(epID)
	if err := os.MkdirAll(filepath.Join(tmp, "busy"), 0o700); err != nil {
		t.Fatal(err)
	}
	err := d.SetPolicy(epID, b)
	if err == nil || errors.Is(err, ErrPolicyTooLarge) {
		t.Fatalf("SetPolicy with the temporary pin blocked = %v, want a kernel/file system error", err)
	}
	t.Logf("SetPolicy: %v", err)
	if err := os.RemoveAll(tmp); err != nil {
		t.Fatal(err)
	}
	if got := inForce(t, d, epID); got != before {
		t.Errorf("map in force %d after a failed swap, want %d", got, before)
	}
	probeAll(t, d, "failed swap", probeCase{p: in(peerV4, protoTCP, 80), pass: true}, probeCase{p: in(peerV4, protoTCP, 443)})
	if err := d.SetPolicy(epID, b); err != nil {
		t.Fatal(err)
	}
	probeAll(t, d, "retried swap", probeCase{p: in(peerV4, protoTCP, 80)}, probeCase{p: in(peerV4, protoTCP, 443), pass: true})
	inForce(t, d, epID)
}

// TestRestartAfterInterruptedSwap: the agent died after renaming a new map
// over the pin but before registering it. The old map enforces until the
// endpoint is re-adopted; then the pinned, newest one does. A leftover
// temporary pin is removed.
func TestRestartAfterInterruptedSwap(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testPinDir(t)
	d1 := openTest(t, Options{PinDir: dir})
	setupEndpoint(t, d1, false)
	if err := d1.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80}}); err != nil {
		t.Fatal(err)
	}
	old := inForce(t, d1, epID)
	d1.Close()

	// What SetPolicy does up to the rename, by hand.
	want, err := policyKeys([]Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 443}})
	if err != nil {
		t.Fatal(err)
	}
	spec := d1.inner.Copy()
	spec.Pinning = ebpf.PinNone
	nm, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer nm.Close()
	next, _ := nextPolicy(want, nil, nil)
	if err := writePolicyMap(nm, next); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, policyMapName(epID))
	if err := pinAs(nm, d1.policyTempPin(epID)); err != nil {
		t.Fatal(err)
	}
	if err := unix.Rename(d1.policyTempPin(epID), path); err != nil {
		t.Fatal(err)
	}
	// And a stale temporary pin of another, never finished attempt.
	if err := pinAs(nm, d1.policyTempPin(epID)); err != nil {
		t.Fatal(err)
	}
	info, _ := nm.Info()
	newID, _ := info.ID()

	d2 := openTest(t, Options{PinDir: dir})
	var outer uint32
	if err := d2.maps["rw_policy_maps"].Lookup(uint32(epID), &outer); err != nil || ebpf.MapID(outer) != old {
		t.Fatalf("rw_policy_maps before re-adoption holds %d (%v), want the old map %d", outer, err, old)
	}
	probeAll(t, d2, "before re-adoption", probeCase{p: in(peerV4, protoTCP, 80), pass: true}, probeCase{p: in(peerV4, protoTCP, 443)})
	setupEndpoint(t, d2, false)
	if got := inForce(t, d2, epID); got != newID {
		t.Errorf("map in force after re-adoption %d, want the pinned %d", got, newID)
	}
	probeAll(t, d2, "after re-adoption", probeCase{p: in(peerV4, protoTCP, 80)}, probeCase{p: in(peerV4, protoTCP, 443), pass: true})
}

// TestPolicySwapNeverWider swaps between two overlapping policies while
// packets run: what both allow always passes, what neither allows never.
func TestPolicySwapNeverWider(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	a := []Entry{
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80},
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 81},
	}
	b := []Entry{
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 81},
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 82, Deny: true},
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 1000, EndPort: 1999},
	}
	if err := d.SetPolicy(epID, a); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var (
		wg    sync.WaitGroup
		swaps int
		serr  error
	)
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			p := a
			if i%2 == 0 {
				p = b
			}
			if err := d.SetPolicy(epID, p); err != nil {
				serr = err
				return
			}
			swaps++
		}
	})
	both, neither := in(peerV4, protoTCP, 81), in(peerV4, protoTCP, 83)
	for i := range 3000 {
		if i%500 == 0 {
			flushCT(t, d)
		}
		both.sport = uint16(20000 + i)
		if got := run(t, d.to, both); got != passRet {
			t.Errorf("packet %d allowed by both policies = %#x, want pass", i, got)
			break
		}
		if got := run(t, d.to, neither); got != dropRet {
			t.Errorf("packet %d allowed by neither policy = %#x, want drop", i, got)
			break
		}
	}
	close(stop)
	wg.Wait()
	if serr != nil {
		t.Fatal(serr)
	}
	t.Logf("%d swaps while 3000 packet pairs ran", swaps)
	if swaps < 2 {
		t.Errorf("only %d swaps ran", swaps)
	}
	inForce(t, d, epID)
}

// TestBpffsRename: bpffs replaces a pin with rename(2), which the swap
// relies on.
func TestBpffsRename(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	spec := d.inner.Copy()
	spec.Pinning = ebpf.PinNone
	var ids []ebpf.MapID
	for _, name := range []string{"x", "y"} {
		m, err := ebpf.NewMap(spec)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if err := pinAs(m, filepath.Join(d.PinDir(), name)); err != nil {
			t.Fatal(err)
		}
		info, _ := m.Info()
		id, _ := info.ID()
		ids = append(ids, id)
	}
	if err := unix.Rename(filepath.Join(d.PinDir(), "x"), filepath.Join(d.PinDir(), "y")); err != nil {
		t.Fatalf("rename over a pin on bpffs: %v", err)
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(d.PinDir(), "y"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, _ := m.Info()
	if id, _ := info.ID(); id != ids[0] {
		t.Errorf("y names map %d after the rename, want %d", id, ids[0])
	}
	if _, err := os.Stat(filepath.Join(d.PinDir(), "x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("x after the rename: %v, want gone", err)
	}
}
