// Package birdconf renders the BIRD 2 configuration of one host and talks
// to a running BIRD through its control socket.
//
// It is a leaf: it imports nothing from rackwire. The agent's BGP manager
// (daemon/bgp) builds a Config from [bgp], the host's workload CIDRs, VIP
// health and the drain state, and calls Render, then Apply. The rendered
// file is the single source of truth for BIRD: nothing is changed through
// BIRD's CLI, so a restart of the agent or of BIRD converges on the file.
//
// Bad input (a zero router id, a peer without an address, a password BIRD
// cannot quote) makes Render return an error and nothing is written; a file
// BIRD refuses is never left in place (see Apply).
package birdconf

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Config is everything one host's BIRD configuration is rendered from.
type Config struct {
	// Version is the rackwire version written in the header.
	Version  string
	RouterID netip.Addr // IPv4
	LocalASN uint32
	// CIDRs are the host's workload prefixes; they are announced and never
	// imported.
	CIDRs []Route
	// VIPs are the VIPs configured on this host. Only those with Active set
	// are announced; all of them are refused on import.
	VIPs []VIP
	// Import lists what BIRD may take from the peers. A /0 entry allows the
	// default route only; any other prefix allows itself and everything
	// inside it.
	Import []netip.Prefix
	// Communities are added to every announced route.
	Communities []string
	// Drained withdraws every announcement except the prefixes inside
	// DrainKeep.
	Drained   bool
	DrainKeep []netip.Prefix
	Peers     []Peer
	// ScanTime is how often BIRD rescans interfaces and the kernel table
	// (default 10s).
	ScanTime time.Duration
}

// Route is a host prefix with its own traffic-engineering attributes.
type Route struct {
	Prefix      netip.Prefix
	Communities []string
	LocalPref   uint32 // 0: not set
}

// VIP is a service address this host may announce.
type VIP struct {
	Route
	// Active reports whether the VIP is healthy here and may be announced.
	Active bool
}

// Peer is one BGP neighbour.
type Peer struct {
	Name          string // BIRD protocol name
	Address       netip.Addr
	ASN           uint32
	SourceAddress netip.Addr // optional
	Multihop      int        // 0: directly connected
	BFD           bool
	// BFD timers. BIRD 2.0 sets them per interface, not per neighbour: a
	// peer with Interface set gets its own interface block, the others
	// share the wildcard block, which takes the fastest timers asked for.
	BFDMinRx, BFDMinTx time.Duration
	BFDMultiplier      int
	Interface          string // optional, only used for BFD timers
	GracefulRestart    bool
	HoldTime           int // seconds, 0: BIRD's default
	KeepaliveTime      int // seconds, 0: BIRD's default
	Password           string
	// ErrorWait is how long BIRD waits before restarting the session after
	// an error (BFD down, bad message); repeated errors double it up to
	// 300s. 0 means 5s: BIRD's own 60s would keep a host's only route to
	// its workload CIDR withdrawn for a minute after one BFD flap.
	ErrorWait time.Duration
	// Communities are added to what is announced to this peer.
	Communities []string
	// LocalPref is set on what is learned from this peer (0: not set).
	LocalPref uint32
}

// ErrBadConfig is wrapped by every Render error.
var ErrBadConfig = errors.New("bad BIRD config input")

