package service

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"
)

// Self is what the merger knows of this host, to mark backends Local.
type Self struct {
	Node  string         // a backend whose Node is this is local
	CIDRs []netip.Prefix // so is one whose address lies in these ([ipam] cidrs)
}

// Merger owns the per-host service table. Sources hand it their whole view
// with Set (each source replaces only its own part); Run merges, hands the
// table to the Sink and then to the subscribers.
//
// Merge rules: one Service per frontend and one per name. When two sources
// claim the same frontend or name, config beats the store, the store beats
// Consul; within one source, the lower name wins. The loser is left out and
// logged once (a problem is logged when it appears, not on every pass).
//
// Start: the first table goes to the Sink only once every expected source
// has reported (or FirstSyncWait passed), so that a restart does not
// program a table without, say, the Consul services while the pinned maps
// of the previous run still balance them. After that, every change reaches
// the Sink at once (no polling); a failed Sync is retried every
// RetryInterval with the newest table and the previous one stays in force.
type Merger struct {
	log  *slog.Logger
	sink Sink
	kick chan struct{}

	// FirstSyncWait bounds the wait for the expected sources at start
	// (default 15s). RetryInterval paces retries of a failed Sync (default
	// 2s). Set both before Run.
	FirstSyncWait time.Duration
	RetryInterval time.Duration

	mu       sync.Mutex // guards the fields below
	self     Self
	inputs   map[Source][]Service
	problems map[Source][]string
	expected map[Source]bool
	reported map[Source]bool
	table    Table  // the newest merged table
	synced   bool   // the Sink took table
	syncErr  string // the Sink's last error, "" after a success
	said     map[string]bool
	subs     []func(Table)
	conflict []string
}

// NewMerger returns a Merger that hands tables to sink (nil: no datapath,
// the table is only served and announced).
func NewMerger(sink Sink, self Self, log *slog.Logger) *Merger {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Merger{
		log: log, sink: sink, kick: make(chan struct{}, 1), self: self,
		inputs: map[Source][]Service{}, problems: map[Source][]string{},
		expected: map[Source]bool{}, reported: map[Source]bool{}, said: map[string]bool{},
	}
}

// Expect names a source whose first report the first Sync waits for.
func (m *Merger) Expect(src Source) {
	m.mu.Lock()
	m.expected[src] = true
	m.mu.Unlock()
}

// Subscribe registers fn to get every table the Sink took (or every table,
// without a Sink). fn runs in Run's goroutine and must not block.
func (m *Merger) Subscribe(fn func(Table)) {
	m.mu.Lock()
	m.subs = append(m.subs, fn)
	m.mu.Unlock()
}

// SetSelf changes what counts as local (a reload changed [ipam] cidrs).
func (m *Merger) SetSelf(s Self) {
	m.mu.Lock()
	m.self = s
	m.mu.Unlock()
	m.poke()
}

// Set replaces the services of src, with the problems src found in its data
// (each logged once while it persists). svcs must not be changed after.
func (m *Merger) Set(src Source, svcs []Service, problems []string) {
	m.mu.Lock()
	m.inputs[src] = svcs
	m.problems[src] = problems
	m.reported[src] = true
	m.mu.Unlock()
	m.poke()
}

func (m *Merger) poke() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Table returns the newest merged table, whether the Sink took it, and
// why not.
func (m *Merger) Table() (Table, bool, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.table, m.synced, m.syncErr
}

// Problems returns what the sources and the merge currently leave out.
func (m *Merger) Problems() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, src := range []Source{SourceConfig, SourceStore, SourceConsul} {
		out = append(out, m.problems[src]...)
	}
	return append(out, m.conflict...)
}

// Run merges and syncs on every change until ctx ends.
func (m *Merger) Run(ctx context.Context) {
	wait := m.FirstSyncWait
	if wait <= 0 {
		wait = 15 * time.Second
	}
	retry := m.RetryInterval
	if retry <= 0 {
		retry = 2 * time.Second
	}
	deadline := time.Now().Add(wait)
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	started, failing := false, false
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.kick:
		case <-timer.C:
		}
		if !started {
			if missing := m.waiting(); len(missing) > 0 && time.Now().Before(deadline) {
				continue
			} else if len(missing) > 0 {
				m.log.Warn("service sources did not report in time; programming the services known so far", "missing", fmt.Sprint(missing), "waited", wait)
			}
			started = true
		}
		t := m.merge()
		if err := m.sync(t); err != nil {
			if !failing {
				m.log.Error("the datapath refused the service table; the previous one stays in force, retrying", "err", err, "retry_in", retry)
			}
			failing = true
			timer.Reset(retry)
			continue
		}
		if failing {
			m.log.Info("the datapath took the service table again", "services", len(t.Services))
		}
		failing = false
	}
}

