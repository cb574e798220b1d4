package policy

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"

	"github.com/rackwire/rackwire/daemon/identity"
)

// Entry is one desired policy map entry of an endpoint. Zero in Identity,
// Port or Proto is a wildcard; EndPort > 0 makes Port..EndPort a range.
type Entry struct {
	Identity  uint32 `json:"identity"`
	Direction uint8  `json:"direction"` // Ingress or Egress
	Proto     uint8  `json:"proto"`
	Port      uint16 `json:"port"`
	EndPort   uint16 `json:"end_port,omitempty"`
	Deny      bool   `json:"deny,omitempty"`
}

// Key is an Entry without its verdict: what the map is keyed by (plus the
// range end).
type Key struct {
	Identity  uint32
	Direction uint8
	Proto     uint8
	Port      uint16
	EndPort   uint16
}

// Key returns the entry's key.
func (e Entry) Key() Key { return Key{e.Identity, e.Direction, e.Proto, e.Port, e.EndPort} }

func (k Key) entry(deny bool) Entry {
	return Entry{Identity: k.Identity, Direction: k.Direction, Proto: k.Proto, Port: k.Port, EndPort: k.EndPort, Deny: deny}
}

// EndpointChange is what changed in one endpoint's map since the previous
// call to Changes. Apply Add before Delete: an entry that both the old and
// the new policy allow is never missing in between.
type EndpointChange struct {
	Endpoint uint16 `json:"endpoint"`
	// Removed: the endpoint is gone; drop its map.
	Removed bool `json:"removed,omitempty"`
	// Full: Add is the complete content (a new endpoint, or one that was
	// removed and added again since the last report); after adding,
	// remove every entry not in Add.
	Full   bool    `json:"full,omitempty"`
	Audit  bool    `json:"audit"`
	Add    []Entry `json:"add,omitempty"` // new entries, and entries whose Deny flipped
	Delete []Entry `json:"delete,omitempty"`
}

// Options configure an Engine.
type Options struct {
	// IPLookup resolves an address to its identity (the ipcache) for
	// Trace; nil makes every address resolve to world.
	IPLookup func(netip.Addr) (identity.ID, bool)
}

// Engine computes desired policy map entries. It is safe for concurrent
// use; one mutex guards all of its state.
type Engine struct {
	log    *slog.Logger
	lookup func(netip.Addr) (identity.ID, bool)

	mu         sync.Mutex                      // guards every field below
	sources    map[string]map[string]*compiled // source -> policy name -> policy
	identities map[identity.ID]*peer
	index      map[string]map[identity.ID]struct{} // "k=v" -> identities with that label
	local      map[identity.ID]struct{}            // host-local (CIDR) identities
	sels       map[string]*cachedSel               // peer selector key -> matching identities
	endpoints  map[uint16]*endpoint
	cidrs      map[netip.Prefix]int // prefixes the policies name, with use counts
	dirty      map[uint16]*dirtyEP
	reported   map[uint16]bool // endpoints Changes has reported and not removed
}

// cachedSel is one distinct peer selector, the identities it matches, and
// the sections that use it.
type cachedSel struct {
	ps    *peerSel
	ids   map[identity.ID]struct{}
	users map[*section]struct{}
}

type counts struct{ allow, deny int32 }

type endpoint struct {
	id       uint16
	identity identity.ID
	labels   identity.Labels
	audit    bool
	rules    map[*rule]struct{}
	selected [2]int // rule sections selecting the endpoint, per direction
	// contrib counts, per key, the (section, peer selector, identity,
	// port) combinations that produce it, so that additions and removals
	// can be applied in any order.
	contrib map[Key]counts
}

type state uint8

const (
	absent state = iota
	allowed
	denied
)

type dirtyEP struct {
	full  bool
	audit bool          // the audit flag changed
	orig  map[Key]state // effective state as last reported, for touched keys
}

// New returns an empty engine that knows the reserved identities.
func New(log *slog.Logger, opts Options) *Engine {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Engine{
		log:        log.With("subsys", "policy"),
		lookup:     opts.IPLookup,
		sources:    map[string]map[string]*compiled{},
		identities: map[identity.ID]*peer{},
		index:      map[string]map[identity.ID]struct{}{},
		local:      map[identity.ID]struct{}{},
		sels:       map[string]*cachedSel{},
		endpoints:  map[uint16]*endpoint{},
		cidrs:      map[netip.Prefix]int{},
		dirty:      map[uint16]*dirtyEP{},
		reported:   map[uint16]bool{},
	}
	for id := range identity.Reserved() {
		e.upsertIdentity(id, identity.ReservedLabels(id))
	}
	return e
}

