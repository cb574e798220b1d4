package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
)

// Names of what the benchmark creates; a run removes leftovers of these
// before it starts.
const (
	namePrefix = "rwh-bench"
	nsHost     = namePrefix + "-host"
	nsClient   = namePrefix + "-a"
	nsServer   = namePrefix + "-b"
	pinDir     = "/sys/fs/bpf/" + namePrefix
	linkPrefix = "rwh"
)

// Addresses: endpoints from endpointCIDR, the extra ipcache identities
// from fillerBase upwards (never routed; only looked up).
var (
	endpointCIDR = netip.MustParsePrefix("10.250.77.0/28")
	nodeIP       = netip.MustParsePrefix("192.0.2.1/32").Addr()
	fillerBase   = netip.MustParseAddr("10.252.0.0")
)

const (
	benchPort    = 7001
	deniedPort   = 7002 // no entry allows it: the probe checks enforcement
	fillerIDBase = 100000
	fillerPorts  = 10 // policy filler: identities x ports
)

// topo is the host namespace, the two endpoints and the datapath; it owns
// all of them until close.
type topo struct {
	log      *slog.Logger
	self     string // this binary, run inside the namespaces
	stateDir string
	d        *datapath.Datapath
	m        *endpoint.Manager
	dp       nsDatapath
	client   endpoint.Endpoint
	server   endpoint.Endpoint
	policy   []datapath.Entry
	serve    *exec.Cmd
	// The long-lived client: requests in, results out.
	clientCmd *exec.Cmd
	clientIn  io.WriteCloser
	clientOut *json.Decoder
	attached  bool
}

