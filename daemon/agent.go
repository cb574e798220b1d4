package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rackwire/rackwire/daemon/bgp"
	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/ipcache"
	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/policysync"
	"github.com/rackwire/rackwire/daemon/publish"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/version"
)

// agent holds the components that turn shared state into datapath state.
// Each piece of state has one owner with its own lock, and none of those
// locks is held across store I/O:
//
//   - ipc (ipcache.Cache) owns rw_ipcache, fed by every source;
//   - sync (policysync.Syncer) owns the engine's inputs and writes the
//     policy maps; syncLoop drives it;
//   - pub (publish.Publisher) writes this host's own records to the store;
//   - remote follows the other hosts' records and checks them;
//   - audit owns the per-endpoint audit set;
//   - eps (endpoint.Manager) owns the endpoint table.
//
// The agent itself holds only references, set in newAgent and never
// changed, so its methods need no lock.
type agent struct {
	log    *slog.Logger
	cfg    config.Config
	st     store.Store
	ids    *identity.Allocator
	dp     *datapath.Datapath
	ipc    *ipcache.Cache
	pol    *policy.Engine
	sync   *policysync.Syncer
	eps    *endpoint.Manager
	pub    *publish.Publisher
	remote *remote
	// memRel returns the garbage of the ipcache watches' large deliveries
	// to the kernel (remote.go).
	memRel memRelease
	audit  *auditSet
	bgp    *bgp.Manager
	mon    *monitor
	// uplinkErr is the last error attaching rw_from_uplink (status shows
	// it); guarded by uplinkMu.
	uplinkMu  sync.Mutex
	uplinkErr error
	uplinkCfg []string // [datapath] uplinks in force; empty: follow the default routes
	uplinkSet string   // the devices last applied, joined
	// nsWanted: the config announces service VIPs, so north-south
	// balancing must be on (setNorthSouth).
	nsWanted atomic.Bool
	// annMu serialises reannounceServiceVIPs.
	annMu sync.Mutex
	svc   *services // the service table and its sources (services.go)

	hostIP netip.Addr
	hostID string
	kick   chan struct{}
	// started is set once the loops run; before that a long start (a
	// slow restore) is not a stuck sync loop.
	started atomic.Bool

	// policyDirMu serialises reloads of the policy directory.
	policyDirMu sync.Mutex
	policyDir   string // guarded by policyDirMu

	// anchors: whether the anchored prefixes hold their folder keys
	// (anchor.go).
	anchors anchors

	// watchSleep is the watches' pause after a change (tests); nil:
	// backoff.Sleep.
	watchSleep func(context.Context, time.Duration) bool
}

