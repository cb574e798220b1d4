package datapath

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// rwfrPinDir is a pin directory named with this file's rwfr- prefix.
func rwfrPinDir(t *testing.T) string {
	dir := filepath.Join("/sys/fs/bpf", fmt.Sprintf("rwfr-%d-%d", os.Getpid(), pinSeq.Add(1)))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// udpSized reports whether a size-byte UDP datagram from namespace a to
// dst:port comes back whole from b's echo (both ways fragmented when size
// exceeds the 1500-byte MTU of the endpoints' veths).
func (tp *topo) udpSized(t *testing.T, dst netip.Addr, port, size int) bool {
	t.Helper()
	conn, done := tp.udpEcho(t, dst, port)
	defer done()
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	buf := make([]byte, size+1)
	// Three tries: the first IPv6 datagram may wait for neighbour discovery.
	for range 3 {
		if _, err := conn.Write(msg); err != nil {
			return false
		}
		conn.SetReadDeadline(time.Now().Add(time.Second))
		n, err := conn.Read(buf)
		if err == nil && bytes.Equal(buf[:n], msg) {
			return true
		}
	}
	return false
}

// fragPair attaches two endpoints of a new topo to a new datapath: A may
// send UDP to B's ports 5000 and 5001, B accepts UDP 5000 from A only.
// Neither accepts anything else: replies pass through CT.
func fragPair(t *testing.T, tag string, opts Options) (*topo, *Datapath) {
	t.Helper()
	tp := newTopoPrefix(t, "rwfr-", tag)
	opts.PinDir = rwfrPinDir(t)
	d := openTest(t, opts)
	const idA, idB, identA, identB = 131, 132, 70131, 70132
	specs := []EndpointSpec{
		{ID: idA, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA, tp.ip6A}, Identity: identA,
			MAC: macOf(t, tp.a, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostA)},
		{ID: idB, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB, tp.ip6B}, Identity: identB,
			MAC: macOf(t, tp.b, "eth0"), NodeMAC: macOf(t, tp.host, tp.hostB)},
	}
	inNS(t, tp.host, func() {
		for _, ep := range specs {
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
	for _, x := range []struct {
		ip netip.Addr
		id uint32
	}{{tp.ipA, identA}, {tp.ip6A, identA}, {tp.ipB, identB}, {tp.ip6B, identB}} {
		if err := d.UpsertIPCache(netip.PrefixFrom(x.ip, x.ip.BitLen()), x.id, netip.Addr{}); err != nil {
			t.Fatal(err)
		}
	}
	// Open first: the pings resolve the neighbours.
	for _, id := range []uint16{idA, idB} {
		if err := d.SetPolicy(id, OpenEntries()); err != nil {
			t.Fatal(err)
		}
	}
	for _, dst := range []netip.Addr{tp.ipB, tp.ip6B} {
		if !tp.pingRetry(t, tp.a, dst, 3) {
			ms, _ := d.Metrics()
			t.Fatalf("ping A->%v with open endpoints failed; metrics %+v", dst, ms)
		}
	}
	if err := d.SetPolicy(idA, []Entry{{Identity: identB, Direction: Egress, Proto: protoUDP, Port: 5000, EndPort: 5001}}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetPolicy(idB, []Entry{{Identity: identA, Direction: Ingress, Proto: protoUDP, Port: 5000}}); err != nil {
		t.Fatal(err)
	}
	flushCT(t, d)
	return tp, d
}

// TestFragmentedUDPTraffic sends UDP datagrams of 4,000 and 9,000 bytes
// between two endpoints whose veths have MTU 1500, so the sender's kernel
// fragments them (and the echo on the way back): allowed ones arrive whole,
// over IPv4 and IPv6, with local delivery through bpf_redirect_peer and
// through the host stack; denied ones (by the receiver's ingress or the
// sender's egress) do not.
func TestFragmentedUDPTraffic(t *testing.T) {
	for _, fast := range []bool{true, false} {
		name := "fast"
		if !fast {
			name = "host-stack"
		}
		t.Run(name, func(t *testing.T) {
			tp, d := fragPair(t, "f"+name[:1], Options{NoRedirectPeer: !fast})
			if fast && !d.Features().LocalRedirect {
				testenv.Missing(t, "a kernel with bpf_redirect_peer and bpf_check_mtu (5.12+)")
			}
			for _, dst := range []netip.Addr{tp.ipB, tp.ip6B} {
				for _, size := range []int{4000, 9000} {
					if !tp.udpSized(t, dst, 5000, size) {
						ms, _ := d.Metrics()
						t.Errorf("UDP %d bytes A->%v:5000 (allowed) not delivered; metrics %+v", size, dst, ms)
					}
					if tp.udpSized(t, dst, 5001, size) {
						t.Errorf("UDP %d bytes A->%v:5001 (denied by B's ingress) delivered", size, dst)
					}
					if tp.udpSized(t, dst, 5002, size) {
						t.Errorf("UDP %d bytes A->%v:5002 (denied by A's egress) delivered", size, dst)
					}
				}
			}
			checkFragDrops(t, d)
		})
	}
}
