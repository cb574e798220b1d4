package bgp

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	capi "github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/birdconf/birdtest"
	"github.com/rackwire/rackwire/internal/consultest"
	"github.com/rackwire/rackwire/internal/testenv"
)

const svcVIP = "10.96.254.10"

// greetIn serves TCP on addr inside namespace ns: each connection gets
// "name peer\n" (peer: the address the server accepted) and is closed.
func greetIn(t *testing.T, ns, addr, name string) {
	t.Helper()
	ln, err := inNetNS(ns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", name, c.RemoteAddr())
			c.Close()
		}
	}()
}

// dialGreeting connects from namespace ns to addr and reads greetIn's line:
// the server's name, the peer it saw and the client's own address.
func dialGreeting(ns, addr string) (name, peer, local string, err error) {
	c, err := inNetNS(ns, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 2*time.Second) })
	if err != nil {
		return "", "", "", err
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != addr {
		return "", "", "", fmt.Errorf("connected to %s, the client's peer is %s", addr, got)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", "", "", fmt.Errorf("read greeting from %s: %w", addr, err)
	}
	if _, err := fmt.Sscanf(line, "%s %s", &name, &peer); err != nil {
		return "", "", "", fmt.Errorf("greeting %q: %w", line, err)
	}
	return name, peer, c.LocalAddr().String(), nil
}

