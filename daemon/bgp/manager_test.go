package bgp

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/birdconf"
	"github.com/rackwire/rackwire/birdconf/birdtest"
	"github.com/rackwire/rackwire/daemon/config"
)

func localConfig(dir string) config.BGP {
	return config.BGP{
		Enabled:    true,
		BirdBinary: "bird",
		BirdConfig: filepath.Join(dir, "bird.conf"),
		BirdSocket: filepath.Join(dir, "bird.ctl"),
		RouterID:   "10.201.0.9",
		LocalASN:   65101,
		Import:     []string{"0.0.0.0/0"},
	}
}

func waitStatus(t *testing.T, m *Manager, what string, cond func(Status) bool) Status {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st := m.Status(context.Background())
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: last status %+v", what, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func runManager(t *testing.T, m *Manager) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Manager.Run did not return after cancel")
		}
	})
}

// TestManagerWaitsForBird: with no BIRD the Manager keeps running, says so,
// writes the checked file, and configures BIRD once it appears.
func TestManagerWaitsForBird(t *testing.T) {
	ns := birdtest.NetNS(t, "rwe-m")
	dir := t.TempDir()
	cfg := localConfig(dir)
	m := New(cfg, []netip.Prefix{netip.MustParsePrefix("10.201.101.0/24")}, "test", nil)
	m.RetryInterval = 100 * time.Millisecond
	runManager(t, m)

	st := waitStatus(t, m, "BIRD reported absent", func(st Status) bool {
		return !st.BirdRunning && st.LastApply.Error != "" && !st.LastApply.Time.IsZero()
	})
	if !strings.Contains(st.BirdError, "not running") || !strings.Contains(st.LastApply.Error, "not running") {
		t.Errorf("Status() bird error %q, last apply %q; want both to say BIRD is not running", st.BirdError, st.LastApply.Error)
	}
	want, _, err := m.renderFile()
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(cfg.BirdConfig); string(got) != want {
		t.Errorf("with BIRD absent the checked file was not left for BIRD to read at start")
	}

	// BIRD appears (started with another file so that only the Manager's
	// configure can load the CIDR route).
	b := birdtest.Start(t, ns, dir, strings.Replace(want, "route 10.201.101.0/24 blackhole;", "", 1))
	if b.Config != cfg.BirdConfig {
		t.Fatalf("test setup: bird config %s, want %s", b.Config, cfg.BirdConfig)
	}
	os.WriteFile(cfg.BirdConfig, []byte(want), 0o640) // what the Manager had written
	st = waitStatus(t, m, "configured once BIRD runs", func(st Status) bool { return st.BirdRunning && st.LastApply.OK })
	c := &birdconf.Client{Socket: cfg.BirdSocket}
	if d, err := c.ShowProtocolsAll(context.Background(), "rw_static4"); err != nil || d.RoutesImported != 1 {
		t.Errorf("rw_static4 after retry = %+v, %v; want the CIDR route loaded", d, err)
	}

	// Drain, persisted in the drain file, then undrain.
	m.DrainFile = filepath.Join(dir, "drained")
	m.Drain(false)
	waitStatus(t, m, "drained", func(st Status) bool { return st.Drained && st.LastApply.OK && len(st.Announced) == 0 })
	if _, err := os.Stat(m.DrainFile); err != nil {
		t.Errorf("drain file not written: %v", err)
	}
	m.Undrain()
	waitStatus(t, m, "undrained", func(st Status) bool { return !st.Drained && len(st.Announced) == 1 })

	// Reload with a new CIDR is applied.
	m.Reload(cfg, []netip.Prefix{netip.MustParsePrefix("10.201.101.0/24"), netip.MustParsePrefix("10.201.102.0/24")})
	waitStatus(t, m, "reloaded", func(st Status) bool { return len(st.Announced) == 2 && st.LastApply.OK })
}

func TestManagerBirdBinaryMissing(t *testing.T) {
	dir := t.TempDir()
	cfg := localConfig(dir)
	cfg.BirdBinary = filepath.Join(dir, "no-bird")
	m := New(cfg, nil, "test", nil)
	err := m.ApplyNow(context.Background())
	if err == nil || !strings.Contains(err.Error(), "bird binary not found") {
		t.Errorf("ApplyNow() error = %v, want bird binary not found", err)
	}
	if _, err := os.Stat(cfg.BirdConfig); err == nil {
		t.Error("an unchecked config was written")
	}
	if st := m.Status(context.Background()); st.BirdRunning || st.LastApply.OK || st.LastApply.Error == "" {
		t.Errorf("Status() = %+v, want the failed apply reported", st)
	}
}

func TestManagerDisabled(t *testing.T) {
	dir := t.TempDir()
	cfg := localConfig(dir)
	cfg.Enabled = false
	m := New(cfg, nil, "test", nil)
	if err := m.ApplyNow(context.Background()); err != nil {
		t.Errorf("ApplyNow() disabled: %v", err)
	}
	if _, err := os.Stat(cfg.BirdConfig); err == nil {
		t.Error("disabled Manager wrote a config")
	}
	if st := m.Status(context.Background()); st.Enabled || st.BirdError != "" {
		t.Errorf("Status() disabled = %+v", st)
	}
}
