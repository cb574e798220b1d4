package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/testenv"
)

// binDir holds rackwired and rackwire, built once per run by require.
var binDir string

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}

// require checks what every test here needs and fails on a broken build.
func require(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "ping")
	testenv.RequireCommand(t, "bpftool")
	rackwired, _ := testenv.Binaries(t)
	binDir = filepath.Dir(rackwired)
}

// agentOpts are the config knobs the tests vary.
type agentOpts struct {
	tag    string   // short unique name: netns rwg-<tag>-*, pins /sys/fs/bpf/rwg-<tag>
	cidrs  []string // [ipam] cidrs
	attach string   // [datapath] attach
	audit  bool     // [datapath] policy_audit_mode
	// policyMax is [datapath] policy_max_entries (default 1024).
	policyMax int
	// socketGroup and adminGroup are [agent] socket_group and admin_group
	// (default ""). With a socketGroup, the agent's directory is made
	// root:<socketGroup> 0750 so that the group can reach the socket.
	socketGroup, adminGroup string
	// events is [datapath] events; "" takes $RACKWIRE_TEST_EVENTS (CI
	// runs the event tests once more with "perf"), else "auto".
	events string
	// eventRate and eventBurst are [datapath] events_rate and
	// events_burst; 0 leaves the agent's default.
	eventRate, eventBurst int
	// extra is appended to the config (e.g. [[services]] tables).
	extra string
}

// testEventsEnv names the variable that sets every test agent's
// [datapath] events (auto, ringbuf or perf) unless the test sets it.
const testEventsEnv = "RACKWIRE_TEST_EVENTS"

// eventsMode is the [datapath] events value for o.
func eventsMode(t *testing.T, o agentOpts) string {
	t.Helper()
	mode := o.events
	if mode == "" {
		mode = os.Getenv(testEventsEnv)
	}
	switch mode {
	case "":
		return "auto"
	case "auto", "ringbuf", "perf":
		return mode
	}
	t.Fatalf("%s=%q: write auto, ringbuf or perf", testEventsEnv, mode)
	return ""
}

// agent is one rackwired process plus everything a test created around it.
type agent struct {
	t      *testing.T
	opts   agentOpts
	dir    string
	cfg    string
	sock   string
	pinDir string
	polDir string

	mu  sync.Mutex
	cmd *exec.Cmd
	log *os.File
}

// newAgent writes a config, starts rackwired and registers the cleanup
// (kill by pid, `rackwired cleanup`, namespaces are cleaned by newNetns).
func newAgent(t *testing.T, o agentOpts) *agent {
	t.Helper()
	dir, err := os.MkdirTemp("", "rwg-"+o.tag+"-")
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{t: t, opts: o, dir: dir, cfg: filepath.Join(dir, "rackwire.toml"), sock: filepath.Join(dir, "rackwire.sock"),
		pinDir: "/sys/fs/bpf/rwg-" + o.tag, polDir: filepath.Join(dir, "policies.d")}
	if err := os.MkdirAll(a.polDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Pins left by an aborted earlier run would be adopted: start clean.
	_ = os.RemoveAll(a.pinDir)
	if o.attach == "" {
		o.attach = "auto"
	}
	if o.policyMax == 0 {
		o.policyMax = 1024
	}
	events := fmt.Sprintf("events = %q\n", eventsMode(t, o))
	if o.eventRate > 0 {
		events += fmt.Sprintf("events_rate = %d\n", o.eventRate)
	}
	if o.eventBurst > 0 {
		events += fmt.Sprintf("events_burst = %d\n", o.eventBurst)
	}
	cfg := fmt.Sprintf(`version = 1
[node]
name = "rwg-%s"
[agent]
state_dir = %q
socket = %q
socket_group = %q
admin_group = %q
[ipam]
cidrs = [%s]
[datapath]
pin_dir = %q
policy_dir = %q
attach = %q
policy_audit_mode = %t
ct_max_entries = 4096
policy_max_entries = %d
ipcache_max_entries = 4096
%s[restart]
jitter_window = "0s"
[metrics]
listen = ""
[log]
format = "text"
level = "debug"
%s`, o.tag, filepath.Join(dir, "state"), a.sock, o.socketGroup, o.adminGroup, quoteList(o.cidrs), a.pinDir, a.polDir, o.attach, o.audit, o.policyMax, events, o.extra)
	if err := os.WriteFile(a.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if o.socketGroup != "" {
		g, err := user.LookupGroup(o.socketGroup)
		if err != nil {
			t.Fatal(err)
		}
		gid, _ := strconv.Atoi(g.Gid)
		if err := os.Chown(dir, 0, gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		a.kill(syscall.SIGKILL)
		out, err := exec.Command(filepath.Join(binDir, "rackwired"), "cleanup", "--config", a.cfg).CombinedOutput()
		if err != nil {
			t.Errorf("rackwired cleanup: %v\n%s", err, out)
		}
		_ = os.RemoveAll(a.pinDir)
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(dir, "rackwired.log")); err == nil {
				t.Logf("rackwired log (tail):\n%s", tail(string(b), 60))
			}
		}
		_ = os.RemoveAll(dir)
	})
	a.start()
	return a
}