// ---- policies ----

// SetPolicies replaces every policy of source (a file path, "store", ...)
// with ps; an empty ps removes the source. Either all of ps is taken or,
// on error, nothing changes. Only endpoints selected by a policy that
// changed are recomputed.
func (e *Engine) SetPolicies(source string, ps []Policy) error {
	next := map[string]*compiled{}
	for i := range ps {
		c, err := compileCanon(source, &ps[i])
		if err != nil {
			return err
		}
		if _, dup := next[c.name]; dup {
			return fmt.Errorf("set policies of %s: %w: policy name %q given twice", source, ErrInvalid, c.name)
		}
		next[c.name] = c
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.sources[source]
	affected := map[*endpoint]struct{}{}
	for name, old := range cur {
		if n, ok := next[name]; ok && n.canon == old.canon {
			next[name] = old
			continue
		}
		e.removePolicy(old, affected)
	}
	for name, c := range next {
		if old, ok := cur[name]; ok && old == c {
			continue
		}
		e.addPolicy(c, affected)
	}
	if len(next) == 0 {
		delete(e.sources, source)
	} else {
		e.sources[source] = next
	}
	e.recomputeAll(affected)
	e.log.Debug("policies set", "source", source, "policies", len(next), "endpoints_affected", len(affected))
	return nil
}

// UpsertPolicy adds or replaces one policy of source.
func (e *Engine) UpsertPolicy(source string, p Policy) error {
	c, err := compileCanon(source, &p)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	m := e.sources[source]
	if m == nil {
		m = map[string]*compiled{}
		e.sources[source] = m
	}
	affected := map[*endpoint]struct{}{}
	if old, ok := m[c.name]; ok {
		if old.canon == c.canon {
			return nil
		}
		e.removePolicy(old, affected)
	}
	m[c.name] = c
	e.addPolicy(c, affected)
	e.recomputeAll(affected)
	return nil
}

// DeletePolicy removes one policy of source and reports whether it existed.
func (e *Engine) DeletePolicy(source, name string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	old, ok := e.sources[source][name]
	if !ok {
		return false
	}
	affected := map[*endpoint]struct{}{}
	e.removePolicy(old, affected)
	delete(e.sources[source], name)
	if len(e.sources[source]) == 0 {
		delete(e.sources, source)
	}
	e.recomputeAll(affected)
	return true
}

// Listed is a policy in force and the source it came from.
type Listed struct {
	Source string `json:"source"`
	Policy Policy `json:"policy"`
}

// Policies returns the policies in force, by source then name.
func (e *Engine) Policies() []Listed {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []Listed
	for src, m := range e.sources {
		for _, c := range m {
			out = append(out, Listed{Source: src, Policy: c.doc})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Source != out[j].Source {
			return out[i].Source < out[j].Source
		}
		return out[i].Policy.Metadata.Name < out[j].Policy.Metadata.Name
	})
	return out
}

// CIDRPrefixes returns every prefix the policies in force name (CIDR
// rules and their except carve-outs, but not /0, which is world). The
// daemon allocates a host-local identity for each (labels CIDRLabels),
// upserts it here and puts prefix -> identity in the ipcache.
func (e *Engine) CIDRPrefixes() []netip.Prefix {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]netip.Prefix, 0, len(e.cidrs))
	for p := range e.cidrs {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Addr().Compare(out[j].Addr()); c != 0 {
			return c < 0
		}
		return out[i].Bits() < out[j].Bits()
	})
	return out
}

func compileCanon(source string, p *Policy) (*compiled, error) {
	c, err := compile(source, p)
	if err != nil {
		return nil, fmt.Errorf("policy %q: %w", p.Metadata.Name, err)
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("policy %q: encode: %w", p.Metadata.Name, err)
	}
	c.canon = string(b)
	return c, nil
}

