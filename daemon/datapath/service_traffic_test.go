package datapath

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/internal/testenv"
)

// svcTopo is a "host" namespace routing between a client namespace and
// three backend namespaces; a private cgroup-v2 child holds the clients.
type svcTopo struct {
	host, client string
	backends     []string // namespaces
	beIPs        []netip.Addr
	beIP6s       []netip.Addr
	clientIP     netip.Addr
	clientIf     int // host-side veth of the client
	cgroup       string
}

var svcSeq atomic.Uint32

// cgroup2Root finds the cgroup-v2 mount (pure v2 or hybrid).
func cgroup2Root(t testing.TB) string {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "cgroup2" {
			return f[1]
		}
	}
	testenv.Missing(t, "a cgroup2 mount (mount -t cgroup2 none /sys/fs/cgroup/unified)")
	return ""
}

// testCgroup makes a private child cgroup (rwsd prefix), removed at cleanup.
func testCgroup(t testing.TB) string {
	t.Helper()
	cg := filepath.Join(cgroup2Root(t), fmt.Sprintf("rwsd_%d_%d", os.Getpid(), svcSeq.Add(1)))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		for range 50 {
			if err := os.Remove(cg); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove test cgroup %s: still busy", cg)
	})
	return cg
}

// inCgroup runs fn with this process in cgroup cg: sockets created in fn
// belong to cg (and keep it), so its hooks see them.
func inCgroup(t testing.TB, cg string, fn func()) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var orig string
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			orig = filepath.Join(cgroup2Root(t), rest)
		}
	}
	if orig == "" {
		t.Fatal("no cgroup-v2 line in /proc/self/cgroup")
	}
	pid := []byte(fmt.Sprint(os.Getpid()))
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), pid, 0); err != nil {
		t.Fatalf("enter cgroup %s: %v", cg, err)
	}
	defer func() {
		if err := os.WriteFile(filepath.Join(orig, "cgroup.procs"), pid, 0); err != nil {
			t.Errorf("leave cgroup %s for %s: %v", cg, orig, err)
		}
	}()
	fn()
}

func newSvcTopo(t *testing.T) *svcTopo {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	id := fmt.Sprintf("%d%d", os.Getpid()%10000, svcSeq.Add(1))
	tp := &svcTopo{host: "rwsd_h" + id, client: "rwsd_c" + id, clientIP: netip.MustParseAddr("10.211.10.2")}
	nss := []string{tp.host, tp.client}
	for i := range 3 {
		tp.backends = append(tp.backends, fmt.Sprintf("rwsd_b%d_%s", i, id))
		tp.beIPs = append(tp.beIPs, netip.MustParseAddr(fmt.Sprintf("10.211.%d.2", i+1)))
	}
	nss = append(nss, tp.backends...)
	for _, ns := range nss {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
	}
	type side struct {
		ns, hostIf, subnet, subnet6 string
	}
	sides := []side{{tp.client, "rwsd" + id + "c", "10.211.10", "fd21:10:"}}
	for i, ns := range tp.backends {
		sides = append(sides, side{ns, fmt.Sprintf("rwsd%sb%d", id, i), fmt.Sprintf("10.211.%d", i+1), fmt.Sprintf("fd21:%d:", i+1)})
		tp.beIP6s = append(tp.beIP6s, netip.MustParseAddr(fmt.Sprintf("fd21:%d::2", i+1)))
	}
	for _, s := range sides {
		sh(t, "ip", "-n", tp.host, "link", "add", s.hostIf, "type", "veth", "peer", "name", "eth0", "netns", s.ns)
		sh(t, "ip", "-n", tp.host, "addr", "add", s.subnet+".1/24", "dev", s.hostIf)
		sh(t, "ip", "-n", tp.host, "link", "set", s.hostIf, "up")
		sh(t, "ip", "-n", s.ns, "addr", "add", s.subnet+".2/24", "dev", "eth0")
		sh(t, "ip", "-n", s.ns, "link", "set", "eth0", "up")
		sh(t, "ip", "-n", s.ns, "link", "set", "lo", "up")
		sh(t, "ip", "-n", s.ns, "route", "add", "default", "via", s.subnet+".1")
		sh(t, "ip", "-n", tp.host, "addr", "add", s.subnet6+":1/64", "dev", s.hostIf, "nodad")
		sh(t, "ip", "-n", s.ns, "addr", "add", s.subnet6+":2/64", "dev", "eth0", "nodad")
		sh(t, "ip", "-n", s.ns, "-6", "route", "add", "default", "via", s.subnet6+":1")
	}
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	inNS(t, tp.host, func() {
		ifc, err := net.InterfaceByName(sides[0].hostIf)
		if err != nil {
			t.Fatal(err)
		}
		tp.clientIf = ifc.Index
	})
	tp.cgroup = testCgroup(t)
	return tp
}

