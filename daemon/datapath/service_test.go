package datapath

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/internal/testenv"
)

// TestServicePolicyThroughVIP: the client's egress policy is decided
// against the backend's identity: allowed to the backends' identity, it
// connects through the VIP; allowed only to another identity, its SYN is
// dropped and the drop event names the backend's identity.
func TestServicePolicyThroughVIP(t *testing.T) {
	tp := newSvcTopo(t)
	d := openSvcTest(t, tp)
	tp.serveTCP(t, 8080)
	const clientEP, clientID, backendID, otherID = 211, 70211, 70311, 70399
	inNS(t, tp.host, func() {
		if err := d.AttachEndpoint(EndpointSpec{ID: clientEP, IfIndex: tp.clientIf, IPs: []netip.Addr{tp.clientIP}, Identity: clientID}); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { inNS(t, tp.host, func() { d.DetachEndpoint(clientEP, tp.clientIf) }) })
	if err := d.UpsertIPCache(netip.PrefixFrom(tp.clientIP, 32), clientID, netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	for _, ip := range tp.beIPs {
		if err := d.UpsertIPCache(netip.PrefixFrom(ip, 32), backendID, netip.Addr{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.SyncServices(tp.table(testVIP, service.TCP, 0, 1, 2)); err != nil {
		t.Fatal(err)
	}
	allow := func(id uint32) {
		t.Helper()
		if err := d.SetPolicy(clientEP, []Entry{
			{Identity: id, Direction: Egress, Proto: protoTCP, Port: 8080},
			{Direction: Ingress}, // nothing else is tested on ingress
		}); err != nil {
			t.Fatal(err)
		}
	}
	allow(backendID)
	for n := range 10 {
		c, err := tp.dial(t, "tcp", testVIP)
		if err != nil {
			t.Fatalf("connection %d through the VIP with egress allowed to the backends: %v", n, err)
		}
		if _, _, err := greeting(c); err != nil {
			t.Fatalf("connection %d: %v", n, err)
		}
		c.Close()
	}

	allow(otherID)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var c interface{ Close() error }
	inCgroup(t, tp.cgroup, func() {
		inNS(t, tp.client, func() {
			conn, err := dialTimeout("tcp", testVIP, time.Second)
			if err == nil {
				c = conn
			}
		})
	})
	if c != nil {
		c.Close()
		t.Fatal("connection through the VIP succeeded with egress allowed only to another identity")
	}
	deadline := time.After(3 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Verdict == Dropped && ev.Reason == DropPolicyDenied && ev.Endpoint == clientEP {
				if ev.DstIdentity != backendID || !slicesContains(tp.beIPs, ev.Dst.Addr()) {
					t.Fatalf("drop event %+v: want the backend's address and identity %d", ev, backendID)
				}
				t.Logf("drop event: %s -> %s identity %d (%s)", ev.Src, ev.Dst, ev.DstIdentity, ev.Reason)
				return
			}
		case <-deadline:
			t.Fatal("no policy drop event naming the backend")
		}
	}
}

// TestServiceSyncScaleAndIdempotent programs 10,000 services, re-syncs
// the same table (nothing changes), changes one, and removes all.
func TestServiceSyncScaleAndIdempotent(t *testing.T) {
	d := openTest(t, Options{ServiceMaxEntries: 16384, ServiceBackendMaxEntries: 65536})
	const n = 10000
	mk := func(extra int) service.Table {
		var tb service.Table
		for i := range n {
			vip := netip.AddrFrom4([4]byte{10, 97, byte(i / 256), byte(i % 256)})
			s := service.Service{Name: fmt.Sprintf("s%d", i), Frontend: service.Frontend{VIP: vip, Port: 80, Proto: service.TCP}}
			for b := range 3 + extra*boolInt(i == 42) {
				s.Backends = append(s.Backends, service.Backend{Addr: netip.AddrFrom4([4]byte{10, 98, byte(i / 256), byte(i % 256)}),
					Port: uint16(8000 + b), State: service.StateActive})
			}
			tb.Services = append(tb.Services, s)
		}
		return tb
	}
	start := time.Now()
	if err := d.SyncServices(mk(0)); err != nil {
		t.Fatalf("SyncServices(10,000 services): %v", err)
	}
	first := time.Since(start)
	idOf := func(vip netip.Addr) uint32 {
		var mapID uint32
		v := svcValue{}
		if err := d.maps["rw_services"].Lookup(newSvcKey(service.Frontend{VIP: vip, Port: 80, Proto: service.TCP}), &v); err != nil {
			t.Fatal(err)
		}
		if err := d.maps["rw_svc_maglev"].Lookup(v.ID, &mapID); err != nil {
			t.Fatal(err)
		}
		return mapID
	}
	vip0, vip42 := netip.MustParseAddr("10.97.0.0"), netip.MustParseAddr("10.97.0.42")
	t0, t42 := idOf(vip0), idOf(vip42)
	start = time.Now()
	if err := d.SyncServices(mk(0)); err != nil {
		t.Fatal(err)
	}
	again := time.Since(start)
	if idOf(vip0) != t0 || idOf(vip42) != t42 {
		t.Fatal("the same table again replaced Maglev tables")
	}
	start = time.Now()
	if err := d.SyncServices(mk(1)); err != nil {
		t.Fatal(err)
	}
	one := time.Since(start)
	if idOf(vip0) != t0 || idOf(vip42) == t42 {
		t.Fatal("changing service 42 did not replace exactly its table")
	}
	t.Logf("SyncServices: 10,000 services (30,000 backends) %v; same table again %v; one service changed %v", first, again, one)
	if got := mapCount(t, d.maps["rw_services"]); got != n {
		t.Fatalf("rw_services holds %d, want %d", got, n)
	}
	if err := d.SyncServices(service.Table{}); err != nil {
		t.Fatal(err)
	}
	if got, be := mapCount(t, d.maps["rw_services"]), mapCount(t, d.maps["rw_svc_backends"]); got != 0 || be != 0 {
		t.Fatalf("after the empty table: %d services, %d backends left", got, be)
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func mapCount(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	it := m.Iterate()
	var k, v []byte
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestServiceSyncHostile: invalid parts of a table are left out and
// listed, never crash; a table over capacity fails and leaves the
// previous one in force.
func TestServiceSyncHostile(t *testing.T) {
	d := openTest(t, Options{ServiceMaxEntries: 16, ServiceBackendMaxEntries: 200})
	be := func(a string, port uint16) service.Backend {
		return service.Backend{Addr: netip.MustParseAddr(a), Port: port, State: service.StateActive}
	}
	fe := func(vip string, port uint16, p service.Proto) service.Frontend {
		return service.Frontend{VIP: netip.MustParseAddr(vip), Port: port, Proto: p}
	}
	var many []service.Backend
	for i := range maglevMaxBackends + 20 {
		many = append(many, be(fmt.Sprintf("10.99.%d.%d", i/256, i%256), 80))
	}
	good := service.Service{Name: "good", Frontend: fe("10.96.1.1", 80, service.TCP), Backends: []service.Backend{be("10.0.0.1", 80)}}
	tb := service.Table{Services: []service.Service{
		good,
		{Name: "zero-port", Frontend: fe("10.96.1.2", 0, service.TCP), Backends: []service.Backend{be("10.0.0.1", 80)}},
		{Name: "bad-vip", Frontend: service.Frontend{Port: 80, Proto: service.TCP}, Backends: []service.Backend{be("10.0.0.1", 80)}},
		{Name: "sctp", Frontend: fe("10.96.1.3", 80, 132), Backends: []service.Backend{be("10.0.0.1", 80)}},
		{Name: "dup", Frontend: fe("10.96.1.1", 80, service.TCP), Backends: []service.Backend{be("10.0.0.2", 80)}},
		{Name: "mixed", Frontend: fe("10.96.1.4", 80, service.UDP), Backends: []service.Backend{be("fd00::1", 80), be("10.0.0.3", 0), be("10.0.0.4", 53)}},
		{Name: "v6-all-v4", Frontend: fe("fd96::1", 80, service.TCP), Backends: []service.Backend{be("10.0.0.1", 80)}},
		{Name: "too-many", Frontend: fe("10.96.1.5", 80, service.TCP), Backends: many},
	}}
	if err := d.SyncServices(tb); err != nil {
		t.Fatalf("SyncServices(hostile table) = %v, want the invalid parts skipped", err)
	}
	skipped := strings.Join(d.SkippedServices(), "\n")
	for _, want := range []string{`"zero-port"`, `"bad-vip"`, `"sctp"`, `"dup"`, `backend [fd00::1]:80 is of another address family`, `10.0.0.3 has port 0`, `"v6-all-v4"`, `"too-many"`} {
		if !strings.Contains(skipped, want) {
			t.Errorf("skipped list lacks %s:\n%s", want, skipped)
		}
	}
	got, err := d.Services()
	if err != nil {
		t.Fatal(err)
	}
	summary := map[string]int{}
	for _, s := range got {
		summary[s.Frontend.String()] = len(s.Backends)
	}
	want := map[string]int{"10.96.1.1:80/tcp": 1, "10.96.1.4:80/udp": 1, "[fd96::1]:80/tcp": 0, "10.96.1.5:80/tcp": maglevMaxBackends}
	if fmt.Sprint(summary) != fmt.Sprint(want) {
		t.Fatalf("programmed %v, want %v", summary, want)
	}
	// Over capacity (16 services): refused, the previous table stays.
	var big service.Table
	for i := range 17 {
		big.Services = append(big.Services, service.Service{Name: "x", Frontend: fe(fmt.Sprintf("10.96.2.%d", i+1), 80, service.TCP),
			Backends: []service.Backend{be("10.0.0.9", 80)}})
	}
	if err := d.SyncServices(big); err == nil || !strings.Contains(err.Error(), "service_max_entries") {
		t.Fatalf("SyncServices(17 services into 16) = %v, want an error naming service_max_entries", err)
	}
	after, err := d.Services()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(after) != fmt.Sprint(got) {
		t.Fatalf("a refused table changed the programmed one:\n%v\nnow\n%v", got, after)
	}
}

func dialTimeout(network string, dst netip.AddrPort, d time.Duration) (net.Conn, error) {
	return net.DialTimeout(network, dst.String(), d)
}

// TestServiceRestartAndCleanup: the hooks are pinned links, so balancing
// goes on while no agent runs and a restarted agent adopts what is
// programmed without changing it; Cleanup detaches them.
func TestServiceRestartAndCleanup(t *testing.T) {
	tp := newSvcTopo(t)
	tp.serveTCP(t, 8080)
	dir := testPinDir(t)
	opts := Options{PinDir: dir, ServiceCgroup: tp.cgroup, ServiceMaxEntries: 1024}
	d1 := openTest(t, opts)
	tb := tp.table(testVIP, service.TCP, 0, 1, 2)
	if err := d1.SyncServices(tb); err != nil {
		t.Fatal(err)
	}
	var before svcValue
	key := newSvcKey(tb.Services[0].Frontend)
	if err := d1.maps["rw_services"].Lookup(key, &before); err != nil {
		t.Fatal(err)
	}
	reach := func(when string) {
		t.Helper()
		c, err := tp.dial(t, "tcp", testVIP)
		if err != nil {
			t.Fatalf("%s: connect to the VIP: %v", when, err)
		}
		defer c.Close()
		if _, _, err := greeting(c); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
	}
	reach("first agent")
	d1.Close()
	reach("no agent running")

	d2 := openTest(t, opts)
	if d2.ServiceCgroup() != tp.cgroup {
		t.Fatalf("restarted agent: ServiceCgroup() = %q", d2.ServiceCgroup())
	}
	reach("restarted agent")
	if err := d2.SyncServices(tb); err != nil {
		t.Fatal(err)
	}
	var after svcValue
	if err := d2.maps["rw_services"].Lookup(key, &after); err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Fatalf("the same table after a restart re-programmed the service: %+v, was %+v", after, before)
	}
	d2.Close()
	if err := Cleanup(dir); err != nil {
		t.Fatal(err)
	}
	// The hooks are gone (the kernel frees an unpinned link from a work
	// queue, so allow it a moment): the VIP is an address nobody routes.
	for i := 0; ; i++ {
		c, err := tp.dial(t, "tcp", testVIP)
		if err != nil {
			t.Logf("after Cleanup: %v", err)
			break
		}
		c.Close()
		if i == 20 {
			t.Fatal("connect to the VIP still translated 2 s after Cleanup")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestServiceCgroupFull: a cgroup that already holds the kernel's 64
// programs on a hook (a hundred agents of the fleet bench on one cgroup
// did) makes Open fail with what to do, not a bare "argument list too
// long".
func TestServiceCgroupFull(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testCgroup(t)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.CGroupSockAddr, AttachType: ebpf.AttachCGroupInet4Connect, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	var links []link.Link
	t.Cleanup(func() {
		for _, l := range links {
			l.Close()
		}
	})
	for len(links) < 64 {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
		if err != nil {
			t.Fatalf("attach program %d of 64: %v", len(links)+1, err)
		}
		links = append(links, l)
	}
	d, err := Open(Options{PinDir: testPinDir(t), ServiceCgroup: cg, CTMaxEntries: 4096, IPCacheMaxEntries: 4096, PolicyMaxEntries: 1024, ServiceMaxEntries: 16}, quietLog())
	if err == nil {
		d.Close()
		t.Fatal("Open attached a 65th program to one cgroup hook")
	}
	for _, want := range []string{"64 programs", "service_cgroup", cg} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Open error %q does not say %q", err, want)
		}
	}
}
