package endpoint

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/internal/testenv"
)

// These tests use real netlink in namespaces they create, all named
// rwb-<pid>-<n>; the "host" is a namespace of its own too, so nothing
// touches the machine's own namespace (its forwarding sysctls included).

var nsSeq atomic.Int32

func run(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newNetns creates a named namespace and deletes it at cleanup; it returns
// the name and its path.
func newNetns(t *testing.T, what string) (string, string) {
	t.Helper()
	name := fmt.Sprintf("rwb-%d-%s%d", os.Getpid()%100000, what, nsSeq.Add(1))
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return name, "/run/netns/" + name
}

type testHost struct {
	ns, nsPath string
	dir        string
	opts       Options
	dp         *fakeDatapath
	ids        *fakeIdentities
	m          *Manager
}

func requireNetns(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "ping")
}

func newTestHost(t *testing.T, cidrs ...string) *testHost {
	t.Helper()
	requireNetns(t)
	h := &testHost{dp: newFakeDatapath(), ids: newFakeIdentities(), dir: t.TempDir()}
	h.ns, h.nsPath = newNetns(t, "h")
	h.opts = Options{StateDir: h.dir, CIDRs: pfx(cidrs...), HostNetns: h.nsPath, LinkPrefix: "rwb",
		Timeout: 5 * time.Second, Enforcer: h.dp}
	m, err := New(h.opts, h.dp, h.ids, quietLog())
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	t.Cleanup(func() { m.Close() })
	h.m = m
	return h
}

// reopen builds a new Manager over the same state dir and host, as a
// restarted agent would.
func (h *testHost) reopen(t *testing.T) {
	t.Helper()
	h.m.Close()
	h.dp, h.ids = newFakeDatapath(), newFakeIdentities()
	m, err := New(h.opts, h.dp, h.ids, quietLog())
	if err != nil {
		t.Fatalf("New() after restart = %v", err)
	}
	t.Cleanup(func() { m.Close() })
	h.m = m
}

func (h *testHost) add(t *testing.T, name string, req Request) Endpoint {
	t.Helper()
	if req.NetnsPath == "" {
		_, req.NetnsPath = newNetns(t, "e")
	}
	req.Name = name
	if req.Labels == nil {
		req.Labels = identity.MustLabels("app", name, "instance", name)
	}
	ep, err := h.m.Add(context.Background(), req)
	if err != nil {
		t.Fatalf("Add(%s) = %v", name, err)
	}
	return ep
}

func nsName(path string) string { return filepath.Base(path) }

// ifindex returns the ifindex of a link in the host namespace, or 0.
func (h *testHost) ifindex(t *testing.T, name string) int {
	t.Helper()
	l, err := h.m.host.link(name)
	if err != nil {
		t.Fatal(err)
	}
	if l == nil {
		return 0
	}
	return l.Attrs().Index
}

// snapshot is everything an endpoint leaves in the host: links, routes,
// state files, datapath entries, identity references.
type snapshot struct {
	links, routes4, routes6 string
	files                   []string
	eps                     []uint16
	dpEps, dpCache, refs    int
}

func (h *testHost) snap(t *testing.T) snapshot {
	t.Helper()
	var s snapshot
	for _, l := range strings.Split(run(t, "ip", "-n", h.ns, "-o", "link", "show"), "\n") {
		if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], "rwb") {
			s.links += strings.SplitN(f[1], "@", 2)[0] + " "
		}
	}
	s.routes4 = run(t, "ip", "-n", h.ns, "-4", "route", "show", "proto", "114")
	s.routes6 = run(t, "ip", "-n", h.ns, "-6", "route", "show", "proto", "114")
	s.files, _ = filepath.Glob(filepath.Join(h.dir, "endpoints", "*"))
	for _, ep := range h.m.List() {
		s.eps = append(s.eps, ep.ID)
	}
	s.dpEps, s.dpCache = h.dp.counts()
	s.refs = h.ids.total()
	return s
}

func ping(t *testing.T, ns string, dst netip.Addr) error { return pingWait(t, ns, dst, "2") }

// pingDrops reports whether one echo from ns to dst gets no reply within a
// second (for what must be dropped: a shorter wait than ping's).
func pingDrops(t *testing.T, ns string, dst netip.Addr) bool { return pingWait(t, ns, dst, "1") != nil }

func pingWait(t *testing.T, ns string, dst netip.Addr, wait string) error {
	t.Helper()
	args := []string{"ip", "netns", "exec", ns, "ping", "-c", "1", "-W", wait}
	if dst.Is6() {
		args = append(args, "-6")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], append(args[1:], dst.String())...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v\n%s", dst, ns, err, out)
	}
	return nil
}

