package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	epkg "github.com/rackwire/rackwire/daemon/endpoint"
)

// enableMetrics turns the agent's metrics on, on a free loopback port, by
// rewriting [metrics] listen and reloading; it returns the address.
func (a *agent) enableMetrics(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	b, err := os.ReadFile(a.cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg := strings.Replace(string(b), "[metrics]\nlisten = \"\"\n", fmt.Sprintf("[metrics]\nlisten = %q\n", addr), 1)
	if cfg == string(b) {
		t.Fatal("the harness config has no `[metrics] listen = \"\"` to replace")
	}
	if err := os.WriteFile(a.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	a.hup()
	if err := eventually(10*time.Second, func() error { _, err := goroutines(addr); return err }); err != nil {
		t.Fatalf("metrics on %s after reload: %v", addr, err)
	}
	return addr
}

// goroutines reads go_goroutines from the agent's metrics, on a
// connection of its own that is closed at once.
func goroutines(addr string) (int, error) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("no go_goroutines in /metrics")
}

// baseGoroutines is the agent's goroutine count at rest: the least of a
// few samples.
func baseGoroutines(t *testing.T, addr string) int {
	t.Helper()
	best := -1
	for i := 0; i < 5; i++ {
		n, err := goroutines(addr)
		if err != nil {
			t.Fatal(err)
		}
		if best < 0 || n < best {
			best = n
		}
		time.Sleep(100 * time.Millisecond)
	}
	return best
}

// noGoroutineLeft waits until the agent is back to at most base+slack
// goroutines (its own background work comes and goes).
func noGoroutineLeft(t *testing.T, addr string, base int) {
	t.Helper()
	const slack = 3
	var n int
	err := eventually(10*time.Second, func() error {
		var err error
		if n, err = goroutines(addr); err != nil {
			return err
		}
		if n > base+slack {
			return fmt.Errorf("%d goroutines, %d at rest", n, base)
		}
		return nil
	})
	if err != nil {
		t.Errorf("goroutines left behind: %v", err)
		return
	}
	t.Logf("goroutines: %d at rest before, %d after", base, n)
}

// unixHTTP is an HTTP client of the agent's socket that keeps no idle
// connection (which would hold a goroutine in the agent).
func unixHTTP(sock string) *http.Client {
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}
}

