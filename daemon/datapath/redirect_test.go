package datapath

import (
	"context"
	"encoding/binary"
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

	"github.com/rackwire/rackwire/internal/testenv"
)

const redirectRet = 7 // TC_ACT_REDIRECT / TCX_REDIRECT: bpf_redirect_peer

// skbCtx is the head of struct __sk_buff up to ifindex: PROG_TEST_RUN
// takes the device the packet arrives on from it.
type skbCtx struct {
	Head    [10]uint32
	Ifindex uint32
}

// localPair is two local endpoints, A (sender) and B (receiver), on two
// real veths in a namespace of the test, so PROG_TEST_RUN can run the
// programs as if on their host-side veths (the packets are never sent).
type localPair struct {
	ns             string
	ifA, ifB       int
	macA, nodeA    net.HardwareAddr
	macB, nodeB    net.HardwareAddr
	a4, a6, b4, b6 netip.Addr
	idA, idB       uint16
	identA, identB uint32
	d              *Datapath
	pinnedB        string
	events         <-chan Event
}

// rwpPinDir is a pin directory named with this file's rwp prefix.
func rwpPinDir(t *testing.T) string {
	dir := filepath.Join("/sys/fs/bpf", fmt.Sprintf("rwp_%d_%d", os.Getpid(), pinSeq.Add(1)))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func newLocalPair(t *testing.T, opts Options) *localPair {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	lp := &localPair{
		ns:   fmt.Sprintf("rwp_ptr%d_%d", os.Getpid()%100000, pinSeq.Add(1)),
		macA: mustMAC("02:00:00:00:0a:01"), nodeA: mustMAC("02:00:00:00:0a:02"),
		macB: mustMAC("02:00:00:00:0b:01"), nodeB: mustMAC("02:00:00:00:0b:02"),
		a4: netip.MustParseAddr("10.89.0.1"), a6: netip.MustParseAddr("fd89::1"),
		b4: netip.MustParseAddr("10.89.0.2"), b6: netip.MustParseAddr("fd89::2"),
		idA: 301, idB: 302, identA: 73001, identB: 73002,
	}
	sh(t, "ip", "netns", "add", lp.ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", lp.ns).Run() })
	for _, n := range []string{"rwpa", "rwpb"} {
		sh(t, "ip", "-n", lp.ns, "link", "add", n, "type", "veth", "peer", "name", n+"p")
	}
	inNS(t, lp.ns, func() {
		for _, c := range []struct {
			name string
			idx  *int
		}{{"rwpa", &lp.ifA}, {"rwpb", &lp.ifB}} {
			ifc, err := net.InterfaceByName(c.name)
			if err != nil {
				t.Fatal(err)
			}
			*c.idx = ifc.Index
		}
	})
	if opts.PinDir == "" {
		opts.PinDir = rwpPinDir(t)
	}
	lp.d = openTest(t, opts)
	lp.d.mu.Lock()
	for _, ep := range []EndpointSpec{
		{ID: lp.idA, IfIndex: lp.ifA, IPs: []netip.Addr{lp.a4, lp.a6}, MAC: lp.macA, NodeMAC: lp.nodeA, Identity: lp.identA},
		{ID: lp.idB, IfIndex: lp.ifB, IPs: []netip.Addr{lp.b4, lp.b6}, MAC: lp.macB, NodeMAC: lp.nodeB, Identity: lp.identB},
	} {
		if err := lp.d.addEndpointLocked(ep); err != nil {
			lp.d.mu.Unlock()
			t.Fatalf("add endpoint %d: %v", ep.ID, err)
		}
	}
	lp.d.mu.Unlock()
	for _, c := range []struct {
		ip netip.Addr
		id uint32
	}{{lp.a4, lp.identA}, {lp.a6, lp.identA}, {lp.b4, lp.identB}, {lp.b6, lp.identB}} {
		if err := lp.d.UpsertIPCache(netip.PrefixFrom(c.ip, c.ip.BitLen()), c.id, netip.Addr{}); err != nil {
			t.Fatal(err)
		}
	}
	lp.pinnedB = filepath.Join(lp.d.PinDir(), policyMapName(lp.idB))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ev, err := lp.d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lp.events = ev
	return lp
}

// frame is p's Ethernet frame with the given MACs and a valid IPv4
// header checksum.
func frame(p pkt, dst, src net.HardwareAddr) []byte {
	b := p.bytes()
	copy(b[0:6], dst)
	copy(b[6:12], src)
	if p.src.Is4() {
		binary.BigEndian.PutUint16(b[24:], 0)
		binary.BigEndian.PutUint16(b[24:], ipv4Checksum(b[14:34]))
	}
	return b
}

func ipv4Checksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// runOn runs prog on frame as if it arrived on (from) or left by (to)
// ifindex; it returns the verdict and the packet as the program left it.
func (lp *localPair) runOn(t *testing.T, prog *ebpf.Program, ifindex int, b []byte) (uint32, []byte) {
	t.Helper()
	var (
		ret uint32
		err error
	)
	outBuf := make([]byte, len(b)+256)
	opts := &ebpf.RunOptions{Data: b, DataOut: outBuf, Context: skbCtx{Ifindex: uint32(ifindex)}}
	inNS(t, lp.ns, func() { ret, err = prog.Run(opts) })
	if err != nil {
		t.Fatalf("run program on ifindex %d: %v", ifindex, err)
	}
	return ret, opts.DataOut
}

// fromA runs A's egress program (the fast path) on p sent by A to its gateway.
func (lp *localPair) fromA(t *testing.T, p pkt) (uint32, []byte) {
	return lp.runOn(t, lp.d.from, lp.ifA, frame(p, lp.nodeA, lp.macA))
}

// nextEvent waits briefly for the next event.
func (lp *localPair) nextEvent(t *testing.T) (Event, bool) {
	t.Helper()
	select {
	case ev := <-lp.events:
		return ev, true
	case <-time.After(2 * time.Second):
		return Event{}, false
	}
}

// drainEvents discards queued events.
func (lp *localPair) drainEvents() {
	for {
		select {
		case <-lp.events:
		case <-time.After(50 * time.Millisecond):
			return
		}
	}
}

func (lp *localPair) policyCount(t *testing.T, id uint16, e Entry) uint64 {
	t.Helper()
	entries, err := lp.d.Policy(id)
	if err != nil {
		t.Fatal(err)
	}
	for _, got := range entries {
		if got.Identity == e.Identity && got.Direction == e.Direction && got.Proto == e.Proto &&
			got.Port == e.Port && got.Deny == e.Deny {
			return got.Packets
		}
	}
	t.Fatalf("endpoint %d has no entry %+v: %+v", id, e, entries)
	return 0
}

// checkRewritten checks what a router would have done to the frame.
func checkRewritten(t *testing.T, name string, in, out []byte, dstMAC, srcMAC net.HardwareAddr, v4 bool) {
	t.Helper()
	if len(out) != len(in) {
		t.Errorf("%s: out %d bytes, in %d", name, len(out), len(in))
		return
	}
	if string(out[0:6]) != string(dstMAC) || string(out[6:12]) != string(srcMAC) {
		t.Errorf("%s: MACs %v > %v, want %v > %v", name, net.HardwareAddr(out[6:12]), net.HardwareAddr(out[0:6]), srcMAC, dstMAC)
	}
	ttlOff := 14 + 7
	if v4 {
		ttlOff = 14 + 8
		if c := ipv4Checksum(out[14:34]); c != 0 {
			t.Errorf("%s: IPv4 header checksum does not verify (%#x)", name, c)
		}
	}
	if out[ttlOff] != in[ttlOff]-1 {
		t.Errorf("%s: TTL %d, want %d", name, out[ttlOff], in[ttlOff]-1)
	}
	// Everything but MACs, TTL and checksum is unchanged.
	for i := 12; i < len(in); i++ {
		if i == ttlOff || (v4 && (i == 24 || i == 25)) {
			continue
		}
		if in[i] != out[i] {
			t.Errorf("%s: byte %d changed %#x -> %#x", name, i, in[i], out[i])
			break
		}
	}
}

// TestLocalRedirectVerdicts runs rw_from_endpoint on packets between two
// local endpoints with the fast path on: the receiver's ingress policy is
// decided in the sender's program (deny precedence, counters, CT, events
// attributed to the receiver), allowed packets are rewritten as a router
// would and redirected, denied ones dropped, for TCP, UDP and ICMP over
// IPv4 and IPv6; replies pass both ways; allow-all and the bpftool all-zero
// key open the receiver.
func TestLocalRedirectVerdicts(t *testing.T) {
	lp := newLocalPair(t, Options{})
	d := lp.d
	if !d.Features().RedirectPeer {
		testenv.Missing(t, "a kernel with bpf_redirect_peer and bpf_check_mtu (5.12+)")
	}
	if !d.Features().LocalRedirect {
		t.Fatalf("Features().LocalRedirect = false with RedirectPeer and default options")
	}
	// A: egress open except a deny rule for UDP 9999; no ingress entries.
	if err := d.SetPolicy(lp.idA, []Entry{
		{Direction: Egress},
		{Direction: Egress, Proto: protoUDP, Port: 9999, Deny: true},
	}); err != nil {
		t.Fatal(err)
	}
	// B: ingress TCP from A except 8082 (a deny rule wins), UDP 5353; no
	// ICMP, no egress entries (its replies pass through CT only).
	tcpAll := Entry{Identity: lp.identA, Direction: Ingress, Proto: protoTCP}
	tcpDeny := Entry{Identity: lp.identA, Direction: Ingress, Proto: protoTCP, Port: 8082, Deny: true}
	udp := Entry{Identity: lp.identA, Direction: Ingress, Proto: protoUDP, Port: 5353}
	if err := d.SetPolicy(lp.idB, []Entry{tcpAll, tcpDeny, udp}); err != nil {
		t.Fatal(err)
	}

	type tc struct {
		name   string
		p      pkt
		want   uint32
		reason Reason // of the drop event
	}
	var cases []tc
	for _, fam := range []struct {
		name           string
		a, b           netip.Addr
		icmp, echoType uint8
	}{{"v4", lp.a4, lp.b4, protoICMP, 8}, {"v6", lp.a6, lp.b6, protoICMPv6, 128}} {
		mk := func(proto uint8, port uint16) pkt {
			return pkt{src: fam.a, dst: fam.b, proto: proto, sport: 41000, dport: port, icmpID: 11, tcpFlags: tcpSYN, payloadLen: 10}
		}
		cases = append(cases,
			tc{fam.name + " tcp allowed", mk(protoTCP, 8080), redirectRet, 0},
			tc{fam.name + " tcp deny rule", mk(protoTCP, 8082), dropRet, DropPolicyDenyRule},
			tc{fam.name + " udp allowed", mk(protoUDP, 5353), redirectRet, 0},
			tc{fam.name + " udp denied", mk(protoUDP, 5354), dropRet, DropPolicyDenied},
			tc{fam.name + " icmp echo denied", mk(fam.icmp, uint16(fam.echoType)), dropRet, DropPolicyDenied},
		)
	}
	for _, c := range cases {
		flushCT(t, d)
		lp.drainEvents()
		before := lp.policyCount(t, lp.idB, tcpAll)
		beforeDeny := lp.policyCount(t, lp.idB, tcpDeny)
		in := frame(c.p, lp.nodeA, lp.macA)
		got, out := lp.runOn(t, d.from, lp.ifA, in)
		if got != c.want {
			t.Errorf("%s: %#x, want %#x", c.name, got, c.want)
			continue
		}
		if c.want == redirectRet {
			checkRewritten(t, c.name, in, out, lp.macB, lp.nodeB, c.p.src.Is4())
			// Both endpoints track the flow, each in its own direction.
			cts, err := d.CT()
			if err != nil {
				t.Fatal(err)
			}
			var egA, inB bool
			for _, e := range cts {
				if e.Src.Addr() == c.p.src && e.Dst.Addr() == c.p.dst {
					egA = egA || (e.Endpoint == lp.idA && e.Direction == Egress)
					inB = inB || (e.Endpoint == lp.idB && e.Direction == Ingress && e.RemoteIdentity == lp.identA)
				}
			}
			if !egA || !inB {
				t.Errorf("%s: CT has A egress %v, B ingress %v; want both: %+v", c.name, egA, inB, cts)
			}
			// The reply from B passes B's egress and A's ingress through
			// CT, though neither has an entry for it.
			r := c.p.reply()
			rin := frame(r, lp.nodeB, lp.macB)
			rgot, rout := lp.runOn(t, d.from, lp.ifB, rin)
			if rgot != redirectRet {
				t.Errorf("%s: reply = %#x, want redirect", c.name, rgot)
			} else {
				checkRewritten(t, c.name+" reply", rin, rout, lp.macA, lp.nodeA, c.p.src.Is4())
			}
			if c.p.proto == protoTCP {
				if after := lp.policyCount(t, lp.idB, tcpAll); after != before+1 {
					t.Errorf("%s: B's TCP entry counted %d new flows, want 1", c.name, after-before)
				}
			}
			continue
		}
		if c.reason == DropPolicyDenyRule {
			if after := lp.policyCount(t, lp.idB, tcpDeny); after != beforeDeny+1 {
				t.Errorf("%s: B's deny entry counted %d, want 1", c.name, after-beforeDeny)
			}
		}
		ev, ok := lp.nextEvent(t)
		if !ok {
			t.Errorf("%s: no drop event", c.name)
			continue
		}
		want := Event{
			Time: ev.Time, Endpoint: lp.idB, Direction: Ingress,
			Src: netip.AddrPortFrom(c.p.src, ev.Src.Port()), Dst: netip.AddrPortFrom(c.p.dst, ev.Dst.Port()),
			Proto: c.p.proto, SrcIdentity: lp.identA, DstIdentity: lp.identB,
			Verdict: Dropped, Reason: c.reason, Ifindex: uint32(lp.ifB), Len: uint32(len(in)),
		}
		if ev != want {
			t.Errorf("%s: event %+v, want %+v", c.name, ev, want)
		}
		// A denied packet leaves no CT entry on either side that would
		// let a retry through.
		if got, _ := lp.fromA(t, c.p); got != dropRet {
			t.Errorf("%s: retry = %#x, want drop", c.name, got)
		}
	}

	// A's own egress still decides first, and its drops are A's.
	flushCT(t, d)
	lp.drainEvents()
	if got, _ := lp.fromA(t, pkt{src: lp.a4, dst: lp.b4, proto: protoUDP, sport: 41000, dport: 9999}); got != dropRet {
		t.Errorf("A egress deny rule: %#x, want drop", got)
	} else if ev, ok := lp.nextEvent(t); !ok || ev.Endpoint != lp.idA || ev.Direction != Egress || ev.Ifindex != uint32(lp.ifA) || ev.Reason != DropPolicyDenyRule {
		t.Errorf("A egress deny rule: event %+v (%v), want A's egress deny rule", ev, ok)
	}

	// Not for the fast path: left to the host stack and rw_to_endpoint,
	// with no ingress decision taken here.
	flushCT(t, d)
	sh(t, "ip", "-n", lp.ns, "link", "set", "rwpb", "mtu", "1280")
	ttl1 := frame(pkt{src: lp.a4, dst: lp.b4, proto: protoUDP, sport: 41000, dport: 5354}, lp.nodeA, lp.macA)
	ttl1[22] = 1
	binary.BigEndian.PutUint16(ttl1[24:], 0)
	binary.BigEndian.PutUint16(ttl1[24:], ipv4Checksum(ttl1[14:34]))
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"ttl 1", ttl1},
		{"not to the gateway MAC", frame(pkt{src: lp.a4, dst: lp.b4, proto: protoUDP, sport: 41000, dport: 5354}, lp.macB, lp.macA)},
		{"larger than B's MTU", frame(pkt{src: lp.a6, dst: lp.b6, proto: protoUDP, sport: 41000, dport: 5353, payloadLen: 1400}, lp.nodeA, lp.macA)},
		{"destination not local", frame(pkt{src: lp.a4, dst: netip.MustParseAddr("10.89.9.9"), proto: protoUDP, sport: 41000, dport: 5354}, lp.nodeA, lp.macA)},
	} {
		if got, _ := lp.runOn(t, d.from, lp.ifA, c.b); got != passRet {
			t.Errorf("%s: %#x, want pass (host stack)", c.name, got)
		}
	}
	// ... where the receiver's program still denies it.
	if got, _ := lp.runOn(t, d.to, lp.ifB, ttl1); got != dropRet {
		t.Errorf("ttl 1 through rw_to_endpoint: %#x, want drop", got)
	}

	// Audit on the receiver: forwarded, reported as B's.
	if err := d.SetAudit(lp.idB, true); err != nil {
		t.Fatal(err)
	}
	flushCT(t, d)
	lp.drainEvents()
	if got, _ := lp.fromA(t, pkt{src: lp.a6, dst: lp.b6, proto: protoUDP, sport: 41000, dport: 5354}); got != redirectRet {
		t.Errorf("audit: %#x, want redirect", got)
	} else if ev, ok := lp.nextEvent(t); !ok || ev.Endpoint != lp.idB || ev.Verdict != Audited || ev.Reason != DropPolicyDenied || ev.Ifindex != uint32(lp.ifB) {
		t.Errorf("audit: event %+v (%v), want B's audit event", ev, ok)
	}
	if err := d.SetAudit(lp.idB, false); err != nil {
		t.Fatal(err)
	}

	// allow-all on B opens it (denies included); revert closes it again.
	probe := func(when string, want uint32, ps ...pkt) {
		t.Helper()
		for _, p := range ps {
			flushCT(t, d)
			if got, _ := lp.fromA(t, p); got != want {
				t.Errorf("%s: %v %v:%d = %#x, want %#x", when, p.dst, p.proto, p.dport, got, want)
			}
		}
	}
	udpDenied := pkt{src: lp.a4, dst: lp.b4, proto: protoUDP, sport: 41000, dport: 5354}
	tcpDenied := pkt{src: lp.a6, dst: lp.b6, proto: protoTCP, sport: 41000, dport: 8082, tcpFlags: tcpSYN}
	ping6 := pkt{src: lp.a6, dst: lp.b6, proto: protoICMPv6, dport: 128, icmpID: 3}
	if err := d.AllowAll(lp.idB, false); err != nil {
		t.Fatal(err)
	}
	probe("allow-all", redirectRet, udpDenied, tcpDenied, ping6)
	if err := d.AllowAll(lp.idB, true); err != nil {
		t.Fatal(err)
	}
	probe("allow-all reverted", dropRet, udpDenied, tcpDenied, ping6)

	// The operator's all-zero key written with bpftool opens B's ingress
	// (deny entries still win).
	bpftool := testenv.RequireCommand(t, "bpftool")
	args := []string{"map", "update", "pinned", lp.pinnedB, "key", "hex"}
	args = append(args, strings.Fields(strings.Repeat("00 ", 8))...)
	args = append(args, "value", "hex")
	args = append(args, strings.Fields(strings.Repeat("00 ", 24))...)
	args = append(args, "noexist")
	if out, err := exec.Command(bpftool, args...).CombinedOutput(); err != nil {
		t.Fatalf("bpftool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	probe("bpftool all-zero key", redirectRet, udpDenied, ping6)
	probe("bpftool all-zero key, deny rule", dropRet, tcpDenied)
}

// TestLocalRedirectOff: with Options.NoRedirectPeer the sender's program
// only decides its own egress and leaves delivery to the host stack, where
// rw_to_endpoint decides the receiver's ingress as before.
func TestLocalRedirectOff(t *testing.T) {
	lp := newLocalPair(t, Options{NoRedirectPeer: true})
	d := lp.d
	if d.Features().LocalRedirect {
		t.Fatal("Features().LocalRedirect = true with NoRedirectPeer")
	}
	if err := d.SetPolicy(lp.idA, []Entry{{Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetPolicy(lp.idB, []Entry{{Identity: lp.identA, Direction: Ingress, Proto: protoUDP, Port: 5353}}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p      pkt
		wantTo uint32
	}{
		{pkt{src: lp.a4, dst: lp.b4, proto: protoUDP, sport: 41000, dport: 5353}, passRet},
		{pkt{src: lp.a6, dst: lp.b6, proto: protoUDP, sport: 41000, dport: 5354}, dropRet},
	} {
		flushCT(t, d)
		in := frame(c.p, lp.nodeA, lp.macA)
		got, out := lp.runOn(t, d.from, lp.ifA, in)
		if got != passRet {
			t.Errorf("%v:%d from A = %#x, want pass", c.p.dst, c.p.dport, got)
		}
		if string(out) != string(in) {
			t.Errorf("%v:%d: program changed the packet", c.p.dst, c.p.dport)
		}
		if got, _ := lp.runOn(t, d.to, lp.ifB, in); got != c.wantTo {
			t.Errorf("%v:%d to B = %#x, want %#x", c.p.dst, c.p.dport, got, c.wantTo)
		}
	}
}

// macOf returns the MAC of ifname in namespace ns.
func macOf(t *testing.T, ns, ifname string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	inNS(t, ns, func() {
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			t.Fatalf("%s in %s: %v", ifname, ns, err)
		}
		mac = ifc.HardwareAddr
	})
	return mac
}

func (tp *topo) forwarding(t *testing.T, on bool) {
	t.Helper()
	v := "0"
	if on {
		v = "1"
	}
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv4.ip_forward="+v)
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding="+v)
}

// TestLocalRedirectTraffic sends real traffic between two endpoints whose
// specs carry their MACs, so local delivery takes bpf_redirect_peer. With
// IP forwarding off in the host namespace only the fast path can deliver
// anything: allowed TCP, UDP and ICMP pass over IPv4 and IPv6 (replies
// included), and what the receiver's ingress policy denies is still
// dropped, and reported as the receiver's. With Options.NoRedirectPeer the
// same policy holds through the host stack, which then needs forwarding.
func TestLocalRedirectTraffic(t *testing.T) {
	for _, c := range []struct {
		mode string
		fast bool
	}{{AttachTCX, true}, {AttachTC, true}, {AttachTCX, false}} {
		name := c.mode + "/fast"
		if !c.fast {
			name = c.mode + "/host-stack"
		}
		t.Run(name, func(t *testing.T) {
			tp := newTopoPrefix(t, "rwp", "p"+c.mode[:2])
			d := openTest(t, Options{PinDir: rwpPinDir(t), Attach: c.mode, NoRedirectPeer: !c.fast})
			if c.fast && !d.Features().RedirectPeer {
				testenv.Missing(t, "a kernel with bpf_redirect_peer and bpf_check_mtu (5.12+)")
			}
			if got := d.Features().LocalRedirect; got != c.fast {
				t.Fatalf("Features().LocalRedirect = %v, want %v", got, c.fast)
			}
			const idA, idB, identA, identB = 111, 112, 70111, 70112
			specs := []EndpointSpec{
				{ID: idA, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA, tp.ip6A}, Identity: identA,
					MAC: macOf(t, tp.a, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostA)},
				{ID: idB, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB, tp.ip6B}, Identity: identB,
					MAC: macOf(t, tp.b, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostB)},
			}
			inNS(t, tp.host, func() {
				for _, ep := range specs {
					if err := d.AttachEndpoint(ep); err != nil {
						t.Fatalf("AttachEndpoint(%+v) = %v", ep, err)
					}
				}
			})
			t.Cleanup(func() {
				inNS(t, tp.host, func() {
					d.DetachEndpoint(idA, tp.ifA)
					d.DetachEndpoint(idB, tp.ifB)
				})
			})
			for _, x := range []struct {
				ip netip.Addr
				id uint32
			}{{tp.ipA, identA}, {tp.ip6A, identA}, {tp.ipB, identB}, {tp.ip6B, identB}} {
				if err := d.UpsertIPCache(netip.PrefixFrom(x.ip, x.ip.BitLen()), x.id, netip.Addr{}); err != nil {
					t.Fatal(err)
				}
			}
			if c.fast {
				tp.forwarding(t, false)
			}
			// Open endpoints (new ones are closed); the first pings also
			// resolve the gateways.
			for _, id := range []uint16{idA, idB} {
				if err := d.SetPolicy(id, OpenEntries()); err != nil {
					t.Fatal(err)
				}
			}
			for _, dst := range []netip.Addr{tp.ipB, tp.ip6B} {
				if !tp.pingRetry(t, tp.a, dst, 3) {
					ms, _ := d.Metrics()
					t.Fatalf("ping A->%v with open endpoints failed; metrics %+v", dst, ms)
				}
			}

			// A sends anything; B accepts TCP 8080 and UDP 5353 from A,
			// and sends nothing of its own (replies pass through CT).
			tcp8080 := Entry{Identity: identA, Direction: Ingress, Proto: protoTCP, Port: 8080}
			entriesB := []Entry{tcp8080, {Identity: identA, Direction: Ingress, Proto: protoUDP, Port: 5353}}
			if err := d.SetPolicy(idA, []Entry{{Direction: Egress}}); err != nil {
				t.Fatal(err)
			}
			if err := d.SetPolicy(idB, entriesB); err != nil {
				t.Fatal(err)
			}
			flushCT(t, d)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			events, err := d.Events(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, dst := range []netip.Addr{tp.ipB, tp.ip6B} {
				if !tp.tcp(t, dst, 8080) {
					t.Errorf("TCP A->%v:8080 (allowed) failed", dst)
				}
				if tp.tcp(t, dst, 8081) {
					t.Errorf("TCP A->%v:8081 (denied by B's ingress) succeeded", dst)
				}
				if !tp.udp(t, dst, 5353) {
					t.Errorf("UDP A->%v:5353 (allowed) failed", dst)
				}
				if tp.udp(t, dst, 5354) {
					t.Errorf("UDP A->%v:5354 (denied by B's ingress) succeeded", dst)
				}
				if tp.ping(t, tp.a, dst) {
					t.Errorf("ping A->%v (denied by B's ingress) succeeded", dst)
				}
			}
			// The drops are B's ingress drops, on B's veth.
			want := map[string]bool{}
			for _, p := range []string{"tcp4", "tcp6", "udp4", "udp6", "icmp4", "icmp6"} {
				want[p] = true
			}
			deadline := time.After(3 * time.Second)
		wait:
			for len(want) > 0 {
				select {
				case ev := <-events:
					if ev.Verdict != Dropped {
						continue
					}
					if ev.Endpoint != idB || ev.Direction != Ingress || ev.Ifindex != uint32(tp.ifB) ||
						ev.Reason != DropPolicyDenied || ev.SrcIdentity != identA || ev.DstIdentity != identB {
						t.Errorf("drop event %+v, want B's ingress policy-denied on ifindex %d", ev, tp.ifB)
						continue
					}
					fam := "4"
					if ev.Dst.Addr().Is6() {
						fam = "6"
					}
					delete(want, map[uint8]string{protoTCP: "tcp", protoUDP: "udp", protoICMP: "icmp", protoICMPv6: "icmp"}[ev.Proto]+fam)
				case <-deadline:
					t.Errorf("no drop event for %v", want)
					break wait
				}
			}
			if n := func() uint64 {
				entries, _ := d.Policy(idB)
				for _, e := range entries {
					if e.Direction == Ingress && e.Proto == protoTCP && e.Port == 8080 {
						return e.Packets
					}
				}
				return 0
			}(); n < 2 {
				t.Errorf("B's TCP 8080 entry counted %d new flows, want at least 2 (IPv4, IPv6)", n)
			}

			// Allowing echo requests lets pings and their replies through.
			if err := d.SetPolicy(idB, append(entriesB,
				Entry{Identity: identA, Direction: Ingress, Proto: protoICMP, Port: 8},
				Entry{Identity: identA, Direction: Ingress, Proto: protoICMPv6, Port: 128})); err != nil {
				t.Fatal(err)
			}
			for _, dst := range []netip.Addr{tp.ipB, tp.ip6B} {
				if !tp.ping(t, tp.a, dst) {
					t.Errorf("ping A->%v (allowed) failed", dst)
				}
			}
			// Emergency open of B, and its revert.
			if err := d.AllowAll(idB, false); err != nil {
				t.Fatal(err)
			}
			if !tp.tcp(t, tp.ip6B, 8081) {
				t.Errorf("TCP A->[B]:8081 after allow-all failed")
			}
			if err := d.AllowAll(idB, true); err != nil {
				t.Fatal(err)
			}
			flushCT(t, d)
			if tp.tcp(t, tp.ipB, 8081) {
				t.Errorf("TCP A->B:8081 after allow-all revert succeeded")
			}

			if !c.fast {
				// The host stack delivers: without forwarding, nothing does.
				tp.forwarding(t, false)
				if tp.tcp(t, tp.ipB, 8080) {
					t.Errorf("TCP A->B:8080 with the fast path off and no forwarding succeeded")
				}
			}
		})
	}
}