// Announced returns the prefixes the rendered config announces, IPv4 first,
// in the order they are written.
func (c *Config) Announced() []Route {
	var out []Route
	keep := func(p netip.Prefix) bool {
		if !c.Drained {
			return true
		}
		for _, k := range c.DrainKeep {
			if k.Bits() <= p.Bits() && k.Contains(p.Addr()) {
				return true
			}
		}
		return false
	}
	for _, r := range c.CIDRs {
		if keep(r.Prefix) {
			out = append(out, r)
		}
	}
	for _, v := range c.VIPs {
		if v.Active && keep(v.Prefix) {
			out = append(out, v.Route)
		}
	}
	slices.SortStableFunc(out, func(a, b Route) int {
		return boolInt(b.Prefix.Addr().Is4()) - boolInt(a.Prefix.Addr().Is4())
	})
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func (c *Config) check() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrBadConfig}, args...)...)
	}
	if !c.RouterID.Is4() {
		return bad("router id %v is not an IPv4 address", c.RouterID)
	}
	if c.LocalASN == 0 {
		return bad("local ASN is 0")
	}
	all := slices.Clone(c.CIDRs)
	for _, v := range c.VIPs {
		all = append(all, v.Route)
	}
	for _, r := range all {
		if !r.Prefix.IsValid() || r.Prefix.Masked() != r.Prefix {
			return bad("prefix %v is not a network prefix", r.Prefix)
		}
		if err := checkCommunities(r.Communities); err != nil {
			return bad("prefix %v: %v", r.Prefix, err)
		}
	}
	if err := checkCommunities(c.Communities); err != nil {
		return bad("%v", err)
	}
	if c.ScanTime > maxWait {
		return bad("scan time %v is longer than a day", c.ScanTime)
	}
	names := map[string]bool{}
	for _, p := range c.Peers {
		if !validName(p.Name) || strings.HasPrefix(p.Name, "rw_") {
			return bad("peer name %q is not a usable BIRD protocol name (letters, digits, '_'; not starting with rw_)", p.Name)
		}
		if IsBirdWord(p.Name) {
			return bad("peer name %q is a word BIRD reserves; pick another (e.g. %s_1 or %s)", p.Name, p.Name, strings.ToUpper(p.Name))
		}
		if len(p.Name) > maxPeerName {
			return bad("peer name %q is longer than %d characters (BIRD's symbols hold 64, and rackwire prefixes filter names)", p.Name, maxPeerName)
		}
		for _, a := range []netip.Addr{p.Address, p.SourceAddress} {
			if z := a.Zone(); z != "" && !reZone.MatchString(z) {
				return bad("peer %s: zone %q of %v: BIRD takes only letters, digits and '_' there; use a peer address without the zone or an interface name of those characters", p.Name, z, a)
			}
		}
		if p.Multihop < 0 || p.Multihop > 255 {
			return bad("peer %s: multihop %d is out of range 0..255", p.Name, p.Multihop)
		}
		if p.HoldTime != 0 && (p.HoldTime < 3 || p.HoldTime > 65535) {
			return bad("peer %s: hold time %d is out of range (0 or 3..65535)", p.Name, p.HoldTime)
		}
		if hold := cmp.Or(p.HoldTime, birdHoldTime); p.KeepaliveTime < 0 || p.KeepaliveTime > hold {
			return bad("peer %s: keepalive time %d must be between 0 and the hold time (%d)", p.Name, p.KeepaliveTime, hold)
		}
		if p.BFDMinRx > maxBFDInterval || p.BFDMinTx > maxBFDInterval {
			return bad("peer %s: BFD intervals must be below %v", p.Name, maxBFDInterval)
		}
		if p.BFDMultiplier < 0 || p.BFDMultiplier > 255 {
			return bad("peer %s: BFD multiplier %d is out of range 0..255", p.Name, p.BFDMultiplier)
		}
		if p.ErrorWait > maxWait {
			return bad("peer %s: error wait %v is longer than a day", p.Name, p.ErrorWait)
		}
		if names[p.Name] {
			return bad("peer name %q is used twice", p.Name)
		}
		names[p.Name] = true
		if !p.Address.IsValid() {
			return bad("peer %s has no address", p.Name)
		}
		if p.ASN == 0 {
			return bad("peer %s has ASN 0", p.Name)
		}
		if p.SourceAddress.IsValid() && p.SourceAddress.Is4() != p.Address.Is4() {
			return bad("peer %s: source address %v is not of the family of %v", p.Name, p.SourceAddress, p.Address)
		}
		if p.BFD && p.Multihop > 0 && !p.SourceAddress.IsValid() {
			return bad("peer %s: BFD on a multihop session needs a source address", p.Name)
		}
		if strings.ContainsAny(p.Password, "\"\\\n\r") {
			return bad("peer %s: the password contains a quote, a backslash or a line break, which BIRD cannot quote", p.Name)
		}
		if p.Interface != "" && !reIfName.MatchString(p.Interface) {
			return bad("peer %s: interface %q is not an interface name (1..15 of letters, digits, '.', '_', '-')", p.Name, p.Interface)
		}
		if err := checkCommunities(p.Communities); err != nil {
			return bad("peer %s: %v", p.Name, err)
		}
	}
	return nil
}

