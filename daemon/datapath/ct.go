package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// CT maps: TCP and everything else apart, per family.
var ctMaps = []string{"rw_ct4_tcp", "rw_ct4_other", "rw_ct6_tcp", "rw_ct6_other"}

// CT states of a TCP entry (CTEntry.State); other protocols are "open".
const (
	CTStateSYN         = "syn-only"    // only SYNs seen: the SYN lifetime
	CTStateEstablished = "established" // a packet without SYN seen (half-closed too)
	CTStateClosing     = "closing"     // FIN both ways or RST: the close lifetime
	CTStateOpen        = "open"        // not TCP
)

// CTEntry is one tracked flow: the tuple of its first packet, the local
// endpoint and the direction that packet had.
type CTEntry struct {
	Src            netip.AddrPort `json:"src"`
	Dst            netip.AddrPort `json:"dst"`
	Proto          uint8          `json:"proto"`
	Direction      Direction      `json:"direction"`
	Endpoint       uint16         `json:"endpoint"`
	RemoteIdentity uint32         `json:"remote_identity"`
	Packets        uint64         `json:"packets"`
	Bytes          uint64         `json:"bytes"`
	TCPFlags       uint8          `json:"tcp_flags,omitempty"`
	Audit          bool           `json:"audit,omitempty"`     // forwarded by audit mode
	State          string         `json:"state"`               // CTState*
	FINOrig        bool           `json:"fin_orig,omitempty"`  // FIN from the first packet's sender
	FINReply       bool           `json:"fin_reply,omitempty"` // FIN from the other side
	RST            bool           `json:"rst,omitempty"`
	Revision       uint32         `json:"revision"` // policy revision the flow was last checked at
	Created        time.Time      `json:"created"`
	LastSeen       time.Time      `json:"last_seen"`
	// ExpiresIn is the lifetime left if no packet comes; 0 = expired (the
	// next packet is a new flow, or the LRU reuses the slot).
	ExpiresIn time.Duration `json:"expires_in"`
	// NextHop is where host routing "bpf" sends the endpoint's packets of
	// the flow to another host; nil until one was kept.
	NextHop *CTNextHop `json:"next_hop,omitempty"`
}

// CTNextHop is the FIB's last answer for a flow's packets to another host
// (bpf/hostrt.h): kept in the CT entry, asked again once older than
// RW_NH_RECHECK (16.8 ms).
type CTNextHop struct {
	Ifindex int           `json:"ifindex"`
	MAC     string        `json:"mac"`
	MTU     int           `json:"mtu"`
	Age     time.Duration `json:"age"` // since the FIB answered (about 1 ms resolution)
}

// bootTime converts CLOCK_MONOTONIC nanoseconds to wall-clock time.
func bootTime() func(ns uint64) time.Time {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	base := time.Now().Add(-time.Duration(ts.Nano()))
	return func(ns uint64) time.Time { return base.Add(time.Duration(ns)) }
}

func monoNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// ctLifetime is the idle lifetime the programs give an entry (bpf/ct.h
// __ct_expired), with the defaults they use for zero timeouts.
func (o Options) ctLifetime(v ctEntry, tcp bool) (string, time.Duration) {
	or := func(d, def time.Duration) time.Duration {
		if d > 0 {
			return d
		}
		return def
	}
	switch {
	case !tcp:
		return CTStateOpen, or(o.CTTimeoutOther, 60*time.Second)
	case v.Flags&ctFlagRST != 0 || v.Flags&(ctFlagFINFwd|ctFlagFINRev) == ctFlagFINFwd|ctFlagFINRev:
		return CTStateClosing, or(o.CTTimeoutClose, 10*time.Second)
	case v.Flags&ctFlagSeenNonSYN == 0:
		return CTStateSYN, or(o.CTTimeoutTCPSYN, 60*time.Second)
	}
	return CTStateEstablished, or(o.CTTimeoutTCP, 6*time.Hour)
}

