package multihost

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/consultest"
	"github.com/rackwire/rackwire/internal/testenv"
)

// Addresses of the simulated fabric. Host i (1-based) has the uplink
// 10.213.254.(4i+2)/30 towards the router's 10.213.254.(4i+1) and the
// workload CIDR 10.213.i.0/24; the root namespace (where Consul listens)
// is 10.213.255.1 behind the router's 10.213.255.254.
const (
	prefix     = "rwm-"
	routerNS   = prefix + "rt"
	rootLink   = prefix + "root"
	consulIP   = "10.213.255.1"
	routerRoot = "10.213.255.254"
	fabricNet  = "10.213.0.0/16"
	httpPort   = "8080"
)

// bins returns rackwired and rackwire, built once for this test binary.
func bins(t testing.TB) (rackwired, rackwire string) { return testenv.Binaries(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}

// requireInfra checks everything the real tests need.
func requireInfra(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	for _, c := range []string{"ip", "nsenter", "python3"} {
		testenv.RequireCommand(t, c)
	}
	if _, err := os.Stat("/sys/fs/bpf"); err != nil {
		t.Fatalf("bpffs is not mounted: mount -t bpf bpf /sys/fs/bpf")
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func runQuiet(name string, args ...string) { _ = exec.Command(name, args...).Run() }

// cleanLeftovers removes what an earlier, killed run of these tests left
// behind: only names with our prefix.
func cleanLeftovers() { testenv.RemoveLeftovers(prefix, rootLink) }

// fabric is a routing namespace, n host namespaces, and one Consul on the
// root namespace reachable from all of them.
type fabric struct {
	t      *testing.T
	dir    string
	consul *consultest.Agent
	addr   string // Consul as the hosts see it
	hosts  []*host
	eps    []string // endpoint namespaces, deleted at the end
	procs  []*exec.Cmd
	mu     sync.Mutex // guards procs
}

// host is one simulated host: a namespace with its own rackwired.
type host struct {
	f      *fabric
	name   string // "hA"
	idx    int
	ns     string
	uplink string
	cidr   string
	dir    string
	config string
	socket string
	pinDir string
	logf   string
	cmd    *exec.Cmd
	exited chan struct{}
	// datapathExtra is appended to the [datapath] section (map sizes).
	datapathExtra string
	// env is added to the agent's environment (GOMEMLIMIT, GODEBUG).
	env []string
	// nodeName overrides [node] name (default: name).
	nodeName string
	// tokenFile is [store] token_file (fabrics with ACLs).
	tokenFile string
}

type fabricOptions struct {
	hosts      int
	persistent bool // Consul keeps its data over Kill/Restart
	// acl turns Consul's ACLs on; the fabric's Consul client uses the
	// management token and hosts use host.tokenFile.
	acl string
}

func newFabric(t *testing.T, o fabricOptions) *fabric {
	t.Helper()
	requireInfra(t)
	bins(t)
	cleanLeftovers()
	f := &fabric{t: t, dir: t.TempDir()}
	t.Cleanup(f.cleanup)

	run(t, "ip", "netns", "add", routerNS)
	run(t, "ip", "-n", routerNS, "link", "set", "lo", "up")
	run(t, "ip", "netns", "exec", routerNS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	run(t, "ip", "link", "add", rootLink, "type", "veth", "peer", "name", prefix+"rt0", "netns", routerNS)
	run(t, "ip", "addr", "add", consulIP+"/24", "dev", rootLink)
	run(t, "ip", "link", "set", rootLink, "up")
	run(t, "ip", "-n", routerNS, "addr", "add", routerRoot+"/24", "dev", prefix+"rt0")
	run(t, "ip", "-n", routerNS, "link", "set", prefix+"rt0", "up")
	run(t, "ip", "route", "add", fabricNet, "via", routerRoot, "dev", rootLink)

	for i := 1; i <= o.hosts; i++ {
		name := "h" + string(rune('A'+i-1))
		if i > 26 {
			name = fmt.Sprintf("h%02d", i)
		}
		h := &host{f: f, name: name, idx: i, ns: prefix + name,
			uplink: fmt.Sprintf("10.213.254.%d", 4*i+2), cidr: fmt.Sprintf("10.213.%d.0/24", i)}
		gw := fmt.Sprintf("10.213.254.%d", 4*i+1)
		up, rt := fmt.Sprintf("%su%d", prefix, i), fmt.Sprintf("%sr%d", prefix, i)
		run(t, "ip", "netns", "add", h.ns)
		run(t, "ip", "-n", h.ns, "link", "set", "lo", "up")
		for _, s := range []string{"net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"} {
			run(t, "ip", "netns", "exec", h.ns, "sysctl", "-qw", s)
		}
		run(t, "ip", "link", "add", up, "netns", h.ns, "type", "veth", "peer", "name", rt, "netns", routerNS)
		run(t, "ip", "-n", h.ns, "addr", "add", h.uplink+"/30", "dev", up)
		run(t, "ip", "-n", h.ns, "link", "set", up, "up")
		run(t, "ip", "-n", h.ns, "route", "add", "default", "via", gw)
		run(t, "ip", "-n", routerNS, "addr", "add", gw+"/30", "dev", rt)
		run(t, "ip", "-n", routerNS, "link", "set", rt, "up")
		run(t, "ip", "-n", routerNS, "route", "add", h.cidr, "via", h.uplink)
		f.hosts = append(f.hosts, h)
	}

	f.consul = consultest.StartWith(t, consultest.Options{
		ClientAddrs: []string{consulIP},
		Persistent:  o.persistent,
		ACL:         o.acl,
		// Values up to 4 MiB, so that oversized records (a node with
		// 100,000 addresses) can be written to test that agents refuse them.
		HCL: []string{`telemetry { prometheus_retention_time = "1h" disable_hostname = true }`, `limits { kv_max_value_size = 4194304 }`},
	})
	f.addr = consulIP + ":" + f.consul.Port()
	return f
}

func (f *fabric) cleanup() {
	for _, h := range f.hosts {
		h.stop()
		if h.config != "" {
			rackwired, _ := bins(f.t)
			runQuiet("nsenter", "--net=/run/netns/"+h.ns, "--", rackwired, "cleanup", "--config", h.config)
		}
	}
	f.mu.Lock()
	for _, c := range f.procs {
		if c.Process != nil {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}
	f.mu.Unlock()
	for _, n := range f.eps {
		runQuiet("ip", "netns", "del", n)
	}
	for _, h := range f.hosts {
		runQuiet("ip", "netns", "del", h.ns)
		os.RemoveAll(h.pinDir)
	}
	runQuiet("ip", "netns", "del", routerNS)
	runQuiet("ip", "link", "del", rootLink)
	if f.t.Failed() {
		for _, h := range f.hosts {
			if b, err := os.ReadFile(h.logf); err == nil {
				f.t.Logf("---- rackwired %s log (last 60 lines) ----\n%s", h.name, tail(string(b), 60))
			}
		}
	}
}

func tail(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

// start writes the host's config and starts its rackwired inside the
// host namespace. nsenter --net keeps the mount namespace, so the agent
// sees the shared bpffs and /run/netns.
func (h *host) start(t *testing.T) {
	t.Helper()
	rackwired, _ := bins(t)
	if out, err := h.tryStart(t, rackwired); err != nil {
		t.Fatalf("%v: %s", err, tail(out, 40))
	}
}

// tryStart writes the config and starts the agent; it returns once the
// agent answers, or with an error and the agent's log if it exits first.
func (h *host) tryStart(t *testing.T, rackwired string) (string, error) {
	t.Helper()
	h.dir = filepath.Join(h.f.dir, h.name)
	h.socket = filepath.Join(h.dir, "rackwire.sock")
	h.config = filepath.Join(h.dir, "rackwire.toml")
	h.pinDir = "/sys/fs/bpf/" + prefix + h.name
	h.logf = filepath.Join(h.dir, "rackwired.log")
	if err := os.MkdirAll(filepath.Join(h.dir, "policies.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`version = 1
[node]
name = %q
cluster_id = 1
addresses = [%q]
[agent]
state_dir = %q
socket = %q
socket_group = ""
[ipam]
cidrs = [%q]
[store]
backend = "consul"
address = %q
token_file = %q
# The fabric's Consul speaks plain http on a non-loopback test address.
allow_insecure = true
[datapath]
pin_dir = %q
policy_dir = %q
%s
[restart]
jitter_window = "0s"
[metrics]
listen = ""
[log]
format = "text"
`, cmp.Or(h.nodeName, h.name), h.uplink, filepath.Join(h.dir, "state"), h.socket, h.cidr, h.f.addr, h.tokenFile, h.pinDir, filepath.Join(h.dir, "policies.d"), h.datapathExtra)
	if err := os.WriteFile(h.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(h.logf, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+h.ns, "--", rackwired, "--config", h.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), h.env...)
	// nsenter execs rackwired in place: the pid is the agent's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("start rackwired on %s: %w", h.name, err)
	}
	h.cmd = cmd
	h.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(h.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := h.status(); err == nil {
			return "", nil
		}
		select {
		case <-h.exited:
			b, _ := os.ReadFile(h.logf)
			return string(b), fmt.Errorf("rackwired on %s exited at start", h.name)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(h.logf)
			return string(b), fmt.Errorf("rackwired on %s does not answer on %s", h.name, h.socket)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// running reports whether the host's agent process is still alive.
func (h *host) running() bool {
	if h.exited == nil {
		return false
	}
	select {
	case <-h.exited:
		return false
	default:
		return true
	}
}

func (h *host) stop() {
	if h.cmd == nil || !h.running() {
		return
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(10 * time.Second):
		_ = h.cmd.Process.Kill()
		<-h.exited
	}
}

// cli runs the rackwire CLI against this host's agent.
func (h *host) cli(args ...string) (string, error) {
	_, rackwire := bins(h.f.t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, rackwire, args...)
	cmd.Env = append(os.Environ(), "RACKWIRE_SOCKET="+h.socket)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("rackwire %s: %w: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

func (h *host) mustCLI(t testing.TB, args ...string) string {
	t.Helper()
	out, err := h.cli(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (h *host) cliJSON(t testing.TB, v any, args ...string) {
	t.Helper()
	out := h.mustCLI(t, append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("rackwire %v --json: %v\n%s", args, err, out)
	}
}

func (h *host) status() (api.Status, error) {
	var st api.Status
	out, err := h.cli("status", "--json")
	if err != nil {
		return st, err
	}
	err = json.Unmarshal([]byte(out), &st)
	return st, err
}

// endpoint is a workload namespace plugged into a host.
type endpoint struct {
	h    *host
	name string
	ns   string
	ip   string
}

// addEndpoint creates a namespace and plugs it into the host's agent.
func (h *host) addEndpoint(t testing.TB, name, labels string) *endpoint {
	t.Helper()
	ns := prefix + h.name + "-" + name
	run(t, "ip", "netns", "add", ns)
	h.f.eps = append(h.f.eps, ns)
	var ep struct {
		IPv4 string `json:"ipv4"`
	}
	h.cliJSON(t, &ep, "endpoint", "add", "--name", name, "--netns", "/run/netns/"+ns, "--labels", labels)
	if ep.IPv4 == "" {
		t.Fatalf("endpoint %s on %s has no IPv4", name, h.name)
	}
	return &endpoint{h: h, name: name, ns: ns, ip: ep.IPv4}
}

// pyTraffic is the traffic helper run inside endpoint namespaces:
//
//	serve IP PORT               a TCP server that answers "ok" to every connection
//	probe IP PORT TIMEOUT       one connection; exit 0 if answered
//	flow IP PORT INTERVAL SECS  one connection every INTERVAL for SECS; prints JSON counts
const pyTraffic = `
import json, socket, sys, threading, time
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def once(timeout):
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((ip, port)); s.sendall(b"x")
        return s.recv(16) == b"ok"
    except OSError:
        return False
    finally:
        s.close()
if mode == "serve":
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((ip, port)); l.listen(128)
    def handle(c):
        try:
            c.settimeout(5); c.recv(16); c.sendall(b"ok")
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = l.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
elif mode == "probe":
    sys.exit(0 if once(float(sys.argv[4])) else 1)
elif mode == "flow":
    interval, secs = float(sys.argv[4]), float(sys.argv[5])
    ok = fail = 0; fails = []
    t0 = time.monotonic(); nxt = t0
    while time.monotonic() - t0 < secs:
        if once(1.0):
            ok += 1
        else:
            fail += 1; fails.append(round(time.monotonic() - t0, 2))
        nxt += interval
        d = nxt - time.monotonic()
        if d > 0:
            time.sleep(d)
    print(json.dumps({"ok": ok, "fail": fail, "fail_at": fails[:50]}))
`

// serve starts a TCP server on the endpoint; it is killed at cleanup.
func (e *endpoint) serve(t testing.TB) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", e.ns, "python3", "-c", pyTraffic, "serve", e.ip, httpPort)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start server in %s: %v", e.ns, err)
	}
	e.h.f.mu.Lock()
	e.h.f.procs = append(e.h.f.procs, cmd)
	e.h.f.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := exec.Command("ip", "netns", "exec", e.ns, "ss", "-Hltn", "sport", "= :"+httpPort).Output()
		if len(bytes.TrimSpace(out)) > 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("server in %s did not listen", e.ns)
}

// probe reports whether one TCP connection from e to dst is answered.
func (e *endpoint) probe(dst *endpoint, timeout time.Duration) bool {
	err := exec.Command("ip", "netns", "exec", e.ns, "python3", "-c", pyTraffic, "probe", dst.ip, httpPort,
		strconv.FormatFloat(timeout.Seconds(), 'f', 2, 64)).Run()
	return err == nil
}

// waitProbe probes until want holds or timeout; it returns how long it took.
func (e *endpoint) waitProbe(dst *endpoint, want bool, timeout time.Duration) (time.Duration, bool) {
	start := time.Now()
	for time.Since(start) < timeout {
		if e.probe(dst, time.Second) == want {
			return time.Since(start), true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(start), false
}

type flowResult struct {
	OK     int       `json:"ok"`
	Fail   int       `json:"fail"`
	FailAt []float64 `json:"fail_at"`
}

// startFlow runs connections from e to dst every interval for d in the
// background; wait returns the counts.
func (e *endpoint) startFlow(t testing.TB, dst *endpoint, interval, d time.Duration) (wait func() flowResult) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", e.ns, "python3", "-c", pyTraffic, "flow", dst.ip, httpPort,
		strconv.FormatFloat(interval.Seconds(), 'f', 3, 64), strconv.FormatFloat(d.Seconds(), 'f', 1, 64))
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start flow: %v", err)
	}
	e.h.f.mu.Lock()
	e.h.f.procs = append(e.h.f.procs, cmd)
	e.h.f.mu.Unlock()
	return func() flowResult {
		_ = cmd.Wait()
		var r flowResult
		if err := json.Unmarshal(out.Bytes(), &r); err != nil {
			t.Fatalf("flow output %q: %v", out.String(), err)
		}
		return r
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(start)
}

// ipcacheMap opens a host's pinned rw_ipcache hash map.
func (h *host) ipcacheMap(t testing.TB) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(h.pinDir, "rw_ipcache"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open rw_ipcache of %s: %v", h.name, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// ipKey is the rw_ipcache hash key (datapath ipKey: addr[16], family, pad[3]).
func ipKey(a netip.Addr) []byte {
	k := make([]byte, 20)
	if a.Is4() {
		b := a.As4()
		copy(k, b[:])
		k[16] = 4
	} else {
		b := a.As16()
		copy(k, b[:])
		k[16] = 6
	}
	return k
}

// hasIP reports whether m holds a.
func hasIP(m *ebpf.Map, a netip.Addr) bool {
	v := make([]byte, m.ValueSize())
	return m.Lookup(ipKey(a), &v) == nil
}
