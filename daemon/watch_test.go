package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/daemon/store/local"
	"github.com/rackwire/rackwire/internal/consultest"
)

// countingStore counts the store's watch reads (entered: begun).
type countingStore struct {
	store.Store
	entered, watches atomic.Int64
}

func (c *countingStore) Watch(ctx context.Context, p string, idx uint64, w time.Duration) ([]store.KV, uint64, error) {
	c.entered.Add(1)
	kvs, next, err := c.Store.Watch(ctx, p, idx, w)
	c.watches.Add(1)
	return kvs, next, err
}

// TestWatchCoalescedReadsOncePerPause: a node-record watch woken by a
// burst of other hosts' starts reads the prefix once after its pause, not
// once per start (docs/scale.md "Fleet-wide restart"), and the first
// change after a quiet spell still reaches it at once. The pause is the
// test's (a hook in place of the sleep): deterministic, no timing.
func TestWatchCoalescedReadsOncePerPause(t *testing.T) {
	ls, err := local.Open(filepath.Join(t.TempDir(), "store.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ls.Close() })
	st := &countingStore{Store: ls}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	put := func(node string) {
		t.Helper()
		if err := st.Put(ctx, store.NodePrefix+"default/"+node, []byte(`{}`), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	put("h0")

	pauses := make(chan time.Duration)
	release := make(chan struct{})
	delivered := make(chan int, 16)
	a := &agent{st: st, log: slog.New(slog.DiscardHandler),
		watchSleep: func(ctx context.Context, d time.Duration) bool {
			select {
			case pauses <- d:
			case <-ctx.Done():
				return false
			}
			select {
			case <-release:
				return true
			case <-ctx.Done():
				return false
			}
		}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.watchCoalesced(ctx, store.NodePrefix+"default/", func(kvs []store.KV) { delivered <- len(kvs) })
	}()
	t.Cleanup(func() { cancel(); <-done })
	recv := func(what string, ch <-chan int) int { t.Helper(); return within(t, ch, what) }
	pause := func() time.Duration { t.Helper(); return within(t, pauses, "the watch's pause after a change") }

	if n := recv("first read", delivered); n != 1 {
		t.Fatalf("first delivery holds %d records, want 1", n)
	}
	if d := pause(); d < settleMin || d >= settleMin+settleSpread {
		t.Errorf("pause after a change %s, want in [%s, %s)", d, settleMin, settleMin+settleSpread)
	}
	// Twenty hosts start while the watch pauses: one read, all of them.
	before := st.watches.Load()
	const starts = 20
	for i := 1; i <= starts; i++ {
		put(fmt.Sprintf("h%d", i))
	}
	release <- struct{}{}
	if n := recv("the burst", delivered); n != starts+1 {
		t.Fatalf("delivery after the burst holds %d records, want %d", n, starts+1)
	}
	pause()
	if reads := st.watches.Load() - before; reads != 1 {
		t.Errorf("%d starts during the pause cost %d reads, want 1", starts, reads)
	}
	select {
	case n := <-delivered:
		t.Errorf("a second delivery (%d records) for one burst", n)
	default:
	}

	// Quiet: the watch parks in the store; the next start reaches it at
	// once, before any pause.
	release <- struct{}{}
	for deadline := time.Now().Add(10 * time.Second); st.entered.Load() < 3 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond) // until its third read is under way
	}
	put("late")
	if n := recv("a start after a quiet spell", delivered); n != starts+2 {
		t.Fatalf("delivery after the quiet spell holds %d records, want %d", n, starts+2)
	}
	pause()
}

// within returns the next value of ch, failing the test when none comes
// within 20 s (what says what was awaited).
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: nothing within 20s", what)
		var zero T
		return zero
	}
}

// scripted is a store whose watch answers come from the test.
type scripted struct {
	store.Store
	answers chan scriptedAnswer
}

type scriptedAnswer struct {
	kvs []store.KV
	idx uint64
}

func (s *scripted) Watch(ctx context.Context, _ string, _ uint64, _ time.Duration) ([]store.KV, uint64, error) {
	select {
	case a := <-s.answers:
		return a.kvs, a.idx, nil
	case <-ctx.Done():
		return nil, 0, ctx.Err()
	}
}

