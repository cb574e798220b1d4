//go:build rackwire_fleet

package fleet

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/hashicorp/consul/api"

	rwapi "github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/consultest"
	"github.com/rackwire/rackwire/internal/testenv"
)

// Names and addresses. Agent i (1-based) is 10.217.(i/250).(i%250+1) on
// the bridge, with the workload CIDR 10.218.i.0/24 (so at most 250
// agents); the proxies listen on the bridge's 10.217.255.254.
const (
	prefix   = "rwfl-"
	bridge   = prefix + "br"
	bridgeIP = "10.217.255.254"
	cluster  = "default"
	kvPrefix = "rackwire/"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}

// agentCount is RACKWIRE_FLEET_AGENTS, default 100.
func agentCount(t testing.TB) int {
	n := 100
	if s := os.Getenv("RACKWIRE_FLEET_AGENTS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 2 || v > 250 {
			t.Fatalf("RACKWIRE_FLEET_AGENTS=%q: write a number of agents from 2 to 250", s)
		}
		n = v
	}
	return n
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func runQuiet(name string, args ...string) { _ = exec.Command(name, args...).Run() }

// proxy is a counting reverse proxy in front of one Consul server's HTTP
// API: requests received and response bytes sent.
type proxy struct {
	srv   *http.Server
	addr  string // as the agents see it
	reqs  atomic.Int64
	bytes atomic.Int64

	mu      sync.Mutex       // guards classes
	classes map[string]int64 // requests by requestClass
}

// requestClass names what a request asks for, to tell which of the
// agents' reads a start wakes: the method, the API, and for the KV API the
// first three segments of the key under the agents' prefix, whether it
// blocks (index) and whether it asks for key names only (keys). Entry
// and node names are left out, so one class is one kind of read.
func requestClass(r *http.Request) string {
	path := strings.TrimPrefix(r.URL.Path, "/v1/")
	q := r.URL.Query()
	if key, ok := strings.CutPrefix(path, "kv/"); ok {
		key = strings.TrimPrefix(key, kvPrefix)
		segs := strings.SplitN(key, "/", 4)
		key = strings.Join(segs[:min(3, len(segs))], "/")
		if q.Has("keys") {
			key += " ?keys"
		} else if q.Has("recurse") {
			key += " ?recurse"
		}
		if q.Has("index") {
			key += " (blocking)"
		}
		return r.Method + " kv " + key
	}
	segs := strings.SplitN(path, "/", 3)
	return r.Method + " " + strings.Join(segs[:min(2, len(segs))], "/")
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.n.Add(int64(n))
	return n, err
}

func (w countingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func startProxy(t testing.TB, target string) *proxy {
	t.Helper()
	u, _ := url.Parse("http://" + target)
	rp := httputil.NewSingleHostReverseProxy(u)
	// DisableCompression: the agent's Accept-Encoding goes to Consul as
	// it is. Without it, Go's transport asked Consul for gzip on every
	// request and unpacked the answer here: Consul compressed what no
	// agent asked to be compressed (38% of the servers' CPU in the cold
	// start), which a client agent in front of the servers does not do.
	rp.Transport = &http.Transport{MaxIdleConns: 2000, MaxIdleConnsPerHost: 2000, IdleConnTimeout: time.Minute, DisableCompression: true}
	// Agents cancel their blocking queries when they stop: not news.
	rp.ErrorLog = log.New(io.Discard, "", 0)
	p := &proxy{classes: map[string]int64{}}
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.reqs.Add(1)
		c := requestClass(r)
		p.mu.Lock()
		p.classes[c]++
		p.mu.Unlock()
		rp.ServeHTTP(countingWriter{w, &p.bytes}, r)
	})}
	ln, err := net.Listen("tcp", bridgeIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	go func() { _ = p.srv.Serve(ln) }()
	t.Cleanup(func() { p.srv.Close() })
	return p
}

// counters is a sample of every proxy's totals.
type counters struct {
	at    time.Time
	reqs  int64
	bytes int64
}

