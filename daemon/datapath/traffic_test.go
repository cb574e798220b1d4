package datapath

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/internal/testenv"
)

// inNS runs fn on a thread that has entered the named network namespace.
// Sockets created there stay in that namespace.
func inNS(t *testing.T, name string, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := os.Open("/run/netns/" + name)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("enter netns %s: %v", name, err)
	}
	defer func() {
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: the runtime discards it.
			t.Errorf("leave netns %s: %v", name, err)
			return
		}
		runtime.UnlockOSThread()
	}()
	fn()
}

func sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// topo is a "host" namespace routing between two endpoint namespaces over
// veth pairs; the programs attach to the host-side veths.
type topo struct {
	host, a, b   string // namespaces
	hostA, hostB string // host-side veths
	ifA, ifB     int
	ipA, ipB     netip.Addr
	ip6A, ip6B   netip.Addr
}

func newTopo(t *testing.T, tag string) *topo {
	t.Helper()
	return newTopoPrefix(t, "rwa", tag)
}

// newTopoPrefix is newTopo with the namespaces and links named prefix...
func newTopoPrefix(t *testing.T, prefix, tag string) *topo {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "ping")
	id := fmt.Sprintf("%s%d", tag, os.Getpid()%100000)
	tp := &topo{
		host: prefix + "_h" + id, a: prefix + "_a" + id, b: prefix + "_b" + id,
		hostA: prefix + id + "a", hostB: prefix + id + "b",
		ipA: netip.MustParseAddr("10.201.1.2"), ipB: netip.MustParseAddr("10.201.2.2"),
		ip6A: netip.MustParseAddr("fd20:1::2"), ip6B: netip.MustParseAddr("fd20:2::2"),
	}
	for _, ns := range []string{tp.host, tp.a, tp.b} {
		sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
	}
	for _, side := range []struct {
		ns, hostIf, subnet, subnet6 string
	}{{tp.a, tp.hostA, "10.201.1", "fd20:1:"}, {tp.b, tp.hostB, "10.201.2", "fd20:2:"}} {
		endpointVeth(t, tp.host, side.ns, side.hostIf, side.subnet, side.subnet6)
	}
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	sh(t, "ip", "netns", "exec", tp.host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	inNS(t, tp.host, func() {
		for _, c := range []struct {
			name string
			idx  *int
		}{{tp.hostA, &tp.ifA}, {tp.hostB, &tp.ifB}} {
			ifc, err := net.InterfaceByName(c.name)
			if err != nil {
				t.Fatal(err)
			}
			*c.idx = ifc.Index
		}
	})
	return tp
}

// endpointVeth puts namespace ep behind host: a veth hostIf (subnet.1/24,
// subnet6:1/64) to ep's eth0 (.2, :2), which routes everything through it.
func endpointVeth(t *testing.T, host, ep, hostIf, subnet, subnet6 string) {
	t.Helper()
	sh(t, "ip", "-n", host, "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", ep)
	sh(t, "ip", "-n", host, "addr", "add", subnet+".1/24", "dev", hostIf)
	sh(t, "ip", "-n", host, "addr", "add", subnet6+":1/64", "dev", hostIf, "nodad")
	sh(t, "ip", "-n", host, "link", "set", hostIf, "up")
	sh(t, "ip", "-n", ep, "addr", "add", subnet+".2/24", "dev", "eth0")
	sh(t, "ip", "-n", ep, "addr", "add", subnet6+":2/64", "dev", "eth0", "nodad")
	sh(t, "ip", "-n", ep, "link", "set", "eth0", "up")
	sh(t, "ip", "-n", ep, "link", "set", "lo", "up")
	sh(t, "ip", "-n", ep, "route", "add", "default", "via", subnet+".1")
	sh(t, "ip", "-n", ep, "-6", "route", "add", "default", "via", subnet6+":1")
}

func (tp *topo) ping(t *testing.T, from string, dst netip.Addr) bool {
	t.Helper()
	return exec.Command("ip", "netns", "exec", from, "ping", "-c1", "-W1", "-q", dst.String()).Run() == nil
}

