package identity

import (
	"context"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
)

// Fuzz targets for the identity data other hosts write to the store: the
// id keys (state/identities/v1/id/<id> = canonical labels, read by the
// allocator's watch and by the GC) and the value keys
// (state/identities/v1/value/<labels>/<node> = id, read by claims and by
// the GC). Malformed data must be skipped, never panic, and never be read
// as something it is not.

// fuzzAllocator is an allocator without its watch: apply and claims are
// called directly.
func fuzzAllocator(st store.Store) *Allocator {
	return &Allocator{
		st: st, opts: AllocatorOptions{Node: "h1", ClusterID: 3}, log: slog.New(slog.DiscardHandler),
		ids: map[ID]idEntry{}, byLabels: map[string][]ID{}, refs: map[string]*use{},
		badSeen: map[string]uint64{}, pendingRelease: map[string]bool{}, synced: make(chan struct{}),
	}
}

// FuzzIdentityIDKeys: apply takes an id key only if its key is the
// canonical key of a cluster identity and its value is a non-empty
// canonical label set; every id it takes round-trips through
// IdentityIDKey and Labels.String.
func FuzzIdentityIDKeys(f *testing.F) {
	valid := Make(3, 300)
	f.Add(strconv.FormatUint(uint64(valid), 10), []byte("app=web;"), uint64(7))
	f.Add(strconv.FormatUint(uint64(Make(3, 301)), 10), []byte("app=db;env=prod;"), uint64(0))
	f.Add(strconv.FormatUint(uint64(Make(3, 302)), 10), []byte("env=prod;app=db;"), uint64(1))
	f.Add("0"+strconv.FormatUint(uint64(valid), 10), []byte("app=web;"), uint64(7))
	f.Add("+50331948", []byte("app=web;"), uint64(7))
	f.Add("255", []byte("app=web;"), uint64(7))
	f.Add("4294967296", []byte("app=web;"), uint64(7))
	f.Add("50331948/x", []byte("a=b;"), uint64(7))
	f.Add("50331948", []byte("a=b"), uint64(7))
	f.Add("50331948", []byte(""), uint64(7))
	f.Add("50331948", []byte("a=b;a=c;"), uint64(7))
	f.Add("50331948", []byte("reserved:host=;"), uint64(7))
	f.Fuzz(func(t *testing.T, rest string, value []byte, create uint64) {
		a := fuzzAllocator(nil)
		other := store.KV{Key: store.IdentityIDKey(uint32(Make(3, 999))), Value: []byte("app=other;"), ModifyIndex: 3, CreateIndex: 3}
		kv := store.KV{Key: store.IdentityIDPrefix + rest, Value: value, ModifyIndex: create + 1, CreateIndex: create}
		a.apply([]store.KV{other, kv})
		if !a.isSynced {
			t.Fatal("apply did not mark the cache synced")
		}
		taken := 0
		for id, e := range a.ids {
			src := other
			if e.create == createIndex(kv) && e.modify == kv.ModifyIndex {
				src = kv
				taken++
			}
			if !id.IsCluster() {
				t.Fatalf("took id %d, not a cluster identity", id)
			}
			if store.IdentityIDKey(uint32(id)) != src.Key {
				t.Fatalf("key %q read as identity %d, whose key is %q", src.Key, id, store.IdentityIDKey(uint32(id)))
			}
			if len(e.labels) == 0 || e.labels.String() != e.canon || e.canon != string(src.Value) {
				t.Fatalf("identity %d: labels %v (canon %q) from value %q", id, e.labels, e.canon, src.Value)
			}
			again, err := ParseCanonical(e.labels.String())
			if err != nil || !again.Equal(e.labels) {
				t.Fatalf("identity %d: labels %q do not parse back: %v", id, e.labels.String(), err)
			}
			if ids := a.byLabels[e.canon]; !slices.Contains(ids, id) {
				t.Fatalf("identity %d missing from the by-labels index %v", id, ids)
			}
		}
		if taken > 1 {
			t.Fatalf("one key taken as %d identities", taken)
		}
		if e, ok := a.ids[Make(3, 999)]; kv.Key != other.Key && (!ok || e.canon != string(other.Value)) {
			t.Fatalf("key %q made apply drop or change a good identity", kv.Key)
		}
	})
}

// FuzzIdentityClaims: claims and the GC read the value keys alike. Every id
// claims returns is a cluster identity named by a value key, and an id key
// the allocator would adopt through a claim is never deleted by the GC.
func FuzzIdentityClaims(f *testing.F) {
	id := strconv.FormatUint(uint64(Make(3, 300)), 10)
	f.Add("h2", []byte(id), id)
	f.Add("h2", []byte(" "+id+"\n"), id)
	f.Add("h2", []byte("0"+id), id)
	f.Add("h2", []byte("255"), "255")
	f.Add("h2", []byte("-1"), id)
	f.Add("h2", []byte("12345678901234567890"), id)
	f.Add("h2/x", []byte(id), "0"+id)
	f.Add("", []byte{}, "")
	f.Fuzz(func(t *testing.T, node string, value []byte, idKey string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st := newFakeStore()
		canon := "app=web;"
		if err := st.Put(ctx, store.IdentityValueKey(canon, node), value, store.PutOptions{}); err != nil {
			return // the store refuses it (too large): outside the property
		}
		if err := st.Put(ctx, store.IdentityIDPrefix+idKey, []byte(canon), store.PutOptions{}); err != nil {
			return // likewise
		}
		a := fuzzAllocator(st)
		cs, err := a.claims(ctx, canon)
		if err != nil {
			t.Fatalf("claims: %v", err)
		}
		if len(cs) > 1 {
			t.Fatalf("one value key gave claims %v", cs)
		}
		for _, c := range cs {
			if !c.IsCluster() {
				t.Fatalf("claim %d is not a cluster identity", c)
			}
			if v, err := strconv.ParseUint(strings.TrimSpace(string(value)), 10, 32); err != nil || ID(v) != c {
				t.Fatalf("claim %d from value %q", c, value)
			}
		}
		// The GC, two rounds: an id key named by a claim stays.
		g := NewGC(st, GCOptions{DeleteGap: time.Nanosecond})
		for range 2 {
			if _, err := g.Round(ctx); err != nil {
				t.Fatalf("GC round: %v", err)
			}
		}
		for _, c := range cs {
			if store.IdentityIDKey(uint32(c)) != store.IdentityIDPrefix+idKey {
				continue
			}
			if _, err := st.Get(ctx, store.IdentityIDKey(uint32(c))); err != nil {
				t.Fatalf("GC deleted identity %d, which value %q claims: %v", c, value, err)
			}
		}
	})
}