func newAgent(ctx context.Context, cfg config.Config, st store.Store, log *slog.Logger) (*agent, error) {
	a := &agent{log: log, cfg: cfg, st: st, kick: make(chan struct{}, 1), policyDir: cfg.Datapath.PolicyDir}
	for _, s := range cfg.Node.Addresses {
		if ip, err := netip.ParseAddr(s); err == nil {
			a.hostIP = ip
			break
		}
	}
	var err error
	if a.hostID, err = loadHostID(cfg.Agent.StateDir); err != nil {
		return nil, err
	}
	a.ids, err = identity.NewAllocator(st, identity.AllocatorOptions{
		Node: cfg.Node.Name, ClusterID: uint8(cfg.Node.ClusterID), Log: log,
		// A store outage is followed by a quick, jittered catch-up.
		BackoffMax: 15 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("start identity allocator: %w", err)
	}
	a.dp, err = datapath.Open(datapath.OptionsFromConfig(cfg.Datapath), log.With("subsys", "datapath"))
	if err != nil {
		a.ids.Close()
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	// North-south balancing goes with announcing service VIPs: the router
	// then sends clients' packets for them here (SetUplinks attaches).
	a.setNorthSouth(cfg)
	a.ipc = ipcache.New(a.dp, log.With("subsys", "ipcache"))
	// The pinned map keeps the previous run's entries: they stay in force
	// until every source has spoken, then what no source claims goes.
	if es, err := a.dp.IPCache(); err == nil {
		old := make(map[netip.Prefix]ipcache.Entry, len(es))
		for _, e := range es {
			old[e.Prefix] = ipcache.Entry{Identity: e.Identity, HostIP: e.HostIP}
		}
		a.ipc.Adopt(old)
	} else {
		log.Warn("cannot read the pinned ipcache; stale entries of the previous run stay until cleanup", "err", err)
	}
	a.pol = policy.New(log.With("subsys", "policy"), policy.Options{IPLookup: a.lookupIP})
	a.sync = policysync.New(a.pol, policyWriter{a.dp}, cidrSink{a.ipc}, log.With("subsys", "policysync"))
	a.audit = newAuditSet(filepath.Join(cfg.Agent.StateDir, "endpoint-audit.json"), cfg.Datapath.PolicyAuditMode, log)
	a.pub = publish.New(st, 5*time.Second, log.With("subsys", "publish"))
	if cfg.Store.Backend == "consul" {
		// Written in both sync modes, so that the fleet can switch to
		// "log" once every host writes it (docs/scale.md).
		w := &iplog.Writer{St: st, Cluster: cfg.Node.Cluster, Node: cfg.Node.Name}
		a.pub.SetJournal(store.IPPrefix+cfg.Node.Cluster+"/", func(ctx context.Context, cs []publish.Change) error {
			ops := make([]iplog.Op, len(cs))
			for i, c := range cs {
				ops[i] = iplog.Op{Key: c.Key, Value: c.Value, Delete: c.Deleted}
			}
			return w.Append(ctx, ops)
		})
		// A restart journals only the keys it changed (publish package doc).
		a.pub.SetJournaledMark(filepath.Join(cfg.Agent.StateDir, journaledMarkFile))
	}
	a.remote = newRemote(a.ipc, a.pub, a.self(), a.hostID, log.With("subsys", "remote"))
	eopts := endpoint.OptionsFromConfig(&cfg)
	eopts.Enforcer = a
	a.eps, err = endpoint.New(eopts, endpointDatapath{a.dp}, endpointIdentities{a.ids}, log.With("subsys", "endpoint"))
	if err != nil {
		a.close()
		return nil, fmt.Errorf("start endpoint manager: %w", err)
	}
	a.mon = newMonitor(a.dp, log.With("subsys", "monitor"))
	if cfg.BGP.Enabled {
		a.bgp = bgp.New(cfg.BGP, cfg.Prefixes(), version.Version, log.With("subsys", "bgp"))
		a.bgp.DrainFile = filepath.Join(cfg.Agent.StateDir, "bgp-drained")
	}
	if err := a.wireServices(cfg, log); err != nil {
		a.close()
		return nil, err
	}
	return a, nil
}

func (a *agent) close() {
	if a.eps != nil {
		_ = a.eps.Close()
	}
	if a.dp != nil {
		_ = a.dp.Close()
	}
	if a.ids != nil {
		a.ids.Close()
	}
}

// self is what the store checks need to know of this host.
func (a *agent) self() ipcache.Self {
	s := ipcache.Self{Node: a.cfg.Node.Name, Cluster: a.cfg.Node.Cluster, ClusterID: uint8(a.cfg.Node.ClusterID), CIDRs: a.cfg.Prefixes()}
	for _, ad := range a.cfg.Node.Addresses {
		if ip, err := netip.ParseAddr(ad); err == nil {
			s.Addrs = append(s.Addrs, ip)
		}
	}
	return s
}

func (a *agent) lookupIP(ip netip.Addr) (identity.ID, bool) {
	e, ok, err := a.dp.LookupIPCache(ip)
	if err != nil || !ok {
		return 0, false
	}
	return identity.ID(e.Identity), true
}

// start restores endpoints and policies and computes the first policy, all
// before READY=1, then starts the loops that follow the store.
func (a *agent) start(ctx context.Context, wg *sync.WaitGroup, status func(string, ...any)) error {
	status("checking that node name %s is this host's", a.cfg.Node.Name)
	if err := a.checkNodeName(ctx); err != nil {
		return err
	}
	status("restoring endpoints")
	rep, err := a.eps.Restore(ctx)
	if err != nil {
		return fmt.Errorf("restore endpoints: %w", err)
	}
	a.ipc.MarkReported(ipcache.LocalEndpoint)
	a.log.Info("endpoints restored", "restored", len(rep.Restored), "lost", len(rep.Lost), "cleaned", len(rep.Cleaned), "failed", len(rep.Failed))
	a.restoreAudit()
	status("loading policies from %s", a.cfg.Datapath.PolicyDir)
	a.loadPolicyDir()
	// The store's policies and identities are read once now so the first
	// sync already enforces them; if the store does not answer, the maps
	// keep their last state until the watches deliver both.
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if kvs, _, err := a.st.List(lctx, store.PolicyPrefix); err == nil {
		a.sync.SetStorePolicies(kvs)
	} else {
		a.log.Warn("cannot list store policies now; maps keep their last state until the store answers", "err", err)
	}
	cancel()
	a.syncIdentities(time.Time{})
	status("computing policy for %d endpoints", len(a.eps.List()))
	a.sync.Sync()
	a.applyUplinks(a.cfg.Datapath)
	a.publishNode()

	loops := []func(context.Context){a.syncLoop, a.policyWatch, a.ipcacheWatch, a.nodeWatch, a.hostAddrLoop, a.mon.run,
		a.uplinkLoop, a.waitFirstList, a.runGC, a.pruneIPLog, a.probeStore, a.anchorLoop, func(ctx context.Context) { a.pub.Run(ctx, time.Minute) }}
	loops = append(loops, a.serviceLoops()...)
	if a.bgp != nil {
		loops = append(loops, func(ctx context.Context) {
			if err := a.bgp.Run(ctx); err != nil && ctx.Err() == nil {
				a.log.Error("bgp manager stopped", "err", err)
			}
		})
	}
	for _, f := range loops {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	a.started.Store(true)
	return a.startDocker(ctx, wg)
}

// trigger asks the sync loop for a pass.
func (a *agent) trigger() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// syncLoop drives the policy sync on every trigger and at least every
// second: identities from the allocator's cache (replaced whole on every
// store list, so compared only when a new list came in), the policy maps,
// and the ipcache's failed writes. It never waits for the store.
func (a *agent) syncLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var seen time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		case <-t.C:
		}
		seen = a.syncIdentities(seen)
		a.sync.Sync()
		if ok, _ := a.sync.Loaded(); ok {
			// The CIDR identities are complete once the policies are.
			a.ipc.MarkReported(ipcache.PolicyCIDR)
		}
		if err := a.ipc.Retry(); err != nil {
			a.log.Debug("ipcache writes still failing", "err", err)
		}
		a.remote.prune()
	}
}