func (e *Engine) addPolicy(c *compiled, affected map[*endpoint]struct{}) {
	for _, r := range c.rules {
		r.eps = map[uint16]*endpoint{}
		for _, ep := range e.endpoints {
			if r.subject.matches(ep.labels) {
				r.eps[ep.id] = ep
				ep.rules[r] = struct{}{}
				affected[ep] = struct{}{}
			}
		}
		for _, s := range r.sections {
			for i, ps := range s.peers {
				s.peers[i] = e.intern(ps, s)
			}
		}
	}
}

func (e *Engine) removePolicy(c *compiled, affected map[*endpoint]struct{}) {
	for _, r := range c.rules {
		for _, ep := range r.eps {
			delete(ep.rules, r)
			affected[ep] = struct{}{}
		}
		r.eps = nil
		for _, s := range r.sections {
			for _, ps := range s.peers {
				e.unintern(ps, s)
			}
		}
	}
}

// intern returns the shared selector with ps's key, creating and filling it
// on first use.
func (e *Engine) intern(ps *peerSel, s *section) *peerSel {
	cs, ok := e.sels[ps.key]
	if !ok {
		cs = &cachedSel{ps: ps, ids: map[identity.ID]struct{}{}, users: map[*section]struct{}{}}
		e.sels[ps.key] = cs
		e.fill(cs)
		if ps.kind == peerCIDR {
			for _, p := range append([]netip.Prefix{ps.prefix}, ps.except...) {
				if p.Bits() > 0 {
					e.cidrs[p]++
				}
			}
		}
	}
	cs.users[s] = struct{}{}
	return cs.ps
}

func (e *Engine) unintern(ps *peerSel, s *section) {
	cs, ok := e.sels[ps.key]
	if !ok {
		return
	}
	delete(cs.users, s)
	if len(cs.users) > 0 {
		return
	}
	delete(e.sels, ps.key)
	if ps.kind == peerCIDR {
		for _, p := range append([]netip.Prefix{ps.prefix}, ps.except...) {
			if p.Bits() > 0 {
				if e.cidrs[p]--; e.cidrs[p] <= 0 {
					delete(e.cidrs, p)
				}
			}
		}
	}
}

// fill computes the identities a new selector matches, looking only at
// likely candidates where the selector allows it.
func (e *Engine) fill(cs *cachedSel) {
	try := func(id identity.ID) {
		if p, ok := e.identities[id]; ok && cs.ps.matches(p) {
			cs.ids[id] = struct{}{}
		}
	}
	switch ps := cs.ps; ps.kind {
	case peerReserved:
		try(ps.id)
		return
	case peerCIDR, peerWorld:
		try(identity.World)
		for id := range e.local {
			try(id)
		}
		return
	case peerEndpoints:
		var best []string
		bestN := -1
		for _, r := range ps.sel.reqs {
			if r.op != opIn {
				continue
			}
			n := 0
			for _, v := range r.values {
				n += len(e.index[r.key+"="+v])
			}
			if bestN < 0 || n < bestN {
				bestN, best = n, nil
				for _, v := range r.values {
					best = append(best, r.key+"="+v)
				}
			}
		}
		if bestN >= 0 {
			for _, kv := range best {
				for id := range e.index[kv] {
					try(id)
				}
			}
			return
		}
	}
	for id := range e.identities {
		try(id)
	}
}

// ---- identities ----

// UpsertIdentity adds an identity or changes its labels. Every endpoint
// whose rules select it gains (or loses) the entries for it. A host-local
// identity (identity.LocalMin..LocalMax) is a CIDR identity when its labels
// come from CIDRLabels.
func (e *Engine) UpsertIdentity(id identity.ID, labels identity.Labels) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.upsertIdentity(id, labels)
}

// DeleteIdentity removes an identity and the entries for it.
func (e *Engine) DeleteIdentity(id identity.ID) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.deleteIdentity(id)
}

func (e *Engine) upsertIdentity(id identity.ID, labels identity.Labels) {
	if old, ok := e.identities[id]; ok {
		if old.labels.Equal(labels) {
			return
		}
		e.deleteIdentity(id)
	}
	p := &peer{id: id, labels: append(identity.Labels(nil), labels...)}
	if id.IsLocal() {
		p.prefix, _ = CIDRFromLabels(labels)
		e.local[id] = struct{}{}
	}
	e.identities[id] = p
	for _, l := range labels {
		kv := l.Key + "=" + l.Value
		m := e.index[kv]
		if m == nil {
			m = map[identity.ID]struct{}{}
			e.index[kv] = m
		}
		m[id] = struct{}{}
	}
	for _, cs := range e.sels {
		if cs.ps.matches(p) {
			cs.ids[id] = struct{}{}
			e.apply(cs, id, +1)
		}
	}
}

