// Package policysync moves policy from its sources into the per-endpoint
// policy maps: it feeds the policy engine with identities, endpoints,
// policies (files and the store) and the CIDR identities of the prefixes the
// policies name, and writes every endpoint whose desired entries changed.
//
// What it owns: the engine's inputs as last given, the CIDR identities
// (host-local, allocated here and put in the ipcache through CIDRSink), and
// each endpoint's enforcement state (in force, pending, policy error).
//
// Who changes it: the agent's watches (identities, store policies), the
// policy directory loader, the endpoint manager's Enforcer hooks, and the
// sync loop (Sync, about once a second). The one mutex is never held across
// store I/O: every input arrives as data already read. Map writes (syscalls)
// happen under it, so two writers never interleave on one endpoint.
//
// The rules it keeps (docs/enforcement.md):
//   - Fail closed. A policy that cannot be written in full closes the
//     direction it concerns (ingress kept if it fits, else egress, else
//     both closed); the endpoint is marked "policy-error" with the reason,
//     counted, logged once per change, and retried on every Sync.
//   - Never widen on a partial view. Until both the store's policies and
//     its identities were listed once (a failed list is not an empty one),
//     no map of a restored endpoint is written; a new endpoint is admitted
//     closed ("policy-pending") and gets its policy once both are loaded.
//   - Changes the engine reports are never lost: they accumulate while the
//     gate is shut and are written once it opens.
//
// On restart nothing here survives: the maps are pinned and keep the last
// policy until the gate opens, then every endpoint is compared with the
// engine's result (the datapath swaps only those that differ).
package policysync

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/store"
)

// ErrTooLarge is what a Writer's error wraps when the policy does not fit
// the endpoint's map.
var ErrTooLarge = errors.New("policy does not fit the endpoint's map")

// Writer puts an endpoint's complete entry list in force. It must be atomic:
// on error the map in force is unchanged. A direction with no entry is
// closed.
type Writer interface {
	SetPolicy(ep uint16, entries []policy.Entry) error
}

// CIDRSink receives the CIDR identities of policy prefixes (the ipcache
// owner, at its lowest rank).
type CIDRSink interface {
	SetCIDR(p netip.Prefix, id identity.ID) error
	DeleteCIDR(p netip.Prefix) error
}

// The prefixes of policy.SourceFile and policy.SourceStore.
const (
	sourcePrefixFile  = "file:"
	sourcePrefixStore = "store:"
)

// Endpoint enforcement states, as `endpoint list` shows them.
const (
	StateEnforced = "enforced"       // the computed policy is in the map
	StatePending  = "policy-pending" // admitted closed; waiting for the store's policies and identities
	StateError    = "policy-error"   // could not be written in full; the named directions are closed
)

// Status is one endpoint's enforcement state.
type Status struct {
	State  string   `json:"state"`
	Reason string   `json:"reason,omitempty"`
	Closed []string `json:"closed,omitempty"` // directions closed because of the error
}

// Endpoint is what the engine needs of a local endpoint.
type Endpoint struct {
	ID       uint16
	Name     string
	Identity identity.ID
	Labels   identity.Labels
	Audit    bool
}

type epState struct {
	Endpoint
	status Status
}

// Syncer is the owner described in the package doc.
type Syncer struct {
	log   *slog.Logger
	eng   *policy.Engine
	w     Writer
	sink  CIDRSink
	local *identity.LocalAllocator
	beat  atomic.Int64 // unix nanoseconds of the last completed Sync

	mu sync.Mutex // guards every field below
	// idsLoaded and storeLoaded open the gate (see package doc).
	idsLoaded, storeLoaded bool
	knownIDs               map[identity.ID]string // identities the engine has, by canonical labels
	eps                    map[uint16]*epState
	pending                map[uint16]bool // endpoints whose map must be (re)written
	cidrIDs                map[netip.Prefix]identity.ID
	cidrFailed             map[netip.Prefix]bool
	policyErr              map[string]string // policy source -> why it was refused
	good                   map[string]bool   // sources that loaded at least once in this run
	opened                 bool              // the gate has opened once
	lastSync               time.Time
	syncErr                string
	failing                bool
	writes, writeErrors    uint64
}

