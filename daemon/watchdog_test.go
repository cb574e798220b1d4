package daemon

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestWatchdogStopsWhenSyncStuck: the watchdog is pinged while the sync
// loop finishes passes and not once it has been stuck past the limit, so
// systemd restarts the agent.
func TestWatchdogStopsWhenSyncStuck(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "20000") // ping every 10 ms
	t.Setenv("WATCHDOG_PID", "")
	var (
		mu    sync.Mutex
		pings int
	)
	var stuck atomic.Bool
	d := &Daemon{log: slog.New(slog.DiscardHandler)}
	d.opts.Notify = func(s string) {
		if strings.HasPrefix(s, "WATCHDOG=1") {
			mu.Lock()
			pings++
			mu.Unlock()
		}
	}
	d.stallAge = func() (time.Duration, bool) {
		if stuck.Load() {
			return syncStallLimit + time.Second, true
		}
		return time.Second, true
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return pings }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.watchdog(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	time.Sleep(200 * time.Millisecond)
	if n := count(); n < 5 {
		t.Fatalf("%d pings in 200 ms with a live sync loop, want about 20", n)
	}
	stuck.Store(true)
	time.Sleep(50 * time.Millisecond) // a tick in flight may still ping
	before := count()
	time.Sleep(200 * time.Millisecond)
	if n := count(); n != before {
		t.Errorf("%d pings while the sync loop was stuck, want none", n-before)
	}
	stuck.Store(false)
	time.Sleep(200 * time.Millisecond)
	if n := count(); n == before {
		t.Errorf("no ping after the sync loop recovered")
	}
}
