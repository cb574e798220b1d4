package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/internal/testenv"
)

const (
	tcpFIN = 0x01
	tcpRST = 0x04
)

func ctState(t *testing.T, d *Datapath, p pkt, dir Direction) (CTEntry, bool) {
	t.Helper()
	es, err := d.CT()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Src == netip.AddrPortFrom(p.src, p.sport) && e.Dst == netip.AddrPortFrom(p.dst, p.dport) &&
			e.Direction == dir && e.Proto == p.proto {
			return e, true
		}
	}
	return CTEntry{}, false
}

// egressTCP sets up the test endpoint with one rule, egress TCP to port
// of the peer, and returns the endpoint's SYN to it.
func egressTCP(t *testing.T, d *Datapath, port uint16) pkt {
	t.Helper()
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Egress, Proto: protoTCP, Port: port}}); err != nil {
		t.Fatal(err)
	}
	return out(peerV4, protoTCP, port)
}

// TestCTTCPLifetimes: an entry that saw only a SYN lives the SYN lifetime;
// one FIN (half-close) keeps the established lifetime; FIN both ways or an
// RST starts the close lifetime; a SYN on a closing entry re-opens it
// (policy decides again, flags reset).
func TestCTTCPLifetimes(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{CTTimeoutTCPSYN: 300 * time.Millisecond, CTTimeoutClose: 300 * time.Millisecond})
	syn := egressTCP(t, d, 80)

	// SYN only: expires after the SYN lifetime; the SYN-ACK then is no reply.
	if got := run(t, d.from, syn); got != passRet {
		t.Fatalf("SYN = %#x, want pass", got)
	}
	if e, ok := ctState(t, d, syn, Egress); !ok || e.State != CTStateSYN || e.ExpiresIn > 300*time.Millisecond {
		t.Errorf("after a SYN: %+v (found %v), want state %s expiring within 300ms", e, ok, CTStateSYN)
	}
	time.Sleep(450 * time.Millisecond)
	if got := run(t, d.to, syn.reply()); got != dropRet {
		t.Errorf("SYN-ACK after the SYN lifetime = %#x, want drop (entry expired)", got)
	}

	// Established; the client half-closes: one FIN keeps the established lifetime.
	if got := run(t, d.from, syn); got != passRet {
		t.Fatalf("SYN = %#x, want pass", got)
	}
	ack := syn
	ack.tcpFlags = tcpACK
	if got := run(t, d.to, syn.reply()); got != passRet {
		t.Fatalf("SYN-ACK = %#x, want pass", got)
	}
	if got := run(t, d.from, ack); got != passRet {
		t.Fatalf("ACK = %#x, want pass", got)
	}
	fin := ack
	fin.tcpFlags = tcpFIN | tcpACK
	if got := run(t, d.from, fin); got != passRet {
		t.Fatalf("FIN = %#x, want pass", got)
	}
	e, _ := ctState(t, d, syn, Egress)
	if e.State != CTStateEstablished || !e.FINOrig || e.FINReply {
		t.Errorf("after the client's FIN: %+v, want established with fin_orig only", e)
	}
	time.Sleep(450 * time.Millisecond) // longer than the close lifetime
	data := syn.reply()
	data.tcpFlags = tcpACK
	if got := run(t, d.to, data); got != passRet {
		t.Errorf("server data after the client's FIN (half-close) = %#x, want pass", got)
	}
	// FIN from the server too: closing, gone after the close lifetime.
	sfin := data
	sfin.tcpFlags = tcpFIN | tcpACK
	if got := run(t, d.to, sfin); got != passRet {
		t.Fatalf("server FIN = %#x, want pass", got)
	}
	if e, _ := ctState(t, d, syn, Egress); e.State != CTStateClosing || !e.FINOrig || !e.FINReply {
		t.Errorf("after FIN both ways: %+v, want closing", e)
	}
	// A SYN (no ACK) on the closing entry re-opens it: a new connection.
	if got := run(t, d.from, syn); got != passRet {
		t.Fatalf("SYN on a closing entry = %#x, want pass", got)
	}
	if e, _ := ctState(t, d, syn, Egress); e.State != CTStateSYN || e.FINOrig || e.FINReply || e.Packets != 1 {
		t.Errorf("after a SYN on the closing entry: %+v, want a fresh syn-only entry", e)
	}
	// An RST closes.
	if got := run(t, d.to, syn.reply()); got != passRet {
		t.Fatal("SYN-ACK of the re-opened connection dropped")
	}
	if got := run(t, d.from, ack); got != passRet {
		t.Fatal("ACK dropped")
	}
	rst := ack
	rst.tcpFlags = tcpRST
	if got := run(t, d.from, rst); got != passRet {
		t.Fatalf("RST = %#x, want pass", got)
	}
	if e, _ := ctState(t, d, syn, Egress); e.State != CTStateClosing || !e.RST {
		t.Errorf("after an RST: %+v, want closing with rst", e)
	}
	time.Sleep(450 * time.Millisecond)
	if got := run(t, d.to, data); got != dropRet {
		t.Errorf("server data after RST and the close lifetime = %#x, want drop", got)
	}

	// A SYN re-open is decided by policy again: with the rule gone it is dropped.
	if got := run(t, d.from, syn); got != passRet {
		t.Fatal("SYN dropped")
	}
	run(t, d.to, syn.reply())
	run(t, d.from, ack)
	run(t, d.from, rst)
	if err := d.SetPolicy(epID, nil); err != nil {
		t.Fatal(err)
	}
	if got := run(t, d.from, syn); got != dropRet {
		t.Errorf("SYN re-opening a closed entry after the rule's removal = %#x, want drop", got)
	}
}