func (d *Datapath) fillCT(e *CTEntry, v ctEntry, wall func(uint64) time.Time, now uint64) {
	e.RemoteIdentity = v.RemoteIdentity
	e.Packets, e.Bytes = v.Packets, v.Bytes
	e.TCPFlags = v.TCPFlags
	e.Audit = v.Flags&ctFlagAudit != 0
	e.FINOrig, e.FINReply, e.RST = v.Flags&ctFlagFINFwd != 0, v.Flags&ctFlagFINRev != 0, v.Flags&ctFlagRST != 0
	e.Revision = v.Rev
	e.Created, e.LastSeen = wall(v.CreatedNS), wall(v.LastSeenNS)
	var life time.Duration
	e.State, life = d.opts.ctLifetime(v, e.Proto == unix.IPPROTO_TCP)
	if idle := time.Duration(now - v.LastSeenNS); now > v.LastSeenNS && idle < life {
		e.ExpiresIn = life - idle
	} else if now <= v.LastSeenNS {
		e.ExpiresIn = life
	}
	if v.NhIfindex != 0 {
		// nh_checked is the clock >> 20, 32 bits: the age wraps after 52 days.
		age := uint32(now>>20) - v.NhChecked
		if age > 1<<31 { // the coarse clock a tick behind ours
			age = 0
		}
		e.NextHop = &CTNextHop{Ifindex: int(v.NhIfindex), MAC: net.HardwareAddr(v.NhDMAC[:]).String(),
			MTU: int(v.NhMTU), Age: time.Duration(age) << 20}
	}
}

func ct4Entry(k ct4Key) CTEntry {
	return CTEntry{
		Src:       netip.AddrPortFrom(netip.AddrFrom4(k.SAddr), k.SPort.uint16()),
		Dst:       netip.AddrPortFrom(netip.AddrFrom4(k.DAddr), k.DPort.uint16()),
		Proto:     k.Proto,
		Direction: Direction(k.Direction),
		Endpoint:  k.Endpoint,
	}
}

func ct6Entry(k ct6Key) CTEntry {
	return CTEntry{
		Src:       netip.AddrPortFrom(netip.AddrFrom16(k.SAddr), k.SPort.uint16()),
		Dst:       netip.AddrPortFrom(netip.AddrFrom16(k.DAddr), k.DPort.uint16()),
		Proto:     k.Proto,
		Direction: Direction(k.Direction),
		Endpoint:  k.Endpoint,
	}
}

// walkCT calls fn with every entry of the four CT maps: its map, raw key
// and decoded entry.
func (d *Datapath) walkCT(fn func(m *ebpf.Map, key any, e CTEntry)) error {
	wall, now := bootTime(), monoNow()
	var v ctEntry
	for _, name := range ctMaps {
		m := d.maps[name]
		if name == "rw_ct4_tcp" || name == "rw_ct4_other" {
			var k ct4Key
			it := m.Iterate()
			for it.Next(&k, &v) {
				e := ct4Entry(k)
				d.fillCT(&e, v, wall, now)
				fn(m, k, e)
			}
			if err := it.Err(); err != nil {
				return fmt.Errorf("list %s: %w", name, err)
			}
			continue
		}
		var k ct6Key
		it := m.Iterate()
		for it.Next(&k, &v) {
			e := ct6Entry(k)
			d.fillCT(&e, v, wall, now)
			fn(m, k, e)
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("list %s: %w", name, err)
		}
	}
	return nil
}

// CT lists the connection-tracking maps (TCP first, IPv4 first).
func (d *Datapath) CT() ([]CTEntry, error) {
	var out []CTEntry
	err := d.walkCT(func(_ *ebpf.Map, _ any, e CTEntry) { out = append(out, e) })
	if err != nil {
		return nil, err
	}
	return out, nil
}

// FlushCT deletes the CT entries of one endpoint (endpoint > 0) or all of
// them (endpoint 0) and returns how many it deleted. The flows' next
// packets are new flows: policy decides them, and a reply whose entry is
// gone is decided as a packet in its own direction.
func (d *Datapath) FlushCT(endpoint uint16) (int, error) {
	type del struct {
		m *ebpf.Map
		k any
	}
	var dels []del
	if err := d.walkCT(func(m *ebpf.Map, k any, e CTEntry) {
		if endpoint == 0 || e.Endpoint == endpoint {
			dels = append(dels, del{m, k})
		}
	}); err != nil {
		return 0, fmt.Errorf("flush CT: %w", err)
	}
	n := 0
	for _, x := range dels {
		err := x.m.Delete(x.k)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue // expired and reused meanwhile
		}
		if err != nil {
			return n, fmt.Errorf("flush CT: deleted %d, then: %w", n, err)
		}
		n++
	}
	return n, nil
}
