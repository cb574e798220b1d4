package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/consultest"
)

// TestAnchoredWatchSleepsThroughOtherWritesConsul: on a real Consul, the
// empty policy and service prefixes woke on every write in the store
// (TestWatchEmptyPrefixConsul shows it for the plain watch, which the
// policy and service watches were): a fleet-wide restart cost every agent
// a read of each per second (docs/scale.md). With its anchor, a watch
// sleeps through writes elsewhere, still wakes at once for its own keys,
// and never hands on the anchor or the keys of a longer prefix.
func TestAnchoredWatchSleepsThroughOtherWritesConsul(t *testing.T) {
	srv := consultest.Start(t)
	newStore := func(node string) *countingStore {
		st, err := consul.New(consul.Options{Address: srv.HTTPAddr, Prefix: "rwt/", Node: node, SessionTTL: time.Minute}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = st.Close() })
		return &countingStore{Store: st}
	}
	st := newStore("h1")
	cfg := config.Default()
	cfg.Store.Backend = "consul"
	pauses := make(chan time.Duration, 64)
	delivered := make(chan []store.KV, 16)
	a := &agent{st: st, cfg: cfg, log: slog.New(slog.DiscardHandler),
		watchSleep: func(ctx context.Context, d time.Duration) bool { pauses <- d; return ctx.Err() == nil }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	prefix := store.ServicePrefix + "prod/"
	go func() {
		defer close(done)
		a.watchAnchored(ctx, prefix, func(kvs []store.KV) { delivered <- kvs })
	}()
	t.Cleanup(func() { cancel(); <-done })
	deliver := func(what string) []store.KV { t.Helper(); return within(t, delivered, what) }
	pause := func(what string) time.Duration { t.Helper(); return within(t, pauses, what) }
	writeElsewhere := func(i int) {
		t.Helper()
		if err := st.Put(ctx, fmt.Sprintf("%sprod/h%d", store.NodePrefix, i), []byte(`{}`), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	if kvs := deliver("first read"); len(kvs) != 0 {
		t.Fatalf("first delivery %v, want empty", kvs)
	}
	pause("first read")
	anchor := store.ServicePrefix + "prod"
	if got := a.anchors.lacking(); len(got) != 1 || got[0] != anchor {
		t.Fatalf("lacking anchors %q, want [%s]", got, anchor)
	}
	// Without its anchor the prefix wakes on a write elsewhere: what the
	// policy and service watches did on every write of a fleet's starts.
	writeElsewhere(0)
	if d := pause("a write elsewhere, no anchor"); d < settleMin {
		t.Errorf("pause after a spurious wake %s, want at least %s", d, settleMin)
	}

	if n := a.createAnchors(ctx); n != 1 {
		t.Fatalf("createAnchors wrote %d anchors, want 1", n)
	}
	pause("the anchor appeared") // a change of the listed prefix, none under the prefix
	if got := a.anchors.lacking(); len(got) != 0 {
		t.Fatalf("lacking anchors %q after the creation, want none", got)
	}
	// A second host that also saw it missing writes nothing (CAS index 0).
	b := &agent{st: newStore("h2"), cfg: cfg, log: slog.New(slog.DiscardHandler)}
	b.anchors.under(prefix, nil)
	if n := b.createAnchors(ctx); n != 0 {
		t.Errorf("a second host's createAnchors wrote %d, want 0 (the anchor exists)", n)
	}
	if kv, err := st.Get(ctx, anchor); err != nil || kv.ModifyIndex != kv.CreateIndex || string(kv.Value) != string(anchorValue) {
		t.Errorf("anchor %+v, %v; want written once, with its note", kv, err)
	}

	// Now writes elsewhere leave the watch asleep.
	reads := st.entered.Load()
	const writes = 5
	for i := 1; i <= writes; i++ {
		writeElsewhere(i)
	}
	select {
	case d := <-pauses:
		t.Errorf("the anchored watch woke (pause %s) on %d writes elsewhere, want asleep", d, writes)
	case <-time.After(2 * time.Second):
	}
	if n := st.entered.Load() - reads; n != 0 {
		t.Errorf("%d writes elsewhere cost %d reads, want 0", writes, n)
	}

	// Its own keys still wake it at once, without the anchor.
	if err := st.Put(ctx, prefix+"db", []byte(`{"name":"db"}`), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if kvs := deliver("a service written"); len(kvs) != 1 || kvs[0].Key != prefix+"db" {
		t.Errorf("delivery %v, want the key %sdb only", kvs, prefix)
	}
	if d := pause("a service written"); d != watchPace {
		t.Errorf("pause after a change %s, want %s", d, watchPace)
	}
	// A longer prefix's key (a cluster named prod2) wakes it but is not
	// handed on.
	if err := st.Put(ctx, store.ServicePrefix+"prod2/web", []byte(`{"name":"web"}`), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if d := pause("a key of cluster prod2"); d < settleMin {
		t.Errorf("pause after a wake by prod2 %s, want at least %s", d, settleMin)
	}
	select {
	case kvs := <-delivered:
		t.Errorf("delivery %v for a key of another cluster", kvs)
	default:
	}
}
