package datapath

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/rackwire/rackwire/internal/testenv"
)

// crossHost is two hosts, each a network namespace with one endpoint
// namespace behind a veth, routed through a router namespace over their
// uplinks (veths named "rwhup"):
//
//	e1 (10.211.1.2, fd21:1::2) = h1 =up= r =up= h2 = e2 (10.211.2.2, fd21:2::2)
//	    h1 up 10.210.1.1/24, fd21:a::1/64      h2 up 10.210.2.1/24, fd21:b::1/64
//
// Each host runs its own Datapath (own pin directory) with both endpoints
// in its ipcache.
type crossHost struct {
	h1, h2, r, e1, e2   string // namespaces
	ep1, ep2            string // host-side veths of e1 (in h1) and e2 (in h2)
	if1, if2            int
	e1v4, e1v6          netip.Addr
	e2v4, e2v6          netip.Addr
	up1v4, up1v6        netip.Addr // h1's uplink address
	up2v4, up2v6        netip.Addr
	d1, d2              *Datapath
	id1, id2            uint16
	ident1, ident2      uint32
	to2, to1            *topo // e1 -> e2 and e2 -> e1, for the traffic helpers
	pin1, pin2          string
	legacy              bool
	attach, hostRouting string
}

// rwhPinDir is a pin directory named with this file's rwh prefix.
func rwhPinDir(t *testing.T) string {
	dir := filepath.Join("/sys/fs/bpf", fmt.Sprintf("rwh_%d_%d", os.Getpid(), pinSeq.Add(1)))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func newCrossHost(t *testing.T, attach, hostRouting string) *crossHost {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "ping")
	testenv.RequireCommand(t, "nft")
	id := fmt.Sprintf("%d_%d", os.Getpid()%100000, pinSeq.Add(1))
	c := &crossHost{
		h1: "rwh_h1_" + id, h2: "rwh_h2_" + id, r: "rwh_r_" + id, e1: "rwh_e1_" + id, e2: "rwh_e2_" + id,
		ep1: "rwhep1", ep2: "rwhep2",
		e1v4: netip.MustParseAddr("10.211.1.2"), e1v6: netip.MustParseAddr("fd21:1::2"),
		e2v4: netip.MustParseAddr("10.211.2.2"), e2v6: netip.MustParseAddr("fd21:2::2"),
		up1v4: netip.MustParseAddr("10.210.1.1"), up1v6: netip.MustParseAddr("fd21:a::1"),
		up2v4: netip.MustParseAddr("10.210.2.1"), up2v6: netip.MustParseAddr("fd21:b::1"),
		id1: 121, id2: 122, ident1: 70121, ident2: 70122,
		attach: attach, hostRouting: hostRouting,
	}
	for _, ns := range []string{c.h1, c.h2, c.r, c.e1, c.e2} {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
		sh(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	// Endpoints behind their hosts.
	for _, s := range []struct{ host, ep, hostIf, sub, sub6 string }{
		{c.h1, c.e1, c.ep1, "10.211.1", "fd21:1:"}, {c.h2, c.e2, c.ep2, "10.211.2", "fd21:2:"},
	} {
		endpointVeth(t, s.host, s.ep, s.hostIf, s.sub, s.sub6)
	}
	// Uplinks to the router.
	for _, s := range []struct{ host, rIf, sub, sub6, epSub, epSub6 string }{
		{c.h1, "h1", "10.210.1", "fd21:a:", "10.211.1.0/24", "fd21:1::/64"},
		{c.h2, "h2", "10.210.2", "fd21:b:", "10.211.2.0/24", "fd21:2::/64"},
	} {
		sh(t, "ip", "-n", s.host, "link", "add", "rwhup", "type", "veth", "peer", "name", s.rIf, "netns", c.r)
		sh(t, "ip", "-n", s.host, "addr", "add", s.sub+".1/24", "dev", "rwhup")
		sh(t, "ip", "-n", s.host, "addr", "add", s.sub6+":1/64", "dev", "rwhup", "nodad")
		sh(t, "ip", "-n", s.host, "link", "set", "rwhup", "up")
		sh(t, "ip", "-n", c.r, "addr", "add", s.sub+".254/24", "dev", s.rIf)
		sh(t, "ip", "-n", c.r, "addr", "add", s.sub6+":fe/64", "dev", s.rIf, "nodad")
		sh(t, "ip", "-n", c.r, "link", "set", s.rIf, "up")
		sh(t, "ip", "-n", s.host, "route", "add", "default", "via", s.sub+".254")
		sh(t, "ip", "-n", s.host, "-6", "route", "add", "default", "via", s.sub6+":fe")
		sh(t, "ip", "-n", c.r, "route", "add", s.epSub, "via", s.sub+".1")
		sh(t, "ip", "-n", c.r, "-6", "route", "add", s.epSub6, "via", s.sub6+":1")
	}
	for _, ns := range []string{c.h1, c.h2, c.r} {
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	}
	c.if1 = ifIndexIn(t, c.h1, c.ep1)
	c.if2 = ifIndexIn(t, c.h2, c.ep2)
	c.to2 = &topo{host: c.h1, a: c.e1, b: c.e2}
	c.to1 = &topo{host: c.h2, a: c.e2, b: c.e1}

	c.pin1, c.pin2 = rwhPinDir(t), rwhPinDir(t)
	c.d1 = openTest(t, Options{PinDir: c.pin1, Attach: attach, HostRouting: hostRouting})
	c.d2 = openTest(t, Options{PinDir: c.pin2, Attach: attach, HostRouting: hostRouting})
	mode, why := c.d1.HostRouting()
	if hostRouting == HostRoutingBPF && mode != HostRoutingBPF {
		t.Fatalf("HostRouting() = %q (%s), want bpf", mode, why)
	}
	c.legacy = mode == HostRoutingLegacy
	for _, h := range []struct {
		d         *Datapath
		host, ep  string
		hostIf    string
		ifindex   int
		id        uint16
		ident     uint32
		ips       []netip.Addr
		pin       string
		otherNS   string
		otherHIf  string
		otherIPs  []netip.Addr
		otherID   uint32
		otherHost string
	}{
		{c.d1, c.h1, c.e1, c.ep1, c.if1, c.id1, c.ident1, []netip.Addr{c.e1v4, c.e1v6}, c.pin1, c.e2, c.ep2, []netip.Addr{c.e2v4, c.e2v6}, c.ident2, c.h2},
		{c.d2, c.h2, c.e2, c.ep2, c.if2, c.id2, c.ident2, []netip.Addr{c.e2v4, c.e2v6}, c.pin2, c.e1, c.ep1, []netip.Addr{c.e1v4, c.e1v6}, c.ident1, c.h1},
	} {
		spec := EndpointSpec{ID: h.id, IfIndex: h.ifindex, IPs: h.ips, Identity: h.ident,
			MAC: macOf(t, h.ep, "eth0"), NodeMAC: macOf(t, h.host, h.hostIf)}
		inNS(t, h.host, func() {
			if err := h.d.AttachEndpoint(spec); err != nil {
				t.Fatalf("AttachEndpoint(%+v) = %v", spec, err)
			}
			if err := h.d.SetUplinks([]string{"rwhup"}); err != nil {
				t.Fatalf("SetUplinks(rwhup) = %v", err)
			}
		})
		d, host, id, ifindex := h.d, h.host, h.id, h.ifindex
		t.Cleanup(func() {
			inNS(t, host, func() {
				d.SetUplinks(nil)
				d.DetachEndpoint(id, ifindex)
			})
		})
		for _, ip := range h.ips {
			if err := h.d.UpsertIPCache(netip.PrefixFrom(ip, ip.BitLen()), h.ident, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
		}
		for _, ip := range h.otherIPs {
			if err := h.d.UpsertIPCache(netip.PrefixFrom(ip, ip.BitLen()), h.otherID, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.d.SetPolicy(h.id, OpenEntries()); err != nil {
			t.Fatal(err)
		}
	}
	// The hosts know their router (as hosts that talk BGP to their ToR do):
	// the fast path needs the next hop's neighbour entry.
	for _, h := range []struct {
		ns  string
		gws []string
	}{{c.h1, []string{"10.210.1.254", "fd21:a::fe"}}, {c.h2, []string{"10.210.2.254", "fd21:b::fe"}}} {
		for _, gw := range h.gws {
			if !(&topo{}).pingRetry(t, h.ns, netip.MustParseAddr(gw), 3) {
				t.Fatalf("%s cannot reach its router %s", h.ns, gw)
			}
		}
	}
	return c
}

func ifIndexIn(t *testing.T, ns, name string) int {
	t.Helper()
	var idx int
	inNS(t, ns, func() {
		ifc, err := net.InterfaceByName(name)
		if err != nil {
			t.Fatalf("%s in %s: %v", name, ns, err)
		}
		idx = ifc.Index
	})
	return idx
}

// blockForwarding makes the host stacks of both hosts unable to forward
// anything (a netfilter FORWARD chain that drops, IPv4 and IPv6), so only
// the fast path can carry traffic between endpoint and uplink. (Not
// ip_forward=0: bpf_fib_lookup honours that switch and answers
// "forwarding disabled", and the fast path then leaves the packet to the
// stack; see TestHostRoutingHonoursForwardingOff.)
func (c *crossHost) blockForwarding(t *testing.T) {
	t.Helper()
	for _, ns := range []string{c.h1, c.h2} {
		sh(t, "ip", "netns", "exec", ns, "nft", "add table inet rwh; add chain inet rwh block { type filter hook forward priority 0; policy drop; }")
	}
}

func (c *crossHost) unblockForwarding(t *testing.T) {
	t.Helper()
	for _, ns := range []string{c.h1, c.h2} {
		sh(t, "ip", "netns", "exec", ns, "nft", "delete table inet rwh")
	}
}

// counters reads d's rw_hostrt counters (packets) by slot.
func (c *crossHost) counters(t *testing.T, d *Datapath) map[HostRoutingSlot]uint64 {
	t.Helper()
	cs, err := d.HostRoutingCounters()
	if err != nil {
		t.Fatal(err)
	}
	out := map[HostRoutingSlot]uint64{}
	for _, x := range cs {
		out[x.Slot] = x.Packets
	}
	return out
}

// TestHostRoutingTraffic sends real traffic between endpoints of two hosts
// whose host stacks cannot forward (FORWARD chains drop everything): with
// host routing "bpf" the fast path carries it both ways, IPv4 and IPv6,
// TCP, UDP and ICMP, replies included, and each receiver's ingress policy
// still decides by the sender's identity (from the ipcache). With host
// routing "legacy" (what main does) nothing crosses.
func TestHostRoutingTraffic(t *testing.T) {
	for _, c := range []struct{ attach, hostRouting string }{
		{AttachTCX, HostRoutingBPF}, {AttachTC, HostRoutingBPF}, {AttachTCX, HostRoutingLegacy},
	} {
		t.Run(c.attach+"/"+c.hostRouting, func(t *testing.T) {
			ch := newCrossHost(t, c.attach, c.hostRouting)
			if c.hostRouting == HostRoutingBPF && !ch.d1.Features().HostRouting {
				testenv.Missing(t, "a kernel with bpf_fib_lookup, bpf_redirect_peer and bpf_check_mtu (5.12+)")
			}
			ch.blockForwarding(t)
			dsts := []netip.Addr{ch.e2v4, ch.e2v6}
			srcs := []netip.Addr{ch.e1v4, ch.e1v6}
			if ch.legacy {
				n := 0
				for _, dst := range dsts {
					if ch.to2.ping(t, ch.e1, dst) {
						n++
					}
					if ch.to2.tcp(t, dst, 8080) {
						n++
					}
				}
				if n != 0 {
					t.Fatalf("legacy host routing with forwarding blocked: %d of 4 exchanges crossed, want 0", n)
				}
				if got := ch.d1.Uplinks(); len(got) != 0 {
					t.Errorf("legacy host routing attached uplinks %v", got)
				}
				return
			}
			for _, dst := range dsts {
				if !ch.to2.pingRetry(t, ch.e1, dst, 3) {
					t.Fatalf("ping e1->%v with open endpoints and the fast path failed; h1 %v h2 %v", dst,
						ch.counters(t, ch.d1), ch.counters(t, ch.d2))
				}
			}

			// e2 accepts TCP 8080 and UDP 5353 from e1's identity and TCP 7070
			// from another identity only; e1 accepts TCP 9090 from e2.
			// Both send anything; replies pass through CT.
			other := uint32(70999)
			if err := ch.d2.SetPolicy(ch.id2, []Entry{{Direction: Egress},
				{Identity: ch.ident1, Direction: Ingress, Proto: protoTCP, Port: 8080},
				{Identity: ch.ident1, Direction: Ingress, Proto: protoUDP, Port: 5353},
				{Identity: other, Direction: Ingress, Proto: protoTCP, Port: 7070}}); err != nil {
				t.Fatal(err)
			}
			if err := ch.d1.SetPolicy(ch.id1, []Entry{{Direction: Egress},
				{Identity: ch.ident2, Direction: Ingress, Proto: protoTCP, Port: 9090}}); err != nil {
				t.Fatal(err)
			}
			flushCT(t, ch.d1)
			flushCT(t, ch.d2)
			before1, before2 := ch.counters(t, ch.d1), ch.counters(t, ch.d2)
			for _, dst := range dsts {
				if !ch.to2.tcp(t, dst, 8080) {
					t.Errorf("TCP e1->%v:8080 (allowed) failed", dst)
				}
				if !ch.to2.udp(t, dst, 5353) {
					t.Errorf("UDP e1->%v:5353 (allowed) failed", dst)
				}
				if ch.to2.tcp(t, dst, 8081) {
					t.Errorf("TCP e1->%v:8081 (denied by e2's ingress) succeeded", dst)
				}
				if ch.to2.tcp(t, dst, 7070) {
					t.Errorf("TCP e1->%v:7070 (allowed for another identity only) succeeded", dst)
				}
				if ch.to2.ping(t, ch.e1, dst) {
					t.Errorf("ping e1->%v (denied by e2's ingress) succeeded", dst)
				}
			}
			for _, dst := range srcs {
				if !ch.to1.tcp(t, dst, 9090) {
					t.Errorf("TCP e2->%v:9090 (allowed) failed", dst)
				}
				if ch.to1.tcp(t, dst, 9091) {
					t.Errorf("TCP e2->%v:9091 (denied by e1's ingress) succeeded", dst)
				}
			}
			after1, after2 := ch.counters(t, ch.d1), ch.counters(t, ch.d2)
			for _, x := range []struct {
				name          string
				before, after map[HostRoutingSlot]uint64
				slot          HostRoutingSlot
			}{
				{"h1 egress", before1, after1, HREgressForwarded}, {"h1 ingress", before1, after1, HRIngressForwarded},
				{"h2 egress", before2, after2, HREgressForwarded}, {"h2 ingress", before2, after2, HRIngressForwarded},
			} {
				if x.after[x.slot] <= x.before[x.slot] {
					t.Errorf("%s: %v did not move (%d -> %d)", x.name, x.slot, x.before[x.slot], x.after[x.slot])
				}
			}
			// The denials are e2's ingress policy drops, with e1's identity.
			var denied int
			ms, err := ch.d2.Metrics()
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range ms {
				if m.Direction == Ingress && m.Reason == DropPolicyDenied {
					denied += int(m.Packets)
				}
			}
			if denied < 6 {
				t.Errorf("h2 counted %d ingress policy-denied packets, want at least 6 (TCP 8081, 7070, ping; IPv4 and IPv6)", denied)
			}
			t.Logf("h1 %v; h2 %v", after1, after2)
		})
	}
}

// TestHostRoutingFallbacks checks that what the fast path does not handle
// reaches the host stack, which answers as it would without rackwire:
// TTL 1 (time exceeded from the sender's host), a packet above the
// uplink's MTU (fragmentation needed / packet too big from the sender's
// host), an unknown neighbour (the stack resolves it, later packets take
// the fast path), host-destined traffic (answered by the hosts themselves).
// Forwarding is blocked in netfilter for the TTL and MTU cases: the stack
// sends those ICMP errors before its FORWARD hook. ICMP errors from the
// router (a smaller MTU behind it) come back through rw_from_uplink, so
// path MTU discovery works across the fast path.
func TestHostRoutingFallbacks(t *testing.T) {
	ch := newCrossHost(t, AttachTCX, HostRoutingBPF)
	ch.blockForwarding(t)
	ctrs := func(d *Datapath) map[HostRoutingSlot]uint64 { return ch.counters(t, d) }

	// TTL 1: time exceeded from h1's address on e1's veth.
	for _, x := range []struct {
		dst  netip.Addr
		want string
	}{{ch.e2v4, "Time to live exceeded"}, {ch.e2v6, "Time exceeded: Hop limit"}} {
		before := ctrs(ch.d1)
		out, _ := exec.Command("ip", "netns", "exec", ch.e1, "ping", "-c1", "-W1", "-t", "1", x.dst.String()).CombinedOutput()
		if !strings.Contains(string(out), x.want) {
			t.Errorf("ping -t 1 %v: no %q from h1:\n%s", x.dst, x.want, out)
		}
		if after := ctrs(ch.d1); after[HRStackTTL] <= before[HRStackTTL] {
			t.Errorf("ping -t 1 %v: %v did not move", x.dst, HRStackTTL)
		}
	}

	// Above the uplink's MTU: h2's uplink (both ends) carries 1400 bytes;
	// e2's DF packets of 1450 bytes get "fragmentation needed" from h2, and
	// so do packets of 1402 bytes, which bpf_fib_lookup's own check lets
	// through (it allows 4 bytes for a VLAN tag): the fast path's check
	// after the lookup must catch them.
	sh(t, "ip", "-n", ch.h2, "link", "set", "rwhup", "mtu", "1400")
	sh(t, "ip", "-n", ch.r, "link", "set", "h2", "mtu", "1400")
	for _, x := range []struct {
		dst  netip.Addr
		size string
		want string
	}{
		{ch.e1v4, "1422", "mtu = 1400"}, {ch.e1v6, "1402", "mtu=1400"},
		{ch.e1v4, "1374", "mtu = 1400"}, {ch.e1v6, "1354", "mtu=1400"},
	} {
		// Forget the path MTU the previous case taught e2.
		sh(t, "ip", "-n", ch.e2, "-4", "route", "flush", "cache")
		sh(t, "ip", "-n", ch.e2, "-6", "route", "flush", "cache")
		before := ctrs(ch.d2)
		out, _ := exec.Command("ip", "netns", "exec", ch.e2, "ping", "-c2", "-W1", "-M", "do", "-s", x.size, x.dst.String()).CombinedOutput()
		if !strings.Contains(strings.ToLower(string(out)), x.want) {
			t.Errorf("ping -M do -s %s %v from e2: no %q:\n%s", x.size, x.dst, x.want, out)
		}
		if after := ctrs(ch.d2); after[HRStackMTU] <= before[HRStackMTU] {
			t.Errorf("big ping %v: %v did not move on h2", x.dst, HRStackMTU)
		}
	}
	// PMTU across the fast path: e1 sends to e2 through h1's fast path; the
	// router reports the 1400-byte hop, its ICMP error comes back through
	// rw_from_uplink as related to e1's flow, TCP shrinks its segments.
	if err := ch.d2.SetPolicy(ch.id2, OpenEntries()); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []netip.Addr{ch.e2v4, ch.e2v6} {
		if err := pmtuTransfer(t, ch.e1, ch.e2, dst, 8090, 200000); err != nil {
			t.Errorf("TCP transfer e1->%v over a 1400-byte hop: %v", dst, err)
		}
	}

	// Host-destined: e1 reaches h2's uplink address (h2 answers itself;
	// rw_from_uplink leaves it alone) and h1's own (local, never forwarded).
	for _, dst := range []netip.Addr{ch.up2v4, ch.up2v6, ch.up1v4, ch.up1v6} {
		if !ch.to2.pingRetry(t, ch.e1, dst, 2) {
			t.Errorf("ping e1->%v (a host's own address) failed", dst)
		}
	}
	if got := ctrs(ch.d2)[HRStackNotLocal]; got == 0 {
		t.Errorf("h2: %v = 0 after pings to its own address", HRStackNotLocal)
	}
	if got := ctrs(ch.d1)[HRStackFIB]; got == 0 {
		t.Errorf("h1: %v = 0 after pings to its own address", HRStackFIB)
	}
	// The hosts still talk to each other over the uplinks.
	for _, dst := range []netip.Addr{ch.up2v4, ch.up2v6} {
		if !(&topo{}).pingRetry(t, ch.h1, dst, 2) {
			t.Errorf("ping h1->%v (host to host) failed with rw_from_uplink attached", dst)
		}
	}

	// Unknown neighbour: with h1's router entry gone, the first packet goes
	// to the stack (forwarding allowed again), which resolves it; later
	// packets take the fast path.
	ch.unblockForwarding(t)
	sh(t, "ip", "-n", ch.h1, "neigh", "flush", "dev", "rwhup")
	before := ctrs(ch.d1)
	if !ch.to2.pingRetry(t, ch.e1, ch.e2v4, 3) {
		t.Fatalf("ping e1->e2 after the neighbour flush failed")
	}
	mid := ctrs(ch.d1)
	if mid[HRStackNoNeigh] <= before[HRStackNoNeigh] {
		t.Errorf("h1: %v did not move after the neighbour flush (%d)", HRStackNoNeigh, mid[HRStackNoNeigh])
	}
	time.Sleep(100 * time.Millisecond)
	if !ch.to2.ping(t, ch.e1, ch.e2v4) {
		t.Fatalf("second ping e1->e2 failed")
	}
	if after := ctrs(ch.d1); after[HREgressForwarded] <= mid[HREgressForwarded] {
		t.Errorf("h1: the ping after neighbour resolution did not take the fast path")
	}
}

// TestHostRoutingHonoursForwardingOff: bpf_fib_lookup answers "forwarding
// disabled" where the endpoint's veth does not forward
// (net.ipv4.ip_forward=0, net.ipv6.conf.all.forwarding=0), so the fast path
// leaves such packets to the stack, which drops them as it did before: the
// operator's switch keeps its meaning.
func TestHostRoutingHonoursForwardingOff(t *testing.T) {
	ch := newCrossHost(t, AttachTCX, HostRoutingBPF)
	for _, ns := range []string{ch.h1, ch.h2} {
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
	}
	before := ch.counters(t, ch.d1)
	for _, dst := range []netip.Addr{ch.e2v4, ch.e2v6} {
		if ch.to2.ping(t, ch.e1, dst) {
			t.Errorf("ping e1->%v with forwarding off succeeded", dst)
		}
	}
	after := ch.counters(t, ch.d1)
	if after[HRStackFIB] < before[HRStackFIB]+2 {
		t.Errorf("h1: %v moved %d -> %d, want +2", HRStackFIB, before[HRStackFIB], after[HRStackFIB])
	}
	if after[HREgressForwarded] != before[HREgressForwarded] {
		t.Errorf("h1 forwarded %d packets with forwarding off", after[HREgressForwarded]-before[HREgressForwarded])
	}
}

// TestHostRoutingFollowsPolicyRules: the fast path asks the kernel's FIB
// with its policy rules, so a packet that an `ip rule` steers to another
// table takes that table's route, exactly as the stack would route it.
// Here h1 sends what e1 sends to e2's subnet to table 100, which prohibits
// it: with forwarding blocked in netfilter (only the fast path could
// deliver), e1 no longer reaches e2, the packets go to the stack (which
// refuses them by the rule's route); removing the rules restores the fast
// path, and h1's own loopback addresses (in its local table) stay
// reachable. A lookup of the main table only (BPF_FIB_LOOKUP_DIRECT) would
// forward the packets past the rule and send those for h1 to its router.
func TestHostRoutingFollowsPolicyRules(t *testing.T) {
	ch := newCrossHost(t, AttachTCX, HostRoutingBPF)
	if !ch.d1.Features().HostRouting {
		testenv.Missing(t, "a kernel with bpf_fib_lookup, bpf_redirect_peer and bpf_check_mtu (5.12+)")
	}
	ch.blockForwarding(t)
	dsts := []netip.Addr{ch.e2v4, ch.e2v6}
	for _, dst := range dsts {
		if !ch.to2.pingRetry(t, ch.e1, dst, 3) {
			t.Fatalf("ping e1->%v through the fast path failed before any rule", dst)
		}
	}
	rules := [][]string{
		{"-4", "rule", "add", "from", ch.e1v4.String(), "lookup", "100", "pref", "100"},
		{"-6", "rule", "add", "from", ch.e1v6.String(), "lookup", "100", "pref", "100"},
		{"-4", "route", "add", "prohibit", "10.211.2.0/24", "table", "100"},
		{"-6", "route", "add", "prohibit", "fd21:2::/64", "table", "100"},
	}
	for _, r := range rules {
		sh(t, append([]string{"ip", "-n", ch.h1}, r...)...)
	}
	before := ch.counters(t, ch.d1)
	for _, dst := range dsts {
		if ch.to2.ping(t, ch.e1, dst) {
			t.Errorf("ping e1->%v succeeded although h1's rule sends it to a table that prohibits it", dst)
		}
	}
	after := ch.counters(t, ch.d1)
	if got := after[HREgressForwarded] - before[HREgressForwarded]; got != 0 {
		t.Errorf("h1 forwarded %d packets past its policy rule (%v)", got, HREgressForwarded)
	}
	if after[HRStackFIB] < before[HRStackFIB]+2 {
		t.Errorf("h1: %v moved %d -> %d, want +2 (the FIB's prohibit answer leaves the packets to the stack)",
			HRStackFIB, before[HRStackFIB], after[HRStackFIB])
	}
	sh(t, "ip", "-n", ch.h1, "-4", "rule", "del", "pref", "100")
	sh(t, "ip", "-n", ch.h1, "-6", "rule", "del", "pref", "100")
	before = ch.counters(t, ch.d1)
	for _, dst := range dsts {
		if !ch.to2.pingRetry(t, ch.e1, dst, 3) {
			t.Errorf("ping e1->%v failed after the rules were removed", dst)
		}
	}
	if after := ch.counters(t, ch.d1); after[HREgressForwarded] <= before[HREgressForwarded] {
		t.Errorf("h1: %v did not move after the rules were removed", HREgressForwarded)
	}

	// Since a rule was added, h1's IPv4 local table stands apart from main
	// (IPv6 always has it apart): a loopback address of h1 and a range h1
	// takes as its own (`ip route add local`, which goes to the local
	// table) are only there. e1 still reaches them (the stack delivers them
	// to h1); a main-only lookup would send them to h1's default router.
	sh(t, "ip", "-n", ch.h1, "addr", "add", "10.212.0.1/32", "dev", "lo")
	sh(t, "ip", "-n", ch.h1, "-6", "route", "add", "local", "fd21:fe::/64", "dev", "lo")
	for _, dst := range []netip.Addr{netip.MustParseAddr("10.212.0.1"), netip.MustParseAddr("fd21:fe::5")} {
		if !ch.to2.pingRetry(t, ch.e1, dst, 3) {
			t.Errorf("ping e1->%v (an address of h1's local table) failed", dst)
		}
	}
}

// TestChooseHostRouting: auto follows the kernel, bpf is refused (with what
// to do) where the kernel lacks a helper, legacy is always honoured, and
// the reason names the cause.
func TestChooseHostRouting(t *testing.T) {
	full := Features{HostRouting: true, fibLookup: true, checkMTU: true, redirectPeer: true}
	old := Features{fibLookup: true, redirectPeer: true} // 5.10: no bpf_check_mtu
	for _, c := range []struct {
		mode     string
		f        Features
		want     string
		whyPart  string
		wantFail bool
	}{
		{HostRoutingAuto, full, HostRoutingBPF, "has bpf_fib_lookup", false},
		{"", full, HostRoutingBPF, "auto", false},
		{HostRoutingAuto, old, HostRoutingLegacy, "lacks bpf_check_mtu (5.12)", false},
		{HostRoutingBPF, full, HostRoutingBPF, `host_routing = "bpf"`, false},
		{HostRoutingBPF, old, "", `set "auto" or "legacy"`, true},
		{HostRoutingLegacy, full, HostRoutingLegacy, `host_routing = "legacy"`, false},
		{"fast", full, "", "want auto, bpf or legacy", true},
	} {
		got, why, err := chooseHostRouting(c.mode, c.f)
		if c.wantFail {
			if err == nil || !strings.Contains(err.Error(), c.whyPart) {
				t.Errorf("chooseHostRouting(%q, %+v) = %q, %v; want an error saying %q", c.mode, c.f, got, err, c.whyPart)
			}
			continue
		}
		if err != nil || got != c.want || !strings.Contains(why, c.whyPart) {
			t.Errorf("chooseHostRouting(%q, %+v) = %q, %q, %v; want %q because of %q", c.mode, c.f, got, why, err, c.want, c.whyPart)
		}
	}
}

// TestUplinkSurvivesRestart: rw_from_uplink stays attached when the agent
// closes its datapath (forwarding continues through a restart); the next
// agent adopts the attachment (replaced in place, never doubled), and
// host routing "legacy" on the next start detaches it, and so does Cleanup.
func TestUplinkSurvivesRestart(t *testing.T) {
	testenv.RequireRoot(t)
	for _, mode := range []string{AttachTCX, AttachTC} {
		t.Run(mode, func(t *testing.T) {
			ns := fmt.Sprintf("rwh_rs_%d_%d", os.Getpid()%100000, pinSeq.Add(1))
			sh(t, "ip", "netns", "add", ns)
			t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
			sh(t, "ip", "-n", ns, "link", "add", "rwhup", "type", "veth", "peer", "name", "rwhpeer")
			ifindex := ifIndexIn(t, ns, "rwhup")
			attached := func() int {
				var n int
				inNS(t, ns, func() {
					if mode == AttachTCX {
						res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
						if err != nil {
							t.Fatal(err)
						}
						n = len(res.Programs)
						return
					}
					fs, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}, netlink.HANDLE_MIN_INGRESS)
					if err != nil {
						t.Fatal(err)
					}
					n = len(fs)
				})
				return n
			}
			pin := rwhPinDir(t)
			open := func(hr string) *Datapath {
				d, err := Open(Options{PinDir: pin, Attach: mode, HostRouting: hr, CTMaxEntries: 4096, IPCacheMaxEntries: 4096, PolicyMaxEntries: 1024}, quietLog())
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			d := open(HostRoutingBPF)
			inNS(t, ns, func() {
				if err := d.SetUplinks([]string{"rwhup"}); err != nil {
					t.Fatal(err)
				}
			})
			d.Close()
			if n := attached(); n != 1 {
				t.Fatalf("after the agent closed: %d programs on the uplink, want 1", n)
			}
			d = open(HostRoutingBPF)
			if got := d.Uplinks(); len(got) != 1 || got[0] != "rwhup" {
				t.Errorf("restarted agent's Uplinks() = %v, want [rwhup]", got)
			}
			inNS(t, ns, func() {
				if err := d.SetUplinks([]string{"rwhup"}); err != nil {
					t.Fatal(err)
				}
			})
			if n := attached(); n != 1 {
				t.Errorf("after the restarted agent attached again: %d programs, want 1 (replaced in place)", n)
			}
			d.Close()
			d = open(HostRoutingLegacy)
			defer d.Close()
			inNS(t, ns, func() {
				if err := d.SetUplinks([]string{"rwhup"}); err != nil {
					t.Fatal(err)
				}
			})
			if n := attached(); n != 0 || len(d.Uplinks()) != 0 {
				t.Errorf("legacy after bpf: %d programs, Uplinks() %v; want none", n, d.Uplinks())
			}
			// Cleanup (rackwired cleanup) takes it off too, tc filter included.
			d2 := open(HostRoutingBPF)
			inNS(t, ns, func() {
				if err := d2.SetUplinks([]string{"rwhup"}); err != nil {
					t.Fatal(err)
				}
			})
			d2.Close()
			inNS(t, ns, func() {
				if err := Cleanup(pin); err != nil {
					t.Fatal(err)
				}
			})
			// The kernel releases an unpinned link asynchronously.
			n := attached()
			for deadline := time.Now().Add(3 * time.Second); n != 0 && time.Now().Before(deadline); n = attached() {
				time.Sleep(50 * time.Millisecond)
			}
			if n != 0 {
				t.Errorf("3 s after Cleanup: %d programs on the uplink, want 0", n)
			}
		})
	}
}

// TestHostRoutingNextHopFollowsChange: the fast path keeps a flow's next
// hop in its CT entry (no FIB lookup for its later packets), and asks the
// FIB again within RW_NH_RECHECK (16.8 ms): after h1's router moves to
// another MAC (the router's link gets a new address, h1's neighbour
// entries follow), the same flows' next datagrams reach e2 through the new
// MAC. A kept next hop that were never checked again would send them on to
// the old MAC, which the router no longer answers to: they would be lost.
func TestHostRoutingNextHopFollowsChange(t *testing.T) {
	ch := newCrossHost(t, AttachTCX, HostRoutingBPF)
	ch.blockForwarding(t) // only the fast path delivers from e1 and e2
	const newMAC = "02:00:00:21:0a:f1"
	type flow struct {
		dst  *net.UDPAddr
		gw   string
		c    *net.UDPConn // one socket: every datagram is one flow, one CT entry
		echo func() bool
	}
	var flows []*flow
	for i, x := range []struct{ dst, gw netip.Addr }{
		{ch.e2v4, netip.MustParseAddr("10.210.1.254")},
		{ch.e2v6, netip.MustParseAddr("fd21:a::fe")},
	} {
		port := 5300 + i
		echoServers(t, ch.e2, x.dst, nil, port)
		f := &flow{dst: net.UDPAddrFromAddrPort(netip.AddrPortFrom(x.dst, uint16(port))), gw: x.gw.String()}
		inNS(t, ch.e1, func() {
			var err error
			if f.c, err = net.ListenUDP("udp", nil); err != nil {
				t.Fatal(err)
			}
		})
		defer f.c.Close()
		f.echo = func() bool {
			buf := make([]byte, 16)
			for range 3 { // a lost datagram is sent again, bounded
				if _, err := f.c.WriteToUDP([]byte("nh"), f.dst); err != nil {
					t.Fatal(err)
				}
				f.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				if n, _, err := f.c.ReadFromUDP(buf); err == nil && string(buf[:n]) == "nh" {
					return true
				}
			}
			return false
		}
		flows = append(flows, f)
	}

	before := ch.counters(t, ch.d1)
	for _, f := range flows {
		for range 4 {
			if !f.echo() {
				t.Fatalf("UDP e1->%v through the fast path: no echo", f.dst)
			}
		}
	}
	mid := ch.counters(t, ch.d1)
	if got := mid[HREgressCached] - before[HREgressCached]; got < 4 {
		t.Errorf("%v moved by %d over 4 datagrams of each of 2 flows, want >= 4 (a flow's later packets skip the FIB)", HREgressCached, got)
	}
	if got := mid[HREgressForwarded] - before[HREgressForwarded]; got < 8 {
		t.Errorf("%v moved by %d, want >= 8", HREgressForwarded, got)
	}

	sh(t, "ip", "-n", ch.r, "link", "set", "h1", "address", newMAC)
	for _, f := range flows {
		sh(t, "ip", "-n", ch.h1, "neigh", "replace", f.gw, "lladdr", newMAC, "dev", "rwhup", "nud", "reachable")
	}
	time.Sleep(100 * time.Millisecond) // > RW_NH_RECHECK and a clock tick
	for _, f := range flows {
		if !f.echo() {
			t.Errorf("UDP e1->%v after h1's router changed its MAC: no echo (the flow kept its old next hop)", f.dst)
		}
	}
	if after := ch.counters(t, ch.d1); after[HREgressForwarded] < mid[HREgressForwarded]+2 {
		t.Errorf("the datagrams after the change did not take the fast path (%v %d -> %d)",
			HREgressForwarded, mid[HREgressForwarded], after[HREgressForwarded])
	}
	es, err := ch.d1.CT()
	if err != nil {
		t.Fatal(err)
	}
	up := ifIndexIn(t, ch.h1, "rwhup")
	for _, f := range flows {
		var got []CTEntry
		for _, e := range es {
			if e.Dst == f.dst.AddrPort() {
				got = append(got, e)
			}
		}
		if len(got) != 1 {
			t.Errorf("%v: %d CT entries for the flow on h1, want 1 (the same flow throughout): %+v", f.dst, len(got), got)
			continue
		}
		if nh := got[0].NextHop; nh == nil || nh.MAC != newMAC || nh.Ifindex != up {
			t.Errorf("%v: the flow's next hop on h1 is %+v, want ifindex %d (rwhup) and %s", f.dst, nh, up, newMAC)
		}
	}
}
