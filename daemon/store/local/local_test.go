package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/rackwire/rackwire/daemon/store"
)

func openTemp(t testing.TB) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "store.db"), nil)
	if err != nil {
		t.Fatalf("Open() = %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestSemantics(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	type step struct {
		op      string // put, cas, del, delcas, get
		key     string
		val     string
		index   uint64 // for cas/delcas; for get, the expected ModifyIndex
		wantOK  bool
		wantErr error
		wantVal string
	}
	steps := []step{
		{op: "get", key: "a", wantErr: store.ErrNotFound},
		{op: "cas", key: "a", val: "1", index: 0, wantOK: true},     // create -> index 1
		{op: "cas", key: "a", val: "2", index: 0, wantOK: false},    // exists
		{op: "get", key: "a", index: 1, wantVal: "1"},               //
		{op: "cas", key: "a", val: "3", index: 7, wantOK: false},    // stale index
		{op: "cas", key: "a", val: "4", index: 1, wantOK: true},     // -> index 2
		{op: "get", key: "a", index: 2, wantVal: "4"},               //
		{op: "put", key: "b", val: "x"},                             // -> 3
		{op: "cas", key: "nope", val: "x", index: 3, wantOK: false}, // update of a missing key
		{op: "delcas", key: "a", index: 1, wantOK: false},           // stale
		{op: "delcas", key: "a", index: 2, wantOK: true},            // -> 4
		{op: "get", key: "a", wantErr: store.ErrNotFound},           //
		{op: "delcas", key: "a", index: 2, wantOK: false},           // already gone
		{op: "del", key: "missing"},                                 // not an error
		{op: "put", key: "b", val: ""},                              // empty value -> 5
		{op: "get", key: "b", index: 5, wantVal: ""},                //
		{op: "put", key: "", val: "x", wantErr: errAny},             //
		{op: "put", key: "big", val: strings.Repeat("x", store.MaxValueSize+1), wantErr: store.ErrTooLarge},
		{op: "put", key: strings.Repeat("k", MaxKeySize+1), val: "x", wantErr: store.ErrTooLarge},
		{op: "put", key: "max", val: strings.Repeat("x", store.MaxValueSize)}, // -> 6
		{op: "get", key: "max", index: 6, wantVal: strings.Repeat("x", store.MaxValueSize)},
	}
	for i, st := range steps {
		var (
			ok  bool
			err error
			kv  store.KV
		)
		switch st.op {
		case "put":
			err = s.Put(ctx, st.key, []byte(st.val), store.PutOptions{})
			ok = err == nil
		case "cas":
			ok, err = s.CAS(ctx, st.key, []byte(st.val), st.index, store.PutOptions{})
		case "del":
			err = s.Delete(ctx, st.key)
			ok = err == nil
		case "delcas":
			ok, err = s.DeleteCAS(ctx, st.key, st.index)
		case "get":
			kv, err = s.Get(ctx, st.key)
		}
		name := fmt.Sprintf("step %d %s(%.20q)", i, st.op, st.key)
		switch {
		case st.wantErr == errAny:
			if err == nil {
				t.Fatalf("%s error = nil, want an error", name)
			}
			continue
		case st.wantErr != nil:
			if !errors.Is(err, st.wantErr) {
				t.Fatalf("%s error = %v, want %v", name, err, st.wantErr)
			}
			continue
		case err != nil:
			t.Fatalf("%s error = %v", name, err)
		}
		if st.op == "get" {
			if kv.ModifyIndex != st.index || string(kv.Value) != st.wantVal || kv.Key != st.key {
				t.Fatalf("%s = {%q, %d bytes, %d}, want {%q, %d bytes, %d}", name, kv.Key, len(kv.Value), kv.ModifyIndex, st.key, len(st.wantVal), st.index)
			}
			continue
		}
		if (st.op == "cas" || st.op == "delcas") && ok != st.wantOK {
			t.Fatalf("%s = %v, want %v", name, ok, st.wantOK)
		}
	}
}

var errAny = errors.New("any error")