// TestEndpointNetnsInput: `endpoint add --netns X` of anything but a network
// namespace fails at once with the one message, which says nothing of
// what X is; the agent keeps serving and keeps no goroutine.
// /run/netns/NAME and /proc/PID/ns/net work.
func TestEndpointNetnsInput(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "nx", cidrs: []string{"10.217.80.0/29"}})
	maddr := a.enableMetrics(t)

	realNs := newNetns(t, "rwg-nx-real")
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	reg := filepath.Join(dir, "file")
	if err := os.WriteFile(reg, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink("/run/netns/"+realNs, link); err != nil {
		t.Fatal(err)
	}
	cases := []struct{ what, path string }{
		{"fifo", fifo},
		{"/dev/null", "/dev/null"},
		{"/dev/zero", "/dev/zero"},
		{"directory", dir},
		{"regular file", reg},
		{"symlink to a netns", link},
		{"mount namespace", "/proc/self/ns/mnt"},
		{"missing", "/run/netns/rwg-nx-missing"},
		{"relative", "run/netns/" + realNs},
		{"64 KiB path", "/" + strings.Repeat("a/", 32<<10)},
	}

	base := baseGoroutines(t, maddr)
	var first string
	for _, c := range cases {
		t.Run(c.what, func(t *testing.T) {
			t0 := time.Now()
			out, errs, err := a.run("endpoint", "add", "--name", "bad", "--labels", "app=bad", "--netns", c.path)
			took := time.Since(t0)
			t.Logf("%s: refused in %v: %s", c.what, took.Round(time.Microsecond), strings.TrimSpace(errs))
			if err == nil {
				t.Fatalf("endpoint add --netns %.60q succeeded: %s", c.path, out)
			}
			if !strings.Contains(errs, epkg.NetnsMsg) {
				t.Errorf("stderr %q, want %q", errs, epkg.NetnsMsg)
			}
			if first == "" {
				first = errs
			} else if errs != first {
				t.Errorf("stderr %q differs from the first refusal's %q: the answer must not tell cases apart", errs, first)
			}
			if took > 5*time.Second {
				t.Errorf("refused after %v, want well under a second", took)
			}
			t0 = time.Now()
			a.rw("status", "--json")
			if d := time.Since(t0); d > 5*time.Second {
				t.Errorf("status took %v after the refusal", d)
			}
		})
	}
	// Each case 10 more times, straight to the API: a goroutine left per
	// request by any one case would show as 10 more.
	hc := unixHTTP(a.sock)
	for _, c := range cases {
		body, _ := json.Marshal(api.EndpointAdd{Name: "bad", Labels: "app=bad", Netns: c.path})
		for i := 0; i < 10; i++ {
			t0 := time.Now()
			resp, err := hc.Post("http://rackwired/v1/endpoints", "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatalf("%s: %v", c.what, err)
			}
			rb, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if d := time.Since(t0); resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(rb), epkg.NetnsMsg) || d > 5*time.Second {
				t.Errorf("%s: %s in %v: %s", c.what, resp.Status, d, rb)
			} else if i == 0 {
				t.Logf("%s: API answered %d in %v", c.what, resp.StatusCode, d.Round(time.Microsecond))
			}
		}
	}
	var eps []api.Endpoint
	a.rwJSON(&eps, "endpoint", "list")
	if len(eps) != 0 {
		t.Errorf("refused adds left endpoints: %+v", eps)
	}
	noGoroutineLeft(t, maddr, base)
	if b, err := os.ReadFile(filepath.Join(a.dir, "rackwired.log")); err == nil && !strings.Contains(string(b), "netns refused") {
		t.Errorf("the agent's log does not say why the netns was refused")
	}

	// What works: /run/netns/NAME, and /proc/PID/ns/net of a process in a
	// namespace.
	t.Run("run netns", func(t *testing.T) {
		var ep api.Endpoint
		a.rwJSON(&ep, "endpoint", "add", "--name", "named", "--labels", "app=named", "--netns", "/run/netns/"+realNs)
		if ep.State != "ready" {
			t.Errorf("endpoint in /run/netns/%s: %+v", realNs, ep)
		}
	})
	t.Run("proc pid netns", func(t *testing.T) {
		ns := newNetns(t, "rwg-nx-proc")
		ctx, cancel := context.WithCancel(context.Background())
		sleeper := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "sleep", "60")
		if err := sleeper.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cancel(); _ = sleeper.Wait() })
		path := fmt.Sprintf("/proc/%d/ns/net", sleeper.Process.Pid)
		want, _ := os.Readlink("/proc/self/ns/net")
		if err := eventually(5*time.Second, func() error {
			if l, _ := os.Readlink(path); l == want || l == "" {
				return fmt.Errorf("%s is still %q", path, l)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		var ep api.Endpoint
		t0 := time.Now()
		a.rwJSON(&ep, "endpoint", "add", "--name", "bypid", "--labels", "app=bypid", "--netns", path)
		t.Logf("%s: added in %v", path, time.Since(t0).Round(time.Millisecond))
		if ep.State != "ready" || ep.Netns != path {
			t.Errorf("endpoint in %s: %+v", path, ep)
		}
		a.rw("endpoint", "delete", "bypid")
	})
	t.Run("host netns", func(t *testing.T) {
		// /proc/self is the agent itself: a network namespace, the host's.
		_, errs, err := a.run("endpoint", "add", "--name", "host", "--labels", "app=host", "--netns", "/proc/self/ns/net")
		if err == nil || !strings.Contains(errs, "host's own namespace") {
			t.Errorf("endpoint add --netns /proc/self/ns/net: err %v, stderr %q", err, errs)
		}
	})
}

