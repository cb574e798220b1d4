package bgp

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/birdconf/birdtest"
	"github.com/rackwire/rackwire/daemon/api"
	agentbgp "github.com/rackwire/rackwire/daemon/bgp"
	"github.com/rackwire/rackwire/internal/testenv"
)

const (
	vip        = "10.96.253.10/32"
	healthPort = "127.0.0.1:18253"
)

// torConf is the top-of-rack router: it learns the hosts' routes, installs
// them with ECMP (merge paths), and sends each host a default route. Its
// timers are short so that a session refused at first (the host's BIRD not
// configured yet) comes up within seconds.
const torConf = `router id 10.253.100.1;
log stderr all;
debug protocols { states, events };
protocol device { scan time 1; }
protocol kernel {
	scan time 1;
	merge paths on;
	ipv4 { import none; export where source = RTS_BGP; };
}
protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }
protocol static { ipv4; route 0.0.0.0/0 blackhole; }
template bgp host {
	local as 65001;
	bfd on;
	connect delay time 1;
	connect retry time 2;
	error wait time 1, 2;
	ipv4 { import all; export where source = RTS_STATIC; };
}
protocol bgp h1 from host { local 10.253.101.1 as 65001; neighbor 10.253.101.2 as 65101; }
protocol bgp h1wrong from host { local 10.253.101.3 as 65001; neighbor 10.253.101.4 as 65101; }
protocol bgp h2 from host { local 10.253.102.1 as 65001; neighbor 10.253.102.2 as 65102; }
`

// hostBird is what the test starts each host's BIRD with, like the file
// Debian's bird2 package installs (an unnamed device protocol); rackwired
// replaces it with the rendered config and reconfigures BIRD. Replacing
// the device protocol by rw_device makes BIRD forget the interfaces until
// rw_device's next scan (every 2 s), so the first sessions wait up to that long.
const hostBird = "router id %s;\nprotocol device { }\n"

// Binaries built from this tree once per run.
func binaries(t *testing.T) (rackwired, rackwire string) { return testenv.Binaries(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBinaries()
	os.Exit(code)
}

// host is one simulated host: its namespace, its BIRD, its rackwired.
type host struct {
	name, ns, dir string
	uplink        string // node address
	asn           int
	cidr          string
	cli           string
	socket        string
	birdConf      string
	birdSock      string
	bird          *birdtest.Bird
	health        *listener
	agent         *exec.Cmd
	agentDone     chan struct{}
}

// config is the host's rackwire.toml; extraPeers is appended verbatim.
func (h *host) config(extraPeers string) string {
	return h.head(`backend = "local"`) + fmt.Sprintf(`vips = [%[1]q]
import = ["0.0.0.0/0"]

[[bgp.peers]]
name = "tor"
address = %[2]q
asn = 65001
bfd = true
bfd_min_rx = "100ms"
bfd_min_tx = "100ms"
bfd_multiplier = 3
hold_time = 9
keepalive_time = 3
%[3]s
[[bgp.vip_health]]
vip = %[1]q
type = "tcp"
target = %[4]q
interval = "100ms"
timeout = "100ms"
rise = 1
fall = 1
`, vip, torAddr(h.uplink), extraPeers, healthPort)
}

// head is the config up to [bgp] local_asn, with store as the [store]
// section's body.
func (h *host) head(store string) string {
	return fmt.Sprintf(`version = 1
[node]
name = %[1]q
addresses = [%[2]q]
[agent]
state_dir = %[3]q
socket = %[4]q
socket_group = ""
[ipam]
cidrs = [%[5]q]
[store]
%[11]s
[datapath]
pin_dir = %[6]q
policy_dir = %[7]q
[metrics]
listen = ""
[restart]
jitter_window = "0s"
[log]
level = "info"
format = "text"
[bgp]
enabled = true
bird_config = %[8]q
bird_socket = %[9]q
router_id = %[2]q
local_asn = %[10]d
`, h.name, h.uplink, filepath.Join(h.dir, "state"), h.socket, h.cidr,
		"/sys/fs/bpf/"+h.name, filepath.Join(h.dir, "policies.d"), h.birdConf, h.birdSock, h.asn, store)
}

// torAddr is the ToR's side of a host uplink: x.y.z.2 -> x.y.z.1.
func torAddr(uplink string) string { return strings.TrimSuffix(uplink, ".2") + ".1" }

// startAgent writes the config and runs rackwired in the host namespace
// with nsenter (not `ip netns exec`, which remounts /sys and would hide the
// shared bpffs), stopped by pid at cleanup; the pins go after it.
func (h *host) startAgent(t *testing.T, extraPeers string) {
	t.Helper()
	h.runAgent(t, h.config(extraPeers))
}

// runAgent is startAgent with the whole config text given.
func (h *host) runAgent(t *testing.T, config string) {
	t.Helper()
	rackwired, _ := binaries(t)
	if err := os.MkdirAll(filepath.Join(h.dir, "policies.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(h.dir, "rackwire.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	pins := "/sys/fs/bpf/" + h.name
	os.RemoveAll(pins)
	t.Cleanup(func() { os.RemoveAll(pins) })
	logf, err := os.Create(filepath.Join(h.dir, "rackwired.log"))
	if err != nil {
		t.Fatal(err)
	}
	h.agent = exec.Command("nsenter", "--net=/run/netns/"+h.ns, "--", rackwired, "--config", cfg)
	h.agent.Stdout, h.agent.Stderr = logf, logf
	if err := h.agent.Start(); err != nil {
		t.Fatalf("start rackwired on %s: %v", h.name, err)
	}
	h.agentDone = make(chan struct{})
	go func() { h.agent.Wait(); logf.Close(); close(h.agentDone) }()
	t.Cleanup(func() {
		h.agent.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.agentDone:
		case <-time.After(15 * time.Second):
			t.Errorf("%s: rackwired (pid %d) ignored SIGTERM for 15s; killing it", h.name, h.agent.Process.Pid)
			h.agent.Process.Kill()
			<-h.agentDone
		}
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(h.dir, "rackwired.log"))
			t.Logf("%s rackwired log:\n%s", h.name, tail(out, 60))
		}
	})
	waitFor(t, h.name+": rackwired API answers", 30*time.Second, func() bool {
		h.alive(t)
		_, err := h.rw("status", "--json")
		return err == nil
	})
}

