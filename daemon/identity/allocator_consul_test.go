package identity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/consultest"
)

const testPrefix = "rwd/"

func newConsulStore(t testing.TB, addr, node string) *consul.Store {
	t.Helper()
	s, err := consul.New(consul.Options{
		Address: addr, Prefix: testPrefix, Node: node, SessionTTL: time.Minute,
		RenewInterval: time.Second, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second,
		CallTimeout: 5 * time.Second,
	}, nil)
	if err != nil {
		t.Fatalf("consul.New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// TestConsulConcurrencyInvariant: 20 allocators (own store, session and
// node name each) allocate 500 label sets each out of a pool of 1500
// against one real Consul.
func TestConsulConcurrencyInvariant(t *testing.T) {
	agent := consultest.Start(t)
	var stores []*consul.Store
	perHost, pool := 500, 1500
	if testing.Short() {
		perHost, pool = 100, 300
	}
	start := time.Now()
	got := runAllocators(t, func(i int) *Allocator {
		s := newConsulStore(t, agent.HTTPAddr, fmt.Sprintf("host-%02d", i))
		stores = append(stores, s)
		return newTestAllocator(t, s, fmt.Sprintf("host-%02d", i), nil)
	}, 20, perHost, pool, 4*time.Minute)
	t.Logf("20 x %d allocations in %s (%.0f/s)", perHost, time.Since(start).Round(time.Millisecond),
		float64(20*perHost)/time.Since(start).Seconds())
	checkInvariant(t, stores[0], got)
}

// runAllocatorsRetrying is runAllocators for failure tests: an Allocate
// that fails (Consul electing a leader) is retried until the deadline.
func runAllocatorsRetrying(ctx context.Context, t testing.TB, as []*Allocator, perHost, pool, seed int, done *atomic.Int64) []map[string]ID {
	got := make([]map[string]ID, len(as))
	var wg sync.WaitGroup
	for i, a := range as {
		got[i] = map[string]ID{}
		wg.Add(1)
		go func(i int, a *Allocator) {
			defer wg.Done()
			for k := 0; k < perHost; k++ {
				ls := labelSet((seed + i*37 + k*7) % pool)
				for {
					id, _, err := a.Allocate(ctx, ls)
					if err == nil {
						got[i][ls.String()] = id
						done.Add(1)
						break
					}
					if ctx.Err() != nil {
						t.Errorf("allocator %d: Allocate(%s): %v", i, ls, err)
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
		}(i, a)
	}
	wg.Wait()
	return got
}

// TestConsulClusterLeaderKill: a 3-server cluster; the leader is killed
// while 6 allocators (on the followers) allocate; the invariant holds and
// allocation resumes.
func TestConsulClusterLeaderKill(t *testing.T) {
	agents := consultest.StartCluster(t, 3)
	leader := consultest.Leader(t, agents)
	if leader == nil {
		t.Fatalf("no leader among the servers")
	}
	var followers []*consultest.Agent
	for _, a := range agents {
		if a != leader {
			followers = append(followers, a)
		}
	}
	var as []*Allocator
	var stores []*consul.Store
	for i := 0; i < 6; i++ {
		node := fmt.Sprintf("host-%d", i)
		s := newConsulStore(t, followers[i%2].HTTPAddr, node)
		stores = append(stores, s)
		as = append(as, newTestAllocator(t, s, node, nil))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var done atomic.Int64
	var got []map[string]ID
	finished := make(chan struct{})
	go func() {
		got = runAllocatorsRetrying(ctx, t, as, 150, 300, 0, &done)
		close(finished)
	}()
	for done.Load() < 150 && ctx.Err() == nil {
		time.Sleep(20 * time.Millisecond)
	}
	before := done.Load()
	killed := time.Now()
	leader.Kill()
	t.Logf("killed leader %s after %d allocations", leader.Name, before)
	// Resumption: a label set nobody has, allocated (with retries) right
	// after the kill, needs the new leader.
	probe := MustLabels("app", "after-kill")
	for {
		id, _, err := as[0].Allocate(ctx, probe)
		if err == nil {
			t.Logf("new allocation done %s after the leader was killed (id %d)", time.Since(killed).Round(time.Millisecond), id)
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("allocation did not resume: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	<-finished
	if t.Failed() {
		return
	}
	// New label sets after the election still allocate.
	more := runAllocatorsRetrying(ctx, t, as, 20, 400, 300, &done)
	for i := range got {
		for k, v := range more[i] {
			got[i][k] = v
		}
	}
	checkInvariant(t, stores[0], got)
}

// TestConsulMalformedData plants bad data in Consul; the allocator logs
// and skips it and keeps working.
func TestConsulMalformedData(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client(t)
	bad := map[string][]byte{
		store.IdentityIDPrefix + "garbage":          []byte("app=x;"),
		store.IdentityIDPrefix + "117440769":        []byte("{\"not\": \"labels\""),
		store.IdentityIDPrefix + "117440770":        bytes.Repeat([]byte("z"), 400*1024),
		store.IdentityIDPrefix + "117440771":        []byte("no-semicolon"),
		store.IdentityIDPrefix + "3":                []byte("reserved:unmanaged=;"),
		store.IdentityValuePrefix + "app=web;/evil": []byte("{\"id\": 1}"),
		store.IdentityValuePrefix + "app=web;/big":  bytes.Repeat([]byte("9"), 400*1024),
	}
	for k, v := range bad {
		if _, err := c.KV().Put(&api.KVPair{Key: testPrefix + k, Value: v}, nil); err != nil {
			t.Fatalf("plant %s: %v", k, err)
		}
	}
	var logs logBuf
	s := newConsulStore(t, agent.HTTPAddr, "host-a")
	a := newTestAllocator(t, s, "host-a", slog.New(slog.NewTextHandler(&logs, nil)))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	for _, ls := range []Labels{MustLabels("app", "web"), MustLabels("app", "db")} {
		id, _, err := a.Allocate(ctx, ls)
		if err != nil || !id.IsCluster() {
			t.Fatalf("Allocate(%s) next to malformed data = %d, %v", ls, id, err)
		}
	}
	if n := len(a.List()); n != 2 {
		t.Fatalf("List = %v, want the 2 good identities only", a.List())
	}
	out := logs.String()
	for _, key := range []string{"garbage", "117440769", "117440770", "117440771", "/evil", "/big"} {
		if !strings.Contains(out, key) {
			t.Errorf("no log line for malformed key %s", key)
		}
	}
	if t.Failed() {
		t.Logf("logs:\n%s", out)
	}
}

// TestConsulOutageKnownLabels: with Consul dead, a label set this host's
// cache knows still resolves; an unknown one fails with ErrUnavailable.
func TestConsulOutageKnownLabels(t *testing.T) {
	agent := consultest.Start(t)
	sa := newConsulStore(t, agent.HTTPAddr, "host-a")
	sb := newConsulStore(t, agent.HTTPAddr, "host-b")
	a := newTestAllocator(t, sa, "host-a", nil)
	b := newTestAllocator(t, sb, "host-b", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	web := MustLabels("app", "web")
	id, _, err := a.Allocate(ctx, web)
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, ok := b.LookupLabels(web); ok {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("host-b never learned %s", web)
		}
		time.Sleep(20 * time.Millisecond)
	}
	agent.Kill()
	got, _, err := b.Allocate(ctx, web)
	if err != nil || got != id {
		t.Fatalf("Allocate(known) with Consul down = %d, %v, want %d", got, err, id)
	}
	short, cancel2 := context.WithTimeout(ctx, 3*time.Second)
	defer cancel2()
	if _, _, err := b.Allocate(short, MustLabels("app", "unknown")); err == nil {
		t.Fatalf("Allocate(unknown) with Consul down succeeded")
	}
	if h := sb.Health(); h.State != store.StateDegraded {
		t.Fatalf("Health with Consul down = %+v, want degraded", h)
	}
}

// TestConsulGCElected: GC under a Consul lock deletes an unused id after
// two rounds and keeps the used one.
func TestConsulGCElected(t *testing.T) {
	agent := consultest.Start(t)
	s := newConsulStore(t, agent.HTTPAddr, "host-a")
	a := newTestAllocator(t, s, "host-a", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	web, db := MustLabels("app", "web"), MustLabels("app", "db")
	webID, _, _ := a.Allocate(ctx, web)
	dbID, _, err := a.Allocate(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, db); err != nil {
		t.Fatal(err)
	}
	g := NewGC(s, GCOptions{Interval: 300 * time.Millisecond, Elector: s.Elector("locks/identity-gc")})
	gctx, gcancel := context.WithCancel(ctx)
	gdone := make(chan struct{})
	go func() { _ = g.Run(gctx); close(gdone) }()
	defer func() { gcancel(); <-gdone }()
	for {
		_, err := s.Get(ctx, store.IdentityIDKey(uint32(dbID)))
		if err != nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("unused identity %d never collected", dbID)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := s.Get(ctx, store.IdentityIDKey(uint32(webID))); err != nil {
		t.Fatalf("used identity %d collected: %v", webID, err)
	}
}

// TestConsulACLPolicy runs the allocator and the GC election with a token
// that has exactly the policy docs/consul.md asks operators for, read from
// a token file; and checks that no token is refused (not "unavailable").
func TestConsulACLPolicy(t *testing.T) {
	agent := consultest.StartACL(t, "b1a5e0c4-6a53-4c38-9b4e-3f1d6e2f7a10")
	c := agent.Client(t)
	rules := `
key_prefix "` + testPrefix + `" {
  policy = "write"
}
session_prefix "" {
  policy = "write"
}
`
	pol, _, err := c.ACL().PolicyCreate(&api.ACLPolicy{Name: "rackwire", Rules: rules}, nil)
	if err != nil {
		t.Fatalf("create policy: %v", err)
	}
	tok, _, err := c.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	tokenFile := t.TempDir() + "/consul.token"
	if err := os.WriteFile(tokenFile, []byte(tok.SecretID+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := consul.New(consul.Options{Address: agent.HTTPAddr, Prefix: testPrefix, Node: "host-acl",
		TokenFile: tokenFile, RenewInterval: time.Second, BackoffMin: 100 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	a := newTestAllocator(t, s, "host-acl", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, _, err := a.Allocate(ctx, MustLabels("app", "web")); err != nil {
		t.Fatalf("Allocate with the documented policy: %v", err)
	}
	e := s.Elector("locks/identity-gc")
	if _, err := e.Lead(ctx); err != nil {
		t.Fatalf("GC election with the documented policy: %v", err)
	}
	_ = e.Resign()

	anon, err := consul.New(consul.Options{Address: agent.HTTPAddr, Prefix: testPrefix, Node: "host-anon"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Stop()
	err = anon.Put(ctx, "x", []byte("1"), store.PutOptions{})
	if err == nil || errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Put without a token = %v, want a permission error that is not ErrUnavailable", err)
	}
}

// TestConsulAllocatorSessionLoss: the value keys of an allocator come back
// after its session is destroyed in Consul.
func TestConsulAllocatorSessionLoss(t *testing.T) {
	agent := consultest.Start(t)
	s := newConsulStore(t, agent.HTTPAddr, "host-a")
	a := newTestAllocator(t, s, "host-a", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var keys []string
	for i := 0; i < 10; i++ {
		ls := labelSet(i)
		if _, _, err := a.Allocate(ctx, ls); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, store.IdentityValueKey(ls.String(), "host-a"))
	}
	if _, err := agent.Client(t).Session().Destroy(s.Session(), nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, k := range keys {
		for {
			if _, err := s.Get(ctx, k); err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("value key %s did not come back", k)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Logf("10 value keys back %s after the session was destroyed", time.Since(start).Round(time.Millisecond))
}