// TestTwoEndpointsTalk adds two endpoints and pings between them through
// the host namespace, over IPv4 and IPv6, with no BPF at all: the plumbing
// (addresses, link-local gateways, static neighbours, host routes,
// forwarding) is right on its own.
func TestTwoEndpointsTalk(t *testing.T) {
	h := newTestHost(t, "10.251.0.0/28", "fd00:251::/120")
	a := h.add(t, "a", Request{})
	b := h.add(t, "b", Request{})
	if a.ID != 1 || b.ID != 2 {
		t.Errorf("ids = %d, %d, want 1, 2", a.ID, b.ID)
	}
	if a.IPv4.String() != "10.251.0.1" || b.IPv4.String() != "10.251.0.2" || a.IPv6.String() != "fd00:251::1" {
		t.Errorf("addresses = %v %v, %v %v; want 10.251.0.1 fd00:251::1, 10.251.0.2 fd00:251::2", a.IPv4, a.IPv6, b.IPv4, b.IPv6)
	}
	if a.HostIfName != "rwb00001" || a.HostIfIndex == 0 || h.ifindex(t, "rwb00001") != a.HostIfIndex {
		t.Errorf("host side = %s/%d, want rwb00001 with its ifindex %d", a.HostIfName, a.HostIfIndex, h.ifindex(t, "rwb00001"))
	}
	if a.Identity == b.Identity {
		t.Errorf("identities of different labels are equal: %v", a.Identity)
	}
	for _, tc := range []struct {
		from Endpoint
		to   netip.Addr
	}{{a, b.IPv4}, {b, a.IPv4}, {a, b.IPv6}, {b, a.IPv6}} {
		if err := ping(t, nsName(tc.from.Netns), tc.to); err != nil {
			t.Error(err)
		}
	}
	if n, c := h.dp.counts(); n != 2 || c != 4 {
		t.Errorf("datapath has %d endpoints, %d ipcache entries; want 2, 4", n, c)
	}
	if err := h.m.Delete(context.Background(), "a"); err != nil {
		t.Fatalf("Delete(a) = %v", err)
	}
	if !pingDrops(t, nsName(b.Netns), a.IPv4) {
		t.Errorf("ping to deleted endpoint succeeded")
	}
	s := h.snap(t)
	if s.links != "rwb00002 " || len(s.files) != 1 || s.dpEps != 1 || s.dpCache != 2 || s.refs != 1 {
		t.Errorf("after Delete(a): %+v; want only endpoint 2 left", s)
	}
	if err := h.m.Delete(context.Background(), "a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete(a) = %v, want ErrNotFound", err)
	}
}

// TestIdentityFilter checks that only identity-relevant labels make the
// identity.
func TestIdentityFilter(t *testing.T) {
	h := newTestHost(t, "10.251.1.0/28")
	h.m.opts.IdentityLabels = []string{"app"}
	a := h.add(t, "a", Request{Labels: identity.MustLabels("app", "web", "instance", "1")})
	b := h.add(t, "b", Request{Labels: identity.MustLabels("app", "web", "instance", "2")})
	if a.Identity != b.Identity || a.IdentityLabels.String() != "app=web;" {
		t.Errorf("identities %v (%v), %v; want one identity for app=web", a.Identity, a.IdentityLabels, b.Identity)
	}
}

