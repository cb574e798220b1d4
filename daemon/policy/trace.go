package policy

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/rackwire/rackwire/daemon/identity"
)

// Subject is one end of a traced connection: exactly one of an endpoint id
// of this host (Endpoint > 0), an address (resolved through
// Options.IPLookup) or a label set (no endpoint has to exist).
type Subject struct {
	Endpoint uint16          `json:"endpoint,omitempty"`
	IP       netip.Addr      `json:"ip,omitzero"`
	Labels   identity.Labels `json:"labels,omitempty"`
}

// Side verdicts of a TraceResult.
const (
	VerdictAllowed         = "allowed"
	VerdictDenied          = "denied"            // overall only
	VerdictDeniedByDefault = "denied-by-default" // selected, nothing allows it
	VerdictDeniedByRule    = "denied-by-rule"    // a deny rule matches
	VerdictOpen            = "open"              // no policy selects this side
)

// TraceResult explains whether a connection src -> dst:dport/proto passes.
type TraceResult struct {
	Verdict string          `json:"verdict"` // "allowed" or "denied"
	Src     ResolvedSubject `json:"src"`
	Dst     ResolvedSubject `json:"dst"`
	DPort   uint16          `json:"dport"`
	Proto   uint8           `json:"proto"`
	// Egress is the source's egress side, Ingress the destination's.
	Egress  SideResult `json:"egress"`
	Ingress SideResult `json:"ingress"`
}

// ResolvedSubject is a Subject as the engine understood it.
type ResolvedSubject struct {
	Kind     string `json:"kind"` // endpoint, workload, reserved, cidr, world
	Identity uint32 `json:"identity"`
	Labels   string `json:"labels"`
	Endpoint uint16 `json:"endpoint,omitempty"`
	IP       string `json:"ip,omitempty"`
}

// SideResult is the verdict of one side and the rule that decided it.
type SideResult struct {
	Verdict string `json:"verdict"`
	Source  string `json:"source,omitempty"`
	Policy  string `json:"policy,omitempty"`
	// Rule is the deciding rule's path in the document, e.g.
	// "spec.ingress[0]"; RuleIndex is the spec index (-1 if none).
	Rule      string `json:"rule,omitempty"`
	RuleIndex int    `json:"rule_index"`
	Audit     bool   `json:"audit,omitempty"` // the endpoint is in audit mode: a deny is only reported
	Reason    string `json:"reason"`
}

type traced struct {
	res    ResolvedSubject
	peer   peer
	labels identity.Labels // what endpointSelector is matched against
	local  bool            // a workload whose policy applies
	audit  bool
}

// Trace evaluates the policies in force for a connection from src to dst
// on dport (the ICMP type for ICMP) and proto.
func (e *Engine) Trace(src, dst Subject, dport uint16, proto uint8) (TraceResult, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s, err := e.resolve(src)
	if err != nil {
		return TraceResult{}, fmt.Errorf("resolve source: %w", err)
	}
	d, err := e.resolve(dst)
	if err != nil {
		return TraceResult{}, fmt.Errorf("resolve destination: %w", err)
	}
	r := TraceResult{Src: s.res, Dst: d.res, DPort: dport, Proto: proto}
	r.Egress = e.side(s, &d.peer, Egress, dport, proto)
	r.Ingress = e.side(d, &s.peer, Ingress, dport, proto)
	r.Verdict = VerdictDenied
	if passes(r.Egress) && passes(r.Ingress) {
		r.Verdict = VerdictAllowed
	}
	return r, nil
}

func passes(s SideResult) bool { return s.Verdict == VerdictAllowed || s.Verdict == VerdictOpen }

func (e *Engine) resolve(s Subject) (traced, error) {
	var t traced
	switch {
	case s.Endpoint != 0:
		ep, ok := e.endpoints[s.Endpoint]
		if !ok {
			return t, fmt.Errorf("endpoint %d does not exist on this host", s.Endpoint)
		}
		t.peer = peer{id: ep.identity, labels: ep.labels}
		if p, ok := e.identities[ep.identity]; ok {
			t.peer = *p
		}
		t.labels, t.local, t.audit = ep.labels, true, ep.audit
		t.res = ResolvedSubject{Kind: "endpoint", Identity: uint32(ep.identity), Labels: ep.labels.CLI(), Endpoint: ep.id}
		return t, nil
	case s.IP.IsValid():
		id := identity.World
		if e.lookup != nil {
			if v, ok := e.lookup(s.IP.Unmap()); ok {
				id = v
			}
		}
		t.peer = peer{id: id, labels: identity.ReservedLabels(id)}
		if p, ok := e.identities[id]; ok {
			t.peer = *p
		}
		t.labels = t.peer.labels
		t.res = ResolvedSubject{Identity: uint32(id), Labels: t.peer.labels.CLI(), IP: s.IP.String()}
	default:
		t.labels = s.Labels
		t.peer = e.peerOf(s.Labels)
		t.res = ResolvedSubject{Identity: uint32(t.peer.id), Labels: s.Labels.CLI()}
		if p, ok := e.identities[t.peer.id]; !ok || !p.labels.Equal(s.Labels) {
			t.res.Identity = 0 // no identity allocated for these labels (yet)
		}
	}
	switch id := t.peer.id; {
	case id == identity.World:
		t.res.Kind = "world"
	case id.IsReserved():
		t.res.Kind = "reserved"
	case id.IsLocal():
		t.res.Kind = "cidr"
	default:
		t.res.Kind, t.local = "workload", true
	}
	return t, nil
}