// fleet is the Consul cluster, its proxies and the agents.
type fleet struct {
	t       *testing.T
	dir     string
	servers []*consultest.Agent
	proxies []*proxy
	consul  *api.Client // to a server directly, uncounted
	agents  []*agent
	mu      sync.Mutex    // guards eps
	eps     []string      // endpoint namespaces
	sim     int           // simulated ipcache entries now in the store
	retries atomic.Int64  // endpoint adds retried
	seq     atomic.Uint64 // change-log entries written by the test
	// deaths are the Consul servers that exited by themselves (the
	// kernel's OOM killer took two in the 99,900-entry step of an earlier
	// run, and the records of the hosts behind the first went with its
	// sessions: docs/scale.md); watchServers fills it.
	deathMu sync.Mutex
	deaths  []string
	stopMon chan struct{}
}

// classes sums every proxy's requests by class.
func (f *fleet) classes() map[string]int64 {
	out := map[string]int64{}
	for _, p := range f.proxies {
		p.mu.Lock()
		for c, n := range p.classes {
			out[c] += n
		}
		p.mu.Unlock()
	}
	return out
}

// logClasses logs the requests by class between two classes() samples,
// the largest first, with their number per agent.
func (f *fleet) logClasses(t testing.TB, what string, before, after map[string]int64) {
	type row struct {
		c string
		n int64
	}
	var rows []row
	for c, n := range after {
		if d := n - before[c]; d > 0 {
			rows = append(rows, row{c, d})
		}
	}
	slices.SortFunc(rows, func(a, b row) int { return int(b.n - a.n) })
	var b strings.Builder
	for _, r := range rows[:min(12, len(rows))] {
		fmt.Fprintf(&b, "\n  %7d (%6.1f per agent)  %s", r.n, float64(r.n)/float64(len(f.agents)), r.c)
	}
	t.Logf("BENCH requests by kind, %s (%d agents):%s", what, len(f.agents), b.String())
}

func (f *fleet) sample() counters {
	c := counters{at: time.Now()}
	for _, p := range f.proxies {
		c.reqs += p.reqs.Load()
		c.bytes += p.bytes.Load()
	}
	return c
}

// newFleet builds the bridge, the Consul cluster with its proxies, and n
// agent namespaces (agents not started).
func newFleet(t *testing.T, n int) *fleet {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	for _, c := range []string{"ip", "nsenter"} {
		testenv.RequireCommand(t, c)
	}
	testenv.Binaries(t)
	testenv.RemoveLeftovers(prefix, bridge)
	f := &fleet{t: t, dir: t.TempDir()}
	t.Cleanup(f.cleanup)
	run(t, "ip", "link", "add", bridge, "type", "bridge")
	run(t, "ip", "addr", "add", bridgeIP+"/16", "dev", bridge)
	run(t, "ip", "link", "set", bridge, "up")

	// Every agent reaches a server through its proxy, so each server sees
	// one client address for a third of the fleet: the per-client
	// connection limit (200) is raised to what the fleet needs, as it is
	// for client agents in practice (they multiplex over RPC).
	// Raft timing as Consul ships it (multiplier 5, not the 1 of the fast
	// tests): at 100 agents this 2-core machine starves the servers and
	// the tight timings made the leadership flap.
	f.servers = consultest.StartClusterHCL(t, 3, `limits { http_max_conns_per_client = 5000 }`, `performance { raft_multiplier = 5 }`)
	for _, s := range f.servers {
		f.proxies = append(f.proxies, startProxy(t, s.HTTPAddr))
	}
	f.consul = f.servers[0].Client(t)
	f.watchServers()

	for i := 1; i <= n; i++ {
		a := &agent{f: f, idx: i, name: fmt.Sprintf("fl-%03d", i), ns: fmt.Sprintf("%sh%03d", prefix, i),
			addr: fmt.Sprintf("10.217.%d.%d", i/250, i%250+1), cidr: fmt.Sprintf("10.218.%d.0/24", i),
			proxy: f.proxies[i%len(f.proxies)], sync: syncModes(t)[0]}
		veth := fmt.Sprintf("%sv%03d", prefix, i)
		run(t, "ip", "netns", "add", a.ns)
		run(t, "ip", "-n", a.ns, "link", "set", "lo", "up")
		run(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "up0", "netns", a.ns)
		run(t, "ip", "link", "set", veth, "master", bridge, "up")
		run(t, "ip", "-n", a.ns, "addr", "add", a.addr+"/16", "dev", "up0")
		run(t, "ip", "-n", a.ns, "link", "set", "up0", "up")
		f.agents = append(f.agents, a)
	}
	return f
}

