package datapath

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/internal/testenv"
)

// fragOf returns the first fragment (more to come) of p and a later one
// at offset 1,024 bytes with n bytes of payload, both of datagram id.
func fragOf(p pkt, id uint32, n int) (head, tail pkt) {
	head, tail = p, p
	head.fragment, head.moreFrags, head.fragID = true, true, id
	head.payloadLen = 1024 - 8 // a UDP header and payload up to offset 1024
	tail.fragment, tail.fragID, tail.fragOff, tail.payloadLen = true, id, 1024/8, n
	return head, tail
}

// waitEvent reports whether an event for which match holds comes within 3 s.
func waitEvent(events <-chan Event, match func(Event) bool) bool {
	deadline := time.After(3 * time.Second)
	for {
		select {
		case ev := <-events:
			if match(ev) {
				return true
			}
		case <-deadline:
			return false
		}
	}
}

// metricCount returns the packets counted for reason in direction dir.
func metricCount(t *testing.T, d *Datapath, reason Reason, dir Direction) uint64 {
	t.Helper()
	ms, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Reason == reason && m.Direction == dir {
			return m.Packets
		}
	}
	return 0
}

// TestFragmentVerdicts runs crafted fragments through the programs: a
// later fragment passes only after its first fragment passed, and is then
// decided on that fragment's ports (the CT entry counts it); one whose first
// fragment was denied or never seen is dropped as "fragment without head".
func TestFragmentVerdicts(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{PinDir: rwfrPinDir(t)})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, []Entry{
		{Identity: peerID, Direction: Ingress, Proto: protoUDP, Port: 5000},
		{Identity: peerID, Direction: Ingress, Proto: protoICMP, Port: 8},
		{Identity: peerID, Direction: Ingress, Proto: protoICMPv6, Port: 128},
		{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80},
		{Identity: peerID, Direction: Egress, Proto: protoUDP, Port: 53},
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noHead := func() uint64 {
		return metricCount(t, d, DropFragNoHead, Ingress) + metricCount(t, d, DropFragNoHead, Egress)
	}
	expect := func(name string, out bool, p pkt, want uint32) {
		t.Helper()
		prog := d.to
		if out {
			prog = d.from
		}
		if got := run(t, prog, p); got != want {
			t.Errorf("%s: %+v = %#x, want %#x", name, p, got, want)
		}
	}
	for _, peer := range []netip.Addr{peerV4, peerV6} {
		t.Run(peer.String(), func(t *testing.T) {
			flushCT(t, d)
			head, tail := fragOf(in(peer, protoUDP, 5000), 0x1234, 200)
			last := tail
			last.fragOff += 200 / 8

			before := noHead()
			expect("later fragment before its first", false, tail, dropRet)
			if got := noHead(); got != before+1 {
				t.Errorf("fragment-without-head drops = %d, want %d", got, before+1)
			}
			if !waitEvent(events, func(ev Event) bool {
				return ev.Reason == DropFragNoHead && ev.Reason.String() == "fragment without head" &&
					ev.Endpoint == epID && ev.Src.Addr() == peer && ev.Verdict == Dropped
			}) {
				t.Errorf("no %q drop event from %v", "fragment without head", peer)
			}
			expect("allowed first fragment", false, head, passRet)
			expect("later fragment", false, tail, passRet)
			expect("last fragment", false, last, passRet)
			var packets uint64
			ct, _ := d.CT()
			for _, e := range ct {
				if e.Src.Addr() == peer && e.Dst.Port() == 5000 && e.Proto == protoUDP {
					packets = e.Packets
				}
			}
			if packets != 3 {
				t.Errorf("CT entry of the datagram counts %d packets, want 3 (CT: %+v)", packets, ct)
			}
			// Another datagram between the same hosts has its own id.
			_, other := fragOf(in(peer, protoUDP, 5000), 0x1235, 200)
			expect("fragment of another datagram", false, other, dropRet)

			// A denied first fragment does not let its later ones through.
			head, tail = fragOf(in(peer, protoUDP, 5001), 0x2345, 200)
			before = noHead()
			expect("denied first fragment", false, head, dropRet)
			expect("later fragment of a denied datagram", false, tail, dropRet)
			if got := noHead(); got != before+1 {
				t.Errorf("fragment-without-head drops = %d, want %d", got, before+1)
			}

			// A repeated first fragment: a denied one leaves the entry of
			// the one that passed, so later fragments are decided on ports
			// that passed policy; one that passes replaces it.
			head, tail = fragOf(in(peer, protoUDP, 5000), 0x3456, 200)
			dup, _ := fragOf(in(peer, protoUDP, 5001), 0x3456, 200)
			expect("allowed first fragment", false, head, passRet)
			expect("denied repeat of the first fragment", false, dup, dropRet)
			expect("later fragment after a denied repeat", false, tail, passRet)

			// Policy decides a later fragment like its first: an echo
			// request and an egress datagram (answered through CT).
			echo := in(peer, protoICMP, 8)
			if peer.Is6() {
				echo = in(peer, protoICMPv6, 128)
			}
			head, tail = fragOf(echo, 0x4567, 64)
			expect("first fragment of an echo request", false, head, passRet)
			expect("later fragment of an echo request", false, tail, passRet)
			head, tail = fragOf(out(peer, protoUDP, 53), 0x5678, 64)
			expect("first fragment sent", true, head, passRet)
			expect("later fragment sent", true, tail, passRet)
			rhead, rtail := fragOf(out(peer, protoUDP, 53).reply(), 0x6789, 64)
			expect("first fragment of the reply", false, rhead, passRet)
			expect("later fragment of the reply", false, rtail, passRet)

			// RFC 1858: a TCP fragment at offset 8 could rewrite the flags
			// the first fragment was decided on.
			_, tcpTail := fragOf(in(peer, protoTCP, 80), 0x789a, 64)
			tcpTail.fragOff = 1
			expect("TCP fragment at offset 8", false, tcpTail, dropRet)
		})
	}
	// RFC 1858: a first fragment too short for the TCP header's flags.
	before := metricCount(t, d, DropFragment, Ingress)
	head, _ := fragOf(in(peerV4, protoTCP, 80), 0x89ab, 64)
	b := head.bytes()[:14+20+8]
	binary.BigEndian.PutUint16(b[14+2:], 20+8)
	if got, err := d.to.Run(&ebpf.RunOptions{Data: b}); err != nil || got != dropRet {
		t.Errorf("first fragment with 8 bytes of TCP = %#x, %v; want drop", got, err)
	}
	if got := metricCount(t, d, DropFragment, Ingress); got != before+1 {
		t.Errorf("fragment drops = %d, want %d", got, before+1)
	}
}