// Limits of what BIRD accepts, so that Render never writes a file that
// `bird -p` refuses (FuzzRenderBird checks it against the real bird).
const (
	// maxPeerName: BIRD symbols hold 64 characters and the longest name
	// derived from a peer's is rw_export_NAME.
	maxPeerName = 64 - len("rw_export_")
	// birdHoldTime is BIRD's default hold time, the bound of keepalive
	// when no hold time is set.
	birdHoldTime = 240
	// maxBFDInterval: BIRD keeps BFD intervals in 32-bit microseconds.
	maxBFDInterval = time.Duration(1<<32-1) * time.Microsecond
	// maxWait bounds scan and error wait times, written in seconds.
	maxWait = 24 * time.Hour
)

var (
	// reZone: BIRD reads an address's zone as a plain word.
	reZone = regexp.MustCompile(`^[A-Za-z0-9_]+$`)
	// reIfName is a Linux interface name BIRD can take in a string.
	reIfName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
)

func validName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case (r >= '0' && r <= '9') || r == '_':
			if i == 0 {
				return false
			}
		default:
			return false
		}
	}
	return true
}

// community is a parsed standard (two parts) or large (three parts) BGP
// community.
type community struct {
	parts []uint64
}

func parseCommunity(s string) (community, error) {
	f := strings.Split(s, ":")
	if len(f) != 2 && len(f) != 3 {
		return community{}, fmt.Errorf("community %q: write \"65000:100\" or \"4200000000:1:2\"", s)
	}
	limit := uint64(65535)
	if len(f) == 3 {
		limit = 1<<32 - 1
	}
	var c community
	for _, x := range f {
		v, err := strconv.ParseUint(x, 10, 64)
		if err != nil || v > limit {
			return community{}, fmt.Errorf("community %q: part %q out of range", s, x)
		}
		c.parts = append(c.parts, v)
	}
	return c, nil
}

func checkCommunities(list []string) error {
	for _, s := range list {
		if _, err := parseCommunity(s); err != nil {
			return err
		}
	}
	return nil
}

// addCommunity returns the BIRD statement that adds community s.
func addCommunity(s string) string {
	c, _ := parseCommunity(s) // checked before rendering
	if len(c.parts) == 3 {
		return fmt.Sprintf("bgp_large_community.add((%d, %d, %d));", c.parts[0], c.parts[1], c.parts[2])
	}
	return fmt.Sprintf("bgp_community.add((%d, %d));", c.parts[0], c.parts[1])
}

// ms writes a duration in whole milliseconds, BIRD's finest useful unit.
func ms(d time.Duration) string {
	v := d.Milliseconds()
	if v < 1 {
		v = 1
	}
	return fmt.Sprintf("%d ms", v)
}

// Redacted stands for a peer's password in the text RenderRedacted returns.
const Redacted = "<redacted>"

// RenderRedacted returns the text Render returns with every peer password
// replaced by Redacted (`password "<redacted>";`): the text to show (API,
// logs, diffs), never the one to give BIRD. It fails where Render fails.
func RenderRedacted(c Config) (string, error) {
	if err := c.check(); err != nil {
		return "", err
	}
	c.Peers = slices.Clone(c.Peers)
	for i := range c.Peers {
		if c.Peers[i].Password != "" {
			c.Peers[i].Password = Redacted
		}
	}
	return Render(c)
}

