package publish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/local"
)

// flaky wraps a store and fails every Put while down is set.
type flaky struct {
	store.Store
	down atomic.Bool
	puts atomic.Int64
}

func (f *flaky) Put(ctx context.Context, k string, v []byte, o store.PutOptions) error {
	f.puts.Add(1)
	if f.down.Load() {
		return store.ErrUnavailable
	}
	return f.Store.Put(ctx, k, v, o)
}

func newStore(t *testing.T) *flaky {
	t.Helper()
	s, err := local.Open(filepath.Join(t.TempDir(), "store.db"), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &flaky{Store: s}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func value(st store.Store, k string) string {
	kv, err := st.Get(context.Background(), k)
	if err != nil {
		return ""
	}
	return string(kv.Value)
}

func TestPublisher(t *testing.T) {
	st := newStore(t)
	p := New(st, time.Second, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx, time.Hour); close(done) }()
	defer func() { cancel(); <-done }()

	// Set writes; a group's Set replaces that group only.
	p.Set("a", map[string][]byte{"k/1": []byte("one"), "k/2": []byte("two")})
	p.Set("b", map[string][]byte{"k/3": []byte("three")})
	eventually(t, "first writes", func() bool { return value(st, "k/1") == "one" && value(st, "k/3") == "three" && p.Pending() == 0 })
	p.Set("a", map[string][]byte{"k/1": []byte("uno")})
	eventually(t, "group a replaced", func() bool {
		_, err := st.Get(context.Background(), "k/2")
		return value(st, "k/1") == "uno" && errors.Is(err, store.ErrNotFound) && value(st, "k/3") == "three"
	})

	// A lost key is written again; an overwritten one only with reassert.
	if err := st.Delete(context.Background(), "k/3"); err != nil {
		t.Fatal(err)
	}
	p.Seen("k/", lookup(map[string][]byte{"k/1": []byte("uno")}), false)
	eventually(t, "lost key republished", func() bool { return value(st, "k/3") == "three" })
	if err := st.Put(context.Background(), "k/1", []byte("evil"), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	p.Seen("k/", lookup(map[string][]byte{"k/1": []byte("evil"), "k/3": []byte("three")}), false)
	time.Sleep(100 * time.Millisecond)
	if v := value(st, "k/1"); v != "evil" {
		t.Fatalf("without reassert an overwritten key was rewritten: %q", v)
	}
	p.Seen("k/", lookup(map[string][]byte{"k/1": []byte("evil"), "k/3": []byte("three")}), true)
	eventually(t, "overwritten key reasserted", func() bool { return value(st, "k/1") == "uno" })

	// While the store fails, nothing is lost; it converges once it works.
	st.down.Store(true)
	p.Set("c", map[string][]byte{"k/4": []byte("four")})
	eventually(t, "a failed attempt", func() bool { return p.Pending() == 1 && st.puts.Load() > 0 })
	st.down.Store(false)
	p.Kick()
	eventually(t, "written after the store came back", func() bool { return value(st, "k/4") == "four" && p.Pending() == 0 })
}

// TestJournal: the journal gets the changes under its prefix, in order,
// once they are in the store; changes it refused are handed to it again
// before newer ones.
func TestJournal(t *testing.T) {
	st := newStore(t)
	p := New(st, time.Second, slog.New(slog.DiscardHandler))
	var mu sync.Mutex
	var got []string
	var refuse atomic.Bool
	p.SetJournal("ip/", func(_ context.Context, cs []Change) error {
		if refuse.Load() {
			return errors.New("journal down")
		}
		mu.Lock()
		defer mu.Unlock()
		for _, c := range cs {
			if value(st, c.Key) != string(c.Value) {
				t.Errorf("journal got %s=%q before the store held it", c.Key, c.Value)
			}
			got = append(got, fmt.Sprintf("%s=%s/%v", c.Key, c.Value, c.Deleted))
		}
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx, time.Hour); close(done) }()
	defer func() { cancel(); <-done }()
	journal := func() string { mu.Lock(); defer mu.Unlock(); return strings.Join(got, " ") }

	p.Set("node", map[string][]byte{"node/h": []byte("n")})
	p.Set("e1", map[string][]byte{"ip/1": []byte("a")})
	eventually(t, "first change journaled", func() bool { return journal() == "ip/1=a/false" })
	refuse.Store(true)
	p.Set("e1", nil)
	p.Set("e2", map[string][]byte{"ip/2": []byte("b")})
	eventually(t, "written while the journal refuses", func() bool { return value(st, "ip/2") == "b" })
	refuse.Store(false)
	p.Kick()
	eventually(t, "refused changes journaled again", func() bool {
		return journal() == "ip/1=a/false ip/2=b/false ip/1=/true" || journal() == "ip/1=a/false ip/1=/true ip/2=b/false"
	})
	// The store rewrote the owned keys under a new session: every
	// published key under the prefix is journaled again, nothing else.
	before := journal()
	p.Rejournal()
	eventually(t, "published keys journaled again", func() bool { return journal() == before+" ip/2=b/false" })
}

// TestRestartJournalsOnlyChanges: a restart writes every own key again but
// journals only the ones whose value changed, when the previous run left
// the journaled mark; without the mark (a run that died between a write
// and its journal entry) it journals every key, as before. Every host
// follows the journal, so what a fleet-wide restart journals, every host
// reads (docs/scale.md "Fleet-wide restart").
func TestRestartJournalsOnlyChanges(t *testing.T) {
	st := newStore(t)
	mark := filepath.Join(t.TempDir(), "publish-journaled")
	// run starts a publisher, sets kvs, waits until the store holds them
	// and nothing is pending, stops it and returns what it journaled.
	run := func(what string, kvs map[string][]byte, refuse bool) []string {
		t.Helper()
		p := New(st, time.Second, slog.New(slog.DiscardHandler))
		var mu sync.Mutex
		var got []string
		p.SetJournal("ip/", func(_ context.Context, cs []Change) error {
			if refuse {
				return errors.New("journal down")
			}
			mu.Lock()
			defer mu.Unlock()
			for _, c := range cs {
				got = append(got, fmt.Sprintf("%s=%s", c.Key, c.Value))
			}
			return nil
		})
		p.SetJournaledMark(mark)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { p.Run(ctx, 50*time.Millisecond); close(done) }()
		p.Set("node", map[string][]byte{"node/h": []byte("n")})
		p.Set("eps", kvs)
		eventually(t, what+": written", func() bool { return p.Pending() == 0 })
		if !refuse {
			eventually(t, what+": mark made", func() bool { _, err := os.Stat(mark); return err == nil })
		} else {
			time.Sleep(200 * time.Millisecond) // a few passes that fail to journal
		}
		cancel()
		<-done
		mu.Lock()
		defer mu.Unlock()
		slices.Sort(got)
		return got
	}
	eq := func(what string, got []string, want ...string) {
		t.Helper()
		if !slices.Equal(got, want) {
			t.Errorf("%s journaled %q, want %q", what, got, want)
		}
	}
	eq("first run", run("first run", map[string][]byte{"ip/1": []byte("a"), "ip/2": []byte("b")}, false), "ip/1=a", "ip/2=b")
	puts := st.puts.Load()
	eq("restart", run("restart", map[string][]byte{"ip/1": []byte("a"), "ip/2": []byte("c"), "ip/3": []byte("d")}, false), "ip/2=c", "ip/3=d")
	if n := st.puts.Load() - puts; n != 4 {
		t.Errorf("the restart wrote %d keys, want 4 (every own key is written again: taken over)", n)
	}
	if value(st, "ip/1") != "a" || value(st, "ip/2") != "c" || value(st, "ip/3") != "d" {
		t.Errorf("store holds ip/1=%q ip/2=%q ip/3=%q after the restart", value(st, "ip/1"), value(st, "ip/2"), value(st, "ip/3"))
	}
	// A run whose writes never reached the journal leaves no mark ...
	run("journal down", map[string][]byte{"ip/1": []byte("a"), "ip/2": []byte("e"), "ip/3": []byte("d")}, true)
	if _, err := os.Stat(mark); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the mark is there after a run whose journal refused every change (%v)", err)
	}
	// ... so the next run journals every key, the unjournaled ip/2=e too.
	eq("restart without the mark", run("restart without the mark", map[string][]byte{"ip/1": []byte("a"), "ip/2": []byte("e"), "ip/3": []byte("d")}, false),
		"ip/1=a", "ip/2=e", "ip/3=d")
	// And with the mark back, a restart that changes nothing journals nothing.
	eq("unchanged restart", run("unchanged restart", map[string][]byte{"ip/1": []byte("a"), "ip/2": []byte("e"), "ip/3": []byte("d")}, false))
}

// lookup is a watch's view for Seen.
func lookup(m map[string][]byte) func(string) ([]byte, bool) {
	return func(k string) ([]byte, bool) { v, ok := m[k]; return v, ok }
}

// batching is a store that writes owned keys in batches
// (store.OwnedBatchPutter); while failAfter >= 0, a batch writes that
// many keys and fails.
type batching struct {
	*flaky
	batches   atomic.Int64
	failAfter atomic.Int64
}

func (b *batching) PutOwnedBatch(ctx context.Context, kvs []store.KV) (int, error) {
	b.batches.Add(1)
	if len(kvs) > store.MaxBatch/2 {
		return 0, fmt.Errorf("batch of %d keys", len(kvs))
	}
	for i, kv := range kvs {
		if n := b.failAfter.Load(); n >= 0 && int64(i) >= n {
			return i, store.ErrUnavailable
		}
		if err := b.flaky.Store.Put(ctx, kv.Key, kv.Value, store.PutOptions{Owned: true}); err != nil {
			return i, err
		}
	}
	return len(kvs), nil
}

// TestPublisherWritesInBatches: with a store that writes owned keys in
// batches, a start's 40 keys take two batches and no single Put; keys of
// a batch that failed part-way count as published up to the failure
// (journaled once), the rest is written at the retry.
func TestPublisherWritesInBatches(t *testing.T) {
	st := &batching{flaky: newStore(t)}
	st.failAfter.Store(5)
	p := New(st, time.Second, slog.New(slog.DiscardHandler))
	var mu sync.Mutex
	journaled := map[string]int{}
	p.SetJournal("ip/", func(_ context.Context, cs []Change) error {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range cs {
			journaled[c.Key]++
		}
		return nil
	})
	want := map[string][]byte{}
	for i := range 40 {
		want[fmt.Sprintf("ip/%02d", i)] = []byte("v")
	}
	p.Set("eps", want)
	if err := p.pass(context.Background()); err == nil {
		t.Fatal("a batch that failed after 5 keys reported no error")
	}
	if n := p.Pending(); n != 35 {
		t.Fatalf("after a batch failed after 5 keys, %d keys pending, want 35", n)
	}
	st.failAfter.Store(-1)
	st.batches.Store(0)
	if err := p.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := p.Pending(); n != 0 {
		t.Fatalf("%d keys pending after the retry", n)
	}
	if b, puts := st.batches.Load(), st.puts.Load(); b != 2 || puts != 0 {
		t.Errorf("35 keys written in %d batches and %d single puts, want 2 and 0", b, puts)
	}
	for k := range want {
		if value(st, k) != "v" {
			t.Fatalf("%s not in the store", k)
		}
		if journaled[k] != 1 {
			t.Fatalf("%s journaled %d times, want once", k, journaled[k])
		}
	}
}
