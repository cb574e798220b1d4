package consul

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/consultest"
)

func newTestStore(t *testing.T, addr, node string, renew time.Duration) *Store {
	t.Helper()
	s, err := New(Options{
		Address: addr, Prefix: "rwd-test/", Node: node, SessionTTL: 30 * time.Second,
		RenewInterval: renew, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second,
		CallTimeout: 3 * time.Second,
	}, slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func TestStoreSemantics(t *testing.T) {
	a := consultest.Start(t)
	s := newTestStore(t, a.HTTPAddr, "host-a", time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if _, err := s.Get(ctx, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get(missing) = %v, want ErrNotFound", err)
	}
	ok, err := s.CAS(ctx, "a/1", []byte("x"), 0, store.PutOptions{})
	if err != nil || !ok {
		t.Fatalf("CAS create = %v, %v, want true", ok, err)
	}
	ok, err = s.CAS(ctx, "a/1", []byte("y"), 0, store.PutOptions{})
	if err != nil || ok {
		t.Fatalf("CAS create existing = %v, %v, want false", ok, err)
	}
	kv, err := s.Get(ctx, "a/1")
	if err != nil || string(kv.Value) != "x" || kv.CreateIndex == 0 || kv.ModifyIndex == 0 {
		t.Fatalf("Get(a/1) = %+v, %v", kv, err)
	}
	ok, err = s.CAS(ctx, "a/1", []byte("y"), kv.ModifyIndex, store.PutOptions{})
	if err != nil || !ok {
		t.Fatalf("CAS at index = %v, %v, want true", ok, err)
	}
	kv2, _ := s.Get(ctx, "a/1")
	if kv2.CreateIndex != kv.CreateIndex || kv2.ModifyIndex == kv.ModifyIndex {
		t.Fatalf("indexes after CAS = %+v, was %+v", kv2, kv)
	}
	if ok, _ := s.DeleteCAS(ctx, "a/1", kv.ModifyIndex); ok {
		t.Fatalf("DeleteCAS at an old index succeeded")
	}
	if err := s.Put(ctx, "a/2", []byte("owned"), store.PutOptions{Owned: true}); err != nil {
		t.Fatalf("Put owned: %v", err)
	}
	kvs, idx, err := s.List(ctx, "a/")
	if err != nil || len(kvs) != 2 || idx == 0 {
		t.Fatalf("List = %v, %d, %v", kvs, idx, err)
	}
	if kvs[1].Key != "a/2" || kvs[1].Owner != s.Session() || s.Session() == "" {
		t.Fatalf("owned key %+v, session %q", kvs[1], s.Session())
	}
	big := bytes.Repeat([]byte("x"), store.MaxValueSize+1)
	if err := s.Put(ctx, "a/big", big, store.PutOptions{}); !errors.Is(err, store.ErrTooLarge) {
		t.Fatalf("Put(too large) = %v, want ErrTooLarge", err)
	}

	// Watch: blocks until a write under the prefix.
	done := make(chan uint64)
	go func() {
		_, ni, err := s.Watch(ctx, "a/", idx, 20*time.Second)
		if err != nil {
			t.Errorf("Watch: %v", err)
		}
		done <- ni
	}()
	time.Sleep(300 * time.Millisecond)
	if err := s.Put(ctx, "a/3", []byte("z"), store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case ni := <-done:
		if ni <= idx {
			t.Fatalf("Watch index %d, want > %d", ni, idx)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Watch did not return after a write")
	}
	h := s.Health()
	if h.State != store.StateOK || h.Detail["leader"] == "" || h.Detail["session"] == "" {
		t.Fatalf("Health = %+v", h)
	}
}

// TestSessionLoss destroys the host's session in Consul (which deletes its
// owned keys) and checks that the keys come back under a new session.
func TestSessionLoss(t *testing.T) {
	a := consultest.Start(t)
	s := newTestStore(t, a.HTTPAddr, "host-b", 300*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	keys := []string{"state/identities/v1/value/a=1;/host-b", "state/ip/v1/default/10.0.0.1", "state/nodes/v1/default/host-b"}
	for _, k := range keys {
		if err := s.Put(ctx, k, []byte("v-"+k), store.PutOptions{Owned: true}); err != nil {
			t.Fatalf("Put(%s): %v", k, err)
		}
	}
	// One key is released: it must not come back.
	if err := s.Delete(ctx, keys[2]); err != nil {
		t.Fatal(err)
	}
	old := s.Session()
	c := a.Client(t)
	if _, err := c.Session().Destroy(old, nil); err != nil {
		t.Fatalf("destroy session: %v", err)
	}
	if p, _, _ := c.KV().Get("rwd-test/"+keys[0], nil); p != nil {
		t.Fatalf("key survived session destroy; behavior delete not set")
	}
	start := time.Now()
	for {
		p0, _, _ := c.KV().Get("rwd-test/"+keys[0], nil)
		p1, _, _ := c.KV().Get("rwd-test/"+keys[1], nil)
		if p0 != nil && p1 != nil {
			if p0.Session == old || p0.Session == "" || string(p1.Value) != "v-"+keys[1] {
				t.Fatalf("rewritten key %+v, old session %s", p0, old)
			}
			break
		}
		if time.Since(start) > 20*time.Second {
			t.Fatalf("owned keys did not come back within 20s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("owned keys back %s after the session was destroyed", time.Since(start).Round(time.Millisecond))
	if p, _, _ := c.KV().Get("rwd-test/"+keys[2], nil); p != nil {
		t.Fatalf("deleted key %s came back", keys[2])
	}
}

// TestRestartTakesOver: a new run of the same host writes its keys again
// while the old session still holds them.
func TestRestartTakesOver(t *testing.T) {
	a := consultest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s1 := newTestStore(t, a.HTTPAddr, "host-c", time.Second)
	if err := s1.Put(ctx, "k", []byte("1"), store.PutOptions{Owned: true}); err != nil {
		t.Fatal(err)
	}
	old := s1.Stop() // leaves the session and key in Consul
	s2 := newTestStore(t, a.HTTPAddr, "host-c", time.Second)
	if err := s2.Put(ctx, "k", []byte("2"), store.PutOptions{Owned: true}); err != nil {
		t.Fatalf("Put over an old session's key: %v", err)
	}
	kv, err := s2.Get(ctx, "k")
	if err != nil || string(kv.Value) != "2" || kv.Owner != s2.Session() || kv.Owner == old {
		t.Fatalf("Get = %+v, %v; want value 2 held by %s", kv, err, s2.Session())
	}
}

// TestUnavailable: a dead Consul gives ErrUnavailable and a degraded
// Health, never a hang past the context.
func TestUnavailable(t *testing.T) {
	a := consultest.Start(t)
	s := newTestStore(t, a.HTTPAddr, "host-d", 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Put(ctx, "x", []byte("1"), store.PutOptions{Owned: true}); err != nil {
		t.Fatal(err)
	}
	a.Kill()
	if _, err := s.Get(ctx, "x"); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Get with Consul down = %v, want ErrUnavailable", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.Health().State != store.StateDegraded && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	h := s.Health()
	if h.State != store.StateDegraded || h.Error == "" || h.Since.IsZero() {
		t.Fatalf("Health with Consul down = %+v", h)
	}
}

func TestElector(t *testing.T) {
	a := consultest.Start(t)
	s1 := newTestStore(t, a.HTTPAddr, "host-e", time.Second)
	s2 := newTestStore(t, a.HTTPAddr, "host-f", time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	e1, e2 := s1.Elector("locks/gc"), s2.Elector("locks/gc")
	if _, err := e1.Lead(ctx); err != nil {
		t.Fatalf("e1.Lead: %v", err)
	}
	got := make(chan error, 1)
	go func() { _, err := e2.Lead(ctx); got <- err }()
	select {
	case err := <-got:
		t.Fatalf("second leader elected while the first leads (err %v)", err)
	case <-time.After(time.Second):
	}
	if err := e1.Resign(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("e2.Lead: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("e2 did not lead after e1 resigned")
	}
	_ = e2.Resign()
}

// TestElectorWaitEndsWithContext: a host waiting for a lock another host
// holds returns as soon as its context ends (a stopping agent), not when
// the lock's 30-second blocking query happens to return; and a lock it
// acquires after giving up is released, never held by a host that left.
func TestElectorWaitEndsWithContext(t *testing.T) {
	a := consultest.Start(t)
	s1 := newTestStore(t, a.HTTPAddr, "host-g", time.Second)
	s2 := newTestStore(t, a.HTTPAddr, "host-h", time.Second)
	e1, e2 := s1.Elector("locks/ctx"), s2.Elector("locks/ctx")
	if _, err := e1.Lead(context.Background()); err != nil {
		t.Fatalf("e1.Lead: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan error, 1)
	go func() { _, err := e2.Lead(ctx); got <- err }()
	time.Sleep(time.Second) // e2 is in its blocking query
	start := time.Now()
	cancel()
	select {
	case err := <-got:
		if err == nil {
			t.Fatalf("e2.Lead led after its context ended")
		}
		t.Logf("e2.Lead returned %v after %v", err, time.Since(start).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatalf("e2.Lead still waiting 10s after its context ended (the lock's blocking query ignores it)")
	}
	// The abandoned wait must not take the lock: e1 resigns, a third
	// elector leads within the wait of the abandoned query.
	if err := e1.Resign(); err != nil {
		t.Fatal(err)
	}
	s3 := newTestStore(t, a.HTTPAddr, "host-i", time.Second)
	lctx, lcancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer lcancel()
	if _, err := s3.Elector("locks/ctx").Lead(lctx); err != nil {
		t.Fatalf("a third host could not lead after the first resigned and the second gave up: %v", err)
	}
}

// TestTLS talks HTTPS to Consul with the CA and server name from Options,
// and fails against the wrong server name, a CA that did not sign the
// server's certificate, and no CA (the system roots). The environment says
// the opposite each time (CONSUL_CACERT, CONSUL_HTTP_SSL_VERIFY,
// CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_ADDR): only Options count.
func TestTLS(t *testing.T) {
	a, ca := consultest.StartTLS(t)
	other := writeUntrustedCA(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
	t.Setenv("CONSUL_HTTP_SSL", "false")
	t.Setenv("CONSUL_CACERT", other)
	t.Setenv("CONSUL_TLS_SERVER_NAME", "wrong.rwd.test")
	s, err := New(Options{Address: a.HTTPAddr, Scheme: "https", TLSCAFile: ca, TLSServerName: "server.rwd.test",
		Prefix: "rwd-test/", Node: "host-tls", RenewInterval: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Put(ctx, "k", []byte("v"), store.PutOptions{Owned: true}); err != nil {
		t.Fatalf("Put over TLS: %v", err)
	}

	t.Setenv("CONSUL_CACERT", ca)
	t.Setenv("CONSUL_HTTP_SSL_VERIFY", "false")
	t.Setenv("CONSUL_TLS_SERVER_NAME", "server.rwd.test")
	refused := []struct {
		name string
		opts Options
		want string
	}{
		{"wrong server name", Options{TLSCAFile: ca, TLSServerName: "wrong.rwd.test"}, "certificate"},
		{"untrusted CA", Options{TLSCAFile: other, TLSServerName: "server.rwd.test"}, "certificate"},
		{"no CA", Options{TLSServerName: "server.rwd.test"}, "certificate"},
	}
	for _, tc := range refused {
		o := tc.opts
		o.Address, o.Scheme, o.Prefix, o.Node = a.HTTPAddr, "https", "rwd-test/", "host-bad"
		bad, err := New(o, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err = bad.Get(ctx, "k")
		bad.Stop()
		if err == nil {
			t.Errorf("%s: Get succeeded, want a TLS refusal", tc.name)
		} else if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Get error = %v, want it to mention %q", tc.name, err, tc.want)
		}
	}
}

func TestCASPutOwned(t *testing.T) {
	a := consultest.Start(t)
	s := newTestStore(t, a.HTTPAddr, "host-g", time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ok, err := s.CASPutOwned(ctx, "id/1", []byte("a=1;"), 0, "value/a=1;/host-g", []byte("1"))
	if err != nil || !ok {
		t.Fatalf("CASPutOwned(create) = %v, %v", ok, err)
	}
	claim, err := s.Get(ctx, "value/a=1;/host-g")
	if err != nil || claim.Owner != s.Session() {
		t.Fatalf("claim = %+v, %v; want held by %s", claim, err, s.Session())
	}
	ok, err = s.CASPutOwned(ctx, "id/1", []byte("b=2;"), 0, "value/b=2;/host-g", []byte("1"))
	if err != nil || ok {
		t.Fatalf("CASPutOwned(create existing) = %v, %v, want false", ok, err)
	}
	if _, err := s.Get(ctx, "value/b=2;/host-g"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("claim of a lost CAS written: %v", err)
	}
	if n := s.Health().Detail["owned"]; n != "1" {
		t.Fatalf("owned keys remembered = %s, want 1", n)
	}
}

// TestSessionNodeRole: the store says which Consul node its session lives
// and dies with, and warns when that node is a server (a server that dies
// is reaped, and every session bound to it is invalidated with its keys).
func TestSessionNodeRole(t *testing.T) {
	a := consultest.Start(t)
	logs := &syncBuffer{}
	s, err := New(Options{Address: a.HTTPAddr, Prefix: "rwd-test/", Node: "host-r", CallTimeout: 3 * time.Second},
		slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	deadline := time.Now().Add(20 * time.Second)
	for s.Health().Detail["session_node"] == "" {
		if time.Now().After(deadline) {
			t.Fatalf("no session node after 20s: %v", s.Health())
		}
		time.Sleep(50 * time.Millisecond)
	}
	d := s.Health().Detail
	if d["session_node"] != a.Name || d["session_node_role"] != "server" {
		t.Fatalf("session_node %q role %q, want %q server", d["session_node"], d["session_node_role"], a.Name)
	}
	if !strings.Contains(logs.String(), "is a Consul server, not a client agent") {
		t.Fatalf("no warning about a server as the store address:\n%s", logs.String())
	}
}

// TestCASDeleteCASBatch: the set and the deletions happen together or not
// at all.
func TestCASDeleteCASBatch(t *testing.T) {
	a := consultest.Start(t)
	s := newTestStore(t, a.HTTPAddr, "host-t", time.Second)
	ctx := context.Background()
	var kvs []store.KV
	for _, k := range []string{"log/e/1", "log/e/2"} {
		if err := s.Put(ctx, k, []byte("x"), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		kv, err := s.Get(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		kvs = append(kvs, kv)
	}
	// A stale index on one deletion: nothing happens.
	stale := []store.KV{kvs[0], {Key: kvs[1].Key, ModifyIndex: kvs[1].ModifyIndex - 1}}
	if ok, err := s.CASDeleteCASBatch(ctx, store.KV{Key: "log/horizon", Value: []byte("7")}, stale); err != nil || ok {
		t.Fatalf("with a stale index = %v, %v; want false", ok, err)
	}
	if _, err := s.Get(ctx, "log/horizon"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("horizon written by a refused transaction: %v", err)
	}
	if ok, err := s.CASDeleteCASBatch(ctx, store.KV{Key: "log/horizon", Value: []byte("7")}, kvs); err != nil || !ok {
		t.Fatalf("CASDeleteCASBatch = %v, %v", ok, err)
	}
	if h, err := s.Get(ctx, "log/horizon"); err != nil || string(h.Value) != "7" {
		t.Fatalf("horizon = %v, %v", h, err)
	}
	for _, kv := range kvs {
		if _, err := s.Get(ctx, kv.Key); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("%s not deleted: %v", kv.Key, err)
		}
	}
	if _, err := s.CASDeleteCASBatch(ctx, store.KV{Key: "log/horizon"}, make([]store.KV, store.MaxBatch)); err == nil {
		t.Fatal("a transaction over the limit was sent")
	}
}

// TestPutOwnedBatchTakesOver: a restarted host takes over the keys its
// previous run's session still holds in a read and a transaction per 32
// keys (PutOwnedBatch) or in one transaction per key (Put, when the
// previous session is known), where Put took three per key (an acquire
// refused, a read of the holder, a take-over transaction, measured at 210
// requests for 70 keys before): every key ends with the new value under
// the new session.
func TestPutOwnedBatchTakesOver(t *testing.T) {
	a := consultest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	addr, reqs := kvCounter(t, a.HTTPAddr)

	kvs := func(val string) []store.KV {
		var out []store.KV
		for i := range 70 {
			out = append(out, store.KV{Key: fmt.Sprintf("own/%02d", i), Value: []byte(val)})
		}
		return out
	}
	putBatches := func(s *Store, all []store.KV) {
		t.Helper()
		for len(all) > 0 {
			b := all[:min(len(all), store.MaxBatch/2)]
			all = all[len(b):]
			if n, err := s.PutOwnedBatch(ctx, b); err != nil || n != len(b) {
				t.Fatalf("PutOwnedBatch = %d, %v; want %d written", n, err, len(b))
			}
		}
	}
	held := func(s *Store, val string) {
		t.Helper()
		for _, kv := range kvs(val) {
			got, err := s.Get(ctx, kv.Key)
			if err != nil || string(got.Value) != val || got.Owner != s.Session() {
				t.Fatalf("%s = %+v, %v; want value %s held by %s", kv.Key, got, err, val, s.Session())
			}
		}
	}
	started := func(node string) *Store {
		t.Helper()
		s := newTestStore(t, addr, node, time.Second)
		if _, err := s.waitSession(ctx); err != nil {
			t.Fatal(err)
		}
		return s
	}
	s1 := started("host-b")
	putBatches(s1, kvs("first"))
	s1.Stop() // a restart: the session and its keys stay

	s2 := started("host-b")
	before := reqs.Load()
	putBatches(s2, kvs("second"))
	batched := reqs.Load() - before
	held(s2, "second")
	s2.Stop() // two earlier runs' sessions now: the third takes from the newer

	s3 := started("host-b")
	before = reqs.Load()
	for _, kv := range kvs("third") {
		if err := s3.Put(ctx, kv.Key, kv.Value, store.PutOptions{Owned: true}); err != nil {
			t.Fatal(err)
		}
	}
	single := reqs.Load() - before
	held(s3, "third")
	// A key the previous run did not hold, and a key written again.
	for _, k := range []string{"own/new", "own/00"} {
		if err := s3.Put(ctx, k, []byte("x"), store.PutOptions{Owned: true}); err != nil {
			t.Fatal(err)
		}
		if got, err := s3.Get(ctx, k); err != nil || string(got.Value) != "x" || got.Owner != s3.Session() {
			t.Fatalf("%s = %+v, %v; want x held by %s", k, got, err, s3.Session())
		}
	}
	t.Logf("70 keys of the previous run taken over: %d requests in batches of 32, %d with one Put per key", batched, single)
	if batched > 6 {
		t.Errorf("batched take-over of 70 keys cost %d requests, want at most 6 (a read and a transaction per 32 keys)", batched)
	}
	if single > 70 {
		t.Errorf("one Put per key took over 70 keys in %d requests, want one each", single)
	}
}

// kvCounter is a proxy in front of the Consul agent at target that counts
// the KV and transaction requests through it; it returns the proxy's
// address.
func kvCounter(t *testing.T, target string) (string, *atomic.Int64) {
	t.Helper()
	return requestCounter(t, target, func(path string) bool {
		return strings.HasPrefix(path, "/v1/kv/") || path == "/v1/txn"
	})
}

// requestCounter is a proxy in front of the Consul agent at target that
// counts the requests whose path counts says to; it returns the proxy's
// address.
func requestCounter(t *testing.T, target string, counts func(path string) bool) (string, *atomic.Int64) {
	t.Helper()
	addr, reqs, _ := countingProxy(t, target, counts)
	return addr, reqs
}

// countingProxy is a proxy in front of the Consul agent at target that
// counts the requests whose path counts says to (none when counts is nil)
// and the connections made to it; it returns the proxy's address.
func countingProxy(t *testing.T, target string, counts func(path string) bool) (string, *atomic.Int64, *atomic.Int64) {
	t.Helper()
	u, err := url.Parse("http://" + target)
	if err != nil {
		t.Fatal(err)
	}
	var reqs, conns atomic.Int64
	rp := httputil.NewSingleHostReverseProxy(u)
	proxy := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if counts != nil && counts(r.URL.Path) {
			reqs.Add(1)
		}
		rp.ServeHTTP(w, r)
	}))
	proxy.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	proxy.Start()
	t.Cleanup(proxy.Close)
	return strings.TrimPrefix(proxy.URL, "http://"), &reqs, &conns
}

// TestCASPutOwnedTakesOver: after a restart, the identity allocator's
// touch (check-and-set of the id key and the claim, still held by the
// previous run's session) costs one transaction per key, where it cost
// three (a refused transaction, a check-and-set, a take-over). A lost
// check-and-set writes nothing and leaves the old claim where it was; a
// claim the previous run did not hold still gets written.
func TestCASPutOwnedTakesOver(t *testing.T) {
	a := consultest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	addr, reqs := kvCounter(t, a.HTTPAddr)
	started := func() *Store {
		t.Helper()
		s := newTestStore(t, addr, "host-c", time.Second)
		if _, err := s.waitSession(ctx); err != nil {
			t.Fatal(err)
		}
		return s
	}
	const n = 20
	idKey := func(i int) string { return fmt.Sprintf("id/%d", i) }
	claim := func(i int) string { return fmt.Sprintf("value/l%d;/host-c", i) }
	s1 := started()
	for i := range n {
		if ok, err := s1.CASPutOwned(ctx, idKey(i), []byte("l"), 0, claim(i), []byte("1")); err != nil || !ok {
			t.Fatalf("create %s: %v, %v", idKey(i), ok, err)
		}
	}
	s1.Stop() // a restart: the session and its claims stay

	s2 := started()
	index := make([]uint64, n)
	for i := range n {
		kv, err := s2.Get(ctx, idKey(i))
		if err != nil {
			t.Fatal(err)
		}
		index[i] = kv.ModifyIndex
	}
	// A stale index: the check-and-set loses, nothing changes hands.
	if ok, err := s2.CASPutOwned(ctx, idKey(0), []byte("l"), index[0]-1, claim(0), []byte("2")); err != nil || ok {
		t.Fatalf("CASPutOwned with a stale index = %v, %v; want false", ok, err)
	}
	if got, err := s2.Get(ctx, claim(0)); err != nil || got.Owner != s1.Session() || string(got.Value) != "1" {
		t.Fatalf("after a lost check-and-set the claim is %+v, %v; want 1 held by the previous session %s", got, err, s1.Session())
	}
	before := reqs.Load()
	for i := range n {
		if ok, err := s2.CASPutOwned(ctx, idKey(i), []byte("l"), index[i], claim(i), []byte("2")); err != nil || !ok {
			t.Fatalf("touch %s after the restart: %v, %v", idKey(i), ok, err)
		}
	}
	touched := reqs.Load() - before
	for i := range n {
		got, err := s2.Get(ctx, claim(i))
		if err != nil || got.Owner != s2.Session() || string(got.Value) != "2" {
			t.Fatalf("%s = %+v, %v; want 2 held by %s", claim(i), got, err, s2.Session())
		}
	}
	// A claim the previous run never held, and one written again.
	for _, i := range []int{n, 0} {
		kv, err := s2.Get(ctx, idKey(i))
		idx := uint64(0)
		if err == nil {
			idx = kv.ModifyIndex
		}
		if ok, err := s2.CASPutOwned(ctx, idKey(i), []byte("l"), idx, claim(i), []byte("3")); err != nil || !ok {
			t.Fatalf("CASPutOwned %s: %v, %v", idKey(i), ok, err)
		}
		if got, err := s2.Get(ctx, claim(i)); err != nil || got.Owner != s2.Session() || string(got.Value) != "3" {
			t.Fatalf("%s = %+v, %v; want 3 held by %s", claim(i), got, err, s2.Session())
		}
	}
	// A claim first written in this session is known to be its own: its
	// next touch is one request, not a refused take-over and the write.
	kvN, err := s2.Get(ctx, idKey(n))
	if err != nil {
		t.Fatal(err)
	}
	before = reqs.Load()
	if ok, err := s2.CASPutOwned(ctx, idKey(n), []byte("l"), kvN.ModifyIndex, claim(n), []byte("4")); err != nil || !ok {
		t.Fatalf("touch %s again: %v, %v", idKey(n), ok, err)
	}
	if again := reqs.Load() - before; again != 1 {
		t.Errorf("touching again a claim this session wrote cost %d requests, want 1", again)
	}
	t.Logf("%d claims of the previous run taken over with their id keys touched: %d requests", n, touched)
	if touched > n {
		t.Errorf("touching %d ids whose claims the previous run held cost %d requests, want one each", n, touched)
	}
}

// TestSessionStartReadsAgentOnce: a start reads /v1/agent/self once, for
// both the search for the previous run's sessions and the note of the node
// the new session is bound to (it was read twice per start).
func TestSessionStartReadsAgentOnce(t *testing.T) {
	a := consultest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr, reads := requestCounter(t, a.HTTPAddr, func(path string) bool { return path == "/v1/agent/self" })
	for run := range 2 {
		before := reads.Load()
		s := newTestStore(t, addr, "host-s", time.Second)
		if _, err := s.waitSession(ctx); err != nil {
			t.Fatal(err)
		}
		if d := s.Health().Detail; d["session_node"] != a.Name || d["session_node_role"] != "server" {
			t.Fatalf("run %d: session_node %q role %q, want %q server", run, d["session_node"], d["session_node_role"], a.Name)
		}
		if n := reads.Load() - before; n != 1 {
			t.Errorf("run %d: a start read agent/self %d times, want once", run, n)
		}
		s.Stop()
	}
}

// TestStoreReusesConnections: the store's requests share a pool of
// connections, so a hundred requests with watches blocking beside them
// open about as many connections as there are requests at once, not one
// per request (on a fleet's cold start, connect and teardown were 12% of
// an agent's CPU). After the Consul agent restarts, the pooled
// connections are dead: the store gets through on new ones.
func TestStoreReusesConnections(t *testing.T) {
	a := consultest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	addr, _, conns := countingProxy(t, a.HTTPAddr, nil)
	s := newTestStore(t, addr, "host-p", time.Second)
	if _, err := s.waitSession(ctx); err != nil {
		t.Fatal(err)
	}
	// Three watches blocking beside the requests, as an agent's are.
	wctx, wstop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var idx uint64
			for wctx.Err() == nil {
				_, next, err := s.Watch(wctx, fmt.Sprintf("w%d/", w), idx, 300*time.Millisecond)
				if err == nil {
					idx = next
				}
			}
		}()
	}
	before := conns.Load()
	const n = 50
	for i := range n {
		if err := s.Put(ctx, fmt.Sprintf("k/%d", i), []byte("v"), store.PutOptions{Owned: i%2 == 0}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get(ctx, fmt.Sprintf("k/%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	wstop()
	wg.Wait()
	opened := conns.Load() - before
	t.Logf("%d requests and 3 blocking watches opened %d connections", 2*n, opened)
	if opened > 8 {
		t.Fatalf("%d requests beside 3 blocking watches opened %d connections; want at most 8 (a pool), not one per request", 2*n, opened)
	}

	// The agent restarts: every pooled connection is closed under the store.
	a.Kill()
	a.Restart()
	consultest.WaitLeader(t, a.Client(t), 30*time.Second)
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = s.Put(ctx, "after", []byte("1"), store.PutOptions{}); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("Put after the agent restarted: %v", err)
	}
	if kv, err := s.Get(ctx, "after"); err != nil || string(kv.Value) != "1" {
		t.Fatalf("Get after the agent restarted = %+v, %v", kv, err)
	}
}

// TestStoreGzipOnlyWhenAsked: the store does not ask Consul to compress
// its answers (Go's transport would, and Consul compresses every answer),
// unless [store] gzip says so; with it, the answers come compressed and
// read the same.
func TestStoreGzipOnlyWhenAsked(t *testing.T) {
	a := consultest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	u, err := url.Parse("http://" + a.HTTPAddr)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var asked, compressed int
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.Transport = &http.Transport{DisableCompression: true} // pass the agent's Accept-Encoding as it is
	rp.ModifyResponse = func(r *http.Response) error {
		mu.Lock()
		defer mu.Unlock()
		if strings.Contains(r.Request.Header.Get("Accept-Encoding"), "gzip") {
			asked++
		}
		if r.Header.Get("Content-Encoding") == "gzip" {
			compressed++
		}
		return nil
	}
	proxy := httptest.NewServer(rp)
	defer proxy.Close()
	addr := strings.TrimPrefix(proxy.URL, "http://")
	for _, gz := range []bool{false, true} {
		mu.Lock()
		asked, compressed = 0, 0
		mu.Unlock()
		s, err := New(Options{Address: addr, Prefix: "rwd-test/", Node: "host-z", SessionTTL: 30 * time.Second,
			Gzip: gz, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			if err := s.Put(ctx, fmt.Sprintf("z/%d", i), bytes.Repeat([]byte("v"), 2000), store.PutOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		kvs, _, err := s.List(ctx, "z/")
		if err != nil || len(kvs) != 20 || len(kvs[19].Value) != 2000 {
			t.Fatalf("gzip %v: List = %d keys, %v", gz, len(kvs), err)
		}
		s.Stop()
		mu.Lock()
		t.Logf("gzip %v: %d requests asked for gzip, %d answers compressed", gz, asked, compressed)
		if !gz && (asked > 0 || compressed > 0) {
			t.Errorf("gzip off: %d requests asked for gzip, %d answers compressed; want none", asked, compressed)
		}
		if gz && compressed == 0 {
			t.Errorf("gzip on: no answer compressed")
		}
		mu.Unlock()
	}
}