// New returns a Syncer writing through w and sending CIDR identities to sink.
func New(eng *policy.Engine, w Writer, sink CIDRSink, log *slog.Logger) *Syncer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Syncer{
		log: log, eng: eng, w: w, sink: sink, local: identity.NewLocalAllocator(),
		knownIDs: map[identity.ID]string{}, eps: map[uint16]*epState{}, pending: map[uint16]bool{},
		cidrIDs: map[netip.Prefix]identity.ID{}, cidrFailed: map[netip.Prefix]bool{}, policyErr: map[string]string{}, good: map[string]bool{},
	}
	s.beat.Store(time.Now().UnixNano())
	return s
}

// Loaded reports whether both the store's policies and its identities have
// been listed, and if not, what is missing.
func (s *Syncer) Loaded() (bool, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loadedLocked()
}

func (s *Syncer) loadedLocked() (bool, string) {
	var miss []string
	if !s.idsLoaded {
		miss = append(miss, "the store's identities")
	}
	if !s.storeLoaded {
		miss = append(miss, "the store's policies")
	}
	if len(miss) > 0 {
		return false, "waiting for " + strings.Join(miss, " and ") + "; policy maps keep their last state, new endpoints stay closed"
	}
	if !s.opened {
		// A source refused before it ever loaded is a policy the agent
		// does not know: opening the maps without it could widen them.
		var bad []string
		for src := range s.policyErr {
			if !s.good[src] {
				bad = append(bad, src)
			}
		}
		if len(bad) > 0 {
			sort.Strings(bad)
			return false, "refused at start with no earlier version in force: " + strings.Join(bad, ", ") +
				" (fix or remove it); policy maps keep their last state, new endpoints stay closed"
		}
		s.opened = true
	}
	return true, ""
}

// SetIdentities makes the engine's cluster identities equal to list (a
// complete list from the store) and marks identities loaded. Identities of
// local endpoints not yet listed are kept.
func (s *Syncer) SetIdentities(list []identity.Identity) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := make(map[identity.ID]bool, len(list))
	for _, id := range list {
		seen[id.ID] = true
		canon := id.Labels.String()
		if s.knownIDs[id.ID] != canon {
			s.eng.UpsertIdentity(id.ID, id.Labels)
			s.knownIDs[id.ID] = canon
		}
	}
	used := map[identity.ID]bool{}
	for _, ep := range s.eps {
		used[ep.Identity] = true
	}
	for id := range s.knownIDs {
		if !seen[id] && !id.IsLocal() && !used[id] {
			s.eng.DeleteIdentity(id)
			delete(s.knownIDs, id)
		}
	}
	if !s.idsLoaded {
		s.log.Info("identities loaded from the store", "identities", len(list))
	}
	s.idsLoaded = true
}

// SetFilePolicies replaces the policies of the policy directory with
// results (one per file). A file that failed to load keeps its previous
// policies; files no longer present lose theirs.
func (s *Syncer) SetFilePolicies(results []policy.FileResult) {
	s.mu.Lock()
	defer s.mu.Unlock()
	present := map[string]bool{}
	for _, r := range results {
		src := policy.SourceFile(r.Path)
		present[src] = true
		if r.Err != nil {
			s.refuse(src, r.Err, "policy file refused; its previous policies stay in force", "file", r.Path)
			continue
		}
		if err := s.eng.SetPolicies(src, r.Policies); err != nil {
			s.refuse(src, err, "policy file refused; its previous policies stay in force", "file", r.Path)
			continue
		}
		delete(s.policyErr, src)
		s.good[src] = true
		s.log.Info("policy file loaded", "file", r.Path, "policies", len(r.Policies))
	}
	s.dropMissing(sourcePrefixFile, present, "policy file removed; its policies are withdrawn")
}

