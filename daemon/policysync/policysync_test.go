package policysync

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/store"
)

// fakeMaps is an atomic Writer with a per-map capacity, like the datapath.
type fakeMaps struct {
	mu    sync.Mutex
	cap   int
	maps  map[uint16][]policy.Entry
	fail  error // every write fails with this
	calls int
}

func newFakeMaps(capacity int) *fakeMaps {
	return &fakeMaps{cap: capacity, maps: map[uint16][]policy.Entry{}}
}

func (f *fakeMaps) SetPolicy(id uint16, es []policy.Entry) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.fail != nil {
		return f.fail
	}
	if len(es) > f.cap {
		return fmt.Errorf("needs %d entries, holds %d: %w", len(es), f.cap, ErrTooLarge)
	}
	f.maps[id] = append([]policy.Entry(nil), es...)
	return nil
}

// allows reports whether the map of ep lets identity in on port/TCP.
func (f *fakeMaps) allows(ep uint16, dir uint8, id uint32, port uint16) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	es, ok := f.maps[ep]
	if !ok {
		return false // a new map is closed
	}
	allow := false
	for _, e := range es {
		if e.Direction != dir || (e.Identity != 0 && e.Identity != id) || (e.Proto != 0 && e.Proto != 6) {
			continue
		}
		if e.Port != 0 && (port < e.Port || port > max(e.Port, e.EndPort)) {
			continue
		}
		if e.Deny {
			return false
		}
		allow = true
	}
	return allow
}

type fakeSink struct {
	mu   sync.Mutex
	m    map[netip.Prefix]identity.ID
	fail error
}

func (f *fakeSink) SetCIDR(p netip.Prefix, id identity.ID) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return f.fail
	}
	f.m[p] = id
	return nil
}

func (f *fakeSink) DeleteCIDR(p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.m, p)
	return nil
}

const (
	web uint16 = 1
	db  uint16 = 2
)

var (
	webID = identity.Make(1, 100)
	dbID  = identity.Make(1, 101)
)