func quoteList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// start runs rackwired in the background and waits until it answers.
func (a *agent) start() {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		a.t.Fatal("agent already running")
	}
	f, err := os.OpenFile(filepath.Join(a.dir, "rackwired.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(binDir, "rackwired"), "--config", a.cfg)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		a.t.Fatalf("start rackwired: %v", err)
	}
	a.cmd, a.log = cmd, f
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			a.cmd = nil
			b, _ := os.ReadFile(filepath.Join(a.dir, "rackwired.log"))
			a.t.Fatalf("rackwired exited at start: %v\n%s", err, tail(string(b), 40))
		default:
		}
		if _, _, err := a.run("status", "--json"); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	a.t.Fatal("rackwired did not answer within 20s")
}

// kill sends sig to the agent's pid and waits for it to be gone.
func (a *agent) kill(sig syscall.Signal) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	pid := a.cmd.Process.Pid
	_ = syscall.Kill(pid, sig)
	// The goroutine started in start() reaps it; signal 0 fails after that.
	for i := 0; i < 400 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(25 * time.Millisecond)
	}
	a.cmd = nil
	a.log.Close()
}

// hup sends SIGHUP (re-read the config and the policy directory).
func (a *agent) hup() {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		a.t.Fatal("agent not running")
	}
	if err := syscall.Kill(a.cmd.Process.Pid, syscall.SIGHUP); err != nil {
		a.t.Fatal(err)
	}
}

// run runs the CLI against this agent.
func (a *agent) run(args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "rackwire"), args...)
	cmd.Env = append(os.Environ(), "RACKWIRE_SOCKET="+a.sock)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// rw runs the CLI and fails the test on a non-zero exit.
func (a *agent) rw(args ...string) string {
	a.t.Helper()
	out, errs, err := a.run(args...)
	if err != nil {
		a.t.Fatalf("rackwire %s: %v\n%s%s", strings.Join(args, " "), err, out, errs)
	}
	return out
}

