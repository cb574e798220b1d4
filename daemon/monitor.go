package daemon

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/internal/backoff"
)

// monitor reads rw_events (the ring buffer has one consumer position) and
// fans the events out to every `rackwire monitor` client. A slow client
// loses events rather than slowing the reader; it is told how many.
type monitor struct {
	dp  *datapath.Datapath
	log *slog.Logger

	mu   sync.Mutex // guards subs
	subs map[chan datapath.Event]*int
}

func newMonitor(dp *datapath.Datapath, log *slog.Logger) *monitor {
	return &monitor{dp: dp, log: log, subs: map[chan datapath.Event]*int{}}
}

func (m *monitor) run(ctx context.Context) {
	for ctx.Err() == nil {
		evs, err := m.dp.Events(ctx)
		if err != nil {
			m.log.Warn("cannot read datapath events; monitor has no events", "err", err)
			backoff.Sleep(ctx, 10*time.Second)
			continue
		}
		for ev := range evs {
			m.mu.Lock()
			for ch, lost := range m.subs {
				select {
				case ch <- ev:
				default:
					*lost++
				}
			}
			m.mu.Unlock()
		}
	}
}

// subscribe returns a channel of events and a function that ends the
// subscription and reports how many events were dropped for it.
func (m *monitor) subscribe() (<-chan datapath.Event, func() int) {
	ch := make(chan datapath.Event, 1024)
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
