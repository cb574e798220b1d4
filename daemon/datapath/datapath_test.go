package datapath

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/internal/testenv"
)

var pinSeq atomic.Uint32

// testPinDir returns a pin directory with the rwa prefix, removed at cleanup.
func testPinDir(t testing.TB) string {
	t.Helper()
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	if len(name) > 40 {
		name = name[:40]
	}
	dir := filepath.Join("/sys/fs/bpf", fmt.Sprintf("rwa_%s_%d_%d", name, os.Getpid(), pinSeq.Add(1)))
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// openTest opens a datapath with small maps in its own pin directory.
func openTest(t testing.TB, opts Options) *Datapath {
	t.Helper()
	testenv.RequireBPFFS(t)
	if opts.PinDir == "" {
		opts.PinDir = testPinDir(t)
	}
	if opts.CTMaxEntries == 0 {
		opts.CTMaxEntries = 4096
	}
	if opts.IPCacheMaxEntries == 0 {
		opts.IPCacheMaxEntries = 4096
	}
	if opts.PolicyMaxEntries == 0 {
		opts.PolicyMaxEntries = 1024
	}
	d, err := Open(opts, quietLog())
	if err != nil {
		t.Fatalf("Open(%+v) = %v", opts, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

const (
	passRet = 0xffffffff // TC_ACT_UNSPEC: rackwire does not veto
	dropRet = 2          // TC_ACT_SHOT
)

func run(t testing.TB, prog *ebpf.Program, p pkt) uint32 {
	t.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: p.bytes()})
	if err != nil {
		t.Fatalf("run program: %v", err)
	}
	return ret
}

func flushCT(t testing.TB, d *Datapath) {
	t.Helper()
	if _, err := d.FlushCT(0); err != nil {
		t.Fatal(err)
	}
}

var (
	epV4     = netip.MustParseAddr("10.77.0.1")
	epV6     = netip.MustParseAddr("fd77::1")
	peerV4   = netip.MustParseAddr("10.77.0.2") // identity 2000
	peerV6   = netip.MustParseAddr("fd77::2")   // identity 2000
	netV4    = netip.MustParseAddr("10.78.1.1") // in 10.78.0.0/16, identity 3000
	netV6    = netip.MustParseAddr("fd78::5")   // in fd78::/32, identity 3000
	unknown4 = netip.MustParseAddr("192.0.2.9") // world
)

const (
	epID       = 794
	epIdentity = 1000
	peerID     = 2000
	netID      = 3000
)

// setupEndpoint registers one endpoint (ifindex 1: PROG_TEST_RUN runs on lo)
// and the peers' ipcache entries.
func setupEndpoint(t testing.TB, d *Datapath, audit bool) {
	t.Helper()
	d.mu.Lock()
	err := d.addEndpointLocked(EndpointSpec{ID: epID, IfIndex: 1, IPs: []netip.Addr{epV4, epV6}, Identity: epIdentity, Audit: audit})
	d.mu.Unlock()
	if err != nil {
		t.Fatalf("add endpoint: %v", err)
	}
	for _, c := range []struct {
		p  string
		id uint32
	}{
		{"10.77.0.1/32", epIdentity}, {"fd77::1/128", epIdentity},
		{"10.77.0.2/32", peerID}, {"fd77::2/128", peerID},
		{"10.78.0.0/16", netID}, {"fd78::/32", netID},
	} {
		if err := d.UpsertIPCache(netip.MustParsePrefix(c.p), c.id, netip.Addr{}); err != nil {
			t.Fatalf("UpsertIPCache(%s) = %v", c.p, err)
		}
	}
}

// in and out build packets delivered to and sent by the endpoint.
func in(src netip.Addr, proto uint8, dport uint16) pkt {
	dst := epV4
	if src.Is6() {
		dst = epV6
	}
	return pkt{src: src, dst: dst, proto: proto, sport: 40000, dport: dport, icmpID: 7, tcpFlags: tcpSYN, payloadLen: 10}
}

func out(dst netip.Addr, proto uint8, dport uint16) pkt {
	src := epV4
	if dst.Is6() {
		src = epV6
	}
	return pkt{src: src, dst: dst, proto: proto, sport: 40001, dport: dport, icmpID: 9, tcpFlags: tcpSYN, payloadLen: 10}
}

func TestProgramVerdicts(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)

	allowIn := func(id uint32, proto uint8, port, end uint16) Entry {
		return Entry{Identity: id, Direction: Ingress, Proto: proto, Port: port, EndPort: end}
	}
	denyIn := func(id uint32, proto uint8, port, end uint16) Entry {
		e := allowIn(id, proto, port, end)
		e.Deny = true
		return e
	}
	type probe struct {
		p    pkt
		out  bool // run the from-endpoint program
		pass bool
	}
	tests := []struct {
		name   string
		policy []Entry
		probes []probe
	}{
		{"exact allow tcp v4", []Entry{allowIn(peerID, protoTCP, 80, 0)}, []probe{
			{p: in(peerV4, protoTCP, 80), pass: true},
			{p: in(peerV4, protoTCP, 81)},
			{p: in(peerV4, protoUDP, 80)},
			{p: in(netV4, protoTCP, 80)},
		}},
		{"exact allow udp v6", []Entry{allowIn(peerID, protoUDP, 53, 0)}, []probe{
			{p: in(peerV6, protoUDP, 53), pass: true},
			{p: in(peerV6, protoUDP, 54)},
			{p: in(peerV6, protoTCP, 53)},
		}},
		{"empty policy drops", nil, []probe{
			{p: in(peerV4, protoTCP, 80)},
			{p: in(peerV6, protoICMPv6, 128)},
		}},
		{"wildcard port", []Entry{allowIn(peerID, protoTCP, 0, 0)}, []probe{
			{p: in(peerV4, protoTCP, 1), pass: true},
			{p: in(peerV4, protoTCP, 65535), pass: true},
			{p: in(peerV6, protoTCP, 8080), pass: true},
			{p: in(peerV4, protoUDP, 8080)},
		}},
		{"wildcard identity", []Entry{allowIn(0, protoUDP, 53, 0)}, []probe{
			{p: in(netV4, protoUDP, 53), pass: true},
			{p: in(unknown4, protoUDP, 53), pass: true},
			{p: in(netV6, protoUDP, 53), pass: true},
			{p: in(netV4, protoUDP, 54)},
		}},
		{"identity any proto", []Entry{{Identity: netID, Direction: Ingress}}, []probe{
			{p: in(netV4, protoSCTP, 9), pass: true},
			{p: in(netV6, protoTCP, 22), pass: true},
			{p: in(peerV4, protoTCP, 22)},
		}},
		{"deny beats allow", []Entry{allowIn(peerID, protoTCP, 80, 0), denyIn(0, protoTCP, 0, 0), allowIn(peerID, protoUDP, 0, 0)}, []probe{
			{p: in(peerV4, protoTCP, 80)},
			{p: in(peerV6, protoTCP, 80)},
			{p: in(peerV4, protoUDP, 80), pass: true},
		}},
		{"deny range beats wildcard allow", []Entry{{Direction: Ingress}, denyIn(peerID, protoTCP, 8000, 8999)}, []probe{
			{p: in(peerV4, protoTCP, 7999), pass: true},
			{p: in(peerV4, protoTCP, 8000)},
			{p: in(peerV4, protoTCP, 8500)},
			{p: in(peerV4, protoTCP, 8999)},
			{p: in(peerV4, protoTCP, 9000), pass: true},
			{p: in(netV4, protoTCP, 8500), pass: true},
		}},
		{"port range edges", []Entry{allowIn(peerID, protoTCP, 1000, 1999)}, []probe{
			{p: in(peerV4, protoTCP, 999)},
			{p: in(peerV4, protoTCP, 1000), pass: true},
			{p: in(peerV4, protoTCP, 1023), pass: true},
			{p: in(peerV4, protoTCP, 1024), pass: true},
			{p: in(peerV4, protoTCP, 1500), pass: true},
			{p: in(peerV4, protoTCP, 1999), pass: true},
			{p: in(peerV4, protoTCP, 2000)},
			{p: in(peerV6, protoTCP, 1999), pass: true},
		}},
		{"full high range", []Entry{allowIn(0, protoUDP, 1, 65535)}, []probe{
			{p: in(peerV4, protoUDP, 1), pass: true},
			{p: in(peerV4, protoUDP, 65535), pass: true},
			{p: in(peerV4, protoUDP, 32768), pass: true},
			{p: in(peerV4, protoTCP, 32768)},
		}},
		{"unknown source is world", []Entry{allowIn(identityWorld, protoTCP, 443, 0)}, []probe{
			{p: in(unknown4, protoTCP, 443), pass: true},
			{p: in(netip.MustParseAddr("2001:db8::1"), protoTCP, 443), pass: true},
			{p: in(peerV4, protoTCP, 443)},
		}},
		{"icmp type in port", []Entry{allowIn(peerID, protoICMP, 8, 0), allowIn(peerID, protoICMPv6, 128, 0)}, []probe{
			{p: in(peerV4, protoICMP, 8), pass: true},
			{p: in(peerV4, protoICMP, 13)},
			{p: in(peerV6, protoICMPv6, 128), pass: true},
			{p: in(peerV6, protoICMPv6, 1)},
			{p: in(peerV6, protoICMPv6, 135), pass: true}, // neighbour solicitation always passes
		}},
		{"all-zero key opens ingress only", []Entry{{Direction: Ingress}}, []probe{
			{p: in(unknown4, protoTCP, 1), pass: true},
			{p: in(peerV6, protoUDP, 2), pass: true},
			{p: out(peerV4, protoTCP, 80), out: true},
		}},
		{"egress", []Entry{{Identity: peerID, Direction: Egress, Proto: protoTCP, Port: 5432}}, []probe{
			{p: out(peerV4, protoTCP, 5432), out: true, pass: true},
			{p: out(peerV6, protoTCP, 5432), out: true, pass: true},
			{p: out(netV4, protoTCP, 5432), out: true},
			{p: in(peerV4, protoTCP, 5432)},
		}},
		{"spoofed source", []Entry{{Direction: Egress}}, []probe{
			{p: pkt{src: peerV4, dst: netV4, proto: protoUDP, sport: 1, dport: 2}, out: true},
			{p: out(netV4, protoUDP, 2), out: true, pass: true},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := d.SetPolicy(epID, tt.policy); err != nil {
				t.Fatalf("SetPolicy(%v) = %v", tt.policy, err)
			}
			for _, pr := range tt.probes {
				flushCT(t, d)
				prog := d.to
				if pr.out {
					prog = d.from
				}
				want := uint32(dropRet)
				if pr.pass {
					want = passRet
				}
				if got := run(t, prog, pr.p); got != want {
					t.Errorf("%+v (from endpoint %v) = %#x, want %#x", pr.p, pr.out, got, want)
				}
			}
		})
	}
}

func TestCTReplyAndPolicyChange(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	// Egress TCP and ICMP to the peer allowed; ingress closed.
	if err := d.SetPolicy(epID, []Entry{
		{Identity: peerID, Direction: Egress, Proto: protoTCP, Port: 80},
		{Identity: peerID, Direction: Egress, Proto: protoICMP, Port: 8},
		{Identity: peerID, Direction: Egress, Proto: protoICMPv6, Port: 128},
	}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []pkt{out(peerV4, protoTCP, 80), out(peerV6, protoTCP, 80), out(peerV4, protoICMP, 8), out(peerV6, protoICMPv6, 128)} {
		if got := run(t, d.to, p.reply()); got != dropRet {
			t.Errorf("reply %+v before the request = %#x, want drop", p.reply(), got)
		}
		if got := run(t, d.from, p); got != passRet {
			t.Fatalf("request %+v = %#x, want pass", p, got)
		}
		if got := run(t, d.to, p.reply()); got != passRet {
			t.Errorf("reply %+v = %#x, want pass through CT", p.reply(), got)
		}
		// The same tuple started by the peer is no reply.
		fresh := p.reply()
		fresh.sport, fresh.icmpID = 12345, 99
		if got := run(t, d.to, fresh); got != dropRet {
			t.Errorf("new inbound %+v = %#x, want drop", fresh, got)
		}
	}
	// Policy decides every packet that is not a reply: once the policy no
	// longer allows the established flow, its next packet is dropped and
	// its entry deleted, so the replies stop too.
	p := out(peerV4, protoTCP, 80)
	p.tcpFlags = tcpACK
	if got := run(t, d.from, p); got != passRet {
		t.Errorf("established %+v = %#x, want pass", p, got)
	}
	ct, err := d.CT()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range ct {
		if e.Src == netip.AddrPortFrom(epV4, 40001) && e.Dst == netip.AddrPortFrom(peerV4, 80) &&
			e.Endpoint == epID && e.Direction == Egress && e.RemoteIdentity == peerID && e.Packets >= 3 &&
			e.State == CTStateEstablished {
			found = true
		}
	}
	if !found {
		t.Errorf("CT() = %+v, want the established egress flow to %v:80 with 3+ packets", ct, peerV4)
	}
	if err := d.SetPolicy(epID, nil); err != nil {
		t.Fatal(err)
	}
	if got := run(t, d.from, p); got != dropRet {
		t.Errorf("established %+v after policy removal = %#x, want drop", p, got)
	}
	if got := run(t, d.to, p.reply()); got != dropRet {
		t.Errorf("reply of the revoked flow = %#x, want drop", got)
	}
	if got := run(t, d.from, out(peerV4, protoTCP, 81)); got != dropRet {
		t.Errorf("new flow after policy removal = %#x, want drop", got)
	}
}

func TestCountersAndMetrics(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	allow := Entry{Identity: peerID, Direction: Ingress, Proto: protoUDP, Port: 1000, EndPort: 1003}
	if err := d.SetPolicy(epID, []Entry{allow}); err != nil {
		t.Fatal(err)
	}
	p := in(peerV4, protoUDP, 1002)
	for i := range 3 {
		flushCT(t, d)
		p.sport = uint16(50000 + i)
		if got := run(t, d.to, p); got != passRet {
			t.Fatalf("run = %#x, want pass", got)
		}
	}
	entries, err := d.Policy(epID)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Packets != 3 || entries[0].Bytes != 3*uint64(len(p.bytes())) ||
		entries[0].Port != 1000 || entries[0].EndPort != 1003 {
		t.Errorf("Policy() = %+v, want one entry 1000-1003 with 3 packets, %d bytes", entries, 3*len(p.bytes()))
	}
	if got := run(t, d.to, in(peerV4, protoTCP, 1)); got != dropRet {
		t.Fatalf("run = %#x, want drop", got)
	}
	ms, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, m := range ms {
		counts[m.Reason.String()+"/"+m.Direction.String()] = m.Packets
	}
	if counts["forwarded/ingress"] < 3 || counts["policy denied/ingress"] != 1 {
		t.Errorf("Metrics() = %v, want 3+ forwarded and 1 policy denied on ingress", counts)
	}
	// A counter survives a SetPolicy that keeps its entry.
	if err := d.SetPolicy(epID, []Entry{allow, {Direction: Egress}}); err != nil {
		t.Fatal(err)
	}
	entries, _ = d.Policy(epID)
	for _, e := range entries {
		if e.Direction == Ingress && e.Packets != 3 {
			t.Errorf("after SetPolicy: %v packets = %d, want 3", e, e.Packets)
		}
	}
}

func TestAuditMode(t *testing.T) {
	testenv.RequireRoot(t)
	for _, global := range []bool{false, true} {
		t.Run(fmt.Sprintf("global=%v", global), func(t *testing.T) {
			d := openTest(t, Options{Audit: global})
			setupEndpoint(t, d, !global)
			if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80, Deny: true}}); err != nil {
				t.Fatal(err)
			}
			if got := run(t, d.to, in(peerV4, protoTCP, 80)); got != passRet {
				t.Errorf("denied packet in audit mode = %#x, want pass", got)
			}
			ms, _ := d.Metrics()
			audited := false
			for _, m := range ms {
				audited = audited || (m.Reason == AuditWouldDeny && m.Packets == 1)
			}
			if !audited {
				t.Errorf("Metrics() = %+v, want one audit-would-deny", ms)
			}
		})
	}
}

