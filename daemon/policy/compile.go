package policy

import (
	"fmt"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/rackwire/rackwire/daemon/identity"
)

// Directions of an Entry.
const (
	Ingress uint8 = 0
	Egress  uint8 = 1
)

// IP protocol numbers of an Entry; ProtoAny is the wildcard.
const (
	ProtoAny    uint8 = 0
	ProtoICMP   uint8 = 1
	ProtoTCP    uint8 = 6
	ProtoUDP    uint8 = 17
	ProtoICMPv6 uint8 = 58
	ProtoSCTP   uint8 = 132
)

// compiled is a validated policy ready for the engine.
type compiled struct {
	source string
	name   string
	doc    Policy
	canon  string // canonical JSON, to see whether a new version differs
	rules  []*rule
}

// rule is one spec of a policy.
type rule struct {
	pol      *compiled
	index    int
	path     string // "spec" or "specs[i]"
	subject  *selector
	sections []*section
	eps      map[uint16]*endpoint // engine state: the endpoints subject selects
}

// section is one ingress/egress/ingressDeny/egressDeny item of a rule.
type section struct {
	rule     *rule
	dir      uint8
	deny     bool
	index    int
	field    string // "ingress[0]", ...
	wildcard bool   // every peer (entity all, or ports without peers)
	peers    []*peerSel
	ports    []portRange // empty when the section allows no traffic at all
}

// portRange is (proto, port..endPort); endPort 0 means a single port, port
// 0 every port of proto, proto 0 every protocol.
type portRange struct {
	proto   uint8
	port    uint16
	endPort uint16
}

func (p portRange) matches(dport uint16, proto uint8) bool {
	if p.proto != ProtoAny && p.proto != proto {
		return false
	}
	if p.port == 0 {
		return true
	}
	if p.endPort == 0 {
		return dport == p.port
	}
	return dport >= p.port && dport <= p.endPort
}

type peerKind uint8

const (
	peerEndpoints peerKind = iota // a label selector over cluster endpoints
	peerReserved                  // one reserved identity
	peerCluster                   // entity cluster
	peerWorld                     // entity world: world and every CIDR identity
	peerCIDR                      // a prefix minus its except carve-outs
)

// peerSel selects peer identities. Equal selectors share one key, so the
// engine keeps one matching set per distinct selector.
type peerSel struct {
	key    string
	kind   peerKind
	sel    *selector
	id     identity.ID
	prefix netip.Prefix
	except []netip.Prefix
}

// peer is an identity as the selectors see it.
type peer struct {
	id     identity.ID
	labels identity.Labels
	prefix netip.Prefix // valid for CIDR identities only
}

// clusterReserved are the reserved identities the entity cluster includes.
var clusterReserved = map[identity.ID]bool{
	identity.Host: true, identity.RemoteNode: true, identity.Health: true,
	identity.Init: true, identity.Unmanaged: true, identity.Ingress: true,
}

// isWorkload reports whether id is a cluster endpoint identity (neither
// reserved nor a host-local CIDR identity).
func isWorkload(id identity.ID) bool { return !id.IsReserved() && !id.IsLocal() }

func (ps *peerSel) matches(p *peer) bool {
	switch ps.kind {
	case peerEndpoints:
		// Reserved and CIDR identities match only a selector that names a
		// reserved: key (CIDR identities carry reserved:world).
		if (p.id.IsReserved() || p.id.IsLocal()) && !ps.sel.reserved {
			return false
		}
		return ps.sel.matches(p.labels)
	case peerReserved:
		return p.id == ps.id
	case peerCluster:
		return isWorkload(p.id) || clusterReserved[p.id]
	case peerWorld:
		return p.id == identity.World || p.id.IsLocal()
	case peerCIDR:
		if p.id == identity.World {
			return ps.prefix.Bits() == 0
		}
		if !p.prefix.IsValid() || !inside(p.prefix, ps.prefix) {
			return false
		}
		for _, e := range ps.except {
			if inside(p.prefix, e) {
				return false
			}
		}
		return true
	}
	return false
}