// TestBadInputRollsBack checks each bad request and each injected late
// failure: a clear error, and the host exactly as before.
func TestBadInputRollsBack(t *testing.T) {
	notNs := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notNs, nil, 0o600)
	tests := []struct {
		name    string
		cidrs   []string
		prepare func(t *testing.T, h *testHost, req *Request)
		wantErr error
	}{
		{name: "invalid labels", prepare: func(t *testing.T, h *testHost, r *Request) {
			r.Labels = identity.Labels{{Key: "bad key", Value: "x"}}
		}, wantErr: ErrBadLabels},
		{name: "no identity labels", prepare: func(t *testing.T, h *testHost, r *Request) { r.Labels = identity.Labels{} },
			wantErr: ErrBadLabels},
		{name: "bad name", prepare: func(t *testing.T, h *testHost, r *Request) { r.Name = "no/slash" }, wantErr: ErrBadName},
		{name: "missing netns", prepare: func(t *testing.T, h *testHost, r *Request) { r.NetnsPath = "/run/netns/rwb-does-not-exist" },
			wantErr: ErrNoNetns},
		{name: "not a netns", prepare: func(t *testing.T, h *testHost, r *Request) { r.NetnsPath = notNs }, wantErr: ErrNoNetns},
		{name: "host netns", prepare: func(t *testing.T, h *testHost, r *Request) { r.NetnsPath = h.nsPath }, wantErr: ErrNoNetns},
		{name: "ip outside cidr", prepare: func(t *testing.T, h *testHost, r *Request) { r.IP = netip.MustParseAddr("10.9.9.9") },
			wantErr: ErrIPOutsideCIDR},
		{name: "broadcast", prepare: func(t *testing.T, h *testHost, r *Request) { r.IP = netip.MustParseAddr("10.251.2.7") },
			wantErr: ErrIPOutsideCIDR},
		{name: "ip in use", prepare: func(t *testing.T, h *testHost, r *Request) { r.IP = netip.MustParseAddr("10.251.2.1") },
			wantErr: ErrIPInUse},
		{name: "ipv6 in use", prepare: func(t *testing.T, h *testHost, r *Request) { r.IPv6 = netip.MustParseAddr("fd00:252::1") },
			wantErr: ErrIPInUse},
		{name: "cidr exhausted", cidrs: []string{"10.251.3.0/30"}, prepare: func(t *testing.T, h *testHost, r *Request) {
			h.add(t, "second", Request{})
		}, wantErr: ErrCIDRExhausted},
		{name: "duplicate name", prepare: func(t *testing.T, h *testHost, r *Request) { r.Name = "first" }, wantErr: ErrExists},
		{name: "netns has eth0", prepare: func(t *testing.T, h *testHost, r *Request) {
			run(t, "ip", "-n", nsName(r.NetnsPath), "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
		}, wantErr: ErrExists},
		{name: "host route exists", prepare: func(t *testing.T, h *testHost, r *Request) {
			run(t, "ip", "-n", h.ns, "link", "add", "rwbdummy", "type", "veth", "peer", "name", "rwbdummyp")
			run(t, "ip", "-n", h.ns, "link", "set", "rwbdummy", "up")
			run(t, "ip", "-n", h.ns, "route", "add", "10.251.2.2/32", "dev", "rwbdummy")
		}, wantErr: ErrIPInUse},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cidrs := tt.cidrs
			if cidrs == nil {
				cidrs = []string{"10.251.2.0/29", "fd00:252::/120"}
			}
			h := newTestHost(t, cidrs...)
			h.add(t, "first", Request{})
			_, nsPath := newNetns(t, "e")
			req := Request{Name: "new", NetnsPath: nsPath, Labels: identity.MustLabels("app", "new")}
			tt.prepare(t, h, &req)
			before := h.snap(t)
			_, err := h.m.Add(context.Background(), req)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Add() = %v, want %v", err, tt.wantErr)
			}
			t.Logf("error: %v", err)
			assertSame(t, before, h.snap(t))
			assertNoEth0(t, nsPath)
		})
	}
}

// TestLateFailureRollsBack injects failures after the veth exists.
func TestLateFailureRollsBack(t *testing.T) {
	boom := errors.New("map is full")
	tests := []struct {
		name   string
		inject func(h *testHost)
	}{
		{"identity allocation fails", func(h *testHost) { h.ids.fail = boom }},
		{"datapath attach fails", func(h *testHost) { h.dp.failAtt = boom }},
		{"ipcache full", func(h *testHost) { h.dp.failCache = boom }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestHost(t, "10.251.4.0/29", "fd00:254::/120")
			h.add(t, "first", Request{})
			before := h.snap(t)
			_, nsPath := newNetns(t, "e")
			tt.inject(h)
			_, err := h.m.Add(context.Background(), Request{Name: "new", NetnsPath: nsPath, Labels: identity.MustLabels("app", "new")})
			if !errors.Is(err, boom) {
				t.Fatalf("Add() = %v, want the injected failure", err)
			}
			t.Logf("error: %v", err)
			h.ids.fail, h.dp.failAtt, h.dp.failCache = nil, nil, nil
			assertSame(t, before, h.snap(t))
			assertNoEth0(t, nsPath)
			// The id and the addresses are free again.
			ep, err := h.m.Add(context.Background(), Request{Name: "new", NetnsPath: nsPath, Labels: identity.MustLabels("app", "new")})
			if err != nil {
				t.Fatalf("Add() after the failure = %v", err)
			}
			if ep.ID != 2 || ep.IPv4.String() != "10.251.4.2" {
				t.Errorf("Add() after the failure = id %d %v, want id 2 10.251.4.2", ep.ID, ep.IPv4)
			}
		})
	}
}