// rwJSON runs the CLI with --json and decodes its output into v.
func (a *agent) rwJSON(v any, args ...string) {
	a.t.Helper()
	out := a.rw(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		a.t.Fatalf("rackwire %s --json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// endpoint is a workload the test plugged in through the CLI.
type endpoint struct {
	api.Endpoint
	ns string // netns name
}

// addEndpoint creates namespace rwg-<tag>-<name> and adds it as an endpoint.
func (a *agent) addEndpoint(name, labels string) endpoint {
	a.t.Helper()
	ns := newNetns(a.t, "rwg-"+a.opts.tag+"-"+name)
	var ep api.Endpoint
	a.rwJSON(&ep, "endpoint", "add", "--name", name, "--netns", "/run/netns/"+ns, "--labels", labels)
	if ep.IPv4 == "" || ep.State != "ready" {
		a.t.Fatalf("endpoint %s: %+v", name, ep)
	}
	return endpoint{Endpoint: ep, ns: ns}
}

// newNetns creates a named network namespace with lo up and deletes it in
// cleanup.
func newNetns(t *testing.T, name string) string {
	t.Helper()
	_ = exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v\n%s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// sh runs a command and fails the test on error.
func sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// external creates a namespace that is NOT an endpoint, wired to the host by
// a plain veth: the host side gets gw (e.g. 10.218.0.1/24), the namespace
// gets addrs (same prefix length) and a default route via the host.
func external(t *testing.T, name, hostIf, gw string, addrs ...string) string {
	t.Helper()
	ns := newNetns(t, name)
	_ = exec.Command("ip", "link", "del", hostIf).Run()
	sh(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", hostIf).Run() })
	sh(t, "ip", "addr", "add", gw, "dev", hostIf)
	sh(t, "ip", "link", "set", hostIf, "up")
	sh(t, "ip", "-n", ns, "link", "set", "eth0", "up")
	gwIP, bits, _ := strings.Cut(gw, "/")
	for _, ad := range addrs {
		sh(t, "ip", "-n", ns, "addr", "add", ad+"/"+bits, "dev", "eth0")
	}
	sh(t, "ip", "-n", ns, "route", "add", "default", "via", gwIP, "dev", "eth0")
	return ns
}

// inNetns runs fn on an OS thread switched into namespace ns ("" = the
// host's). Sockets created in fn belong to ns for their whole life.
func inNetns(ns string, fn func() error) error {
	if ns == "" {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open own netns: %w", err)
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + ns)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", ns, err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", ns, err)
	}
	ferr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: it dies with the goroutine.
		return fmt.Errorf("leave netns %s: %w", ns, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// servers starts a TCP and a UDP echo server on ip:port inside ns; both
// stop in cleanup.
func servers(t *testing.T, ns, ip string, ports ...int) {
	t.Helper()
	for _, port := range ports {
		addr := net.JoinHostPort(ip, strconv.Itoa(port))
		var ln net.Listener
		var pc net.PacketConn
		err := inNetns(ns, func() error {
			var err error
			if ln, err = net.Listen("tcp", addr); err != nil {
				return err
			}
			pc, err = net.ListenPacket("udp", addr)
			return err
		})
		if err != nil {
			t.Fatalf("servers in %s on %s: %v", ns, addr, err)
		}
		t.Cleanup(func() { ln.Close(); pc.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					_, _ = io.Copy(c, c)
				}()
			}
		}()
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}()
	}
}

// tcpReq opens a new TCP connection from ns to addr, sends a line and
// reads the echo.
func tcpReq(ns, addr string, timeout time.Duration) error {
	var c net.Conn
	err := inNetns(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	return echo(c, timeout)
}

// udpReq sends one datagram from ns to addr and waits for the echo.
func udpReq(ns, addr string, timeout time.Duration) error {
	var c net.Conn
	err := inNetns(ns, func() error {
		var err error
		c, err = net.Dial("udp", addr)
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	return echo(c, timeout)
}

var reqSeq struct {
	sync.Mutex
	n int
}

// echo writes a unique message on c and expects it back within timeout.
func echo(c net.Conn, timeout time.Duration) error {
	reqSeq.Lock()
	reqSeq.n++
	msg := fmt.Sprintf("rwg-%08d\n", reqSeq.n)
	reqSeq.Unlock()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// ping sends one ICMP echo from ns ("" = host) to ip.
func ping(ns, ip string) error {
	args := []string{"ping", "-n", "-q", "-c", "1", "-W", "1", ip}
	if strings.Contains(ip, ":") {
		args[0] = "ping6"
	}
	if ns != "" {
		args = append([]string{"ip", "netns", "exec", ns}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s from %q: %w: %s", ip, ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Short timeouts for traffic that must fail, longer for traffic that must
// pass.
const (
	okTimeout   = 2 * time.Second
	dropTimeout = 700 * time.Millisecond
)

func mustPass(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Errorf("%s: should pass: %v", what, err)
	}
}

func mustFail(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: passed, should be dropped", what)
	}
}

// monitor is a running `rackwire monitor --json` whose events are
// collected.
type monitor struct {
	mu     sync.Mutex
	events []api.Event
	raw    []string
}

// startMonitor runs `rackwire monitor --json [--type typ]` until cleanup.
func (a *agent) startMonitor(typ string) *monitor {
	a.t.Helper()
	args := []string{"monitor", "--json"}
	if typ != "" {
		args = append(args, "--type", typ)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "rackwire"), args...)
	cmd.Env = append(os.Environ(), "RACKWIRE_SOCKET="+a.sock)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		a.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	m := &monitor{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" {
				continue
			}
			var ev api.Event
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				continue
			}
			m.mu.Lock()
			m.events = append(m.events, ev)
			m.raw = append(m.raw, line)
			m.mu.Unlock()
		}
	}()
	a.t.Cleanup(func() {
		cancel()
		<-done
		_ = cmd.Wait()
	})
	// The stream is subscribed once the CLI's request reached the agent;
	// callers also start the monitor well before the events they expect.
	time.Sleep(500 * time.Millisecond)
	return m
}

// wait returns the first event matching ok within timeout.
func (m *monitor) wait(t *testing.T, what string, timeout time.Duration, ok func(api.Event) bool) api.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m.mu.Lock()
		for _, ev := range m.events {
			if ok(ev) {
				m.mu.Unlock()
				return ev
			}
		}
		n := len(m.events)
		last := ""
		if n > 0 {
			last = m.raw[n-1]
		}
		m.mu.Unlock()
		if time.Now().After(deadline) {
			t.Errorf("monitor: no event %s within %s (%d events seen, last %s)", what, timeout, n, last)
			return api.Event{}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// policyMapID returns the kernel id of an endpoint's pinned policy map.
func (a *agent) policyMapID(t *testing.T, epID uint16) int {
	t.Helper()
	out := sh(t, "bpftool", "-j", "map", "show", "pinned", fmt.Sprintf("%s/rw_policy_%05d", a.pinDir, epID))
	var m struct {
		ID int `json:"id"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("bpftool map show: %v\n%s", err, out)
	}
	return m.ID
}

// hostLinks lists the host's rw* links (endpoint veths).
func hostLinks(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(sh(t, "ip", "-br", "link"), "\n") {
		f := strings.Fields(l)
		if len(f) > 0 && strings.HasPrefix(f[0], "rw0") {
			out = append(out, f[0])
		}
	}
	return out
}

// eventually retries fn until it returns nil or timeout passes.
func eventually(timeout time.Duration, fn func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
