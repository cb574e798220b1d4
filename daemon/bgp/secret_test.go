package bgp

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/birdconf"
	"github.com/rackwire/rackwire/daemon/config"
)

// fakeBird writes a stand-in for `bird -p -c FILE` that runs script.
func fakeBird(t *testing.T, dir, name, script string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestPasswordOnlyInBirdFile renders a peer with a known password: the
// file written for BIRD has it; Render (what the API shows), the apply
// errors (also when BIRD quotes the file back), Status and the debug logs
// of a run do not.
func TestPasswordOnlyInBirdFile(t *testing.T) {
	const secret = "Tcp-Md5-Secret-42"
	dir := t.TempDir()
	pw := filepath.Join(dir, "tor_a.pw")
	if err := os.WriteFile(pw, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := localConfig(dir)
	cfg.Peers = []config.Peer{{Name: "tor_a", Address: "10.1.1.1", ASN: 65001, PasswordFile: pw}}
	// bird -p accepts everything; no BIRD runs on the socket.
	cfg.BirdBinary = fakeBird(t, dir, "bird-ok", "exit 0")
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.201.7.0/24")}
	m := New(cfg, cidrs, "test", log)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if err := m.ApplyNow(ctx); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("ApplyNow with no BIRD = %v, want 'not running' (test setup)", err)
	}
	file, err := os.ReadFile(cfg.BirdConfig)
	if err != nil {
		t.Fatalf("the BIRD file was not written: %v", err)
	}
	if !strings.Contains(string(file), `password "`+secret+`";`) {
		t.Errorf("the BIRD file lacks the password:\n%s", file)
	}
	shown, err := m.Render()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(shown, secret) || !strings.Contains(shown, `password "<redacted>";`) {
		t.Errorf("Render() shows the password or lacks the placeholder:\n%s", shown)
	}
	if strings.Replace(shown, birdconf.Redacted, secret, 1) != string(file) {
		t.Errorf("Render() differs from the BIRD file beyond the password")
	}

	// A BIRD that refuses the file and quotes it back in its message.
	cfg.BirdBinary = fakeBird(t, dir, "bird-quotes", `cat "$3" >&2; exit 1`)
	m.Reload(cfg, cidrs)
	if err := os.Remove(cfg.BirdConfig); err != nil { // so that the text is checked again
		t.Fatal(err)
	}
	err = m.ApplyNow(ctx)
	if err == nil || !errors.Is(err, birdconf.ErrInvalid) {
		t.Fatalf("ApplyNow with a refusing bird -p = %v, want ErrInvalid", err)
	}
	if strings.Contains(err.Error(), secret) || !strings.Contains(err.Error(), `password "<redacted>"`) {
		t.Errorf("ApplyNow error shows the password or lost the quoted line: %v", err)
	}
	if st := m.Status(ctx); st.LastApply.Error == "" || strings.Contains(st.LastApply.Error, secret) {
		t.Errorf("Status().LastApply.Error = %q, want the refusal without the password", st.LastApply.Error)
	}

	// A run at debug level: applies, retries, health, reload.
	m.RetryInterval = 50 * time.Millisecond
	runManager(t, m)
	waitStatus(t, m, "a retried apply", func(st Status) bool { return !st.LastApply.OK && st.LastApply.Error != "" })
	m.Drain(true)
	m.Undrain()
	time.Sleep(300 * time.Millisecond)
	out := logs.String()
	if !strings.Contains(out, "BIRD config not applied") {
		t.Fatalf("the logs lack the apply failures (test setup):\n%s", out)
	}
	if strings.Contains(out, secret) {
		t.Errorf("the password appears in the logs:\n%s", out)
	}
}