// logKeep is the agents' ipcache_log_keep: RACKWIRE_FLEET_KEEP, default 6s.
func logKeep(t testing.TB) time.Duration {
	s := os.Getenv("RACKWIRE_FLEET_KEEP")
	if s == "" {
		return 6 * time.Second
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 5*time.Second {
		t.Fatalf("RACKWIRE_FLEET_KEEP=%q: write a duration of at least 5s", s)
	}
	return d
}

// pruned is how long the change log takes to drop an entry written now:
// its keep, then the pruner's next round (every keep/2), and a margin.
func pruned(t testing.TB) time.Duration {
	k := logKeep(t)
	return k + k/2 + 2*time.Second
}

// cgroup2Root is the cgroup-v2 mount (/sys/fs/cgroup, or its unified
// part on a hybrid host).
func cgroup2Root(t testing.TB) string {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[2] == "cgroup2" {
			return f[1]
		}
	}
	t.Fatal("no cgroup2 mount in /proc/mounts: the socket load balancer needs one")
	return ""
}

// watchServers notes every Consul server that exits by itself, at once
// and with the kernel's word on it when there is one: a server lost
// mid-run changes what the agents see (a dead server is reaped by
// autopilot after about 15 s, and every session created through it is
// invalidated with it: TestServerDeathTakesItsSessions), so such a run
// must not pass for the store's normal behaviour.
func (f *fleet) watchServers() {
	f.stopMon = make(chan struct{})
	seen := make([]bool, len(f.servers))
	go func() {
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-f.stopMon:
				return
			case <-tk.C:
			}
			for i, s := range f.servers {
				d := s.Died()
				if d == "" {
					seen[i] = false
					continue
				}
				if seen[i] {
					continue
				}
				seen[i] = true
				d = fmt.Sprintf("%s at %s%s", d, time.Now().UTC().Format("15:04:05"), oomNote(d))
				f.deathMu.Lock()
				f.deaths = append(f.deaths, d)
				f.deathMu.Unlock()
			}
		}
	}()
}

// oomNote returns the kernel's OOM-kill line about the pid in a Died text.
func oomNote(died string) string {
	var pid int
	if i := strings.Index(died, "(pid "); i >= 0 {
		fmt.Sscanf(died[i+len("(pid "):], "%d", &pid)
	}
	if pid == 0 {
		return ""
	}
	out, _ := exec.Command("dmesg").Output()
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, fmt.Sprintf("Killed process %d ", pid)) {
			return "; the kernel's OOM killer: " + strings.TrimSpace(l)
		}
	}
	return ""
}

// serverDeaths returns what watchServers saw so far.
func (f *fleet) serverDeaths() []string {
	f.deathMu.Lock()
	defer f.deathMu.Unlock()
	return slices.Clone(f.deaths)
}

func (f *fleet) cleanup() {
	if f.stopMon != nil {
		close(f.stopMon)
	}
	for _, d := range f.serverDeaths() {
		f.t.Errorf("a Consul server died during the run; what follows it is not the store's normal behaviour: %s", d)
	}
	for _, s := range f.servers {
		if s.Died() != "" {
			f.t.Logf("---- %s (last 20 lines) ----\n%s", s.Name, s.LogTail(20))
		}
	}
	var wg sync.WaitGroup
	for _, a := range f.agents {
		wg.Add(1)
		go func() { defer wg.Done(); a.stop() }()
	}
	wg.Wait()
	rackwired, _ := testenv.Binaries(f.t)
	for _, a := range f.agents {
		if a.config != "" {
			runQuiet("nsenter", "--net=/run/netns/"+a.ns, "--", rackwired, "cleanup", "--config", a.config)
		}
	}
	if f.t.Failed() {
		for _, a := range f.agents[:min(3, len(f.agents))] {
			if b, err := os.ReadFile(a.logf); err == nil {
				f.t.Logf("---- rackwired %s log (last 30 lines) ----\n%s", a.name, tail(string(b), 30))
			}
		}
	}
	for _, n := range f.eps {
		runQuiet("ip", "netns", "del", n)
	}
	for _, a := range f.agents {
		runQuiet("ip", "netns", "del", a.ns)
		os.RemoveAll(a.pinDir)
		if a.cgroup != "" {
			_ = os.Remove(a.cgroup)
		}
	}
	runQuiet("ip", "link", "del", bridge)
}

