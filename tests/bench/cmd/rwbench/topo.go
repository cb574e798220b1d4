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
	namePrefix = "rwbn-bench"
	nsHost     = namePrefix + "-host" // local: the host both endpoints hang off
	nsClient   = namePrefix + "-a"
	nsServer   = namePrefix + "-b"
	nsHostA    = namePrefix + "-xa" // cross-host: the client's host
	nsHostB    = namePrefix + "-xb" // the server's host
	nsRouter   = namePrefix + "-xr" // routes between the two
	nsXClient  = namePrefix + "-xc"
	nsXServer  = namePrefix + "-xs"
	pinDir     = "/sys/fs/bpf/" + namePrefix
	linkPrefix = "rwbn"
	nftTable   = "rwbn_bench"
)

var allNamespaces = []string{nsClient, nsServer, nsHost, nsXClient, nsXServer, nsHostA, nsHostB, nsRouter}

// Addresses: endpoints from the CIDRs, the extra ipcache identities from
// fillerBase upwards (never routed; only looked up), the router's links
// from transitA/transitB.
var (
	endpointCIDR = netip.MustParsePrefix("10.250.77.0/28")
	crossCIDRA   = netip.MustParsePrefix("10.250.78.0/28")
	crossCIDRB   = netip.MustParsePrefix("10.250.79.0/28")
	nodeIP       = netip.MustParsePrefix("192.0.2.1/32").Addr()
	fillerBase   = netip.MustParseAddr("10.252.0.0")
)

const (
	benchPort    = 7001
	deniedPort   = 7002 // no entry allows it: the probe checks enforcement
	fillerIDBase = 100000
	fillers      = 1000
	fillerPorts  = 10 // policy filler: identities x ports
)

// mode is one configuration of a pair's veths.
type mode string

const (
	modeNone     mode = "a" // no program, plain veth + routing
	modeRedirect mode = "b" // rackwire, policy, local delivery by bpf_redirect_peer
	modeHost     mode = "c" // rackwire, policy, delivery through the host stack
	modeOpen     mode = "d" // rackwire (host stack), no policy: both endpoints open
	modeNFT      mode = "n" // no program; nftables sets in the host's forward chain
	modeFast     mode = "f" // cross-host: rackwire, policy, eBPF host routing (host stack skipped)
)

// side is one endpoint of a pair and where its host side lives.
type side struct {
	ep     endpoint.Endpoint
	hostNS string // path of the host namespace
	// datapath per rackwire mode (its own pins, like one agent per host)
	dps map[mode]*datapath.Datapath
	// attached is the datapath whose programs are on the veth now; nil for none.
	attached *datapath.Datapath
	// uplink is the host's device toward the router (cross-host only):
	// rw_from_uplink of dps[modeFast] is on it in modeFast only.
	uplink string
}

// pair is a client and a server endpoint, the load processes in their
// namespaces, and the configuration the veths are in.
type pair struct {
	name           string
	client, server side
	clientNS       string
	serverNS       string
	nftHost        string // host namespace name where modeNFT puts its rules; "" for none
	policy         []datapath.Entry
	mode           mode
	serve          *exec.Cmd
	// The long-lived client: requests in, results out.
	clientCmd *exec.Cmd
	clientIn  io.WriteCloser
	clientOut *json.Decoder
}