// alive fails the test when rackwired has exited.
func (h *host) alive(t *testing.T) {
	t.Helper()
	select {
	case <-h.agentDone:
		out, _ := os.ReadFile(filepath.Join(h.dir, "rackwired.log"))
		t.Fatalf("%s: rackwired exited: %v\n%s", h.name, h.agent.ProcessState, tail(out, 60))
	default:
	}
}

// startBird runs the host's BIRD with a minimal config of its own.
func (h *host) startBird(t *testing.T) {
	t.Helper()
	h.bird = birdtest.Start(t, h.ns, h.dir, fmt.Sprintf(hostBird, h.uplink))
}

// rw runs the operator CLI against this host's agent.
func (h *host) rw(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, h.cli, append([]string{"--socket", h.socket}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("rackwire %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func (h *host) mustRW(t *testing.T, args ...string) string {
	t.Helper()
	out, err := h.rw(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (h *host) status(t *testing.T) api.Status {
	t.Helper()
	var st api.Status
	if err := json.Unmarshal([]byte(h.mustRW(t, "status", "--json")), &st); err != nil {
		t.Fatalf("%s: decode rackwire status --json: %v", h.name, err)
	}
	return st
}

func (h *host) bgpStatus(t *testing.T) agentbgp.Status {
	t.Helper()
	var st agentbgp.Status
	if err := json.Unmarshal([]byte(h.mustRW(t, "bgp", "status", "--json")), &st); err != nil {
		t.Fatalf("%s: decode rackwire bgp status --json: %v", h.name, err)
	}
	return st
}

// listener is a TCP listener inside a host namespace: the VIP's backend
// that the agent's health check connects to.
type listener struct {
	ns, addr string
	mu       sync.Mutex
	ln       net.Listener
}

func listenIn(t *testing.T, ns, addr string) *listener {
	l := &listener{ns: ns, addr: addr}
	l.up(t)
	t.Cleanup(l.down)
	return l
}

// up opens the socket in the namespace (inNetNS).
func (l *listener) up(t *testing.T) {
	t.Helper()
	ln, err := inNetNS(l.ns, func() (net.Listener, error) { return net.Listen("tcp", l.addr) })
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", l.addr, l.ns, err)
	}
	l.mu.Lock()
	l.ln = ln
	l.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

func (l *listener) down() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		l.ln.Close()
		l.ln = nil
	}
}

// torRoute returns `ip route show PREFIX` in the ToR namespace.
func torRoute(t *testing.T, prefix string) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", "rwn-tor", "route", "show", prefix).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n rwn-tor route show %s: %v: %s", prefix, err, out)
	}
	return string(out)
}

