package iplog_test

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/consultest"
)

// meter wraps the Consul store: it counts the reads a follower makes and
// the value bytes they return, and can hold the follower's log watches.
type meter struct {
	*consul.Store
	reads, valueBytes atomic.Int64
	hold              sync.RWMutex
}

func (m *meter) count(kvs []store.KV) {
	m.reads.Add(1)
	for _, kv := range kvs {
		m.valueBytes.Add(int64(len(kv.Value)))
	}
}

func (m *meter) List(ctx context.Context, p string) ([]store.KV, uint64, error) {
	kvs, i, err := m.Store.List(ctx, p)
	m.count(kvs)
	return kvs, i, err
}

func (m *meter) Watch(ctx context.Context, p string, idx uint64, w time.Duration) ([]store.KV, uint64, error) {
	m.hold.RLock()
	defer m.hold.RUnlock()
	kvs, i, err := m.Store.Watch(ctx, p, idx, w)
	m.count(kvs)
	return kvs, i, err
}

func (m *meter) WatchKeys(ctx context.Context, p string, idx uint64, w time.Duration) ([]string, uint64, error) {
	m.hold.RLock()
	defer m.hold.RUnlock()
	ks, i, err := m.Store.WatchKeys(ctx, p, idx, w)
	m.count(nil)
	return ks, i, err
}

func (m *meter) GetMany(ctx context.Context, keys []string) ([]store.KV, uint64, error) {
	m.hold.RLock()
	defer m.hold.RUnlock()
	kvs, i, err := m.Store.GetMany(ctx, keys)
	m.count(kvs)
	return kvs, i, err
}

// putEntry writes ops ipcache keys of entry e (10.1.e.0, 10.1.e.1, ...)
// straight into Consul in one transaction, then their change-log entry, as
// a host's publisher does.
func putEntry(t *testing.T, kv *api.KV, w *iplog.Writer, e, ops int, value []byte) {
	t.Helper()
	var lops []iplog.Op
	var txn api.KVTxnOps
	for o := range ops {
		k := fmt.Sprintf("%sdefault/10.1.%d.%d", store.IPPrefix, e, o)
		lops = append(lops, iplog.Op{Key: k, Value: value})
		txn = append(txn, &api.KVTxnOp{Verb: api.KVSet, Key: "rwt/" + k, Value: value})
	}
	if ok, _, _, err := kv.Txn(txn, nil); err != nil || !ok {
		t.Fatalf("write the ipcache keys: %v %v", ok, err)
	}
	if err := w.Append(context.Background(), lops); err != nil {
		t.Fatal(err)
	}
}

