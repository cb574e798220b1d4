package datapath

import (
	"encoding/binary"
	"net/netip"
)

// pkt describes a crafted test packet. Checksums stay zero: the datapath
// never reads them.
type pkt struct {
	src, dst   netip.Addr
	proto      uint8
	sport      uint16
	dport      uint16 // ICMP: the type
	icmpID     uint16
	icmpCode   uint8
	tcpFlags   uint8
	payloadLen int
	inner      *pkt // ICMP error: the quoted packet
	quote      int  // ICMP error: quote only this many bytes after the quoted IP header(s); 0 = all

	// A fragment (IPv6: with a fragment header) when fragment is set. A
	// first fragment (fragOff 0) carries the L4 header; a later one only
	// payloadLen bytes of payload.
	fragment  bool
	fragOff   uint16 // in 8-byte units
	moreFrags bool
	fragID    uint32 // IPv4: the low 16 bits
}

const (
	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
	protoSCTP   = 132
	tcpSYN      = 0x02
	tcpACK      = 0x10
)

func (p pkt) l4() []byte {
	var h []byte
	switch p.proto {
	case protoTCP:
		h = make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], p.sport)
		binary.BigEndian.PutUint16(h[2:], p.dport)
		h[12] = 5 << 4
		h[13] = p.tcpFlags
	case protoUDP, protoSCTP:
		h = make([]byte, 8)
		binary.BigEndian.PutUint16(h[0:], p.sport)
		binary.BigEndian.PutUint16(h[2:], p.dport)
		binary.BigEndian.PutUint16(h[4:], uint16(8+p.payloadLen))
	case protoICMP, protoICMPv6:
		h = make([]byte, 8)
		h[0] = uint8(p.dport)
		h[1] = p.icmpCode
		binary.BigEndian.PutUint16(h[4:], p.icmpID)
	}
	if p.fragment && p.fragOff > 0 {
		return make([]byte, p.payloadLen)
	}
	if p.inner != nil {
		q := p.inner.bytes()[14:]
		if p.quote > 0 {
			q = q[:p.inner.l3Len()+p.quote]
		}
		return append(h, q...)
	}
	return append(h, make([]byte, p.payloadLen)...)
}

// l3Len is the length of p's IP header and, for an IPv6 fragment, its fragment header.
func (p pkt) l3Len() int {
	switch {
	case p.src.Is4():
		return 20
	case p.fragment:
		return 48
	}
	return 40
}

// bytes returns the Ethernet frame.
func (p pkt) bytes() []byte {
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{2, 0, 0, 0, 0, 2})
	copy(eth[6:12], []byte{2, 0, 0, 0, 0, 1})
	l4 := p.l4()
	if p.src.Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
		ip[8] = 64
		ip[9] = p.proto
		if p.fragment {
			binary.BigEndian.PutUint16(ip[4:], uint16(p.fragID))
			fo := p.fragOff
			if p.moreFrags {
				fo |= 0x2000
			}
			binary.BigEndian.PutUint16(ip[6:], fo)
		}
		s, d := p.src.As4(), p.dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		return append(append(eth, ip...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	if p.fragment {
		fh := make([]byte, 8)
		fh[0] = p.proto
		fo := p.fragOff << 3
		if p.moreFrags {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], p.fragID)
		l4 = append(fh, l4...)
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(l4)))
	ip[6] = p.proto
	if p.fragment {
		ip[6] = 44
	}
	ip[7] = 64
	s, d := p.src.As16(), p.dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(eth, ip...), l4...)
}

// reply swaps the endpoints of p (and turns an echo request into a reply).
func (p pkt) reply() pkt {
	r := p
	r.src, r.dst = p.dst, p.src
	r.sport, r.dport = p.dport, p.sport
	switch {
	case p.proto == protoICMP && p.dport == 8:
		r.sport, r.dport = 0, 0
	case p.proto == protoICMPv6 && p.dport == 128:
		r.sport, r.dport = 0, 129
	}
	if p.proto == protoTCP {
		r.tcpFlags = tcpSYN | tcpACK
	}
	return r
}
