// Package restart is the restart gate that `rackwired prestart` runs as the
// unit's ExecStartPre: it decides when this start of the daemon may proceed
// so that a fleet-wide restart (an upgrade pushed everywhere, a store outage
// that made every agent exit) does not reach the store all at once, and so
// that a daemon that keeps failing backs off instead of hammering it.
//
// The gate owns one file, <state_dir>/restart.json, written only by Run (the
// prestart process) and by MarkReady (the daemon, once it serves). The two
// never run at the same time: systemd runs ExecStartPre to completion before
// ExecStart. Every write is atomic (temp file, fsync, rename, fsync of the
// directory), so a crash leaves either the old or the new state.
//
// # Windows and "at most once per window"
//
// The jitter window W comes from [restart] fleet_size (WindowFor) unless
// [restart] jitter_window overrides it ("0s" turns the gate off: every start
// proceeds at once and only the attempt is recorded). A window is a span
// [start, start+W) of wall-clock time that belongs to this host. Each gated
// start opens the next window and proceeds at a uniformly random offset
// inside it:
//
//	window start = max(now, end of the previous window, last attempt + backoff)
//	start time   = window start + rand[0,1) × W
//
// So a host starts at most once per window: once a window's start has been
// used, the next gated start cannot fall before that window's end. The first
// start of a fleet-wide event (every host's previous window long over) opens
// a window at "now" on every host, and the hosts' start times are spread
// uniformly over the next W. A host that restarts again within its window
// (a crash, a second upgrade) goes to a random point of the following window.
// A start time, once drawn, is kept: if prestart is killed while it waits,
// the next prestart waits for the same time rather than drawing again, and a
// drawn time whose window has passed unused is dropped and a new window
// opened.
//
// The longest wait is therefore W + max(W, backoff_max): a restart just
// after a start waits for the rest of the current window and then up to a
// whole next window (40 min for 1,000 hosts, 8h at the 4h cap). Times in
// the state file further ahead than that (the clock went back, or the file
// was edited) are ignored, so no decision waits longer. The unit's
// TimeoutStartSec covers ExecStartPre; if it is shorter, systemd kills the
// waiting prestart, Restart=on-failure runs it again and it keeps waiting
// for the same drawn time, so a short timeout costs a failed start in the
// journal, not a lost or earlier start.
//
// # Backoff
//
// Prestart records "attempt started" when it lets the daemon through; the
// daemon calls MarkReady once it really serves (the moment it sends
// READY=1), which clears the attempt and the failure count. An attempt still
// open at the next prestart never got ready: it is a failed start. After f
// consecutive failed starts the next window opens no earlier than
// backoff_min × 2^(f-1) after the last attempt, capped at backoff_max;
// the jitter inside the window still applies, so hosts that failed together
// (the store was down) do not retry together.
//
// # Not delayed
//
// In this order: RACKWIRE_START_NOW=1 in prestart's environment; the flag
// file <state_dir>/start-now (removed once used, so it covers exactly one
// start); the gate turned off; no state file at all (the first start after
// installation). Each of these starts at once and still counts as the
// start of a window.
//
// # Bad input
//
// A state file that cannot be read or parsed, or has an unknown version, is
// logged and replaced: the start is treated as a gated start with a fresh
// window from now and no failures. That is never immediate (a state format
// change would otherwise make a whole fleet start at once during the upgrade
// that brought it) and never longer than one window, so it cannot become a
// crash loop nor a start that never comes. If the state cannot be written
// (read-only or missing state_dir) the decision still stands and the daemon
// still starts; the failure is logged.
//
// Who may import it: cmd/rackwired (prestart) and daemon (MarkReady). It
// imports only daemon/config.
package restart

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
)

// File names inside the state directory.
const (
	StateFile = "restart.json"
	// FlagFile, when present, lets the next start through at once; the gate
	// removes it.
	FlagFile = "start-now"
	// EnvStartNow set to 1 (or true/yes) lets this start through at once.
	EnvStartNow = "RACKWIRE_START_NOW"
)

