package bgp

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/birdconf"
	"github.com/rackwire/rackwire/birdconf/birdtest"
	"github.com/rackwire/rackwire/daemon/config"
)

// torConf is the top-of-rack router: it learns the hosts' routes, installs
// them with ECMP (merge paths), and sends the hosts a default route.
const torConf = `router id 10.201.0.1;
log stderr all;
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
	error wait time 1, 10;
	ipv4 { import all; export where source = RTS_STATIC; };
}
protocol bgp h1 from host { local 10.201.1.1 as 65001; neighbor 10.201.1.2 as 65101; }
protocol bgp h1b from host { local 10.201.1.3 as 65001; neighbor 10.201.1.4 as 65101; }
protocol bgp h2 from host { local 10.201.2.1 as 65001; neighbor 10.201.2.2 as 65102; }
`

const vip = "10.201.200.10/32"

// backend is a local TCP listener standing in for a VIP's service.
type backend struct {
	mu   sync.Mutex
	ln   net.Listener
	addr string
}

func newBackend(t *testing.T) *backend {
	b := &backend{}
	b.up(t, "127.0.0.1:0")
	t.Cleanup(b.down)
	return b
}

func (b *backend) up(t *testing.T, addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	b.mu.Lock()
	b.ln, b.addr = ln, ln.Addr().String()
	b.mu.Unlock()
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

func (b *backend) down() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ln != nil {
		b.ln.Close()
		b.ln = nil
	}
}

type host struct {
	name string
	ns   string
	bird *birdtest.Bird
	mgr  *Manager
	back *backend
	stop func()
}

func hostConfig(asn int64, routerID, torAddr string, target string, extra ...config.Peer) config.BGP {
	peers := append([]config.Peer{{
		Name: "tor_a", Address: torAddr, ASN: 65001, BFD: true,
		BFDMinRx: config.D(100 * time.Millisecond), BFDMinTx: config.D(100 * time.Millisecond), BFDMultiplier: 3,
		HoldTime: 9, KeepaliveTime: 3,
	}}, extra...)
	return config.BGP{
		Enabled:    true,
		BirdBinary: "bird",
		RouterID:   routerID,
		LocalASN:   asn,
		VIPs:       []string{vip},
		Import:     []string{"0.0.0.0/0"},
		Peers:      peers,
		VIPHealth: []config.VIPHealth{{
			VIP: vip, Type: "tcp", Target: target,
			Interval: config.D(100 * time.Millisecond), Timeout: config.D(100 * time.Millisecond),
			Rise: 1, Fall: 1,
		}},
	}
}

func startHost(t *testing.T, name, ns string, cfg config.BGP, cidr string) *host {
	h := &host{name: name, ns: ns}
	dir := t.TempDir()
	cidrs := []netip.Prefix{netip.MustParsePrefix(cidr)}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("host", name)
	// BIRD starts with what the Manager renders before any health check:
	// the CIDR, and no VIP.
	pre := New(cfg, cidrs, "e2e", log)
	text, _, err := pre.renderFile()
	if err != nil {
		t.Fatalf("%s: renderFile() error: %v", name, err)
	}
	if strings.Contains(text, "route "+vip) {
		t.Fatalf("%s: VIP announced before any health check:\n%s", name, text)
	}
	h.bird = birdtest.Start(t, ns, dir, text)
	cfg.BirdConfig, cfg.BirdSocket = h.bird.Config, h.bird.Socket
	h.mgr = New(cfg, cidrs, "e2e", log)
	h.mgr.RetryInterval = 200 * time.Millisecond
	h.mgr.DrainFile = filepath.Join(dir, "drained")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.mgr.Run(ctx) }()
	h.stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s: Manager.Run did not return after cancel", name)
		}
	}
	t.Cleanup(h.stop)
	return h
}

// torRoute returns `ip route show PREFIX` in the ToR namespace.
func torRoute(t *testing.T, prefix string) string {
	out, err := exec.Command("ip", "-n", "rwe-tor", "route", "show", prefix).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n rwe-tor route show %s: %v: %s", prefix, err, out)
	}
	return string(out)
}

