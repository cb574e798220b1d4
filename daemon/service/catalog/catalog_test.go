package catalog

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/consultest"
)

// recordSink keeps every table it is handed, with the time.
type recordSink struct {
	mu     sync.Mutex
	tables []service.Table
	at     []time.Time
}

func (r *recordSink) SyncServices(t service.Table) error {
	r.mu.Lock()
	r.tables = append(r.tables, t)
	r.at = append(r.at, time.Now())
	r.mu.Unlock()
	return nil
}

// waitFor polls the sink's tables (bounded) for one that satisfies ok and
// returns when the sink got it.
func (r *recordSink) waitFor(t *testing.T, what string, timeout time.Duration, ok func(service.Table) bool) time.Time {
	t.Helper()
	return r.waitFrom(t, 0, what, timeout, ok)
}

// mark is the number of tables handed so far.
func (r *recordSink) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.tables)
}

// waitFrom is waitFor over the tables handed after mark.
func (r *recordSink) waitFrom(t *testing.T, seen int, what string, timeout time.Duration, ok func(service.Table) bool) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		for ; seen < len(r.tables); seen++ {
			if ok(r.tables[seen]) {
				at := r.at[seen]
				r.mu.Unlock()
				return at
			}
		}
		r.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var last service.Table
	if len(r.tables) > 0 {
		last = r.tables[len(r.tables)-1]
	}
	t.Fatalf("the sink never got a table where %s within %s; last: %+v", what, timeout, last)
	return time.Time{}
}

// logBuf collects log lines.
type logBuf struct {
	mu sync.Mutex
	b  strings.Builder
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

type rig struct {
	client *api.Client
	sink   *recordSink
	merger *service.Merger
	logs   *logBuf
}

// start runs a Watcher against a real Consul agent, feeding a Merger whose
// sink records tables. The client is built the way the daemon builds it.
func start(t *testing.T, ag *consultest.Agent, l service.Limits) *rig {
	t.Helper()
	c, err := consul.NewAPIClient(consul.Options{Address: ag.HTTPAddr})
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{client: ag.Client(t), sink: &recordSink{}, logs: &logBuf{}}
	log := slog.New(slog.NewTextHandler(r.logs, nil))
	r.merger = service.NewMerger(r.sink, service.Self{Node: "rwsc-self"}, log)
	r.merger.Expect(service.SourceConsul)
	w := New(Options{Client: c, Limits: l, Log: log, Report: func(s []service.Service, p []string) {
		r.merger.Set(service.SourceConsul, s, p)
	}})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); w.Run(ctx) }()
	go func() { defer wg.Done(); r.merger.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("the watcher or the merger did not stop within 10s of cancel")
		}
		if t.Failed() {
			t.Logf("logs:\n%s", r.logs.String())
		}
	})
	return r
}