// checkFragDrops checks the counters TestFragmentedUDPTraffic leaves: the
// later fragments of the datagrams A's egress denied (3 tries of 4,000 and
// 9,000 bytes on each family: 2 + 6 later fragments each) were dropped as
// fragments without head, and nothing else was.
func checkFragDrops(t *testing.T, d *Datapath) {
	t.Helper()
	eg, ing := metricCount(t, d, DropFragNoHead, Egress), metricCount(t, d, DropFragNoHead, Ingress)
	t.Logf("fragment-without-head drops: egress %d, ingress %d", eg, ing)
	if eg != 2*3*(2+6) || ing != 0 {
		t.Errorf("fragment-without-head drops: egress %d, ingress %d; want 48 and 0", eg, ing)
	}
}

// TestHeadlessFragmentTraffic sends a later fragment whose first was never
// sent from inside an endpoint's namespace, over IPv4 and IPv6, through a
// packet socket: the sender's egress drops it as a fragment without head,
// and reports it.
func TestHeadlessFragmentTraffic(t *testing.T) {
	tp, d := fragPair(t, "h", Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	macA, gwA := macOf(t, tp.a, "eth0"), macOf(t, tp.host, tp.hostA)
	for _, c := range []struct{ src, dst netip.Addr }{{tp.ipA, tp.ipB}, {tp.ip6A, tp.ip6B}} {
		before := metricCount(t, d, DropFragNoHead, Egress)
		p := pkt{src: c.src, dst: c.dst, proto: protoUDP, fragment: true, fragID: 0xbeef, fragOff: 185, payloadLen: 100}
		b := frame(p, gwA, macA)
		inNS(t, tp.a, func() {
			fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
			if err != nil {
				t.Fatalf("packet socket: %v", err)
			}
			defer unix.Close(fd)
			ifc, err := net.InterfaceByName("eth0")
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Sendto(fd, b, 0, &unix.SockaddrLinklayer{Ifindex: ifc.Index, Halen: 6}); err != nil {
				t.Fatalf("send fragment: %v", err)
			}
		})
		if !waitEvent(events, func(ev Event) bool {
			return ev.Reason == DropFragNoHead && ev.Src.Addr() == c.src && ev.Direction == Egress
		}) {
			t.Errorf("no fragment-without-head event for %v -> %v", c.src, c.dst)
		}
		if got := metricCount(t, d, DropFragNoHead, Egress); got != before+1 {
			t.Errorf("%v: fragment-without-head drops on egress = %d, want %d", c.src, got, before+1)
		}
	}
}