// TestWatchSpuriousWakePauses: on Consul a blocking query on an empty
// prefix (no store policies, no services) wakes on every write anywhere in
// the store; such a wake, which changed nothing under the prefix, is not
// handed on and is followed by the coalescing pause, while a real change
// is delivered and followed by the short pace only.
func TestWatchSpuriousWakePauses(t *testing.T) {
	st := &scripted{answers: make(chan scriptedAnswer)}
	pauses := make(chan time.Duration)
	delivered := make(chan []store.KV, 4)
	a := &agent{st: st, log: slog.New(slog.DiscardHandler),
		watchSleep: func(ctx context.Context, d time.Duration) bool {
			select {
			case pauses <- d:
				return true
			case <-ctx.Done():
				return false
			}
		}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.watch(ctx, store.PolicyPrefix, func(kvs []store.KV) { delivered <- kvs })
	}()
	t.Cleanup(func() { cancel(); <-done })
	step := func(what string, ans scriptedAnswer, wantDelivery bool, lo, hi time.Duration) {
		t.Helper()
		select {
		case st.answers <- ans:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the watch did not read", what)
		}
		var d time.Duration
		select {
		case d = <-pauses:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the watch did not pause", what)
		}
		select {
		case kvs := <-delivered:
			if !wantDelivery {
				t.Errorf("%s: handed on (%d keys), want nothing", what, len(kvs))
			}
		default:
			if wantDelivery {
				t.Errorf("%s: not handed on", what)
			}
		}
		if d < lo || d > hi {
			t.Errorf("%s: pause %s, want in [%s, %s]", what, d, lo, hi)
		}
	}
	step("first read (empty)", scriptedAnswer{nil, 5}, true, watchPace, watchPace)
	step("a write elsewhere", scriptedAnswer{nil, 9}, false, settleMin, settleMin+settleSpread)
	p := []store.KV{{Key: store.PolicyPrefix + "p1", Value: []byte("{}"), ModifyIndex: 12}}
	step("a policy written", scriptedAnswer{p, 12}, true, watchPace, watchPace)
	step("another write elsewhere", scriptedAnswer{p, 14}, false, settleMin, settleMin+settleSpread)
}

// TestWatchEmptyPrefixConsul: on real Consul a blocking query on an empty
// prefix returns on writes elsewhere (what made every agent's policy and
// service watches read once per write of a fleet-wide restart); the watch
// hands none of them on and pauses 1–2 s after each.
func TestWatchEmptyPrefixConsul(t *testing.T) {
	srv := consultest.Start(t)
	st, err := consul.New(consul.Options{Address: srv.HTTPAddr, Prefix: "rwt/", Node: "h1", SessionTTL: time.Minute}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	pauses := make(chan time.Duration, 64)
	var deliveries atomic.Int64
	a := &agent{st: st, log: slog.New(slog.DiscardHandler),
		watchSleep: func(ctx context.Context, d time.Duration) bool { pauses <- d; return ctx.Err() == nil }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.watch(ctx, store.PolicyPrefix, func([]store.KV) { deliveries.Add(1) })
	}()
	t.Cleanup(func() { cancel(); <-done })
	next := func(what string) time.Duration { t.Helper(); return within(t, pauses, what) }
	if d := next("first read"); d != watchPace {
		t.Errorf("pause after the first read %s, want %s", d, watchPace)
	}
	const writes = 5
	for i := range writes {
		if err := st.Put(ctx, fmt.Sprintf("%sdefault/h%d", store.NodePrefix, i), []byte(`{}`), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		// Each write wakes the empty prefix's query (Consul gives it the
		// index of the whole store).
		if d := next(fmt.Sprintf("write %d elsewhere", i)); d < settleMin || d >= settleMin+settleSpread {
			t.Errorf("pause after a wake by a write elsewhere %s, want in [%s, %s)", d, settleMin, settleMin+settleSpread)
		}
	}
	if n := deliveries.Load(); n != 1 {
		t.Errorf("%d deliveries, want 1 (the first read; %d writes elsewhere changed nothing)", n, writes)
	}
}

// TestWatchCoalescedPauseGrowsWhileBusy: a node-record watch whose reads
// keep finding changes waiting (a window of starts) pauses longer each
// time, 1–2 s, 2–3 s, then 4–5 s at most; a read that had to wait (a
// quiet spell) brings the pause back to 1–2 s. With the fixed 1–2 s pause
// the 100-agent gated restart cost 21 node-prefix reads per agent
// (docs/scale.md).
func TestWatchCoalescedPauseGrowsWhileBusy(t *testing.T) {
	sc := &scripted{answers: make(chan scriptedAnswer)}
	pauses := make(chan time.Duration, 16)
	a := &agent{st: sc, log: slog.New(slog.DiscardHandler),
		watchSleep: func(ctx context.Context, d time.Duration) bool { pauses <- d; return ctx.Err() == nil }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.watchCoalesced(ctx, store.NodePrefix+"default/", func([]store.KV) {})
	}()
	t.Cleanup(func() { cancel(); <-done })
	idx := uint64(0)
	answer := func() {
		t.Helper()
		idx++
		kvs := make([]store.KV, 0, idx)
		for i := range idx {
			kvs = append(kvs, store.KV{Key: fmt.Sprintf("%sdefault/h%d", store.NodePrefix, i), ModifyIndex: i + 1})
		}
		select {
		case sc.answers <- scriptedAnswer{kvs: kvs, idx: idx}:
		case <-time.After(10 * time.Second):
			t.Fatal("the watch did not read")
		}
	}
	check := func(what string, lo time.Duration) {
		t.Helper()
		if d := within(t, pauses, what); d < lo || d >= lo+settleSpread {
			t.Errorf("%s: pause %s, want in [%s, %s)", what, d, lo, lo+settleSpread)
		}
	}
	answer()
	check("first read", settleMin)
	answer() // at once: changes were waiting
	check("busy once", 2*settleMin)
	answer()
	check("busy twice", settleMax)
	answer()
	check("busy three times (the cap)", settleMax)
	time.Sleep(busyRead + 150*time.Millisecond) // the read waits: a quiet spell
	answer()
	check("after a quiet spell", settleMin)
}