// Reasons, as logged in reason=.
const (
	ReasonEnv        = "override-env"
	ReasonFlag       = "override-file"
	ReasonDisabled   = "gate-disabled"
	ReasonFirstStart = "first-start"
	ReasonJitter     = "jitter"
	ReasonBackoff    = "backoff"
	// ReasonStateReset: the state file was unreadable; jitter from now.
	ReasonStateReset = "state-reset"
)

// Window formula constants; see WindowFor.
const (
	refFleet  = 1000
	refWindow = 20 * time.Minute
	// MinWindow and MaxWindow clamp the derived window.
	MinWindow = 30 * time.Second
	MaxWindow = 4 * time.Hour
)

// windowExp makes the window 3× longer for a 5× larger fleet: 20 min at
// 1,000 hosts, 60 min at 5,000.
var windowExp = math.Log(3) / math.Log(5)

// WindowFor is the jitter window derived from the fleet size:
// 20m × (n/1000)^0.6826, clamped to [MinWindow, MaxWindow]. The exponent
// makes 5,000 hosts get exactly 60 min; the rate of starts the store sees
// (n/W) still grows with the fleet, but sublinearly (50/min at 1,000, 83/min
// at 5,000, 129/min at 20,000), matching stores that are sized with the
// fleet. The 4h cap (reached near 38,000 hosts) keeps a fleet-wide restart
// within a working shift; larger fleets set jitter_window explicitly.
func WindowFor(fleetSize int) time.Duration {
	if fleetSize < 1 {
		fleetSize = 1
	}
	w := time.Duration(float64(refWindow) * math.Pow(float64(fleetSize)/refFleet, windowExp))
	w = w.Round(time.Second)
	return min(max(w, MinWindow), MaxWindow)
}

// Window is the effective window for cfg: jitter_window when written, else
// WindowFor(fleet_size). Zero means the gate is off.
func Window(cfg config.Restart) time.Duration {
	if cfg.JitterWindow.Set {
		return cfg.JitterWindow.Duration
	}
	return WindowFor(cfg.FleetSize)
}

// Backoff is the wait after failures consecutive failed starts:
// min × 2^(failures-1), capped at max; zero for no failures.
func Backoff(cfg config.Restart, failures int) time.Duration {
	if failures <= 0 {
		return 0
	}
	lo, hi := cfg.BackoffMin.Duration, cfg.BackoffMax.Duration
	if lo <= 0 {
		lo = time.Second
	}
	if hi < lo {
		hi = lo
	}
	b := lo
	for i := 1; i < failures; i++ {
		if b >= hi/2 {
			return hi
		}
		b *= 2
	}
	return min(b, hi)
}

// MaxDelay is the longest wait the gate can impose with cfg:
// W + max(W, backoff_max).
func MaxDelay(cfg config.Restart) time.Duration {
	w := Window(cfg)
	return w + max(w, cfg.BackoffMax.Duration)
}

// state is the content of restart.json.
type state struct {
	Version int `json:"version"`
	// WindowStart/WindowEnd bound the window of the last drawn start.
	WindowStart time.Time `json:"window_start"`
	WindowEnd   time.Time `json:"window_end"`
	// Slot is the drawn start time; SlotUsed says whether it was used.
	Slot     time.Time `json:"slot"`
	SlotUsed bool      `json:"slot_used"`
	// AttemptAt is when the gate last let the daemon through;
	// AttemptPending says the daemon has not called MarkReady since.
	AttemptAt      time.Time `json:"attempt_at,omitzero"`
	AttemptPending bool      `json:"attempt_pending"`
	// Failures counts consecutive attempts that never got ready.
	Failures int       `json:"failures"`
	ReadyAt  time.Time `json:"ready_at,omitzero"`
	// Reason is why Slot was chosen, logged again if it is reused.
	Reason string `json:"reason,omitempty"`
}

const stateVersion = 1

// Decision is what the gate decided for this start.
type Decision struct {
	// Reason is one of the Reason constants.
	Reason string
	// Until is when the start may proceed; Delay is Until - now (0 = now).
	Until time.Time
	Delay time.Duration
	// Window is the effective jitter window; Failures the consecutive failed
	// starts counted so far; Backoff the wait they imposed.
	Window   time.Duration
	Failures int
	Backoff  time.Duration
	// StateErr says why the old state was not usable ("" if it was).
	StateErr string

	next     state // the state to record before waiting
	consumed bool  // the flag file is to be removed
}

