package service

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

func mustBuild(t *testing.T, src Source, s Spec) Service {
	t.Helper()
	svc, skipped, err := s.Build(src, Limits{})
	if err != nil || len(skipped) > 0 {
		t.Fatalf("Build(%+v) = %v, %v", s, skipped, err)
	}
	return svc
}

func TestMergePrecedence(t *testing.T) {
	cfg := mustBuild(t, SourceConfig, Spec{Name: "web", VIP: "10.96.0.10", Port: 80, Backends: []string{"10.250.1.5:8080"}})
	st := mustBuild(t, SourceStore, Spec{Name: "web-store", VIP: "10.96.0.10", Port: 80, Backends: []string{"10.250.2.5:8080"}})
	stUDP := mustBuild(t, SourceStore, Spec{Name: "dns", VIP: "10.96.0.10", Port: 53, Protocol: "udp", Backends: []string{"10.250.2.6:53"}})
	cons := mustBuild(t, SourceConsul, Spec{Name: "dns", VIP: "10.96.0.20", Port: 53, Protocol: "udp"})
	cons2 := mustBuild(t, SourceConsul, Spec{Name: "api", VIP: "10.96.0.30", Port: 443, Backends: []string{"10.250.1.7:443", "10.250.3.7:443"}})
	cons2.Backends[1].Node = "host-b"

	tb, conflicts := Merge(Self{Node: "host-b", CIDRs: []netip.Prefix{netip.MustParsePrefix("10.250.1.0/24")}},
		[]Service{cfg}, []Service{st, stUDP}, []Service{cons, cons2})
	var got []string
	for _, s := range tb.Services {
		got = append(got, s.Name+"@"+s.Frontend.String()+"("+string(s.Source)+")")
	}
	want := "dns@10.96.0.10:53/udp(store) web@10.96.0.10:80/tcp(config) api@10.96.0.30:443/tcp(consul)"
	if strings.Join(got, " ") != want {
		t.Errorf("Merge = %v, want %s", got, want)
	}
	if len(conflicts) != 2 || !strings.Contains(conflicts[0]+conflicts[1], "web-store") || !strings.Contains(conflicts[0]+conflicts[1], "name dns") {
		t.Errorf("conflicts = %q, want the store's web-store frontend and Consul's dns name", conflicts)
	}
	api, _ := tb.Lookup("api")
	if !api.Backends[0].Local || !api.Backends[1].Local {
		t.Errorf("api backends %+v: want both local (one in [ipam] cidrs, one on node host-b)", api.Backends)
	}
	if web, _ := tb.Lookup("web"); !web.Backends[0].Local {
		t.Errorf("web backend in the host's CIDR not local: %+v", web.Backends)
	}
	if dns, _ := tb.Lookup("dns"); dns.Backends[0].Local {
		t.Errorf("dns backend outside the host's CIDR is local: %+v", dns.Backends)
	}
	vips := tb.AnnounceVIPs()
	if len(vips) != 2 || vips[0].String() != "10.96.0.10" || vips[1].String() != "10.96.0.30" {
		t.Errorf("AnnounceVIPs = %v, want 10.96.0.10 (web's local backend) and 10.96.0.30", vips)
	}
}

func TestCapKeepsActiveFirst(t *testing.T) {
	var bs []Backend
	for i := 0; i < 10; i++ {
		st := StateCritical
		if i >= 7 {
			st = StateActive
		}
		bs = append(bs, Backend{Addr: netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), Port: 80, State: st})
	}
	got, n := Cap(bs, 4)
	if n != 6 || len(got) != 4 {
		t.Fatalf("Cap(10, 4) = %d kept, %d dropped; want 4, 6", len(got), n)
	}
	if got[0].Addr.String() != "10.0.0.0" || got[1].Addr.String() != "10.0.0.7" || got[3].Addr.String() != "10.0.0.9" {
		t.Errorf("Cap kept %v; want the three active ones and the lowest critical, sorted", got)
	}
}

type flakySink struct {
	mu     sync.Mutex
	fail   bool
	tables []Table
}

func (f *flakySink) SyncServices(t Table) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return errors.New("map full")
	}
	f.tables = append(f.tables, t)
	return nil
}