func openConsul(t *testing.T, srv *consultest.Agent, node string) *consul.Store {
	t.Helper()
	s, err := consul.New(consul.Options{Address: srv.HTTPAddr, Prefix: "rwt/", Node: node, SessionTTL: time.Minute,
		RenewInterval: time.Second, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second, CallTimeout: 10 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// follow runs a follower on m until the test ends; snap returns its last
// stats and the number of keys it last delivered, waitFor waits (≤ 30 s)
// until cond holds for them, holds reports whether its last delivery
// held a key.
func follow(t *testing.T, m *meter, wait time.Duration) (snap func() (iplog.Stats, int), waitFor func(string, func(iplog.Stats, int) bool), holds func(string) bool) {
	var mu sync.Mutex
	var got map[string]bool
	var stats iplog.Stats
	fctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	f := &iplog.Follower{St: m, Cluster: "default", Log: slog.New(slog.DiscardHandler), Wait: wait,
		Stats: func(s iplog.Stats) { mu.Lock(); stats = s; mu.Unlock() }}
	go func() {
		defer close(done)
		f.Run(fctx, func(d iplog.Delivery) {
			mu.Lock()
			defer mu.Unlock()
			if d.Whole || got == nil {
				got = map[string]bool{}
				for _, kv := range d.Set {
					got[kv.Key] = true
				}
			}
			for _, kv := range d.Changed {
				got[kv.Key] = true
			}
			for _, k := range d.Removed {
				delete(got, k)
			}
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	snap = func() (iplog.Stats, int) { mu.Lock(); defer mu.Unlock(); return stats, len(got) }
	holds = func(key string) bool { mu.Lock(); defer mu.Unlock(); return got[key] }
	waitFor = func(what string, cond func(iplog.Stats, int) bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if s, n := snap(); cond(s, n) {
				return
			}
			if time.Now().After(deadline) {
				s, n := snap()
				t.Fatalf("%s: not after 30s (stats %+v, %d keys)", what, s, n)
			}
		}
	}
	return snap, waitFor, holds
}

// TestPruneOfBulkConsul: after a bulk of entries, the pruner's deletions
// cost a follower on real Consul a few reads of key names, not a read of
// the rest of the log per deletion. Before: the pruner deleted one entry
// per write and every deletion woke every follower, which read the whole
// remaining log, values and all — the fleet's steady ~100 requests/s and
// MB/s "list loop" after every bulk (docs/scale.md).
func TestPruneOfBulkConsul(t *testing.T) {
	srv := consultest.Start(t)
	ctx := context.Background()
	open := func(node string) *consul.Store { return openConsul(t, srv, node) }
	st := open("h1")
	w := &iplog.Writer{St: st, Cluster: "default", Node: "h1"}
	const entries, opsPer = 320, 16
	value := []byte(`{"identity":12345,"node":"h1","tunnel":"10.0.0.1","padding":"0123456789"}`)
	logBytes := 0
	kv := srv.Client(t).KV()
	for e := range entries {
		putEntry(t, kv, w, e, opsPer, value)
		logBytes += opsPer * len(value)
	}

	m := &meter{Store: open("h2")}
	snap, waitFor, _ := follow(t, m, 5*time.Second)
	waitFor("the follower read the bulk", func(s iplog.Stats, n int) bool { return s.Mode == "log" && s.LogReads > 0 && n == entries*opsPer })
	time.Sleep(300 * time.Millisecond)
	before, _ := snap()
	m.reads.Store(0)
	m.valueBytes.Store(0)

	p := &iplog.Pruner{St: st, Cluster: "default", Keep: time.Minute, Log: slog.New(slog.DiscardHandler),
		Now: func() time.Time { return time.Now().Add(time.Hour) }}
	start := time.Now()
	if n, err := p.Round(ctx); err != nil || n != entries {
		t.Fatalf("prune round = %d, %v; want %d entries", n, err, entries)
	}
	took := time.Since(start)
	time.Sleep(time.Second) // the follower's last wakes
	reads, vb := m.reads.Load(), m.valueBytes.Load()
	after, n := snap()
	t.Logf("prune of %d entries (%d B of values) took %s; the follower made %d reads returning %d B of values, %d lists (%d before)",
		entries, logBytes, took.Truncate(time.Millisecond), reads, vb, after.Lists, before.Lists)
	if vb > int64(logBytes)/4 {
		t.Errorf("the follower read %d B of log values during the prune (the log held %d B): it re-reads the log on deletions", vb, logBytes)
	}
	if maxReads := int64(entries/store.MaxBatch + 4); reads > maxReads {
		t.Errorf("the follower made %d reads during the prune of %d entries, want ≤ %d (one per batch of %d and the horizon)", reads, entries, maxReads, store.MaxBatch)
	}
	if after.Lists != before.Lists || n != entries*opsPer {
		t.Errorf("after the prune: %d lists (was %d), %d keys (want %d): a prune the follower kept up with is no reason to list", after.Lists, before.Lists, n, entries*opsPer)
	}

	// An entry that comes and goes while the follower does not read (held
	// here) is noticed by the horizon: the follower lists again.
	m.hold.Lock()
	k := store.IPPrefix + "default/10.9.9.9"
	if err := st.Put(ctx, k, value, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := w.Append(ctx, []iplog.Op{{Key: k, Value: value}}); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Round(ctx); err != nil || n != 1 {
		t.Fatalf("prune round = %d, %v; want 1 entry", n, err)
	}
	m.hold.Unlock()
	waitFor("the follower lists after missing a pruned entry", func(s iplog.Stats, n int) bool {
		return s.Behind > after.Behind && n == entries*opsPer+1
	})
}

// writes counts the pruner's writes under the log's prefix.
type writes struct {
	*consul.Store
	n atomic.Int64
}

func (w *writes) CAS(ctx context.Context, k string, v []byte, idx uint64, o store.PutOptions) (bool, error) {
	w.n.Add(1)
	return w.Store.CAS(ctx, k, v, idx, o)
}

func (w *writes) DeleteCAS(ctx context.Context, k string, idx uint64) (bool, error) {
	w.n.Add(1)
	return w.Store.DeleteCAS(ctx, k, idx)
}

func (w *writes) DeleteCASBatch(ctx context.Context, kvs []store.KV) (bool, error) {
	w.n.Add(1)
	return w.Store.DeleteCASBatch(ctx, kvs)
}

func (w *writes) CASDeleteCASBatch(ctx context.Context, set store.KV, kvs []store.KV) (bool, error) {
	w.n.Add(1)
	return w.Store.CASDeleteCASBatch(ctx, set, kvs)
}

// TestPruneWakesOnceConsul: a prune round that raises the horizon and
// deletes up to a batch of entries is one write under the log's prefix on
// real Consul (the horizon's ModifyIndex is the prefix's index after the
// round), so it wakes a follower once, for a read of the key names and
// one of the horizon; before, the horizon and the deletion were two
// writes and woke every follower of the fleet twice per round (the
// steady request rate of docs/scale.md "Fleet-wide restart"). A follower
// held while an entry came and went still lists again.
func TestPruneWakesOnceConsul(t *testing.T) {
	srv := consultest.Start(t)
	ctx := context.Background()
	open := func(node string) *consul.Store { return openConsul(t, srv, node) }
	st := &writes{Store: open("h1")}
	w := &iplog.Writer{St: st, Cluster: "default", Node: "h1"}
	value := []byte(`{"identity":12345,"node":"h1","tunnel":"10.0.0.1"}`)
	put := func(i int) {
		t.Helper()
		k := fmt.Sprintf("%sdefault/10.1.0.%d", store.IPPrefix, i)
		if err := st.Put(ctx, k, value, store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := w.Append(ctx, []iplog.Op{{Key: k, Value: value}}); err != nil {
			t.Fatal(err)
		}
	}
	const entries = 5
	for i := range entries {
		put(i)
	}

	m := &meter{Store: open("h2")}
	// A wait longer than the counted part of the test (≈ 2 s from the
	// follower's last read): every key read counted is a wake-up by a
	// change, none a wait that elapsed. Holding the follower below waits
	// for its parked read to end (≤ this wait).
	snap, waitFor, _ := follow(t, m, 10*time.Second)
	// Caught up, and parked in a blocking read of the key names.
	waitFor("the follower read the log", func(s iplog.Stats, n int) bool { return s.Mode == "log" && s.KeyReads > 0 && n == entries })
	time.Sleep(500 * time.Millisecond)
	before, _ := snap()

	p := &iplog.Pruner{St: st, Cluster: "default", Keep: time.Minute, Log: slog.New(slog.DiscardHandler),
		Now: func() time.Time { return time.Now().Add(time.Hour) }}
	st.n.Store(0)
	if n, err := p.Round(ctx); err != nil || n != entries {
		t.Fatalf("prune round = %d, %v; want %d entries", n, err, entries)
	}
	writes := st.n.Load()
	kvs, idx, err := st.List(ctx, iplog.ClusterPrefix("default"))
	if err != nil {
		t.Fatal(err)
	}
	var horizon store.KV
	for _, kv := range kvs {
		if kv.Key == iplog.HorizonKey("default") {
			horizon = kv
		} else {
			t.Errorf("after the prune the log still holds %s", kv.Key)
		}
	}
	waitFor("the follower woke for the prune", func(s iplog.Stats, _ int) bool { return s.KeyReads > before.KeyReads })
	time.Sleep(time.Second) // a second wake-up, if the round made one
	after, n := snap()
	t.Logf("prune round of %d entries: %d writes; horizon %s at index %d, log prefix index %d; the follower woke %d times (key reads %d → %d), %d lists (%d before)",
		entries, writes, horizon.Value, horizon.ModifyIndex, idx, after.KeyReads-before.KeyReads, before.KeyReads, after.KeyReads, after.Lists, before.Lists)
	if writes != 1 || horizon.ModifyIndex != idx {
		t.Errorf("the prune round made %d writes (horizon at index %d, the log's prefix at %d): want one transaction, the horizon and the deletion at one index", writes, horizon.ModifyIndex, idx)
	}
	if woke := after.KeyReads - before.KeyReads; woke != 1 {
		t.Errorf("the follower woke %d times for one prune round, want 1", woke)
	}
	if after.Lists != before.Lists || after.Behind != before.Behind || n != entries {
		t.Errorf("after the prune: %d lists (was %d), behind %d (was %d), %d keys (want %d): a prune the follower kept up with is no reason to list",
			after.Lists, before.Lists, after.Behind, before.Behind, n, entries)
	}

	// Held while an entry comes and goes in one round's transaction: the
	// horizon it raised in that same write sends the follower to list.
	m.hold.Lock()
	put(entries)
	if n, err := p.Round(ctx); err != nil || n != 1 {
		m.hold.Unlock()
		t.Fatalf("prune round = %d, %v; want 1 entry", n, err)
	}
	m.hold.Unlock()
	waitFor("the follower lists after missing a pruned entry", func(s iplog.Stats, n int) bool {
		return s.Behind > after.Behind && s.Lists > after.Lists && n == entries+1
	})
}

// TestFollowerReadsOnlyNewEntriesConsul: one change costs a follower on
// real Consul that change's entry (and the log's key names), not the log's
// window of recent changes. Before, every new entry name made the follower
// read the whole log, values and all: with 300 recent entries of 16 keys
// in the log, one new entry of one key cost 709,459 B of values (the
// entries with their JSON framing); now 173 B.
func TestFollowerReadsOnlyNewEntriesConsul(t *testing.T) {
	srv := consultest.Start(t)
	st := openConsul(t, srv, "h1")
	w := &iplog.Writer{St: st, Cluster: "default", Node: "h1"}
	const entries, opsPer = 300, 16
	value := []byte(`{"identity":12345,"node":"h1","tunnel":"10.0.0.1","padding":"0123456789"}`)
	kv := srv.Client(t).KV()
	put := func(e, ops int) { putEntry(t, kv, w, e, ops, value) }
	for e := range entries {
		put(e, opsPer)
	}
	m := &meter{Store: openConsul(t, srv, "h2")}
	snap, waitFor, holds := follow(t, m, 5*time.Second)
	waitFor("the follower holds the log", func(s iplog.Stats, n int) bool {
		return s.Mode == "log" && s.KeyReads > 0 && n == entries*opsPer
	})
	time.Sleep(300 * time.Millisecond)
	const changes = 5
	m.reads.Store(0)
	m.valueBytes.Store(0)
	for c := range changes {
		put(entries+c, 1)
		want, key := entries*opsPer+c+1, fmt.Sprintf("%sdefault/10.1.%d.0", store.IPPrefix, entries+c)
		waitFor("the follower applies change "+fmt.Sprint(c), func(_ iplog.Stats, n int) bool { return n == want && holds(key) })
	}
	time.Sleep(300 * time.Millisecond)
	reads, vb := m.reads.Load(), m.valueBytes.Load()
	logBytes := entries * opsPer * len(value)
	t.Logf("%d changes of one key with %d entries (%d B of values) in the log: the follower made %d reads returning %d B of values (%.0f B per change)",
		changes, entries, logBytes, reads, vb, float64(vb)/changes)
	// Each change's entry holds one value (~80 B) plus its JSON framing; a
	// read of the log would return the log's values.
	if perChange := vb / changes; perChange > 1024 {
		t.Errorf("one change of one key cost the follower %d B of values read (the log holds %d B): it reads the log, not the change", perChange, logBytes)
	}
	if s, _ := snap(); s.EntryReads == 0 {
		t.Errorf("no read of new entries only (stats %+v)", s)
	}
}
