package restart

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
)

var t0 = time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)

// harness is one simulated host: a state dir, a clock, a random source and
// a record of the sleeps the gate asked for.
type harness struct {
	g     *Gate
	now   time.Time
	r     float64
	env   map[string]string
	slept []time.Duration
	logs  bytes.Buffer
}

func newHarness(t *testing.T, cfg config.Restart) *harness {
	t.Helper()
	h := &harness{now: t0, env: map[string]string{}}
	h.g = &Gate{
		Dir:  t.TempDir(),
		Cfg:  cfg,
		Now:  func() time.Time { return h.now },
		Rand: func() float64 { return h.r },
		Env:  func(k string) string { return h.env[k] },
		Sleep: func(ctx context.Context, d time.Duration) error {
			h.slept = append(h.slept, d)
			h.now = h.now.Add(d) // the fake clock moves while prestart sleeps
			return nil
		},
		Log: slog.New(slog.NewTextHandler(&h.logs, nil)),
	}
	return h
}

func defaultCfg() config.Restart { return config.Default().Restart }

func windowCfg(w time.Duration) config.Restart {
	c := defaultCfg()
	c.JitterWindow = config.D(w)
	return c
}

// run runs the gate once and fails the test on an error.
func (h *harness) run(t *testing.T) Decision {
	t.Helper()
	d, err := h.g.Run(context.Background())
	if err != nil {
		t.Fatalf("Run() error = %v", err)
	}
	return d
}

func TestWindowFor(t *testing.T) {
	tests := []struct {
		hosts int
		want  time.Duration
	}{
		{0, MinWindow},
		{1, MinWindow},
		{100, 4*time.Minute + 9*time.Second},
		{1000, 20 * time.Minute},
		{5000, 60 * time.Minute},
		{20000, 2*time.Hour + 34*time.Minute + 34*time.Second},
		{1_000_000, MaxWindow},
	}
	for _, tt := range tests {
		if got := WindowFor(tt.hosts); got != tt.want {
			t.Errorf("WindowFor(%d) = %v, want %v", tt.hosts, got, tt.want)
		}
	}
	prev := time.Duration(0)
	for n := 1; n <= 100_000; n = n*11/10 + 1 {
		w := WindowFor(n)
		if w < prev {
			t.Fatalf("WindowFor(%d) = %v < WindowFor(smaller) = %v; want non-decreasing", n, w, prev)
		}
		prev = w
	}
}