func TestListAndPrefixIndex(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	put := func(k, v string) {
		t.Helper()
		if err := s.Put(ctx, k, []byte(v), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	_, idx, err := s.List(ctx, "x/")
	if err != nil || idx != 1 {
		t.Fatalf("List(empty) index = %d, %v; want 1", idx, err)
	}
	put("x/b", "2") // 1
	put("x/a", "1") // 2
	put("y/a", "3") // 3
	put("x", "4")   // 4: not under "x/"
	kvs, idx, err := s.List(ctx, "x/")
	if err != nil {
		t.Fatal(err)
	}
	want := []store.KV{{Key: "x/a", Value: []byte("1"), ModifyIndex: 2}, {Key: "x/b", Value: []byte("2"), ModifyIndex: 1}}
	if diff := cmp.Diff(want, kvs); diff != "" || idx != 2 {
		t.Fatalf("List(x/) index %d, diff (-want +got):\n%s", idx, diff)
	}
	// A write elsewhere does not move x/'s index.
	put("y/b", "5")
	if _, idx2, _ := s.List(ctx, "x/"); idx2 != idx {
		t.Fatalf("List(x/) index after a write under y/ = %d, want %d", idx2, idx)
	}
	// A delete under the prefix moves it even though the max key index
	// would drop.
	if err := s.Delete(ctx, "x/a"); err != nil {
		t.Fatal(err)
	}
	kvs, idx3, _ := s.List(ctx, "x/")
	if idx3 <= idx || len(kvs) != 1 {
		t.Fatalf("after delete: List(x/) = %d keys index %d, want 1 key index > %d", len(kvs), idx3, idx)
	}
	all, _, _ := s.List(ctx, "")
	if len(all) != 4 {
		t.Fatalf("List(\"\") = %d keys, want 4", len(all))
	}
}

func TestWatch(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	if err := s.Put(ctx, "w/a", []byte("1"), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	_, idx, _ := s.List(ctx, "w/")

	tests := []struct {
		name   string
		change func() error
		wake   bool
		keys   int
	}{
		{"put under prefix", func() error { return s.Put(ctx, "w/b", []byte("2"), store.PutOptions{}) }, true, 2},
		{"put elsewhere", func() error { return s.Put(ctx, "v/a", []byte("2"), store.PutOptions{}) }, false, 2},
		{"delete under prefix", func() error { return s.Delete(ctx, "w/a") }, true, 1},
		{"delete of missing key", func() error { return s.Delete(ctx, "w/zzz") }, false, 1},
		{"failed cas", func() error { _, err := s.CAS(ctx, "w/b", nil, 999, store.PutOptions{}); return err }, false, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			type result struct {
				kvs []store.KV
				idx uint64
				err error
			}
			done := make(chan result, 1)
			wait := 150 * time.Millisecond
			if tt.wake {
				wait = 10 * time.Second
			}
			start := time.Now()
			go func() {
				kvs, i, err := s.Watch(ctx, "w/", idx, wait)
				done <- result{kvs, i, err}
			}()
			time.Sleep(20 * time.Millisecond) // let the watcher block
			if err := tt.change(); err != nil {
				t.Fatal(err)
			}
			r := <-done
			if r.err != nil {
				t.Fatalf("Watch() error = %v", r.err)
			}
			if woke := r.idx != idx; woke != tt.wake {
				t.Fatalf("Watch() index %d (was %d) after %v: woke = %v, want %v", r.idx, idx, time.Since(start), woke, tt.wake)
			}
			if len(r.kvs) != tt.keys {
				t.Fatalf("Watch() returned %d keys, want %d", len(r.kvs), tt.keys)
			}
			idx = r.idx
		})
	}

	t.Run("index 0 returns at once", func(t *testing.T) {
		_, i, err := s.Watch(ctx, "w/", 0, time.Hour)
		if err != nil || i != idx {
			t.Fatalf("Watch(0) = %d, %v; want %d", i, err, idx)
		}
	})
	t.Run("stale index returns at once", func(t *testing.T) {
		_, i, err := s.Watch(ctx, "w/", idx-1, time.Hour)
		if err != nil || i != idx {
			t.Fatalf("Watch(stale) = %d, %v; want %d", i, err, idx)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
		defer cancel()
		if _, _, err := s.Watch(cctx, "w/", idx, time.Hour); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Watch() with ended ctx error = %v, want context.DeadlineExceeded", err)
		}
	})
}

func TestWatchClose(t *testing.T) {
	s := openTemp(t)
	_, idx, _ := s.List(context.Background(), "p/")
	errc := make(chan error, 1)
	go func() {
		_, _, err := s.Watch(context.Background(), "p/", idx, time.Hour)
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, store.ErrClosed) {
			t.Fatalf("Watch() after Close error = %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch() still blocked 5s after Close")
	}
	ctx := context.Background()
	if _, err := s.Get(ctx, "a"); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Get() after Close = %v, want ErrClosed", err)
	}
	if err := s.Put(ctx, "a", nil, store.PutOptions{}); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Put() after Close = %v, want ErrClosed", err)
	}
	if h := s.Health(); h.State != store.StateDegraded {
		t.Errorf("Health() after Close = %q, want %q", h.State, store.StateDegraded)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close() = %v, want nil", err)
	}
}

