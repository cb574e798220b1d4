package daemon

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/internal/backoff"
)

// monitor reads rw_events (either transport has one consumer) and fans the
// events out to every `rackwire monitor` client. A slow client loses events
// rather than slowing the reader; it is told how many. Once a second it
// also reads the per-endpoint event counters and tells every client how
// many events of which endpoint the datapath's rate limit suppressed (or
// the transport lost) since the previous second.
type monitor struct {
	dp  *datapath.Datapath
	log *slog.Logger

	mu   sync.Mutex // guards subs
	subs map[chan monitorItem]*int
}

// monitorItem is a datapath event or, with notice set, a count of the
// events of ev.Endpoint suppressed and lost in the last interval.
type monitorItem struct {
	ev               datapath.Event
	notice           bool
	suppressed, lost uint64
}

// noticeInterval is how often suppressed events are reported.
const noticeInterval = time.Second

func newMonitor(dp *datapath.Datapath, log *slog.Logger) *monitor {
	return &monitor{dp: dp, log: log, subs: map[chan monitorItem]*int{}}
}

// broadcast hands it to every subscriber that has room.
func (m *monitor) broadcast(it monitorItem) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for ch, lost := range m.subs {
		select {
		case ch <- it:
		default:
			*lost++
		}
	}
}

// notices reports, every interval, each endpoint whose suppressed or lost
// counter (read with counts) grew. The first read is the baseline; a
// counter below its previous value (the endpoint was removed and its id
// reused) counts from zero.
func (m *monitor) notices(ctx context.Context, interval time.Duration, counts func() ([]datapath.EventCount, error)) {
	prev := map[uint16]datapath.EventCount{}
	first := true
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		cs, err := counts()
		if err != nil {
			m.log.Warn("cannot read the datapath's event counters", "err", err)
		}
		now := time.Now()
		for _, c := range cs {
			p := prev[c.Endpoint]
			if c.Suppressed < p.Suppressed || c.Lost < p.Lost {
				p = datapath.EventCount{}
			}
			prev[c.Endpoint] = c
			if first || (c.Suppressed == p.Suppressed && c.Lost == p.Lost) {
				continue
			}
			m.broadcast(monitorItem{ev: datapath.Event{Time: now, Endpoint: c.Endpoint}, notice: true,
				suppressed: c.Suppressed - p.Suppressed, lost: c.Lost - p.Lost})
		}
		first = err != nil && first
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (m *monitor) run(ctx context.Context) {
	go m.notices(ctx, noticeInterval, m.dp.EventCounts)
	for ctx.Err() == nil {
		evs, err := m.dp.Events(ctx)
		if err != nil {
			m.log.Warn("cannot read datapath events; monitor has no events", "err", err)
			backoff.Sleep(ctx, 10*time.Second)
			continue
		}
		for ev := range evs {
			m.broadcast(monitorItem{ev: ev})
		}
	}
}

// subscribe returns a channel of events and a function that ends the
// subscription and reports how many events were dropped for it.
func (m *monitor) subscribe() (<-chan monitorItem, func() int) {
	ch := make(chan monitorItem, 1024)
	lost := new(int)
	m.mu.Lock()
	m.subs[ch] = lost
	m.mu.Unlock()
	return ch, func() int {
		m.mu.Lock()
		defer m.mu.Unlock()
		delete(m.subs, ch)
		return *lost
	}
}