func register(t *testing.T, c *api.Client, id, name, addr string, port int, meta map[string]string, ttl bool) {
	t.Helper()
	reg := &api.AgentServiceRegistration{ID: id, Name: name, Address: addr, Port: port, Meta: meta}
	if ttl {
		reg.Check = &api.AgentServiceCheck{CheckID: "chk-" + id, TTL: "10m", Status: api.HealthPassing}
	}
	if err := c.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

func backendState(t service.Table, name, addr string) service.State {
	s, ok := t.Lookup(name)
	if !ok {
		return ""
	}
	for _, b := range s.Backends {
		if b.AddrPort().String() == addr {
			return b.State
		}
	}
	return ""
}

// TestCriticalCheckReachesSink registers a service with two instances and
// TTL checks in a real Consul, fails one check and measures how long the
// sink takes to see that backend critical (the contract: within 2s of
// Consul saying so). The watch's blocking queries wait up to 5 minutes, so
// only a returning blocking query can deliver the change this fast.
func TestCriticalCheckReachesSink(t *testing.T) {
	ag := consultest.Start(t)
	r := start(t, ag, service.Limits{VIPRanges: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}})
	meta := map[string]string{MetaVIP: "10.96.0.10", MetaPort: "80"}
	register(t, r.client, "web-1", "web", "10.250.1.5", 8080, meta, true)
	register(t, r.client, "web-2", "web", "10.250.2.5", 8080, meta, true)
	register(t, r.client, "other", "other", "10.250.1.9", 9000, nil, true) // no rackwire_vip: not a service of ours

	r.sink.waitFor(t, "both web backends are active", 20*time.Second, func(tb service.Table) bool {
		return backendState(tb, "web", "10.250.1.5:8080") == service.StateActive && backendState(tb, "web", "10.250.2.5:8080") == service.StateActive
	})
	tb, _, _ := r.merger.Table()
	if len(tb.Services) != 1 {
		t.Fatalf("table has %d services, want only web: %+v", len(tb.Services), tb)
	}
	web := tb.Services[0]
	if got, want := web.Frontend.String(), "10.96.0.10:80/tcp"; got != want {
		t.Errorf("web frontend = %s, want %s", got, want)
	}
	for _, b := range web.Backends {
		if b.Node != ag.Name || b.Source != service.SourceConsul {
			t.Errorf("backend %v: node %q source %q, want node %q source consul", b.AddrPort(), b.Node, b.Source, ag.Name)
		}
	}

	for round := 0; round < 3; round++ {
		mark := r.sink.mark()
		failed := time.Now()
		if err := r.client.Agent().FailTTL("chk-web-1", "rwsc test"); err != nil {
			t.Fatal(err)
		}
		at := r.sink.waitFrom(t, mark, "web-1 is critical", 10*time.Second, func(tb service.Table) bool {
			return backendState(tb, "web", "10.250.1.5:8080") == service.StateCritical
		})
		took := at.Sub(failed)
		t.Logf("round %d: check failed → sink saw the backend critical after %s", round, took.Round(time.Millisecond))
		fmt.Printf("catalog: check fail to sink: %s\n", took.Round(time.Millisecond))
		if took > 2*time.Second {
			t.Errorf("the critical backend reached the sink after %s, want within 2s of Consul saying so", took)
		}
		if s := backendState(r.lastTable(), "web", "10.250.2.5:8080"); s != service.StateActive {
			t.Errorf("web-2 is %q after web-1 failed, want active", s)
		}
		if err := r.client.Agent().PassTTL("chk-web-1", ""); err != nil {
			t.Fatal(err)
		}
		r.sink.waitFrom(t, mark, "web-1 is active again", 10*time.Second, func(tb service.Table) bool {
			return backendState(tb, "web", "10.250.1.5:8080") == service.StateActive
		})
	}

	// Maintenance mode on the instance → maintenance.
	if err := r.client.Agent().EnableServiceMaintenance("web-2", "rwsc test"); err != nil {
		t.Fatal(err)
	}
	r.sink.waitFor(t, "web-2 is in maintenance", 10*time.Second, func(tb service.Table) bool {
		return backendState(tb, "web", "10.250.2.5:8080") == service.StateMaint
	})

	// Deregistering the last instance removes the service from the table.
	for _, id := range []string{"web-1", "web-2"} {
		if err := r.client.Agent().ServiceDeregister(id); err != nil {
			t.Fatal(err)
		}
	}
	r.sink.waitFor(t, "web is gone", 10*time.Second, func(tb service.Table) bool {
		_, ok := tb.Lookup("web")
		return !ok
	})
}

func (r *rig) lastTable() service.Table {
	tb, _, _ := r.merger.Table()
	return tb
}

