package endpoint

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/internal/testenv"
)

// nsDatapath runs every datapath call in the manager's host namespace, as
// the agent does when it runs there itself: tc and tcx attach resolve the
// ifindex in the caller's namespace.
type nsDatapath struct {
	h  *host
	dp Datapath
}

func (n *nsDatapath) AttachEndpoint(s AttachSpec) error {
	return n.h.do(func() error { return n.dp.AttachEndpoint(s) })
}

func (n *nsDatapath) DetachEndpoint(id uint16, ifindex int) error {
	return n.h.do(func() error { return n.dp.DetachEndpoint(id, ifindex) })
}

// bpfDatapath is the agent's adapter, for the tests of this package.
type bpfDatapath struct{ d *datapath.Datapath }

func (b bpfDatapath) AttachEndpoint(s AttachSpec) error {
	return b.d.AttachEndpoint(datapath.EndpointSpec{ID: s.ID, IfIndex: s.IfIndex, IPs: s.IPs,
		MAC: s.PeerMAC, NodeMAC: s.HostMAC, Identity: uint32(s.Identity), Audit: s.Audit})
}

func (b bpfDatapath) DetachEndpoint(id uint16, ifindex int) error {
	return b.d.DetachEndpoint(id, ifindex)
}

// openEnforcer is the agent's Enforcer for endpoints no policy selects:
// the addresses in the ipcache, both directions open.
type openEnforcer struct{ d *datapath.Datapath }

func (e openEnforcer) Admit(_ context.Context, ep Endpoint) error {
	for _, a := range ep.IPs() {
		if err := e.d.UpsertIPCache(netip.PrefixFrom(a, a.BitLen()), uint32(ep.Identity), netip.MustParseAddr("192.0.2.1")); err != nil {
			return err
		}
	}
	return e.d.SetPolicy(ep.ID, datapath.OpenEntries())
}

func (e openEnforcer) Readopt(Endpoint) {}

func (e openEnforcer) Gone(ep Endpoint) {
	for _, a := range ep.IPs() {
		_ = e.d.DeleteIPCache(netip.PrefixFrom(a, a.BitLen()))
	}
}

// TestRealDatapath plugs endpoints into the real eBPF datapath: traffic
// passes while no policy selects them, an ingress policy drops what it does
// not allow, and after an agent restart (new Datapath, new Manager, same
// pins and state) the endpoints are re-adopted with the same policy map
// (same map id) and the policy still in force.
func TestRealDatapath(t *testing.T) {
	for _, mode := range []string{datapath.AttachAuto, datapath.AttachTC} {
		t.Run(mode, func(t *testing.T) { testRealDatapath(t, mode) })
	}
}