// pingRetry pings up to n times (the first IPv6 ping may wait for
// neighbour discovery) and reports whether one was answered.
func (tp *topo) pingRetry(t *testing.T, from string, dst netip.Addr, n int) bool {
	t.Helper()
	for range n {
		if tp.ping(t, from, dst) {
			return true
		}
	}
	return false
}

// tcp reports whether a TCP exchange from namespace a to b's port works.
func (tp *topo) tcp(t *testing.T, dst netip.Addr, port int) bool {
	t.Helper()
	var ln net.Listener
	inNS(t, tp.b, func() {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst, uint16(port)).String())
		if err != nil {
			t.Fatalf("listen in %s: %v", tp.b, err)
		}
	})
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 4)
			if _, err := io.ReadFull(c, buf); err == nil {
				c.Write(buf)
			}
			c.Close()
		}
	}()
	var (
		conn net.Conn
		err  error
	)
	inNS(t, tp.a, func() {
		conn, err = net.DialTimeout("tcp", netip.AddrPortFrom(dst, uint16(port)).String(), time.Second)
	})
	if err != nil {
		return false
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		return false
	}
	buf := make([]byte, 4)
	_, err = io.ReadFull(conn, buf)
	return err == nil && string(buf) == "ping"
}

// udp reports whether a UDP request from namespace a gets b's echo.
func (tp *topo) udp(t *testing.T, dst netip.Addr, port int) bool {
	t.Helper()
	conn, done := tp.udpEcho(t, dst, port)
	defer done()
	conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		return false
	}
	buf := make([]byte, 4)
	n, err := conn.Read(buf)
	return err == nil && string(buf[:n]) == "ping"
}

// udpEcho starts a UDP echo server on dst:port in namespace b and returns
// a socket of namespace a connected to it, and a func that closes both.
func (tp *topo) udpEcho(t *testing.T, dst netip.Addr, port int) (net.Conn, func()) {
	t.Helper()
	var pc net.PacketConn
	inNS(t, tp.b, func() {
		var err error
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(dst, uint16(port)).String())
		if err != nil {
			t.Fatalf("listen udp in %s: %v", tp.b, err)
		}
	})
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	var (
		conn net.Conn
		err  error
	)
	inNS(t, tp.a, func() {
		conn, err = net.Dial("udp", netip.AddrPortFrom(dst, uint16(port)).String())
	})
	if err != nil {
		pc.Close()
		t.Fatalf("dial udp: %v", err)
	}
	return conn, func() { conn.Close(); pc.Close() }
}