func (f *flakySink) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.tables)
}

func waitUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestMergerWaitsForSourcesAndRetries: no table reaches the sink before
// every expected source reported; a refused table is retried and the
// subscribers see only tables the sink took; a problem is logged once.
func TestMergerWaitsForSourcesAndRetries(t *testing.T) {
	sink := &flakySink{}
	var logs strings.Builder
	var lmu sync.Mutex
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) { lmu.Lock(); defer lmu.Unlock(); return logs.Write(p) }), nil))
	m := NewMerger(sink, Self{}, log)
	m.RetryInterval = 20 * time.Millisecond
	m.FirstSyncWait = time.Minute
	m.Expect(SourceConfig)
	m.Expect(SourceConsul)
	var subs []Table
	var smu sync.Mutex
	m.Subscribe(func(t Table) { smu.Lock(); subs = append(subs, t); smu.Unlock() })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	m.Set(SourceConfig, []Service{mustBuild(t, SourceConfig, Spec{Name: "web", VIP: "10.96.0.10", Port: 80})}, nil)
	time.Sleep(100 * time.Millisecond)
	if n := sink.count(); n != 0 {
		t.Fatalf("the sink got %d tables before Consul reported, want 0", n)
	}
	sink.mu.Lock()
	sink.fail = true
	sink.mu.Unlock()
	for i := 0; i < 5; i++ {
		m.Set(SourceConsul, nil, []string{"consul service bad: 1 instance(s) skipped"})
	}
	time.Sleep(100 * time.Millisecond)
	if _, synced, errText := m.Table(); synced || !strings.Contains(errText, "map full") {
		t.Errorf("Table() synced=%v err=%q while the sink fails, want false and the error", synced, errText)
	}
	smu.Lock()
	if len(subs) != 0 {
		t.Errorf("subscribers got %d tables the sink refused", len(subs))
	}
	smu.Unlock()
	sink.mu.Lock()
	sink.fail = false
	sink.mu.Unlock()
	waitUntil(t, "the retried table", func() bool { return sink.count() > 0 })
	waitUntil(t, "subscribers", func() bool { smu.Lock(); defer smu.Unlock(); return len(subs) > 0 })
	lmu.Lock()
	defer lmu.Unlock()
	if n := strings.Count(logs.String(), "1 instance(s) skipped"); n != 1 {
		t.Errorf("the problem was logged %d times, want once:\n%s", n, logs.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func TestSpecBuild(t *testing.T) {
	l := Limits{VIPRanges: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}, MaxBackends: 2}
	svc, skipped, err := Spec{Name: "web", VIP: "10.96.0.10", Port: 80,
		Backends: []string{"10.250.1.9:80", "bogus", "10.250.1.5:80", "10.250.1.5:80", "[fd00::1]:80", "10.250.1.6:0", "10.250.1.7:80"}}.Build(SourceStore, l)
	if err != nil {
		t.Fatal(err)
	}
	if len(svc.Backends) != 2 || svc.Backends[0].AddrPort().String() != "10.250.1.5:80" || svc.Backends[1].AddrPort().String() != "10.250.1.7:80" {
		t.Errorf("backends = %+v, want 10.250.1.5:80 and 10.250.1.7:80 (sorted, capped at 2)", svc.Backends)
	}
	if len(skipped) != 5 {
		t.Errorf("skipped = %q, want 5 lines (bad, twice, family, port 0, cap)", skipped)
	}
	for _, bad := range []Spec{
		{Name: "x", VIP: "192.0.2.1", Port: 80},
		{Name: "x", VIP: "0.0.0.0", Port: 80},
		{Name: "x", VIP: "127.0.0.1", Port: 80},
		{Name: "x", VIP: "10.96.0.1", Port: 70000},
		{Name: "x/y", VIP: "10.96.0.1", Port: 80},
		{Name: "x", VIP: "10.96.0.1", Port: 80, Protocol: "icmp"},
	} {
		if _, _, err := bad.Build(SourceStore, l); err == nil {
			t.Errorf("Build(%+v) accepted it", bad)
		}
	}
}
