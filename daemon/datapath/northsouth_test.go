package datapath

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/internal/testenv"
)

// nsTopo is one host with an uplink to a client outside (the router's side
// of a top-of-rack link, where clients of a VIP come from) and three
// endpoints behind it:
//
//	client (10.212.0.2) =rwnsup= host (10.212.0.1) = b0 (10.213.0.2), b1 (10.213.1.2), b2 (10.213.2.2)
//
// The client routes everything through the host, as a router that learned
// the VIP from the host would.
type nsTopo struct {
	host, client string
	backends     []string
	beIPs        []netip.Addr
	beIP6s       []netip.Addr
	clientIP     netip.Addr
	clientIP6    netip.Addr
	hostIP       netip.Addr
	d            *Datapath
}

var (
	nsVIP       = netip.MustParseAddr("10.96.50.10")
	nsTCPVIP    = netip.AddrPortFrom(nsVIP, 80)
	nsUDPVIP    = netip.AddrPortFrom(nsVIP, 53)
	nsRemoteVIP = netip.AddrPortFrom(nsVIP, 81) // only a backend on another host
	nsTCPVIP6   = netip.MustParseAddrPort("[fd96:50::10]:80")
)

func newNSTopo(t *testing.T, hostRouting string) *nsTopo {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "ping")
	id := fmt.Sprintf("%d_%d", os.Getpid()%100000, pinSeq.Add(1))
	tp := &nsTopo{host: "rwns_h" + id, client: "rwns_c" + id,
		clientIP: netip.MustParseAddr("10.212.0.2"), hostIP: netip.MustParseAddr("10.212.0.1"),
		clientIP6: netip.MustParseAddr("fd22:ff::2")}
	for i := range 3 {
		tp.backends = append(tp.backends, fmt.Sprintf("rwns_b%d_%s", i, id))
		tp.beIPs = append(tp.beIPs, netip.MustParseAddr(fmt.Sprintf("10.213.%d.2", i)))
		tp.beIP6s = append(tp.beIP6s, netip.MustParseAddr(fmt.Sprintf("fd22:%d::2", i)))
	}
	for _, ns := range append([]string{tp.host, tp.client}, tp.backends...) {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	for i, ns := range tp.backends {
		endpointVeth(t, tp.host, ns, fmt.Sprintf("rwnsb%d", i), fmt.Sprintf("10.213.%d", i), fmt.Sprintf("fd22:%d:", i))
	}
	sh(t, "ip", "-n", tp.host, "link", "add", "rwnsup", "type", "veth", "peer", "name", "eth0", "netns", tp.client)
	sh(t, "ip", "-n", tp.host, "addr", "add", "10.212.0.1/24", "dev", "rwnsup")
	sh(t, "ip", "-n", tp.host, "link", "set", "rwnsup", "up")
	sh(t, "ip", "-n", tp.client, "addr", "add", "10.212.0.2/24", "dev", "eth0")
	sh(t, "ip", "-n", tp.client, "link", "set", "eth0", "up")
	sh(t, "ip", "-n", tp.client, "route", "add", "default", "via", "10.212.0.1")
	sh(t, "ip", "-n", tp.host, "addr", "add", "fd22:ff::1/64", "dev", "rwnsup", "nodad")
	sh(t, "ip", "-n", tp.client, "addr", "add", "fd22:ff::2/64", "dev", "eth0", "nodad")
	sh(t, "ip", "-n", tp.client, "-6", "route", "add", "default", "via", "fd22:ff::1")
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

	pin := filepath.Join("/sys/fs/bpf", "rwns_"+id)
	t.Cleanup(func() { os.RemoveAll(pin) })
	tp.d = openTest(t, Options{PinDir: pin, HostRouting: hostRouting, ServiceMaxEntries: 1024, ServiceBackendMaxEntries: 1024})
	if mode, why := tp.d.HostRouting(); mode != hostRouting {
		t.Fatalf("HostRouting() = %q (%s), want %q", mode, why, hostRouting)
	}
	tp.d.SetNorthSouth(true)
	for i, ns := range tp.backends {
		hostIf := fmt.Sprintf("rwnsb%d", i)
		spec := EndpointSpec{ID: uint16(301 + i), IfIndex: ifIndexIn(t, tp.host, hostIf), IPs: []netip.Addr{tp.beIPs[i], tp.beIP6s[i]},
			Identity: uint32(70301 + i), MAC: macOf(t, ns, "eth0"), NodeMAC: macOf(t, tp.host, hostIf)}
		inNS(t, tp.host, func() {
			if err := tp.d.AttachEndpoint(spec); err != nil {
				t.Fatalf("AttachEndpoint(%+v) = %v", spec, err)
			}
		})
		t.Cleanup(func() { inNS(t, tp.host, func() { tp.d.DetachEndpoint(spec.ID, spec.IfIndex) }) })
		for _, ip := range spec.IPs {
			if err := tp.d.UpsertIPCache(netip.PrefixFrom(ip, ip.BitLen()), spec.Identity, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
		}
		if err := tp.d.SetPolicy(spec.ID, OpenEntries()); err != nil {
			t.Fatal(err)
		}
	}
	inNS(t, tp.host, func() {
		if err := tp.d.SetUplinks([]string{"rwnsup"}); err != nil {
			t.Fatalf("SetUplinks(rwnsup) = %v", err)
		}
	})
	t.Cleanup(func() { inNS(t, tp.host, func() { tp.d.SetUplinks(nil) }) })
	if on, why := tp.d.NorthSouth(); !on {
		t.Fatalf("NorthSouth() = off (%s), want on", why)
	}
	if !(&topo{}).pingRetry(t, tp.client, tp.hostIP, 3) {
		t.Fatal("the client cannot reach the host")
	}
	return tp
}

// table: VIP:80/tcp and VIP:53/udp on b0, b1 (this host) and 10.213.9.2
// (another host); VIP:81/tcp only on that other host; [VIP6]:80/tcp on b0
// and b1. withB2 adds b2 as a local backend of VIP:80.
func (tp *nsTopo) table(withB2 bool) service.Table {
	remote := service.Backend{Addr: netip.MustParseAddr("10.213.9.2"), Port: 8080, Node: "other", State: service.StateActive, Source: service.SourceConfig}
	mk := func(name string, f netip.AddrPort, proto service.Proto, port uint16, bes ...int) service.Service {
		s := service.Service{Name: name, Frontend: service.Frontend{VIP: f.Addr(), Port: f.Port(), Proto: proto}, Source: service.SourceConfig}
		for _, i := range bes {
			s.Backends = append(s.Backends, service.Backend{Addr: tp.beIPs[i], Port: port, State: service.StateActive, Local: true, Source: service.SourceConfig})
		}
		r := remote
		r.Port = port
		s.Backends = append(s.Backends, r)
		return s
	}
	web := []int{0, 1}
	if withB2 {
		web = append(web, 2)
	}
	web6 := service.Service{Name: "web6", Frontend: service.Frontend{VIP: nsTCPVIP6.Addr(), Port: 80, Proto: service.TCP}, Source: service.SourceConfig}
	for _, i := range []int{0, 1} {
		web6.Backends = append(web6.Backends, service.Backend{Addr: tp.beIP6s[i], Port: 8080, State: service.StateActive, Local: true, Source: service.SourceConfig})
	}
	return service.Table{Services: []service.Service{
		mk("dns", nsUDPVIP, service.UDP, 5353, 0, 1),
		mk("web", nsTCPVIP, service.TCP, 8080, web...),
		mk("remote", nsRemoteVIP, service.TCP, 8080),
		web6,
	}}
}

// serve runs svcTopo's servers in the backends (TCP 8080: greeting with
// the backend's index and the peer it accepted, then echo; UDP 5353: the
// same as a prefix of the answer) and a greeting server of the host on its
// uplink address (index -1), for non-VIP traffic.
func (tp *nsTopo) serve(t *testing.T) {
	t.Helper()
	st := &svcTopo{backends: tp.backends, beIPs: tp.beIPs}
	st.serveTCP(t, 8080)
	st.serveUDP(t, 5353)
	var ln net.Listener
	inNS(t, tp.host, func() {
		var err error
		if ln, err = net.Listen("tcp", tp.hostIP.String()+":2222"); err != nil {
			t.Fatalf("listen in %s: %v", tp.host, err)
		}
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "-1 %s\n", c.RemoteAddr())
			c.Close()
		}
	}()
}

