//go:build rackwire_fleet

package fleet

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/restart"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/consultest"
)

// endpointsPerAgent real endpoints per agent; the rest of the ipcache is
// simulated hosts' entries written straight into Consul.
const endpointsPerAgent = 3

// coldEntries is the ipcache size of the cold start (the 100
// agents × 300 endpoints): RACKWIRE_FLEET_COLD, default 30,000. A ladder
// run in "list" mode at 100k sets it low: every endpoint added during the
// boot makes every agent list everything again.
func coldEntries(t *testing.T) int {
	s := os.Getenv("RACKWIRE_FLEET_COLD")
	if s == "" {
		return 30_000
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > simNodes*1000-1000 {
		t.Fatalf("RACKWIRE_FLEET_COLD=%q: write a number of entries up to %d", s, simNodes*1000-1000)
	}
	return n
}

// seed writes the simulated hosts and their entries: with the real
// endpoints, coldEntries in all.
func (f *fleet) seed(t *testing.T) {
	uptime(t, "before")
	f.writeSimNodes(t)
	f.setSim(t, max(0, coldEntries(t)-len(f.agents)*endpointsPerAgent))
}

// boot writes every agent's config, starts them all at once (through
// prestart when gated), adds the endpoints, and returns when each agent
// answers. It logs how long each of the two phases took.
func (f *fleet) boot(t *testing.T, prestart bool) {
	t.Helper()
	for _, a := range f.agents {
		a.writeConfig(t)
	}
	start := time.Now()
	var started time.Time // every agent answers
	defer func() {
		if !started.IsZero() {
			t.Logf("BENCH boot: %d agents answering %s after the first start, their %d endpoints added %s later",
				len(f.agents), started.Sub(start).Truncate(time.Millisecond), len(f.agents)*endpointsPerAgent,
				time.Since(started).Truncate(time.Millisecond))
		}
	}()
	if err := f.each(startWave(t, len(f.agents)), func(a *agent) error {
		if prestart {
			if err := a.prestart(t); err != nil {
				return err
			}
		}
		return a.start(t)
	}); err != nil {
		t.Fatal(err)
	}
	started = time.Now()
	if err := f.each(8, func(a *agent) error {
		for k := range endpointsPerAgent {
			if err := a.addEndpoint(t, k); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// startWave is RACKWIRE_FLEET_WAVE: at most that many agents start at
// once in the cold boot (default all: the fleet-wide start without the
// gate). On this 2-core VM 100 agents listing 30,000 entries at once
// starve the three Consul servers of CPU.
func startWave(t *testing.T, n int) int {
	s := os.Getenv("RACKWIRE_FLEET_WAVE")
	if s == "" {
		return n
	}
	w, err := strconv.Atoi(s)
	if err != nil || w < 1 {
		t.Fatalf("RACKWIRE_FLEET_WAVE=%q: write a number of agents", s)
	}
	return min(w, n)
}

// converged reports whether the agent runs and its ipcache holds every
// real endpoint and the first and last simulated entry.
func (f *fleet) converged(eps []netip.Addr) func(a *agent) bool {
	sentinels := []netip.Addr{}
	if f.sim > 0 {
		sentinels = append(sentinels, simIP(0), simIP(f.sim-1))
	}
	return func(a *agent) bool {
		return a.running() && a.has(eps...) && a.has(sentinels...)
	}
}

// verify checks every agent's whole ipcache: every real endpoint and every
// simulated entry is there (no lost entry after convergence).
func (f *fleet) verify(t *testing.T) {
	t.Helper()
	want := f.allEndpoints()
	for i := range f.sim {
		want = append(want, simIP(i))
	}
	bad := 0
	for _, a := range f.agents {
		got, err := a.contents()
		if err != nil {
			t.Errorf("read rw_ipcache of %s: %v", a.name, err)
			continue
		}
		missing := 0
		var first netip.Addr
		for _, ip := range want {
			if !got[ip] {
				if missing == 0 {
					first = ip
				}
				missing++
			}
		}
		if missing > 0 {
			bad++
			t.Errorf("%s: rw_ipcache lacks %d of %d fleet entries (first %s)", a.name, missing, len(want), first)
		}
	}
	t.Logf("verified: %d agents × %d ipcache entries, %d agents with missing entries", len(f.agents), len(want), bad)
}

// noExits fails for every agent that is not running.
func (f *fleet) noExits(t *testing.T) {
	t.Helper()
	for _, a := range f.agents {
		if !a.running() {
			b, _ := os.ReadFile(a.logf)
			t.Errorf("rackwired on %s exited: %s", a.name, tail(string(b), 15))
		}
	}
}

// noDuplicateIdentity checks the identity keys: one id per label set, and
// every host's value key names that id.
func (f *fleet) noDuplicateIdentity(t *testing.T) {
	t.Helper()
	ids, _, err := f.consul.KV().List(kvPrefix+store.IdentityIDPrefix, nil)
	if err != nil {
		t.Fatal(err)
	}
	byLabels := map[string]string{}
	for _, p := range ids {
		id := strings.TrimPrefix(p.Key, kvPrefix+store.IdentityIDPrefix)
		if prev, dup := byLabels[string(p.Value)]; dup {
			t.Errorf("duplicate identity: labels %q have ids %s and %s", p.Value, prev, id)
		}
		byLabels[string(p.Value)] = id
	}
	vals, _, err := f.consul.KV().List(kvPrefix+store.IdentityValuePrefix, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range vals {
		rest := strings.TrimPrefix(p.Key, kvPrefix+store.IdentityValuePrefix)
		labels := rest[:strings.LastIndexByte(rest, '/')]
		labels = strings.NewReplacer("%2F", "/", "%25", "%").Replace(labels)
		if id, ok := byLabels[labels]; !ok || id != string(p.Value) {
			t.Errorf("value key %s names id %s, the id key of those labels is %q", p.Key, p.Value, id)
		}
	}
	t.Logf("identities: %d ids, %d value keys, no duplicate", len(ids), len(vals))
}

// steady measures requests/s and bytes/s served over d with no change.
func (f *fleet) steady(d time.Duration) (reqs, bytes float64) {
	s0 := f.sample()
	time.Sleep(d)
	s1 := f.sample()
	dt := s1.at.Sub(s0.at).Seconds()
	return float64(s1.reqs-s0.reqs) / dt, float64(s1.bytes-s0.bytes) / dt
}

// oneChange writes one new ipcache entry (a simulated host's endpoint)
// and measures, until every agent holds it and 12 s after, the requests and
// bytes served beyond the steady rate; then it removes the entry again
// (unmeasured).
func (f *fleet) oneChange(t *testing.T, c int, steadyReqs, steadyBytes float64) (reqs, bytes float64, slowest time.Duration) {
	t.Helper()
	i := simNodes*1000 - 1 - c
	k, v := simEntry(i)
	ip := simIP(i)
	s0 := f.sample()
	f.write(t, []iplog.Op{{Key: k, Value: v}})
	slowest = f.waitAll(t, 3*time.Minute, "one change", func(a *agent) bool { return a.has(ip) })
	// Long enough to count what the change costs later too: the change
	// log's pruning of its entry (after the keep, at the pruner's next
	// round) wakes every follower once more.
	time.Sleep(max(12*time.Second, pruned(t)-slowest))
	s1 := f.sample()
	dt := s1.at.Sub(s0.at).Seconds()
	reqs = float64(s1.reqs-s0.reqs) - steadyReqs*dt
	bytes = float64(s1.bytes-s0.bytes) - steadyBytes*dt
	f.write(t, []iplog.Op{{Key: k, Delete: true}})
	f.waitAll(t, 3*time.Minute, "removal of the change", func(a *agent) bool { return a.lacks(ip) })
	// The removal's entry is pruned before the next measurement starts.
	time.Sleep(pruned(t))
	return reqs, bytes, slowest
}

// logPruned waits (at most d) until the change log holds no entry, plus
// 2 s for the followers' last wake-ups.
func (f *fleet) logPruned(t *testing.T, d time.Duration) {
	t.Helper()
	prefix := kvPrefix + iplog.ClusterPrefix(cluster) + "e/"
	for deadline := time.Now().Add(d); ; time.Sleep(time.Second) {
		keys, _, err := f.consul.KV().Keys(prefix, "", nil)
		if err == nil && len(keys) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Logf("the change log still holds %d entries after %s (err %v); measuring anyway", len(keys), d, err)
			break
		}
	}
	time.Sleep(2 * time.Second)
}

// ladderSizes is RACKWIRE_FLEET_LADDER (total ipcache entries, comma-separated),
// default 1000,10000,100000.
func ladderSizes(t *testing.T) []int {
	s := os.Getenv("RACKWIRE_FLEET_LADDER")
	if s == "" {
		return []int{1000, 10_000, 100_000}
	}
	var out []int
	for _, x := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(x))
		if err != nil || n < 1 || n > simNodes*1000-100 {
			t.Fatalf("RACKWIRE_FLEET_LADDER=%q: write entry totals up to %d, comma-separated", s, simNodes*1000-100)
		}
		out = append(out, n)
	}
	return out
}

// TestFleetStore: cold convergence of the fleet on 30,000 ipcache entries
// with per-agent RSS and CPU, then the requests and bytes Consul serves in
// steady state and per single endpoint change at each ladder size.
func TestFleetStore(t *testing.T) {
	n := agentCount(t)
	f := newFleet(t, n)
	f.seed(t)

	start := time.Now()
	f.boot(t, false)
	booted := time.Since(start)
	eps := f.allEndpoints()
	f.waitAll(t, 5*time.Minute, "cold convergence", f.converged(eps))
	cold := time.Since(start)
	t.Logf("BENCH cold convergence: %d agents, %d entries (%d real endpoints + %d simulated): every agent holds every entry %s after the first start (all agents answering and endpoints added: %s); goal ≤ 60 s",
		n, len(eps)+f.sim, len(eps), f.sim, cold.Truncate(time.Millisecond), booted.Truncate(time.Millisecond))
	med := f.resources(t, "after cold convergence")
	t.Logf("BENCH cold convergence ratios: %.2f of the 60 s goal, median RSS %.2f of the 60 MB goal", cold.Seconds()/60, med/60)
	f.syncTotals(t, "after cold convergence")
	f.verify(t)
	f.noDuplicateIdentity(t)

	for i, mode := range syncModes(t) {
		if i > 0 {
			f.switchSync(t, mode, ladderSizes(t)[0]-len(eps))
		}
		f.ladder(t, mode, eps)
	}
	f.noExits(t)
	uptime(t, "after")
}

// syncModes is RACKWIRE_FLEET_SYNC: the [store] ipcache_sync modes to
// measure, in order (default "list,log": the design before the change
// log, then with it, in one run).
func syncModes(t *testing.T) []string {
	s := os.Getenv("RACKWIRE_FLEET_SYNC")
	if s == "" {
		return []string{"list", "log"}
	}
	var out []string
	for _, m := range strings.Split(s, ",") {
		if m = strings.TrimSpace(m); m != "list" && m != "log" {
			t.Fatalf("RACKWIRE_FLEET_SYNC=%q: write list, log or list,log", s)
		}
		out = append(out, m)
	}
	return out
}

// switchSync restarts every agent with [store] ipcache_sync = mode, the
// store holding sim simulated entries, and waits until every agent has
// converged and follows the ipcache in that mode.
func (f *fleet) switchSync(t *testing.T, mode string, sim int) {
	t.Helper()
	_ = f.each(len(f.agents), func(a *agent) error { a.stop(); return nil })
	f.setSim(t, max(0, sim))
	for _, a := range f.agents {
		a.sync = mode
		a.writeConfig(t)
	}
	start := time.Now()
	if err := f.each(len(f.agents), func(a *agent) error { return a.start(t) }); err != nil {
		t.Fatal(err)
	}
	eps := f.allEndpoints()
	f.waitAll(t, 5*time.Minute, "convergence in mode "+mode, f.converged(eps))
	t.Logf("BENCH all %d agents restarted with ipcache_sync = %q and converged on %d entries in %s",
		len(f.agents), mode, len(eps)+f.sim, time.Since(start).Truncate(time.Millisecond))
	f.waitAll(t, time.Minute, "status says ipcache_sync = "+mode, func(a *agent) bool {
		st, err := a.status()
		return err == nil && st.Store.Detail["ipcache_sync"] == mode
	})
}

// ladder measures steady and per-change store traffic at each ladder size.
func (f *fleet) ladder(t *testing.T, mode string, eps []netip.Addr) {
	t.Helper()
	n := len(f.agents)
	for _, total := range ladderSizes(t) {
		sim := max(0, total-len(eps))
		// Agents paused while the bulk is written: each of them then
		// lists the prefix once or twice, not once per transaction.
		for _, a := range f.agents {
			a.signal(syscall.SIGSTOP)
		}
		f.setSim(t, sim)
		for _, a := range f.agents {
			a.signal(syscall.SIGCONT)
		}
		gone := simIP(sim) // first entry beyond the current size
		conv := f.waitAll(t, 8*time.Minute, fmt.Sprintf("ladder %d", total), func(a *agent) bool {
			return f.converged(eps)(a) && a.lacks(gone)
		})
		// Long enough for the change log of the bulk to be pruned (with
		// a keep above the old fixed 15 s, the bulk's prune fell inside the
		// steady window or the first change and made its figure
		// meaningless: -890 requests per change at 1,000 entries, keep 20s).
		time.Sleep(max(15*time.Second, pruned(t)+5*time.Second))
		f.logPruned(t, 3*time.Minute)
		sr, sb := f.steady(15 * time.Second)
		var rs, bs []float64
		var worst time.Duration
		changes := 3
		if total >= 50_000 {
			changes = 1 // each costs the machine tens of seconds of CPU
		}
		classes := f.classes()
		for c := range changes {
			r, b, w := f.oneChange(t, c, sr, sb)
			rs, bs, worst = append(rs, r), append(bs, b), max(worst, w)
		}
		f.logClasses(t, fmt.Sprintf("[%s] %d endpoint changes and their removals at %d entries", mode, changes, total), classes, f.classes())
		slices.Sort(rs)
		slices.Sort(bs)
		t.Logf("BENCH store [%s] at %d entries (%d agents): steady %.1f requests/s, %s/s served; one endpoint change: %.0f requests, %s served (median of %d; %.0f bytes per agent), in every agent after %s; reconverged after the bulk in %s",
			mode, total, n, sr, mb(sb), rs[len(rs)/2], mb(bs[len(bs)/2]), len(bs), bs[len(bs)/2]/float64(n), worst.Truncate(time.Millisecond), conv.Truncate(time.Millisecond))
		f.resources(t, fmt.Sprintf("[%s] at %d entries", mode, total))
	}
}

// restartAll stops every agent, then starts them all at once through
// prestart, sampling the proxies every second; it returns the per-second
// request rates and the time until every agent is back (answers, store
// ok, ipcache converged).
func (f *fleet) restartAll(t *testing.T) ([][2]float64, time.Duration) {
	t.Helper()
	_ = f.each(len(f.agents), func(a *agent) error { a.stop(); return nil })
	stop := make(chan struct{})
	series := f.rateSeries(time.Second, stop)
	classes := f.classes()
	var wg sync.WaitGroup
	errs := make(chan error, len(f.agents))
	for _, a := range f.agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.prestart(t); err != nil {
				errs <- err
				return
			}
			if err := a.start(t); err != nil {
				errs <- err
			}
		}()
	}
	eps := f.allEndpoints()
	conv := f.converged(eps)
	back := f.waitAll(t, 9*time.Minute, "fleet-wide restart", func(a *agent) bool {
		if !conv(a) {
			return false
		}
		st, err := a.status()
		return err == nil && st.Store.State == "ok"
	})
	time.Sleep(5 * time.Second)
	close(stop)
	f.logClasses(t, "fleet-wide restart", classes, f.classes())
	r := <-series
	if r.peak[0] != nil {
		f.logClasses(t, "the restart's busiest second", r.peak[0], r.peak[1])
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	return r.steps, back
}

// peakOver is the highest mean rate over w consecutive steps: on two
// shared cores the 1 s peak is partly the scheduler's (requests queued
// behind a busy CPU leave in one burst), so the restart prints both.
func peakOver(rs [][2]float64, col, w int) float64 {
	var best float64
	for i := 0; i+w <= len(rs); i++ {
		var sum float64
		for _, r := range rs[i : i+w] {
			sum += r[col]
		}
		best = max(best, sum/float64(w))
	}
	return best
}

func peakMean(rs [][2]float64, col int) (peak, mean float64) {
	for _, r := range rs {
		peak = max(peak, r[col])
		mean += r[col]
	}
	if len(rs) > 0 {
		mean /= float64(len(rs))
	}
	return peak, mean
}

// TestFleetRestart: every agent restarted at once through `rackwired
// prestart`, with the gate off (jitter_window = "0s") and on: by default
// with the window [restart] fleet_size gives a fleet of this size, as a
// real one would have it (4m9s for 100 agents), or with jitter_window =
// RACKWIRE_FLEET_WINDOW (shorter windows, to see where the machine's CPU
// becomes the limit: docs/scale.md).
func TestFleetRestart(t *testing.T) {
	n := agentCount(t)
	window := os.Getenv("RACKWIRE_FLEET_WINDOW")
	w := restart.WindowFor(n)
	if window != "" {
		var err error
		if w, err = time.ParseDuration(window); err != nil || w <= 0 {
			t.Fatalf("RACKWIRE_FLEET_WINDOW=%q: write a duration such as 120s", window)
		}
	} else {
		window = fromFleetSize
	}
	f := newFleet(t, n)
	f.seed(t)
	start := time.Now()
	f.boot(t, true)
	eps := f.allEndpoints()
	f.waitAll(t, 5*time.Minute, "first convergence", f.converged(eps))
	cold := time.Since(start)
	t.Logf("BENCH cold convergence [%s]: %d agents, %d entries (%d real endpoints + %d simulated), every agent holds every entry %s after the first start (through prestart; goal ≤ 60 s)",
		syncModes(t)[0], n, len(eps)+f.sim, len(eps), f.sim, cold.Truncate(time.Millisecond))
	f.resources(t, "after cold convergence")
	time.Sleep(5 * time.Second)
	classes := f.classes()
	sr, _ := f.steady(10 * time.Second)
	f.logClasses(t, "10 s steady", classes, f.classes())

	offRates, offBack := f.restartAll(t)
	offPeak, offMean := peakMean(offRates, 0)
	offPeakB, _ := peakMean(offRates, 1)
	t.Logf("BENCH restart gate off: %d agents back (answering, store ok, ipcache converged) %s after the restart; Consul requests/s peak %.0f, mean %.1f over %d s; bytes/s peak %s; steady before %.1f requests/s",
		n, offBack.Truncate(time.Millisecond), offPeak, offMean, len(offRates), mb(offPeakB), sr)

	for _, a := range f.agents {
		a.jitter = window
		a.writeConfig(t)
	}
	onRates, onBack := f.restartAll(t)
	onPeak, onMean := peakMean(onRates, 0)
	onPeakB, _ := peakMean(onRates, 1)
	within := "within the window"
	if onBack > w {
		within = "window + " + (onBack - w).Truncate(time.Millisecond).String()
	}
	t.Logf("BENCH restart gate on (window %s): %d agents back %s after the restart (%s); Consul requests/s peak %.0f, mean %.1f over %d s; bytes/s peak %s",
		w, n, onBack.Truncate(time.Millisecond), within, onPeak, onMean, len(onRates), mb(onPeakB))
	t.Logf("BENCH restart ratio: peak request rate gate on / gate off = %.3f (goal ≤ 0.2); peak bytes/s on / off = %.3f", onPeak/offPeak, onPeakB/offPeakB)
	on5, off5 := peakOver(onRates, 0, 5), peakOver(offRates, 0, 5)
	t.Logf("BENCH restart ratio over 5 s: peak mean request rate over 5 s gate on %.0f / gate off %.0f = %.3f", on5, off5, on5/off5)
	f.noExits(t)
	f.verify(t)
	uptime(t, "after")
}

// TestFleetFaults: the Consul leader killed (and brought back 15 s later)
// while the fleet converges from cold, and 10% of the agents restarted
// every 10 s, three times. Then: no agent exited, no duplicate identity,
// every agent's ipcache holds every entry.
func TestFleetFaults(t *testing.T) {
	n := agentCount(t)
	f := newFleet(t, n)
	f.seed(t)

	killed := make(chan string, 1)
	go func() {
		time.Sleep(4 * time.Second)
		l := f.servers[0]
		for range 20 {
			if x := consultest.Leader(f.t, f.servers); x != nil {
				l = x
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		l.Kill()
		killed <- l.Name
		time.Sleep(15 * time.Second)
		l.Restart()
	}()
	start := time.Now()
	f.boot(t, false)
	name := <-killed
	t.Logf("Consul leader %s killed 4 s into the cold start, restarted 15 s later", name)

	rounds := 3
	restarted := 0
	for r := range rounds {
		time.Sleep(10 * time.Second)
		perm := rand.Perm(n)[:max(1, n/10)]
		if err := f.each(len(perm), func(a *agent) error {
			if !slices.Contains(perm, a.idx-1) {
				return nil
			}
			a.stop()
			return a.start(t)
		}); err != nil {
			t.Fatalf("restart round %d: %v", r, err)
		}
		restarted += len(perm)
	}
	conv := f.waitAll(t, 5*time.Minute, "convergence after the faults", f.converged(f.allEndpoints()))
	t.Logf("BENCH faults: %d agents converged %s after the cold start (leader killed at 4 s for 15 s; %d agent restarts in %d rounds; last wait %s; %d endpoint adds refused while the store had no leader and retried)",
		n, time.Since(start).Truncate(time.Millisecond), restarted, rounds, conv.Truncate(time.Millisecond), f.retries.Load())
	f.noExits(t)
	f.noDuplicateIdentity(t)
	f.verify(t)
	f.storeHasEndpoints(t)
	uptime(t, "after")
}

// storeHasEndpoints checks that every real endpoint has its ipcache key.
func (f *fleet) storeHasEndpoints(t *testing.T) {
	t.Helper()
	ps, _, err := f.consul.KV().List(kvPrefix+store.IPPrefix+cluster+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, p := range ps {
		var e store.IPEntry
		if json.Unmarshal(p.Value, &e) == nil {
			have[e.IP] = true
		}
	}
	for _, ip := range f.allEndpoints() {
		if !have[ip.String()] {
			t.Errorf("endpoint %s has no ipcache key in Consul", ip)
		}
	}
}

// oldRackwired builds rackwired at RACKWIRE_FLEET_OLD_REV (default c484b0a,
// the release before the change log) from the repository's history.
func oldRackwired(t *testing.T) string {
	t.Helper()
	rev := os.Getenv("RACKWIRE_FLEET_OLD_REV")
	if rev == "" {
		rev = "c484b0a"
	}
	dir := t.TempDir()
	out, err := exec.Command("sh", "-c", `git -C ../.. archive "$1" | tar -x -C "$2"`, "sh", rev, dir).CombinedOutput()
	if err != nil {
		t.Fatalf("git archive %s: %v: %s", rev, err, out)
	}
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "rackwired-old"), "./cmd/rackwired")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build rackwired at %s: %v: %s", rev, err, out)
	}
	return filepath.Join(dir, "rackwired-old")
}

// TestFleetMixedVersion: during the rollout, agents of the previous
// release (which neither write nor read the change log) and agents of
// this one in ipcache_sync = "log" see each other's endpoints: the new
// ones notice the old hosts (no "iplog" feature in their node records)
// and list the prefix until the last old host is upgraded, then follow
// the log. Six agents, two of them old.
func TestFleetMixedVersion(t *testing.T) {
	old := oldRackwired(t)
	f := newFleet(t, 6)
	uptime(t, "before")
	f.writeSimNodes(t)
	f.setSim(t, 1000)
	for i, a := range f.agents {
		if i < 2 {
			a.bin = old
		} else {
			a.sync = "log"
		}
	}
	f.boot(t, false)
	f.waitAll(t, 2*time.Minute, "mixed fleet converged", f.converged(f.allEndpoints()))
	mode := func(want string, legacy string) func(a *agent) bool {
		return func(a *agent) bool {
			if a.bin != "" {
				return true
			}
			st, err := a.status()
			return err == nil && st.Store.Detail["ipcache_sync"] == want && st.Store.Detail["ipcache_sync_legacy_hosts"] == legacy
		}
	}
	f.waitAll(t, time.Minute, "new agents list while old hosts are in the fleet", mode("list", "2"))

	// An endpoint added on an old host (no log entry) reaches everyone.
	if err := f.agents[0].addEndpoint(t, endpointsPerAgent); err != nil {
		t.Fatal(err)
	}
	f.waitAll(t, 2*time.Minute, "old host's new endpoint everywhere", f.converged(f.allEndpoints()))

	// The old hosts are upgraded; then every agent follows the log.
	for _, a := range f.agents[:2] {
		a.stop()
		a.bin, a.sync = "", "log"
		a.writeConfig(t)
		if err := a.start(t); err != nil {
			t.Fatal(err)
		}
	}
	f.waitAll(t, 3*time.Minute, "every agent follows the log once no old host is left", mode("log", "0"))
	for _, a := range []*agent{f.agents[0], f.agents[4]} {
		if err := a.addEndpoint(t, endpointsPerAgent+1); err != nil {
			t.Fatal(err)
		}
	}
	f.waitAll(t, 2*time.Minute, "endpoints added after the rollout everywhere", f.converged(f.allEndpoints()))
	f.noExits(t)
	f.noDuplicateIdentity(t)
	f.verify(t)
	uptime(t, "after")
}

// syncTotals logs the fleet's totals of the agents' ipcache follower
// counters (rackwire status, store detail ipcache_*): lists, log reads,
// the times an agent fell behind the log or read an entry again because
// the server that answered had not applied it yet.
func (f *fleet) syncTotals(t *testing.T, when string) {
	t.Helper()
	sums := map[string]int{}
	for _, a := range f.agents {
		st, err := a.status()
		if err != nil {
			continue
		}
		for k, v := range st.Store.Detail {
			if n, err := strconv.Atoi(v); err == nil && strings.HasPrefix(k, "ipcache_") {
				sums[k] += n
			}
		}
	}
	keys := slices.Sorted(maps.Keys(sums))
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%d", k, sums[k])
	}
	t.Logf("BENCH ipcache follower totals %s (%d agents):%s", when, len(f.agents), b.String())
}
