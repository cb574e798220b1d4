package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// buildBinary compiles rackwired once per test run.
var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rackwired-test-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "rackwired")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// testConfig writes a config whose every path is inside dir.
func testConfig(t *testing.T, dir, extra string) string {
	t.Helper()
	body := fmt.Sprintf(`version = 1
[node]
name = "lifecycle"
addresses = ["192.0.2.10"]
[agent]
state_dir = %q
socket = %q
socket_group = ""
[ipam]
cidrs = ["10.251.7.0/24"]
[datapath]
pin_dir = %q
policy_dir = %q
[metrics]
listen = "127.0.0.1:0"
[restart]
jitter_window = "0s"
%s`, filepath.Join(dir, "state"), filepath.Join(dir, "rackwire.sock"),
		filepath.Join("/sys/fs/bpf", "rwtest-"+filepath.Base(dir)), filepath.Join(dir, "policies.d"), extra)
	p := filepath.Join(dir, "rackwire.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCheckConfig(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	ok := testConfig(t, dir, "")
	tests := []struct {
		name     string
		args     []string
		wantCode int
		stdout   string
		stderr   string
	}{
		{"example", []string{"check-config", "--config", "../../packaging/rackwire.toml.example"}, 0, "is valid", ""},
		{"valid", []string{"check-config", "--config", ok}, 0, `socket = "` + filepath.Join(dir, "rackwire.sock"), ""},
		{"typo", []string{"check-config", "--config", writeTemp(t, "version = 1\n[store]\nadress = \"x\"\n")}, 1, "", ":3: store.adress: unknown key"},
		{"missing", []string{"check-config", "--config", filepath.Join(dir, "nope.toml")}, 1, "", "does not exist"},
		{"directory", []string{"check-config", "--config", dir}, 1, "", "is a directory"},
		{"garbage", []string{"check-config", "--config", writeTemp(t, "\x00\x01garbage")}, 1, "", "not UTF-8"},
		{"version", []string{"--version"}, 0, "rackwired ", ""},
		{"bad command", []string{"frobnicate"}, 2, "", "unknown command"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin, tt.args...)
			var so, se bytes.Buffer
			cmd.Stdout, cmd.Stderr = &so, &se
			err := cmd.Run()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tt.wantCode {
				t.Errorf("rackwired %v exit = %d, want %d\nstdout: %s\nstderr: %s", tt.args, code, tt.wantCode, so.String(), se.String())
			}
			if !strings.Contains(so.String(), tt.stdout) {
				t.Errorf("stdout = %q, want it to contain %q", so.String(), tt.stdout)
			}
			if !strings.Contains(se.String(), tt.stderr) {
				t.Errorf("stderr = %q, want it to contain %q", se.String(), tt.stderr)
			}
		})
	}
}

