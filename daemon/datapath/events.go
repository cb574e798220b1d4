package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/perf"
	"github.com/cilium/ebpf/ringbuf"
)

// perfPinName is where rw_events is pinned when it is a perf event array,
// so that switching transports never meets a pinned map of the other type.
const perfPinName = "rw_events_perf"

// perfBufferPerCPU is the size of each CPU's perf ring (the ring buffer
// is one 1 MiB ring for all CPUs).
const perfBufferPerCPU = 256 << 10

// chooseEvents picks the event transport for the configured mode on a
// kernel with or without ring buffers, and says why.
func chooseEvents(mode string, haveRingBuf bool) (transport, why string, err error) {
	switch mode {
	case EventsRingBuf:
		if !haveRingBuf {
			return "", "", errors.New(`[datapath] events = "ringbuf": this kernel has no BPF ring buffer (5.8+); write "auto" or "perf"`)
		}
		return EventsRingBuf, `[datapath] events = "ringbuf"`, nil
	case EventsPerf:
		return EventsPerf, `[datapath] events = "perf" forces the perf event array`, nil
	case EventsAuto:
	default:
		return "", "", fmt.Errorf(`[datapath] events = %q: write "auto", "ringbuf" or "perf"`, mode)
	}
	if haveRingBuf {
		return EventsRingBuf, "auto: the kernel has BPF ring buffers", nil
	}
	return EventsPerf, "auto: the kernel has no BPF ring buffer (5.8+); perf event array", nil
}

// perfEvents turns the rw_events spec (a ring buffer in the object) into a
// perf event array with one entry per possible CPU.
func perfEvents(ms *ebpf.MapSpec) {
	ms.Type = ebpf.PerfEventArray
	ms.KeySize, ms.ValueSize = 4, 4
	ms.MaxEntries = 0 // the library sets the number of possible CPUs
	ms.Flags = 0
}

// pinName is the pin of the map the objects call name.
func (d *Datapath) pinName(name string) string {
	if name == "rw_events" && d.events == EventsPerf {
		return perfPinName
	}
	return name
}

// unpinOtherEvents removes the pin of the other transport's map, left by a
// run in the other mode. Programs still attached keep their map until they
// are replaced; only the name goes.
func (d *Datapath) unpinOtherEvents() {
	other := perfPinName
	if d.events == EventsPerf {
		other = "rw_events"
	}
	if err := os.Remove(filepath.Join(d.opts.PinDir, other)); err == nil {
		d.log.Info("removed the pinned event map of the other transport", "map", other, "events", d.events)
	}
}

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
	// Service is set on the socket load balancer's events (a longer
	// record, struct svc_event): Dst is then the backend chosen, or the
	// VIP when there was none (drop "no service backend").
	Service *ServiceEvent `json:"service,omitempty"`
}

// ServiceEvent is the translation a socket load balancer event reports.
type ServiceEvent struct {
	VIP     netip.AddrPort `json:"vip"`     // what the client asked for
	ID      uint32         `json:"id"`      // rw_services id
	Backend uint32         `json:"backend"` // rw_svc_backends id, 0 when none
}

func decodeEvent(b []byte, wall func(uint64) time.Time) (Event, error) {
	var r rawEvent
	if _, err := binary.Decode(b, binary.NativeEndian, &r); err != nil {
		return Event{}, fmt.Errorf("decode event: %w", err)
	}
	if r.Family != 4 && r.Family != 6 {
		return Event{}, fmt.Errorf("decode event: address family %d", r.Family)
	}
	ev := Event{
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
	}
	if len(b) >= binary.Size(rawSvcEvent{}) {
		var s rawSvcEvent
		if _, err := binary.Decode(b, binary.NativeEndian, &s); err != nil {
			return Event{}, fmt.Errorf("decode service event: %w", err)
		}
		ev.Service = &ServiceEvent{VIP: netip.AddrPortFrom(addrFrom(r.Family, s.VIP), s.VIPPort.uint16()),
			ID: s.Service, Backend: s.Backend}
	}
	return ev, nil
}

// eventSource is either transport's reader: read returns the next record.
type eventSource struct {
	read  func() ([]byte, error)
	close func() error
}

func (d *Datapath) eventSource() (eventSource, error) {
	m := d.maps["rw_events"]
	if d.events == EventsPerf {
		rd, err := perf.NewReader(m, perfBufferPerCPU)
		if err != nil {
			return eventSource{}, fmt.Errorf("open rw_events perf reader: %w", err)
		}
		var rec perf.Record
		return eventSource{close: rd.Close, read: func() ([]byte, error) {
			for {
				if err := rd.ReadInto(&rec); err != nil {
					return nil, err
				}
				// The program counts what it could not write (lost).
				if rec.LostSamples == 0 {
					return rec.RawSample, nil
				}
			}
		}}, nil
	}
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		return eventSource{}, fmt.Errorf("open rw_events reader: %w", err)
	}
	var rec ringbuf.Record
	return eventSource{close: rd.Close, read: func() ([]byte, error) {
		err := rd.ReadInto(&rec)
		return rec.RawSample, err
	}}, nil
}

// Events streams decoded events until ctx ends; the channel is closed
// then. Either transport has one consumer (the ring buffer one position,
// the perf array one ring per CPU installed by the reader), so run one
// Events at a time (the monitor fans out). Undecodable records are skipped.
func (d *Datapath) Events(ctx context.Context) (<-chan Event, error) {
	rd, err := d.eventSource()
	if err != nil {
		return nil, err
	}
	out := make(chan Event, 256)
	wall := bootTime()
	stop := context.AfterFunc(ctx, func() { rd.close() })
	go func() {
		defer close(out)
		defer stop()
		defer rd.close()
		for {
			raw, err := rd.read()
			if err != nil {
				if errors.Is(err, os.ErrClosed) || ctx.Err() != nil {
					return
				}
				d.log.Warn("read rw_events", "err", err)
				return
			}
			ev, err := decodeEvent(raw, wall)
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

// EventCount is what became of one endpoint's events since its limiter
// entry was made (endpoint 0: packets of no known endpoint).
type EventCount struct {
	Endpoint   uint16 `json:"endpoint"`
	Reported   uint64 `json:"reported"`   // written to the transport
	Suppressed uint64 `json:"suppressed"` // over the endpoint's rate limit
	Lost       uint64 `json:"lost"`       // within the limit, refused by the transport (full; perf: no reader)
}

// EventCounts returns every endpoint's event counters, by endpoint.
func (d *Datapath) EventCounts() ([]EventCount, error) {
	m := d.maps["rw_event_limit"]
	var keys []uint32
	var prev any // nil: the first key
	for range m.MaxEntries() {
		var k uint32
		if err := m.NextKey(prev, &k); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				break
			}
			return nil, fmt.Errorf("iterate rw_event_limit: %w", err)
		}
		keys = append(keys, k)
		prev = k
	}
	out := make([]EventCount, 0, len(keys))
	for _, k := range keys {
		var v eventLimit
		if err := m.LookupWithFlags(k, &v, ebpf.LookupLock); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			return nil, fmt.Errorf("read rw_event_limit %d: %w", k, err)
		}
		out = append(out, EventCount{Endpoint: uint16(k), Reported: v.Allowed - min(v.Lost, v.Allowed),
			Suppressed: v.Suppressed, Lost: v.Lost})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Endpoint < out[j].Endpoint })
	return out, nil
}

// EventLimit is each endpoint's event budget in force.
func (d *Datapath) EventLimit() (rate, burst uint32) { return d.opts.EventRate, d.opts.EventBurst }