func TestAllowAll(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	deny := Entry{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 22, Deny: true}
	if err := d.SetPolicy(epID, []Entry{deny}); err != nil {
		t.Fatal(err)
	}
	probe := func(want uint32) {
		t.Helper()
		flushCT(t, d)
		for _, p := range []pkt{in(peerV4, protoTCP, 22), in(unknown4, protoUDP, 5)} {
			if got := run(t, d.to, p); got != want {
				t.Errorf("%+v = %#x, want %#x", p, got, want)
			}
		}
	}
	probe(dropRet)
	if err := d.AllowAll(epID, false); err != nil {
		t.Fatal(err)
	}
	probe(passRet)
	// A policy update keeps the emergency open.
	if err := d.SetPolicy(epID, []Entry{deny}); err != nil {
		t.Fatal(err)
	}
	probe(passRet)
	if err := d.AllowAll(epID, true); err != nil {
		t.Fatal(err)
	}
	probe(dropRet)
	entries, _ := d.Policy(epID)
	if len(entries) != 1 || !entries[0].Deny {
		t.Errorf("Policy() after revert = %+v, want only the deny entry", entries)
	}
}

func TestEventsDecodeAndStop(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p := in(peerV6, protoUDP, 53)
	if got := run(t, d.to, p); got != dropRet {
		t.Fatalf("run = %#x, want drop", got)
	}
	select {
	case ev := <-events:
		want := Event{
			Time: ev.Time, Endpoint: epID, Direction: Ingress,
			Src: netip.AddrPortFrom(peerV6, 40000), Dst: netip.AddrPortFrom(epV6, 53),
			Proto: protoUDP, SrcIdentity: peerID, DstIdentity: epIdentity,
			Verdict: Dropped, Reason: DropPolicyDenied, Ifindex: 1, Len: uint32(len(p.bytes())),
		}
		if ev != want {
			t.Errorf("event = %+v, want %+v", ev, want)
		}
		if time.Since(ev.Time).Abs() > time.Minute {
			t.Errorf("event time %v is not now", ev.Time)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no event")
	}
	cancel()
	select {
	case _, ok := <-events:
		if ok {
			// Drain: a late event may still be queued.
			for range events {
			}
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Events did not stop after cancel")
	}
}

// TestICMPErrorRelated: an ICMP error about a tracked flow passes without a
// policy entry; one about an unknown flow is an ordinary ICMP packet.
func TestICMPErrorRelated(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Egress, Proto: protoTCP, Port: 80}}); err != nil {
		t.Fatal(err)
	}
	router4 := netip.MustParseAddr("192.0.2.1")
	router6 := netip.MustParseAddr("2001:db8::1")
	for _, c := range []struct {
		name    string
		flow    pkt
		router  netip.Addr
		proto   uint8
		errType uint16
	}{
		{"v4 frag needed", out(peerV4, protoTCP, 80), router4, protoICMP, 3},
		{"v6 packet too big", out(peerV6, protoTCP, 80), router6, protoICMPv6, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			flushCT(t, d)
			quoted := c.flow
			icmpErr := pkt{src: c.router, dst: c.flow.src, proto: c.proto, dport: c.errType, inner: &quoted}
			if got := run(t, d.to, icmpErr); got != dropRet {
				t.Errorf("ICMP error before the flow = %#x, want drop", got)
			}
			if got := run(t, d.from, c.flow); got != passRet {
				t.Fatalf("flow = %#x, want pass", got)
			}
			if got := run(t, d.to, icmpErr); got != passRet {
				t.Errorf("ICMP error about the flow = %#x, want pass", got)
			}
			other := c.flow
			other.dport = 81
			icmpErr.inner = &other
			if got := run(t, d.to, icmpErr); got != dropRet {
				t.Errorf("ICMP error about another flow = %#x, want drop", got)
			}
		})
	}
}