// nextHops returns the gateways of the ToR's route to prefix.
func nextHops(t *testing.T, prefix string) []string {
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

func TestEndToEndECMPAndFailover(t *testing.T) {
	birdtest.NetNS(t, "rwe-tor")
	birdtest.NetNS(t, "rwe-h1")
	birdtest.NetNS(t, "rwe-h2")
	birdtest.Veth(t, "rwe-tor", "rwe-t1", "10.201.1.1/24", "rwe-h1", "rwe-h1e", "10.201.1.2/24")
	birdtest.Run(t, "ip", "-n", "rwe-tor", "addr", "add", "10.201.1.3/24", "dev", "rwe-t1")
	birdtest.Run(t, "ip", "-n", "rwe-h1", "addr", "add", "10.201.1.4/24", "dev", "rwe-h1e")
	birdtest.Veth(t, "rwe-tor", "rwe-t2", "10.201.2.1/24", "rwe-h2", "rwe-h2e", "10.201.2.2/24")
	tor := birdtest.Start(t, "rwe-tor", t.TempDir(), torConf)
	torClient := &birdconf.Client{Socket: tor.Socket}

	b1, b2 := newBackend(t), newBackend(t)
	// h1 also peers with a ToR address that answers with another ASN than
	// the one configured: that session must never come up, with a reason.
	wrong := config.Peer{Name: "tor_wrong", Address: "10.201.1.3", SourceAddress: "10.201.1.4", ASN: 65009}
	h1 := startHost(t, "h1", "rwe-h1", hostConfig(65101, "10.201.1.2", "10.201.1.1", b1.addr, wrong), "10.201.101.0/24")
	h1.back = b1
	h2 := startHost(t, "h2", "rwe-h2", hostConfig(65102, "10.201.2.2", "10.201.2.1", b2.addr), "10.201.102.0/24")
	h2.back = b2

	waitFor(t, "each host CIDR via its host on the ToR", 60*time.Second, func() bool {
		return strings.Contains(torRoute(t, "10.201.101.0/24"), "via 10.201.1.2") &&
			strings.Contains(torRoute(t, "10.201.102.0/24"), "via 10.201.2.2")
	})
	waitFor(t, "the VIP with two next hops on the ToR", 30*time.Second, func() bool {
		return len(nextHops(t, vip)) == 2
	})
	t.Logf("ToR route to the VIP:\n%s", torRoute(t, vip))
	if hops := nextHops(t, vip); !(contains(hops, "10.201.1.2") && contains(hops, "10.201.2.2")) {
		t.Errorf("VIP next hops = %v, want 10.201.1.2 and 10.201.2.2", hops)
	}
	// The hosts learned the ToR's default route and nothing else.
	if out := birdtest.Run(t, "ip", "-n", "rwe-h1", "route", "show", "default"); !strings.Contains(out, "via 10.201.1.1") {
		t.Errorf("h1 default route = %q, want via 10.201.1.1", out)
	}
	if out := birdtest.Run(t, "ip", "-n", "rwe-h1", "route", "show", "10.201.102.0/24"); out != "" {
		t.Errorf("h1 installed h2's CIDR %q; only the default route is imported", out)
	}

	t.Run("endpoint on h1 reaches endpoint on h2 through the ToR", func(t *testing.T) {
		// Stand-ins for workload endpoints: one address of each host's CIDR.
		// h1 reaches h2 only through the default route learned from the
		// ToR and the ToR's route to h2's CIDR learned from h2.
		birdtest.Run(t, "ip", "netns", "exec", "rwe-tor", "sysctl", "-qw", "net.ipv4.ip_forward=1")
		birdtest.Run(t, "ip", "-n", "rwe-h1", "addr", "add", "10.201.101.1/32", "dev", "lo")
		birdtest.Run(t, "ip", "-n", "rwe-h2", "addr", "add", "10.201.102.1/32", "dev", "lo")
		out, err := exec.Command("ip", "netns", "exec", "rwe-h1", "ping", "-c", "1", "-W", "2", "-I", "10.201.101.1", "10.201.102.1").CombinedOutput()
		if err != nil {
			t.Errorf("ping 10.201.101.1 -> 10.201.102.1 through the ToR: %v: %s", err, out)
		}
	})

	t.Run("VIP health fails on h1", func(t *testing.T) {
		h1.back.down()
		d := waitFor(t, "one next hop after h1's backend died", 10*time.Second, func() bool {
			h := nextHops(t, vip)
			return len(h) == 1 && h[0] == "10.201.2.2"
		})
		t.Logf("health check failover (interval 100ms, fall 1): ToR down to one next hop after %v", d)
		st := h1.mgr.Status(context.Background())
		if len(st.VIPs) != 1 || st.VIPs[0].Healthy || st.VIPs[0].Announced {
			t.Errorf("h1 Status().VIPs = %+v, want unhealthy and not announced", st.VIPs)
		}
		h1.back.up(t, h1.back.addr)
		waitFor(t, "two next hops after h1's backend is back", 10*time.Second, func() bool { return len(nextHops(t, vip)) == 2 })
	})

	t.Run("drain h2", func(t *testing.T) {
		h2.mgr.Drain(false)
		d := waitFor(t, "h2's routes withdrawn after drain", 10*time.Second, func() bool {
			h := nextHops(t, vip)
			return len(h) == 1 && h[0] == "10.201.1.2" && torRoute(t, "10.201.102.0/24") == ""
		})
		t.Logf("drain: ToR down to one next hop after %v", d)
		if st := h2.mgr.Status(context.Background()); !st.Drained || len(st.Announced) != 0 {
			t.Errorf("h2 Status() drained=%v announced=%v, want drained with nothing announced", st.Drained, st.Announced)
		}
		h2.mgr.Undrain()
		waitFor(t, "two next hops after undrain", 10*time.Second, func() bool { return len(nextHops(t, vip)) == 2 })
	})

	t.Run("wrong ASN reported with BIRD's reason", func(t *testing.T) {
		var reason string
		waitFor(t, "a reason for tor_wrong", 20*time.Second, func() bool {
			for _, p := range h1.mgr.Status(context.Background()).Protocols {
				if p.Name == "tor_wrong" && p.BGPState != "Established" && p.LastError != "" {
					reason = p.Reason
					if strings.Contains(reason, "AS") {
						return true
					}
				}
			}
			time.Sleep(100 * time.Millisecond)
			return false
		})
		t.Logf("tor_wrong: %s", reason)
		if !strings.Contains(strings.ToLower(reason), "as") {
			t.Errorf("tor_wrong reason = %q, want BIRD's bad-AS error", reason)
		}
		st := h1.mgr.Status(context.Background())
		if !st.BirdRunning || !st.LastApply.OK {
			t.Errorf("h1 Status() = running %v, last apply %+v; want running and OK", st.BirdRunning, st.LastApply)
		}
		var up bool
		for _, p := range st.Protocols {
			if p.Name == "tor_a" && p.BGPState == "Established" && p.RoutesExported == 2 && p.RoutesImported == 1 && p.UptimeSeconds > 0 {
				up = true
			}
		}
		if !up {
			t.Errorf("h1 Status().Protocols = %+v, want tor_a established, 2 exported, 1 imported", st.Protocols)
		}
		if state, msg, detail := st.Summary(); state != "degraded" || !strings.Contains(detail["tor_wrong"], "Bad peer AS") || detail["tor_a"] != "Established" {
			t.Errorf("h1 Summary() = %s, %q, %v; want degraded with tor_wrong's reason", state, msg, detail)
		} else {
			t.Logf("h1 Summary(): %s: %s %v", state, msg, detail)
		}
		if len(st.BFDSessions) != 1 || st.BFDSessions[0].State != "Up" {
			t.Errorf("h1 Status().BFDSessions = %+v, want one session Up", st.BFDSessions)
		}
	})

	t.Run("BFD detects a dead host", func(t *testing.T) {
		// Freeze h1's BIRD: its TCP session stays open (the kernel keeps
		// acknowledging) and the BGP hold time is 9s, so only BFD
		// (3 x 100ms) can take h1's routes off the ToR this quickly.
		pid := h1.bird.Pid()
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatalf("stop h1's bird (pid %d): %v", pid, err)
		}
		defer syscall.Kill(pid, syscall.SIGCONT)
		d := waitFor(t, "h1's routes gone from the ToR", 10*time.Second, func() bool {
			h := nextHops(t, vip)
			return len(h) == 1 && h[0] == "10.201.2.2" && torRoute(t, "10.201.101.0/24") == ""
		})
		t.Logf("BFD failover (h1's BIRD frozen; min rx 100ms x 3 = 300ms detection): ToR down to one next hop after %v", d)
		if ps, err := torClient.ShowProtocolsAll(context.Background(), "h1"); err == nil {
			t.Logf("ToR h1: state %s, last error %q", ps.BGPState, ps.LastError)
		}
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