func assertSame(t *testing.T, before, after snapshot) {
	t.Helper()
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Errorf("host changed by a failed Add:\nbefore %+v\nafter  %+v", before, after)
	}
}

func assertNoEth0(t *testing.T, nsPath string) {
	t.Helper()
	// A veth whose peer is in another namespace is one Add made.
	out := run(t, "ip", "-n", nsName(nsPath), "-o", "link", "show", "type", "veth")
	if strings.Contains(out, "link-netns") {
		t.Errorf("veth left in the endpoint namespace: %s", out)
	}
}

// TestRestore restarts the manager over the same state: the endpoints come
// back with the same ids and ifindexes, nothing is re-created, traffic keeps
// flowing; a vanished veth is reported lost; a half-done Add is cleaned.
func TestRestore(t *testing.T) {
	h := newTestHost(t, "10.251.5.0/28", "fd00:255::/120")
	a := h.add(t, "a", Request{})
	b := h.add(t, "b", Request{})
	c := h.add(t, "c", Request{})

	// A half-done Add of a previous run: state "creating" and its veth.
	half := Endpoint{ID: 9, Name: "half", Netns: "/run/netns/gone", State: StateCreating,
		IPv4: netip.MustParseAddr("10.251.5.9"), HostIfName: "rwb00009"}
	if err := writeState(filepath.Join(h.dir, "endpoints"), half); err != nil {
		t.Fatal(err)
	}
	run(t, "ip", "-n", h.ns, "link", "add", "rwb00009", "type", "veth", "peer", "name", "rwb00009p")

	// Endpoint c's namespace goes away while the agent is down.
	// The kernel destroys a namespace, and with it the veth, asynchronously.
	run(t, "ip", "netns", "del", nsName(c.Netns))
	for deadline := time.Now().Add(10 * time.Second); h.ifindex(t, c.HostIfName) != 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists 10s after its namespace was deleted", c.HostIfName)
		}
	}

	h.reopen(t)
	rep, err := h.m.Restore(context.Background())
	if err != nil {
		t.Fatalf("Restore() = %v", err)
	}
	if fmt.Sprint(rep.Restored, rep.Lost, rep.Cleaned) != "[1 2] [3] [9]" {
		t.Errorf("Restore() = %+v, want restored [1 2], lost [3], cleaned [9]", rep)
	}
	for _, want := range []Endpoint{a, b} {
		got, err := h.m.Get(want.Name)
		if err != nil {
			t.Fatal(err)
		}
		if got.ID != want.ID || got.HostIfIndex != want.HostIfIndex || got.Identity != want.Identity || got.State != StateReady {
			t.Errorf("restored %s = id %d ifindex %d identity %v %s; want %d %d %v ready",
				want.Name, got.ID, got.HostIfIndex, got.Identity, got.State, want.ID, want.HostIfIndex, want.Identity)
		}
		if idx := h.ifindex(t, want.HostIfName); idx != want.HostIfIndex {
			t.Errorf("%s ifindex now %d, want %d (re-created?)", want.HostIfName, idx, want.HostIfIndex)
		}
		if s := h.dp.eps[want.ID]; s.IfIndex != want.HostIfIndex || s.Identity != want.Identity {
			t.Errorf("datapath re-adopt of %s = %+v", want.Name, s)
		}
	}
	if got, _ := h.m.Get("c"); got.State != StateLost {
		t.Errorf("c state = %s, want lost", got.State)
	}
	if h.ifindex(t, "rwb00009") != 0 || h.ifindex(t, "rwb00009p") != 0 {
		t.Errorf("half-created link rwb00009 still exists")
	}
	if _, err := os.Stat(statePath(filepath.Join(h.dir, "endpoints"), 9)); !os.IsNotExist(err) {
		t.Errorf("half-created state file still exists: %v", err)
	}
	if err := ping(t, nsName(a.Netns), b.IPv4); err != nil {
		t.Error(err)
	}
	if err := ping(t, nsName(b.Netns), a.IPv6); err != nil {
		t.Error(err)
	}
	// c's address stays reserved while it is lost.
	if _, err := h.m.Add(context.Background(), Request{Name: "d", NetnsPath: mustNetns(t), IP: c.IPv4, Labels: identity.MustLabels("app", "d")}); !errors.Is(err, ErrIPInUse) {
		t.Errorf("Add(lost endpoint's address) = %v, want ErrIPInUse", err)
	}
	// Restore is idempotent: a second one changes nothing, takes no second
	// identity reference.
	refs := h.ids.total()
	if _, err := h.m.Restore(context.Background()); err != nil {
		t.Errorf("second Restore() = %v", err)
	}
	if h.ids.total() != refs {
		t.Errorf("identity references after second Restore = %d, want %d", h.ids.total(), refs)
	}
	if err := h.m.Delete(context.Background(), "c"); err != nil {
		t.Errorf("Delete(lost c) = %v", err)
	}
	for _, n := range []string{"a", "b"} {
		if err := h.m.Delete(context.Background(), n); err != nil {
			t.Errorf("Delete(%s) = %v", n, err)
		}
	}
	if s := h.snap(t); s.links != "" || len(s.files) != 0 || s.refs != 0 || s.dpEps != 0 || s.dpCache != 0 || s.routes4 != "" {
		t.Errorf("after deleting all: %+v, want nothing", s)
	}
}