// topo is everything the benchmark created; it owns it all until close.
type topo struct {
	log      *slog.Logger
	self     string // this binary, run inside the namespaces
	stateDir string
	dps      []*datapath.Datapath
	managers []*endpoint.Manager
	local    *pair
	cross    *pair
	redirect bool // the kernel has bpf_redirect_peer: mode b exists
	fast     bool // the kernel has eBPF host routing: mode f exists
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

// nsDatapath drives a datapath for an endpoint manager with the attach
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

// benchEnforcer does what the agents' enforcers do, minus the policy
// engine: the endpoint's addresses in the ipcache of every datapath (the
// store carries them to every host) and, until the benchmark writes its
// own policy, both directions open on the endpoint's own datapath.
type benchEnforcer struct {
	own    *datapath.Datapath
	all    []*datapath.Datapath
	hostIP netip.Addr
}

func (e benchEnforcer) Admit(_ context.Context, ep endpoint.Endpoint) error {
	for _, d := range e.all {
		for _, ip := range ep.IPs() {
			if err := d.UpsertIPCache(netip.PrefixFrom(ip, ip.BitLen()), uint32(ep.Identity), e.hostIP); err != nil {
				return err
			}
		}
	}
	return e.own.SetPolicy(ep.ID, datapath.OpenEntries())
}

func (e benchEnforcer) Readopt(endpoint.Endpoint) {}

func (e benchEnforcer) Gone(ep endpoint.Endpoint) {
	for _, d := range e.all {
		for _, ip := range ep.IPs() {
			_ = d.DeleteIPCache(netip.PrefixFrom(ip, ip.BitLen()))
		}
	}
}

// fakeIdentities hands out ids from 50000 up, one per label set; the
// benchmark needs identities, not the store behind them. One instance
// serves every host, as the store does.
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

func command(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func ip(args ...string) error { return command("ip", args...) }

// sweep removes what a killed run may have left: namespaces (and with them
// the veths and nftables rules) and the pin directory (and with it the tcx
// links).
func sweep() error {
	var errs []error
	for _, ns := range allNamespaces {
		if _, err := os.Stat(nsPath(ns)); err == nil {
			errs = append(errs, ip("netns", "del", ns))
		}
	}
	errs = append(errs, datapath.Cleanup(pinDir))
	return errors.Join(errs...)
}

// openDatapath opens one datapath under its own pin directory, sized for
// the benchmark.
func (t *topo) openDatapath(name string, redirect bool, attach, hostRouting string) (*datapath.Datapath, error) {
	d, err := datapath.Open(datapath.Options{PinDir: filepath.Join(pinDir, name), Attach: attach, NoRedirectPeer: !redirect,
		HostRouting: hostRouting, CTMaxEntries: 131072, IPCacheMaxEntries: 65536, PolicyMaxEntries: 16384}, t.log)
	if err != nil {
		return nil, fmt.Errorf("open datapath %s: %w", name, err)
	}
	t.dps = append(t.dps, d)
	for i := range fillers {
		a := fillerBase.As4()
		a[2], a[3] = byte(i>>8), byte(i)
		if err := d.UpsertIPCache(netip.PrefixFrom(netip.AddrFrom4(a), 32), fillerIDBase+uint32(i), nodeIP); err != nil {
			return nil, fmt.Errorf("fill ipcache: %w", err)
		}
	}
	return d, nil
}

// newManager opens an endpoint manager for host namespace hostNS whose
// endpoints get datapath own; their addresses go to every datapath in all.
func (t *topo) newManager(hostNS string, cidr netip.Prefix, own *datapath.Datapath, all []*datapath.Datapath, ids *fakeIdentities) (*endpoint.Manager, error) {
	dir, err := os.MkdirTemp(t.stateDir, "host-")
	if err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	m, err := endpoint.New(endpoint.Options{StateDir: dir, CIDRs: []netip.Prefix{cidr},
		HostNetns: nsPath(hostNS), LinkPrefix: linkPrefix, Timeout: 5 * time.Second,
		Enforcer: benchEnforcer{own: own, all: all, hostIP: nodeIP}},
		nsDatapath{d: own, host: nsPath(hostNS)}, ids, t.log)
	if err != nil {
		return nil, fmt.Errorf("open endpoint manager: %w", err)
	}
	t.managers = append(t.managers, m)
	return m, nil
}

func addEndpoint(ctx context.Context, m *endpoint.Manager, name, ns string) (endpoint.Endpoint, error) {
	ep, err := m.Add(ctx, endpoint.Request{Name: name, NetnsPath: nsPath(ns), Labels: identity.MustLabels("app", name)})
	if err != nil {
		return ep, fmt.Errorf("add endpoint %s: %w", name, err)
	}
	return ep, nil
}

// newTopo creates the namespaces, the datapaths, the endpoints through the
// endpoint manager, the 1,000 extra ipcache entries, the router between the
// two cross hosts, and starts the load processes. On error it removes what
// it created.
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
	for _, ns := range allNamespaces {
		if err := ip("netns", "add", ns); err != nil {
			return t, err
		}
		if err := ip("-n", ns, "link", "set", "lo", "up"); err != nil {
			return t, err
		}
	}
	// Many short connections: let the clients reuse ports in TIME_WAIT.
	for _, ns := range []string{nsClient, nsXClient} {
		for _, kv := range []string{"net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"} {
			if err := ip("netns", "exec", ns, "sysctl", "-qw", kv); err != nil {
				return t, err
			}
		}
	}
	t.stateDir, err = os.MkdirTemp("", namePrefix+"-state-")
	if err != nil {
		return t, fmt.Errorf("create state dir: %w", err)
	}
	ids := &fakeIdentities{ids: map[string]identity.ID{}}

	// Local: one host, two datapaths (local delivery by redirect or not is
	// a load-time constant of the programs).
	dpR, err := t.openDatapath("r", true, attach, datapath.HostRoutingAuto)
	if err != nil {
		return t, err
	}
	dpH, err := t.openDatapath("h", false, attach, datapath.HostRoutingLegacy)
	if err != nil {
		return t, err
	}
	t.redirect = dpR.Features().LocalRedirect
	m, err := t.newManager(nsHost, endpointCIDR, dpR, []*datapath.Datapath{dpR, dpH}, ids)
	if err != nil {
		return t, err
	}
	t.local = &pair{name: "local", clientNS: nsClient, serverNS: nsServer, nftHost: nsHost, mode: modeRedirect}
	for _, s := range []struct {
		dst  *side
		name string
		ns   string
	}{{&t.local.client, "bench-client", nsClient}, {&t.local.server, "bench-server", nsServer}} {
		if s.dst.ep, err = addEndpoint(ctx, m, s.name, s.ns); err != nil {
			return t, err
		}
		s.dst.hostNS = nsPath(nsHost)
		s.dst.dps = map[mode]*datapath.Datapath{modeRedirect: dpR, modeHost: dpH, modeOpen: dpH}
		s.dst.attached = dpR
	}

	// Cross-host: per host a datapath with legacy host routing (c) and
	// one with eBPF host routing (f), the router between the hosts.
	dpA, err := t.openDatapath("xa", false, attach, datapath.HostRoutingLegacy)
	if err != nil {
		return t, err
	}
	dpB, err := t.openDatapath("xb", false, attach, datapath.HostRoutingLegacy)
	if err != nil {
		return t, err
	}
	dpAf, err := t.openDatapath("xaf", false, attach, datapath.HostRoutingAuto)
	if err != nil {
		return t, err
	}
	dpBf, err := t.openDatapath("xbf", false, attach, datapath.HostRoutingAuto)
	if err != nil {
		return t, err
	}
	hr, _ := dpAf.HostRouting()
	t.fast = hr == datapath.HostRoutingBPF
	both := []*datapath.Datapath{dpA, dpB, dpAf, dpBf}
	mA, err := t.newManager(nsHostA, crossCIDRA, dpA, both, ids)
	if err != nil {
		return t, err
	}
	mB, err := t.newManager(nsHostB, crossCIDRB, dpB, both, ids)
	if err != nil {
		return t, err
	}
	t.cross = &pair{name: "cross-host", clientNS: nsXClient, serverNS: nsXServer, mode: modeHost}
	if t.cross.client.ep, err = addEndpoint(ctx, mA, "bench-xclient", nsXClient); err != nil {
		return t, err
	}
	if t.cross.server.ep, err = addEndpoint(ctx, mB, "bench-xserver", nsXServer); err != nil {
		return t, err
	}
	t.cross.client.hostNS, t.cross.client.dps, t.cross.client.attached = nsPath(nsHostA), map[mode]*datapath.Datapath{modeHost: dpA, modeFast: dpAf}, dpA
	t.cross.server.hostNS, t.cross.server.dps, t.cross.server.attached = nsPath(nsHostB), map[mode]*datapath.Datapath{modeHost: dpB, modeFast: dpBf}, dpB
	t.cross.client.uplink, t.cross.server.uplink = "rwbn-xa0", "rwbn-xb0"
	if err := route(); err != nil {
		return t, err
	}

	for _, p := range []*pair{t.local, t.cross} {
		p.policy = serverPolicy(uint32(p.client.ep.Identity))
		if err := p.startServer(t.self); err != nil {
			return t, err
		}
		if err := p.startClient(t.self); err != nil {
			return t, err
		}
	}
	return t, nil
}

// route joins the two cross hosts through the router namespace:
// 192.168.250.0/30 on A's side, 192.168.250.4/30 on B's.
func route() error {
	for _, c := range [][]string{
		{"link", "add", "rwbn-xa0", "netns", nsHostA, "type", "veth", "peer", "name", "rwbn-ra0", "netns", nsRouter},
		{"link", "add", "rwbn-xb0", "netns", nsHostB, "type", "veth", "peer", "name", "rwbn-rb0", "netns", nsRouter},
		{"-n", nsHostA, "addr", "add", "192.168.250.1/30", "dev", "rwbn-xa0"},
		{"-n", nsRouter, "addr", "add", "192.168.250.2/30", "dev", "rwbn-ra0"},
		{"-n", nsHostB, "addr", "add", "192.168.250.5/30", "dev", "rwbn-xb0"},
		{"-n", nsRouter, "addr", "add", "192.168.250.6/30", "dev", "rwbn-rb0"},
		{"-n", nsHostA, "link", "set", "rwbn-xa0", "up"},
		{"-n", nsHostB, "link", "set", "rwbn-xb0", "up"},
		{"-n", nsRouter, "link", "set", "rwbn-ra0", "up"},
		{"-n", nsRouter, "link", "set", "rwbn-rb0", "up"},
		{"-n", nsHostA, "route", "add", crossCIDRB.String(), "via", "192.168.250.2"},
		{"-n", nsHostB, "route", "add", crossCIDRA.String(), "via", "192.168.250.6"},
		{"-n", nsRouter, "route", "add", crossCIDRA.String(), "via", "192.168.250.1"},
		{"-n", nsRouter, "route", "add", crossCIDRB.String(), "via", "192.168.250.5"},
		{"netns", "exec", nsRouter, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
	} {
		if err := ip(c...); err != nil {
			return fmt.Errorf("route between the cross hosts: %w", err)
		}
	}
	return nil
}

// serverPolicy is 10,000 ingress entries for the filler identities (each on
// fillerPorts ports the load never uses), the one entry that admits the
// client on the bench port, and the egress wildcard an endpoint has when no
// egress policy selects it.
func serverPolicy(client uint32) []datapath.Entry {
	var es []datapath.Entry
	for i := range fillers {
		for p := range fillerPorts {
			es = append(es, datapath.Entry{Identity: fillerIDBase + uint32(i), Direction: datapath.Ingress,
				Proto: unix.IPPROTO_TCP, Port: uint16(8000 + p)})
		}
	}
	return append(es,
		datapath.Entry{Identity: client, Direction: datapath.Ingress, Proto: unix.IPPROTO_TCP, Port: benchPort},
		datapath.Entry{Direction: datapath.Egress})
}

// nftRules is what a user would write instead of serverPolicy on the host
// path: conntrack lets established flows through, and a set of (source
// address . port) elements, one per policy entry, admits new ones to the
// server's veth; everything else to it is dropped.
func nftRules(server endpoint.Endpoint, client netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n\tset allowed {\n\t\ttype ipv4_addr . inet_service\n\t\tsize 65536\n\t\telements = {\n", nftTable)
	fmt.Fprintf(&b, "\t\t\t%s . %d,\n", client, benchPort)
	for i := range fillers {
		a := fillerBase.As4()
		a[2], a[3] = byte(i>>8), byte(i)
		for p := range fillerPorts {
			fmt.Fprintf(&b, "\t\t\t%s . %d,\n", netip.AddrFrom4(a), 8000+p)
		}
	}
	fmt.Fprintf(&b, "\t\t}\n\t}\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n")
	fmt.Fprintf(&b, "\t\tct state established,related accept\n")
	fmt.Fprintf(&b, "\t\toifname %q ip saddr . tcp dport @allowed accept\n", server.HostIfName)
	fmt.Fprintf(&b, "\t\toifname %q drop\n\t}\n}\n", server.HostIfName)
	return b.String()
}

func (p *pair) serverAddr(port int) string {
	return netip.AddrPortFrom(p.server.ep.IPv4, uint16(port)).String()
}

func (p *pair) startServer(self string) error {
	cmd := exec.Command("ip", "netns", "exec", p.serverNS, self, "serve", "-listen", p.serverAddr(benchPort))
	cmd.Stderr = os.Stderr
	cmd.Env = loadEnv()
	// The server dies with us, even if we are killed; ip execs it, so the
	// pid is the server's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("start %s server: %w", p.name, err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s server: %w", p.name, err)
	}
	p.serve = cmd
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
			return fmt.Errorf("start %s server: %w", p.name, err)
		}
	case <-time.After(5 * time.Second):
		return fmt.Errorf("start %s server: not ready after 5s", p.name)
	}
	return nil
}

// detach takes the programs off s's veth, if any are on it.
func (s *side) detach() error {
	if s.attached == nil {
		return nil
	}
	if err := (nsDatapath{d: s.attached, host: s.hostNS}).DetachEndpoint(s.ep.ID, s.ep.HostIfIndex); err != nil {
		return err
	}
	s.attached = nil
	return nil
}

// attach puts d's programs on s's veth with the endpoint manager's own
// spec, and writes policy (a re-attached endpoint's map starts closed).
func (s *side) attach(d *datapath.Datapath, policy []datapath.Entry) error {
	spec := endpoint.AttachSpec{ID: s.ep.ID, IfIndex: s.ep.HostIfIndex, IfName: s.ep.HostIfName, IPs: s.ep.IPs(),
		Identity: s.ep.Identity}
	spec.HostMAC, _ = net.ParseMAC(s.ep.HostMAC)
	spec.PeerMAC, _ = net.ParseMAC(s.ep.MAC)
	if err := (nsDatapath{d: d, host: s.hostNS}).AttachEndpoint(spec); err != nil {
		return err
	}
	s.attached = d
	if err := d.SetPolicy(s.ep.ID, policy); err != nil {
		return fmt.Errorf("set policy of endpoint %s: %w", s.ep.Name, err)
	}
	return nil
}

// setMode puts the pair's veths in mode m: programs off or on (which
// datapath), the server's policy or both open, nftables rules or none.
func (p *pair) setMode(m mode) error {
	if m == p.mode {
		return nil
	}
	if p.mode == modeNFT {
		if err := ip("netns", "exec", p.nftHost, "nft", "delete", "table", "inet", nftTable); err != nil {
			return err
		}
	}
	if p.mode == modeFast || p.mode == "" {
		if err := p.setUplinks(false); err != nil {
			return err
		}
	}
	p.mode = "" // unknown until done
	serverPolicy := p.policy
	if m == modeOpen {
		serverPolicy = datapath.OpenEntries()
	}
	for _, s := range []*side{&p.client, &p.server} {
		want := s.dps[m]
		if s.attached != want || want == nil {
			if err := s.detach(); err != nil {
				return err
			}
		}
		if want == nil {
			continue
		}
		pol := datapath.OpenEntries()
		if s == &p.server {
			pol = serverPolicy
		}
		if s.attached == nil {
			if err := s.attach(want, pol); err != nil {
				return err
			}
		} else if err := want.SetPolicy(s.ep.ID, pol); err != nil {
			return fmt.Errorf("set policy of endpoint %s: %w", s.ep.Name, err)
		}
	}
	if m == modeFast {
		if err := p.setUplinks(true); err != nil {
			return err
		}
	}
	if m == modeNFT {
		cmd := exec.Command("ip", "netns", "exec", p.nftHost, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(nftRules(p.server.ep, p.client.ep.IPv4))
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("load nftables rules: %w: %s", err, strings.TrimSpace(string(out)))
		}
	}
	p.mode = m
	return nil
}

// setUplinks attaches (on) or detaches rw_from_uplink of each side's
// modeFast datapath on the side's uplink.
func (p *pair) setUplinks(on bool) error {
	for _, s := range []*side{&p.client, &p.server} {
		d := s.dps[modeFast]
		if d == nil || s.uplink == "" {
			continue
		}
		var names []string
		if on {
			names = []string{s.uplink}
		}
		if err := inNetns(s.hostNS, func() error { return d.SetUplinks(names) }); err != nil {
			return fmt.Errorf("%s uplink %s: %w", p.name, s.uplink, err)
		}
	}
	return nil
}

// loadEnv runs the clients and the servers on one OS thread each, like
// netperf: on two cores, Go's spare threads would only add scheduling noise.
func loadEnv() []string { return append(os.Environ(), "GOMAXPROCS=1") }

// startClient starts the long-lived client in the client namespace.
func (p *pair) startClient(self string) error {
	cmd := exec.Command("ip", "netns", "exec", p.clientNS, self, "client")
	cmd.Stderr = os.Stderr
	cmd.Env = loadEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return fmt.Errorf("start %s client: %w", p.name, err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("start %s client: %w", p.name, err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s client: %w", p.name, err)
	}
	p.clientCmd, p.clientIn, p.clientOut = cmd, in, json.NewDecoder(out)
	return nil
}

// load has the client run one measurement against the server.
func (p *pair) load(ctx context.Context, kind string, port int, dur time.Duration, maxOps int64) (result, error) {
	if err := ctx.Err(); err != nil {
		return result{}, err
	}
	req := request{Kind: kind, Addr: p.serverAddr(port), Dur: dur, Max: maxOps}
	if err := json.NewEncoder(p.clientIn).Encode(req); err != nil {
		return result{}, fmt.Errorf("%s client %s: send request: %w", p.name, kind, err)
	}
	var r result
	if err := p.clientOut.Decode(&r); err != nil {
		return result{}, fmt.Errorf("%s client %s: read result: %w", p.name, kind, err)
	}
	if r.Error != "" {
		return result{}, fmt.Errorf("%s client %s (mode %s): %s", p.name, kind, p.mode, r.Error)
	}
	return r, nil
}

// cpuTime is the CPU time the client and the server have used so far, in
// ns, summed over their threads (/proc/PID/task/TID/schedstat). With the
// kernel's softirq time not accounted apart, it includes the veth, routing
// and BPF work done in their context.
func (p *pair) cpuTime() (float64, error) {
	var total float64
	for _, cmd := range []*exec.Cmd{p.clientCmd, p.serve} {
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
// traffic on the server's datapath: how many packets the policy lookup
// decided (CT misses). ok is false when no policy is in force.
func (p *pair) allowedPackets() (n uint64, ok bool, err error) {
	d := p.server.attached
	if d == nil || p.mode == modeOpen {
		return 0, false, nil
	}
	es, err := d.Policy(p.server.ep.ID)
	if err != nil {
		return 0, false, fmt.Errorf("read server policy: %w", err)
	}
	for _, e := range es {
		if e.Identity == uint32(p.client.ep.Identity) && e.Port == benchPort && e.Direction == datapath.Ingress {
			return e.Packets, true, nil
		}
	}
	return 0, false, errors.New("read server policy: the bench entry is missing")
}

// close stops the load processes, deletes the endpoints and removes the
// pins, namespaces and state, whatever state the run is in.
func (t *topo) close() error {
	var errs []error
	for _, p := range []*pair{t.local, t.cross} {
		if p == nil {
			continue
		}
		if p.clientIn != nil {
			p.clientIn.Close()
		}
		stopProcess(p.clientCmd)
		stopProcess(p.serve)
	}
	for _, m := range t.managers {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		for _, ep := range m.List() {
			if err := m.Delete(ctx, ep.Name); err != nil {
				errs = append(errs, fmt.Errorf("delete endpoint %s: %w", ep.Name, err))
			}
		}
		cancel()
		m.Close()
	}
	for _, d := range t.dps {
		d.Close()
	}
	errs = append(errs, sweep())
	if t.stateDir != "" && filepath.IsAbs(t.stateDir) {
		errs = append(errs, os.RemoveAll(t.stateDir))
	}
	return errors.Join(errs...)
}