func (m *Merger) waiting() []Source {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Source
	for s := range m.expected {
		if !m.reported[s] {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func (m *Merger) sync(t Table) error {
	var err error
	if m.sink != nil {
		err = m.sink.SyncServices(t)
	}
	m.mu.Lock()
	m.synced = err == nil && m.sink != nil
	m.syncErr = ""
	switch {
	case err != nil:
		m.syncErr = err.Error()
	case m.sink == nil:
		m.syncErr = "this build's datapath does not balance services"
	}
	subs := slices.Clone(m.subs)
	m.mu.Unlock()
	if err != nil {
		return err
	}
	for _, fn := range subs {
		fn(t)
	}
	return nil
}

// merge builds the table from the inputs and logs problems that are new.
func (m *Merger) merge() Table {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, conflicts := Merge(m.self, m.inputs[SourceConfig], m.inputs[SourceStore], m.inputs[SourceConsul])
	m.table, m.conflict = t, conflicts
	now := map[string]bool{}
	for _, src := range []Source{SourceConfig, SourceStore, SourceConsul} {
		for _, p := range m.problems[src] {
			now[string(src)+": "+p] = true
		}
	}
	for _, c := range conflicts {
		now["merge: "+c] = true
	}
	var fresh []string
	for p := range now {
		if !m.said[p] {
			fresh = append(fresh, p)
		}
	}
	sort.Strings(fresh)
	// Bound the lines of one pass: 10,000 bad instances are one summary.
	const maxLines = 20
	for i, p := range fresh {
		if i == maxLines {
			m.log.Warn("more service problems left out of the log; see `rackwire service list --json` (problems)", "more", len(fresh)-maxLines)
			break
		}
		m.log.Warn("service data skipped", "problem", p)
	}
	m.said = now
	return t
}

// Merge builds one table from the sources' services, in precedence order
// (config, store, Consul), marking backends local for self. It returns the
// conflicts it resolved, one line each.
func Merge(self Self, bySource ...[]Service) (Table, []string) {
	var out []Service
	var conflicts []string
	byFront := map[Frontend]Service{}
	byName := map[string]Service{}
	for _, svcs := range bySource {
		svcs = append([]Service(nil), svcs...)
		sort.SliceStable(svcs, func(i, j int) bool { return svcs[i].Name < svcs[j].Name })
		for _, s := range svcs {
			if w, ok := byFront[s.Frontend]; ok {
				conflicts = append(conflicts, fmt.Sprintf("service %s from %s claims %s, which %s from %s has; %s wins (config > store > consul)",
					s.Name, s.Source, s.Frontend, w.Name, w.Source, w.Source))
				continue
			}
			if w, ok := byName[s.Name]; ok {
				conflicts = append(conflicts, fmt.Sprintf("service name %s from %s (%s) is taken by %s (%s); %s wins (config > store > consul)",
					s.Name, s.Source, s.Frontend, w.Source, w.Frontend, w.Source))
				continue
			}
			bs := make([]Backend, len(s.Backends))
			for i, b := range s.Backends {
				b.Local = (self.Node != "" && b.Node == self.Node) || inAny(b.Addr, self.CIDRs)
				bs[i] = b
			}
			s.Backends = bs
			byFront[s.Frontend] = s
			byName[s.Name] = s
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return LessFrontend(out[i].Frontend, out[j].Frontend) })
	return Table{Services: out}, conflicts
}

// LessFrontend orders frontends by VIP, port, then protocol (the table's order).
func LessFrontend(a, b Frontend) bool {
	if c := a.VIP.Compare(b.VIP); c != 0 {
		return c < 0
	}
	if a.Port != b.Port {
		return a.Port < b.Port
	}
	return a.Proto < b.Proto
}

// Lookup returns the service named name.
func (t Table) Lookup(name string) (Service, bool) {
	for _, s := range t.Services {
		if s.Name == name {
			return s, true
		}
	}
	return Service{}, false
}

// AnnounceVIPs returns the VIPs that have at least one Active Local backend:
// what this host announces with [bgp] announce_service_vips.
func (t Table) AnnounceVIPs() []netip.Addr {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	for _, s := range t.Services {
		if seen[s.Frontend.VIP] {
			continue
		}
		for _, b := range s.Backends {
			if b.Local && b.State == StateActive {
				seen[s.Frontend.VIP] = true
				out = append(out, s.Frontend.VIP)
				break
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out
}
