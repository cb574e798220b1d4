package datapath

import (
	"net/netip"
	"testing"

	"github.com/rackwire/rackwire/internal/testenv"
)

// TestICMPErrorMinimalQuote: an ICMP error that quotes only the 8 bytes of
// the L4 header RFC 792 guarantees (what a minimal router sends) relates
// to the tracked flow it is about, and "fragmentation needed" / "packet too
// big" pass although the endpoint's ingress is default-deny. IPv6 also
// when the quoted packet is a first fragment (a fragmented datagram too big
// for the next link). A quote too short for the ports relates to nothing.
func TestICMPErrorMinimalQuote(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{PinDir: rwfrPinDir(t)})
	setupEndpoint(t, d, false)
	// Egress TCP 80 and UDP 53 to the peer; no ingress entry at all.
	if err := d.SetPolicy(epID, []Entry{
		{Identity: peerID, Direction: Egress, Proto: protoTCP, Port: 80},
		{Identity: peerID, Direction: Egress, Proto: protoUDP, Port: 53},
	}); err != nil {
		t.Fatal(err)
	}
	router4 := netip.MustParseAddr("192.0.2.1")
	router6 := netip.MustParseAddr("2001:db8::1")
	fragHead := func(p pkt) pkt {
		p.fragment, p.moreFrags, p.fragID = true, true, 77
		return p
	}
	for _, c := range []struct {
		name          string
		flow          pkt
		router        netip.Addr
		proto         uint8
		errType, code uint8
		quote         int
		pass          bool
	}{
		{"v4 frag needed, TCP, 8 bytes", out(peerV4, protoTCP, 80), router4, protoICMP, 3, 4, 8, true},
		{"v4 frag needed, UDP, 8 bytes", out(peerV4, protoUDP, 53), router4, protoICMP, 3, 4, 8, true},
		{"v4 port unreachable, TCP, 8 bytes", out(peerV4, protoTCP, 80), router4, protoICMP, 3, 3, 8, true},
		{"v4 time exceeded, TCP, 8 bytes", out(peerV4, protoTCP, 80), router4, protoICMP, 11, 0, 8, true},
		{"v6 packet too big, TCP, 8 bytes", out(peerV6, protoTCP, 80), router6, protoICMPv6, 2, 0, 8, true},
		{"v6 packet too big, UDP first fragment", fragHead(out(peerV6, protoUDP, 53)), router6, protoICMPv6, 2, 0, 8, true},
		{"v4 frag needed, UDP first fragment", fragHead(out(peerV4, protoUDP, 53)), router4, protoICMP, 3, 4, 8, true},
		{"v4 frag needed, TCP, 4 bytes", out(peerV4, protoTCP, 80), router4, protoICMP, 3, 4, 4, false},
		{"v6 packet too big, TCP, 4 bytes", out(peerV6, protoTCP, 80), router6, protoICMPv6, 2, 0, 4, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			flushCT(t, d)
			quoted := c.flow
			icmpErr := pkt{src: c.router, dst: c.flow.src, proto: c.proto, dport: uint16(c.errType),
				icmpCode: c.code, inner: &quoted, quote: c.quote}
			if got := run(t, d.to, icmpErr); got != dropRet {
				t.Errorf("ICMP error before the flow = %#x, want drop", got)
			}
			if got := run(t, d.from, c.flow); got != passRet {
				t.Fatalf("flow = %#x, want pass", got)
			}
			want := uint32(dropRet)
			if c.pass {
				want = passRet
			}
			if got := run(t, d.to, icmpErr); got != want {
				t.Errorf("ICMP error quoting %d bytes of the flow = %#x, want %#x", c.quote, got, want)
			}
			other := c.flow
			other.sport++
			icmpErr.inner = &other
			if got := run(t, d.to, icmpErr); got != dropRet {
				t.Errorf("ICMP error about another flow = %#x, want drop", got)
			}
		})
	}
}