// TestHostileCatalog feeds the watch what a careless or hostile registrant
// can write: a VIP that is no address, a VIP outside [bgp] vip_ranges, port
// 0, a bad protocol, disagreeing instances and 10,000 instances of one
// service. Each is skipped with a log line; the good service still works,
// the big one is capped, and nothing crashes or stalls.
func TestHostileCatalog(t *testing.T) {
	ag := consultest.Start(t)
	limits := service.Limits{VIPRanges: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}, MaxBackends: 1000}
	r := start(t, ag, limits)
	register(t, r.client, "good-1", "good", "10.250.1.5", 80, map[string]string{MetaVIP: "10.96.0.1"}, true)
	register(t, r.client, "badvip-1", "badvip", "10.250.1.6", 80, map[string]string{MetaVIP: "not-an-ip"}, true)
	register(t, r.client, "outside-1", "outside", "10.250.1.7", 80, map[string]string{MetaVIP: "192.0.2.10"}, true)
	register(t, r.client, "port0-1", "port0", "10.250.1.8", 0, map[string]string{MetaVIP: "10.96.0.3"}, true)
	register(t, r.client, "proto-1", "proto", "10.250.1.9", 80, map[string]string{MetaVIP: "10.96.0.4", MetaProtocol: "sctp"}, true)
	register(t, r.client, "split-1", "split", "10.250.1.10", 80, map[string]string{MetaVIP: "10.96.0.5"}, true)
	register(t, r.client, "split-2", "split", "10.250.1.11", 80, map[string]string{MetaVIP: "10.96.0.5"}, true)
	register(t, r.client, "split-3", "split", "10.250.1.12", 80, map[string]string{MetaVIP: "10.96.0.6"}, true)

	const big = 10000
	start := time.Now()
	regBig(t, r.client, big)
	t.Logf("registered %d instances in %s", big, time.Since(start).Round(time.Millisecond))

	r.sink.waitFor(t, "good, split and the capped big service are in", 120*time.Second, func(tb service.Table) bool {
		b, ok := tb.Lookup("big")
		_, g := tb.Lookup("good")
		_, s := tb.Lookup("split")
		return ok && g && s && len(b.Backends) == 1000 && r.merger.Problems() != nil && strings.Contains(strings.Join(r.merger.Problems(), "\n"), "9000 instance(s)")
	})
	tb := r.lastTable()
	for _, name := range []string{"badvip", "outside", "port0", "proto"} {
		if _, ok := tb.Lookup(name); ok {
			t.Errorf("service %s is in the table, want it skipped", name)
		}
	}
	if s, _ := tb.Lookup("split"); len(s.Backends) != 2 || s.Frontend.VIP.String() != "10.96.0.5" {
		t.Errorf("split = %+v, want the two instances that agree on 10.96.0.5", s)
	}
	problems := strings.Join(r.merger.Problems(), "\n")
	for _, want := range []string{"badvip", "not-an-ip", "outside", "vip_ranges", "port0", "port 0", "proto", "sctp", "split", "9000 instance(s)"} {
		if !strings.Contains(problems, want) {
			t.Errorf("problems lack %q:\n%s", want, problems)
		}
	}
	// One log line per problem, not one per pass: touch the good service a
	// few times (each is a new pass of every list) and count the lines.
	for i := 0; i < 3; i++ {
		if err := r.client.Agent().UpdateTTL("chk-good-1", fmt.Sprint(i), api.HealthPassing); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Second)
	if n := strings.Count(r.logs.String(), "sctp"); n != 1 {
		t.Errorf("the bad protocol was logged %d times, want once:\n%s", n, r.logs.String())
	}
	fmt.Printf("catalog: hostile data: %d services, big capped at %d of %d\n", len(tb.Services), 1000, big)
}

// regBig registers n instances of "big" (no checks: passing) on a catalog
// node of their own, 64 per transaction (agent registrations one by one
// take minutes).
func regBig(t *testing.T, c *api.Client, n int) {
	t.Helper()
	const node = "rwsc-big"
	if _, err := c.Catalog().Register(&api.CatalogRegistration{Node: node, Address: "10.100.0.1"}, nil); err != nil {
		t.Fatalf("register node %s: %v", node, err)
	}
	for i := 0; i < n; i += 64 {
		var ops api.TxnOps
		for j := i; j < min(i+64, n); j++ {
			ops = append(ops, &api.TxnOp{Service: &api.ServiceTxnOp{Verb: api.ServiceSet, Node: node, Service: api.AgentService{
				ID: fmt.Sprintf("big-%d", j), Service: "big", Address: fmt.Sprintf("10.%d.%d.%d", 100+j/65536, (j/256)%256, j%256), Port: 80,
				Meta: map[string]string{MetaVIP: "10.96.0.9"},
			}}})
		}
		ok, resp, _, err := c.Txn().Txn(ops, nil)
		if err != nil || !ok {
			t.Fatalf("register big %d..: ok %v err %v resp %+v", i, ok, err, resp)
		}
	}
}

// TestConsulOutageKeepsServices: when the local Consul agent goes away, the
// watch keeps the last known services (a failed query never reads as "no
// services") and says so once in the log.
func TestConsulOutageKeepsServices(t *testing.T) {
	ag := consultest.Start(t)
	r := start(t, ag, service.Limits{})
	register(t, r.client, "web-1", "web", "10.250.1.5", 8080, map[string]string{MetaVIP: "10.96.0.10"}, true)
	r.sink.waitFor(t, "web is in", 20*time.Second, func(tb service.Table) bool { return backendState(tb, "web", "10.250.1.5:8080") == service.StateActive })
	mark := r.sink.mark()
	ag.Kill()
	time.Sleep(3 * time.Second)
	if s := backendState(r.lastTable(), "web", "10.250.1.5:8080"); s != service.StateActive {
		t.Errorf("after Consul went away, web-1 is %q in the table, want still active", s)
	}
	if n := r.sink.mark() - mark; n != 0 {
		t.Errorf("the sink got %d tables while Consul was away, want none", n)
	}
	if !strings.Contains(r.logs.String(), "keeping the last known") {
		t.Errorf("no log line says the last known services are kept:\n%s", r.logs.String())
	}
}