// TestCTExpiry: an idle flow's CT entry stops counting, so policy decides
// again (a reply then is a new inbound flow).
func TestCTExpiry(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{CTTimeoutOther: 300 * time.Millisecond})
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Egress, Proto: protoUDP, Port: 53}}); err != nil {
		t.Fatal(err)
	}
	p := out(peerV4, protoUDP, 53)
	if got := run(t, d.from, p); got != passRet {
		t.Fatalf("request = %#x, want pass", got)
	}
	if got := run(t, d.to, p.reply()); got != passRet {
		t.Fatalf("reply = %#x, want pass", got)
	}
	time.Sleep(500 * time.Millisecond)
	if got := run(t, d.to, p.reply()); got != dropRet {
		t.Errorf("reply after the idle timeout = %#x, want drop", got)
	}
	// The request creates a fresh entry and replies pass again.
	if got := run(t, d.from, p); got != passRet {
		t.Fatalf("request after the idle timeout = %#x, want pass", got)
	}
	if got := run(t, d.to, p.reply()); got != passRet {
		t.Errorf("reply to the new entry = %#x, want pass", got)
	}
}

func TestTraceSampleAndFeatures(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{TraceSample: 1})
	f := d.Features()
	if !f.RingBuf || !f.LPM || !f.HashOfMaps || (f.AttachMode != AttachTCX && f.AttachMode != AttachTC) {
		t.Errorf("Features() = %+v, want ring buffer, LPM, hash of maps and an attach mode", f)
	}
	if f.TCX != (f.AttachMode == AttachTCX) {
		t.Errorf("Features() = %+v: auto mode must pick tcx exactly when the kernel has it", f)
	}
	setupEndpoint(t, d, false)
	// New endpoints are closed; open this one.
	if err := d.SetPolicy(epID, OpenEntries()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := d.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := run(t, d.to, in(peerV4, protoTCP, 22)); got != passRet {
		t.Fatalf("run = %#x, want pass (endpoint opened)", got)
	}
	select {
	case ev := <-events:
		if ev.Verdict != Forwarded || ev.Reason != ReasonForwarded || ev.Dst.Port() != 22 {
			t.Errorf("trace event = %+v, want a forwarded TCP :22 event", ev)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no trace event with TraceSample 1")
	}
}