// SetStorePolicies makes the engine's store policies equal to kvs (a
// complete list of the store's policy prefix) and marks them loaded. A
// policy that does not decode or compile is skipped and reported; it does
// not block the others.
func (s *Syncer) SetStorePolicies(kvs []store.KV) {
	s.mu.Lock()
	defer s.mu.Unlock()
	present := map[string]bool{}
	for _, kv := range kvs {
		name := strings.TrimPrefix(kv.Key, store.PolicyPrefix)
		src := policy.SourceStore(name)
		present[src] = true
		p, err := policy.DecodeStoreValue(name, kv.Value)
		if err == nil {
			err = s.eng.SetPolicies(src, []policy.Policy{p})
		}
		if err != nil {
			s.refuse(src, err, "store policy refused; its previous version, if any, stays in force", "key", kv.Key)
			continue
		}
		delete(s.policyErr, src)
		s.good[src] = true
	}
	s.dropMissing(sourcePrefixStore, present, "store policy deleted; withdrawn")
	if !s.storeLoaded {
		s.log.Info("store policies loaded", "policies", len(kvs))
	}
	s.storeLoaded = true
}

// refuse records why a source was refused, logging only a new reason.
func (s *Syncer) refuse(src string, err error, msg string, attrs ...any) {
	if s.policyErr[src] != err.Error() {
		s.log.Error(msg, append(attrs, "err", err)...)
	}
	s.policyErr[src] = err.Error()
}

func (s *Syncer) dropMissing(prefix string, present map[string]bool, msg string) {
	for _, l := range s.eng.Policies() {
		if strings.HasPrefix(l.Source, prefix) && !present[l.Source] {
			_ = s.eng.SetPolicies(l.Source, nil)
			s.log.Info(msg, "source", l.Source)
		}
	}
	for src := range s.policyErr {
		if strings.HasPrefix(src, prefix) && !present[src] {
			delete(s.policyErr, src)
		}
	}
}

// PolicyErrors returns the refused sources with their reasons.
func (s *Syncer) PolicyErrors() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]string, len(s.policyErr))
	for k, v := range s.policyErr {
		out[k] = v
	}
	return out
}

// Admit registers a new endpoint and writes its policy now: once Admit
// returns, the map holds the computed policy, or (gate shut, or a write
// that failed) the endpoint's directions are closed and its state says why.
// The error is returned only when not even the closed map could be
// written, which leaves the endpoint closed by the datapath's default.
func (s *Syncer) Admit(ep Endpoint) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.upsertLocked(ep)
	s.drainChangesLocked()
	if ok, why := s.loadedLocked(); !ok {
		st := s.eps[ep.ID]
		if err := s.w.SetPolicy(ep.ID, nil); err != nil {
			return fmt.Errorf("close the map of endpoint %d: %w", ep.ID, err)
		}
		s.setStatus(st, Status{State: StatePending, Reason: why, Closed: []string{"ingress", "egress"}})
		return nil
	}
	if err := s.writeLocked(ep.ID); err != nil {
		return err
	}
	if s.eps[ep.ID].status.State == StateEnforced {
		delete(s.pending, ep.ID)
	}
	return nil
}

// Readopt registers an endpoint restored at start without writing its map.
func (s *Syncer) Readopt(ep Endpoint) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.upsertLocked(ep)
	s.eps[ep.ID].status = Status{State: StatePending, Reason: "restored with its last policy; recomputed once the store's policies and identities are loaded"}
	s.pending[ep.ID] = true
}

// Upsert registers or updates an endpoint (identity or audit change); its
// map is written by the next Sync.
func (s *Syncer) Upsert(ep Endpoint) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.upsertLocked(ep)
}

