package datapath

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

// rawOf is the record the BPF programs write for ev (family 4 or 6).
func rawOf(ev Event, ts uint64) rawEvent {
	r := rawEvent{TsNS: ts, SrcIdentity: ev.SrcIdentity, DstIdentity: ev.DstIdentity,
		SPort: toBE16(ev.Src.Port()), DPort: toBE16(ev.Dst.Port()), Endpoint: ev.Endpoint,
		Proto: ev.Proto, Direction: uint8(ev.Direction), Verdict: uint8(ev.Verdict),
		Reason: int32(ev.Reason), Ifindex: ev.Ifindex, Len: ev.Len, Family: 6}
	if ev.Src.Addr().Is4() {
		r.Family = 4
		s, d := ev.Src.Addr().As4(), ev.Dst.Addr().As4()
		copy(r.SAddr[:], s[:])
		copy(r.DAddr[:], d[:])
	} else {
		r.SAddr, r.DAddr = ev.Src.Addr().As16(), ev.Dst.Addr().As16()
	}
	return r
}

// FuzzDecodeEvent feeds arbitrary bytes as one rw_events ring-buffer record
// to decodeEvent, the pure decoder behind Datapath.Events (no BPF map is
// needed). Properties: no panic; a record shorter than struct event is
// refused, a longer one (ring-buffer records are padded) decodes its
// prefix; every field is the record's; an event encodes back to a record
// that decodes to the same event; the event always marshals to JSON, as
// `rackwire monitor --json` prints it.
func FuzzDecodeEvent(f *testing.F) {
	enc := func(r rawEvent, pad int) []byte {
		b, _ := binary.Append(nil, binary.NativeEndian, r)
		return append(b, make([]byte, pad)...)
	}
	ev4 := Event{Endpoint: 7, Direction: Ingress, Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.250.1.5:80"),
		Proto: 6, SrcIdentity: 2, DstIdentity: 50331948, Verdict: Dropped, Reason: DropPolicyDenied, Ifindex: 3, Len: 60}
	ev6 := Event{Endpoint: 9, Direction: Egress, Src: netip.MustParseAddrPort("[fd00::5]:53"), Dst: netip.MustParseAddrPort("[2001:db8::1]:53"),
		Proto: 17, SrcIdentity: 50331948, DstIdentity: 2, Verdict: Audited, Ifindex: 4, Len: 80}
	f.Add(enc(rawOf(ev4, 1e9), 0))
	f.Add(enc(rawOf(ev6, 5e9), 4))
	icmp := ev4
	icmp.Proto, icmp.Dst, icmp.Verdict, icmp.Reason = 1, netip.AddrPortFrom(icmp.Dst.Addr(), 8), Forwarded, 0
	f.Add(enc(rawOf(icmp, 0), 0))
	odd := rawOf(ev4, 1<<63)
	odd.Family, odd.Direction, odd.Verdict, odd.Reason = 0, 9, 200, -5
	f.Add(enc(odd, 0))
	f.Add(enc(rawOf(ev6, 1), 0)[:20])
	f.Add([]byte{})
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	wall := func(ns uint64) time.Time { return base.Add(time.Duration(ns)) }
	size := binary.Size(rawEvent{})
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := decodeEvent(b, wall)
		if len(b) < size {
			if err == nil {
				t.Fatalf("a %d-byte record (struct event is %d) decoded as %+v", len(b), size, ev)
			}
			return
		}
		var r rawEvent
		if _, err := binary.Decode(b, binary.NativeEndian, &r); err != nil {
			t.Fatal(err)
		}
		if r.Family != 4 && r.Family != 6 {
			if err == nil {
				t.Fatalf("a record of address family %d decoded as %+v", r.Family, ev)
			}
			return
		}
		if err != nil {
			t.Fatalf("a %d-byte record refused: %v", len(b), err)
		}
		if ev.Endpoint != r.Endpoint || ev.Proto != r.Proto || ev.SrcIdentity != r.SrcIdentity || ev.DstIdentity != r.DstIdentity ||
			ev.Ifindex != r.Ifindex || ev.Len != r.Len || uint8(ev.Direction) != r.Direction || uint8(ev.Verdict) != r.Verdict ||
			int32(ev.Reason) != r.Reason || ev.Src.Port() != r.SPort.uint16() || ev.Dst.Port() != r.DPort.uint16() || !ev.Time.Equal(wall(r.TsNS)) {
			t.Fatalf("event %+v from record %+v", ev, r)
		}
		if r.Family == 4 {
			if !ev.Src.Addr().Is4() || !bytes.Equal(ev.Src.Addr().AsSlice(), r.SAddr[:4]) || !bytes.Equal(ev.Dst.Addr().AsSlice(), r.DAddr[:4]) {
				t.Fatalf("IPv4 record read as %v -> %v", ev.Src, ev.Dst)
			}
		} else {
			if !ev.Src.Addr().Is6() || ev.Src.Addr().As16() != r.SAddr || ev.Dst.Addr().As16() != r.DAddr {
				t.Fatalf("IPv6 record read as %v -> %v", ev.Src, ev.Dst)
			}
		}
		if _, err := json.Marshal(ev); err != nil {
			t.Fatalf("event does not marshal: %v", err)
		}
		_ = ev.Direction.String() + ev.Verdict.String() + ev.Reason.String()
		// A record long enough for the service tail (the socket and
		// north-south load balancers write struct svc_event) carries it.
		if len(b) >= binary.Size(rawSvcEvent{}) {
			var sv rawSvcEvent
			if _, err := binary.Decode(b, binary.NativeEndian, &sv); err != nil {
				t.Fatal(err)
			}
			want := ServiceEvent{VIP: netip.AddrPortFrom(addrFrom(r.Family, sv.VIP), sv.VIPPort.uint16()), ID: sv.Service, Backend: sv.Backend}
			if ev.Service == nil || *ev.Service != want {
				t.Fatalf("service tail %+v read as %+v", want, ev.Service)
			}
		} else if ev.Service != nil {
			t.Fatalf("a %d-byte record has a service tail: %+v", len(b), ev.Service)
		}
		// Round trip through the record the programs write.
		var back []byte
		if ev.Service == nil {
			back, err = binary.Append(nil, binary.NativeEndian, rawOf(ev, r.TsNS))
		} else {
			sv := rawSvcEvent{Ev: rawOf(ev, r.TsNS), VIPPort: toBE16(ev.Service.VIP.Port()), Service: ev.Service.ID, Backend: ev.Service.Backend}
			if r.Family == 4 {
				a := ev.Service.VIP.Addr().As4()
				copy(sv.VIP[:], a[:])
			} else {
				sv.VIP = ev.Service.VIP.Addr().As16()
			}
			back, err = binary.Append(nil, binary.NativeEndian, sv)
		}
		if err != nil {
			t.Fatal(err)
		}
		again, err := decodeEvent(back, wall)
		if err != nil || !reflect.DeepEqual(again, ev) {
			t.Fatalf("round trip of %+v (service %+v): %+v (service %+v), %v", ev, ev.Service, again, again.Service, err)
		}
	})
}