// peerOf classifies a label set given without an identity.
func (e *Engine) peerOf(ls identity.Labels) peer {
	for _, p := range e.identities {
		if p.labels.Equal(ls) {
			return *p
		}
	}
	if pfx, ok := CIDRFromLabels(ls); ok {
		return peer{id: identity.LocalMax, labels: ls, prefix: pfx}
	}
	for _, l := range ls {
		if name, ok := strings.CutPrefix(l.Key, "reserved:"); ok {
			if id, ok := identity.ReservedByName(name); ok {
				return peer{id: id, labels: ls}
			}
		}
	}
	// A workload whose labels have no identity yet: any cluster identity
	// number classifies it the same.
	return peer{id: identity.Make(255, identity.ClusterLocalMax), labels: ls}
}

type ruleRef struct {
	source string
	pol    string
	r      *rule
}

// side evaluates the policy of subject s towards peer p in direction dir.
func (e *Engine) side(s traced, p *peer, dir uint8, dport uint16, proto uint8) SideResult {
	if !s.local {
		return SideResult{Verdict: VerdictOpen, RuleIndex: -1, Reason: "not a workload: no policy applies to it"}
	}
	var refs []ruleRef
	for src, m := range e.sources {
		for name, c := range m {
			for _, r := range c.rules {
				if r.subject.matches(s.labels) {
					refs = append(refs, ruleRef{src, name, r})
				}
			}
		}
	}
	sort.Slice(refs, func(i, j int) bool {
		a, b := refs[i], refs[j]
		if a.source != b.source {
			return a.source < b.source
		}
		if a.pol != b.pol {
			return a.pol < b.pol
		}
		return a.r.index < b.r.index
	})
	selected := false
	var allow *section
	var allowRef ruleRef
	for _, ref := range refs {
		for _, sec := range ref.r.sections {
			if sec.dir != dir {
				continue
			}
			selected = true
			if !sec.matches(p, dport, proto) {
				continue
			}
			if sec.deny {
				return SideResult{Verdict: VerdictDeniedByRule, Source: ref.source, Policy: ref.pol,
					Rule: ref.r.path + "." + sec.field, RuleIndex: ref.r.index, Audit: s.audit,
					Reason: "a deny rule matches; deny beats allow"}
			}
			if allow == nil {
				allow, allowRef = sec, ref
			}
		}
	}
	switch {
	case !selected:
		return SideResult{Verdict: VerdictOpen, RuleIndex: -1, Reason: "no policy selects this endpoint in this direction"}
	case allow != nil:
		return SideResult{Verdict: VerdictAllowed, Source: allowRef.source, Policy: allowRef.pol,
			Rule: allowRef.r.path + "." + allow.field, RuleIndex: allowRef.r.index, Reason: "an allow rule matches"}
	}
	return SideResult{Verdict: VerdictDeniedByDefault, RuleIndex: -1, Audit: s.audit,
		Reason: "selected by a policy in this direction and no rule allows it"}
}

func (s *section) matches(p *peer, dport uint16, proto uint8) bool {
	hit := s.wildcard
	for _, ps := range s.peers {
		if hit {
			break
		}
		hit = ps.matches(p)
	}
	if !hit {
		return false
	}
	for _, pr := range s.ports {
		if pr.matches(dport, proto) {
			return true
		}
	}
	return false
}

// ParsePortProto reads "80/tcp", "53/udp", "8/icmp", "128/icmpv6",
// "0/any" or "80" (TCP).
func ParsePortProto(s string) (uint16, uint8, error) {
	ps, prs, _ := strings.Cut(s, "/")
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil {
		return 0, 0, fmt.Errorf("%w: port %q; write e.g. 80/tcp", ErrInvalid, ps)
	}
	proto := ProtoTCP
	switch strings.ToLower(prs) {
	case "", "tcp":
	case "udp":
		proto = ProtoUDP
	case "sctp":
		proto = ProtoSCTP
	case "icmp":
		proto = ProtoICMP
	case "icmpv6":
		proto = ProtoICMPv6
	case "any":
		proto = ProtoAny
	default:
		return 0, 0, fmt.Errorf("%w: protocol %q; use tcp, udp, sctp, icmp, icmpv6 or any", ErrInvalid, prs)
	}
	return uint16(port), proto, nil
}
