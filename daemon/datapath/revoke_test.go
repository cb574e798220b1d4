package datapath

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// flowProbe keeps one flow from namespace a to b busy: every 50 ms it sends
// 8 bytes and waits for the echo, and records when an echo last came back.
type flowProbe struct {
	name   string
	lastOK atomic.Int64 // unix nanos
	stop   chan struct{}
	done   sync.WaitGroup
}

func (p *flowProbe) last() time.Time { return time.Unix(0, p.lastOK.Load()) }

func (p *flowProbe) close() {
	close(p.stop)
	p.done.Wait()
}

// echoServers serves TCP echo on the ports and UDP echo on udpPort in
// namespace ns at ip, until the test ends.
func echoServers(t *testing.T, ns string, ip netip.Addr, tcpPorts []int, udpPort int) {
	t.Helper()
	inNS(t, ns, func() {
		for _, port := range tcpPorts {
			ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, uint16(port)).String())
			if err != nil {
				t.Fatalf("listen in %s: %v", ns, err)
			}
			t.Cleanup(func() { ln.Close() })
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go func() {
						defer c.Close()
						io.Copy(c, c)
					}()
				}
			}()
		}
		pc, err := net.ListenPacket("udp", netip.AddrPortFrom(ip, uint16(udpPort)).String())
		if err != nil {
			t.Fatalf("listen udp in %s: %v", ns, err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 64)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
	})
}