// inside reports whether prefix p lies within q.
func inside(p, q netip.Prefix) bool {
	return p.Addr().Is4() == q.Addr().Is4() && p.Bits() >= q.Bits() && q.Contains(p.Addr())
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$`)

// compile validates p and builds its rules. Errors are *fieldError.
func compile(source string, p *Policy) (*compiled, error) {
	if p.APIVersion != "cilium.io/v2" {
		return nil, errAt("apiVersion", ErrInvalid, "%q; want cilium.io/v2", p.APIVersion)
	}
	if p.Kind != "CiliumNetworkPolicy" && p.Kind != "CiliumClusterwideNetworkPolicy" {
		return nil, errAt("kind", ErrInvalid, "%q; want CiliumNetworkPolicy", p.Kind)
	}
	if !nameRE.MatchString(p.Metadata.Name) {
		return nil, errAt("metadata.name", ErrInvalid, "%q; want lower-case letters, digits, '.', '-' and '_', 1..253 characters", p.Metadata.Name)
	}
	rules := p.Rules()
	if len(rules) == 0 {
		return nil, errAt("spec", ErrInvalid, "a policy needs spec or specs")
	}
	c := &compiled{source: source, name: p.Metadata.Name, doc: *p}
	for i := range rules {
		r, err := compileRule(&rules[i], p.rulePath(i))
		if err != nil {
			return nil, err
		}
		r.pol, r.index = c, i
		c.rules = append(c.rules, r)
	}
	return c, nil
}

func compileRule(r *Rule, path string) (*rule, error) {
	if r.EndpointSelector == nil {
		return nil, errAt(path+".endpointSelector", ErrInvalid, "is required (write {} to select every endpoint)")
	}
	subj, err := compileSelector(r.EndpointSelector, path+".endpointSelector")
	if err != nil {
		return nil, err
	}
	if subj.reserved {
		return nil, errAt(path+".endpointSelector", ErrUnsupported, "host policies (selecting reserved identities) are not supported")
	}
	if len(r.Ingress)+len(r.IngressDeny)+len(r.Egress)+len(r.EgressDeny) == 0 {
		// As in Cilium: a rule whose four lists are all missing or empty
		// would select its endpoints in no direction and do nothing.
		return nil, errAt(path, ErrInvalid, "the rule has no entry in ingress, ingressDeny, egress or egressDeny, so it would do nothing "+
			"(an empty list such as `ingress: []` selects nothing); write at least one entry, "+
			"e.g. `ingress: [{}]` to put the selected endpoints in default deny for ingress and allow nothing")
	}
	out := &rule{path: path, subject: subj}
	add := func(dir uint8, deny bool, name string, n int, get func(int) (*peerFields, []PortRule, []ICMPRule)) error {
		for i := 0; i < n; i++ {
			pf, ports, icmps := get(i)
			s, err := compileSection(dir, deny, fmt.Sprintf("%s[%d]", name, i), path, pf, ports, icmps)
			if err != nil {
				return err
			}
			s.rule, s.index = out, i
			out.sections = append(out.sections, s)
		}
		return nil
	}
	in := func(rs []IngressRule) func(int) (*peerFields, []PortRule, []ICMPRule) {
		return func(i int) (*peerFields, []PortRule, []ICMPRule) {
			x := &rs[i]
			return &peerFields{x.FromEndpoints, x.FromCIDR, x.FromCIDRSet, x.FromEntities, "from"}, x.ToPorts, x.ICMPs
		}
	}
	eg := func(rs []EgressRule) func(int) (*peerFields, []PortRule, []ICMPRule) {
		return func(i int) (*peerFields, []PortRule, []ICMPRule) {
			x := &rs[i]
			return &peerFields{x.ToEndpoints, x.ToCIDR, x.ToCIDRSet, x.ToEntities, "to"}, x.ToPorts, x.ICMPs
		}
	}
	for _, step := range []error{
		add(Ingress, false, "ingress", len(r.Ingress), in(r.Ingress)),
		add(Ingress, true, "ingressDeny", len(r.IngressDeny), in(r.IngressDeny)),
		add(Egress, false, "egress", len(r.Egress), eg(r.Egress)),
		add(Egress, true, "egressDeny", len(r.EgressDeny), eg(r.EgressDeny)),
	} {
		if step != nil {
			return nil, step
		}
	}
	return out, nil
}

type peerFields struct {
	endpoints []Selector
	cidr      []string
	cidrSet   []CIDRRule
	entities  []string
	pfx       string // "from" or "to"
}

// Limits Cilium puts on one toPorts entry's ports and one icmps entry's
// fields.
const (
	maxPorts      = 40
	maxICMPFields = 40
)

func compileSection(dir uint8, deny bool, name, rulePath string, pf *peerFields, ports []PortRule, icmps []ICMPRule) (*section, error) {
	field := rulePath + "." + name
	s := &section{dir: dir, deny: deny, field: name}
	// A peer list that is present selects only what it names: an empty
	// one (`fromEndpoints: []`) or one of the entity none selects no peer.
	// Only when every peer list is absent do ports apply to every peer.
	present := pf.endpoints != nil || pf.cidr != nil || pf.cidrSet != nil || pf.entities != nil
	var empty, named []string
	for _, l := range []struct {
		name   string
		absent bool
		n      int
	}{
		{pf.pfx + "Endpoints", pf.endpoints == nil, len(pf.endpoints)},
		{pf.pfx + "CIDR", pf.cidr == nil, len(pf.cidr)},
		{pf.pfx + "CIDRSet", pf.cidrSet == nil, len(pf.cidrSet)},
		{pf.pfx + "Entities", pf.entities == nil, len(pf.entities)},
	} {
		switch {
		case l.n > 0:
			named = append(named, l.name)
		case !l.absent:
			empty = append(empty, l.name)
		}
	}
	if len(empty) > 0 && len(named) > 0 {
		return nil, errAt(field, ErrInvalid, "`%s: []` selects no peer, which would leave %s without effect; remove the empty list, or write it as a rule of its own",
			empty[0], strings.Join(named, " and "))
	}
	var kinds []string
	if len(pf.endpoints) > 0 {
		kinds = append(kinds, pf.pfx+"Endpoints")
	}
	if len(pf.cidr)+len(pf.cidrSet) > 0 {
		kinds = append(kinds, pf.pfx+"CIDR")
	}
	if len(pf.entities) > 0 {
		kinds = append(kinds, pf.pfx+"Entities")
	}
	if len(kinds) > 1 {
		return nil, errAt(field, ErrUnsupported, "combining %s in one rule is not supported (as in Cilium); write one rule per peer kind", strings.Join(kinds, " and "))
	}
	for i := range pf.endpoints {
		sel, err := compileSelector(&pf.endpoints[i], fmt.Sprintf("%s.%sEndpoints[%d]", field, pf.pfx, i))
		if err != nil {
			return nil, err
		}
		s.peers = append(s.peers, &peerSel{key: "ep:" + sel.key, kind: peerEndpoints, sel: sel})
	}
	for i, c := range pf.cidr {
		p, err := parsePrefix(c)
		if err != nil {
			return nil, nest(fmt.Sprintf("%s.%sCIDR[%d]", field, pf.pfx, i), err)
		}
		s.peers = append(s.peers, cidrPeer(p, nil))
	}
	for i, c := range pf.cidrSet {
		f := fmt.Sprintf("%s.%sCIDRSet[%d]", field, pf.pfx, i)
		p, err := parsePrefix(c.CIDR)
		if err != nil {
			return nil, nest(f+".cidr", err)
		}
		var ex []netip.Prefix
		for j, e := range c.Except {
			q, err := parsePrefix(e)
			if err != nil {
				return nil, nest(fmt.Sprintf("%s.except[%d]", f, j), err)
			}
			if !inside(q, p) || q.Bits() == p.Bits() {
				return nil, errAt(fmt.Sprintf("%s.except[%d]", f, j), ErrInvalid, "%s is not a strict part of %s", q, p)
			}
			ex = append(ex, q)
		}
		s.peers = append(s.peers, cidrPeer(p, ex))
	}
	for i, e := range pf.entities {
		f := fmt.Sprintf("%s.%sEntities[%d]", field, pf.pfx, i)
		switch e {
		case "all":
			s.wildcard = true
		case "none":
			// Selects nothing, as in Cilium.
		case "cluster":
			s.peers = append(s.peers, &peerSel{key: "entity:cluster", kind: peerCluster})
		case "world":
			s.peers = append(s.peers, &peerSel{key: "entity:world", kind: peerWorld})
		case "host", "remote-node", "health", "init", "unmanaged", "ingress":
			id, _ := identity.ReservedByName(e)
			s.peers = append(s.peers, &peerSel{key: "id:" + strconv.FormatUint(uint64(id), 10), kind: peerReserved, id: id})
		case "world-ipv4", "world-ipv6", "kube-apiserver":
			return nil, errAt(f, ErrUnsupported, "entity %q is not supported; use host, remote-node, world, cluster or all", e)
		default:
			return nil, errAt(f, ErrInvalid, "entity %q; use host, remote-node, world, cluster, all, none, health, init, unmanaged or ingress", e)
		}
	}
	if len(ports) > 0 && len(icmps) > 0 {
		return nil, errAt(field, ErrInvalid, "toPorts and icmps in one rule; as in Cilium, write a separate rule for each")
	}
	for i, pr := range ports {
		f := fmt.Sprintf("%s.toPorts[%d].ports", field, i)
		if len(pr.Ports) == 0 {
			return nil, errAt(f, ErrInvalid, "is empty; list at least one port")
		}
		if len(pr.Ports) > maxPorts {
			return nil, errAt(f, ErrInvalid, "has %d ports; at most %d fit in one toPorts entry (as in Cilium): split them over several toPorts entries", len(pr.Ports), maxPorts)
		}
		for j, pp := range pr.Ports {
			rs, err := compilePort(pp)
			if err != nil {
				return nil, nest(fmt.Sprintf("%s[%d]", f, j), err)
			}
			s.ports = append(s.ports, rs...)
		}
	}
	for i, ic := range icmps {
		f := fmt.Sprintf("%s.icmps[%d].fields", field, i)
		if len(ic.Fields) == 0 {
			return nil, errAt(f, ErrInvalid, "is empty; list at least one ICMP type")
		}
		if len(ic.Fields) > maxICMPFields {
			return nil, errAt(f, ErrInvalid, "has %d ICMP types; at most %d fit in one icmps entry (as in Cilium): split them over several icmps entries", len(ic.Fields), maxICMPFields)
		}
		for j, fl := range ic.Fields {
			r, err := compileICMP(fl)
			if err != nil {
				return nil, nest(fmt.Sprintf("%s[%d]", f, j), err)
			}
			s.ports = append(s.ports, r)
		}
	}
	hasL4 := len(ports)+len(icmps) > 0
	if !present && hasL4 {
		// Ports without peer lists apply to every peer (Cilium's L4-only
		// rule). A present but empty list is not that: it selects no one.
		s.wildcard = true
	}
	if !hasL4 && (s.wildcard || len(s.peers) > 0) {
		s.ports = []portRange{{}}
	}
	if s.wildcard {
		s.peers = nil
	}
	s.ports = dedupPorts(s.ports)
	s.peers = dedupPeers(s.peers)
	sort.Slice(s.peers, func(i, j int) bool { return s.peers[i].key < s.peers[j].key })
	return s, nil
}

// nest puts err, which may already name a field inside field, at field.
func nest(field string, err error) error {
	if fe, ok := err.(*fieldError); ok {
		return &fieldError{field: field + "." + fe.field, err: fe.err}
	}
	return &fieldError{field: field, err: err}
}

func cidrPeer(p netip.Prefix, except []netip.Prefix) *peerSel {
	sort.Slice(except, func(i, j int) bool { return except[i].String() < except[j].String() })
	key := "cidr:" + p.String()
	for _, e := range except {
		key += "!" + e.String()
	}
	return &peerSel{key: key, kind: peerCIDR, prefix: p, except: except}
}

// parsePrefix reads "10.0.0.0/8"; host bits are cleared. A bare address is
// refused, as Cilium refuses it: the prefix length must be written.
func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
		return netip.Prefix{}, fmt.Errorf("%w: %q is an address without a prefix length; write %s/%d", ErrInvalid, s, s, a.BitLen())
	}
	return netip.Prefix{}, fmt.Errorf("%w: %q is not a prefix; write it as 10.0.0.0/8 or 2001:db8::/32", ErrInvalid, s)
}

func dedupPeers(ps []*peerSel) []*peerSel {
	seen := map[string]bool{}
	out := ps[:0]
	for _, p := range ps {
		if !seen[p.key] {
			seen[p.key] = true
			out = append(out, p)
		}
	}
	return out
}

func dedupPorts(ps []portRange) []portRange {
	seen := map[portRange]bool{}
	out := ps[:0]
	for _, p := range ps {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

func compilePort(pp PortProtocol) ([]portRange, error) {
	var port uint64
	if pp.Port != "" {
		v, err := strconv.ParseUint(string(pp.Port), 10, 16)
		if err != nil {
			if _, nerr := strconv.ParseInt(string(pp.Port), 10, 64); nerr != nil {
				return nil, errAt("port", ErrUnsupported, "named port %q is not supported; write the number", pp.Port)
			}
			return nil, errAt("port", ErrInvalid, "%s is out of range 0..65535", pp.Port)
		}
		port = v
	}
	end := uint64(0)
	if pp.EndPort != 0 {
		if pp.EndPort < 0 || pp.EndPort > 65535 {
			return nil, errAt("endPort", ErrInvalid, "%d is out of range 1..65535", pp.EndPort)
		}
		if port == 0 {
			return nil, errAt("endPort", ErrInvalid, "needs a port to start the range")
		}
		if uint64(pp.EndPort) < port {
			return nil, errAt("endPort", ErrInvalid, "%d is below port %d", pp.EndPort, port)
		}
		if uint64(pp.EndPort) > port {
			end = uint64(pp.EndPort)
		}
	}
	r := portRange{port: uint16(port), endPort: uint16(end)}
	switch strings.ToUpper(pp.Protocol) {
	case "", "ANY":
		if port == 0 {
			return []portRange{r}, nil
		}
		var out []portRange
		for _, p := range []uint8{ProtoTCP, ProtoUDP, ProtoSCTP} {
			r.proto = p
			out = append(out, r)
		}
		return out, nil
	case "TCP":
		r.proto = ProtoTCP
	case "UDP":
		r.proto = ProtoUDP
	case "SCTP":
		r.proto = ProtoSCTP
	case "ICMP", "ICMPV6":
		r.proto = ProtoICMP
		if strings.ToUpper(pp.Protocol) == "ICMPV6" {
			r.proto = ProtoICMPv6
		}
		if end != 0 || port > 255 {
			return nil, errAt("port", ErrInvalid, "for %s the port is an ICMP type 0..255 without endPort", pp.Protocol)
		}
	default:
		return nil, errAt("protocol", ErrInvalid, "%q; use TCP, UDP, SCTP, ICMP, ICMPv6 or ANY", pp.Protocol)
	}
	return []portRange{r}, nil
}

var icmpNames = map[uint8]map[string]uint8{
	ProtoICMP: {
		"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "EchoRequest": 8,
		"RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
		"Timestamp": 13, "TimestampReply": 14, "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
	},
	ProtoICMPv6: {
		"DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
		"EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
		"MulticastListenerDone": 132, "RouterSolicitation": 133, "RouterAdvertisement": 134,
		"NeighborSolicitation": 135, "NeighborAdvertisement": 136, "RedirectMessage": 137,
	},
}

func compileICMP(f ICMPField) (portRange, error) {
	r := portRange{proto: ProtoICMP}
	switch f.Family {
	case "", "IPv4":
	case "IPv6":
		r.proto = ProtoICMPv6
	default:
		return r, errAt("family", ErrInvalid, "%q; use IPv4 or IPv6", f.Family)
	}
	t, err := strconv.ParseUint(string(f.Type), 10, 8)
	if err != nil {
		n, ok := icmpNames[r.proto][string(f.Type)]
		if !ok {
			return r, errAt("type", ErrInvalid, "%q is not an ICMP type of %s (a number 1..255 or a name such as EchoRequest)", f.Type, familyName(r.proto))
		}
		t = uint64(n)
	}
	if t == 0 {
		// The map key's port zero is the wildcard: type 0 would allow every
		// ICMP type. Replies to allowed requests pass by connection tracking.
		return r, errAt("type", ErrUnsupported, "ICMP type 0 cannot be expressed (a zero port is the map's wildcard); replies of allowed echo requests pass through connection tracking")
	}
	r.port = uint16(t)
	return r, nil
}

func familyName(proto uint8) string {
	if proto == ProtoICMPv6 {
		return "IPv6"
	}
	return "IPv4"
}
