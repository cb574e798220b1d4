package restart

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
)

// FuzzStateFile feeds arbitrary bytes as <state_dir>/restart.json to the
// gate. load either returns a state that writeState writes back and load
// reads again unchanged, or an error; and whatever the file holds, the
// decision the gate takes stays within its documented bound,
// 0 <= delay <= MaxDelay(cfg), and the state it records can be written.
func FuzzStateFile(f *testing.F) {
	enc := func(st state) []byte {
		b, _ := json.MarshalIndent(st, "", "  ")
		return b
	}
	f.Add(enc(state{Version: 1, WindowStart: t0, WindowEnd: t0.Add(20 * time.Minute), Slot: t0.Add(5 * time.Minute),
		AttemptAt: t0, AttemptPending: true, Failures: 3, Reason: ReasonJitter}), uint32(1000), int64(-1), uint32(10), uint32(600), 0.5, int64(60))
	f.Add(enc(state{Version: 1, WindowStart: t0, WindowEnd: t0.Add(time.Hour), Slot: t0.Add(30 * time.Minute), Reason: ReasonBackoff}), uint32(5000), int64(3600), uint32(1), uint32(60), 0.99, int64(0))
	f.Add(enc(state{Version: 1, Slot: t0.Add(1000 * time.Hour), WindowEnd: t0.Add(2000 * time.Hour), AttemptAt: t0.Add(time.Hour)}), uint32(1), int64(0), uint32(1), uint32(1), 0.0, int64(-7200))
	f.Add(enc(state{Version: 1, Failures: 1_000_000, AttemptAt: t0, AttemptPending: true}), uint32(1), int64(30), uint32(1000), uint32(86400), 0.1, int64(5))
	// The clock went back 50 minutes after a start in a 1h window: the
	// window end is ahead, but less than the horizon.
	f.Add(enc(state{Version: 1, WindowStart: t0, WindowEnd: t0.Add(time.Hour), Slot: t0.Add(20 * time.Minute), SlotUsed: true,
		AttemptAt: t0.Add(20 * time.Minute), Reason: ReasonJitter}), uint32(5000), int64(3600), uint32(1000), uint32(300), 0.99, int64(-30*60))
	f.Add(enc(state{Version: 2}), uint32(10), int64(-1), uint32(10), uint32(60), 0.3, int64(0))
	f.Add([]byte(`{"version":1,"failures":-1}`), uint32(10), int64(-1), uint32(10), uint32(60), 0.3, int64(0))
	f.Add([]byte(`{"version":1,"slot":"0000-01-01T00:00:00+01:00","window_end":"9999-12-31T23:59:59-23:59"}`), uint32(10), int64(-1), uint32(10), uint32(60), 0.3, int64(0))
	f.Add([]byte(`{"version":1,"attempt_at":"2026-11-23T09:00:00.999999999Z","ready_at":"1970-01-01T00:00:00Z"}`), uint32(10), int64(-1), uint32(10), uint32(60), 0.3, int64(0))
	f.Add([]byte(`{`), uint32(10), int64(-1), uint32(10), uint32(60), 0.3, int64(0))
	f.Add(bytes.Repeat([]byte(" "), maxStateSize+1), uint32(10), int64(-1), uint32(10), uint32(60), 0.3, int64(0))
	f.Fuzz(func(t *testing.T, data []byte, fleet uint32, jitterSec int64, backoffMinMs, backoffMaxSec uint32, r float64, nowShift int64) {
		// The [restart] section, within what config validation allows.
		cfg := config.Restart{FleetSize: int(fleet%1_000_000) + 1}
		if jitterSec >= 0 {
			cfg.JitterWindow = config.D(time.Duration(jitterSec%(24*3600+1)) * time.Second)
		}
		cfg.BackoffMin = config.D(time.Duration(backoffMinMs%(3600*1000)+1) * time.Millisecond)
		cfg.BackoffMax = config.D(cfg.BackoffMin.Duration + time.Duration(backoffMaxSec%(7*24*3600))*time.Second)
		now := t0.Add(time.Duration(nowShift%(10*365*24*3600)) * time.Second)

		dir := fuzzDir(t)
		path := filepath.Join(dir, StateFile)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := load(path)
		if err == nil {
			if st.Version != stateVersion || st.Failures < 0 {
				t.Fatalf("load accepted %+v", st)
			}
			// Round trip.
			dir2 := fuzzDir(t)
			if err := writeState(dir2, st); err != nil {
				t.Fatalf("a state load accepts cannot be written back: %v", err)
			}
			again, err := load(filepath.Join(dir2, StateFile))
			if err != nil {
				t.Fatalf("a state written back does not load: %v", err)
			}
			b1, _ := json.Marshal(st)
			b2, _ := json.Marshal(again)
			if !bytes.Equal(b1, b2) {
				t.Fatalf("round trip changed the state:\n%s\n%s", b1, b2)
			}
		} else if st != (state{}) && !isZeroState(st) {
			t.Fatalf("load returned an error and a state: %v %+v", err, st)
		}

		g := &Gate{Dir: dir, Cfg: cfg, Now: func() time.Time { return now }, Rand: func() float64 { return r },
			Env: func(string) string { return "" }, Log: slog.New(slog.DiscardHandler)}
		d, _ := g.Decide()
		nowS := now.Truncate(time.Second)
		if d.Delay < 0 || d.Delay > MaxDelay(cfg) {
			t.Fatalf("delay %v outside [0, %v] (reason %s, state %s)", d.Delay, MaxDelay(cfg), d.Reason, data)
		}
		if !d.Until.Equal(nowS.Add(d.Delay)) {
			t.Fatalf("until %v is not now %v + delay %v", d.Until, nowS, d.Delay)
		}
		if d.Reason == "" {
			t.Fatal("decision without a reason")
		}
		// The state the gate records is writable and loads back.
		if err := writeState(dir, d.next); err != nil {
			t.Fatalf("the gate's next state cannot be written: %v", err)
		}
		if _, err := load(path); err != nil {
			t.Fatalf("the gate's next state does not load: %v", err)
		}
		// MarkReady over whatever was there works too.
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := markReady(dir, now); err != nil {
			t.Fatalf("markReady: %v", err)
		}
	})
}

func isZeroState(st state) bool {
	b, _ := json.Marshal(st)
	z, _ := json.Marshal(state{})
	return bytes.Equal(b, z)
}

// fuzzDir is a fresh directory for one fuzz input: on tmpfs when there is
// one, so that the fsyncs of the code under test cost nothing. A fuzz
// worker stopped at the end of -fuzztime skips its cleanups: directories
// of earlier runs older than ten minutes are removed on the first call.
func fuzzDir(t *testing.T) string {
	sweepOnce.Do(func() {
		old, _ := filepath.Glob("/dev/shm/rackwire-fuzz-*")
		for _, d := range old {
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > 10*time.Minute {
				os.RemoveAll(d)
			}
		}
	})
	if d, err := os.MkdirTemp("/dev/shm", "rackwire-fuzz-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	return t.TempDir()
}

var sweepOnce sync.Once
