// Package catalog is the Consul source of the service table: it follows the
// local Consul agent's catalog with blocking queries and turns every
// service whose instances carry the meta key rackwire_vip into a
// service.Service, with one backend per instance and the instance's health
// as the backend's state.
//
// Queries (all blocking, so a change arrives as soon as Consul has it;
// nothing here sleeps between polls):
//   - GET /v1/catalog/services?filter="rackwire_vip" in ServiceMeta&index=N
//     names the services to follow;
//   - GET /v1/health/service/NAME?index=N per such service gives its
//     instances with their checks: passing → active; maintenance (service
//     or node) → maintenance; warning and critical → critical ("passing
//     instances only", as Consul's ?passing reads it).
//
// Meta, per instance: rackwire_vip (required, an address), rackwire_port
// (optional; default: the instance's own port), rackwire_protocol (tcp or
// udp, default tcp). Instances of one service that disagree on the frontend
// are not merged: the frontend most instances name wins (ties: the lower
// one), the others are skipped and reported.
//
// Bad data never stops the watch: an instance with a bad VIP, a VIP outside
// [bgp] vip_ranges, port 0, a bad protocol or address is skipped; past
// MaxBackends instances the rest are skipped (active ones are kept first);
// past MaxServices services the rest are not followed. Each kind of problem
// is one line per service with a count, and the merger logs a line once,
// when it appears. A Consul error keeps the last known services (never an
// empty table) and retries with jittered backoff.
//
// Who owns what: the Watcher owns its per-service goroutines and their last
// results; it hands the whole Consul view to Report after every change.
// Who imports it: the daemon wiring.
package catalog

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/internal/backoff"
)

// Meta keys read from each instance.
const (
	MetaVIP      = "rackwire_vip"
	MetaPort     = "rackwire_port"
	MetaProtocol = "rackwire_protocol"
)

// DefaultMaxServices bounds the services followed at once. Each one holds a
// blocking query (one HTTP connection) open on the local Consul agent,
// whose limits.http_max_conns_per_client is 200 by default; the store's own
// watches need the rest.
const DefaultMaxServices = 128

// Options configure a Watcher.
type Options struct {
	Client *api.Client
	Limits service.Limits
	// LimitsFunc, when set, is asked for the limits on every change
	// instead of Limits (a reload changes [bgp] vip_ranges).
	LimitsFunc func() service.Limits
	// MaxServices: default DefaultMaxServices.
	MaxServices int
	// Wait is a blocking query's longest wait (default 5m).
	Wait time.Duration
	// BackoffMin/Max bound the retry after a failed query (1s/30s).
	BackoffMin, BackoffMax time.Duration
	Log                    *slog.Logger
	// Report gets the whole Consul view after every change, with the
	// problems found in it. Called from several goroutines, serialised.
	Report func(svcs []service.Service, problems []string)
}

// Watcher follows the catalog. Run it once.
type Watcher struct {
	o Options

	mu      sync.Mutex // guards parts, running, listed, errText
	parts   map[string]*part
	running map[string]context.CancelFunc
	listed  bool   // the catalog was listed once
	capped  string // problem line for services past MaxServices
	reportM sync.Mutex
}

// part is one followed service's last result.
type part struct {
	svc      service.Service
	ok       bool // svc is usable
	problems []string
}

// New returns a Watcher.
func New(o Options) *Watcher {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MaxServices <= 0 {
		o.MaxServices = DefaultMaxServices
	}
	if o.Wait <= 0 {
		o.Wait = 5 * time.Minute
	}
	if o.BackoffMin <= 0 {
		o.BackoffMin = time.Second
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 30 * time.Second
	}
	return &Watcher{o: o, parts: map[string]*part{}, running: map[string]context.CancelFunc{}}
}

// Run follows the catalog until ctx ends, then stops every service watch
// and waits for them.
func (w *Watcher) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	var index uint64
	bo := backoff.New(w.o.BackoffMin, w.o.BackoffMax)
	failing := false
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: w.o.Wait, Filter: `"` + MetaVIP + `" in ServiceMeta`}).WithContext(ctx)
		names, meta, err := w.o.Client.Catalog().Services(q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			wait := bo.Next()
			if !failing {
				w.o.Log.Warn("consul catalog query failed; keeping the last known services", "err", err, "retry_in", wait)
			}
			failing = true
			backoff.Sleep(ctx, wait)
			continue
		}
		if failing {
			w.o.Log.Info("consul catalog answers again")
		}
		failing = false
		bo.Reset()
		if meta.LastIndex < index {
			index = 0 // Consul's index went backwards: start over
		} else {
			index = meta.LastIndex
		}
		w.reconcile(ctx, &wg, names)
	}
}

