package datapath

import (
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
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
	Audit          bool           `json:"audit,omitempty"` // created by audit mode
	Created        time.Time      `json:"created"`
	LastSeen       time.Time      `json:"last_seen"`
}

// bootTime converts CLOCK_MONOTONIC nanoseconds to wall-clock time.
func bootTime() func(ns uint64) time.Time {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	base := time.Now().Add(-time.Duration(ts.Nano()))
	return func(ns uint64) time.Time { return base.Add(time.Duration(ns)) }
}

func (v ctEntry) fill(e *CTEntry, wall func(uint64) time.Time) {
	e.RemoteIdentity = v.RemoteIdentity
	e.Packets, e.Bytes = v.Packets, v.Bytes
	e.TCPFlags = v.TCPFlags
	e.Audit = v.Flags != 0
	e.Created, e.LastSeen = wall(v.CreatedNS), wall(v.LastSeenNS)
}

// CT lists both connection-tracking tables.
func (d *Datapath) CT() ([]CTEntry, error) {
	wall := bootTime()
	var (
		out []CTEntry
		k4  ct4Key
		k6  ct6Key
		v   ctEntry
	)
	it := d.maps["rw_ct4"].Iterate()
	for it.Next(&k4, &v) {
		e := CTEntry{
			Src:       netip.AddrPortFrom(netip.AddrFrom4(k4.SAddr), k4.SPort.uint16()),
			Dst:       netip.AddrPortFrom(netip.AddrFrom4(k4.DAddr), k4.DPort.uint16()),
			Proto:     k4.Proto,
			Direction: Direction(k4.Direction),
			Endpoint:  k4.Endpoint,
		}
		v.fill(&e, wall)
		out = append(out, e)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list rw_ct4: %w", err)
	}
	it = d.maps["rw_ct6"].Iterate()
	for it.Next(&k6, &v) {
		e := CTEntry{
			Src:       netip.AddrPortFrom(netip.AddrFrom16(k6.SAddr), k6.SPort.uint16()),
			Dst:       netip.AddrPortFrom(netip.AddrFrom16(k6.DAddr), k6.DPort.uint16()),
			Proto:     k6.Proto,
			Direction: Direction(k6.Direction),
			Endpoint:  k6.Endpoint,
		}
		v.fill(&e, wall)
		out = append(out, e)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list rw_ct6: %w", err)
	}
	return out, nil
}