// Render returns the BIRD 2 configuration text for c. The same Config
// always renders the same text, so callers can compare texts to find out
// whether anything changed. The text holds the peers' passwords: it is for
// BIRD's file only; show RenderRedacted's instead.
func Render(c Config) (string, error) {
	if err := c.check(); err != nil {
		return "", err
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	// The version goes into a comment line: no control character may
	// start another line.
	version := strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return '?'
		}
		return r
	}, c.Version)
	if version == "" {
		version = "unknown"
	}
	w("# Generated by rackwire %s. Do not edit: rackwired rewrites this file\n", version)
	w("# whenever [bgp], the workload CIDRs, VIP health or the drain state change.\n")
	w("# Change /etc/rackwire/rackwire.toml instead; see docs/bgp.md.\n\n")
	w("router id %s;\n", c.RouterID)
	w("timeformat protocol iso long;\n")
	w("\n")

	announced := c.Announced()
	var own4, own6, ann4, ann6, imp4, imp6 []string
	for _, r := range c.CIDRs {
		appendFamily(r.Prefix, r.Prefix.String()+"+", &own4, &own6)
	}
	for _, v := range c.VIPs {
		appendFamily(v.Prefix, v.Prefix.String()+"+", &own4, &own6)
	}
	for _, r := range announced {
		appendFamily(r.Prefix, r.Prefix.String(), &ann4, &ann6)
	}
	for _, p := range c.Import {
		p = p.Masked()
		s := p.String() + "+"
		if p.Bits() == 0 {
			s = p.String() // the default route only, not everything
		}
		appendFamily(p, s, &imp4, &imp6)
	}
	w("# The host's own CIDRs and VIPs: never imported from a peer.\n")
	writeSetFunc(&b, "rw_own", own4, own6)
	w("# What this host announces now (drain and VIP health applied).\n")
	writeSetFunc(&b, "rw_announced", ann4, ann6)
	w("# What the operator allows to be learned from the peers ([bgp] import).\n")
	writeSetFunc(&b, "rw_import_allowed", imp4, imp6)

	scan := c.ScanTime
	if scan <= 0 {
		scan = 10 * time.Second
	}
	// Interfaces are rescanned quickly: after BIRD's own unnamed device
	// protocol is replaced by this one, BGP waits for its first scan.
	devScan := min(scan, 2*time.Second)
	w("protocol device rw_device {\n\tscan time %d;\n}\n\n", int(devScan.Seconds()+0.5))

	// Static routes: the host originates its prefixes as blackholes; the
	// kernel protocol below never exports them, so they stay inside BIRD.
	for _, fam := range []struct {
		name, channel string
		v4            bool
	}{{"rw_static4", "ipv4", true}, {"rw_static6", "ipv6", false}} {
		w("protocol static %s {\n\t%s;\n", fam.name, fam.channel)
		for _, r := range announced {
			if r.Prefix.Addr().Is4() == fam.v4 {
				w("\troute %s blackhole;\n", r.Prefix)
			}
		}
		w("}\n\n")
	}

	// Kernel: install what the routers send, with ECMP.
	for _, fam := range []struct{ name, channel string }{{"rw_kernel4", "ipv4"}, {"rw_kernel6", "ipv6"}} {
		w("protocol kernel %s {\n", fam.name)
		w("\tscan time %d;\n", int(scan.Seconds()+0.5))
		w("\tmerge paths on;\n")
		w("\t%s {\n\t\timport none;\n\t\texport filter {\n\t\t\tif source = RTS_BGP then accept;\n\t\t\treject;\n\t\t};\n\t};\n", fam.channel)
		w("}\n\n")
	}

	writeBFD(&b, c.Peers)

	for _, p := range c.Peers {
		writeExportFilter(&b, c, p, announced)
		writeImportFilter(&b, p)
		w("protocol bgp %s {\n", p.Name)
		if p.SourceAddress.IsValid() {
			w("\tlocal %s as %d;\n", p.SourceAddress, c.LocalASN)
		} else {
			w("\tlocal as %d;\n", c.LocalASN)
		}
		w("\tneighbor %s as %d;\n", p.Address, p.ASN)
		if p.Multihop > 0 {
			w("\tmultihop %d;\n", p.Multihop)
		} else {
			w("\tdirect;\n")
		}
		if p.BFD {
			// Plain "on": "graceful" would keep stale routes to a dead host.
			w("\tbfd on;\n")
		}
		if p.GracefulRestart {
			w("\tgraceful restart on;\n")
		} else {
			w("\tgraceful restart off;\n")
		}
		wait := int(p.ErrorWait.Seconds())
		if p.ErrorWait <= 0 {
			wait = 5
		}
		w("\terror wait time %d, %d;\n", max(wait, 1), max(wait, 300))
		if p.HoldTime > 0 {
			w("\thold time %d;\n", p.HoldTime)
		}
		if p.KeepaliveTime > 0 {
			w("\tkeepalive time %d;\n", p.KeepaliveTime)
		}
		if p.Password != "" {
			w("\tpassword \"%s\";\n", p.Password)
		}
		ch := "ipv4"
		if p.Address.Is6() {
			ch = "ipv6"
		}
		w("\t%s {\n\t\timport filter rw_import_%s;\n\t\texport filter rw_export_%s;\n\t};\n", ch, p.Name, p.Name)
		w("}\n\n")
	}
	return b.String(), nil
}

func appendFamily(p netip.Prefix, s string, v4, v6 *[]string) {
	if p.Addr().Is4() {
		*v4 = append(*v4, s)
	} else {
		*v6 = append(*v6, s)
	}
}

