package datapath

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// The differential test: random policies (denies, port ranges, wildcards in
// identity, port and protocol, both directions, ICMP types, the emergency
// allow-all), a random ipcache (exact addresses and overlapping prefixes of
// both families) and random packets go through the real programs with
// BPF_PROG_TEST_RUN; the verdict and the drop reason (read from rw_metrics
// through Metrics) must equal what the model below says, which is written
// from docs/datapath.md and DESIGN.md ("Lookup order", "A deny entry that
// matches wins over an allow") without using the package's encoding of
// entries as keys. Connection tracking is flushed after every packet that
// passes, so every packet is a new flow.
//
// RW_DIFF_SEED=N replays a run; RW_DIFF_ROUNDS=N runs longer (default 60
// rounds of 100 packets).

// model is the expected datapath state of one endpoint and the ipcache.
type model struct {
	exact    map[netip.Addr]uint32
	prefixes map[netip.Prefix]uint32
	// per endpoint address: its identity, policy, audit flag, open flag
	eps map[netip.Addr]*modelEndpoint

	// mutations, used only to prove the comparison can fail
	denyLoses        bool // an allow that matches beats a deny
	exactIdentity    bool // identity 0 in an entry is not a wildcard
	rangeEndExcluded bool // the end port of a range does not match
	shortestPrefix   bool // the ipcache answers the shortest prefix
}

type modelEndpoint struct {
	id       uint16
	identity uint32
	audit    bool
	open     bool // AllowAll in force
	policy   []Entry
}

func (m *model) identityOf(a netip.Addr) uint32 {
	if id, ok := m.exact[a]; ok {
		return id
	}
	best, bestBits := uint32(identityWorld), -1
	for p, id := range m.prefixes {
		if !p.Contains(a) {
			continue
		}
		better := p.Bits() > bestBits
		if m.shortestPrefix {
			better = bestBits < 0 || p.Bits() < bestBits
		}
		if better {
			best, bestBits = id, p.Bits()
		}
	}
	return best
}

// policyPort is what an entry's port is compared with: the destination
// port, the ICMP type, or nothing (0) for protocols without ports.
func policyPort(p pkt) uint16 {
	switch p.proto {
	case protoTCP, protoUDP, protoSCTP, protoICMP, protoICMPv6:
		return p.dport
	}
	return 0
}

func (m *model) entryMatches(e Entry, dir Direction, remote uint32, proto uint8, port uint16) bool {
	if e.Direction != dir {
		return false
	}
	if e.Identity != remote && (e.Identity != 0 || m.exactIdentity) {
		return false
	}
	if e.Proto != 0 && e.Proto != proto {
		return false
	}
	if e.Port == 0 {
		return true
	}
	end := max(e.EndPort, e.Port)
	if m.rangeEndExcluded && e.EndPort > e.Port {
		end--
	}
	return port >= e.Port && port <= end
}

// verdict is what the program does with p in dir: pass, and the reason
// rw_metrics counts it under.
func (m *model) verdict(p pkt, dir Direction) (pass bool, reason Reason) {
	// Neighbour discovery and MLD pass before anything is looked up.
	if p.proto == protoICMPv6 && ((p.dport >= 130 && p.dport <= 137) || p.dport == 143) {
		return true, ReasonForwarded
	}
	local, remote := p.dst, p.src
	if dir == Egress {
		local, remote = p.src, p.dst
	}
	ep, ok := m.eps[local]
	if !ok {
		if dir == Egress {
			return false, DropSpoofedSource
		}
		return false, DropNoIdentity
	}
	remoteID := m.identityOf(remote)
	if p.proto == protoTCP && p.tcpFlags&tcpSYN != 0 && p.tcpFlags&(0x01|0x04) != 0 {
		return false, DropCTInvalid
	}
	reason = DropPolicyDenied
	if ep.open {
		reason = ReasonForwarded
	} else {
		allowed, denied := false, false
		for _, e := range ep.policy {
			if m.entryMatches(e, dir, remoteID, p.proto, policyPort(p)) {
				if e.Deny {
					denied = true
				} else {
					allowed = true
				}
			}
		}
		switch {
		case denied && !(m.denyLoses && allowed):
			reason = DropPolicyDenyRule
		case allowed:
			reason = ReasonForwarded
		}
	}
	if reason != ReasonForwarded && ep.audit {
		return true, AuditWouldDeny
	}
	return reason == ReasonForwarded, reason
}

