package identity

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
)

// logBuf collects log lines for assertions.
type logBuf struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newTestAllocator(t testing.TB, st store.Store, node string, log *slog.Logger) *Allocator {
	t.Helper()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a, err := NewAllocator(st, AllocatorOptions{Node: node, ClusterID: 7, Log: log,
		WatchMinInterval: time.Second, BackoffMin: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond})
	if err != nil {
		t.Fatalf("NewAllocator: %v", err)
	}
	t.Cleanup(a.Close)
	return a
}

// labelSet returns the i-th test label set.
func labelSet(i int) Labels {
	return MustLabels("app", "svc"+strconv.Itoa(i), "env", []string{"prod", "dev", "stage"}[i%3])
}

// checkInvariant lists the store and checks: every label set one id, every
// id one label set, no reserved or foreign id; and that every allocator's
// answer for a label set is that one id.
func checkInvariant(t testing.TB, st store.Store, got []map[string]ID) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kvs, _, err := st.List(ctx, store.IdentityIDPrefix)
	if err != nil {
		t.Fatalf("list ids: %v", err)
	}
	byLabels := map[string]ID{}
	for _, kv := range kvs {
		v, err := strconv.ParseUint(strings.TrimPrefix(kv.Key, store.IdentityIDPrefix), 10, 32)
		if err != nil {
			continue // malformed keys planted by a test
		}
		id := ID(v)
		if _, err := ParseCanonical(string(kv.Value)); err != nil {
			continue
		}
		if !id.IsCluster() || id.IsReserved() || id.Cluster() != 7 {
			t.Errorf("identity %d (%#x) is not an allocatable cluster-7 identity", id, uint32(id))
		}
		if prev, dup := byLabels[string(kv.Value)]; dup {
			t.Errorf("label set %s has two ids: %d and %d", kv.Value, prev, id)
		}
		byLabels[string(kv.Value)] = id
	}
	for i, m := range got {
		for canon, id := range m {
			if want, ok := byLabels[canon]; !ok || want != id {
				t.Errorf("allocator %d: %s -> %d, store says %d (present %v)", i, canon, id, want, ok)
			}
		}
	}
	t.Logf("invariant holds: %d identities, %d allocators", len(byLabels), len(got))
}

// runAllocators runs n allocators, each allocating perHost label sets out
// of a pool of size pool (heavy overlap), concurrently.
func runAllocators(t testing.TB, mk func(i int) *Allocator, n, perHost, pool int, timeout time.Duration) []map[string]ID {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	got := make([]map[string]ID, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		a := mk(i)
		got[i] = map[string]ID{}
		wg.Add(1)
		go func(i int, a *Allocator) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 42))
			perm := r.Perm(pool)[:perHost]
			for _, j := range perm {
				ls := labelSet(j)
				id, _, err := a.Allocate(ctx, ls)
				if err != nil {
					errs <- fmt.Errorf("allocator %d: Allocate(%s): %w", i, ls, err)
					return
				}
				if id.IsReserved() {
					errs <- fmt.Errorf("allocator %d: reserved id %d", i, id)
					return
				}
				got[i][ls.String()] = id
			}
		}(i, a)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	return got
}

func TestAllocatorRefcountAndRelease(t *testing.T) {
	st := newFakeStore()
	a := newTestAllocator(t, st, "host-a", nil)
	ctx := context.Background()
	web := MustLabels("app", "web")
	steps := []struct {
		name      string
		op        string
		wantNew   bool
		wantValue bool // value key present after the step
	}{
		{"first use creates", "alloc", true, true},
		{"second use bumps", "alloc", false, true},
		{"one release keeps", "release", false, true},
		{"last release drops value key", "release", false, false},
		{"use again reuses id", "alloc", false, true},
	}
	var first ID
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			switch s.op {
			case "alloc":
				id, isNew, err := a.Allocate(ctx, web)
				if err != nil {
					t.Fatalf("Allocate: %v", err)
				}
				if first == 0 {
					first = id
				}
				if id != first || isNew != s.wantNew {
					t.Fatalf("Allocate = %d, %v, want %d, %v", id, isNew, first, s.wantNew)
				}
				if id.Cluster() != 7 || id.Local() < ClusterLocalMin {
					t.Fatalf("Allocate = %#x, want cluster 7 and local >= 256", uint32(id))
				}
			case "release":
				if err := a.Release(ctx, web); err != nil {
					t.Fatalf("Release: %v", err)
				}
			}
			_, err := st.Get(ctx, store.IdentityValueKey(web.String(), "host-a"))
			if present := err == nil; present != s.wantValue {
				t.Fatalf("value key present = %v, want %v", present, s.wantValue)
			}
		})
	}
	if ls, ok := a.Lookup(first); !ok || !ls.Equal(web) {
		t.Fatalf("Lookup(%d) = %v, %v", first, ls, ok)
	}
	if id, ok := a.LookupLabels(web); !ok || id != first {
		t.Fatalf("LookupLabels = %d, %v", id, ok)
	}
}