// Gate decides and enforces one start. Zero-valued func fields take the
// real clock, math/rand, the process environment and a real sleep.
type Gate struct {
	Dir  string // state directory
	Cfg  config.Restart
	Now  func() time.Time
	Rand func() float64 // uniform in [0,1)
	Env  func(string) string
	// Sleep waits d or until ctx ends; nil uses a timer.
	Sleep func(ctx context.Context, d time.Duration) error
	Log   *slog.Logger
}

func (g *Gate) now() time.Time {
	if g.Now != nil {
		return g.Now()
	}
	return time.Now()
}

func (g *Gate) rand() float64 {
	if g.Rand != nil {
		r := g.Rand()
		if r >= 0 && r < 1 {
			return r
		}
		return 0
	}
	return randFloat()
}

func (g *Gate) env(k string) string {
	if g.Env != nil {
		return g.Env(k)
	}
	return os.Getenv(k)
}

func (g *Gate) log() *slog.Logger {
	if g.Log != nil {
		return g.Log
	}
	return slog.New(slog.DiscardHandler)
}

// Decide reads the state and decides this start without writing anything.
// The error reports only what the caller may want to know about the state
// file; a usable Decision is always returned.
func (g *Gate) Decide() (Decision, error) {
	now := g.now().Truncate(time.Second)
	w := Window(g.Cfg)
	d := Decision{Window: w, Until: now}

	st, loadErr := load(filepath.Join(g.Dir, StateFile))
	missing := errors.Is(loadErr, fs.ErrNotExist)
	if loadErr != nil && !missing {
		d.StateErr = loadErr.Error()
		st = state{}
	}

	// A previous attempt that never got ready is a failed start.
	failures := st.Failures
	if st.AttemptPending {
		failures = min(failures+1, maxFailures)
	}
	d.Failures = failures
	st.Version = stateVersion
	st.Failures = failures
	st.AttemptPending = false

	immediate := ""
	switch {
	case truthy(g.env(EnvStartNow)):
		immediate = ReasonEnv
	case exists(filepath.Join(g.Dir, FlagFile)):
		immediate, d.consumed = ReasonFlag, true
	case w == 0:
		immediate = ReasonDisabled
	case missing:
		immediate = ReasonFirstStart
	}
	if immediate != "" {
		d.Reason = immediate
		st.WindowStart, st.WindowEnd, st.Slot, st.SlotUsed = now, now.Add(w), now, false
		st.Reason = immediate
		d.next = st
		return d, stateError(loadErr, missing)
	}

	backoff := Backoff(g.Cfg, failures)
	d.Backoff = backoff
	horizon := now.Add(MaxDelay(g.Cfg))
	sane := func(t time.Time) time.Time {
		if t.After(horizon) {
			return time.Time{}
		}
		return t
	}
	st.WindowEnd, st.Slot = sane(st.WindowEnd), sane(st.Slot)
	if st.AttemptAt.After(now) {
		st.AttemptAt = now
	}

	switch {
	case loadErr != nil:
		d.Reason = ReasonStateReset
		st.WindowStart, st.WindowEnd = now, now.Add(w)
		st.Slot, st.SlotUsed = now.Add(time.Duration(g.rand()*float64(w))).Truncate(time.Second), false
	case !st.SlotUsed && !st.Slot.IsZero() && now.Before(st.WindowEnd):
		// A start drawn earlier and not used yet (prestart was stopped
		// while waiting): keep it.
		d.Reason = st.Reason
		if d.Reason == "" {
			d.Reason = ReasonJitter
		}
	default:
		start := now
		d.Reason = ReasonJitter
		if st.WindowEnd.After(start) {
			start = st.WindowEnd
		}
		if backoff > 0 && !st.AttemptAt.IsZero() {
			if b := st.AttemptAt.Add(backoff); b.After(start) {
				start, d.Reason = b, ReasonBackoff
			}
		}
		// A window opens at most max(W, backoff_max) from now, so that the
		// start drawn in it stays within MaxDelay: a window end that is
		// further ahead (the clock went back by less than the horizon)
		// is not waited for in full.
		if limit := now.Add(MaxDelay(g.Cfg) - w); start.After(limit) {
			start = limit
		}
		st.WindowStart, st.WindowEnd = start, start.Add(w)
		st.Slot, st.SlotUsed = start.Add(time.Duration(g.rand()*float64(w))).Truncate(time.Second), false
	}
	st.Reason = d.Reason
	if st.Slot.After(now) {
		d.Until = st.Slot
	}
	d.Delay = d.Until.Sub(now)
	d.next = st
	return d, stateError(loadErr, missing)
}