// TestCTTimeAheadIsNotIdle: connection tracking reads the coarse clock
// where the kernel has it, which trails the fine one (an entry written by
// an older build, or on another CPU) by up to a tick. An entry whose last
// packet lies ahead of the program's now has been idle for no time; read
// as an unsigned difference it would be idle for centuries, expire, and
// the flow's next reply would meet policy as a new flow and be dropped.
func TestCTTimeAheadIsNotIdle(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	if !d.features.coarseClock {
		testenv.Missing(t, "bpf_ktime_get_coarse_ns (kernel 5.11)")
	}
	syn := egressTCP(t, d, 80)
	if got := run(t, d.from, syn); got != passRet {
		t.Fatalf("SYN = %#x, want pass", got)
	}
	m := d.maps["rw_ct4_tcp"]
	var (
		k     ct4Key
		v     ctEntry
		ahead int
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		v.LastSeenNS = monoNow() + uint64(2*time.Second)
		if err := m.Update(&k, &v, ebpf.UpdateExist); err != nil {
			t.Fatal(err)
		}
		ahead++
	}
	if err := it.Err(); err != nil || ahead != 1 {
		t.Fatalf("CT entries moved ahead: %d (%v), want the SYN's one", ahead, err)
	}
	if got := run(t, d.to, syn.reply()); got != passRet {
		t.Errorf("SYN-ACK to an entry last seen ahead of now = %#x, want pass (a reply)", got)
	}
}

// TestCTLookupOrderKeepsVerdicts: whatever the ports, a flow's replies
// pass as replies and its own packets are established on its entry, so a
// revoked rule cuts them: here also a flow whose initiator has the lower
// port, the case a lookup order guessed from the ports (tried: reversed
// key first when the sender's port is the lower; docs/datapath.md) gets
// wrong both ways.
func TestCTLookupOrderKeepsVerdicts(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	first := egressTCP(t, d, 8080)
	for _, sport := range []uint16{80, 40001} {
		syn := first
		syn.sport = sport
		ack := syn
		ack.tcpFlags = tcpACK
		reply := syn.reply()
		reply.tcpFlags = tcpSYN | tcpACK
		if got := run(t, d.from, syn); got != passRet {
			t.Fatalf("port %d: SYN = %#x, want pass", sport, got)
		}
		if got := run(t, d.to, reply); got != passRet {
			t.Errorf("port %d: SYN-ACK = %#x, want pass (a reply; no ingress rule)", sport, got)
		}
		if got := run(t, d.from, ack); got != passRet {
			t.Errorf("port %d: ACK = %#x, want pass (established)", sport, got)
		}
		if e, ok := ctState(t, d, syn, Egress); !ok || e.State != CTStateEstablished || e.Packets != 3 {
			t.Errorf("port %d: entry %+v (found %v), want established with 3 packets", sport, e, ok)
		}
	}
	if err := d.SetPolicy(epID, nil); err != nil {
		t.Fatal(err)
	}
	for _, sport := range []uint16{80, 40001} {
		ack := out(peerV4, protoTCP, 8080)
		ack.sport, ack.tcpFlags = sport, tcpACK
		if got := run(t, d.from, ack); got != dropRet {
			t.Errorf("port %d: ACK after the rule's removal = %#x, want drop (established flows are checked again)", sport, got)
		}
	}
}