// reconcile starts a watch per listed service (up to MaxServices, by name)
// and stops the watches of services no longer listed.
func (w *Watcher) reconcile(ctx context.Context, wg *sync.WaitGroup, names map[string][]string) {
	list := make([]string, 0, len(names))
	for n := range names {
		list = append(list, n)
	}
	sort.Strings(list)
	capped := ""
	if len(list) > w.o.MaxServices {
		capped = fmt.Sprintf("%d services carry %s; only the first %d by name are followed (each holds a blocking query on the local agent)",
			len(list), MetaVIP, w.o.MaxServices)
		list = list[:w.o.MaxServices]
	}
	want := map[string]bool{}
	for _, n := range list {
		want[n] = true
	}
	w.mu.Lock()
	w.capped = capped
	for n, cancel := range w.running {
		if !want[n] {
			cancel()
			delete(w.running, n)
			delete(w.parts, n)
		}
	}
	for _, n := range list {
		if _, ok := w.running[n]; ok {
			continue
		}
		sctx, cancel := context.WithCancel(ctx)
		w.running[n] = cancel
		wg.Add(1)
		go func() { defer wg.Done(); w.watchService(sctx, n) }()
	}
	w.listed = true
	w.mu.Unlock()
	w.report()
}

// watchService follows one service's instances and health.
func (w *Watcher) watchService(ctx context.Context, name string) {
	var index uint64
	bo := backoff.New(w.o.BackoffMin, w.o.BackoffMax)
	failing := false
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: w.o.Wait}).WithContext(ctx)
		entries, meta, err := w.o.Client.Health().Service(name, "", false, q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			wait := bo.Next()
			if !failing {
				w.o.Log.Warn("consul health query failed; keeping the service's last known backends", "service", name, "err", err, "retry_in", wait)
			}
			failing = true
			backoff.Sleep(ctx, wait)
			continue
		}
		failing = false
		bo.Reset()
		if meta.LastIndex == index && index != 0 {
			continue // the wait elapsed with no change
		}
		if meta.LastIndex < index {
			index = 0
		} else {
			index = meta.LastIndex
		}
		l := w.o.Limits
		if w.o.LimitsFunc != nil {
			l = w.o.LimitsFunc()
		}
		svc, ok, problems := Build(name, entries, l)
		w.mu.Lock()
		if _, still := w.running[name]; !still || ctx.Err() != nil {
			w.mu.Unlock()
			return
		}
		w.parts[name] = &part{svc: svc, ok: ok, problems: problems}
		w.mu.Unlock()
		w.report()
	}
}

// report hands the whole view to Report once the catalog was listed and
// every followed service has answered once.
func (w *Watcher) report() {
	w.reportM.Lock()
	defer w.reportM.Unlock()
	w.mu.Lock()
	if !w.listed {
		w.mu.Unlock()
		return
	}
	names := make([]string, 0, len(w.running))
	for n := range w.running {
		if _, ok := w.parts[n]; !ok {
			w.mu.Unlock()
			return // not complete yet: a first report must not read as "no backends"
		}
		names = append(names, n)
	}
	sort.Strings(names)
	var svcs []service.Service
	var problems []string
	if w.capped != "" {
		problems = append(problems, w.capped)
	}
	for _, n := range names {
		p := w.parts[n]
		if p.ok {
			svcs = append(svcs, p.svc)
		}
		problems = append(problems, p.problems...)
	}
	w.mu.Unlock()
	if w.o.Report != nil {
		w.o.Report(svcs, problems)
	}
}

// tally counts instances skipped for one reason, with one example.
type tally struct {
	n       int
	example string
}