// TestWatchNoLeak: cancelled watchers leave no goroutine behind.
func TestWatchNoLeak(t *testing.T) {
	s := openTemp(t)
	_, idx, _ := s.List(context.Background(), "p/")
	before := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.Watch(ctx, "p/", idx, time.Hour)
		}()
	}
	time.Sleep(20 * time.Millisecond)
	cancel()
	wg.Wait()
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("goroutines: %d after cancelling watchers, want <= %d", runtime.NumGoroutine(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPersistence(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sub", "store.db") // the directory is created
	s, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if err := s.Put(ctx, fmt.Sprintf("k/%02d", i), []byte{byte(i)}, store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Delete(ctx, "k/03"); err != nil {
		t.Fatal(err)
	}
	before, idx, _ := s.List(ctx, "k/")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(path, nil)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	after, idx2, err := s.List(ctx, "k/")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, after); diff != "" || idx2 != idx {
		t.Fatalf("after reopen index %d (was %d), diff (-before +after):\n%s", idx2, idx, diff)
	}
	if err := s.Put(ctx, "k/new", nil, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if kv, _ := s.Get(ctx, "k/new"); kv.ModifyIndex <= idx {
		t.Fatalf("ModifyIndex after reopen = %d, want > %d (indexes continue)", kv.ModifyIndex, idx)
	}
	if h := s.Health(); h.Backend != "local" || h.State != store.StateOK || h.Detail["path"] != path {
		t.Fatalf("Health() = %+v, want local ok with path %s", h, path)
	}
}

// TestConcurrentWriters: CAS increments from several goroutines lose none.
func TestConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	const writers, each = 4, 15
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; {
				kv, err := s.Get(ctx, "counter")
				var n int
				if err == nil {
					fmt.Sscan(string(kv.Value), &n)
				} else if !errors.Is(err, store.ErrNotFound) {
					errc <- err
					return
				}
				ok, err := s.CAS(ctx, "counter", []byte(fmt.Sprint(n+1)), kv.ModifyIndex, store.PutOptions{})
				if err != nil {
					errc <- err
					return
				}
				if ok {
					i++
					if err := s.Put(ctx, fmt.Sprintf("w%d/%d", w, i), nil, store.PutOptions{}); err != nil {
						errc <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	kv, err := s.Get(ctx, "counter")
	if err != nil || string(kv.Value) != fmt.Sprint(writers*each) {
		t.Fatalf("counter = %q, %v; want %d", kv.Value, err, writers*each)
	}
	all, _, _ := s.List(ctx, "w")
	if len(all) != writers*each {
		t.Fatalf("List(w) = %d keys, want %d", len(all), writers*each)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	t.Run("locked", func(t *testing.T) {
		path := filepath.Join(dir, "locked.db")
		s, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		_, err = OpenWith(path, Options{LockTimeout: 100 * time.Millisecond})
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "another") {
			t.Fatalf("second Open() = %v, want an error naming %s and another process", err, path)
		}
		if testing.Verbose() {
			t.Logf("locked: %v", err)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		path := filepath.Join(dir, "garbage.db")
		if err := os.WriteFile(path, bytes.Repeat([]byte("not a bbolt file\n"), 2000), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Open(path, nil)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "move it aside") {
			t.Fatalf("Open(garbage) = %v, want ErrCorrupt saying to move it aside", err)
		}
	})
	t.Run("damaged pages", func(t *testing.T) {
		path := filepath.Join(dir, "damaged.db")
		s, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 200 {
			s.Put(context.Background(), fmt.Sprintf("key/%04d", i), bytes.Repeat([]byte{'v'}, 100), store.PutOptions{})
		}
		s.Close()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// Keep both meta pages, overwrite every data page with junk.
		for i := 2 * 4096; i < len(b); i++ {
			b[i] = byte(i * 7)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err = Open(path, nil)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open(damaged) = %v, want nil or ErrCorrupt", err)
			}
			t.Logf("damaged: %v", err)
			return
		}
		defer s.Close()
		// Whatever happens, no panic escapes.
		_, _, lerr := s.List(context.Background(), "key/")
		perr := s.Put(context.Background(), "key/x", nil, store.PutOptions{})
		t.Logf("damaged: list %v; put %v", lerr, perr)
	})
	t.Run("directory", func(t *testing.T) {
		if _, err := Open(dir, nil); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("Open(dir) = %v, want 'not a regular file'", err)
		}
	})
}

func TestCtxEnded(t *testing.T) {
	s := openTemp(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Put(ctx, "a", nil, store.PutOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Put(cancelled ctx) = %v, want context.Canceled", err)
	}
}

// BenchmarkPut measures a durable write; fsyncs/op compares it with a bare
// write+fsync of a small file measured in the same run.
func BenchmarkPut(b *testing.B) {
	s := openTemp(b)
	base := fsyncBaseline(b)
	ctx := context.Background()
	val := bytes.Repeat([]byte{'v'}, 256)
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		if err := s.Put(ctx, fmt.Sprintf("bench/%d", i%1000), val, store.PutOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	per := time.Since(start) / time.Duration(b.N)
	b.ReportMetric(float64(per)/float64(base), "fsyncs/op")
}

func BenchmarkGet(b *testing.B) {
	s := openTemp(b)
	ctx := context.Background()
	for i := range 1000 {
		s.Put(ctx, fmt.Sprintf("bench/%d", i), []byte("value"), store.PutOptions{})
	}
	b.ResetTimer()
	for i := range b.N {
		if _, err := s.Get(ctx, fmt.Sprintf("bench/%d", i%1000)); err != nil {
			b.Fatal(err)
		}
	}
}

func fsyncBaseline(b *testing.B) time.Duration {
	f, err := os.Create(filepath.Join(b.TempDir(), "baseline"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	const n = 50
	start := time.Now()
	for range n {
		f.WriteAt([]byte("x"), 0)
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start) / n
}