// diffCase is one packet and what the kernel did with it.
type diffCase struct {
	round int
	p     pkt
	dir   Direction
	pass  bool
	// reason the metrics moved under
	reason Reason
}

func (c diffCase) String() string {
	return fmt.Sprintf("round %d %s %v:%d -> %v:%d proto %d flags %#x", c.round, c.dir, c.p.src, c.p.sport,
		c.p.dst, c.p.dport, c.p.proto, c.p.tcpFlags)
}

// diffGen draws the random state.
type diffGen struct {
	r    *rand.Rand
	v4   []netip.Addr // remote address pools
	v6   []netip.Addr
	ids  []uint32
	eps  []*modelEndpoint
	epV4 map[uint16]netip.Addr
	epV6 map[uint16]netip.Addr
}

func newDiffGen(seed uint64) *diffGen {
	g := &diffGen{r: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		epV4: map[uint16]netip.Addr{}, epV6: map[uint16]netip.Addr{}}
	// Few addresses and identities, so prefixes overlap and entries collide.
	for x := range 4 {
		for y := range 6 {
			g.v4 = append(g.v4, netip.AddrFrom4([4]byte{10, 90, byte(x * 64), byte(y*40 + 1)}))
			g.v6 = append(g.v6, netip.AddrFrom16([16]byte{0xfd, 0x90, 14: byte(x * 64), 15: byte(y*40 + 1)}))
		}
	}
	g.v4 = append(g.v4, netip.MustParseAddr("192.0.2.9"), netip.MustParseAddr("198.51.100.3"))
	g.v6 = append(g.v6, netip.MustParseAddr("2001:db8::9"), netip.MustParseAddr("2001:db8:1::3"))
	g.ids = []uint32{identityWorld, 3000, 3001, 3002, 3003, 3004, 3005}
	return g
}

func (g *diffGen) pick(n int) int { return g.r.IntN(n) }

func (g *diffGen) identity() uint32 { return g.ids[g.pick(len(g.ids))] }

// ipcache draws exact entries and prefixes over the address pools.
func (g *diffGen) ipcache() (map[netip.Addr]uint32, map[netip.Prefix]uint32) {
	exact := map[netip.Addr]uint32{}
	prefixes := map[netip.Prefix]uint32{}
	for _, pool := range [][]netip.Addr{g.v4, g.v6} {
		for _, a := range pool {
			if g.pick(2) == 0 {
				exact[a] = g.identity()
			}
		}
		for range 6 + g.pick(10) {
			a := pool[g.pick(len(pool))]
			bits := g.pick(a.BitLen()) // never the full length: that is an exact entry
			if g.pick(4) == 0 {
				bits = a.BitLen() - 1 - g.pick(8)
			}
			prefixes[netip.PrefixFrom(a, bits).Masked()] = g.identity()
		}
	}
	return exact, prefixes
}

var diffICMPTypes = []uint16{8, 0, 13, 14, 17, 5}
var diffICMPv6Types = []uint16{128, 129, 130, 133, 135, 136, 143, 200}

// icmpType draws an ICMP or ICMPv6 type; ok is false for other protocols.
// Error types (which quote a packet and are matched against tracked flows)
// are left out: connection tracking is not what this test models.
func (g *diffGen) icmpType(proto uint8) (uint16, bool) {
	switch proto {
	case protoICMP:
		return diffICMPTypes[g.pick(len(diffICMPTypes))], true
	case protoICMPv6:
		return diffICMPv6Types[g.pick(len(diffICMPv6Types))], true
	}
	return 0, false
}

// port draws an interesting destination port: near the edges of the
// range of some entry that can match a packet of proto in dir (of any
// entry when none can), or random. Edges are hit exactly half the time:
// an entry's end port is what the "range end excluded" mutant needs, and
// drawing from entries of any direction and protocol left it unkilled
// for 1 seed in 20.
func (g *diffGen) port(policy []Entry, dir Direction, proto uint8) uint16 {
	var fit []Entry
	for _, e := range policy {
		if e.Direction == dir && e.Proto == proto && e.Port > 0 {
			fit = append(fit, e)
		}
	}
	if len(fit) == 0 {
		fit = policy
	}
	if len(fit) > 0 && g.pick(3) > 0 {
		e := fit[g.pick(len(fit))]
		base := e.Port
		if e.EndPort > 0 && g.pick(2) == 0 {
			base = e.EndPort
		}
		if g.pick(2) == 0 {
			return base
		}
		return base + uint16(g.pick(2)*2) - 1
	}
	switch g.pick(4) {
	case 0:
		return uint16(1 + g.pick(1024))
	case 1:
		return []uint16{1, 80, 443, 8080, 32768, 65535}[g.pick(6)]
	}
	return uint16(g.r.Uint32())
}