// inNetNS runs fn on a thread moved into namespace ns, then moves the
// thread back and releases it. Sockets fn makes stay in ns. The thread
// must not die there: a process it started with Pdeathsig (consultest's
// Consul) would die with it; only when the way back fails is it left
// locked, to end with its goroutine.
func inNetNS[T any](ns string, fn func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var zero T
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{zero, err}
			return
		}
		defer orig.Close()
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{zero, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{zero, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		v, err := fn()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}

// svcTorConf is the ToR of the service test: as torConf, on its own
// addresses, learning /32 VIPs with ECMP (merge paths).
const svcTorConf = `router id 10.254.200.1;
log stderr all;
protocol device { scan time 1; }
protocol kernel {
	scan time 1;
	merge paths on;
	ipv4 { import none; export where source = RTS_BGP; };
}
protocol static { ipv4; route 0.0.0.0/0 blackhole; }
template bgp host {
	local as 65001;
	connect delay time 1;
	connect retry time 2;
	error wait time 1, 2;
	ipv4 { import all; export where source = RTS_STATIC; };
}
protocol bgp h1 from host { local 10.254.201.1 as 65001; neighbor 10.254.201.2 as 65201; }
protocol bgp h2 from host { local 10.254.202.1 as 65001; neighbor 10.254.202.2 as 65202; }
`

// svcConfig is a host's config with announce_service_vips on and no VIP of
// its own: whatever VIP the ToR learns comes from the service table. The
// socket load balancer is off (service_cgroup = ""): its hooks would sit
// on the machine's root cgroup, where they would translate the test's own
// connections to the VIP before a packet leaves, so the traffic test
// would not reach the hosts' uplinks (north-south) at all.
func (h *host) svcConfig(consulAddr string) string {
	head := h.head(fmt.Sprintf("backend = \"consul\"\naddress = %q\n# The test's Consul speaks plain http on a non-loopback test address.\nallow_insecure = true", consulAddr))
	return strings.Replace(head, "[metrics]\n", "service_cgroup = \"\"\n[metrics]\n", 1) +
		fmt.Sprintf(`vip_ranges = ["10.96.0.0/16"]
import = ["0.0.0.0/0"]
announce_service_vips = true

[[bgp.peers]]
name = "tor"
address = %q
asn = 65001
hold_time = 9
keepalive_time = 3
`, torAddr(h.uplink))
}

// TestServiceVIPAnnouncedWhileLocalBackendActive: two hosts with
// [bgp] announce_service_vips follow a real Consul (reached through the ToR
// from the root namespace), where the service "web" has one instance in
// each host's workload CIDR, with a TTL check. The ToR (real BIRD) learns
// the VIP from both hosts and installs both next hops; failing the check of
// h2's instance (its only local backend) makes h2 withdraw while h1 stays;
// passing it again brings h2 back; deregistering withdraws everywhere.
func TestServiceVIPAnnouncedWhileLocalBackendActive(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	testenv.RequireCommand(t, "nsenter")
	testenv.RequireCommand(t, "bird")
	_, cli := binaries(t)

	for _, ns := range []string{"rwsc-tor", "rwsc-h1", "rwsc-h2"} {
		birdtest.NetNS(t, ns)
	}
	birdtest.Veth(t, "rwsc-tor", "rwsc-t1", "10.254.201.1/24", "rwsc-h1", "rwsc-h1u", "10.254.201.2/24")
	birdtest.Veth(t, "rwsc-tor", "rwsc-t2", "10.254.202.1/24", "rwsc-h2", "rwsc-h2u", "10.254.202.2/24")
	// The root namespace, where Consul listens, behind the ToR.
	const consulIP = "10.254.250.1"
	exec.Command("ip", "link", "del", "rwsc-root").Run() // a leftover of a killed run
	birdtest.Run(t, "ip", "link", "add", "rwsc-root", "type", "veth", "peer", "name", "rwsc-tr0", "netns", "rwsc-tor")
	t.Cleanup(func() { exec.Command("ip", "link", "del", "rwsc-root").Run() })
	birdtest.Run(t, "ip", "addr", "add", consulIP+"/24", "dev", "rwsc-root")
	birdtest.Run(t, "ip", "link", "set", "rwsc-root", "up")
	birdtest.Run(t, "ip", "-n", "rwsc-tor", "addr", "add", "10.254.250.254/24", "dev", "rwsc-tr0")
	birdtest.Run(t, "ip", "-n", "rwsc-tor", "link", "set", "rwsc-tr0", "up")
	birdtest.Run(t, "ip", "netns", "exec", "rwsc-tor", "sysctl", "-qw", "net.ipv4.ip_forward=1")
	birdtest.Run(t, "ip", "route", "add", "10.254.200.0/21", "via", "10.254.250.254", "dev", "rwsc-root")
	birdtest.Run(t, "ip", "-n", "rwsc-h1", "route", "add", "10.254.250.0/24", "via", "10.254.201.1")
	birdtest.Run(t, "ip", "-n", "rwsc-h2", "route", "add", "10.254.250.0/24", "via", "10.254.202.1")
	cs := consultest.StartWith(t, consultest.Options{ClientAddrs: []string{consulIP}})
	cc := cs.Client(t)
	consulAddr := consulIP + ":" + cs.Port()

	torDir := t.TempDir()
	birdtest.Start(t, "rwsc-tor", torDir, svcTorConf)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(torDir, "bird.log"))
			t.Logf("ToR bird log:\n%s", tail(out, 40))
		}
	})
	newHost := func(name, uplink, cidr string, asn int) *host {
		dir := t.TempDir()
		return &host{name: name, ns: name, dir: dir, uplink: uplink, asn: asn, cidr: cidr, cli: cli,
			socket: filepath.Join(dir, "rackwire.sock"), birdConf: filepath.Join(dir, "bird.conf"), birdSock: filepath.Join(dir, "bird.ctl")}
	}
	h1 := newHost("rwsc-h1", "10.254.201.2", "10.254.1.0/24", 65201)
	h2 := newHost("rwsc-h2", "10.254.202.2", "10.254.2.0/24", 65202)
	for _, h := range []*host{h1, h2} {
		h.startBird(t)
		h.runAgent(t, h.svcConfig(consulAddr))
		// Runs before runAgent's own stop (15s bound): an agent on Consul
		// that waits for an election lock (identity GC, ipcache log
		// pruning) stops only when that lock's blocking query returns,
		// up to its 30s LockWaitTime (daemon/store/consul/elector.go).
		t.Cleanup(func() {
			_ = h.agent.Process.Signal(syscall.SIGTERM)
			select {
			case <-h.agentDone:
			case <-time.After(40 * time.Second):
				t.Errorf("%s: rackwired did not stop within 40s of SIGTERM", h.name)
			}
		})
	}
	route := func() string {
		return birdtest.Run(t, "ip", "-n", "rwsc-tor", "route", "show", svcVIP+"/32")
	}
	hops := func() []string {
		var out []string
		f := strings.Fields(route())
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "via" {
				out = append(out, f[i+1])
			}
		}
		return out
	}
	waitFor(t, "both host CIDRs on the ToR (sessions up)", 60*time.Second, func() bool {
		r1 := birdtest.Run(t, "ip", "-n", "rwsc-tor", "route", "show", "10.254.1.0/24")
		r2 := birdtest.Run(t, "ip", "-n", "rwsc-tor", "route", "show", "10.254.2.0/24")
		return strings.Contains(r1, "via 10.254.201.2") && strings.Contains(r2, "via 10.254.202.2")
	})
	if r := route(); strings.TrimSpace(r) != "" {
		t.Fatalf("the ToR has a route to %s before any service: %q", svcVIP, r)
	}

	// web: one instance in each host's CIDR, each with a TTL check.
	for i, addr := range []string{"10.254.1.10", "10.254.2.10"} {
		id := fmt.Sprintf("web-%d", i+1)
		err := cc.Agent().ServiceRegister(&capi.AgentServiceRegistration{ID: id, Name: "web", Address: addr, Port: 8080,
			Meta:  map[string]string{"rackwire_vip": svcVIP, "rackwire_port": "80"},
			Check: &capi.AgentServiceCheck{CheckID: "chk-" + id, TTL: "10m", Status: capi.HealthPassing}})
		if err != nil {
			t.Fatalf("register %s: %v", id, err)
		}
	}
	d := waitFor(t, "the VIP with both hosts as next hops on the ToR", 60*time.Second, func() bool {
		h := hops()
		return len(h) == 2 && contains(h, "10.254.201.2") && contains(h, "10.254.202.2")
	})
	t.Logf("ToR route to the VIP after %v:\n%s", d.Truncate(time.Millisecond), route())

	t.Run("clients behind the ToR reach the VIP on both hosts", func(t *testing.T) {
		// The backends are real endpoints at the registered addresses,
		// each greeting with its host and the peer it accepted. The ToR
		// spreads connections over both hosts by L4 ECMP; each host
		// balances them to its local backend (north-south).
		birdtest.Run(t, "ip", "netns", "exec", "rwsc-tor", "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
		for _, w := range []struct {
			h        *host
			ns, addr string
		}{{h1, "rwsc-w1", "10.254.1.10"}, {h2, "rwsc-w2", "10.254.2.10"}} {
			birdtest.NetNS(t, w.ns)
			w.h.mustRW(t, "endpoint", "add", "--name", "web", "--netns", "/run/netns/"+w.ns, "--labels", "app=web", "--ip", w.addr)
			greetIn(t, w.ns, w.addr+":8080", w.h.name)
		}
		per := map[string]int{}
		var last error
		tries := 0
		defer func() {
			if t.Failed() {
				t.Logf("of %d connections to %s:80, answered per host: %v; last error: %v", tries, svcVIP, per, last)
			}
		}()
		waitFor(t, "connections to the VIP answered by both hosts", 60*time.Second, func() bool {
			for range 20 {
				tries++
				host, peer, local, err := dialGreeting("rwsc-tor", svcVIP+":80")
				if err != nil {
					last = err
					continue
				}
				if peer != local {
					t.Fatalf("a backend on %s saw the peer %s, want the client's own %s", host, peer, local)
				}
				per[host]++
			}
			return per[h1.name] > 0 && per[h2.name] > 0
		})
		t.Logf("of %d connections from the ToR to %s:80 while the hosts came up, answered per host: %v (last error %v)", tries, svcVIP, per, last)
		// Settled: every connection is answered.
		steady := map[string]int{}
		for n := range 40 {
			host, peer, local, err := dialGreeting("rwsc-tor", svcVIP+":80")
			if err != nil {
				t.Fatalf("settled connection %d to %s:80: %v (answered so far %v)", n, svcVIP, err, steady)
			}
			if peer != local {
				t.Fatalf("a backend on %s saw the peer %s, want the client's own %s", host, peer, local)
			}
			steady[host]++
		}
		if steady[h1.name] == 0 || steady[h2.name] == 0 {
			t.Errorf("40 settled connections answered per host %v, want both", steady)
		}
		t.Logf("40 of 40 settled connections answered, per host %v", steady)
	})

	// h2's only local backend fails its check: h2 withdraws, h1 stays.
	if err := cc.Agent().FailTTL("chk-web-2", "rwsc test"); err != nil {
		t.Fatal(err)
	}
	d = waitFor(t, "h2's announcement withdrawn, h1's kept", 30*time.Second, func() bool {
		r := route()
		return strings.Contains(r, "via 10.254.201.2") && !strings.Contains(r, "10.254.202.2")
	})
	t.Logf("withdrawn from the ToR %v after the check of h2's last local backend failed:\n%s", d.Truncate(time.Millisecond), route())
	fmt.Printf("bgp: service VIP withdrawn from the ToR %v after the host's last local backend's Consul check failed\n", d.Truncate(time.Millisecond))
	if out, err := os.ReadFile(h2.birdConf); err != nil || strings.Contains(string(out), svcVIP) {
		t.Errorf("h2's rendered bird.conf still names %s (err %v)", svcVIP, err)
	}

	// Passing again brings h2 back; deregistering withdraws everywhere.
	if err := cc.Agent().PassTTL("chk-web-2", ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "h2 announces again", 30*time.Second, func() bool { return len(hops()) == 2 })
	for _, id := range []string{"web-1", "web-2"} {
		if err := cc.Agent().ServiceDeregister(id); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the VIP gone from the ToR", 30*time.Second, func() bool { return strings.TrimSpace(route()) == "" })
}