// startProbe dials network ("tcp" or "udp") from namespace ns to dst and
// keeps the flow busy. It fails the test if the first echo does not come.
func startProbe(t *testing.T, ns, network string, dst netip.AddrPort) *flowProbe {
	t.Helper()
	var (
		c   net.Conn
		err error
	)
	inNS(t, ns, func() { c, err = net.DialTimeout(network, dst.String(), time.Second) })
	if err != nil {
		t.Fatalf("dial %s %v: %v", network, dst, err)
	}
	p := &flowProbe{name: fmt.Sprintf("%s %v", network, dst), stop: make(chan struct{})}
	first := make(chan bool, 1)
	p.done.Add(1)
	go func() {
		defer p.done.Done()
		defer c.Close()
		buf := make([]byte, 8)
		for i := 0; i < 2000; i++ { // bounded: 2000 x 50 ms
			select {
			case <-p.stop:
				return
			default:
			}
			msg := []byte(fmt.Sprintf("%08d", i))
			c.SetDeadline(time.Now().Add(200 * time.Millisecond))
			ok := false
			if _, err := c.Write(msg); err == nil {
				if network == "udp" {
					n, err := c.Read(buf)
					ok = err == nil && n == 8
				} else {
					// A TCP echo may bring older, retransmitted bytes.
					_, err := io.ReadFull(c, buf)
					ok = err == nil
				}
			}
			if ok {
				p.lastOK.Store(time.Now().UnixNano())
			}
			if i == 0 {
				first <- ok
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	if !<-first {
		p.close()
		t.Fatalf("%s: no echo while allowed", p.name)
	}
	return p
}

// TestRevocationCutsEstablishedFlows: an established TCP connection and a
// UDP flow stop within a second of the allowing rule's removal, the revert
// of an emergency allow-all, the end of audit mode, and a change of the
// peer's identity (one by one, or in a bulk write and its Settle); a flow
// that stays allowed keeps flowing (its replies
// pass through CT) throughout. On the first release (c484b0a) established
// flows passed every change.
func TestRevocationCutsEstablishedFlows(t *testing.T) {
	for _, mode := range []struct {
		name       string
		noRedirect bool
	}{{"redirect", false}, {"hoststack", true}} {
		t.Run(mode.name, func(t *testing.T) {
			tp := newTopoPrefix(t, "rwct", "v"+mode.name[:1])
			d := openTest(t, Options{NoRedirectPeer: mode.noRedirect})
			const idA, idB, identA, identB, identOther = 301, 302, 70301, 70302, 70399
			inNS(t, tp.host, func() {
				for _, ep := range []EndpointSpec{
					{ID: idA, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA}, Identity: identA,
						MAC: macOf(t, tp.a, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostA)},
					{ID: idB, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB}, Identity: identB,
						MAC: macOf(t, tp.b, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostB)},
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
			setIdentity := func(ip netip.Addr, id uint32) {
				t.Helper()
				if err := d.UpsertIPCache(netip.PrefixFrom(ip, 32), id, netip.Addr{}); err != nil {
					t.Fatal(err)
				}
			}
			setIdentity(tp.ipA, identA)
			setIdentity(tp.ipB, identB)
			// A sends anything to B and accepts nothing; B accepts port
			// 9090 from anyone (the control flow), and, per case, TCP
			// 8080 and UDP 5353 from A; B sends nothing. Every reply
			// passes on CT alone.
			if err := d.SetPolicy(idA, []Entry{{Identity: identB, Direction: Egress}}); err != nil {
				t.Fatal(err)
			}
			control := Entry{Direction: Ingress, Proto: protoTCP, Port: 9090}
			allowed := []Entry{control,
				{Identity: identA, Direction: Ingress, Proto: protoTCP, Port: 8080},
				{Identity: identA, Direction: Ingress, Proto: protoUDP, Port: 5353}}
			setB := func(es []Entry) {
				t.Helper()
				if err := d.SetPolicy(idB, es); err != nil {
					t.Fatal(err)
				}
			}
			echoServers(t, tp.b, tp.ipB, []int{8080, 9090}, 5353)
			setB([]Entry{control})
			ctrl := startProbe(t, tp.a, "tcp", netip.AddrPortFrom(tp.ipB, 9090))
			defer ctrl.close()

			for _, c := range []struct {
				name   string
				before func() // allows the flows
				revoke func() error
			}{
				{"rule removed", func() { setB(allowed) }, func() error { return d.SetPolicy(idB, []Entry{control}) }},
				{"allow-all reverted", func() {
					setB([]Entry{control})
					if err := d.AllowAll(idB, false); err != nil {
						t.Fatal(err)
					}
				}, func() error { return d.AllowAll(idB, true) }},
				{"audit mode off", func() {
					setB([]Entry{control})
					if err := d.SetAudit(idB, true); err != nil {
						t.Fatal(err)
					}
				}, func() error { return d.SetAudit(idB, false) }},
				{"peer identity changed", func() { setB(allowed); setIdentity(tp.ipA, identA) },
					func() error {
						return d.UpsertIPCache(netip.PrefixFrom(tp.ipA, 32), identOther, netip.Addr{})
					}},
				// As the ipcache's bulk operations write: quietly, then
				// one Settle for all of their entries.
				{"peer identity changed in a bulk write", func() { setB(allowed); setIdentity(tp.ipA, identA) },
					func() error {
						if err := d.UpsertIPCacheQuiet(netip.PrefixFrom(tp.ipA, 32), identOther, netip.Addr{}); err != nil {
							return err
						}
						return d.Settle()
					}},
			} {
				t.Run(c.name, func(t *testing.T) {
					c.before()
					probes := []*flowProbe{
						startProbe(t, tp.a, "tcp", netip.AddrPortFrom(tp.ipB, 8080)),
						startProbe(t, tp.a, "udp", netip.AddrPortFrom(tp.ipB, 5353)),
					}
					defer func() {
						for _, p := range probes {
							p.close()
						}
					}()
					time.Sleep(300 * time.Millisecond)
					at := time.Now()
					if err := c.revoke(); err != nil {
						t.Fatal(err)
					}
					time.Sleep(2500 * time.Millisecond)
					for _, p := range probes {
						if late := p.last().Sub(at); late > time.Second {
							t.Errorf("%s: echoes kept coming %v after the change (want none after 1s)", p.name, late.Round(time.Millisecond))
						}
					}
					if since := time.Since(ctrl.last()); since > time.Second {
						t.Errorf("control flow (still allowed) silent for %v", since.Round(time.Millisecond))
					}
				})
			}
		})
	}
}

// TestHalfCloseLateAnswer: the client half-closes (shutdown of its write
// side) and the server answers 15 s later, longer than the 10 s close
// timeout; the client's ingress is default-deny, so only connection
// tracking lets the answer in. On the first release (c484b0a) one FIN put
// the entry on the close timeout and the answer was dropped.
func TestHalfCloseLateAnswer(t *testing.T) {
	tp := newTopoPrefix(t, "rwct", "h")
	d := openTest(t, Options{})
	const idA, idB, identA, identB = 311, 312, 70311, 70312
	inNS(t, tp.host, func() {
		for _, ep := range []EndpointSpec{
			{ID: idA, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA}, Identity: identA,
				MAC: macOf(t, tp.a, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostA)},
			{ID: idB, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB}, Identity: identB,
				MAC: macOf(t, tp.b, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostB)},
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
	}{{tp.ipA, identA}, {tp.ipB, identB}} {
		if err := d.UpsertIPCache(netip.PrefixFrom(c.ip, 32), c.id, netip.Addr{}); err != nil {
			t.Fatal(err)
		}
	}
	// A: egress to B only, ingress default-deny. B: ingress TCP 8080 from A only.
	if err := d.SetPolicy(idA, []Entry{{Identity: identB, Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetPolicy(idB, []Entry{{Identity: identA, Direction: Ingress, Proto: protoTCP, Port: 8080}}); err != nil {
		t.Fatal(err)
	}
	// No keepalives: a probe would re-create the entry as a new flow and
	// hide what this test is about.
	var ln net.Listener
	inNS(t, tp.b, func() {
		var err error
		lc := net.ListenConfig{KeepAlive: -1}
		ln, err = lc.Listen(context.Background(), "tcp", netip.AddrPortFrom(tp.ipB, 8080).String())
		if err != nil {
			t.Fatal(err)
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
		io.Copy(io.Discard, c) // until the client's FIN
		time.Sleep(15 * time.Second)
		c.Write([]byte("late answer"))
	}()
	var (
		c   net.Conn
		err error
	)
	inNS(t, tp.a, func() {
		dl := net.Dialer{Timeout: time.Second, KeepAlive: -1}
		c, err = dl.Dial("tcp", netip.AddrPortFrom(tp.ipB, 8080).String())
	})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("question")); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(25 * time.Second))
	b, err := io.ReadAll(c)
	if string(b) != "late answer" {
		t.Errorf("answer 15 s after the client's FIN: %q, %v; want \"late answer\"", b, err)
	}
}