func (tp *nsTopo) dial(t *testing.T, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	var err error
	inNS(t, tp.client, func() { c, err = net.DialTimeout("tcp", dst.String(), timeout) })
	return c, err
}

// TestNorthSouthBalancing: clients outside the cluster reach a service VIP
// through the host's uplink (as the top-of-rack router sends them once the
// host announces the VIP). In both host routing modes: 60 TCP connections
// spread over the two local backends (never the backend on another host),
// each backend sees the client's own address, the client sees VIP:port
// answer (the handshake completes only if replies are translated back); a
// connection keeps its backend when the service's backends change; UDP
// request/response answers from VIP:port; a VIP whose backends are all on
// other hosts drops, counted as "no service backend"; the host's own
// traffic on the uplink is untouched.
func TestNorthSouthBalancing(t *testing.T) {
	for _, mode := range []string{HostRoutingBPF, HostRoutingLegacy} {
		t.Run(mode, func(t *testing.T) {
			if mode == HostRoutingBPF && !probeFeatures().HostRouting {
				testenv.Missing(t, "a kernel with bpf_fib_lookup, bpf_redirect_peer and bpf_check_mtu (5.12+)")
			}
			testNorthSouth(t, mode)
		})
	}
}

func testNorthSouth(t *testing.T, mode string) {
	tp := newNSTopo(t, mode)
	tp.serve(t)
	if err := tp.d.SyncServices(tp.table(false)); err != nil {
		t.Fatal(err)
	}
	svcs, err := tp.d.Services()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		want := 2
		if s.Frontend.Port == nsRemoteVIP.Port() {
			want = 0
		}
		if len(s.Local) != want {
			t.Errorf("Services(): %s has local backends %v, want %d", s.Frontend, s.Local, want)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := tp.d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// 60 connections: both local backends, the client's address, VIP:80.
	const conns = 60
	per := map[int]int{}
	var kept []net.Conn
	var keptBE []int
	failed := 0
	for n := range conns {
		c, err := tp.dial(t, nsTCPVIP, 2*time.Second)
		if err != nil {
			failed++
			if failed == 1 {
				t.Errorf("connection %d to %s: %v", n, nsTCPVIP, err)
			}
			continue
		}
		i, from, err := greeting(c)
		if err != nil {
			t.Errorf("connection %d: %v", n, err)
			c.Close()
			continue
		}
		if got := c.RemoteAddr().String(); got != nsTCPVIP.String() {
			t.Errorf("connection %d: client's peer is %s, want the VIP %s", n, got, nsTCPVIP)
		}
		if ap, err := netip.ParseAddrPort(from); err != nil || ap.Addr() != tp.clientIP || ap.Port() != netip.MustParseAddrPort(c.LocalAddr().String()).Port() {
			t.Errorf("connection %d: backend %d saw peer %s, want the client's own %s", n, i, from, c.LocalAddr())
		}
		per[i]++
		if n%3 == 0 {
			kept, keptBE = append(kept, c), append(keptBE, i)
		} else {
			c.Close()
		}
	}
	t.Logf("%s: %d of %d connections answered from the VIP; per backend %v", mode, conns-failed, conns, per)
	if failed > 0 {
		t.Fatalf("%d of %d connections to %s failed", failed, conns, nsTCPVIP)
	}
	if per[0] == 0 || per[1] == 0 || per[2] != 0 || len(per) != 2 {
		t.Errorf("connections per backend = %v, want both local backends (0, 1) and nothing else", per)
	}

	// Every kept connection keeps its backend when b2 joins the service.
	if err := tp.d.SyncServices(tp.table(true)); err != nil {
		t.Fatal(err)
	}
	for j, c := range kept {
		msg := fmt.Sprintf("still %d\n", keptBE[j])
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Errorf("kept connection %d (backend %d): write: %v", j, keptBE[j], err)
			continue
		}
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != msg {
			t.Errorf("kept connection %d (backend %d) after the backends changed: echo %q, %v; want %q", j, keptBE[j], line, err, msg)
		}
		c.Close()
	}
	// New connections now reach b2 as well.
	per2 := map[int]int{}
	for range 30 {
		c, err := tp.dial(t, nsTCPVIP, 2*time.Second)
		if err != nil {
			t.Fatalf("connection after the change: %v", err)
		}
		i, _, err := greeting(c)
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		per2[i]++
	}
	if per2[2] == 0 {
		t.Errorf("after b2 joined, 30 connections per backend = %v, want b2 among them", per2)
	}

	// IPv6: both local backends, the client's own address, the VIP.
	per6 := map[int]int{}
	for n := range 20 {
		c, err := tp.dial(t, nsTCPVIP6, 2*time.Second)
		if err != nil {
			t.Fatalf("IPv6 connection %d to %s: %v", n, nsTCPVIP6, err)
		}
		i, from, err := greeting(c)
		if err != nil {
			t.Fatalf("IPv6 connection %d: %v", n, err)
		}
		if got := c.RemoteAddr().String(); got != nsTCPVIP6.String() {
			t.Errorf("IPv6 connection %d: client's peer is %s, want the VIP %s", n, got, nsTCPVIP6)
		}
		if ap, err := netip.ParseAddrPort(from); err != nil || ap.Addr() != tp.clientIP6 {
			t.Errorf("IPv6 connection %d: backend %d saw peer %s, want the client's own %s", n, i, from, tp.clientIP6)
		}
		c.Close()
		per6[i]++
	}
	if per6[0] == 0 || per6[1] == 0 || len(per6) != 2 {
		t.Errorf("IPv6 connections per backend = %v, want both local backends (0, 1)", per6)
	}

	// UDP request/response: answered from VIP:53, the backend saw the client.
	var pc net.PacketConn
	inNS(t, tp.client, func() { pc, err = net.ListenPacket("udp", tp.clientIP.String()+":0") })
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	udpPer := map[int]int{}
	for n := range 10 {
		var reply []byte
		var from net.Addr
		for try := 0; try < 3 && reply == nil; try++ {
			pc.WriteTo([]byte(fmt.Sprintf("q%d", n)), net.UDPAddrFromAddrPort(nsUDPVIP))
			buf := make([]byte, 512)
			pc.SetReadDeadline(time.Now().Add(time.Second))
			m, f, err := pc.ReadFrom(buf)
			if err == nil {
				reply, from = buf[:m], f
			}
		}
		if reply == nil {
			t.Fatalf("UDP request %d to %s: no answer", n, nsUDPVIP)
		}
		if from.String() != nsUDPVIP.String() {
			t.Errorf("UDP answer %d from %s, want the VIP %s", n, from, nsUDPVIP)
		}
		var i int
		var peer, q string
		if _, err := fmt.Sscanf(string(reply), "%d %s %s", &i, &peer, &q); err != nil || peer != pc.LocalAddr().String() || q != fmt.Sprintf("q%d", n) {
			t.Errorf("UDP answer %q: want \"<backend> %s q%d\"", reply, pc.LocalAddr(), n)
		}
		udpPer[i]++
	}
	if len(udpPer) != 1 {
		t.Errorf("one UDP flow answered by backends %v, want one backend for every datagram", udpPer)
	}

	// No local backend: dropped on the uplink, counted, never a hang.
	before := metricCount(t, tp.d, DropNoSvcBackend, Ingress)
	if c, err := tp.dial(t, nsRemoteVIP, time.Second); err == nil {
		c.Close()
		t.Errorf("connection to %s (backends only on other hosts) succeeded, want it dropped", nsRemoteVIP)
	}
	if after := metricCount(t, tp.d, DropNoSvcBackend, Ingress); after <= before {
		t.Errorf("no service backend (ingress) = %d after a connection to %s, was %d: want it counted", after, nsRemoteVIP, before)
	}

	// The host's own traffic on the uplink: untouched.
	if !(&topo{}).pingRetry(t, tp.client, tp.hostIP, 3) {
		t.Error("ping from the client to the host's uplink address fails")
	}
	c, err := tp.dial(t, netip.AddrPortFrom(tp.hostIP, 2222), 2*time.Second)
	if err != nil {
		t.Fatalf("TCP to the host's own %s:2222: %v", tp.hostIP, err)
	}
	if i, _, err := greeting(c); err != nil || i != -1 {
		t.Errorf("host's own service answered %d, %v; want the host (-1)", i, err)
	}
	c.Close()

	// Counters and the monitor show the translation with its VIP.
	cs := map[HostRoutingSlot]uint64{}
	hc, err := tp.d.HostRoutingCounters()
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range hc {
		cs[x.Slot] = x.Packets
	}
	if cs[HRSvcNewFlow] < conns || cs[HRSvcTranslated] < cs[HRSvcNewFlow] || cs[HRSvcReply] < conns {
		t.Errorf("north-south counters: new flows %d, translated %d, replies %d; want >= %d flows and replies",
			cs[HRSvcNewFlow], cs[HRSvcTranslated], cs[HRSvcReply], conns)
	}
	var sawFwd, sawDrop bool
	deadline := time.After(5 * time.Second)
	for !(sawFwd && sawDrop) {
		select {
		case ev := <-events:
			if ev.Service == nil || ev.Direction != Ingress {
				continue
			}
			switch {
			case ev.Service.VIP == nsTCPVIP && ev.Verdict == Forwarded && ev.Src.Addr() == tp.clientIP:
				sawFwd = true
			case ev.Service.VIP == nsRemoteVIP && ev.Verdict == Dropped && ev.Reason == DropNoSvcBackend:
				sawDrop = true
			}
		case <-deadline:
			t.Fatalf("events: translation to a backend of %s seen %v, drop of %s seen %v; want both", nsTCPVIP, sawFwd, nsRemoteVIP, sawDrop)
		}
	}
}