func stateError(err error, missing bool) error {
	if err == nil || missing {
		return nil
	}
	return fmt.Errorf("state file unusable, replaced: %w", err)
}

// Run decides, records the decision, logs it in one line, waits until the
// start may proceed and records the attempt. It returns nil when the daemon
// may start now, and ctx's error if ctx ended while waiting (the caller
// exits non-zero so that systemd does not start the daemon). Problems with
// the state file are logged, never returned: the gate must not stop a start.
func (g *Gate) Run(ctx context.Context) (Decision, error) {
	log := g.log()
	d, stErr := g.Decide()
	if stErr != nil {
		log.Warn("restart state file unusable; using a fresh window", "path", filepath.Join(g.Dir, StateFile), "err", stErr)
	}
	if err := g.save(d.next); err != nil {
		log.Warn("cannot record restart state; deciding without it", "path", filepath.Join(g.Dir, StateFile), "err", err)
	}
	if d.consumed {
		if err := os.Remove(filepath.Join(g.Dir, FlagFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			log.Warn("cannot remove start-now flag file", "path", filepath.Join(g.Dir, FlagFile), "err", err)
		}
	}
	decision := "start"
	if d.Delay > 0 {
		decision = "delay"
	}
	log.Info("restart gate",
		"decision", decision,
		"reason", d.Reason,
		"delay", d.Delay.String(),
		"until", d.Until.Format(time.RFC3339),
		"window", d.Window.String(),
		"failures", d.Failures,
		"backoff", d.Backoff.String(),
	)
	if d.Delay > 0 {
		sleep := g.Sleep
		if sleep == nil {
			sleep = sleepCtx
		}
		if err := sleep(ctx, d.Delay); err != nil {
			return d, err
		}
	}
	st := d.next
	st.SlotUsed = true
	st.AttemptAt = g.now().Truncate(time.Second)
	st.AttemptPending = true
	if err := g.save(st); err != nil {
		log.Warn("cannot record restart attempt", "path", filepath.Join(g.Dir, StateFile), "err", err)
	}
	return d, nil
}

// MarkReady records that the daemon reached READY: the open attempt
// succeeded and the failure count is reset. The daemon calls it when it
// sends READY=1. A missing or unreadable state file is replaced.
func MarkReady(dir string) error {
	return markReady(dir, time.Now())
}

func markReady(dir string, now time.Time) error {
	st, err := load(filepath.Join(dir, StateFile))
	if err != nil {
		st = state{}
	}
	st.Version = stateVersion
	st.AttemptPending = false
	st.Failures = 0
	st.ReadyAt = now.Truncate(time.Second)
	if st.AttemptAt.IsZero() {
		// Started without prestart: count this as the window's start.
		st.AttemptAt, st.WindowStart, st.WindowEnd, st.Slot, st.SlotUsed = st.ReadyAt, st.ReadyAt, st.ReadyAt, st.ReadyAt, true
	}
	if err := writeState(dir, st); err != nil {
		return fmt.Errorf("mark ready: %w", err)
	}
	return nil
}

func (g *Gate) save(st state) error {
	return writeState(g.Dir, st)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func truthy(s string) bool {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "1", "true", "yes", "on":
		return true
	}
	return false
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// LastReason returns the reason the gate recorded for the start that is
// running now ("" when there is no usable state), and whether that reason
// delayed the start. The daemon exports it as a metric.
func LastReason(dir string) (reason string, delayed bool) {
	st, err := load(filepath.Join(dir, StateFile))
	if err != nil {
		return "", false
	}
	switch st.Reason {
	case ReasonJitter, ReasonBackoff, ReasonStateReset:
		return st.Reason, true
	}
	return st.Reason, false
}