// serveTCP runs a server in each backend namespace on port: it greets
// every connection with its backend index and a newline, then echoes.
func (tp *svcTopo) serveTCP(t *testing.T, port uint16) {
	t.Helper()
	for i, ns := range tp.backends {
		var ln net.Listener
		inNS(t, ns, func() {
			var err error
			ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
			if err != nil {
				t.Fatalf("listen in %s: %v", ns, err)
			}
		})
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					c.SetDeadline(time.Now().Add(60 * time.Second))
					fmt.Fprintf(c, "%d %s\n", i, c.RemoteAddr())
					buf := make([]byte, 512)
					for {
						n, err := c.Read(buf)
						if err != nil {
							return
						}
						c.Write(buf[:n])
					}
				}()
			}
		}()
	}
}

// serveUDP echoes datagrams prefixed with the backend index.
func (tp *svcTopo) serveUDP(t *testing.T, port uint16) {
	t.Helper()
	for i, ns := range tp.backends {
		var pc net.PacketConn
		inNS(t, ns, func() {
			var err error
			pc, err = net.ListenPacket("udp", netip.AddrPortFrom(tp.beIPs[i], port).String())
			if err != nil {
				t.Fatalf("listen udp in %s: %v", ns, err)
			}
		})
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(append([]byte(fmt.Sprintf("%d %s ", i, from)), buf[:n]...), from)
			}
		}()
	}
}

// dial connects from the client namespace and cgroup.
func (tp *svcTopo) dial(t *testing.T, network string, dst netip.AddrPort) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	var err error
	inCgroup(t, tp.cgroup, func() {
		inNS(t, tp.client, func() {
			c, err = net.DialTimeout(network, dst.String(), 2*time.Second)
		})
	})
	return c, err
}

// greeting reads the backend's first line: its index and the client
// address it saw.
func greeting(c net.Conn) (int, string, error) {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return -1, "", err
	}
	var i int
	var from string
	if _, err := fmt.Sscanf(line, "%d %s", &i, &from); err != nil {
		return -1, "", fmt.Errorf("greeting %q: %v", line, err)
	}
	return i, from, nil
}

func (tp *svcTopo) table(vip netip.AddrPort, proto service.Proto, bes ...int) service.Table {
	s := service.Service{Name: "web", Frontend: service.Frontend{VIP: vip.Addr(), Port: vip.Port(), Proto: proto}, Source: service.SourceConfig}
	for _, i := range bes {
		s.Backends = append(s.Backends, service.Backend{Addr: tp.beIPs[i], Port: 8080, State: service.StateActive, Local: true, Source: service.SourceConfig})
	}
	return service.Table{Services: []service.Service{s}}
}

func openSvcTest(t *testing.T, tp *svcTopo) *Datapath {
	t.Helper()
	d := openTest(t, Options{ServiceCgroup: tp.cgroup, ServiceMaxEntries: 16384, ServiceBackendMaxEntries: 16384})
	t.Cleanup(func() { d.DetachServices() })
	if d.ServiceCgroup() != tp.cgroup {
		t.Fatalf("ServiceCgroup() = %q, want %q", d.ServiceCgroup(), tp.cgroup)
	}
	return d
}

var testVIP = netip.MustParseAddrPort("10.96.0.10:80")