func (s *Syncer) upsertLocked(ep Endpoint) {
	if _, ok := s.knownIDs[ep.Identity]; !ok {
		// A fresh allocation may not be in the store's list yet.
		s.eng.UpsertIdentity(ep.Identity, ep.Labels)
		s.knownIDs[ep.Identity] = ep.Labels.String()
	}
	old, ok := s.eps[ep.ID]
	if ok && old.Identity == ep.Identity && old.Audit == ep.Audit && old.Name == ep.Name {
		return
	}
	s.eng.UpsertEndpoint(ep.ID, ep.Identity, ep.Labels, ep.Audit)
	if ok {
		old.Endpoint = ep
		return
	}
	s.eps[ep.ID] = &epState{Endpoint: ep, status: Status{State: StatePending}}
}

// Delete forgets an endpoint (its map goes with the datapath's detach).
func (s *Syncer) Delete(id uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.eps[id]; !ok {
		return
	}
	s.eng.DeleteEndpoint(id)
	delete(s.eps, id)
	delete(s.pending, id)
}

// Status returns an endpoint's enforcement state.
func (s *Syncer) Status(id uint16) (Status, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.eps[id]
	if !ok {
		return Status{}, false
	}
	return st.status, true
}

// Summary is the syncer's state for `rackwire status` and the metrics.
type Summary struct {
	Loaded      bool
	Waiting     string
	LastSync    time.Time
	SyncError   string
	Enforced    int
	Pending     int
	Errors      int
	Writes      uint64
	WriteErrors uint64
}

// Summary reports the syncer's state.
func (s *Syncer) Summary() Summary {
	s.mu.Lock()
	defer s.mu.Unlock()
	sum := Summary{LastSync: s.lastSync, SyncError: s.syncErr, Writes: s.writes, WriteErrors: s.writeErrors}
	sum.Loaded, sum.Waiting = s.loadedLocked()
	for _, ep := range s.eps {
		switch ep.status.State {
		case StateEnforced:
			sum.Enforced++
		case StateError:
			sum.Errors++
		default:
			sum.Pending++
		}
	}
	return sum
}

// CIDRIdentities returns the CIDR identities allocated for policy prefixes.
func (s *Syncer) CIDRIdentities() map[netip.Prefix]identity.ID {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[netip.Prefix]identity.ID, len(s.cidrIDs))
	for p, id := range s.cidrIDs {
		out[p] = id
	}
	return out
}

// LookupCIDR names a CIDR identity.
func (s *Syncer) LookupCIDR(id identity.ID) (string, bool) { return s.local.Lookup(id) }

// LastBeat is when Sync last completed; the watchdog stops when it is old.
func (s *Syncer) LastBeat() time.Time { return time.Unix(0, s.beat.Load()) }

// Sync brings CIDR identities up to date and, once the gate is open,
// writes every endpoint whose desired entries changed or whose last write
// failed. It never blocks on the store.
func (s *Syncer) Sync() {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer func() { s.beat.Store(time.Now().UnixNano()) }()
	var errs []error
	errs = append(errs, s.syncCIDRsLocked()...)
	s.drainChangesLocked()
	s.lastSync = time.Now()
	if ok, why := s.loadedLocked(); !ok {
		s.syncErr = why
		return
	}
	ids := make([]uint16, 0, len(s.pending))
	for id := range s.pending {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		_ = s.writeLocked(id) // the state says why
		if st := s.eps[id]; st != nil && st.status.State == StateError {
			errs = append(errs, fmt.Errorf("endpoint %d: %s", id, st.status.Reason))
			continue
		}
		delete(s.pending, id)
	}
	s.syncErr = ""
	if err := errors.Join(errs...); err != nil {
		s.syncErr = err.Error()
		if !s.failing {
			s.log.Error("sync incomplete; retrying every second", "err", err)
		}
		s.failing = true
	} else if s.failing {
		s.failing = false
		s.log.Info("sync complete again")
	}
}

// drainChangesLocked moves the engine's reported changes into pending, so
// that nothing is lost while the gate is shut.
func (s *Syncer) drainChangesLocked() {
	for _, ch := range s.eng.Changes() {
		if ch.Removed {
			delete(s.pending, ch.Endpoint)
			continue
		}
		s.pending[ch.Endpoint] = true
	}
}