// TestRealTraffic attaches both programs to real veths in namespaces, in
// tcx and in legacy tc mode, and checks ICMP and TCP that policy allows
// pass (replies through CT) and what it does not allow is dropped and
// reported.
func TestRealTraffic(t *testing.T) {
	for _, mode := range []string{AttachTCX, AttachTC} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t, mode[:2])
			d := openTest(t, Options{Attach: mode})
			if got := d.Features().AttachMode; got != mode {
				t.Fatalf("attach mode %s, want %s", got, mode)
			}
			const idA, idB, identA, identB = 101, 102, 70101, 70102
			inNS(t, tp.host, func() {
				for _, ep := range []EndpointSpec{
					{ID: idA, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA, tp.ip6A}, Identity: identA},
					{ID: idB, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB, tp.ip6B}, Identity: identB},
				} {
					if err := d.AttachEndpoint(ep); err != nil {
						t.Fatalf("AttachEndpoint(%+v) = %v", ep, err)
					}
				}
			})
			t.Cleanup(func() {
				inNS(t, tp.host, func() {
					d.DetachEndpoint(idA, tp.ifA)
					d.DetachEndpoint(idB, tp.ifB)
				})
			})
			for _, c := range []struct {
				ip netip.Addr
				id uint32
			}{{tp.ipA, identA}, {tp.ip6A, identA}, {tp.ipB, identB}, {tp.ip6B, identB}} {
				if err := d.UpsertIPCache(netip.PrefixFrom(c.ip, c.ip.BitLen()), c.id, netip.Addr{}); err != nil {
					t.Fatal(err)
				}
			}

			// New endpoints are closed until their policy is written.
			if tp.ping(t, tp.a, tp.ipB) {
				t.Errorf("ping A->B before any policy (closed endpoints) succeeded")
			}
			for _, id := range []uint16{idA, idB} {
				if err := d.SetPolicy(id, OpenEntries()); err != nil {
					t.Fatal(err)
				}
			}
			for _, dst := range []netip.Addr{tp.ipB, tp.ip6B} {
				// The first IPv6 ping may wait for neighbour discovery.
				if !tp.pingRetry(t, tp.a, dst, 3) {
					ms, _ := d.Metrics()
					t.Fatalf("ping A->%v with open endpoints failed; metrics %+v", dst, ms)
				}
			}

			// A may only send TCP to B; B only accepts TCP 8080 from A.
			// Neither accepts anything else: replies pass through CT.
			if err := d.SetPolicy(idA, []Entry{
				{Identity: identB, Direction: Egress, Proto: protoTCP},
				{Identity: identB, Direction: Egress, Proto: protoUDP, Port: 5000, EndPort: 5999},
			}); err != nil {
				t.Fatal(err)
			}
			if err := d.SetPolicy(idB, []Entry{
				{Identity: identA, Direction: Ingress, Proto: protoTCP, Port: 8080},
				{Identity: identA, Direction: Ingress, Proto: protoUDP, Port: 5353},
			}); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			events, err := d.Events(ctx)
			if err != nil {
				t.Fatal(err)
			}

			if !tp.tcp(t, tp.ipB, 8080) {
				t.Errorf("TCP A->B:8080 (allowed) failed")
			}
			if !tp.tcp(t, tp.ip6B, 8080) {
				t.Errorf("TCP A->[B]:8080 over IPv6 (allowed) failed")
			}
			if tp.tcp(t, tp.ipB, 8081) {
				t.Errorf("TCP A->B:8081 (not allowed) succeeded")
			}
			if tp.ping(t, tp.a, tp.ipB) {
				t.Errorf("ping A->B (not allowed) succeeded")
			}
			if !tp.udp(t, tp.ipB, 5353) {
				t.Errorf("UDP A->B:5353 (allowed) failed")
			}
			if tp.udp(t, tp.ipB, 5354) {
				t.Errorf("UDP A->B:5354 (denied by B's ingress) succeeded")
			}

			// The denied ping shows in the events with its reason.
			deadline := time.After(3 * time.Second)
			var seen []Event
		wait:
			for {
				select {
				case ev := <-events:
					seen = append(seen, ev)
					if ev.Verdict == Dropped && ev.Reason == DropPolicyDenied && ev.Proto == protoICMP {
						break wait
					}
				case <-deadline:
					t.Errorf("no ICMP policy-denied drop event; saw %+v", seen)
					break wait
				}
			}

			// Emergency open, and its revert.
			if err := d.AllowAll(idA, false); err != nil {
				t.Fatal(err)
			}
			if err := d.AllowAll(idB, false); err != nil {
				t.Fatal(err)
			}
			if !tp.ping(t, tp.a, tp.ipB) {
				t.Errorf("ping A->B after allow-all failed")
			}
			for _, id := range []uint16{idA, idB} {
				if err := d.AllowAll(id, true); err != nil {
					t.Fatal(err)
				}
			}
			flushCT(t, d)
			if tp.ping(t, tp.a, tp.ipB) {
				t.Errorf("ping A->B after allow-all revert succeeded")
			}

			// Detach removes the links or filters, the policy map and the
			// endpoint entries.
			filters := func() string {
				out, _ := exec.Command("tc", "-n", tp.host, "filter", "show", "dev", tp.hostA, "ingress").CombinedOutput()
				return string(out)
			}
			if f := filters(); mode == AttachTC && !strings.Contains(f, "rw_from_endpoint") {
				t.Errorf("no rackwire tc filter on %s:\n%s", tp.hostA, f)
			}
			inNS(t, tp.host, func() {
				if err := d.DetachEndpoint(idA, tp.ifA); err != nil {
					t.Errorf("DetachEndpoint(%d) = %v", idA, err)
				}
			})
			if f := filters(); strings.Contains(f, "rw_") {
				t.Errorf("tc filter left on %s after detach:\n%s", tp.hostA, f)
			}
			for _, p := range []string{d.linkPin(idA, Egress), d.linkPin(idA, Ingress), filepath.Join(d.PinDir(), policyMapName(idA))} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("%s still pinned after detach", p)
				}
			}
			if _, err := d.Policy(idA); !errors.Is(err, ErrUnknownEndpoint) {
				t.Errorf("Policy(%d) after detach error = %v, want ErrUnknownEndpoint", idA, err)
			}
			eps, _ := d.Endpoints()
			for _, e := range eps {
				if e.ID == idA {
					t.Errorf("Endpoints() after detach still has %+v", e)
				}
			}
		})
	}
}