// Build turns one Consul service's health entries into a Service. ok is
// false when no instance names a usable frontend; problems has one line per
// kind of skipped instance.
func Build(name string, entries []*api.ServiceEntry, l service.Limits) (svc service.Service, ok bool, problems []string) {
	skips := map[string]*tally{}
	skip := func(reason, example string) {
		t := skips[reason]
		if t == nil {
			t = &tally{example: example}
			skips[reason] = t
		}
		t.n++
	}
	defer func() {
		reasons := make([]string, 0, len(skips))
		for r := range skips {
			reasons = append(reasons, r)
		}
		sort.Strings(reasons)
		for _, r := range reasons {
			problems = append(problems, fmt.Sprintf("consul service %s: %d instance(s) skipped: %s (e.g. %s)", name, skips[r].n, r, skips[r].example))
		}
	}()
	if err := service.CheckName(name); err != nil {
		skip(err.Error(), "the service")
		return svc, false, problems
	}
	groups := map[service.Frontend][]service.Backend{}
	for _, e := range entries {
		if e == nil || e.Service == nil || e.Node == nil {
			continue
		}
		id := e.Node.Node + "/" + e.Service.ID
		f, reason := frontendOf(e.Service, l)
		if reason != "" {
			skip(reason, id)
			continue
		}
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		a, err := netip.ParseAddr(addr)
		if err != nil || !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
			skip(fmt.Sprintf("address %q is not a unicast IP", addr), id)
			continue
		}
		a = a.Unmap()
		if a.Is4() != f.VIP.Is4() {
			skip("address family differs from the VIP's", id)
			continue
		}
		if e.Service.Port < 1 || e.Service.Port > 65535 {
			skip(fmt.Sprintf("port %d is not 1..65535", e.Service.Port), id)
			continue
		}
		groups[f] = append(groups[f], service.Backend{
			Addr: a, Port: uint16(e.Service.Port), Node: e.Node.Node,
			State: stateOf(e.Checks), Source: service.SourceConsul,
		})
	}
	if len(groups) == 0 {
		return svc, false, problems
	}
	var best service.Frontend
	bestN := -1
	for f, bs := range groups {
		if len(bs) > bestN || len(bs) == bestN && service.LessFrontend(f, best) {
			best, bestN = f, len(bs)
		}
	}
	for f, bs := range groups {
		if f != best {
			skip(fmt.Sprintf("frontend %s differs from %s, which most instances name", f, best), fmt.Sprintf("%d such", len(bs)))
		}
	}
	bs := dedupe(groups[best])
	max := l.MaxBackends
	if max <= 0 {
		max = service.DefaultMaxBackends
	}
	bs, n := service.Cap(bs, max)
	if n > 0 {
		skips[fmt.Sprintf("more than %d instances (the cap; active ones are kept first)", max)] = &tally{n: n, example: "the rest by address"}
	}
	return service.Service{
		Name: name, Source: service.SourceConsul, Backends: bs,
		Frontend: best,
	}, true, problems
}

// frontendOf reads an instance's frontend from its meta, or says why not.
func frontendOf(s *api.AgentService, l service.Limits) (service.Frontend, string) {
	var f service.Frontend
	v := strings.TrimSpace(s.Meta[MetaVIP])
	vip, err := netip.ParseAddr(v)
	if err != nil {
		return f, fmt.Sprintf("%s %q is not an address", MetaVIP, v)
	}
	if err := l.CheckVIP(vip); err != nil {
		return f, err.Error()
	}
	f.VIP = vip.Unmap()
	port := s.Port
	if p, ok := s.Meta[MetaPort]; ok {
		if port, err = strconv.Atoi(strings.TrimSpace(p)); err != nil {
			return f, fmt.Sprintf("%s %q is not a number", MetaPort, p)
		}
	}
	if err := service.CheckPort(port); err != nil {
		return f, "frontend " + err.Error()
	}
	f.Port = uint16(port)
	f.Proto = service.TCP
	if p, ok := s.Meta[MetaProtocol]; ok {
		if f.Proto, err = service.ParseProto(strings.TrimSpace(p)); err != nil {
			return f, fmt.Sprintf("%s: %v", MetaProtocol, err)
		}
	}
	return f, ""
}

// stateOf maps an instance's checks to a backend state: passing only is
// active.
func stateOf(cs api.HealthChecks) service.State {
	switch cs.AggregatedStatus() {
	case api.HealthPassing:
		return service.StateActive
	case api.HealthMaint:
		return service.StateMaint
	}
	return service.StateCritical
}

// dedupe keeps one backend per address and port, the healthiest.
func dedupe(bs []service.Backend) []service.Backend {
	rank := map[service.State]int{service.StateActive: 0, service.StateMaint: 1, service.StateCritical: 2}
	idx := map[netip.AddrPort]int{}
	out := bs[:0:0]
	for _, b := range bs {
		if i, ok := idx[b.AddrPort()]; ok {
			if rank[b.State] < rank[out[i].State] {
				out[i] = b
			}
			continue
		}
		idx[b.AddrPort()] = len(out)
		out = append(out, b)
	}
	return out
}