// TestServiceTCPSpreadAndKeep: 300 connections to the VIP reach all three
// backends, each seeing the client's own address; removing a backend
// moves no established connection and a long-lived one stays up.
func TestServiceTCPSpreadAndKeep(t *testing.T) {
	tp := newSvcTopo(t)
	d := openSvcTest(t, tp)
	tp.serveTCP(t, 8080)
	if err := d.SyncServices(tp.table(testVIP, service.TCP, 0, 1, 2)); err != nil {
		t.Fatalf("SyncServices: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	counts := make([]int, 3)
	for n := range 300 {
		c, err := tp.dial(t, "tcp", testVIP)
		if err != nil {
			t.Fatalf("connection %d to the VIP: %v", n, err)
		}
		i, from, err := greeting(c)
		if err != nil {
			c.Close()
			t.Fatalf("connection %d: %v", n, err)
		}
		if ap := netip.MustParseAddrPort(from); ap.Addr() != tp.clientIP {
			t.Fatalf("backend %d saw the client as %s, want %s (client address kept)", i, from, tp.clientIP)
		}
		if got := netip.MustParseAddrPort(c.RemoteAddr().String()); got != testVIP {
			t.Fatalf("getpeername = %s, want the VIP %s", got, testVIP)
		}
		counts[i]++
		c.Close()
	}
	t.Logf("300 connections per backend: %v", counts)
	for i, n := range counts {
		if n < 50 {
			t.Errorf("backend %d got %d of 300 connections (want about 100)", i, n)
		}
	}
	// The monitor shows VIP and backend.
	select {
	case ev := <-events:
		if ev.Service == nil || ev.Service.VIP != testVIP || ev.Reason != ReasonForwarded {
			t.Errorf("first event %+v, want a service translation of %s", ev, testVIP)
		}
		if !slicesContains(tp.beIPs, ev.Dst.Addr()) || ev.Dst.Port() != 8080 {
			t.Errorf("translation event dst %s, want a backend :8080", ev.Dst)
		}
	case <-time.After(2 * time.Second):
		t.Error("no translation event")
	}

	// Long-lived connections, at least one to each backend.
	var conns []net.Conn
	owner := map[net.Conn]int{}
	have := map[int]bool{}
	for n := 0; n < 60 && len(have) < 3; n++ {
		c, err := tp.dial(t, "tcp", testVIP)
		if err != nil {
			t.Fatal(err)
		}
		i, _, err := greeting(c)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		owner[c] = i
		have[i] = true
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if len(have) < 3 {
		t.Fatalf("60 connections reached only backends %v", have)
	}
	// Backend 0 leaves.
	if err := d.SyncServices(tp.table(testVIP, service.TCP, 1, 2)); err != nil {
		t.Fatalf("SyncServices without backend 0: %v", err)
	}
	for _, c := range conns {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatalf("established connection to backend %d broke: %v", owner[c], err)
		}
		buf := make([]byte, 4)
		if _, err := c.Read(buf); err != nil || string(buf) != "ping" {
			t.Fatalf("established connection to backend %d: echo %q, %v (a moved connection would be reset)", owner[c], buf, err)
		}
	}
	// New connections avoid backend 0.
	for n := range 60 {
		c, err := tp.dial(t, "tcp", testVIP)
		if err != nil {
			t.Fatalf("connection %d after removal: %v", n, err)
		}
		i, _, err := greeting(c)
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			t.Fatalf("connection %d after backend 0 left reached it", n)
		}
	}
}

func slicesContains(s []netip.Addr, a netip.Addr) bool {
	for _, x := range s {
		if x == a {
			return true
		}
	}
	return false
}

// TestServiceUDP: request/response through the VIP; replies come from the
// VIP (unconnected socket: recvmsg translation) and a connected socket's
// peer is the VIP.
func TestServiceUDP(t *testing.T) {
	tp := newSvcTopo(t)
	d := openSvcTest(t, tp)
	tp.serveUDP(t, 8080)
	vip := netip.MustParseAddrPort("10.96.0.11:53")
	if err := d.SyncServices(tp.table(vip, service.UDP, 0, 1, 2)); err != nil {
		t.Fatal(err)
	}
	var pc net.PacketConn
	inCgroup(t, tp.cgroup, func() {
		inNS(t, tp.client, func() {
			var err error
			pc, err = net.ListenPacket("udp4", "0.0.0.0:0")
			if err != nil {
				t.Fatal(err)
			}
		})
	})
	defer pc.Close()
	buf := make([]byte, 2048)
	for n := range 5 {
		if _, err := pc.WriteTo([]byte("hello"), net.UDPAddrFromAddrPort(vip)); err != nil {
			t.Fatalf("send %d: %v", n, err)
		}
		pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		m, from, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("reply %d: %v", n, err)
		}
		if got := from.(*net.UDPAddr).AddrPort(); netip.AddrPortFrom(got.Addr().Unmap(), got.Port()) != vip {
			t.Fatalf("reply %d came from %s, want the VIP %s", n, from, vip)
		}
		var i int
		var seen string
		if _, err := fmt.Sscanf(string(buf[:m]), "%d %s hello", &i, &seen); err != nil {
			t.Fatalf("reply %q: %v", buf[:m], err)
		}
		if netip.MustParseAddrPort(seen).Addr() != tp.clientIP {
			t.Fatalf("backend saw the client as %s, want %s", seen, tp.clientIP)
		}
	}
	// Connected UDP.
	c, err := tp.dial(t, "udp", vip)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := netip.MustParseAddrPort(c.RemoteAddr().String()); got != vip {
		t.Errorf("connected UDP peer %s, want the VIP %s", got, vip)
	}
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(buf); err != nil {
		t.Fatalf("connected UDP reply: %v", err)
	}
}

