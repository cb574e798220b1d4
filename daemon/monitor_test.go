package daemon

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/datapath"
)

// TestMonitorNotices: the first read of the counters is only the baseline;
// afterwards every endpoint whose suppressed or lost counter grew gets one
// notice with the growth, unchanged endpoints none, and a counter that went
// down (the id was reused) counts from zero.
func TestMonitorNotices(t *testing.T) {
	reads := [][]datapath.EventCount{
		{{Endpoint: 1, Suppressed: 500}, {Endpoint: 2, Suppressed: 7}},
		{{Endpoint: 1, Suppressed: 800, Lost: 3}, {Endpoint: 2, Suppressed: 7}},
		{{Endpoint: 1, Suppressed: 800, Lost: 3}, {Endpoint: 2, Suppressed: 4}},
	}
	next := make(chan []datapath.EventCount)
	m := newMonitor(nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	items, done := m.subscribe()
	defer done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.notices(ctx, time.Millisecond, func() ([]datapath.EventCount, error) {
		select {
		case cs := <-next:
			return cs, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	var got []monitorItem
	for _, r := range reads {
		next <- r
	}
	// The notices of the last read are out once the next read is asked for.
	go func() {
		select {
		case next <- reads[len(reads)-1]:
		case <-ctx.Done():
		}
	}()
	timeout := time.After(3 * time.Second)
	for len(got) < 2 {
		select {
		case it := <-items:
			got = append(got, it)
		case <-timeout:
			t.Fatalf("notices %+v, want 2", got)
		}
	}
	want := []struct {
		ep               uint16
		suppressed, lost uint64
	}{{1, 300, 3}, {2, 4, 0}}
	for i, w := range want {
		g := got[i]
		if !g.notice || g.ev.Endpoint != w.ep || g.suppressed != w.suppressed || g.lost != w.lost {
			t.Errorf("notice %d = %+v, want endpoint %d: %d suppressed, %d lost", i, g, w.ep, w.suppressed, w.lost)
		}
	}
	select {
	case it := <-items:
		t.Errorf("unexpected notice %+v", it)
	case <-time.After(100 * time.Millisecond):
	}
}