// TestAPISlowClients: the API disconnects a client that sends part of its
// headers (after the read header timeout) or part of its body (after the
// read timeout), answers 431 to huge headers and 413 to huge bodies, keeps
// a monitor stream open past all of that, and keeps serving.
func TestAPISlowClients(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "sl", cidrs: []string{"10.217.81.0/29"}})
	maddr := a.enableMetrics(t)
	base := baseGoroutines(t, maddr)

	dial := func(t *testing.T) net.Conn {
		t.Helper()
		c, err := net.Dial("unix", a.sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// closedAfter reads c until the agent closes it.
	closedAfter := func(c net.Conn, max time.Duration) (time.Duration, error) {
		t0 := time.Now()
		c.SetReadDeadline(t0.Add(max))
		_, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return time.Since(t0), fmt.Errorf("still open after %v", max)
		}
		return time.Since(t0), nil
	}

	// A monitor stream, opened first, must outlive the slow clients.
	mon := dial(t)
	fmt.Fprintf(mon, "GET /v1/monitor HTTP/1.1\r\nHost: rackwired\r\n\r\n")
	monr := bufio.NewReader(mon)
	mon.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(monr, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("monitor: %v %v", resp, err)
	}
	monStart := time.Now()

	type result struct {
		what string
		took time.Duration
		err  error
	}
	res := make(chan result, 2)
	hdr := dial(t)
	fmt.Fprintf(hdr, "GET /v1/status HTTP/1.1\r\nHost: rackwired\r\nX-Slow: ")
	body := dial(t)
	fmt.Fprintf(body, "POST /v1/endpoints HTTP/1.1\r\nHost: rackwired\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"name\":")
	go func() { d, err := closedAfter(hdr, 20*time.Second); res <- result{"partial headers", d, err} }()
	go func() { d, err := closedAfter(body, 30*time.Second); res <- result{"partial body", d, err} }()

	hc := unixHTTP(a.sock)
	post := func(path string, b []byte) (int, string) {
		t.Helper()
		resp, err := hc.Post("http://rackwired"+path, "application/json", bytes.NewReader(b))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		rb, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(rb))
	}
	for _, c := range []struct {
		what string
		path string
		body []byte
	}{
		{"endpoint add, 1 MiB", "/v1/endpoints", []byte(`{"name":"` + strings.Repeat("a", 1<<20) + `"}`)},
		{"endpoint add, 8 MiB", "/v1/endpoints", []byte(`{"name":"` + strings.Repeat("a", 8<<20) + `"}`)},
		{"policy import, 8 MiB", "/v1/policies", []byte(`{"file":"x","data":"` + strings.Repeat("a", 8<<20) + `"}`)},
	} {
		code, msg := post(c.path, c.body)
		t.Logf("%s: %d %.120s", c.what, code, strings.Join(strings.Fields(msg), " "))
		if code != http.StatusRequestEntityTooLarge && code != http.StatusBadRequest {
			t.Errorf("%s: %d %.200s, want 413 (or 400)", c.what, code, msg)
		}
	}
	req, _ := http.NewRequest("GET", "http://rackwired/v1/status", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 64<<10))
	if resp, err := hc.Do(req); err != nil {
		t.Errorf("64 KiB header: %v", err)
	} else {
		resp.Body.Close()
		t.Logf("64 KiB header: %s", resp.Status)
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("64 KiB header: %s, want 431", resp.Status)
		}
	}

	for i := 0; i < 2; i++ {
		r := <-res
		t.Logf("%s: disconnected after %v (read header timeout %v, read timeout %v)", r.what, r.took.Round(time.Millisecond), api.ReadHeaderTimeout, api.ReadTimeout)
		if r.err != nil {
			t.Errorf("%s: %v", r.what, r.err)
		}
		limit := api.ReadHeaderTimeout
		if r.what == "partial body" {
			limit = api.ReadTimeout
		}
		if r.took < limit-time.Second || r.took > limit+5*time.Second {
			t.Errorf("%s: disconnected after %v, want about %v", r.what, r.took, limit)
		}
	}
	a.rw("status", "--json")

	// The monitor stream is still open past the read timeout: its 15s
	// keepalive arrives.
	mon.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		if _, err := monr.ReadByte(); err != nil {
			t.Errorf("monitor stream after %v: %v", time.Since(monStart), err)
			break
		}
		if time.Since(monStart) > api.ReadTimeout+time.Second {
			t.Logf("monitor stream still flowing after %v", time.Since(monStart).Round(time.Millisecond))
			break
		}
	}
	mon.Close()
	noGoroutineLeft(t, maddr, base)
}