// nextHops returns the gateways of the ToR's route to prefix.
func nextHops(t *testing.T, prefix string) []string {
	t.Helper()
	var hops []string
	f := strings.Fields(torRoute(t, prefix))
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "via" {
			hops = append(hops, f[i+1])
		}
	}
	return hops
}

// waitFor polls cond every 5ms until it holds or timeout passes, and
// returns how long it took.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func TestAgentsAnnounceThroughBIRD(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	testenv.RequireCommand(t, "nsenter")
	testenv.RequireCommand(t, "bird")
	testenv.RequireCommand(t, "go")
	testenv.RequireCommand(t, "ping")
	_, cli := binaries(t)

	for _, ns := range []string{"rwn-tor", "rwn-h1", "rwn-h2", "rwn-e1", "rwn-e2"} {
		birdtest.NetNS(t, ns)
	}
	birdtest.Veth(t, "rwn-tor", "rwn-t1", "10.253.101.1/24", "rwn-h1", "rwn-h1u", "10.253.101.2/24")
	birdtest.Run(t, "ip", "-n", "rwn-tor", "addr", "add", "10.253.101.3/24", "dev", "rwn-t1")
	birdtest.Run(t, "ip", "-n", "rwn-h1", "addr", "add", "10.253.101.4/24", "dev", "rwn-h1u")
	birdtest.Veth(t, "rwn-tor", "rwn-t2", "10.253.102.1/24", "rwn-h2", "rwn-h2u", "10.253.102.2/24")
	birdtest.Run(t, "ip", "netns", "exec", "rwn-tor", "sysctl", "-qw", "net.ipv4.ip_forward=1")
	torDir := t.TempDir()
	birdtest.Start(t, "rwn-tor", torDir, torConf)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(torDir, "bird.log"))
			t.Logf("ToR bird log:\n%s", tail(out, 60))
		}
	})

	newHost := func(name, ns, uplink, cidr string, asn int) *host {
		dir := t.TempDir()
		return &host{
			name: name, ns: ns, dir: dir, uplink: uplink, asn: asn, cidr: cidr, cli: cli,
			socket:   filepath.Join(dir, "rackwire.sock"),
			birdConf: filepath.Join(dir, "bird.conf"),
			birdSock: filepath.Join(dir, "bird.ctl"),
		}
	}
	h1 := newHost("rwn-h1", "rwn-h1", "10.253.101.2", "10.253.1.0/24", 65101)
	h2 := newHost("rwn-h2", "rwn-h2", "10.253.102.2", "10.253.2.0/24", 65102)
	h1.health = listenIn(t, h1.ns, healthPort)
	h2.health = listenIn(t, h2.ns, healthPort)

	// h1: BIRD first, then the agent. Its third peer answers with another
	// ASN than the one configured, so that session never comes up.
	h1.startBird(t)
	h1.startAgent(t, `
[[bgp.peers]]
name = "tor_wrong"
address = "10.253.101.3"
source_address = "10.253.101.4"
asn = 65009
`)

	// h2: the agent first, with no BIRD at all.
	h2.startAgent(t, "")
	t.Run("BIRD not running at agent start", func(t *testing.T) {
		var st api.Status
		waitFor(t, "h2 rackwire status reports BGP unavailable", 10*time.Second, func() bool {
			st = h2.status(t)
			return st.BGP.State == api.StateUnavailable
		})
		if !strings.Contains(st.BGP.Message, h2.birdSock) && !strings.Contains(strings.ToLower(st.BGP.Message), "not running") {
			t.Errorf("h2 status BGP message = %q, want it to say BIRD is not running at %s", st.BGP.Message, h2.birdSock)
		}
		text := h2.mustRW(t, "status")
		t.Logf("h2 `rackwire status` without BIRD:\n%s", text)
		if !strings.Contains(bgpLine(text), "unavailable") {
			t.Errorf("h2 `rackwire status` BGP line = %q, want unavailable", bgpLine(text))
		}
		if bs := h2.bgpStatus(t); bs.BirdRunning || bs.BirdError == "" {
			t.Errorf("h2 bgp status: bird_running=%v bird_error=%q, want not running with a reason", bs.BirdRunning, bs.BirdError)
		}
		// The checked file waits for BIRD; the test's BIRD starts with its
		// own file anyway, so the agent must configure it when it appears.
		if b, err := os.ReadFile(h2.birdConf); err != nil || !strings.Contains(string(b), "Generated by rackwire") {
			t.Errorf("h2 %s while BIRD is absent: %v, %.80q; want the rendered file in place", h2.birdConf, err, b)
		}
		time.Sleep(time.Second)
		h2.alive(t)
	})
	birdStart := time.Now()
	h2.startBird(t)
	d := waitFor(t, "h2's agent configures the BIRD that appeared", 30*time.Second, func() bool {
		bs := h2.bgpStatus(t)
		return bs.BirdRunning && bs.LastApply.OK && bs.LastApply.Reconfigured && len(bs.Protocols) > 2
	})
	t.Logf("h2's agent applied its config to the BIRD that appeared after %v (retry interval 5s)", d.Truncate(time.Millisecond))

	waitFor(t, "each host CIDR via its host on the ToR", 60*time.Second, func() bool {
		return strings.Contains(torRoute(t, "10.253.1.0/24"), "via 10.253.101.2") &&
			strings.Contains(torRoute(t, "10.253.2.0/24"), "via 10.253.102.2")
	})
	t.Logf("h2's CIDR on the ToR %v after h2's BIRD started (agent retry, then BIRD's interface scan and BGP connect)", time.Since(birdStart).Truncate(time.Millisecond))
	waitFor(t, "the VIP with two next hops on the ToR", 30*time.Second, func() bool { return len(nextHops(t, vip)) == 2 })
	t.Logf("ToR route to the VIP:\n%s", torRoute(t, vip))
	if hops := nextHops(t, vip); !(contains(hops, "10.253.101.2") && contains(hops, "10.253.102.2")) {
		t.Errorf("VIP next hops on the ToR = %v, want 10.253.101.2 and 10.253.102.2", hops)
	}
	if st := h2.status(t); st.BGP.State != api.StateOK {
		t.Errorf("h2 status BGP after BIRD appeared = %+v, want ok", st.BGP)
	}

	t.Run("endpoint on h1 reaches endpoint on h2 through the ToR", func(t *testing.T) {
		// h1 knows h2's CIDR only through the default route it learned from
		// the ToR, and the ToR knows it only from h2's announcement. With
		// the local store each host has its own identities, so h2 sees h1's
		// endpoint by address: its policy admits h1's CIDR with fromCIDR.
		h1.mustRW(t, "endpoint", "add", "--name", "e1", "--netns", "/run/netns/rwn-e1", "--labels", "app=client", "--ip", "10.253.1.10")
		h2.mustRW(t, "endpoint", "add", "--name", "e2", "--netns", "/run/netns/rwn-e2", "--labels", "app=server", "--ip", "10.253.2.10")
		if out := birdtest.Run(t, "ip", "-n", "rwn-h1", "route", "show", "default"); !strings.Contains(out, "via 10.253.101.1") {
			t.Errorf("h1 default route = %q, want via 10.253.101.1 (learned from the ToR)", out)
		}
		ping := func() ([]byte, error) {
			return exec.Command("ip", "netns", "exec", "rwn-e1", "ping", "-c", "1", "-W", "1", "10.253.2.10").CombinedOutput()
		}
		h2.importPolicy(t, "10.253.1.0/24")
		var out []byte
		var err error
		waitFor(t, "ping 10.253.1.10 -> 10.253.2.10 with h2's policy admitting h1's CIDR", 10*time.Second, func() bool {
			out, err = ping()
			return err == nil
		})
		t.Logf("e1 (h1) -> e2 (h2) through the ToR, fromCIDR 10.253.1.0/24 on h2:\n%s", out)
		// The same policy admitting another prefix only: h2's datapath now
		// drops what arrives from h1, so the packets did go through it.
		h2.importPolicy(t, "10.253.1.128/25")
		waitFor(t, "ping refused once h2's policy no longer admits 10.253.1.10", 10*time.Second, func() bool {
			_, err = ping()
			return err != nil
		})
		h2.importPolicy(t, "10.253.1.0/24")
		waitFor(t, "ping admitted again", 10*time.Second, func() bool {
			_, err = ping()
			return err == nil
		})
	})

	t.Run("VIP health check fails on h1", func(t *testing.T) {
		h1.health.down()
		d := waitFor(t, "one next hop after h1's backend closed", 10*time.Second, func() bool {
			h := nextHops(t, vip)
			return len(h) == 1 && h[0] == "10.253.102.2"
		})
		t.Logf("health check failover (interval 100ms, fall 1): ToR down to one VIP next hop after %v", d.Truncate(time.Millisecond))
		bs := h1.bgpStatus(t)
		if len(bs.VIPs) != 1 || bs.VIPs[0].Healthy || bs.VIPs[0].Announced {
			t.Errorf("h1 bgp status VIPs = %+v, want unhealthy and not announced", bs.VIPs)
		}
		h1.health.up(t)
		d = waitFor(t, "two next hops after h1's backend is back", 10*time.Second, func() bool { return len(nextHops(t, vip)) == 2 })
		t.Logf("health check recovery (rise 1): two VIP next hops again after %v", d.Truncate(time.Millisecond))
	})

	t.Run("drain and undrain h2", func(t *testing.T) {
		start := time.Now()
		h2.mustRW(t, "bgp", "drain")
		cli := time.Since(start)
		d := waitFor(t, "h2's CIDR and VIP withdrawn after drain", 10*time.Second, func() bool {
			h := nextHops(t, vip)
			return len(h) == 1 && h[0] == "10.253.101.2" && torRoute(t, "10.253.2.0/24") == ""
		}) + cli
		t.Logf("drain: h2's CIDR gone and one VIP next hop on the ToR %v after `rackwire bgp drain` (CLI returned after %v)", d.Truncate(time.Millisecond), cli.Truncate(time.Millisecond))
		bs := h2.bgpStatus(t)
		if !bs.Drained || len(bs.Announced) != 0 {
			t.Errorf("h2 bgp status drained=%v announced=%v, want drained with nothing announced", bs.Drained, bs.Announced)
		}
		if st := h2.status(t); !strings.Contains(st.BGP.Message, "drained") {
			t.Errorf("h2 status BGP message = %q, want it to say drained", st.BGP.Message)
		}
		start = time.Now()
		h2.mustRW(t, "bgp", "undrain")
		waitFor(t, "h2's CIDR and VIP back after undrain", 10*time.Second, func() bool {
			return len(nextHops(t, vip)) == 2 && strings.Contains(torRoute(t, "10.253.2.0/24"), "via 10.253.102.2")
		})
		d = time.Since(start)
		t.Logf("undrain: h2's CIDR and both VIP next hops back %v after `rackwire bgp undrain`", d.Truncate(time.Millisecond))
	})

	t.Run("wrong ASN reported with BIRD's reason", func(t *testing.T) {
		var wrong agentbgp.ProtocolStatus
		waitFor(t, "tor_wrong with a bad-AS reason in rackwire bgp status --json", 30*time.Second, func() bool {
			for _, p := range h1.bgpStatus(t).Protocols {
				if p.Name == "tor_wrong" {
					wrong = p
				}
			}
			if strings.Contains(wrong.Reason, "AS") {
				return true
			}
			time.Sleep(200 * time.Millisecond)
			return false
		})
		t.Logf("h1 bgp status --json: tor_wrong state %q bgp_state %q reason %q", wrong.State, wrong.BGPState, wrong.Reason)
		if wrong.BGPState == "Established" {
			t.Errorf("tor_wrong is Established; the ASN is wrong")
		}
		text := h1.mustRW(t, "bgp", "status")
		t.Logf("h1 `rackwire bgp status`:\n%s", text)
		if !strings.Contains(text, "tor_wrong") || !strings.Contains(text, wrong.Reason) {
			t.Errorf("h1 `rackwire bgp status` does not show tor_wrong with %q", wrong.Reason)
		}
		st := h1.status(t)
		if st.BGP.State != api.StateDegraded || !strings.Contains(st.BGP.Detail["tor_wrong"], "AS") || st.BGP.Detail["tor"] != "Established" {
			t.Errorf("h1 status BGP = %+v, want degraded, tor Established, tor_wrong with BIRD's reason", st.BGP)
		}
		line := bgpLine(h1.mustRW(t, "status"))
		t.Logf("h1 `rackwire status`: %s", line)
		if !strings.Contains(line, "tor_wrong=") || !strings.Contains(line, wrong.Reason) {
			t.Errorf("h1 `rackwire status` BGP line = %q, want tor_wrong with %q", line, wrong.Reason)
		}
	})

	t.Run("render prints the file in force; SIGHUP applies a changed config", func(t *testing.T) {
		onDisk, err := os.ReadFile(h1.birdConf)
		if err != nil {
			t.Fatal(err)
		}
		if out := h1.mustRW(t, "bgp", "render"); out != string(onDisk) {
			t.Errorf("h1 `rackwire bgp render` differs from %s:\n%s\n--- on disk:\n%s", h1.birdConf, out, onDisk)
		}
		// The operator removes the broken peer and reloads.
		cfg := filepath.Join(h1.dir, "rackwire.toml")
		if err := os.WriteFile(cfg, []byte(h1.config("")), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := h1.agent.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatalf("SIGHUP rackwired: %v", err)
		}
		d := waitFor(t, "tor_wrong gone from h1's BIRD after SIGHUP", 10*time.Second, func() bool {
			for _, p := range h1.bgpStatus(t).Protocols {
				if p.Name == "tor_wrong" {
					return false
				}
			}
			return true
		})
		t.Logf("SIGHUP without tor_wrong: applied to BIRD after %v", d.Truncate(time.Millisecond))
		if st := h1.status(t); st.BGP.State != api.StateOK {
			t.Errorf("h1 status BGP after removing tor_wrong = %+v, want ok", st.BGP)
		}
		if h := nextHops(t, vip); len(h) != 2 {
			t.Errorf("VIP next hops after h1's reload = %v, want two", h)
		}
	})

	t.Run("BFD detects a dead host", func(t *testing.T) {
		// Freeze h1's BIRD: its TCP session stays open (the kernel keeps
		// acknowledging) and the hold time is 9s, so only BFD (3 x 100ms)
		// takes h1's routes off the ToR this quickly.
		pid := h1.bird.Pid()
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatalf("stop h1's bird (pid %d): %v", pid, err)
		}
		defer syscall.Kill(pid, syscall.SIGCONT)
		d := waitFor(t, "h1's routes gone from the ToR", 10*time.Second, func() bool {
			h := nextHops(t, vip)
			return len(h) == 1 && h[0] == "10.253.102.2" && torRoute(t, "10.253.1.0/24") == ""
		})
		t.Logf("BFD failover (h1's BIRD frozen; 3 x 100ms = 300ms detection): h1's CIDR gone and one VIP next hop on the ToR after %v", d.Truncate(time.Millisecond))
	})
}

// importPolicy imports, on h's agent, the policy of the server endpoint:
// ingress from cidr only.
func (h *host) importPolicy(t *testing.T, cidr string) {
	t.Helper()
	f := filepath.Join(h.dir, "server-policy.yaml")
	doc := fmt.Sprintf(`apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rwn-server
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
    - fromCIDR:
        - %s
`, cidr)
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	h.mustRW(t, "policy", "import", f)
}

// bgpLine is the BGP line of `rackwire status`.
func bgpLine(text string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "BGP:") {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