func (g *diffGen) proto() uint8 {
	return []uint8{protoTCP, protoTCP, protoUDP, protoUDP, protoSCTP, protoICMP, protoICMPv6, 47}[g.pick(8)]
}

// entry draws one valid entry.
func (g *diffGen) entry() Entry {
	e := Entry{Direction: Direction(g.pick(2)), Deny: g.pick(4) == 0}
	if g.pick(3) > 0 {
		e.Identity = g.identity()
	}
	if g.pick(6) == 0 {
		return e // any protocol, any port
	}
	e.Proto = g.proto()
	if g.pick(3) == 0 || e.Proto == 47 {
		return e // any port
	}
	if t, ok := g.icmpType(e.Proto); ok {
		e.Port = t
	} else {
		e.Port = max(1, g.port(nil, 0, 0))
		if g.pick(2) == 0 {
			width := []int{1, 7, 100, 1000, 40000}[g.pick(5)]
			e.EndPort = uint16(min(int(e.Port)+g.pick(width)+1, 65535))
		}
	}
	if e.Port == 0 { // ICMP echo reply (type 0) cannot be named: any type
		e.EndPort = 0
	}
	return e
}

// policy draws a policy for one endpoint; sometimes a direction's
// wildcard allow (what an unselected direction has).
func (g *diffGen) policy() []Entry {
	var es []Entry
	for range g.pick(25) {
		es = append(es, g.entry())
	}
	if g.pick(5) == 0 {
		es = append(es, Entry{Direction: Direction(g.pick(2))})
	}
	return es
}

// packet draws a packet for endpoint ep (or for an address that is no
// endpoint) in a random direction.
func (g *diffGen) packet(m *model) (pkt, Direction) {
	ep := g.eps[g.pick(len(g.eps))]
	v6 := g.pick(2) == 0
	local := g.epV4[ep.id]
	pool := g.v4
	if v6 {
		local, pool = g.epV6[ep.id], g.v6
	}
	remote := pool[g.pick(len(pool))]
	switch g.pick(10) {
	case 0: // the other endpoint
		other := g.eps[(g.pick(len(g.eps)-1)+1+int(ep.id))%len(g.eps)]
		remote = g.epV4[other.id]
		if v6 {
			remote = g.epV6[other.id]
		}
	case 1: // not an endpoint: no identity / spoofed source
		local = pool[g.pick(len(pool))]
	}
	dir := Direction(g.pick(2))
	p := pkt{src: remote, dst: local, sport: uint16(1024 + g.pick(60000)), icmpID: uint16(g.r.Uint32()), payloadLen: g.pick(64)}
	if dir == Egress {
		p.src, p.dst = local, remote
	}
	p.proto = g.proto()
	switch p.proto {
	case protoICMP:
		if v6 && g.pick(2) == 0 {
			p.proto = protoICMPv6
		}
	case protoICMPv6:
		if !v6 && g.pick(2) == 0 {
			p.proto = protoICMP
		}
	}
	var policy []Entry
	if e, ok := m.eps[local]; ok {
		policy = e.policy
	}
	if t, ok := g.icmpType(p.proto); ok {
		p.dport = t
	} else {
		p.dport = g.port(policy, dir, p.proto)
	}
	if p.proto == protoTCP {
		p.tcpFlags = []uint8{tcpSYN, tcpSYN, tcpSYN, tcpACK, tcpSYN | 0x01, tcpSYN | 0x04, tcpSYN | tcpACK}[g.pick(7)]
	}
	return p, dir
}

func metricsSnapshot(t testing.TB, d *Datapath) map[[2]int32]uint64 {
	t.Helper()
	ms, err := d.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	out := map[[2]int32]uint64{}
	for _, m := range ms {
		out[[2]int32{int32(m.Reason), int32(m.Direction)}] = m.Packets
	}
	return out
}