// TestRestoreStoreDown restores while the identity store does not answer:
// the stored identity is kept and forwarding continues.
func TestRestoreStoreDown(t *testing.T) {
	h := newTestHost(t, "10.251.6.0/28")
	a := h.add(t, "a", Request{})
	h.reopen(t)
	h.ids.fail = errors.New("store unreachable")
	rep, err := h.m.Restore(context.Background())
	if err != nil || len(rep.Restored) != 1 {
		t.Fatalf("Restore() = %+v, %v; want a restored", rep, err)
	}
	if got := h.dp.eps[a.ID].Identity; got != a.Identity {
		t.Errorf("re-attached with identity %v, want the stored %v", got, a.Identity)
	}
	h.ids.fail = nil
	if err := h.m.Delete(context.Background(), "a"); err != nil {
		t.Errorf("Delete(a) = %v", err)
	}
	if h.ids.total() != 0 {
		t.Errorf("identity references = %d, want 0 (none was taken)", h.ids.total())
	}
}

func mustNetns(t *testing.T) string {
	_, p := newNetns(t, "e")
	return p
}

// TestConcurrentAdds adds endpoints from several goroutines: every one gets
// its own id and addresses.
func TestConcurrentAdds(t *testing.T) {
	h := newTestHost(t, "10.251.8.0/28", "fd00:258::/120")
	const n = 6
	paths := make([]string, n)
	for i := range paths {
		paths[i] = mustNetns(t)
	}
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := h.m.Add(context.Background(), Request{Name: fmt.Sprintf("w%d", i), NetnsPath: paths[i],
				Labels: identity.MustLabels("app", "w")})
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	ids, v4, v6 := map[uint16]bool{}, map[netip.Addr]bool{}, map[netip.Addr]bool{}
	for _, ep := range h.m.List() {
		ids[ep.ID], v4[ep.IPv4], v6[ep.IPv6] = true, true, true
	}
	if len(ids) != n || len(v4) != n || len(v6) != n {
		t.Errorf("%d endpoints with %d ids, %d IPv4, %d IPv6; want %d distinct of each", len(h.m.List()), len(ids), len(v4), len(v6), n)
	}
	if h.ids.total() != n {
		t.Errorf("identity references = %d, want %d", h.ids.total(), n)
	}
}

// BenchmarkAddDelete measures one Add plus one Delete with real netlink and
// a fake datapath (the veth pair, addresses, routes, neighbours, two fsynced
// state writes).
func BenchmarkAddDelete(b *testing.B) {
	testenv.RequireRoot(b)
	name := fmt.Sprintf("rwb-%d-bench", os.Getpid()%100000)
	for _, ns := range []string{name + "h", name + "e"} {
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			b.Fatalf("ip netns add %s: %v %s", ns, err, out)
		}
		b.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	m, err := New(Options{StateDir: b.TempDir(), CIDRs: pfx("10.251.9.0/24", "fd00:259::/120"), HostNetns: "/run/netns/" + name + "h",
		LinkPrefix: "rwb"}, newFakeDatapath(), newFakeIdentities(), quietLog())
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	req := Request{Name: "bench", NetnsPath: "/run/netns/" + name + "e", Labels: identity.MustLabels("app", "bench")}
	b.ResetTimer()
	for range b.N {
		if _, err := m.Add(context.Background(), req); err != nil {
			b.Fatal(err)
		}
		if err := m.Delete(context.Background(), "bench"); err != nil {
			b.Fatal(err)
		}
	}
}