// TestUplinkEndpointBeforeFrontend: rw_from_uplink looks the destination up
// among the local endpoints before it asks the balancer, so a packet for an
// endpoint never pays the rw_services lookup. The agent refuses a VIP
// inside the workload CIDRs, where every endpoint's address lies; written
// into the datapath directly, a frontend on an endpoint's own address and
// port must not take that endpoint's traffic: it still reaches the
// endpoint, untranslated.
func TestUplinkEndpointBeforeFrontend(t *testing.T) {
	if !probeFeatures().HostRouting {
		testenv.Missing(t, "a kernel with bpf_fib_lookup, bpf_redirect_peer and bpf_check_mtu (5.12+)")
	}
	tp := newNSTopo(t, HostRoutingBPF)
	tp.serve(t)
	tb := tp.table(false)
	b0 := netip.AddrPortFrom(tp.beIPs[0], 8080)
	tb.Services = append(tb.Services, service.Service{
		Name:     "shadow",
		Frontend: service.Frontend{VIP: b0.Addr(), Port: b0.Port(), Proto: service.TCP},
		Source:   service.SourceConfig,
		Backends: []service.Backend{{Addr: tp.beIPs[1], Port: 8080, State: service.StateActive, Local: true, Source: service.SourceConfig}},
	})
	if err := tp.d.SyncServices(tb); err != nil {
		t.Fatal(err)
	}
	for n := range 5 {
		c, err := tp.dial(t, b0, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d to b0 at %s: %v", n, b0, err)
		}
		i, _, err := greeting(c)
		c.Close()
		if err != nil || i != 0 {
			t.Errorf("connection %d to b0 at %s: answered by backend %d (%v), want b0 itself, untranslated", n, b0, i, err)
		}
	}
}