// syncIdentities hands the allocator's list to the syncer when a list newer
// than seen arrived, and returns the time of the list handed over.
func (a *agent) syncIdentities(seen time.Time) time.Time {
	last := a.ids.LastSync()
	if last.IsZero() || last.Equal(seen) {
		return seen
	}
	a.sync.SetIdentities(a.ids.List())
	return last
}

// waitFirstList reports an initial identity list that takes longer than
// [store] list_timeout. It never stops the agent: forwarding goes on with
// the last state, and status says what the agent waits for.
func (a *agent) waitFirstList(ctx context.Context) {
	lctx, cancel := context.WithTimeout(ctx, a.cfg.Store.ListTimeout.Duration)
	defer cancel()
	start := time.Now()
	if err := a.ids.WaitSynced(lctx); err != nil {
		if ctx.Err() == nil {
			a.log.Error("the first list of identities did not complete within [store] list_timeout; still waiting, forwarding with the last state",
				"list_timeout", a.cfg.Store.ListTimeout.Duration)
		}
		return
	}
	a.log.Info("identities listed from the store", "took", time.Since(start).Truncate(time.Millisecond), "identities", len(a.ids.List()))
	a.trigger()
}

// reload applies the parts of a new config the agent can change live.
func (a *agent) reload(ctx context.Context, old, next config.Config) error {
	a.policyDirMu.Lock()
	a.policyDir = next.Datapath.PolicyDir
	a.policyDirMu.Unlock()
	// Policy files are re-read on every reload, changed or not: SIGHUP is
	// how an operator says "I edited policies.d".
	a.loadPolicyDir()
	a.sync.Sync()
	if old.Datapath.PolicyAuditMode != next.Datapath.PolicyAuditMode || old.Datapath.Attach != next.Datapath.Attach ||
		old.Datapath.PinDir != next.Datapath.PinDir || old.Datapath.IdentityLabels != nil && fmt.Sprint(old.Datapath.IdentityLabels) != fmt.Sprint(next.Datapath.IdentityLabels) {
		a.log.Warn("[datapath] attach, pin_dir, policy_audit_mode and identity_labels change only on restart (systemctl restart rackwired; forwarding continues)")
	}
	if old.Datapath.Events != next.Datapath.Events || old.Datapath.EventsRate != next.Datapath.EventsRate ||
		old.Datapath.EventsBurst != next.Datapath.EventsBurst {
		a.log.Warn("[datapath] events, events_rate and events_burst change only on restart (systemctl restart rackwired; forwarding continues)")
	}
	if old.Datapath.HostRouting != next.Datapath.HostRouting {
		a.log.Warn("[datapath] host_routing changes only on restart (systemctl restart rackwired; forwarding continues)")
	}
	if fmt.Sprint(old.Datapath.Uplinks) != fmt.Sprint(next.Datapath.Uplinks) || northSouthWanted(old) != northSouthWanted(next) {
		a.setNorthSouth(next)
		a.applyUplinks(next.Datapath)
	}
	if o, n := old.Datapath, next.Datapath; o.CTTimeoutTCP != n.CTTimeoutTCP || o.CTTimeoutTCPSYN != n.CTTimeoutTCPSYN ||
		o.CTTimeoutTCPClose != n.CTTimeoutTCPClose || o.CTTimeoutOther != n.CTTimeoutOther {
		a.log.Warn("[datapath] ct_timeout_* change only on restart (systemctl restart rackwired; forwarding continues)")
	}
	a.svc.reload(next)
	switch {
	case a.bgp != nil && next.BGP.Enabled:
		a.bgp.Reload(next.BGP, next.Prefixes())
	case a.bgp == nil && next.BGP.Enabled:
		a.log.Warn("[bgp] was enabled by a reload; restart the agent to start the BGP manager")
	case a.bgp != nil && !next.BGP.Enabled:
		a.log.Warn("[bgp] was disabled by a reload; BIRD keeps its last config until the agent restarts")
	}
	return nil
}