// TestServiceNoBackend: a VIP without an active backend refuses connect()
// at once, with a "no service backend" drop event.
func TestServiceNoBackend(t *testing.T) {
	tp := newSvcTopo(t)
	d := openSvcTest(t, tp)
	tb := tp.table(testVIP, service.TCP, 0)
	tb.Services[0].Backends[0].State = service.StateCritical
	if err := d.SyncServices(tb); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c, err := tp.dial(t, "tcp", testVIP)
	took := time.Since(start)
	if err == nil {
		c.Close()
		t.Fatal("connect to a VIP without backends succeeded")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.EPERM) {
		t.Errorf("connect error %v, want ECONNREFUSED (or EPERM before 5.18)", err)
	}
	if took > time.Second {
		t.Errorf("refusal took %v (want immediate)", took)
	}
	t.Logf("connect without backends: %v after %v", err, took)
	deadline := time.After(2 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Reason == DropNoSvcBackend && ev.Verdict == Dropped && ev.Service != nil && ev.Service.VIP == testVIP {
				ms, _ := d.Metrics()
				t.Logf("event %+v; metrics %+v", ev, ms)
				return
			}
		case <-deadline:
			t.Fatal("no drop event with reason \"no service backend\"")
		}
	}
}

// TestServiceIPv6: an IPv6 VIP balances over IPv6 backends (connect6,
// getpeername6).
func TestServiceIPv6(t *testing.T) {
	tp := newSvcTopo(t)
	d := openSvcTest(t, tp)
	tp.serveTCP(t, 8080)
	vip := netip.MustParseAddrPort("[fd96::10]:80")
	s := service.Service{Name: "web6", Frontend: service.Frontend{VIP: vip.Addr(), Port: vip.Port(), Proto: service.TCP}}
	for _, a := range tp.beIP6s {
		s.Backends = append(s.Backends, service.Backend{Addr: a, Port: 8080, State: service.StateActive})
	}
	if err := d.SyncServices(service.Table{Services: []service.Service{s}}); err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for n := range 60 {
		var c net.Conn
		var err error
		for try := 0; try < 3; try++ { // the first may wait for neighbour discovery
			if c, err = tp.dial(t, "tcp", vip); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("IPv6 connection %d to the VIP: %v", n, err)
		}
		i, from, err := greeting(c)
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		if got := netip.MustParseAddrPort(c.RemoteAddr().String()); got != vip {
			t.Fatalf("getpeername = %s, want %s", got, vip)
		}
		if a := netip.MustParseAddrPort(from).Addr(); a != netip.MustParseAddr("fd21:10::2") {
			t.Fatalf("backend saw the client as %s", from)
		}
		seen[i] = true
		c.Close()
	}
	if len(seen) != 3 {
		t.Errorf("60 IPv6 connections reached backends %v, want all three", seen)
	}
}