// modelReasons are the reasons the model gives; other counters (ones a
// later datapath may add, e.g. for suppressed events) are not the verdict.
var modelReasons = map[Reason]bool{
	ReasonForwarded: true, DropPolicyDenied: true, DropPolicyDenyRule: true, DropNoIdentity: true,
	DropCTInvalid: true, AuditWouldDeny: true, DropSpoofedSource: true,
}

// movedReason is the one verdict counter that moved between two snapshots;
// a packet dropped for a reason the model does not know moves none and is
// an error that names it.
func movedReason(before, after map[[2]int32]uint64, dir Direction) (Reason, error) {
	var moved, other []Reason
	for k, n := range after {
		if n == before[k] {
			continue
		}
		if !modelReasons[Reason(k[0])] {
			other = append(other, Reason(k[0]))
			continue
		}
		if k[1] != int32(dir) || n != before[k]+1 {
			return 0, fmt.Errorf("counter %v moved from %d to %d", k, before[k], n)
		}
		moved = append(moved, Reason(k[0]))
	}
	if len(moved) != 1 {
		return 0, fmt.Errorf("%d verdict counters moved (%v; others %v), want 1", len(moved), moved, other)
	}
	return moved[0], nil
}

func envInt(name string, def uint64) uint64 {
	if v, err := strconv.ParseUint(os.Getenv(name), 10, 64); err == nil {
		return v
	}
	return def
}

