package datapath

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// TestPMTUTraffic: endpoint A on host namespace ha and endpoint B on host
// namespace hb, routed through a router namespace whose link towards hb
// has MTU 1280 (the endpoints' veths have 1500). Each host runs its own
// datapath (as two agents would). A's ingress is default-deny, B's allows
// TCP 8080 from A only. A 1 MB transfer each way needs path MTU discovery:
// the router sends A "fragmentation needed" / "packet too big", hb sends B
// the same, and both must pass as related to the tracked connection.
// Linux quotes whole headers, so this passes on c484b0a too; the minimal
// 8-byte quote that broke there is TestICMPErrorMinimalQuote.
func TestPMTUTraffic(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	testenv.RequireCommand(t, "ip")
	id := fmt.Sprintf("%d", os.Getpid()%100000)
	ns := map[string]string{}
	for _, n := range []string{"a", "ha", "r", "hb", "b"} {
		ns[n] = "rwfr-" + n + id
		sh(t, "ip", "netns", "add", ns[n])
		name := ns[n]
		t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
		sh(t, "ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
		sh(t, "ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	}
	// link adds a veth between two namespaces with addresses on subnet n.
	link := func(left, lname, right, rname string, n, mtu int) {
		sh(t, "ip", "-n", ns[left], "link", "add", lname, "mtu", fmt.Sprint(mtu), "type", "veth",
			"peer", "name", rname, "mtu", fmt.Sprint(mtu), "netns", ns[right])
		for _, s := range []struct {
			ns, dev string
			host    int
		}{{left, lname, 1}, {right, rname, 2}} {
			sh(t, "ip", "-n", ns[s.ns], "addr", "add", fmt.Sprintf("10.210.%d.%d/24", n, s.host), "dev", s.dev)
			sh(t, "ip", "-n", ns[s.ns], "addr", "add", fmt.Sprintf("fd21:%d::%d/64", n, s.host), "dev", s.dev, "nodad")
			sh(t, "ip", "-n", ns[s.ns], "link", "set", s.dev, "up")
		}
	}
	hostA, hostB := "rwfr"+id+"a", "rwfr"+id+"b"
	link("ha", hostA, "a", "eth0", 1, 1500)
	link("ha", "uplink", "r", "ra", 2, 1500)
	link("r", "rb", "hb", "uplink", 3, 1280)
	link("hb", hostB, "b", "eth0", 4, 1500)
	route := func(n, dst, via string) {
		for _, fam := range []string{"-4", "-6"} {
			d, v := fmt.Sprintf("10.210.%s", dst), fmt.Sprintf("10.210.%s", via)
			if fam == "-6" {
				d, v = fmt.Sprintf("fd21:%s", strings.ReplaceAll(dst, ".0/24", "::/64")), fmt.Sprintf("fd21:%s", strings.Replace(via, ".", "::", 1))
			}
			sh(t, "ip", fam, "-n", ns[n], "route", "add", d, "via", v)
		}
	}
	route("a", "4.0/24", "1.1")
	route("ha", "4.0/24", "2.2")
	route("r", "1.0/24", "2.1")
	route("r", "4.0/24", "3.2")
	route("hb", "1.0/24", "3.1")
	route("b", "1.0/24", "4.1")
	for _, n := range []string{"ha", "r", "hb"} {
		sh(t, "ip", "netns", "exec", ns[n], "sysctl", "-qw", "net.ipv4.ip_forward=1")
		sh(t, "ip", "netns", "exec", ns[n], "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	}
	ipA, ipB := netip.MustParseAddr("10.210.1.2"), netip.MustParseAddr("10.210.4.2")
	ip6A, ip6B := netip.MustParseAddr("fd21:1::2"), netip.MustParseAddr("fd21:4::2")

	const idA, idB, identA, identB = 141, 142, 70141, 70142
	agents := []struct {
		host, dev string
		spec      EndpointSpec
		policy    []Entry
	}{
		{"ha", hostA, EndpointSpec{ID: idA, IPs: []netip.Addr{ipA, ip6A}, Identity: identA},
			[]Entry{{Identity: identB, Direction: Egress, Proto: protoTCP, Port: 8080}}},
		{"hb", hostB, EndpointSpec{ID: idB, IPs: []netip.Addr{ipB, ip6B}, Identity: identB},
			[]Entry{{Identity: identA, Direction: Ingress, Proto: protoTCP, Port: 8080}}},
	}
	for _, ag := range agents {
		d := openTest(t, Options{PinDir: rwfrPinDir(t)})
		spec := ag.spec
		inNS(t, ns[ag.host], func() {
			ifc, err := net.InterfaceByName(ag.dev)
			if err != nil {
				t.Fatal(err)
			}
			spec.IfIndex = ifc.Index
			if err := d.AttachEndpoint(spec); err != nil {
				t.Fatalf("AttachEndpoint(%+v) = %v", spec, err)
			}
		})
		t.Cleanup(func() { inNS(t, ns[ag.host], func() { d.DetachEndpoint(spec.ID, spec.IfIndex) }) })
		for _, x := range []struct {
			ip netip.Addr
			id uint32
		}{{ipA, identA}, {ip6A, identA}, {ipB, identB}, {ip6B, identB}} {
			if err := d.UpsertIPCache(netip.PrefixFrom(x.ip, x.ip.BitLen()), x.id, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.SetPolicy(spec.ID, ag.policy); err != nil {
			t.Fatal(err)
		}
	}

	const size = 1 << 20
	for _, dst := range []netip.Addr{ipB, ip6B} {
		t.Run(fmt.Sprintf("v%d", map[bool]int{true: 4, false: 6}[dst.Is4()]), func(t *testing.T) {
			if err := pmtuTransfer(t, ns["a"], ns["b"], dst, 8080, size); err != nil {
				t.Errorf("1 MB each way A<->%v:8080 (allowed) through the 1280-byte link: %v", dst, err)
			}
			// The transfer needed the ICMP errors: A learned the path MTU.
			out, _ := exec.Command("ip", "-n", ns["a"], "route", "get", dst.String()).CombinedOutput()
			if !strings.Contains(string(out), "mtu 1280") {
				t.Errorf("A's route to %v has no learned mtu 1280:\n%s", dst, out)
			}
			// And policy is enforced: another port is closed.
			if err := pmtuTransfer(t, ns["a"], ns["b"], dst, 8081, 1000); err == nil {
				t.Errorf("TCP A->%v:8081 (denied by B's ingress) worked", dst)
			}
		})
	}
}

// pmtuTransfer sends size bytes from namespace a to b's dst:port, which
// echoes them, and checks all come back within 30 s.
func pmtuTransfer(t *testing.T, a, b string, dst netip.Addr, port, size int) error {
	t.Helper()
	addr := netip.AddrPortFrom(dst, uint16(port)).String()
	var ln net.Listener
	inNS(t, b, func() {
		var err error
		ln, err = net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("listen in %s: %v", b, err)
		}
	})
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		io.Copy(c, c)
	}()
	var (
		conn net.Conn
		err  error
	)
	inNS(t, a, func() { conn, err = net.DialTimeout("tcp", addr, 2*time.Second) })
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte(i * 13)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(msg)
		conn.(*net.TCPConn).CloseWrite()
		werr <- err
	}()
	got, err := io.ReadAll(conn)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("got %d bytes back, want the %d sent", len(got), size)
	}
	return nil
}
