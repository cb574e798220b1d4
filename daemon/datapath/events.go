package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// Event is one decoded record of rw_events.
type Event struct {
	Time        time.Time      `json:"time"`
	Endpoint    uint16         `json:"endpoint"`
	Direction   Direction      `json:"direction"`
	Src         netip.AddrPort `json:"src"`
	Dst         netip.AddrPort `json:"dst"` // for ICMP the port is the ICMP type
	Proto       uint8          `json:"proto"`
	SrcIdentity uint32         `json:"src_identity"`
	DstIdentity uint32         `json:"dst_identity"`
	Verdict     Verdict        `json:"verdict"`
	Reason      Reason         `json:"reason"`
	Ifindex     uint32         `json:"ifindex"`
	Len         uint32         `json:"len"`
}

func decodeEvent(b []byte, wall func(uint64) time.Time) (Event, error) {
	var r rawEvent
	if _, err := binary.Decode(b, binary.NativeEndian, &r); err != nil {
		return Event{}, fmt.Errorf("decode event: %w", err)
	}
	if r.Family != 4 && r.Family != 6 {
		return Event{}, fmt.Errorf("decode event: address family %d", r.Family)
	}
	return Event{
		Time:        wall(r.TsNS),
		Endpoint:    r.Endpoint,
		Direction:   Direction(r.Direction),
		Src:         netip.AddrPortFrom(addrFrom(r.Family, r.SAddr), r.SPort.uint16()),
		Dst:         netip.AddrPortFrom(addrFrom(r.Family, r.DAddr), r.DPort.uint16()),
		Proto:       r.Proto,
		SrcIdentity: r.SrcIdentity,
		DstIdentity: r.DstIdentity,
		Verdict:     Verdict(r.Verdict),
		Reason:      Reason(r.Reason),
		Ifindex:     r.Ifindex,
		Len:         r.Len,
	}, nil
}

// Events streams decoded events until ctx ends; the channel is closed
// then. The ring buffer has one consumer position, so run one Events at a
// time (the monitor fans out). Undecodable records are skipped.
func (d *Datapath) Events(ctx context.Context) (<-chan Event, error) {
	rd, err := ringbuf.NewReader(d.maps["rw_events"])
	if err != nil {
		return nil, fmt.Errorf("open rw_events reader: %w", err)
	}
	out := make(chan Event, 256)
	wall := bootTime()
	stop := context.AfterFunc(ctx, func() { rd.Close() })
	go func() {
		defer close(out)
		defer stop()
		defer rd.Close()
		var rec ringbuf.Record
		for {
			if err := rd.ReadInto(&rec); err != nil {
				if errors.Is(err, os.ErrClosed) || ctx.Err() != nil {
					return
				}
				d.log.Warn("read rw_events", "err", err)
				return
			}
			ev, err := decodeEvent(rec.RawSample, wall)
			if err != nil {
				continue
			}
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}