func testRealDatapath(t *testing.T, mode string) {
	requireNetns(t)
	testenv.RequireBPFFS(t)
	pinDir := fmt.Sprintf("/sys/fs/bpf/rwb-%d-%s", os.Getpid(), mode)
	t.Cleanup(func() { datapath.Cleanup(pinDir) })
	dopts := datapath.Options{PinDir: pinDir, Attach: mode, CTMaxEntries: 4096, PolicyMaxEntries: 1024, IPCacheMaxEntries: 4096}

	_, hostPath := newNetns(t, "h")
	dir := t.TempDir()
	opts := Options{StateDir: dir, CIDRs: pfx("10.251.7.0/28", "fd00:257::/120"), HostNetns: hostPath, LinkPrefix: "rwb",
		Timeout: 5 * time.Second}
	ids := newFakeIdentities()

	var (
		d *datapath.Datapath
		m *Manager
	)
	// d and m are the running agent's; the cleanup below deletes its
	// endpoints and closes it, before the namespaces go (last in, first
	// out).
	start := func() {
		t.Helper()
		var err error
		d, err = datapath.Open(dopts, quietLog())
		if err != nil {
			t.Fatalf("datapath.Open() = %v", err)
		}
		w := &nsDatapath{dp: bpfDatapath{d}}
		opts.Enforcer = openEnforcer{d}
		m, err = New(opts, w, ids, quietLog())
		if err != nil {
			t.Fatal(err)
		}
		w.h = m.host
	}
	start()
	add := func(name string) Endpoint {
		ep, err := m.Add(context.Background(), Request{Name: name, NetnsPath: mustNetns(t), Labels: identity.MustLabels("app", name)})
		if err != nil {
			t.Fatalf("Add(%s) = %v", name, err)
		}
		return ep
	}
	a, b, c := add("a"), add("b"), add("c")
	t.Cleanup(func() {
		for _, ep := range m.List() {
			if err := m.Delete(context.Background(), ep.Name); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		m.Close()
		d.Close()
	})

	// No policy selects them: open.
	for _, tc := range []struct {
		from Endpoint
		to   netip.Addr
	}{{a, b.IPv4}, {c, b.IPv4}, {a, b.IPv6}, {b, a.IPv4}} {
		if err := ping(t, nsName(tc.from.Netns), tc.to); err != nil {
			t.Errorf("open endpoints: %v", err)
		}
	}

	// b admits ICMP from a only.
	policy := []datapath.Entry{
		{Identity: uint32(a.Identity), Direction: datapath.Ingress, Proto: 1},
		{Direction: datapath.Egress},
	}
	if err := d.SetPolicy(b.ID, policy); err != nil {
		t.Fatalf("SetPolicy(b) = %v", err)
	}
	check := func(when string) {
		t.Helper()
		if err := ping(t, nsName(a.Netns), b.IPv4); err != nil {
			t.Errorf("%s: allowed a -> b: %v", when, err)
		}
		if !pingDrops(t, nsName(c.Netns), b.IPv4) {
			t.Errorf("%s: c -> b passed, want it dropped by b's ingress policy", when)
		}
	}
	check("before restart")

	mapID := func() ebpf.MapID {
		t.Helper()
		pm, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, fmt.Sprintf("rw_policy_%05d", b.ID)), nil)
		if err != nil {
			t.Fatalf("load b's policy map: %v", err)
		}
		defer pm.Close()
		info, err := pm.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		return id
	}
	before := mapID()

	// Agent restart: everything closed, reopened over the same pins and
	// state, endpoints re-adopted.
	m.Close()
	d.Close()
	start()
	rep, err := m.Restore(context.Background())
	if err != nil || len(rep.Restored) != 3 {
		t.Fatalf("Restore() = %+v, %v; want 3 restored", rep, err)
	}
	if after := mapID(); after != before {
		t.Errorf("b's policy map id = %d after restart, want %d (re-created)", after, before)
	}
	check("after restart")

	if err := m.Delete(context.Background(), "b"); err != nil {
		t.Fatalf("Delete(b) = %v", err)
	}
	if _, err := os.Stat(filepath.Join(pinDir, fmt.Sprintf("rw_policy_%05d", b.ID))); !os.IsNotExist(err) {
		t.Errorf("b's policy map still pinned after Delete: %v", err)
	}
}