// northSouthWanted reports whether cfg announces service VIPs, which is
// when traffic from outside for a VIP arrives on the uplinks and must be
// balanced to local backends (north-south, docs/services.md).
func northSouthWanted(cfg config.Config) bool {
	return cfg.BGP.Enabled && cfg.BGP.AnnounceServiceVIPs
}

// setNorthSouth tells the datapath whether cfg wants north-south
// balancing (the next applyUplinks attaches or detaches) and remembers it
// for status and the VIP announcement.
func (a *agent) setNorthSouth(cfg config.Config) {
	w := northSouthWanted(cfg)
	a.nsWanted.Store(w)
	a.dp.SetNorthSouth(w)
}

// applyUplinks attaches rw_from_uplink to the configured uplinks (default:
// the devices of the default routes) and detaches it from any other; with
// host routing "legacy" it detaches from all. A failure leaves that
// uplink's traffic to the host stack, where rw_to_endpoint still enforces
// every endpoint's ingress: slower, never wider. Status reports it.
func (a *agent) applyUplinks(c config.Datapath) {
	a.uplinkMu.Lock()
	defer a.uplinkMu.Unlock()
	a.uplinkCfg = c.Uplinks
	a.applyUplinksLocked()
}

func (a *agent) applyUplinksLocked() {
	names := a.uplinkCfg
	var err error
	if len(names) == 0 {
		names, err = datapath.DefaultUplinks()
	}
	if err == nil {
		err = a.dp.SetUplinks(names)
	}
	if err != nil {
		a.log.Error("cannot attach rw_from_uplink to every uplink; their traffic takes the host stack (fix [datapath] uplinks or the routes, then reload)", "err", err)
	}
	a.uplinkErr = err
	a.uplinkSet = strings.Join(names, ",")
	// Service VIPs are announced only while rw_from_uplink is on an uplink.
	a.reannounceServiceVIPs()
}

// uplinkLoop follows the default routes when [datapath] uplinks is empty
// (they may come later, from BGP) and retries after a failure, every 5 s.
func (a *agent) uplinkLoop(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.uplinkMu.Lock()
		if len(a.uplinkCfg) > 0 {
			if a.uplinkErr != nil {
				a.applyUplinksLocked()
			}
		} else if names, err := datapath.DefaultUplinks(); err == nil && (strings.Join(names, ",") != a.uplinkSet || a.uplinkErr != nil) {
			a.applyUplinksLocked()
		}
		a.uplinkMu.Unlock()
	}
}