// inNetns runs f on a thread that has entered the namespace file path:
// tc and tcx attach resolve an ifindex in the caller's namespace.
func inNetns(path string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open network namespace: %w", err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter %s: %w", path, err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked: the runtime discards it.
			errc <- errors.Join(ferr, fmt.Errorf("leave %s: %w", path, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

func nsPath(name string) string { return "/run/netns/" + name }

// nsDatapath drives the datapath for the endpoint manager with the attach
// calls made in the host namespace, as an agent running there makes them.
type nsDatapath struct {
	d    *datapath.Datapath
	host string
}

func (n nsDatapath) AttachEndpoint(s endpoint.AttachSpec) error {
	return inNetns(n.host, func() error {
		return n.d.AttachEndpoint(datapath.EndpointSpec{ID: s.ID, IfIndex: s.IfIndex, IPs: s.IPs,
			MAC: s.PeerMAC, NodeMAC: s.HostMAC, Identity: uint32(s.Identity), Audit: s.Audit})
	})
}

func (n nsDatapath) DetachEndpoint(id uint16, ifindex int) error {
	return inNetns(n.host, func() error { return n.d.DetachEndpoint(id, ifindex) })
}

// benchEnforcer does what the agent's enforcer does, minus the policy
// engine: the endpoint's addresses in the ipcache and, until the benchmark
// writes its own policy, both directions open.
type benchEnforcer struct {
	d      *datapath.Datapath
	hostIP netip.Addr
}

func (e benchEnforcer) Admit(_ context.Context, ep endpoint.Endpoint) error {
	for _, ip := range ep.IPs() {
		if err := e.d.UpsertIPCache(netip.PrefixFrom(ip, ip.BitLen()), uint32(ep.Identity), e.hostIP); err != nil {
			return err
		}
	}
	return e.d.SetPolicy(ep.ID, datapath.OpenEntries())
}

func (e benchEnforcer) Readopt(endpoint.Endpoint) {}

func (e benchEnforcer) Gone(ep endpoint.Endpoint) {
	for _, ip := range ep.IPs() {
		_ = e.d.DeleteIPCache(netip.PrefixFrom(ip, ip.BitLen()))
	}
}

// fakeIdentities hands out ids from 50000 up, one per label set; the
// benchmark needs identities, not the store behind them.
type fakeIdentities struct {
	mu   sync.Mutex // guards ids
	ids  map[string]identity.ID
	next identity.ID
}

func (f *fakeIdentities) Allocate(_ context.Context, ls identity.Labels) (identity.ID, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := fmt.Sprint(ls)
	if id, ok := f.ids[k]; ok {
		return id, nil
	}
	f.next++
	f.ids[k] = 50000 + f.next
	return f.ids[k], nil
}

func (f *fakeIdentities) Release(context.Context, identity.Labels) error { return nil }

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sweep removes what a killed run may have left: namespaces (and with them
// the veths) and the pin directory (and with it the tcx links).
func sweep() error {
	var errs []error
	for _, ns := range []string{nsClient, nsServer, nsHost} {
		if _, err := os.Stat(nsPath(ns)); err == nil {
			errs = append(errs, ip("netns", "del", ns))
		}
	}
	errs = append(errs, datapath.Cleanup(pinDir))
	return errors.Join(errs...)
}

// newTopo creates the namespaces, the datapath under pinDir, the two
// endpoints through the endpoint manager, the 1,000 extra ipcache entries,
// and starts the server. On error it removes what it created.
func newTopo(ctx context.Context, log *slog.Logger, attach string) (t *topo, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own binary: %w", err)
	}
	if err := sweep(); err != nil {
		return nil, fmt.Errorf("remove leftovers of an earlier run: %w", err)
	}
	t = &topo{log: log, self: self}
	defer func() {
		if err != nil {
			err = errors.Join(err, t.close())
		}
	}()
	for _, ns := range []string{nsHost, nsClient, nsServer} {
		if err := ip("netns", "add", ns); err != nil {
			return t, err
		}
		if err := ip("-n", ns, "link", "set", "lo", "up"); err != nil {
			return t, err
		}
	}
	// Many short connections: let the client reuse ports in TIME_WAIT.
	for _, kv := range []string{"net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"} {
		if err := ip("netns", "exec", nsClient, "sysctl", "-qw", kv); err != nil {
			return t, err
		}
	}
	t.stateDir, err = os.MkdirTemp("", namePrefix+"-state-")
	if err != nil {
		return t, fmt.Errorf("create state dir: %w", err)
	}
	t.d, err = datapath.Open(datapath.Options{PinDir: pinDir, Attach: attach,
		CTMaxEntries: 131072, IPCacheMaxEntries: 65536, PolicyMaxEntries: 16384}, log)
	if err != nil {
		return t, fmt.Errorf("open datapath: %w", err)
	}
	t.dp = nsDatapath{d: t.d, host: nsPath(nsHost)}
	t.m, err = endpoint.New(endpoint.Options{StateDir: t.stateDir, CIDRs: []netip.Prefix{endpointCIDR},
		HostNetns: nsPath(nsHost), LinkPrefix: linkPrefix, Timeout: 5 * time.Second, Enforcer: benchEnforcer{d: t.d, hostIP: nodeIP}},
		t.dp, &fakeIdentities{ids: map[string]identity.ID{}}, log)
	if err != nil {
		return t, fmt.Errorf("open endpoint manager: %w", err)
	}
	for _, ep := range []struct {
		dst  *endpoint.Endpoint
		name string
		ns   string
	}{{&t.client, "bench-client", nsClient}, {&t.server, "bench-server", nsServer}} {
		*ep.dst, err = t.m.Add(ctx, endpoint.Request{Name: ep.name, NetnsPath: nsPath(ep.ns),
			Labels: identity.MustLabels("app", ep.name)})
		if err != nil {
			return t, fmt.Errorf("add endpoint %s: %w", ep.name, err)
		}
	}
	t.attached = true
	for i := range 1000 {
		a := fillerBase.As4()
		a[2], a[3] = byte(i>>8), byte(i)
		p := netip.PrefixFrom(netip.AddrFrom4(a), 32)
		if err := t.d.UpsertIPCache(p, fillerIDBase+uint32(i), nodeIP); err != nil {
			return t, fmt.Errorf("fill ipcache: %w", err)
		}
	}
	t.policy = serverPolicy(uint32(t.client.Identity))
	if err := t.d.SetPolicy(t.server.ID, t.policy); err != nil {
		return t, fmt.Errorf("set server policy: %w", err)
	}
	if err := t.startServer(); err != nil {
		return t, err
	}
	if err := t.startClient(); err != nil {
		return t, err
	}
	return t, nil
}

// serverPolicy is 10,000 ingress entries for the filler identities (each on
// fillerPorts ports the load never uses), the one entry that admits the
// client on the bench port, and the egress wildcard an endpoint has when no
// egress policy selects it.
func serverPolicy(client uint32) []datapath.Entry {
	var es []datapath.Entry
	for i := range 1000 {
		for p := range fillerPorts {
			es = append(es, datapath.Entry{Identity: fillerIDBase + uint32(i), Direction: datapath.Ingress,
				Proto: unix.IPPROTO_TCP, Port: uint16(8000 + p)})
		}
	}
	return append(es,
		datapath.Entry{Identity: client, Direction: datapath.Ingress, Proto: unix.IPPROTO_TCP, Port: benchPort},
		datapath.Entry{Direction: datapath.Egress})
}

func (t *topo) serverAddr(port int) string {
	return netip.AddrPortFrom(t.server.IPv4, uint16(port)).String()
}

func (t *topo) startServer() error {
	cmd := exec.Command("ip", "netns", "exec", nsServer, t.self, "serve", "-listen", t.serverAddr(benchPort))
	cmd.Stderr = os.Stderr
	cmd.Env = loadEnv()
	// The server dies with us, even if we are killed; ip execs it, so the
	// pid is the server's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("start server: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start server: %w", err)
	}
	t.serve = cmd
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			return fmt.Errorf("start server: %w", err)
		}
	case <-time.After(5 * time.Second):
		return errors.New("start server: not ready after 5s")
	}
	return nil
}