// TestCheckConfigHidesSecrets: with token_file and password_file set,
// check-config prints their paths and never what they hold, whether the
// config is valid or refused.
func TestCheckConfigHidesSecrets(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	const token, password = "5e1f0c2a-consul-token-secret", "bgp-md5-secret-77"
	tokenFile, pwFile := filepath.Join(dir, "consul.token"), filepath.Join(dir, "tor_a.pw")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	extra := fmt.Sprintf(`[store]
backend = "consul"
address = "127.0.0.1:8500"
token_file = %q
[bgp]
enabled = true
[[bgp.peers]]
name = "tor_a"
address = "10.1.1.1"
asn = 65001
password_file = %q
`, tokenFile, pwFile)
	check := func(cfgPath string) (int, string, string) {
		cmd := exec.Command(bin, "check-config", "--config", cfgPath)
		var so, se bytes.Buffer
		cmd.Stdout, cmd.Stderr = &so, &se
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return code, so.String(), se.String()
	}

	code, out, errOut := check(testConfig(t, dir, extra))
	if code != 0 {
		t.Fatalf("check-config exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, want := range []string{fmt.Sprintf("token_file = %q", tokenFile), fmt.Sprintf("password_file = %q", pwFile), "allow_insecure = false"} {
		if !strings.Contains(out, want) {
			t.Errorf("check-config output lacks %q:\n%s", want, out)
		}
	}
	for _, secret := range []string{token, password} {
		if strings.Contains(out+errOut, secret) {
			t.Errorf("check-config output shows a secret (%q):\n%s%s", secret, out, errOut)
		}
	}

	// Refused: the token file is open to others.
	if err := os.Chmod(tokenFile, 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = check(testConfig(t, dir, extra))
	if code != 1 || !strings.Contains(errOut, "store.token_file") || !strings.Contains(errOut, "chmod 600 "+tokenFile) {
		t.Errorf("check-config with a 0644 token file: exit %d, stderr %q; want 1 and the chmod to run", code, errOut)
	}
	for _, secret := range []string{token, password} {
		if strings.Contains(out+errOut, secret) {
			t.Errorf("check-config output shows a secret (%q):\n%s%s", secret, out, errOut)
		}
	}
}

func writeTemp(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// notifyListener collects sd_notify datagrams.
type notifyListener struct {
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []string
	new  chan struct{}
}

func listenNotify(t *testing.T, path string) *notifyListener {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifyListener{conn: c, new: make(chan struct{}, 1)}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, strings.Split(strings.TrimSpace(string(buf[:k])), "\n")...)
			n.mu.Unlock()
			select {
			case n.new <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() { c.Close() })
	return n
}

// wait returns once a message with prefix arrived after index from.
func (n *notifyListener) wait(t *testing.T, prefix string, from int, timeout time.Duration) int {
	t.Helper()
	deadline := time.After(timeout)
	for {
		n.mu.Lock()
		for i := from; i < len(n.msgs); i++ {
			if strings.HasPrefix(n.msgs[i], prefix) {
				n.mu.Unlock()
				return i
			}
		}
		seen := append([]string(nil), n.msgs...)
		n.mu.Unlock()
		select {
		case <-n.new:
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatalf("no %q from the agent within %s; got %q", prefix, timeout, seen)
		}
	}
}

func TestNotifyLifecycle(t *testing.T) {
	testenv.RequireRoot(t)
	bin := binary(t)
	dir := t.TempDir()
	cfgPath := testConfig(t, dir, "")
	n := listenNotify(t, filepath.Join(dir, "notify.sock"))
	// The gate runs first, as under systemd (first start: no delay).
	if out, err := exec.Command(bin, "prestart", "--config", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("prestart: %v\n%s", err, out)
	}

	var logs bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--config", cfgPath)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+filepath.Join(dir, "notify.sock"), "WATCHDOG_USEC=400000")
	sw := &syncWriter{w: &logs}
	cmd.Stderr = sw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		exec.Command(bin, "cleanup", "--config", cfgPath).Run()
	})

	ready := n.wait(t, "READY=1", 0, 30*time.Second)
	checkMetrics(t, sw)
	n.wait(t, "STATUS=", 0, time.Second)
	if _, err := os.Stat(filepath.Join(dir, "rackwire.sock")); err != nil {
		t.Errorf("READY=1 sent but the API socket is missing: %v", err)
	}
	n.wait(t, "WATCHDOG=1", ready, 5*time.Second)

	// A bad config on SIGHUP is refused and the agent keeps running.
	good, _ := os.ReadFile(cfgPath)
	if err := os.WriteFile(cfgPath, []byte("version = 1\n[store]\nadress = \"x\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Process.Signal(syscall.SIGHUP)
	r1 := n.wait(t, "RELOADING=1", ready, 10*time.Second)
	n.wait(t, "READY=1", r1, 10*time.Second)
	// A good config with a changed level is applied.
	if err := os.WriteFile(cfgPath, append(good, []byte("[log]\nlevel = \"debug\"\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Process.Signal(syscall.SIGHUP)
	r2 := n.wait(t, "RELOADING=1", r1+1, 10*time.Second)
	n.wait(t, "READY=1", r2, 10*time.Second)

	_ = cmd.Process.Signal(syscall.SIGTERM)
	n.wait(t, "STOPPING=1", r2, 10*time.Second)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("agent exit after SIGTERM = %v, want 0\n%s", err, logs.String())
		}
		done <- nil
	case <-time.After(15 * time.Second):
		t.Fatalf("agent did not exit after SIGTERM\n%s", logs.String())
	}
	out := logs.String()
	for _, want := range []string{"config reload refused", "store.adress", "config reloaded", "datapath left in place"} {
		if !strings.Contains(out, want) {
			t.Errorf("agent log lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "rackwire.sock")); !os.IsNotExist(err) {
		t.Errorf("socket left behind after a clean stop: %v", err)
	}
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// checkMetrics scrapes the agent's /metrics (its address is in the log).
func checkMetrics(t *testing.T, logs *syncWriter) {
	t.Helper()
	var addr string
	for i := 0; i < 50 && addr == ""; i++ {
		logs.mu.Lock()
		m := regexp.MustCompile(`"msg":"metrics serving","addr":"([^"]+)"`).FindStringSubmatch(logs.w.String())
		logs.mu.Unlock()
		if m != nil {
			addr = m[1]
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if addr == "" {
		t.Fatal("no metrics address in the log")
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{"rackwire_build_info{", "rackwire_agent_uptime_seconds", `rackwire_config_reloads_total{result="failed"} 0`,
		`rackwire_restart_gate_decisions_total{decision="start",reason="`, "rackwire_store_healthy",
		`rackwire_endpoints{state="ready"} 0`, "rackwire_identities ", "rackwire_policies 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