func TestWindowOverride(t *testing.T) {
	tests := []struct {
		name string
		cfg  config.Restart
		want time.Duration
	}{
		{"derived", defaultCfg(), 20 * time.Minute},
		{"explicit", windowCfg(7 * time.Minute), 7 * time.Minute},
		{"disabled", windowCfg(0), 0},
	}
	for _, tt := range tests {
		if got := Window(tt.cfg); got != tt.want {
			t.Errorf("%s: Window() = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	cfg := defaultCfg() // 10s .. 30m
	tests := []struct {
		failures int
		want     time.Duration
	}{
		{0, 0}, {1, 10 * time.Second}, {2, 20 * time.Second}, {3, 40 * time.Second},
		{8, 1280 * time.Second}, {9, 30 * time.Minute}, {50, 30 * time.Minute}, {1 << 30, 30 * time.Minute},
	}
	for _, tt := range tests {
		if got := Backoff(cfg, tt.failures); got != tt.want {
			t.Errorf("Backoff(%d) = %v, want %v", tt.failures, got, tt.want)
		}
	}
}

func TestFirstStart(t *testing.T) {
	h := newHarness(t, defaultCfg())
	h.r = 0.9
	d := h.run(t)
	if d.Reason != ReasonFirstStart || d.Delay != 0 {
		t.Fatalf("first Run() = %s delay %v, want %s delay 0", d.Reason, d.Delay, ReasonFirstStart)
	}
	st, err := load(filepath.Join(h.g.Dir, StateFile))
	if err != nil {
		t.Fatalf("load after Run: %v", err)
	}
	if !st.AttemptPending || !st.SlotUsed || !st.AttemptAt.Equal(t0) {
		t.Errorf("state after first start = %+v, want a pending attempt at %v", st, t0)
	}
	if !strings.Contains(h.logs.String(), "decision=start reason=first-start") {
		t.Errorf("log = %q, want decision=start reason=first-start", h.logs.String())
	}
}

func TestAtMostOncePerWindow(t *testing.T) {
	w := 20 * time.Minute
	h := newHarness(t, windowCfg(w))
	h.run(t) // first start at t0, window [t0, t0+w)
	if err := markReady(h.g.Dir, h.now); err != nil {
		t.Fatal(err)
	}

	// A restart inside the window goes to the next window.
	h.now = t0.Add(time.Minute)
	h.r = 0.5
	d := h.run(t)
	want := t0.Add(w + w/2)
	if d.Reason != ReasonJitter || !d.Until.Equal(want) {
		t.Fatalf("restart inside window: %s until %v, want %s until %v", d.Reason, d.Until, ReasonJitter, want)
	}
	if err := markReady(h.g.Dir, h.now); err != nil {
		t.Fatal(err)
	}

	// And the one after that to the window after.
	h.r = 0
	d = h.run(t)
	if want := t0.Add(2 * w); !d.Until.Equal(want) {
		t.Fatalf("third start until %v, want %v (start of the third window)", d.Until, want)
	}
	if err := markReady(h.g.Dir, h.now); err != nil {
		t.Fatal(err)
	}

	// Long after the last window, a new window opens now.
	h.now = t0.Add(10 * w)
	h.r = 0.25
	d = h.run(t)
	if want := t0.Add(10*w + w/4); !d.Until.Equal(want) || d.Delay != w/4 {
		t.Fatalf("start after quiet period: until %v delay %v, want %v delay %v", d.Until, d.Delay, want, w/4)
	}
	if !strings.Contains(h.logs.String(), "decision=delay reason=jitter delay=5m0s until=") {
		t.Errorf("logs = %q, want a delay line with reason and until", h.logs.String())
	}
}

// TestFleetSpread: hosts that all restart at the same moment, each with its
// own randomness, start spread over the whole window.
func TestFleetSpread(t *testing.T) {
	w := 20 * time.Minute
	h := newHarness(t, windowCfg(w))
	h.run(t)
	markReady(h.g.Dir, h.now)
	h.now = t0.Add(48 * time.Hour)
	const hosts = 200
	var buckets [4]int
	for i := range hosts {
		h.r = (float64(i) + 0.5) / hosts
		d, err := h.g.Decide()
		if err != nil {
			t.Fatal(err)
		}
		if d.Delay < 0 || d.Delay >= w {
			t.Fatalf("host %d delay %v, want within [0, %v)", i, d.Delay, w)
		}
		buckets[int(d.Delay*4/w)]++
	}
	for q, n := range buckets {
		if n != hosts/4 {
			t.Errorf("quarter %d of the window got %d starts, want %d", q, n, hosts/4)
		}
	}
}

func TestBackoffGrowsAndResets(t *testing.T) {
	cfg := windowCfg(time.Second) // tiny window so backoff dominates
	cfg.BackoffMin, cfg.BackoffMax = config.D(10*time.Second), config.D(80*time.Second)
	h := newHarness(t, cfg)
	h.run(t) // first start, never gets ready
	wantBackoff := []time.Duration{10, 20, 40, 80, 80}
	for i, wb := range wantBackoff {
		wb *= time.Second
		attempt := h.now
		h.now = h.now.Add(2 * time.Second) // the daemon failed quickly
		d := h.run(t)
		if d.Failures != i+1 || d.Backoff != wb || d.Reason != ReasonBackoff {
			t.Fatalf("failure %d: failures=%d backoff=%v reason=%s, want %d %v %s", i+1, d.Failures, d.Backoff, d.Reason, i+1, wb, ReasonBackoff)
		}
		if want := attempt.Add(wb); !d.Until.Equal(want) {
			t.Fatalf("failure %d: until %v, want %v", i+1, d.Until, want)
		}
	}
	if err := markReady(h.g.Dir, h.now); err != nil {
		t.Fatal(err)
	}
	h.now = h.now.Add(time.Hour)
	d := h.run(t)
	if d.Failures != 0 || d.Backoff != 0 || d.Reason != ReasonJitter {
		t.Fatalf("after ready: failures=%d backoff=%v reason=%s, want 0 0s jitter", d.Failures, d.Backoff, d.Reason)
	}
}

func TestOverrides(t *testing.T) {
	h := newHarness(t, defaultCfg())
	h.run(t)
	markReady(h.g.Dir, h.now)
	h.now = h.now.Add(time.Minute)
	h.r = 0.9

	flag := filepath.Join(h.g.Dir, FlagFile)
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if d := h.run(t); d.Reason != ReasonFlag || d.Delay != 0 {
		t.Fatalf("with flag file: %s delay %v, want %s delay 0", d.Reason, d.Delay, ReasonFlag)
	}
	if _, err := os.Stat(flag); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("flag file still there after use (stat err %v)", err)
	}
	markReady(h.g.Dir, h.now)
	if d := h.run(t); d.Reason != ReasonJitter || d.Delay == 0 {
		t.Fatalf("after flag consumed: %s delay %v, want a jittered delay", d.Reason, d.Delay)
	}

	for _, v := range []string{"1", "true", "YES"} {
		h.env[EnvStartNow] = v
		if d := h.run(t); d.Reason != ReasonEnv || d.Delay != 0 {
			t.Fatalf("%s=%s: %s delay %v, want %s delay 0", EnvStartNow, v, d.Reason, d.Delay, ReasonEnv)
		}
	}
	h.env[EnvStartNow] = "0"
	if d := h.run(t); d.Reason == ReasonEnv {
		t.Fatalf("%s=0 overrode the gate", EnvStartNow)
	}
}

func TestDisabled(t *testing.T) {
	h := newHarness(t, windowCfg(0))
	for i := range 3 {
		if d := h.run(t); d.Reason != ReasonDisabled || d.Delay != 0 {
			t.Fatalf("run %d with jitter_window=0s: %s delay %v, want %s delay 0", i, d.Reason, d.Delay, ReasonDisabled)
		}
	}
}

func TestBadStateFile(t *testing.T) {
	w := 20 * time.Minute
	tests := []struct {
		name    string
		content string
	}{
		{"garbage", "\x00\x01not json"},
		{"empty", ""},
		{"wrong version", `{"version": 99}`},
		{"negative failures", `{"version": 1, "failures": -3}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, windowCfg(w))
			h.r = 0.5
			path := filepath.Join(h.g.Dir, StateFile)
			if err := os.WriteFile(path, []byte(tt.content), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := h.g.Decide(); err == nil {
				t.Errorf("Decide() error = nil, want the state problem reported")
			}
			d := h.run(t)
			if d.Reason != ReasonStateReset || d.Delay != w/2 {
				t.Fatalf("Run() = %s delay %v, want %s delay %v", d.Reason, d.Delay, ReasonStateReset, w/2)
			}
			if _, err := load(path); err != nil {
				t.Fatalf("state file not rewritten: %v", err)
			}
			if !strings.Contains(h.logs.String(), "state file unusable") {
				t.Errorf("logs = %q, want the bad state file logged", h.logs.String())
			}
		})
	}
}

// TestUnwritable: the gate still decides and lets the daemon start when it
// cannot keep state.
func TestUnwritable(t *testing.T) {
	t.Run("missing dir", func(t *testing.T) {
		h := newHarness(t, defaultCfg())
		h.g.Dir = filepath.Join(h.g.Dir, "does", "not", "exist")
		for range 2 {
			if d := h.run(t); d.Reason != ReasonFirstStart {
				t.Fatalf("Run() reason %s, want %s", d.Reason, ReasonFirstStart)
			}
		}
		if !strings.Contains(h.logs.String(), "cannot record restart state") {
			t.Errorf("logs = %q, want the write failure logged", h.logs.String())
		}
	})
	t.Run("state file is a directory", func(t *testing.T) {
		w := 20 * time.Minute
		h := newHarness(t, windowCfg(w))
		h.r = 0.999
		if err := os.Mkdir(filepath.Join(h.g.Dir, StateFile), 0o755); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			d := h.run(t)
			if d.Reason != ReasonStateReset || d.Delay >= w {
				t.Fatalf("Run() = %s delay %v, want %s delay < %v", d.Reason, d.Delay, ReasonStateReset, w)
			}
		}
	})
}

func TestKeepsDrawnSlot(t *testing.T) {
	w := 20 * time.Minute
	h := newHarness(t, windowCfg(w))
	h.run(t)
	markReady(h.g.Dir, h.now)
	h.now = t0.Add(48 * time.Hour)
	h.r = 0.75
	stop := errors.New("stopped")
	h.g.Sleep = func(ctx context.Context, d time.Duration) error { return stop }
	d1, err := h.g.Run(context.Background())
	if !errors.Is(err, stop) {
		t.Fatalf("Run() with interrupted sleep error = %v, want %v", err, stop)
	}
	h.now = h.now.Add(time.Minute)
	h.r = 0.1 // must not be used: the drawn start is kept
	d2, err := h.g.Decide()
	if err != nil {
		t.Fatal(err)
	}
	if !d2.Until.Equal(d1.Until) {
		t.Fatalf("after interrupted wait: until %v, want the same %v", d2.Until, d1.Until)
	}
	// Past the drawn time but inside its window: start now.
	h.now = d1.Until.Add(time.Second)
	if d3, _ := h.g.Decide(); d3.Delay != 0 {
		t.Fatalf("past the drawn time: delay %v, want 0", d3.Delay)
	}
}

func TestRealSleepCancel(t *testing.T) {
	h := newHarness(t, windowCfg(time.Hour))
	h.run(t)
	markReady(h.g.Dir, h.now)
	h.r = 0.5
	h.g.Sleep = nil
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := h.g.Run(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run() error = %v, want context.DeadlineExceeded", err)
	}
}

func TestClockWentBack(t *testing.T) {
	w := 20 * time.Minute
	cfg := windowCfg(w)
	h := newHarness(t, cfg)
	st := state{Version: 1, WindowStart: t0.Add(1000 * time.Hour), WindowEnd: t0.Add(1001 * time.Hour),
		Slot: t0.Add(1000 * time.Hour), SlotUsed: true, AttemptAt: t0.Add(1000 * time.Hour)}
	if err := writeState(h.g.Dir, st); err != nil {
		t.Fatal(err)
	}
	h.r = 0.999
	d, err := h.g.Decide()
	if err != nil {
		t.Fatal(err)
	}
	if limit := MaxDelay(cfg); d.Delay > limit {
		t.Fatalf("delay %v after the clock went back, want at most %v", d.Delay, limit)
	}
}

func TestMarkReadyWithoutState(t *testing.T) {
	dir := t.TempDir()
	if err := MarkReady(dir); err != nil {
		t.Fatalf("MarkReady() = %v", err)
	}
	st, err := load(filepath.Join(dir, StateFile))
	if err != nil || st.AttemptPending || st.Failures != 0 {
		t.Fatalf("state after MarkReady = %+v, %v; want a clean state", st, err)
	}
	if err := MarkReady(filepath.Join(dir, "missing")); err == nil {
		t.Fatalf("MarkReady(missing dir) = nil, want an error")
	}
}