func TestDifferentialPolicyLookup(t *testing.T) {
	testenv.RequireRoot(t)
	seed := envInt("RW_DIFF_SEED", uint64(time.Now().UnixNano()))
	rounds := int(envInt("RW_DIFF_ROUNDS", 60))
	const packetsPerRound = 100
	t.Logf("seed %d (replay: RW_DIFF_SEED=%d)", seed, seed)

	d := openTest(t, Options{IPCacheMaxEntries: 8192, PolicyMaxEntries: 4096})
	g := newDiffGen(seed)
	m := &model{eps: map[netip.Addr]*modelEndpoint{}}
	for i, audit := range []bool{false, false, true} {
		ep := &modelEndpoint{id: uint16(801 + i), identity: uint32(1000 + i), audit: audit}
		v4 := netip.AddrFrom4([4]byte{10, 89, 0, byte(1 + i)})
		v6 := netip.AddrFrom16([16]byte{0xfd, 0x89, 15: byte(1 + i)})
		d.mu.Lock()
		err := d.addEndpointLocked(EndpointSpec{ID: ep.id, IfIndex: 1, IPs: []netip.Addr{v4, v6}, Identity: ep.identity, Audit: audit})
		d.mu.Unlock()
		if err != nil {
			t.Fatalf("add endpoint: %v", err)
		}
		g.eps = append(g.eps, ep)
		g.epV4[ep.id], g.epV6[ep.id] = v4, v6
		m.eps[v4], m.eps[v6] = ep, ep
	}

	setIPCache := func() {
		for a := range m.exact {
			if err := d.DeleteIPCache(netip.PrefixFrom(a, a.BitLen())); err != nil {
				t.Fatal(err)
			}
		}
		for p := range m.prefixes {
			if err := d.DeleteIPCache(p); err != nil {
				t.Fatal(err)
			}
		}
		m.exact, m.prefixes = g.ipcache()
		for _, ep := range g.eps { // the endpoints' own addresses, as the agent writes them
			m.exact[g.epV4[ep.id]], m.exact[g.epV6[ep.id]] = ep.identity, ep.identity
		}
		for a, id := range m.exact {
			if err := d.UpsertIPCache(netip.PrefixFrom(a, a.BitLen()), id, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
		}
		for p, id := range m.prefixes {
			if err := d.UpsertIPCache(p, id, netip.Addr{}); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Mutants of the model: each must disagree with the kernel somewhere,
	// which shows the comparison can fail (and that the random cases reach
	// denies, identity wildcards, range ends and nested prefixes).
	mutants := map[string]func(*model){
		"deny does not win over allow": func(m *model) { m.denyLoses = true },
		"identity 0 is no wildcard":    func(m *model) { m.exactIdentity = true },
		"range end excluded":           func(m *model) { m.rangeEndExcluded = true },
		"shortest prefix wins":         func(m *model) { m.shortestPrefix = true },
	}
	killed := map[string]bool{}
	var failures int
	counts := map[Reason]int{}
	n := 0
	start := time.Now()
	for round := range rounds {
		if round%10 == 0 {
			setIPCache()
		}
		for _, ep := range g.eps {
			ep.policy = g.policy()
			if err := d.SetPolicy(ep.id, ep.policy); err != nil {
				t.Fatalf("seed %d: SetPolicy(%d, %v) = %v", seed, ep.id, ep.policy, err)
			}
			open := g.pick(12) == 0
			if open != ep.open {
				if err := d.AllowAll(ep.id, !open); err != nil {
					t.Fatal(err)
				}
				ep.open = open
			}
		}
		for range packetsPerRound {
			p, dir := g.packet(m)
			prog := d.to
			if dir == Egress {
				prog = d.from
			}
			before := metricsSnapshot(t, d)
			ret := run(t, prog, p)
			c := diffCase{round: round, p: p, dir: dir, pass: ret == passRet}
			if ret != passRet && ret != dropRet {
				t.Fatalf("seed %d: %v: program returned %#x", seed, c, ret)
			}
			var err error
			if c.reason, err = movedReason(before, metricsSnapshot(t, d), dir); err != nil {
				t.Fatalf("seed %d: %v: %v", seed, c, err)
			}
			if c.pass {
				flushCT(t, d)
			}
			n++
			counts[c.reason]++
			if pass, reason := m.verdict(p, dir); pass != c.pass || reason != c.reason {
				failures++
				if failures <= 10 {
					t.Errorf("seed %d: %v: kernel pass=%v reason %q, model pass=%v reason %q\npolicy of the endpoint: %v\nipcache: %v %v",
						seed, c, c.pass, c.reason, pass, reason, m.policyOf(p, dir), m.exact, m.prefixes)
				}
			}
			for name, mutate := range mutants {
				mm := *m
				mutate(&mm)
				if pass, reason := mm.verdict(p, dir); pass != c.pass || reason != c.reason {
					killed[name] = true
				}
			}
		}
	}
	t.Logf("%d cases in %v; verdicts: %v", n, time.Since(start).Round(time.Millisecond), counts)
	if failures > 0 {
		t.Fatalf("seed %d: %d of %d cases differ from the model (replay: RW_DIFF_SEED=%d)", seed, failures, n, seed)
	}
	for name := range mutants {
		if !killed[name] {
			t.Errorf("seed %d: the model mutated with %q agrees with the kernel on all %d cases: the cases do not exercise it", seed, name, n)
		}
	}
}

// policyOf is the policy of the endpoint p concerns, for failure messages.
func (m *model) policyOf(p pkt, dir Direction) []Entry {
	local := p.dst
	if dir == Egress {
		local = p.src
	}
	if ep, ok := m.eps[local]; ok {
		return ep.policy
	}
	return nil
}

// An emergency allow-all whose wildcard entry a policy took over (and a
// later policy dropped) must still revert: the open flag goes, and with it
// everything it let through. Found by the differential test; on c484b0a the
// revert failed with "key does not exist" and left the endpoint open.
func TestAllowAllRevertAfterPolicyTookItsEntry(t *testing.T) {
	testenv.RequireRoot(t)
	d := openTest(t, Options{})
	setupEndpoint(t, d, false)
	if err := d.AllowAll(epID, false); err != nil {
		t.Fatal(err)
	}
	if err := d.SetPolicy(epID, []Entry{{Direction: Ingress}}); err != nil { // takes over the emergency key
		t.Fatal(err)
	}
	if err := d.SetPolicy(epID, []Entry{{Identity: peerID, Direction: Ingress, Proto: protoTCP, Port: 80}}); err != nil {
		t.Fatal(err)
	}
	p := in(netV4, protoTCP, 22)
	if got := run(t, d.to, p); got != passRet {
		t.Fatalf("before the revert: verdict %#x, want pass (allow-all is on)", got)
	}
	if err := d.AllowAll(epID, true); err != nil {
		t.Fatalf("AllowAll(revert) = %v", err)
	}
	flushCT(t, d)
	if got := run(t, d.to, p); got != dropRet {
		t.Fatalf("after the revert: verdict %#x, want drop (the policy allows only port 80 from %d)", got, peerID)
	}
}