func (e *Engine) deleteIdentity(id identity.ID) {
	p, ok := e.identities[id]
	if !ok {
		return
	}
	for _, cs := range e.sels {
		if _, ok := cs.ids[id]; ok {
			delete(cs.ids, id)
			e.apply(cs, id, -1)
		}
	}
	for _, l := range p.labels {
		kv := l.Key + "=" + l.Value
		delete(e.index[kv], id)
		if len(e.index[kv]) == 0 {
			delete(e.index, kv)
		}
	}
	delete(e.local, id)
	delete(e.identities, id)
}

// apply adds (delta +1) or removes (-1) the entries identity id produces
// through selector cs in every endpoint that uses it.
func (e *Engine) apply(cs *cachedSel, id identity.ID, delta int32) {
	for s := range cs.users {
		for _, ep := range s.rule.eps {
			for _, pr := range s.ports {
				e.bump(ep, Key{uint32(id), s.dir, pr.proto, pr.port, pr.endPort}, s.deny, delta)
			}
		}
	}
}

func (e *Engine) bump(ep *endpoint, k Key, deny bool, delta int32) {
	e.touch(ep, k)
	c := ep.contrib[k]
	if deny {
		c.deny += delta
	} else {
		c.allow += delta
	}
	if c == (counts{}) {
		delete(ep.contrib, k)
	} else {
		ep.contrib[k] = c
	}
}

// ---- endpoints ----

// UpsertEndpoint adds a local endpoint or changes its identity, labels
// (the ones endpointSelector matches: pass the identity-relevant labels, the
// same the identity was derived from, so that a policy selects an endpoint
// exactly when its peers' selectors would select its identity) or audit
// flag.
func (e *Engine) UpsertEndpoint(epID uint16, id identity.ID, labels identity.Labels, audit bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ep, ok := e.endpoints[epID]
	if ok && ep.labels.Equal(labels) {
		ep.identity = id
		if ep.audit != audit {
			ep.audit = audit
			e.dirtyFor(ep).audit = true
		}
		return
	}
	if ok {
		// Relabelled: same map, reported as a difference.
		e.detach(ep)
		ep.identity, ep.labels, ep.rules = id, append(identity.Labels(nil), labels...), map[*rule]struct{}{}
		if ep.audit != audit {
			ep.audit = audit
			e.dirtyFor(ep).audit = true
		}
	} else {
		ep = &endpoint{id: epID, identity: id, labels: append(identity.Labels(nil), labels...), audit: audit,
			rules: map[*rule]struct{}{}, contrib: map[Key]counts{}}
		e.endpoints[epID] = ep
		e.dirty[epID] = &dirtyEP{full: true}
	}
	for _, m := range e.sources {
		for _, c := range m {
			for _, r := range c.rules {
				if r.subject.matches(ep.labels) {
					r.eps[epID] = ep
					ep.rules[r] = struct{}{}
				}
			}
		}
	}
	e.recompute(ep)
}

// DeleteEndpoint forgets a local endpoint.
func (e *Engine) DeleteEndpoint(epID uint16) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ep, ok := e.endpoints[epID]
	if !ok {
		return
	}
	e.detach(ep)
	delete(e.endpoints, epID)
	e.dirty[epID] = &dirtyEP{full: true}
}

func (e *Engine) detach(ep *endpoint) {
	for r := range ep.rules {
		delete(r.eps, ep.id)
	}
}

func (e *Engine) recomputeAll(affected map[*endpoint]struct{}) {
	for ep := range affected {
		if e.endpoints[ep.id] == ep {
			e.recompute(ep)
		}
	}
}