func labels(t *testing.T, s string) identity.Labels {
	t.Helper()
	ls, err := identity.ParseLabels(s)
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

func policyKV(t *testing.T, doc string) store.KV {
	t.Helper()
	ps, err := policy.Load("test", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	b, err := policy.EncodeStoreValue(ps[0])
	if err != nil {
		t.Fatal(err)
	}
	return store.KV{Key: store.PolicyKey(ps[0].Metadata.Name), Value: b}
}

const dbFromWeb = `
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-web}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
`

func newSyncer(t *testing.T, capacity int) (*Syncer, *fakeMaps, *fakeSink) {
	maps := newFakeMaps(capacity)
	sink := &fakeSink{m: map[netip.Prefix]identity.ID{}}
	return New(policy.New(nil, policy.Options{}), maps, sink, nil), maps, sink
}

func loaded(t *testing.T, s *Syncer, kvs ...store.KV) {
	s.SetIdentities([]identity.Identity{{ID: webID, Labels: labels(t, "app=web")}, {ID: dbID, Labels: labels(t, "app=db")}})
	s.SetStorePolicies(kvs)
}

// A new endpoint selected by a store policy holds that policy when Admit
// returns: the denied peer is dropped at once.
func TestAdmitWritesPolicyBeforeReturning(t *testing.T) {
	s, maps, _ := newSyncer(t, 100)
	loaded(t, s, policyKV(t, dbFromWeb))
	if err := s.Admit(Endpoint{ID: db, Name: "db", Identity: dbID, Labels: labels(t, "app=db")}); err != nil {
		t.Fatal(err)
	}
	if !maps.allows(db, policy.Ingress, uint32(webID), 5432) {
		t.Errorf("web -> db:5432 denied, want allowed")
	}
	if maps.allows(db, policy.Ingress, uint32(identity.World), 5432) {
		t.Errorf("world -> db:5432 allowed right after Admit, want denied")
	}
	if st, _ := s.Status(db); st.State != StateEnforced {
		t.Errorf("Status(db) = %+v, want enforced", st)
	}
}

// Before the store's policies are listed, a new endpoint is admitted closed
// and restored endpoints' maps are not written; once both lists arrive the
// real policy lands.
func TestGateShutUntilPoliciesAndIdentities(t *testing.T) {
	for _, tc := range []struct {
		name             string
		ids, policiesToo bool
	}{
		{"nothing listed", false, false},
		{"identities only", true, false},
		{"policies only", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, maps, _ := newSyncer(t, 100)
			if tc.ids {
				s.SetIdentities([]identity.Identity{{ID: webID, Labels: labels(t, "app=web")}})
			}
			if tc.policiesToo {
				s.SetStorePolicies([]store.KV{policyKV(t, dbFromWeb)})
			}
			s.Readopt(Endpoint{ID: web, Name: "web", Identity: webID, Labels: labels(t, "app=web")})
			if err := s.Admit(Endpoint{ID: db, Name: "db", Identity: dbID, Labels: labels(t, "app=db")}); err != nil {
				t.Fatal(err)
			}
			s.Sync()
			if _, written := maps.maps[web]; written {
				t.Errorf("restored endpoint's map written before the gate opened: %v", maps.maps[web])
			}
			if maps.allows(db, policy.Ingress, uint32(webID), 5432) || maps.allows(db, policy.Egress, uint32(webID), 80) {
				t.Errorf("new endpoint open before the gate opened: %v", maps.maps[db])
			}
			if st, _ := s.Status(db); st.State != StatePending {
				t.Errorf("Status(db) = %+v, want %s", st, StatePending)
			}
			if ok, why := s.Loaded(); ok || why == "" {
				t.Errorf("Loaded() = %v, %q; want false with a reason", ok, why)
			}
			loaded(t, s, policyKV(t, dbFromWeb))
			s.Sync()
			if !maps.allows(db, policy.Ingress, uint32(webID), 5432) || maps.allows(db, policy.Ingress, uint32(identity.World), 5432) {
				t.Errorf("after the gate opened db's map = %v, want web allowed and world denied", maps.maps[db])
			}
			if !maps.allows(web, policy.Ingress, uint32(identity.World), 80) {
				t.Errorf("after the gate opened web (selected by nothing) is not open: %v", maps.maps[web])
			}
		})
	}
}

// A policy larger than the map closes the direction and marks the endpoint;
// a later smaller policy clears the mark.
func TestTooLargeClosesDirection(t *testing.T) {
	s, maps, _ := newSyncer(t, 3)
	big := `
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: big}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "1", protocol: TCP}, {port: "2", protocol: TCP}, {port: "3", protocol: TCP}, {port: "4", protocol: TCP}]}]
`
	loaded(t, s, policyKV(t, big))
	if err := s.Admit(Endpoint{ID: db, Name: "db", Identity: dbID, Labels: labels(t, "app=db")}); err != nil {
		t.Fatal(err)
	}
	st, _ := s.Status(db)
	if st.State != StateError || len(st.Closed) != 1 || st.Closed[0] != "ingress" {
		t.Fatalf("Status(db) = %+v, want policy-error with ingress closed", st)
	}
	if maps.allows(db, policy.Ingress, uint32(webID), 1) {
		t.Errorf("ingress open after a policy that does not fit: %v", maps.maps[db])
	}
	if !maps.allows(db, policy.Egress, uint32(webID), 80) {
		t.Errorf("egress (selected by nothing) closed too: %v", maps.maps[db])
	}
	if sum := s.Summary(); sum.Errors != 1 {
		t.Errorf("Summary().Errors = %d, want 1", sum.Errors)
	}
	s.SetStorePolicies([]store.KV{policyKV(t, dbFromWeb)})
	s.Sync()
	if st, _ := s.Status(db); st.State != StateEnforced {
		t.Errorf("after a policy that fits, Status(db) = %+v, want enforced", st)
	}
	if !maps.allows(db, policy.Ingress, uint32(webID), 5432) {
		t.Errorf("web -> db:5432 denied after the smaller policy")
	}
}

// A writer that fails for another reason leaves the endpoint marked and
// the sync retries until it works.
func TestWriteFailureRetried(t *testing.T) {
	s, maps, _ := newSyncer(t, 100)
	loaded(t, s, policyKV(t, dbFromWeb))
	if err := s.Admit(Endpoint{ID: db, Name: "db", Identity: dbID, Labels: labels(t, "app=db")}); err != nil {
		t.Fatal(err)
	}
	maps.fail = errors.New("kernel says no")
	s.SetStorePolicies(nil) // db is no longer selected: its map must open
	s.Sync()
	if st, _ := s.Status(db); st.State != StateError {
		t.Errorf("Status(db) = %+v, want policy-error", st)
	}
	if maps.allows(db, policy.Ingress, uint32(identity.World), 80) {
		t.Errorf("map changed by a failed write")
	}
	maps.fail = nil
	s.Sync()
	if st, _ := s.Status(db); st.State != StateEnforced {
		t.Errorf("after the writer recovered Status(db) = %+v, want enforced", st)
	}
	if !maps.allows(db, policy.Ingress, uint32(identity.World), 80) {
		t.Errorf("db not open after its policy was deleted and the writer recovered")
	}
}

// CIDR identities reach the sink, are retried when the sink fails, and are
// released when no policy names them.
func TestCIDRIdentities(t *testing.T) {
	s, _, sink := newSyncer(t, 100)
	cidr := `
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toCIDR: [192.0.2.0/24]
`
	sink.fail = errors.New("ipcache full")
	loaded(t, s, policyKV(t, cidr))
	s.Sync()
	if len(sink.m) != 0 || s.Summary().SyncError == "" {
		t.Fatalf("sink = %v, sync error %q; want nothing written and an error", sink.m, s.Summary().SyncError)
	}
	sink.fail = nil
	s.Sync()
	p := netip.MustParsePrefix("192.0.2.0/24")
	if id, ok := sink.m[p]; !ok || !id.IsLocal() {
		t.Fatalf("sink = %v, want %v with a host-local identity", sink.m, p)
	}
	s.SetStorePolicies(nil)
	s.Sync()
	if len(sink.m) != 0 || len(s.CIDRIdentities()) != 0 {
		t.Errorf("after the policy went: sink = %v, identities %v; want none", sink.m, s.CIDRIdentities())
	}
}

// A policy refused at start, with no earlier version in force, keeps the
// gate shut: the agent does not know what it would select, so opening the
// maps without it could widen them. Once it is fixed (or removed) the gate
// opens; a refusal after that keeps the previous version in force.
func TestRefusedAtStartKeepsGateShut(t *testing.T) {
	s, maps, _ := newSyncer(t, 100)
	bad := store.KV{Key: store.PolicyKey("bad"), Value: []byte("{not yaml")}
	loaded(t, s, bad, policyKV(t, dbFromWeb))
	errs := s.PolicyErrors()
	if _, ok := errs["store:bad"]; !ok || len(errs) != 1 {
		t.Errorf("PolicyErrors() = %v, want store:bad only", errs)
	}
	if n := len(s.eng.Policies()); n != 1 {
		t.Errorf("engine holds %d policies, want 1", n)
	}
	if ok, why := s.Loaded(); ok || !strings.Contains(why, "store:bad") {
		t.Errorf("Loaded() = %v, %q; want false naming store:bad", ok, why)
	}
	s.Readopt(Endpoint{ID: web, Name: "web", Identity: webID, Labels: labels(t, "app=web")})
	s.Sync()
	if _, written := maps.maps[web]; written {
		t.Errorf("restored map written while a policy refused at start is unknown")
	}
	s.SetStorePolicies([]store.KV{policyKV(t, dbFromWeb)})
	if ok, why := s.Loaded(); !ok {
		t.Fatalf("Loaded() after the bad key went = false, %q", why)
	}
	s.SetStorePolicies([]store.KV{bad, policyKV(t, dbFromWeb)})
	if ok, why := s.Loaded(); !ok {
		t.Errorf("a refusal after the gate opened shut it again: %q", why)
	}
}

func TestBeat(t *testing.T) {
	s, _, _ := newSyncer(t, 100)
	before := s.LastBeat()
	s.Sync()
	if !s.LastBeat().After(before) {
		t.Errorf("LastBeat did not advance on Sync")
	}
}