func pinnedLinkID(t *testing.T, path string) link.ID {
	t.Helper()
	return pinnedLinkInfo(t, path).ID
}

// pinnedLinkInfo returns the info of the link pinned at path: its id and
// the program it runs.
func pinnedLinkInfo(t *testing.T, path string) *link.Info {
	t.Helper()
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		t.Fatalf("load pinned link %s: %v", path, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// TestRestartKeepsEnforcing closes the datapath (the agent exits): the
// programs keep enforcing from the pins; a new agent re-adopts maps and
// links without re-creating them.
func TestRestartKeepsEnforcing(t *testing.T) {
	for _, mode := range []string{AttachTCX, AttachTC} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t, "r"+mode[:2])
			dir := testPinDir(t)
			d1 := openTest(t, Options{PinDir: dir, Attach: mode})
			const idA, idB, identA, identB = 201, 202, 70201, 70202
			eps := []EndpointSpec{
				{ID: idA, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA}, Identity: identA},
				{ID: idB, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB}, Identity: identB},
			}
			attach := func(d *Datapath) {
				inNS(t, tp.host, func() {
					for _, ep := range eps {
						if err := d.AttachEndpoint(ep); err != nil {
							t.Fatalf("AttachEndpoint(%+v) = %v", ep, err)
						}
					}
				})
			}
			attach(d1)
			if err := d1.UpsertIPCache(netip.PrefixFrom(tp.ipA, 32), identA, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
			if err := d1.SetPolicy(idA, OpenEntries()); err != nil {
				t.Fatal(err)
			}
			if err := d1.SetPolicy(idB, []Entry{{Identity: identA, Direction: Ingress, Proto: protoTCP, Port: 8080}, {Direction: Egress}}); err != nil {
				t.Fatal(err)
			}
			check := func(when string) {
				t.Helper()
				if !tp.tcp(t, tp.ipB, 8080) {
					t.Errorf("%s: allowed TCP failed", when)
				}
				if tp.ping(t, tp.a, tp.ipB) {
					t.Errorf("%s: denied ping passed", when)
				}
			}
			check("agent running")
			ids := mapIDs(t, d1)
			var linkIDs []link.ID
			if mode == AttachTCX {
				for _, ep := range eps {
					linkIDs = append(linkIDs, pinnedLinkID(t, d1.linkPin(ep.ID, Egress)), pinnedLinkID(t, d1.linkPin(ep.ID, Ingress)))
				}
			}
			d1.Close()
			check("agent gone")

			d2 := openTest(t, Options{PinDir: dir, Attach: mode})
			attach(d2)
			t.Cleanup(func() {
				inNS(t, tp.host, func() {
					d2.DetachEndpoint(idA, tp.ifA)
					d2.DetachEndpoint(idB, tp.ifB)
				})
			})
			check("agent restarted")
			for name, id := range mapIDs(t, d2) {
				if ids[name] != id {
					t.Errorf("map %s: id %d after restart, want %d", name, id, ids[name])
				}
			}
			if mode == AttachTCX {
				i := 0
				for _, ep := range eps {
					for _, dir := range []Direction{Egress, Ingress} {
						if got := pinnedLinkID(t, d2.linkPin(ep.ID, dir)); got != linkIDs[i] {
							t.Errorf("endpoint %d %s: link id %d after restart, want %d", ep.ID, dir, got, linkIDs[i])
						}
						i++
					}
				}
			}
		})
	}
}
