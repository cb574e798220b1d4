package iplog

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/local"
	"github.com/rackwire/rackwire/internal/testenv"
)

// counting wraps a store and counts the keys each kind of read returns.
type counting struct {
	store.Store
	listKeys, watchKeys atomic.Int64
}

func (c *counting) List(ctx context.Context, p string) ([]store.KV, uint64, error) {
	kvs, i, err := c.Store.List(ctx, p)
	c.listKeys.Add(int64(len(kvs)))
	return kvs, i, err
}

func (c *counting) Watch(ctx context.Context, p string, idx uint64, w time.Duration) ([]store.KV, uint64, error) {
	kvs, i, err := c.Store.Watch(ctx, p, idx, w)
	c.watchKeys.Add(int64(len(kvs)))
	return kvs, i, err
}

func newStore(t *testing.T) *counting {
	t.Helper()
	s, err := local.Open(filepath.Join(t.TempDir(), "store.db"), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &counting{Store: s}
}

func ipKey(i int) string {
	return store.IPKey("default", netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}))
}

// writer writes an ipcache key and its log entry, as the publisher does.
func write(t *testing.T, st store.Store, w *Writer, i int, val string) {
	t.Helper()
	ctx := context.Background()
	if val == "" {
		if err := st.Delete(ctx, ipKey(i)); err != nil {
			t.Fatal(err)
		}
		if err := w.Append(ctx, []Op{{Key: ipKey(i), Delete: true}}); err != nil {
			t.Fatal(err)
		}
		return
	}
	if err := st.Put(ctx, ipKey(i), []byte(val), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := w.Append(ctx, []Op{{Key: ipKey(i), Value: []byte(val)}}); err != nil {
		t.Fatal(err)
	}
}

// applyDelivery applies d to m (a copy when d is whole) and returns it:
// what a consumer of the follower holds.
func applyDelivery(m map[string]string, d Delivery) map[string]string {
	if d.Whole || m == nil {
		m = map[string]string{}
		for _, kv := range d.Set {
			m[kv.Key] = string(kv.Value)
		}
	}
	for _, kv := range d.Changed {
		m[kv.Key] = string(kv.Value)
	}
	for _, k := range d.Removed {
		delete(m, k)
	}
	return m
}

// follower runs a Follower and keeps what its deliveries add up to.
type follower struct {
	f    *Follower
	mu   sync.Mutex
	last map[string]string
	// deliveries records whether each delivery was whole, sizes the
	// keys each carried.
	deliveries []bool
	sizes      []int
	st         Stats
	stop       context.CancelFunc
	done       chan struct{}
}

func follow(t *testing.T, st store.Store, legacy func() bool, opts ...func(*Follower)) *follower {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	fl := &follower{stop: cancel, done: make(chan struct{})}
	fl.f = &Follower{St: st, Cluster: "default", Log: slog.New(slog.DiscardHandler), Wait: 2 * time.Second, Legacy: legacy,
		Stats: func(s Stats) { fl.mu.Lock(); fl.st = s; fl.mu.Unlock() }}
	for _, o := range opts {
		o(fl.f)
	}
	go func() {
		defer close(fl.done)
		fl.f.Run(ctx, func(d Delivery) {
			fl.mu.Lock()
			defer fl.mu.Unlock()
			fl.deliveries = append(fl.deliveries, d.Whole)
			fl.sizes = append(fl.sizes, d.Size())
			fl.last = applyDelivery(fl.last, d)
		})
	}()
	t.Cleanup(func() { cancel(); <-fl.done })
	return fl
}

// want waits until the follower's set equals the store's ipcache prefix.
func (fl *follower) want(t *testing.T, st store.Store) {
	t.Helper()
	if c, ok := st.(*counting); ok {
		st = c.Store // the test's own reads are not the follower's
	}
	kvs, _, err := st.List(context.Background(), store.IPPrefix+"default/")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, kv := range kvs {
		m[kv.Key] = string(kv.Value)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		fl.mu.Lock()
		got := fmt.Sprint(fl.last)
		fl.mu.Unlock()
		if got == fmt.Sprint(m) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("follower has %s, store has %s", got, fmt.Sprint(m))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (fl *follower) stats() Stats {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	return fl.st
}

// TestFollowerReadsChangesNotState: after the first list, 50 changes on a
// prefix of 500 keys cost the follower the log entries only, not 50 lists
// of 500 keys (the list mode's cost).
func TestFollowerReadsChangesNotState(t *testing.T) {
	st := newStore(t)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	for i := range 500 {
		if err := st.Put(context.Background(), ipKey(i), []byte("v0"), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	fl := follow(t, st, nil)
	fl.want(t, st)
	st.listKeys.Store(0)
	st.watchKeys.Store(0)
	for c := range 50 {
		write(t, st, w, c, fmt.Sprintf("v%d", c+1))
		fl.want(t, st)
	}
	write(t, st, w, 7, "")
	fl.want(t, st)
	if s := fl.stats(); s.Lists != 1 || s.Mode != "log" {
		t.Errorf("stats = %+v, want one list, mode log", s)
	}
	// Each read returns the log (at most 51 entries so far), never the
	// 500 keys: well under one list per change.
	if n := st.listKeys.Load(); n != 0 {
		t.Errorf("follower listed %d keys after the first list, want 0", n)
	}
	if n := st.watchKeys.Load(); n > 51*52/2+51 {
		t.Errorf("log reads returned %d keys for 51 changes, want at most %d", n, 51*52/2+51)
	}
	// The list is delivered whole, each change as itself: the agent's
	// cost per change is the change, not the 500 keys.
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if len(fl.deliveries) < 2 || !fl.deliveries[0] || fl.sizes[0] != 500 {
		t.Fatalf("deliveries (whole?) %v of %v keys: want the list of 500 first", fl.deliveries, fl.sizes)
	}
	carried := 0
	for i, whole := range fl.deliveries[1:] {
		if whole {
			t.Errorf("delivery %d after the list was whole (%d keys); want the change only", i+1, fl.sizes[i+1])
		}
		carried += fl.sizes[i+1]
	}
	if carried > 51 {
		t.Errorf("51 changes were delivered as %d keys, want at most 51", carried)
	}
}

// TestFollowerListsAfterPrune: a follower that did not read the log
// before the pruner deleted entries it had not applied lists again, and
// ends with the store's state.
func TestFollowerListsAfterPrune(t *testing.T) {
	st := newStore(t)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	write(t, st, w, 1, "a")
	var paused atomic.Bool
	fl := follow(t, &pausable{Store: st, paused: &paused}, nil)
	fl.want(t, st)
	paused.Store(true)
	write(t, st, w, 2, "b")
	write(t, st, w, 1, "")
	p := &Pruner{St: st, Cluster: "default", Keep: time.Minute, Now: func() time.Time { return time.Now().Add(time.Hour) }}
	n, err := p.Round(context.Background())
	if err != nil || n != 3 {
		t.Fatalf("prune round = %d, %v; want 3 entries", n, err)
	}
	h, err := st.Get(context.Background(), HorizonKey("default"))
	if err != nil {
		t.Fatalf("no horizon after pruning: %v", err)
	}
	paused.Store(false)
	fl.want(t, st)
	if s := fl.stats(); s.Behind < 1 || s.Lists < 2 {
		t.Errorf("stats = %+v, want a list after falling behind the horizon %s", s, h.Value)
	}
	// The list after falling behind is delivered whole: the consumer's
	// copy must lose key 1, whose deletion it never saw.
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if whole := slices.Index(fl.deliveries[1:], true); whole < 0 {
		t.Errorf("deliveries (whole?) %v: the list after falling behind was not delivered whole", fl.deliveries)
	}
}

// pausable holds every log read while paused (a follower that is slow).
type pausable struct {
	store.Store
	paused *atomic.Bool
}

func (p *pausable) Watch(ctx context.Context, prefix string, idx uint64, w time.Duration) ([]store.KV, uint64, error) {
	for p.paused.Load() && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	return p.Store.Watch(ctx, prefix, idx, w)
}

// TestFollowerLegacyHostLists: while a host that does not write the log is
// in the fleet, its changes (no log entry) still arrive: the follower lists.
func TestFollowerLegacyHostLists(t *testing.T) {
	st := newStore(t)
	var legacy atomic.Bool
	legacy.Store(true)
	fl := follow(t, st, legacy.Load)
	if err := st.Put(context.Background(), ipKey(3), []byte("old-writer"), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	fl.want(t, st)
	if s := fl.stats(); s.Mode != "list" {
		t.Errorf("mode = %q with a legacy host, want list", s.Mode)
	}
	legacy.Store(false)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	write(t, st, w, 4, "new-writer")
	fl.want(t, st)
	deadline := time.Now().Add(5 * time.Second)
	for fl.stats().Mode != "log" && time.Now().Before(deadline) {
		write(t, st, w, 5, time.Now().String())
		time.Sleep(50 * time.Millisecond)
	}
	if s := fl.stats(); s.Mode != "log" {
		t.Errorf("mode = %q once no legacy host is left, want log", s.Mode)
	}
	fl.want(t, st)
}

// TestFollowerRefusesBadEntries: a malformed entry and an op outside the
// ipcache prefix are skipped and counted; good entries still apply.
func TestFollowerRefusesBadEntries(t *testing.T) {
	st := newStore(t)
	fl := follow(t, st, nil)
	fl.want(t, st)
	ctx := context.Background()
	if err := st.Put(ctx, entryPrefix("default")+"evil/1", []byte("{not json"), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	w := &Writer{St: st, Cluster: "default", Node: "evil"}
	if err := w.Append(ctx, []Op{{Key: store.PolicyKey("allow-all"), Value: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	write(t, st, &Writer{St: st, Cluster: "default", Node: "h1"}, 9, "ok")
	fl.want(t, st)
	if s := fl.stats(); s.Malformed < 1 {
		t.Errorf("stats = %+v, want the bad entries counted", s)
	}
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if _, ok := fl.last[store.PolicyKey("allow-all")]; ok {
		t.Error("an op outside the ipcache prefix was applied")
	}
}

// TestWriterSplitsLargeChanges: a change set larger than an entry may be
// becomes several entries, each under the size bound.
func TestWriterSplitsLargeChanges(t *testing.T) {
	st := newStore(t)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	ops := make([]Op, 3000)
	for i := range ops {
		ops[i] = Op{Key: ipKey(i), Value: make([]byte, 150)}
	}
	if err := w.Append(context.Background(), ops); err != nil {
		t.Fatal(err)
	}
	kvs, _, err := st.List(context.Background(), entryPrefix("default"))
	if err != nil {
		t.Fatal(err)
	}
	p := parse(kvs, "default")
	n := 0
	for _, l := range p.entries {
		n += len(l.e.Ops)
	}
	if len(kvs) < 2 || n != len(ops) {
		t.Errorf("%d entries with %d ops, want several entries with %d ops", len(kvs), n, len(ops))
	}
	for _, kv := range kvs {
		if len(kv.Value) > maxEntry {
			t.Errorf("entry %s is %d bytes, over %d", kv.Key, len(kv.Value), maxEntry)
		}
	}
}

func TestPureGo(t *testing.T) {
	testenv.ForbidDeps(t, []string{"github.com/rackwire/rackwire/daemon/iplog"},
		"github.com/cilium/ebpf", "github.com/vishvananda/netlink", "github.com/hashicorp/consul/api")
}

// TestFollowerNoListLoopAfterPrune: the last change's entry sits one index
// above its key, so once it is pruned the horizon is above the ipcache
// prefix's index; a follower that has applied it must not take that for
// falling behind (it listed again on every log read before the fix).
func TestFollowerNoListLoopAfterPrune(t *testing.T) {
	st := newStore(t)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	write(t, st, w, 1, "a")
	fl := follow(t, st, nil)
	fl.want(t, st)
	p := &Pruner{St: st, Cluster: "default", Keep: time.Minute, Now: func() time.Time { return time.Now().Add(time.Hour) }}
	if n, err := p.Round(context.Background()); err != nil || n != 1 {
		t.Fatalf("prune round = %d, %v; want 1 entry", n, err)
	}
	// A restart lists with the horizon already above the prefix's index.
	fl2 := follow(t, st, nil)
	fl2.want(t, st)
	time.Sleep(time.Second)
	for i, f := range []*follower{fl, fl2} {
		if s := f.stats(); s.Lists > 1 {
			t.Errorf("follower %d: %d lists in a second after the prune (behind %d times), want 1", i, s.Lists, s.Behind)
		}
	}
}

// slowList runs hook inside its first List of the ipcache prefix: what
// happens in the store while a list is slower than the log's keep.
type slowList struct {
	*counting
	once sync.Once
	hook func()
}

func (s *slowList) List(ctx context.Context, p string) ([]store.KV, uint64, error) {
	kvs, i, err := s.counting.List(ctx, p)
	if p == store.IPPrefix+"default/" {
		s.once.Do(s.hook)
	}
	return kvs, i, err
}

// TestFollowerSaysListSlowerThanKeep: a change written and pruned while
// the follower lists leaves it behind right after its list; it lists
// again, and counts and says that a list takes longer than the keep (the
// loop of a follower whose lists are always slower than the keep).
func TestFollowerSaysListSlowerThanKeep(t *testing.T) {
	c := newStore(t)
	w := &Writer{St: c, Cluster: "default", Node: "h1"}
	write(t, c, w, 1, "a")
	p := &Pruner{St: c.Store, Cluster: "default", Keep: time.Minute, Now: func() time.Time { return time.Now().Add(time.Hour) }}
	st := &slowList{counting: c, hook: func() {
		write(t, c.Store, w, 2, "b")
		if _, err := p.Round(context.Background()); err != nil {
			t.Error(err)
		}
	}}
	fl := follow(t, st, nil)
	for deadline := time.Now().Add(10 * time.Second); fl.stats().Lists < 2 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	fl.want(t, c)
	if s := fl.stats(); s.BehindAfterList != 1 || s.Lists != 2 {
		t.Fatalf("stats %+v: want 1 time behind right after a list, 2 lists", s)
	}
}

// keyed gives the embedded store what Consul has: a watch of key names
// and reads of many keys at once. Its first GetMany runs inject first:
// writes that land between the names and the read of the entries.
type keyed struct {
	store.Store
	inject   func()
	getMany  atomic.Int64
	injected atomic.Bool
}

func (k *keyed) WatchKeys(ctx context.Context, p string, idx uint64, w time.Duration) ([]string, uint64, error) {
	kvs, i, err := k.Store.Watch(ctx, p, idx, w)
	names := make([]string, 0, len(kvs))
	for _, kv := range kvs {
		names = append(names, kv.Key)
	}
	return names, i, err
}

func (k *keyed) GetMany(ctx context.Context, keys []string) ([]store.KV, uint64, error) {
	if k.inject != nil && !k.injected.Swap(true) {
		k.inject()
	}
	k.getMany.Add(1)
	var out []store.KV
	for _, key := range keys {
		kv, err := k.Store.Get(ctx, key)
		if err == nil {
			out = append(out, kv)
		}
	}
	_, idx, err := k.Store.List(ctx, ClusterPrefix("default"))
	return out, idx, err
}

// followingNames writes n keys with h1's writer to c and starts a follower
// on st, returning once it holds them and watches the log's key names.
func followingNames(t *testing.T, c *counting, st store.Store, n int, opts ...func(*Follower)) (*Writer, *follower) {
	t.Helper()
	w := &Writer{St: c, Cluster: "default", Node: "h1"}
	for i := range n {
		write(t, c, w, i, fmt.Sprintf("v%d", i))
	}
	fl := follow(t, st, nil, opts...)
	fl.want(t, c)
	for deadline := time.Now().Add(10 * time.Second); fl.stats().KeyReads == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the follower does not watch key names: %+v", fl.stats())
		}
	}
	return w, fl
}

// TestFollowerReadsNewEntriesOnly: with a store that reads many keys at
// once, a follower reads only the entries it has not seen; an entry
// written between the names and that read is applied at the next wake
// (the read's own, later index is not taken as applied), and one pruned
// before the read is caught by the horizon.
func TestFollowerReadsNewEntriesOnly(t *testing.T) {
	c := newStore(t)
	st := &keyed{Store: c}
	w, fl := followingNames(t, c, st, 20)
	// The write that lands in the middle of the follower's next read.
	st.inject = func() { write(t, c, w, 101, "mid") }
	write(t, c, w, 100, "a")
	for deadline := time.Now().Add(10 * time.Second); !st.injected.Load(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the follower never read new entries by name")
		}
	}
	fl.want(t, c) // 100 and 101
	if st.getMany.Load() == 0 {
		t.Fatal("the follower never read new entries by name")
	}
	s := fl.stats()
	if s.EntryReads == 0 || s.Lists != 1 {
		t.Fatalf("stats %+v: want entry reads and the first list only", s)
	}

	// Pruned before it was read: the horizon sends the follower to list.
	before := fl.stats()
	p := &Pruner{St: c, Cluster: "default", Keep: time.Minute, Log: slog.New(slog.DiscardHandler),
		Now: func() time.Time { return time.Now().Add(time.Hour) }}
	st.injected.Store(false)
	st.inject = func() {
		if _, err := p.Round(context.Background()); err != nil {
			t.Error(err)
		}
	}
	write(t, c, w, 102, "gone")
	fl.want(t, c)
	deadline := time.Now().Add(10 * time.Second)
	for fl.stats().Behind == before.Behind {
		if time.Now().After(deadline) {
			t.Fatalf("an entry pruned before its read did not make the follower list: %+v", fl.stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFollowerQuietPause: a log read that changed none of the keys (a
// restarted host journals its unchanged keys again) is followed by the
// Quiet pause, so a fleet-wide restart costs a follower about one read
// per pause rather than one per start; a read that changed keys is
// followed by the short pace only.
func TestFollowerQuietPause(t *testing.T) {
	st := newStore(t)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	var quiet atomic.Int64
	fl := follow(t, st, nil, func(f *Follower) {
		f.Quiet = func() time.Duration { quiet.Add(1); return time.Millisecond }
	})
	write(t, st, w, 1, "v1")
	fl.want(t, st)
	time.Sleep(300 * time.Millisecond)
	q := quiet.Load()
	// The same value journaled again: read, nothing changed, a pause.
	if err := w.Append(context.Background(), []Op{{Key: ipKey(1), Value: []byte("v1")}}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); quiet.Load() == q; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no quiet pause after a read that changed nothing")
		}
	}
	time.Sleep(300 * time.Millisecond)
	q = quiet.Load()
	write(t, st, w, 2, "v2")
	fl.want(t, st)
	time.Sleep(300 * time.Millisecond)
	if n := quiet.Load() - q; n != 0 {
		t.Errorf("%d quiet pauses after a read that changed a key, want 0", n)
	}
}

// TestFollowerDeliversEmptyListWhole: a list of an empty prefix is a
// delivery (whole, no key), so that the consumer learns the fleet has no
// records; the first change after it is delivered as itself.
func TestFollowerDeliversEmptyListWhole(t *testing.T) {
	st := newStore(t)
	w := &Writer{St: st, Cluster: "default", Node: "h1"}
	fl := follow(t, st, nil)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		fl.mu.Lock()
		n := len(fl.deliveries)
		fl.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no delivery after listing an empty prefix")
		}
	}
	write(t, st, w, 1, "a")
	fl.want(t, st)
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if !fl.deliveries[0] || fl.sizes[0] != 0 {
		t.Fatalf("first delivery whole=%v with %d keys; want the empty list, whole", fl.deliveries[0], fl.sizes[0])
	}
	if last := len(fl.deliveries) - 1; fl.deliveries[last] || fl.sizes[last] != 1 {
		t.Fatalf("the change was delivered whole=%v with %d keys; want itself", fl.deliveries[last], fl.sizes[last])
	}
}

// lagging is keyed whose reads of many keys come from a server behind
// the one that lists the names: the entries hide matches are left out of
// the next lag reads.
type lagging struct {
	keyed
	mu   sync.Mutex
	hide func(key string) bool
	lag  int
}

func (l *lagging) GetMany(ctx context.Context, keys []string) ([]store.KV, uint64, error) {
	kvs, idx, err := l.keyed.GetMany(ctx, keys)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lag <= 0 || err != nil {
		return kvs, idx, err
	}
	out := kvs[:0:0]
	for _, kv := range kvs {
		if !l.hide(kv.Key) {
			out = append(out, kv)
		}
	}
	if len(out) < len(kvs) {
		l.lag--
	}
	return out, idx, nil
}

// TestFollowerReadsLaggingEntriesAgain: the names of new entries come from
// one server (a stale blocking query) and their values from another (the
// leader); when the second has not applied an entry the first listed, the
// read misses it. The entry was not pruned (the horizon is below it), so
// the follower reads again rather than take the names' index as applied,
// which lost the entry for good: 11 of 100 agents ended two endpoints
// short in a fleet's cold start (tests/fleet).
func TestFollowerReadsLaggingEntriesAgain(t *testing.T) {
	c := newStore(t)
	st := &lagging{keyed: keyed{Store: c}}
	// The daemon's pause after a read that changed nothing (1–2 s) must
	// not come between a lagging read and the next one.
	_, fl := followingNames(t, c, st, 5, func(f *Follower) { f.Quiet = func() time.Duration { return 3 * time.Second } })
	// h2's entries are missing from the next 3 reads that name them.
	st.mu.Lock()
	st.hide = func(key string) bool { return strings.HasPrefix(key, entryPrefix("default")+"h2/") }
	st.lag = 3
	st.mu.Unlock()
	write(t, c, &Writer{St: c, Cluster: "default", Node: "h2"}, 100, "late")
	for deadline := time.Now().Add(10 * time.Second); fl.stats().LagReads == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no lagging read: %+v", fl.stats())
		}
	}
	lagged := time.Now()
	fl.want(t, c)
	if d := time.Since(lagged); d > 2*time.Second {
		t.Fatalf("the entry was applied %v after the first lagging read; want the reads again at the short pace, not the quiet pause", d)
	}
	s := fl.stats()
	if s.LagReads != 3 || s.Lists != 1 || s.Behind != 0 {
		t.Fatalf("stats %+v: want 3 reads again after lagging reads, no list", s)
	}

	// A name that never becomes readable (not the pruner's doing) ends
	// in a list after lagRetries reads.
	st.mu.Lock()
	st.lag = 1 << 30
	st.mu.Unlock()
	write(t, c, &Writer{St: c, Cluster: "default", Node: "h2"}, 101, "never")
	fl.want(t, c)
	if s := fl.stats(); s.Lists != 2 || s.LagReads < 3+lagRetries {
		t.Fatalf("stats %+v: want a list after %d lagging reads", s, lagRetries)
	}
}