func TestAllocatorsRaceFake(t *testing.T) {
	st := newFakeStore()
	got := runAllocators(t, func(i int) *Allocator {
		return newTestAllocator(t, st, fmt.Sprintf("host-%d", i), nil)
	}, 10, 100, 150, time.Minute)
	checkInvariant(t, st, got)
}

func TestAllocatorKnownLabelsResolveWhileDown(t *testing.T) {
	st := newFakeStore()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a := newTestAllocator(t, st, "host-a", nil)
	web := MustLabels("app", "web")
	id, _, err := a.Allocate(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	b := newTestAllocator(t, st, "host-b", nil)
	if err := b.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := b.LookupLabels(web); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host-b never learned %s", web)
		}
		time.Sleep(20 * time.Millisecond)
	}
	st.setDown(true)
	got, isNew, err := b.Allocate(ctx, web)
	if err != nil || got != id || isNew {
		t.Fatalf("Allocate while down = %d, %v, %v; want %d from the cache", got, isNew, err, id)
	}
	if _, _, err := b.Allocate(ctx, MustLabels("app", "new")); err == nil {
		t.Fatalf("Allocate of an unknown label set while down succeeded")
	}
	st.setDown(false)
}

func TestAllocatorSkipsMalformed(t *testing.T) {
	st := newFakeStore()
	ctx := context.Background()
	bad := map[string][]byte{
		store.IdentityIDPrefix + "notanumber":    []byte("app=x;"),
		store.IdentityIDPrefix + "5":             []byte("app=reserved;"),
		store.IdentityIDPrefix + "117440769":     []byte("{\"json\": true}"),
		store.IdentityIDPrefix + "117440770":     bytes.Repeat([]byte("a"), 400*1024),
		store.IdentityIDPrefix + "117440771":     []byte("b=1;a=2;"),
		store.IdentityValuePrefix + "app=web;/x": []byte("garbage"),
	}
	for k, v := range bad {
		if err := st.Put(ctx, k, v, store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var logs logBuf
	a := newTestAllocator(t, st, "host-a", slog.New(slog.NewTextHandler(&logs, nil)))
	if err := a.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	id, _, err := a.Allocate(ctx, MustLabels("app", "web"))
	if err != nil || !id.IsCluster() {
		t.Fatalf("Allocate next to malformed data = %d, %v", id, err)
	}
	if n := len(a.List()); n != 1 {
		t.Fatalf("List has %d identities, want 1 (the malformed ones skipped): %v", n, a.List())
	}
	if c := strings.Count(logs.String(), "skipping malformed identity data"); c < 5 {
		t.Fatalf("%d malformed-data log lines, want >= 5:\n%s", c, logs.String())
	}
}

func TestGCTwoRounds(t *testing.T) {
	st := newFakeStore()
	ctx := context.Background()
	a := newTestAllocator(t, st, "host-a", nil)
	web, db := MustLabels("app", "web"), MustLabels("app", "db")
	webID, _, _ := a.Allocate(ctx, web)
	dbID, _, _ := a.Allocate(ctx, db)
	if err := a.Release(ctx, db); err != nil {
		t.Fatal(err)
	}
	g := NewGC(st, GCOptions{DeleteGap: time.Millisecond})
	del, err := g.Round(ctx)
	if err != nil || len(del) != 0 {
		t.Fatalf("round 1 deleted %v, %v; want nothing", del, err)
	}
	del, err = g.Round(ctx)
	if err != nil || len(del) != 1 || del[0] != dbID {
		t.Fatalf("round 2 deleted %v, %v; want [%d]", del, err, dbID)
	}
	if _, err := st.Get(ctx, store.IdentityIDKey(uint32(webID))); err != nil {
		t.Fatalf("in-use identity %d gone: %v", webID, err)
	}

	// A touch between rounds saves an identity.
	api := MustLabels("app", "api")
	apiID, _, _ := a.Allocate(ctx, api)
	_ = a.Release(ctx, api)
	if del, _ := g.Round(ctx); len(del) != 0 {
		t.Fatalf("round 3 deleted %v", del)
	}
	b := newTestAllocator(t, st, "host-b", nil)
	if got, _, err := b.Allocate(ctx, api); err != nil || got != apiID {
		t.Fatalf("host-b Allocate(api) = %d, %v, want %d", got, err, apiID)
	}
	_ = b.Release(ctx, api) // value gone again, but the touch reset the count
	if del, _ := g.Round(ctx); len(del) != 0 {
		t.Fatalf("round 4 deleted %v right after a touch", del)
	}
}

func TestLocalAllocator(t *testing.T) {
	l := NewLocalAllocator()
	tests := []struct {
		op, prefix string
		wantID     ID
		wantNew    bool
	}{
		{"alloc", "10.0.0.0/8", LocalMin, true},
		{"alloc", "192.0.2.0/24", LocalMin + 1, true},
		{"alloc", "10.0.0.0/8", LocalMin, false},
		{"release", "10.0.0.0/8", 0, false},
		{"release", "10.0.0.0/8", 0, true},
		{"alloc", "198.51.100.0/24", LocalMin, true},
	}
	for i, tt := range tests {
		switch tt.op {
		case "alloc":
			id, isNew, err := l.Allocate(tt.prefix)
			if err != nil || id != tt.wantID || isNew != tt.wantNew || !id.IsLocal() {
				t.Errorf("step %d: Allocate(%s) = %d, %v, %v; want %d, %v", i, tt.prefix, id, isNew, err, tt.wantID, tt.wantNew)
			}
		case "release":
			if freed := l.Release(tt.prefix); freed != tt.wantNew {
				t.Errorf("step %d: Release(%s) = %v, want %v", i, tt.prefix, freed, tt.wantNew)
			}
		}
	}
	if p, ok := l.Lookup(LocalMin + 1); !ok || p != "192.0.2.0/24" {
		t.Errorf("Lookup = %q, %v", p, ok)
	}
}

// TestReleaseRetriedAfterOutage: a release that fails while the store is
// down deletes the value key once the store is back.
func TestReleaseRetriedAfterOutage(t *testing.T) {
	st := newFakeStore()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	a, err := NewAllocator(st, AllocatorOptions{Node: "host-a", ClusterID: 7,
		WatchMinInterval: 20 * time.Millisecond, WatchWait: 100 * time.Millisecond,
		BackoffMin: 20 * time.Millisecond, BackoffMax: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	web := MustLabels("app", "web")
	if _, _, err := a.Allocate(ctx, web); err != nil {
		t.Fatal(err)
	}
	st.setDown(true)
	if err := a.Release(ctx, web); err == nil {
		t.Fatalf("Release with the store down succeeded")
	}
	st.setDown(false)
	key := store.IdentityValueKey(web.String(), "host-a")
	for {
		if _, err := st.Get(ctx, key); err != nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("value key %s still there after the store came back", key)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// claimLost is a store whose check-and-set with claim creates the id key
// and then loses the claim (Consul: the value key was held by the previous
// run's session and the session died during the take-over): CASPutOwned
// reports the CAS done and an error.
type claimLost struct{ *fakeStore }

func (c claimLost) CASPutOwned(ctx context.Context, casKey string, casValue []byte, casIndex uint64, ownedKey string, ownedValue []byte) (bool, error) {
	ok, err := c.CAS(ctx, casKey, casValue, casIndex, store.PutOptions{})
	if err != nil || !ok {
		return ok, err
	}
	return true, fmt.Errorf("put owned %s: session is gone: %w", ownedKey, store.ErrUnavailable)
}

// TestCreatedIdentityWithoutClaimIsDropped: a new id whose key was written
// but whose claim failed is deleted again, not left as a second id of the
// label set (TestFleetFaults found one when a host restarted while its
// session died: "value key ... names id 18271029, the id key of those
// labels is 24795748").
func TestCreatedIdentityWithoutClaimIsDropped(t *testing.T) {
	st := claimLost{newFakeStore()}
	a := newTestAllocator(t, st, "host-a", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := a.Allocate(ctx, labelSet(1)); err == nil {
		t.Fatal("allocation whose claim failed reported no error")
	}
	kvs, _, err := st.List(ctx, store.IdentityIDPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(kvs) != 0 {
		t.Fatalf("id keys left after a claim that failed: %v", kvs)
	}
}