// recompute rebuilds one endpoint's entries from its rules.
func (e *Engine) recompute(ep *endpoint) {
	next := make(map[Key]counts, len(ep.contrib))
	var sel [2]int
	for r := range ep.rules {
		for _, s := range r.sections {
			sel[s.dir]++
			add := func(id identity.ID) {
				for _, pr := range s.ports {
					k := Key{uint32(id), s.dir, pr.proto, pr.port, pr.endPort}
					c := next[k]
					if s.deny {
						c.deny++
					} else {
						c.allow++
					}
					next[k] = c
				}
			}
			if s.wildcard {
				add(0)
			}
			for _, ps := range s.peers {
				for id := range e.sels[ps.key].ids {
					add(id)
				}
			}
		}
	}
	if d := e.dirtyFor(ep); !d.full {
		for k := range ep.contrib {
			e.touch(ep, k)
		}
		for k := range next {
			e.touch(ep, k)
		}
		e.touch(ep, Key{Direction: Ingress})
		e.touch(ep, Key{Direction: Egress})
	}
	ep.contrib, ep.selected = next, sel
}

// eff is the effective state of key k in ep's map.
func (ep *endpoint) eff(k Key) state {
	if ep.selected[k.Direction] == 0 {
		if k == (Key{Direction: k.Direction}) {
			return allowed
		}
		return absent
	}
	c, ok := ep.contrib[k]
	switch {
	case !ok:
		return absent
	case c.deny > 0:
		return denied
	case c.allow > 0:
		return allowed
	}
	return absent
}

func (e *Engine) dirtyFor(ep *endpoint) *dirtyEP {
	d, ok := e.dirty[ep.id]
	if !ok {
		d = &dirtyEP{orig: map[Key]state{}}
		e.dirty[ep.id] = d
	}
	return d
}

// touch remembers k's effective state before a change, once per report.
func (e *Engine) touch(ep *endpoint, k Key) {
	d := e.dirtyFor(ep)
	if d.full {
		return
	}
	if _, ok := d.orig[k]; !ok {
		d.orig[k] = ep.eff(k)
	}
}

// ---- output ----

// Desired returns the complete entry list of an endpoint, sorted, and
// whether the endpoint exists.
func (e *Engine) Desired(epID uint16) ([]Entry, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ep, ok := e.endpoints[epID]
	if !ok {
		return nil, false
	}
	return ep.desired(), true
}

// Audit reports whether an endpoint is in audit mode.
func (e *Engine) Audit(epID uint16) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	ep, ok := e.endpoints[epID]
	return ok && ep.audit
}

func (ep *endpoint) desired() []Entry {
	var out []Entry
	for d := uint8(0); d < 2; d++ {
		if ep.selected[d] == 0 {
			out = append(out, Entry{Direction: d})
		}
	}
	for k, c := range ep.contrib {
		if ep.selected[k.Direction] > 0 && (c.allow > 0 || c.deny > 0) {
			out = append(out, k.entry(c.deny > 0))
		}
	}
	sortEntries(out)
	return out
}

func sortEntries(es []Entry) {
	sort.Slice(es, func(i, j int) bool {
		a, b := es[i], es[j]
		if a.Direction != b.Direction {
			return a.Direction < b.Direction
		}
		if a.Identity != b.Identity {
			return a.Identity < b.Identity
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		if a.Port != b.Port {
			return a.Port < b.Port
		}
		return a.EndPort < b.EndPort
	})
}

// Changes returns, per endpoint, what changed since the previous call,
// sorted by endpoint, and starts a new round.
func (e *Engine) Changes() []EndpointChange {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []EndpointChange
	for id, d := range e.dirty {
		ep, exists := e.endpoints[id]
		switch {
		case !exists:
			if e.reported[id] {
				out = append(out, EndpointChange{Endpoint: id, Removed: true})
				delete(e.reported, id)
			}
		case d.full || !e.reported[id]:
			out = append(out, EndpointChange{Endpoint: id, Full: true, Audit: ep.audit, Add: ep.desired()})
			e.reported[id] = true
		default:
			ch := EndpointChange{Endpoint: id, Audit: ep.audit}
			for k, was := range d.orig {
				now := ep.eff(k)
				switch {
				case now == was:
				case now == absent:
					ch.Delete = append(ch.Delete, k.entry(was == denied))
				default:
					ch.Add = append(ch.Add, k.entry(now == denied))
				}
			}
			if len(ch.Add)+len(ch.Delete) == 0 && !d.audit {
				continue
			}
			sortEntries(ch.Add)
			sortEntries(ch.Delete)
			out = append(out, ch)
		}
	}
	e.dirty = map[uint16]*dirtyEP{}
	sort.Slice(out, func(i, j int) bool { return out[i].Endpoint < out[j].Endpoint })
	return out
}