// setAttached switches between configuration (b), rackwire attached with
// the full policy, and (a), no program on either veth.
func (t *topo) setAttached(on bool) error {
	if on == t.attached {
		return nil
	}
	eps := []endpoint.Endpoint{t.client, t.server}
	if !on {
		for _, ep := range eps {
			if err := t.dp.DetachEndpoint(ep.ID, ep.HostIfIndex); err != nil {
				return err
			}
		}
		t.attached = false
		return nil
	}
	for _, ep := range eps {
		// The manager's own spec: the same the endpoint got when added.
		spec := endpoint.AttachSpec{ID: ep.ID, IfIndex: ep.HostIfIndex, IfName: ep.HostIfName, IPs: ep.IPs(),
			Identity: ep.Identity}
		spec.HostMAC, _ = net.ParseMAC(ep.HostMAC)
		spec.PeerMAC, _ = net.ParseMAC(ep.MAC)
		if err := t.dp.AttachEndpoint(spec); err != nil {
			return err
		}
	}
	// A re-attached endpoint's map is created closed: the client is open
	// (no policy selects it), the server holds the benchmark's policy.
	if err := t.d.SetPolicy(t.client.ID, datapath.OpenEntries()); err != nil {
		return fmt.Errorf("open client policy: %w", err)
	}
	if err := t.d.SetPolicy(t.server.ID, t.policy); err != nil {
		return fmt.Errorf("set server policy: %w", err)
	}
	t.attached = true
	return nil
}

// loadEnv runs the client and the server on one OS thread each, like
// netperf: on two cores, Go's spare threads would only add scheduling noise.
func loadEnv() []string { return append(os.Environ(), "GOMAXPROCS=1") }

// startClient starts the long-lived client in the client namespace.
func (t *topo) startClient() error {
	cmd := exec.Command("ip", "netns", "exec", nsClient, t.self, "client")
	cmd.Stderr = os.Stderr
	cmd.Env = loadEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return fmt.Errorf("start client: %w", err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("start client: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start client: %w", err)
	}
	t.clientCmd, t.clientIn, t.clientOut = cmd, in, json.NewDecoder(out)
	return nil
}

// load has the client run one measurement against the server.
func (t *topo) load(ctx context.Context, kind string, port int, dur time.Duration, maxOps int64) (result, error) {
	if err := ctx.Err(); err != nil {
		return result{}, err
	}
	req := request{Kind: kind, Addr: t.serverAddr(port), Dur: dur, Max: maxOps}
	if err := json.NewEncoder(t.clientIn).Encode(req); err != nil {
		return result{}, fmt.Errorf("client %s: send request: %w", kind, err)
	}
	var r result
	if err := t.clientOut.Decode(&r); err != nil {
		return result{}, fmt.Errorf("client %s: read result: %w", kind, err)
	}
	if r.Error != "" {
		return result{}, fmt.Errorf("client %s: %s", kind, r.Error)
	}
	return r, nil
}

// cpuTime is the CPU time the client and the server have used so far, in
// ns, summed over their threads (/proc/PID/task/TID/schedstat). With the
// kernel's softirq time not accounted apart, it includes the veth, routing
// and BPF work done in their context.
func (t *topo) cpuTime() (float64, error) {
	var total float64
	for _, cmd := range []*exec.Cmd{t.clientCmd, t.serve} {
		tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", cmd.Process.Pid))
		if err != nil || len(tasks) == 0 {
			return 0, fmt.Errorf("read cpu time of pid %d: no tasks (%v)", cmd.Process.Pid, err)
		}
		for _, f := range tasks {
			b, err := os.ReadFile(f)
			if err != nil {
				continue // a thread that just ended
			}
			var ns float64
			if _, err := fmt.Sscan(string(b), &ns); err != nil {
				return 0, fmt.Errorf("parse %s: %w", f, err)
			}
			total += ns
		}
	}
	return total, nil
}

// stopProcess ends a load process: a polite signal, then SIGKILL.
func stopProcess(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// allowedPackets is the packet counter of the entry that admits the bench
// traffic: how many packets the policy lookup decided (CT misses).
func (t *topo) allowedPackets() (uint64, error) {
	es, err := t.d.Policy(t.server.ID)
	if err != nil {
		return 0, fmt.Errorf("read server policy: %w", err)
	}
	for _, e := range es {
		if e.Identity == uint32(t.client.Identity) && e.Port == benchPort && e.Direction == datapath.Ingress {
			return e.Packets, nil
		}
	}
	return 0, errors.New("read server policy: the bench entry is missing")
}

func (t *topo) policyEntries() int {
	es, err := t.d.Policy(t.server.ID)
	if err != nil {
		return -1
	}
	return len(es)
}

// close stops the server, deletes the endpoints and removes the pins,
// namespaces and state, whatever state the run is in.
func (t *topo) close() error {
	var errs []error
	if t.clientIn != nil {
		t.clientIn.Close()
	}
	stopProcess(t.clientCmd)
	stopProcess(t.serve)
	if t.m != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		for _, ep := range t.m.List() {
			if err := t.m.Delete(ctx, ep.Name); err != nil {
				errs = append(errs, fmt.Errorf("delete endpoint %s: %w", ep.Name, err))
			}
		}
		cancel()
		t.m.Close()
	}
	if t.d != nil {
		t.d.Close()
	}
	errs = append(errs, sweep())
	if t.stateDir != "" && filepath.IsAbs(t.stateDir) {
		errs = append(errs, os.RemoveAll(t.stateDir))
	}
	return errors.Join(errs...)
}