// TestCTUDPChurnKeepsTCP: with TCP and other protocols in separate maps, a
// UDP flood larger than the non-TCP map never evicts TCP entries.
func TestCTUDPChurnKeepsTCP(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{CTMaxEntries: 1024, CTOtherMaxEntries: 1024})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Egress, Proto: protoTCP}, {Direction: Egress, Proto: protoUDP}}); err != nil {
		t.Fatal(err)
	}
	var tcp []pkt
	for i := range 200 {
		p := out(peerV4, protoTCP, 80)
		p.sport = uint16(20000 + i)
		if got := run(t, d.from, p); got != passRet {
			t.Fatalf("TCP SYN %d = %#x", i, got)
		}
		tcp = append(tcp, p)
	}
	for i := range 20000 { // the flood: 20x the non-TCP map
		p := out(peerV4, protoUDP, uint16(1+i%60000))
		p.sport = uint16(1024 + i/60000)
		if got := run(t, d.from, p); got != passRet {
			t.Fatalf("UDP %d = %#x", i, got)
		}
	}
	lost := 0
	for _, p := range tcp {
		if got := run(t, d.to, p.reply()); got != passRet {
			lost++
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d TCP connections lost their CT entry to a UDP flood", lost, len(tcp))
	}
}

// TestCTFlushEndpoint: FlushCT deletes one endpoint's entries, or all.
func TestCTFlushEndpoint(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, OpenEntries()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []pkt{out(peerV4, protoTCP, 80), out(peerV6, protoUDP, 53), out(peerV4, protoICMP, 8)} {
		if got := run(t, d.from, p); got != passRet {
			t.Fatalf("%+v = %#x", p, got)
		}
	}
	if n, err := d.FlushCT(epID + 1); err != nil || n != 0 {
		t.Errorf("FlushCT(other endpoint) = %d, %v; want 0", n, err)
	}
	if n, err := d.FlushCT(epID); err != nil || n != 3 {
		t.Errorf("FlushCT(%d) = %d, %v; want 3", epID, n, err)
	}
	if es, _ := d.CT(); len(es) != 0 {
		t.Errorf("CT() after flush = %+v", es)
	}
}

// TestLayoutNewerRefused: a pin directory whose rw_layout names a newer
// version than this build knows is refused, naming both versions.
func TestLayoutNewerRefused(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	dir := testPinDir(t)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(layoutSpec())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), uint32(layoutVersion+1)); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(dir, layoutMap)); err != nil {
		t.Fatal(err)
	}
	_, err = Open(Options{PinDir: dir}, quietLog())
	if !errors.Is(err, ErrLayoutTooNew) {
		t.Fatalf("Open over layout %d = %v, want ErrLayoutTooNew", layoutVersion+1, err)
	}
	want := fmt.Sprintf("map layout version %d, this rackwired knows only up to version %d", layoutVersion+1, layoutVersion)
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	if _, err := os.Stat(filepath.Join(dir, "rw_ct4_tcp")); err == nil {
		t.Errorf("a refused Open created maps")
	}
	// A fresh directory gets the current version.
	d := openTest(t, Options{})
	if v, err := ReadLayout(d.PinDir()); err != nil || v != layoutVersion {
		t.Errorf("ReadLayout(fresh) = %d, %v; want %d", v, err, layoutVersion)
	}
}