// syncCIDRsLocked allocates CIDR identities for the prefixes the policies
// name, hands them to the sink, and releases those no longer named.
func (s *Syncer) syncCIDRsLocked() []error {
	var errs []error
	want := map[netip.Prefix]bool{}
	for _, p := range s.eng.CIDRPrefixes() {
		want[p] = true
		id, ok := s.cidrIDs[p]
		if !ok {
			var err error
			id, _, err = s.local.Allocate(p.String())
			if err != nil {
				errs = append(errs, fmt.Errorf("allocate CIDR identity for %s: %w", p, err))
				continue
			}
			s.eng.UpsertIdentity(id, policy.CIDRLabels(p))
			s.cidrIDs[p] = id
			s.cidrFailed[p] = true
		}
		if s.cidrFailed[p] {
			if err := s.sink.SetCIDR(p, id); err != nil {
				errs = append(errs, fmt.Errorf("ipcache %s: %w", p, err))
				continue
			}
			delete(s.cidrFailed, p)
		}
	}
	for p, id := range s.cidrIDs {
		if want[p] {
			continue
		}
		if err := s.sink.DeleteCIDR(p); err != nil {
			errs = append(errs, fmt.Errorf("ipcache delete %s: %w", p, err))
			continue
		}
		s.eng.DeleteIdentity(id)
		s.local.Release(p.String())
		delete(s.cidrIDs, p)
		delete(s.cidrFailed, p)
	}
	return errs
}

// writeLocked writes one endpoint's desired policy, falling back to closed
// directions when it cannot be written in full. It returns an error only
// when not even a closed map could be written.
func (s *Syncer) writeLocked(id uint16) error {
	st := s.eps[id]
	desired, ok := s.eng.Desired(id)
	if st == nil || !ok {
		return nil
	}
	s.writes++
	err := s.w.SetPolicy(id, desired)
	if err == nil {
		s.setStatus(st, Status{State: StateEnforced})
		return nil
	}
	s.writeErrors++
	var in, eg []policy.Entry
	for _, e := range desired {
		if e.Direction == policy.Ingress {
			in = append(in, e)
		} else {
			eg = append(eg, e)
		}
	}
	reason := err.Error()
	for _, try := range []struct {
		entries []policy.Entry
		closed  []string
	}{
		{in, []string{"egress"}},
		{eg, []string{"ingress"}},
		{nil, []string{"ingress", "egress"}},
	} {
		if len(try.entries) == 0 && len(try.closed) < 2 {
			continue // that direction alone was not the problem
		}
		if cerr := s.w.SetPolicy(id, try.entries); cerr == nil {
			s.setStatus(st, Status{State: StateError, Reason: reason + "; " + strings.Join(try.closed, " and ") + " closed", Closed: try.closed})
			return nil
		}
	}
	// Not even the closed map could be written: the map in force is
	// unchanged (the writer is atomic); say so.
	reason += "; could not close the map either, the previous policy is in force"
	s.setStatus(st, Status{State: StateError, Reason: reason})
	return errors.New(reason)
}

func (s *Syncer) setStatus(st *epState, next Status) {
	prev := st.status
	st.status = next
	if prev.State == next.State && prev.Reason == next.Reason {
		return
	}
	switch next.State {
	case StateError:
		s.log.Error("endpoint policy could not be written in full; closed", "endpoint_id", st.ID, "endpoint", st.Name,
			"closed", strings.Join(next.Closed, ","), "err", next.Reason)
	case StatePending:
		s.log.Warn("endpoint admitted closed until the store's policies and identities are loaded", "endpoint_id", st.ID, "endpoint", st.Name)
	case StateEnforced:
		if prev.State == StateError || prev.State == StatePending && prev.Reason != "" {
			s.log.Info("endpoint policy in force", "endpoint_id", st.ID, "endpoint", st.Name)
		}
	}
}