// TestRealDatapathMapFull fills the real rw_ipcache: the next Add fails
// with a clear error and leaves nothing behind, in the kernel (veth, policy
// map, program links) or on disk.
func TestRealDatapathMapFull(t *testing.T) {
	requireNetns(t)
	testenv.RequireBPFFS(t)
	pinDir := fmt.Sprintf("/sys/fs/bpf/rwb-%d-full", os.Getpid())
	t.Cleanup(func() { datapath.Cleanup(pinDir) })
	d, err := datapath.Open(datapath.Options{PinDir: pinDir, CTMaxEntries: 1024, PolicyMaxEntries: 64, IPCacheMaxEntries: 4}, quietLog())
	if err != nil {
		t.Fatalf("datapath.Open() = %v", err)
	}
	_, hostPath := newNetns(t, "h")
	dir := t.TempDir()
	w := &nsDatapath{dp: bpfDatapath{d}}
	m, err := New(Options{StateDir: dir, CIDRs: pfx("10.251.10.0/28", "fd00:25a::/120"), HostNetns: hostPath, LinkPrefix: "rwb",
		Enforcer: openEnforcer{d}}, w, newFakeIdentities(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	w.h = m.host
	t.Cleanup(func() {
		for _, ep := range m.List() {
			m.Delete(context.Background(), ep.Name)
		}
		m.Close()
		d.Close()
	})
	for _, n := range []string{"a", "b"} { // two addresses each: 4 entries
		if _, err := m.Add(context.Background(), Request{Name: n, NetnsPath: mustNetns(t), Labels: identity.MustLabels("app", n)}); err != nil {
			t.Fatalf("Add(%s) = %v", n, err)
		}
	}
	nsPath := mustNetns(t)
	_, err = m.Add(context.Background(), Request{Name: "c", NetnsPath: nsPath, Labels: identity.MustLabels("app", "c")})
	if err == nil {
		t.Fatal("Add(c) with a full ipcache = nil, want an error")
	}
	t.Logf("error: %v", err)
	for _, p := range []string{"rw_policy_00003", "links/rw_ep_00003_from", "links/rw_ep_00003_to"} {
		if _, err := os.Stat(filepath.Join(pinDir, p)); !os.IsNotExist(err) {
			t.Errorf("%s left pinned after the failed Add (stat: %v)", p, err)
		}
	}
	if l, _ := m.host.link("rwb00003"); l != nil {
		t.Errorf("veth rwb00003 left after the failed Add")
	}
	if _, err := os.Stat(statePath(filepath.Join(dir, "endpoints"), 3)); !os.IsNotExist(err) {
		t.Errorf("state file of c left after the failed Add (stat: %v)", err)
	}
	assertNoEth0(t, nsPath)
	if got := len(m.List()); got != 2 {
		t.Errorf("List() has %d endpoints, want 2", got)
	}
}

// TestRealDatapathClosedUntilAdmitted: an endpoint whose Enforcer wrote
// nothing is closed in both directions (the datapath creates its map
// closed), and the host side of its veth came up only after Admit.
func TestRealDatapathClosedUntilAdmitted(t *testing.T) {
	requireNetns(t)
	testenv.RequireBPFFS(t)
	pinDir := fmt.Sprintf("/sys/fs/bpf/rwb-%d-closed", os.Getpid())
	t.Cleanup(func() { datapath.Cleanup(pinDir) })
	d, err := datapath.Open(datapath.Options{PinDir: pinDir, CTMaxEntries: 1024, PolicyMaxEntries: 64, IPCacheMaxEntries: 64}, quietLog())
	if err != nil {
		t.Fatalf("datapath.Open() = %v", err)
	}
	_, hostPath := newNetns(t, "h")
	w := &nsDatapath{dp: bpfDatapath{d}}
	rec := &recordingEnforcer{}
	m, err := New(Options{StateDir: t.TempDir(), CIDRs: pfx("10.251.11.0/28"), HostNetns: hostPath, LinkPrefix: "rwb", Enforcer: rec},
		w, newFakeIdentities(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	w.h = m.host
	rec.m = m
	t.Cleanup(func() {
		for _, ep := range m.List() {
			m.Delete(context.Background(), ep.Name)
		}
		m.Close()
		d.Close()
	})
	a, err := m.Add(context.Background(), Request{Name: "a", NetnsPath: mustNetns(t), Labels: identity.MustLabels("app", "a")})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Add(context.Background(), Request{Name: "b", NetnsPath: mustNetns(t), Labels: identity.MustLabels("app", "b")})
	if err != nil {
		t.Fatal(err)
	}
	if rec.upAtAdmit {
		t.Errorf("the host side of a veth was up when Admit ran; want it down until the policy is in force")
	}
	if !pingDrops(t, nsName(a.Netns), b.IPv4) {
		t.Errorf("a -> b passed with maps nobody wrote; want new endpoints closed")
	}
	es, err := d.Policy(b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 0 {
		t.Errorf("new endpoint's map holds %v, want nothing (closed)", es)
	}
}

// recordingEnforcer writes nothing and records whether the endpoint's
// host-side veth was already up when Admit ran.
type recordingEnforcer struct {
	m         *Manager
	upAtAdmit bool
}

func (r *recordingEnforcer) Admit(_ context.Context, ep Endpoint) error {
	if l, err := r.m.host.link(ep.HostIfName); err == nil && l != nil && l.Attrs().Flags&net.FlagUp != 0 {
		r.upAtAdmit = true
	}
	return nil
}

func (r *recordingEnforcer) Readopt(Endpoint) {}
func (r *recordingEnforcer) Gone(Endpoint)    {}