func tail(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(ls[max(0, len(ls)-n):], "\n")
}

// fromFleetSize, as an agent's jitter, leaves [restart] jitter_window out:
// the gate's window is the one the fleet's size gives (restart.WindowFor).
const fromFleetSize = "fleet_size"

// agent is one simulated host with its rackwired.
type agent struct {
	f      *fleet
	idx    int
	name   string
	ns     string
	addr   string
	cidr   string
	proxy  *proxy
	dir    string
	config string
	socket string
	pinDir string
	cgroup string // the agent's [datapath] service_cgroup
	logf   string
	// jitter is [restart] jitter_window ("0s", the default: gate off;
	// fromFleetSize: none written, the window fleet_size gives).
	jitter string
	// sync is [store] ipcache_sync ("" = the release's default); bin, if
	// set, is the rackwired to run (an older release), which gets a
	// config without the keys it does not know.
	sync string
	bin  string

	mu     sync.Mutex // guards cmd, exited, eps, ipc
	cmd    *exec.Cmd
	exited chan struct{}
	eps    []netip.Addr
	ipc    *ebpf.Map
}

// writeConfig writes the agent's config: small CT and policy maps (a
// hundred agents on one machine), an ipcache large enough for the ladder.
func (a *agent) writeConfig(t testing.TB) {
	a.dir = filepath.Join(a.f.dir, a.name)
	a.socket = filepath.Join(a.dir, "rackwire.sock")
	a.config = filepath.Join(a.dir, "rackwire.toml")
	a.pinDir = "/sys/fs/bpf/" + a.ns
	// A cgroup per agent for the socket load balancer: a cgroup takes at
	// most 64 programs per hook, and a hundred agents on the root cgroup
	// stopped at the 65th ("argument list too long"). On a real host there
	// is one rackwired per machine.
	a.cgroup = filepath.Join(cgroup2Root(t), a.ns)
	if err := os.Mkdir(a.cgroup, 0o755); err != nil && !os.IsExist(err) {
		t.Fatalf("cgroup for %s: %v", a.name, err)
	}
	a.logf = filepath.Join(a.dir, "rackwired.log")
	if err := os.MkdirAll(filepath.Join(a.dir, "policies.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	// The gate's window: jitter_window when set ("0s" by default: off), or
	// the one [restart] fleet_size gives, as a fleet of this size would
	// have it, for fromFleetSize.
	jitter := fmt.Sprintf("jitter_window = %q\n", cmp.Or(a.jitter, "0s"))
	if a.jitter == fromFleetSize {
		jitter = ""
	}
	// Keys an older release does not know are left out of its config.
	storeExtra, svcExtra := "", ""
	if a.bin == "" {
		svcExtra = fmt.Sprintf("service_cgroup = %q\nservice_max_entries = 1024\nservice_backend_max_entries = 1024\n", a.cgroup)
		sync := a.sync
		if sync == "" {
			sync = "list"
		}
		// A short keep, so that the bulk writes of the ladder leave the
		// change log within seconds (the default is 2m);
		// RACKWIRE_FLEET_KEEP overrides it: with 100 agents on this VM a
		// list can take longer than 6 s, and a follower whose list is
		// slower than the keep lists in a loop (docs/scale.md).
		storeExtra = fmt.Sprintf("ipcache_sync = %q\nipcache_log_keep = %q\n", sync, logKeep(t).String())
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
# The proxies speak plain http on a bridge address.
allow_insecure = true
%s[datapath]
pin_dir = %q
%spolicy_dir = %q
ct_max_entries = 4096
ct_other_max_entries = 4096
frag_max_entries = 1024
policy_max_entries = 1024
ipcache_max_entries = 131072
[restart]
fleet_size = %d
%sbackoff_min = "2s"
backoff_max = "20s"
[metrics]
listen = ""
[log]
format = "text"
level = "warn"
`, a.name, a.addr, filepath.Join(a.dir, "state"), a.socket, a.cidr, a.proxy.addr, storeExtra, a.pinDir, svcExtra,
		filepath.Join(a.dir, "policies.d"), len(a.f.agents), jitter)
	if err := os.WriteFile(a.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}

// prestart runs `rackwired prestart` in the agent's namespace and waits
// for it (it sleeps as long as the gate says).
func (a *agent) prestart(t testing.TB) error {
	rackwired := a.binary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", "--net=/run/netns/"+a.ns, "--", rackwired, "prestart", "--config", a.config).CombinedOutput()
	if err != nil {
		return fmt.Errorf("prestart on %s: %w: %s", a.name, err, out)
	}
	return nil
}

// start starts the agent and returns once its API answers.
func (a *agent) start(t testing.TB) error {
	rackwired := a.binary(t)
	logf, err := os.OpenFile(a.logf, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+a.ns, "--", rackwired, "--config", a.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), testenv.UnitEnv(t, "../..")...)
	// Read only by a profiling build (-tags rackwire_pprof, TestFleetIdle).
	cmd.Env = append(cmd.Env, "RACKWIRE_PPROF_SOCKET="+filepath.Join(a.dir, "pprof.sock"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start rackwired on %s: %w", a.name, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	a.mu.Lock()
	a.cmd, a.exited = cmd, exited
	if a.ipc != nil {
		a.ipc.Close()
		a.ipc = nil
	}
	a.mu.Unlock()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := a.status(); err == nil {
			return nil
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(a.logf)
			return fmt.Errorf("rackwired on %s exited at start (%v): %s", a.name, cmd.ProcessState, tail(string(b), 20))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("rackwired on %s does not answer on %s", a.name, a.socket)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// binary is the rackwired this agent runs.
func (a *agent) binary(t testing.TB) string {
	if a.bin != "" {
		return a.bin
	}
	rackwired, _ := testenv.Binaries(t)
	return rackwired
}

// running reports whether the agent's process is alive.
func (a *agent) running() bool {
	a.mu.Lock()
	ch := a.exited
	a.mu.Unlock()
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return false
	default:
		return true
	}
}

func (a *agent) pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil || a.cmd.Process == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// stop ends the agent with SIGTERM (SIGKILL after 20 s).
func (a *agent) stop() {
	a.mu.Lock()
	cmd, ch := a.cmd, a.exited
	a.mu.Unlock()
	if cmd == nil || !a.running() {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-ch:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-ch
	}
}

func (a *agent) signal(sig syscall.Signal) {
	if p := a.pid(); p > 0 && a.running() {
		_ = syscall.Kill(p, sig)
	}
}

// status reads the agent's status from its socket.
func (a *agent) status() (rwapi.Status, error) {
	var st rwapi.Status
	c := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", a.socket)
		}}}
	resp, err := c.Get("http://rackwired/v1/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("status: %s: %s", resp.Status, b)
	}
	return st, json.Unmarshal(b, &st)
}

// addEndpoint plugs a new namespace into the agent.
func (a *agent) addEndpoint(t testing.TB, k int) error {
	_, rackwire := testenv.Binaries(t)
	ns := fmt.Sprintf("%se%03d-%d", prefix, a.idx, k)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", ns, err, out)
	}
	a.f.mu.Lock()
	a.f.eps = append(a.f.eps, ns)
	a.f.mu.Unlock()
	// A failed add is rolled back by the agent (the store may be without
	// a leader during the fault runs); a runtime would retry it, so do we.
	var err error
	for attempt := 0; attempt < 30; attempt++ {
		if err = a.tryAddEndpoint(rackwire, ns, k); err == nil {
			return nil
		}
		a.f.retries.Add(1)
		time.Sleep(2 * time.Second)
	}
	return err
}

func (a *agent) tryAddEndpoint(rackwire, ns string, k int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, rackwire, "endpoint", "add", "--name", fmt.Sprintf("w%d", k), "--netns", "/run/netns/"+ns,
		"--labels", fmt.Sprintf("app=web%d,tier=fleet", k%3), "--json")
	cmd.Env = append(os.Environ(), "RACKWIRE_SOCKET="+a.socket)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("endpoint add on %s: %w: %s", a.name, err, errb.String())
	}
	var ep struct {
		IPv4 string `json:"ipv4"`
	}
	if err := json.Unmarshal(out.Bytes(), &ep); err != nil {
		return fmt.Errorf("endpoint add on %s: %w: %s", a.name, err, out.String())
	}
	ip, err := netip.ParseAddr(ep.IPv4)
	if err != nil {
		return fmt.Errorf("endpoint add on %s: no IPv4: %s", a.name, out.String())
	}
	a.mu.Lock()
	a.eps = append(a.eps, ip)
	a.mu.Unlock()
	return nil
}

// ipcache opens (once per run of the agent) its pinned rw_ipcache.
func (a *agent) ipcache() (*ebpf.Map, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ipc != nil {
		return a.ipc, nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(a.pinDir, "rw_ipcache"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	a.ipc = m
	return m, nil
}

// ipKey is the rw_ipcache hash key (datapath ipKey: addr[16], family, pad[3]).
func ipKey(ip netip.Addr) []byte {
	k := make([]byte, 20)
	b := ip.As4()
	copy(k, b[:])
	k[16] = 4
	return k
}

// present counts the addresses the agent's rw_ipcache holds; -1 if the
// map cannot be opened (the agent has not pinned it yet).
func (a *agent) present(ips ...netip.Addr) int {
	m, err := a.ipcache()
	if err != nil {
		return -1
	}
	n := 0
	v := make([]byte, m.ValueSize())
	for _, ip := range ips {
		if m.Lookup(ipKey(ip), &v) == nil {
			n++
		}
	}
	return n
}

// has reports whether the agent's rw_ipcache holds every address.
func (a *agent) has(ips ...netip.Addr) bool { return a.present(ips...) == len(ips) }

// lacks reports whether the agent's rw_ipcache holds none of the addresses.
func (a *agent) lacks(ips ...netip.Addr) bool { return a.present(ips...) == 0 }

// contents returns every IPv4 address in the agent's rw_ipcache.
func (a *agent) contents() (map[netip.Addr]bool, error) {
	m, err := a.ipcache()
	if err != nil {
		return nil, err
	}
	out := map[netip.Addr]bool{}
	k := make([]byte, m.KeySize())
	v := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&k, &v) {
		if k[16] == 4 {
			out[netip.AddrFrom4([4]byte(k[:4]))] = true
		}
	}
	return out, it.Err()
}

// allEndpoints lists every real endpoint address of the fleet.
func (f *fleet) allEndpoints() []netip.Addr {
	var out []netip.Addr
	for _, a := range f.agents {
		a.mu.Lock()
		out = append(out, a.eps...)
		a.mu.Unlock()
	}
	return out
}

// each runs fn for every agent, par at a time, and returns the first error.
func (f *fleet) each(par int, fn func(a *agent) error) error {
	sem := make(chan struct{}, par)
	errs := make(chan error, len(f.agents))
	var wg sync.WaitGroup
	for _, a := range f.agents {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(a); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// Simulated hosts hold the bulk of the ipcache: simNodes node records, each
// with a /22 in 10.100.0.0/14, and entry i of the ladder on node i%simNodes.
const simNodes = 100

func simNodeCIDR(j int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(100 + j/64), byte((j % 64) * 4), 0}), 22)
}

func simNodeIP(j int) string { return fmt.Sprintf("10.219.%d.%d", j/250, j%250+1) }

func simNodeName(j int) string { return fmt.Sprintf("sim-%03d", j) }

// simIP is the address of simulated entry i (at most simNodes*1000).
func simIP(i int) netip.Addr {
	j, k := i%simNodes, i/simNodes+1
	b := simNodeCIDR(j).Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) + uint32(k)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func simEntry(i int) (string, []byte) {
	ip := simIP(i)
	j := i % simNodes
	b, _ := json.Marshal(store.IPEntry{IP: ip.String(), Identity: 1<<24 | uint32(1000+i%500), HostIP: simNodeIP(j),
		Node: simNodeName(j), Endpoint: uint32(i/simNodes + 1), LabelsHash: "app=sim;"})
	return store.IPKey(cluster, ip), b
}

// writeSimNodes writes the simulated hosts' node records.
func (f *fleet) writeSimNodes(t testing.TB) {
	ops := api.KVTxnOps{}
	for j := range simNodes {
		b, _ := json.Marshal(store.NodeEntry{Name: simNodeName(j), Cluster: cluster, IPs: []string{simNodeIP(j)},
			CIDRs: []string{simNodeCIDR(j).String()}, Version: "sim", Features: []string{iplog.Feature}})
		ops = append(ops, &api.KVTxnOp{Verb: api.KVSet, Key: kvPrefix + store.NodeKey(cluster, simNodeName(j)), Value: b})
		if len(ops) == 64 || j == simNodes-1 {
			f.txn(t, ops)
			ops = api.KVTxnOps{}
		}
	}
}

func (f *fleet) txn(t testing.TB, ops api.KVTxnOps) {
	for attempt := 0; ; attempt++ {
		ok, resp, _, err := f.consul.KV().Txn(ops, nil)
		if err == nil && ok {
			return
		}
		if attempt == 20 {
			t.Fatalf("consul txn: ok=%v err=%v resp=%v", ok, err, resp)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// setSim makes the store hold simulated entries 0..n-1, written or deleted
// straight into Consul (uncounted by the proxies) as a host of this
// release writes them: 63 ipcache keys and their change-log entry per
// transaction.
func (f *fleet) setSim(t testing.TB, n int) {
	if n > simNodes*1000 {
		t.Fatalf("at most %d simulated entries", simNodes*1000)
	}
	var batch []iplog.Op
	flush := func() {
		if len(batch) > 0 {
			f.write(t, batch)
			batch = nil
		}
	}
	for i := f.sim; i < n; i++ {
		k, v := simEntry(i)
		batch = append(batch, iplog.Op{Key: k, Value: v})
		if len(batch) == 63 {
			flush()
		}
	}
	for i := n; i < f.sim; i++ {
		k, _ := simEntry(i)
		batch = append(batch, iplog.Op{Key: k, Delete: true})
		if len(batch) == 63 {
			flush()
		}
	}
	flush()
	f.sim = n
}

// write applies ops (keys relative to the store prefix) and their
// change-log entry in one transaction.
func (f *fleet) write(t testing.TB, ops []iplog.Op) {
	txn := make(api.KVTxnOps, 0, len(ops)+1)
	for _, o := range ops {
		if o.Delete {
			txn = append(txn, &api.KVTxnOp{Verb: api.KVDelete, Key: kvPrefix + o.Key})
		} else {
			txn = append(txn, &api.KVTxnOp{Verb: api.KVSet, Key: kvPrefix + o.Key, Value: o.Value})
		}
	}
	now := time.Now()
	b, err := iplog.Encode(now, ops)
	if err != nil {
		t.Fatal(err)
	}
	txn = append(txn, &api.KVTxnOp{Verb: api.KVSet, Key: kvPrefix + iplog.EntryKey(cluster, "sim", now, f.seq.Add(1)), Value: b})
	f.txn(t, txn)
}

// waitAll waits until cond holds for every running agent; it returns how
// long that took, or fails after timeout.
func (f *fleet) waitAll(t testing.TB, timeout time.Duration, what string, cond func(a *agent) bool) time.Duration {
	t.Helper()
	start := time.Now()
	done := make([]bool, len(f.agents))
	for {
		left := 0
		for i, a := range f.agents {
			if !done[i] {
				done[i] = cond(a)
			}
			if !done[i] {
				left++
			}
		}
		if left == 0 {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			for _, d := range f.serverDeaths() {
				t.Logf("meanwhile a Consul server died: %s", d)
			}
			for i, a := range f.agents {
				if !done[i] {
					f.explain(t, a)
				}
			}
			t.Fatalf("%s: %d of %d agents not there after %s", what, left, len(f.agents), timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// explain logs what an agent that did not converge lacks and how it
// follows the ipcache.
func (f *fleet) explain(t testing.TB, a *agent) {
	var missing []string
	for _, ip := range f.allEndpoints() {
		if !a.has(ip) {
			missing = append(missing, ip.String())
		}
	}
	if f.sim > 0 && !a.has(simIP(0), simIP(f.sim-1)) {
		missing = append(missing, "simulated sentinels")
	}
	st, err := a.status()
	t.Logf("%s (running %v) lacks %v; status err %v, store %s %v", a.name, a.running(), missing, err, st.Store.State, st.Store.Detail)
}

// procStat returns an agent's RSS and peak RSS (kB) and CPU seconds used.
func procStat(pid int) (rss, hwm int, cpu float64) {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%d", &rss)
		}
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%d", &hwm)
		}
	}
	s, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if i := bytes.LastIndexByte(s, ')'); i > 0 {
		f := strings.Fields(string(s[i+1:]))
		if len(f) > 13 {
			ut, _ := strconv.ParseFloat(f[11], 64)
			st, _ := strconv.ParseFloat(f[12], 64)
			cpu = (ut + st) / 100 // USER_HZ
		}
	}
	return rss, hwm, cpu
}

// resources prints the agents' RSS, peak RSS and CPU: median and max.
func (f *fleet) resources(t testing.TB, when string) (medRSS float64) {
	var rss, hwm, cpu []float64
	for _, a := range f.agents {
		if p := a.pid(); p > 0 && a.running() {
			r, h, c := procStat(p)
			rss, hwm, cpu = append(rss, float64(r)/1024), append(hwm, float64(h)/1024), append(cpu, c)
		}
	}
	if len(rss) == 0 {
		return 0
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	sum := 0.0
	for _, c := range cpu {
		sum += c
	}
	var srv []string
	for _, s := range f.servers {
		if p := s.Pid(); p > 0 {
			r, h, c := procStat(p)
			srv = append(srv, fmt.Sprintf("%s %.0f MB (peak %.0f MB, CPU %.0f s)", s.Name, float64(r)/1024, float64(h)/1024, c))
		} else {
			srv = append(srv, s.Name+" not running")
		}
	}
	t.Logf("BENCH resources %s (%d agents): RSS median %.1f MB, max %.1f MB; peak RSS median %.1f MB, max %.1f MB; CPU per agent median %.2f s, max %.2f s, all agents %.1f s; Consul servers: %s",
		when, len(rss), med(rss), slices.Max(rss), med(hwm), slices.Max(hwm), med(cpu), slices.Max(cpu), sum, strings.Join(srv, ", "))
	return med(rss)
}

// uptime logs the machine's load (the reviewers want it with every big run).
func uptime(t testing.TB, when string) {
	out, _ := exec.Command("uptime").Output()
	t.Logf("BENCH uptime %s: %s", when, strings.TrimSpace(string(out)))
}

// rateSeries samples the proxies' request and byte totals every step until
// stop is closed and returns the rates per step, and the requests by
// class of the step with the most requests (what the peak is made of).
type rates struct {
	steps [][2]float64
	peak  [2]map[string]int64 // classes before and after the busiest step
}

func (f *fleet) rateSeries(step time.Duration, stop <-chan struct{}) <-chan rates {
	out := make(chan rates, 1)
	go func() {
		var r rates
		prev, prevC := f.sample(), f.classes()
		best := -1.0
		tk := time.NewTicker(step)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				out <- r
				return
			case <-tk.C:
				c, cc := f.sample(), f.classes()
				dt := c.at.Sub(prev.at).Seconds()
				rq := float64(c.reqs-prev.reqs) / dt
				r.steps = append(r.steps, [2]float64{rq, float64(c.bytes-prev.bytes) / dt})
				if rq > best {
					best, r.peak = rq, [2]map[string]int64{prevC, cc}
				}
				prev, prevC = c, cc
			}
		}
	}()
	return out
}

func mb(b float64) string { return strconv.FormatFloat(b/1e6, 'f', 2, 64) + " MB" }