// writeSetFunc writes a function reporting whether net is in the given
// per-family prefix sets. BIRD has no empty set literal, so an empty family
// is written as "false".
func writeSetFunc(b *strings.Builder, name string, v4, v6 []string) {
	fmt.Fprintf(b, "function %s() {\n", name)
	for _, fam := range []struct {
		typ  string
		list []string
	}{{"NET_IP4", v4}, {"NET_IP6", v6}} {
		if len(fam.list) == 0 {
			continue
		}
		fmt.Fprintf(b, "\tif net.type = %s then return net ~ [ %s ];\n", fam.typ, strings.Join(fam.list, ", "))
	}
	fmt.Fprintf(b, "\treturn false;\n}\n\n")
}

func writeBFD(b *strings.Builder, peers []Peer) {
	type timers struct {
		rx, tx time.Duration
		mult   int
	}
	var direct, multihop *timers
	ifaces := map[string]*timers{}
	var ifaceOrder []string
	merge := func(t **timers, p Peer) {
		n := timers{p.BFDMinRx, p.BFDMinTx, p.BFDMultiplier}
		if n.rx <= 0 {
			n.rx = 100 * time.Millisecond
		}
		if n.tx <= 0 {
			n.tx = 100 * time.Millisecond
		}
		if n.mult <= 0 {
			n.mult = 3
		}
		if *t == nil {
			*t = &n
			return
		}
		(*t).rx = min((*t).rx, n.rx)
		(*t).tx = min((*t).tx, n.tx)
		(*t).mult = min((*t).mult, n.mult)
	}
	for _, p := range peers {
		switch {
		case !p.BFD:
		case p.Multihop > 0:
			merge(&multihop, p)
		case p.Interface != "":
			t := ifaces[p.Interface]
			if t == nil {
				ifaceOrder = append(ifaceOrder, p.Interface)
			}
			merge(&t, p)
			ifaces[p.Interface] = t
		default:
			merge(&direct, p)
		}
	}
	if direct == nil && multihop == nil && len(ifaces) == 0 {
		return
	}
	opts := func(t *timers) string {
		return fmt.Sprintf("{\n\t\tmin rx interval %s;\n\t\tmin tx interval %s;\n\t\tmultiplier %d;\n\t}", ms(t.rx), ms(t.tx), t.mult)
	}
	fmt.Fprintf(b, "# BFD sessions are requested by the BGP protocols (bfd on). BIRD 2.0\n")
	fmt.Fprintf(b, "# sets timers per interface; detection time = multiplier x interval.\n")
	fmt.Fprintf(b, "protocol bfd rw_bfd {\n")
	for _, name := range ifaceOrder {
		fmt.Fprintf(b, "\tinterface \"%s\" %s;\n", name, opts(ifaces[name]))
	}
	if direct != nil {
		fmt.Fprintf(b, "\tinterface \"*\" %s;\n", opts(direct))
	}
	if multihop != nil {
		fmt.Fprintf(b, "\tmultihop %s;\n", opts(multihop))
	}
	fmt.Fprintf(b, "}\n\n")
}

func writeExportFilter(b *strings.Builder, c Config, p Peer, announced []Route) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("# Announce to %s only this host's own static routes; never what was learned.\n", p.Name)
	w("filter rw_export_%s {\n", p.Name)
	w("\tif source != RTS_STATIC then reject;\n")
	w("\tif proto != \"rw_static4\" && proto != \"rw_static6\" then reject;\n")
	w("\tif !rw_announced() then reject;\n")
	for _, s := range c.Communities {
		w("\t%s\n", addCommunity(s))
	}
	for _, s := range p.Communities {
		w("\t%s\n", addCommunity(s))
	}
	for _, r := range announced {
		if len(r.Communities) == 0 && r.LocalPref == 0 {
			continue
		}
		if r.Prefix.Addr().Is4() != p.Address.Is4() {
			continue
		}
		w("\tif net = %s then {\n", r.Prefix)
		for _, s := range r.Communities {
			w("\t\t%s\n", addCommunity(s))
		}
		if r.LocalPref > 0 {
			w("\t\tbgp_local_pref = %d;\n", r.LocalPref)
		}
		w("\t}\n")
	}
	w("\taccept;\n}\n\n")
}

func writeImportFilter(b *strings.Builder, p Peer) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("# Learn from %s only what [bgp] import allows, never this host's own prefixes.\n", p.Name)
	w("filter rw_import_%s {\n", p.Name)
	w("\tif rw_own() then reject;\n")
	w("\tif !rw_import_allowed() then reject;\n")
	if p.LocalPref > 0 {
		w("\tbgp_local_pref = %d;\n", p.LocalPref)
	}
	w("\taccept;\n}\n\n")
}
