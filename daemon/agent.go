package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/bgp"
	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/version"
)

// agent holds the components that turn shared state into datapath state,
// and the sync loop that moves changes between them. The sync loop is the
// one writer of policy maps and of CIDR ipcache entries; syncMu serializes
// it with the API handlers that change endpoints.
type agent struct {
	log   *slog.Logger
	cfg   config.Config
	st    store.Store
	ids   *identity.Allocator
	cidrs *identity.LocalAllocator
	dp    *datapath.Datapath
	eps   *endpoint.Manager
	pol   *policy.Engine
	bgp   *bgp.Manager
	mon   *monitor

	hostIP netip.Addr
	kick   chan struct{}

	syncMu sync.Mutex // guards the fields below and serializes sync()
	// knownIDs are the identities the engine has, with their labels.
	knownIDs map[identity.ID]string
	// idsSeen is the allocator list the engine was last compared with.
	idsSeen time.Time
	// knownEPs are the endpoints the engine has: id -> identity.
	knownEPs map[uint16]identity.ID
	// cidrIDs are the CIDR identities allocated for policy prefixes.
	cidrIDs map[netip.Prefix]identity.ID
	// cidrPending are CIDR identities whose ipcache write failed; retried.
	cidrPending map[netip.Prefix]bool
	// remoteIPs are the ipcache entries learned from the store, kept
	// small: a large fleet has ~300K of them.
	remoteIPs map[netip.Prefix]remoteIP
	// published are the ipcache keys this host wrote for its endpoints.
	published map[string]bool
	// audit holds the endpoints (by name) an operator put in audit mode;
	// persisted in <state_dir>/endpoint-audit.json.
	audit map[string]bool
	// failedEPs are endpoints whose last policy write failed: the engine
	// reports a change once, so sync writes these again until one works.
	failedEPs map[uint16]bool
	// syncFailing is set while syncs fail, so a failure is logged once.
	syncFailing bool
	lastSync    time.Time
	syncErr     string
	policyErr   map[string]string // policy source -> why it was refused
}

// remoteIP is what the agent keeps of another host's ipcache entry.
type remoteIP struct {
	identity uint32
	hostIP   netip.Addr
}

func newAgent(ctx context.Context, cfg config.Config, st store.Store, log *slog.Logger) (*agent, error) {
	a := &agent{
		log: log, cfg: cfg, st: st,
		cidrs:       identity.NewLocalAllocator(),
		kick:        make(chan struct{}, 1),
		knownIDs:    map[identity.ID]string{},
		knownEPs:    map[uint16]identity.ID{},
		failedEPs:   map[uint16]bool{},
		cidrIDs:     map[netip.Prefix]identity.ID{},
		cidrPending: map[netip.Prefix]bool{},
		remoteIPs:   map[netip.Prefix]remoteIP{},
		published:   map[string]bool{},
		policyErr:   map[string]string{},
		audit:       map[string]bool{},
	}
	for _, s := range cfg.Node.Addresses {
		if ip, err := netip.ParseAddr(s); err == nil {
			a.hostIP = ip
			break
		}
	}
	var err error
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
	a.pol = policy.New(log.With("subsys", "policy"), policy.Options{IPLookup: a.lookupIP})
	a.eps, err = endpoint.New(endpoint.OptionsFromConfig(&cfg), endpoint.BPF{D: a.dp}, endpoint.Allocator{A: a.ids}, log.With("subsys", "endpoint"))
	if err != nil {
		a.close()
		return nil, fmt.Errorf("start endpoint manager: %w", err)
	}
	a.mon = newMonitor(a.dp, log.With("subsys", "monitor"))
	if cfg.BGP.Enabled {
		a.bgp = bgp.New(cfg.BGP, cfg.Prefixes(), version.Version, log.With("subsys", "bgp"))
		a.bgp.DrainFile = filepath.Join(cfg.Agent.StateDir, "bgp-drained")
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
	status("restoring endpoints")
	rep, err := a.eps.Restore(ctx)
	if err != nil {
		return fmt.Errorf("restore endpoints: %w", err)
	}
	a.log.Info("endpoints restored", "restored", len(rep.Restored), "lost", len(rep.Lost), "cleaned", len(rep.Cleaned), "failed", len(rep.Failed))
	a.restoreAudit()
	status("loading policies from %s", a.cfg.Datapath.PolicyDir)
	a.loadPolicyDir(a.cfg.Datapath.PolicyDir)
	// Policies of the store are read once now so the first sync already
	// enforces them; the watch below follows changes.
	if kvs, _, err := a.st.List(ctx, store.PolicyPrefix); err == nil {
		a.applyStorePolicies(kvs)
	} else {
		a.log.Warn("cannot list store policies now; following them once the store answers", "err", err)
	}
	status("computing policy for %d endpoints", len(a.eps.List()))
	a.sync(ctx)
	if err := a.publishNode(ctx); err != nil {
		a.log.Warn("cannot publish this node to the store yet; retrying in the background", "err", err)
	}

	loops := []func(context.Context){a.syncLoop, a.policyWatch, a.ipcacheWatch, a.nodeWatch, a.hostIPLoop, a.mon.run,
		a.waitFirstList, a.runGC, a.probeStore}
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
	return nil
}

// trigger asks the sync loop for a pass.
func (a *agent) trigger() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// syncLoop runs sync on every trigger and at least every second (the
// identity allocator's cache changes under it as the store is watched).
func (a *agent) syncLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.kick:
		case <-t.C:
		}
		a.sync(ctx)
	}
}

// sync brings the policy engine up to date with identities, endpoints and
// CIDR prefixes, then writes every changed endpoint's policy map.
func (a *agent) sync(ctx context.Context) {
	a.syncMu.Lock()
	defer a.syncMu.Unlock()
	var errs []error

	eps := a.eps.List()
	epIDs := map[identity.ID]bool{}
	for _, ep := range eps {
		if ep.State == endpoint.StateReady {
			epIDs[ep.Identity] = true
		}
	}

	// Identities: the allocator's cache is replaced whole on every store
	// list, so the engine is compared with it only when a new list came
	// in, not on every tick of the loop.
	if last := a.ids.LastSync(); !last.Equal(a.idsSeen) {
		a.idsSeen = last
		seen := map[identity.ID]bool{}
		for _, id := range a.ids.List() {
			seen[id.ID] = true
			canon := id.Labels.String()
			if a.knownIDs[id.ID] != canon {
				a.pol.UpsertIdentity(id.ID, id.Labels)
				a.knownIDs[id.ID] = canon
			}
		}
		for id := range a.knownIDs {
			// A local endpoint's fresh identity may not be listed yet.
			if !seen[id] && !id.IsLocal() && !epIDs[id] {
				a.pol.DeleteIdentity(id)
				delete(a.knownIDs, id)
			}
		}
	}
	// Endpoints: a fresh allocation of this host may not be in the
	// store's list yet; make sure the engine has its identity.
	epSeen := map[uint16]bool{}
	for _, ep := range eps {
		if ep.State != endpoint.StateReady {
			continue
		}
		epSeen[ep.ID] = true
		if _, ok := a.knownIDs[ep.Identity]; !ok {
			a.pol.UpsertIdentity(ep.Identity, ep.IdentityLabels)
			a.knownIDs[ep.Identity] = ep.IdentityLabels.String()
		}
		audit := a.cfg.Datapath.PolicyAuditMode || a.audit[ep.Name]
		if old, ok := a.knownEPs[ep.ID]; !ok || old != ep.Identity || a.pol.Audit(ep.ID) != audit {
			a.pol.UpsertEndpoint(ep.ID, ep.Identity, ep.IdentityLabels, audit)
			a.knownEPs[ep.ID] = ep.Identity
		}
	}
	for id := range a.knownEPs {
		if !epSeen[id] {
			a.pol.DeleteEndpoint(id)
			delete(a.knownEPs, id)
		}
	}

	// CIDR identities for the prefixes the policies name.
	want := map[netip.Prefix]bool{}
	for _, p := range a.pol.CIDRPrefixes() {
		want[p] = true
		if id, ok := a.cidrIDs[p]; ok {
			if a.cidrPending[p] {
				if err := a.dp.UpsertIPCache(p, uint32(id), netip.Addr{}); err != nil {
					errs = append(errs, fmt.Errorf("ipcache %s: %w", p, err))
				} else {
					delete(a.cidrPending, p)
				}
			}
			continue
		}
		id, _, err := a.cidrs.Allocate(p.String())
		if err != nil {
			errs = append(errs, fmt.Errorf("allocate CIDR identity for %s: %w", p, err))
			continue
		}
		a.pol.UpsertIdentity(id, policy.CIDRLabels(p))
		if err := a.dp.UpsertIPCache(p, uint32(id), netip.Addr{}); err != nil {
			errs = append(errs, fmt.Errorf("ipcache %s: %w", p, err))
			a.cidrPending[p] = true
		}
		a.cidrIDs[p] = id
	}
	for p, id := range a.cidrIDs {
		if want[p] {
			continue
		}
		a.pol.DeleteIdentity(id)
		a.cidrs.Release(p.String())
		if _, remote := a.remoteIPs[p]; !remote && !a.isLocalEndpointIP(p) {
			if err := a.dp.DeleteIPCache(p); err != nil {
				errs = append(errs, fmt.Errorf("ipcache delete %s: %w", p, err))
			}
		}
		delete(a.cidrIDs, p)
		delete(a.cidrPending, p)
	}

	// Policy maps: write what changed, each endpoint as a whole (the
	// datapath adds before it deletes, so nothing allowed by both the old
	// and the new policy is ever missing). Until the first full list of
	// identities arrived, the engine does not know the other hosts'
	// identities: the maps keep what they hold (pinned, from the last
	// run) rather than being narrowed to a partial view.
	if a.ids.LastSync().IsZero() {
		a.syncErr = "waiting for the first list of identities from the store; policy maps keep their last state"
		a.lastSync = time.Now()
		return
	}
	write := map[uint16]bool{}
	for _, ch := range a.pol.Changes() {
		if !ch.Removed {
			write[ch.Endpoint] = true
		}
	}
	for id := range a.failedEPs {
		write[id] = true
	}
	for id := range write {
		desired, ok := a.pol.Desired(id)
		if !ok {
			delete(a.failedEPs, id)
			continue
		}
		if err := a.dp.SetPolicy(id, toDatapath(desired)); err != nil {
			a.failedEPs[id] = true
			errs = append(errs, fmt.Errorf("write policy of endpoint %d: %w", id, err))
			continue
		}
		delete(a.failedEPs, id)
	}
	a.lastSync = time.Now()
	a.syncErr = ""
	if err := errors.Join(errs...); err != nil {
		a.syncErr = err.Error()
		// syncLoop's ticker retries the failed parts every second; a
		// failure is logged when it starts, not on every retry.
		if !a.syncFailing {
			a.log.Error("sync incomplete; will retry", "err", err)
		} else {
			a.log.Debug("sync still incomplete", "err", err)
		}
		a.syncFailing = true
	} else if a.syncFailing {
		a.syncFailing = false
		a.log.Info("sync complete again")
	}
	a.publishEndpoints(ctx, eps)
}

func (a *agent) isLocalEndpointIP(p netip.Prefix) bool {
	if !p.IsSingleIP() {
		return false
	}
	for _, ep := range a.eps.List() {
		for _, ip := range ep.IPs() {
			if ip == p.Addr() {
				return true
			}
		}
	}
	return false
}

func toDatapath(es []policy.Entry) []datapath.Entry {
	out := make([]datapath.Entry, len(es))
	for i, e := range es {
		out[i] = datapath.Entry{
			Identity: e.Identity, Direction: datapath.Direction(e.Direction), Proto: e.Proto,
			Port: e.Port, EndPort: e.EndPort, Deny: e.Deny,
		}
	}
	return out
}

// loadPolicyDir replaces the file policies with the directory's content.
// A file that does not load is refused as a whole and its previous
// policies stay in force.
func (a *agent) loadPolicyDir(dir string) {
	if dir == "" {
		return
	}
	results, err := policy.LoadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			a.log.Debug("no policy directory", "dir", dir)
		} else {
			a.log.Error("cannot read the policy directory; policies in force stay", "dir", dir, "err", err)
		}
		return
	}
	present := map[string]bool{}
	for _, r := range results {
		src := policy.SourceFile(r.Path)
		present[src] = true
		if r.Err != nil {
			a.policyErr[src] = r.Err.Error()
			a.log.Error("policy file refused; its previous policies stay in force", "file", r.Path, "err", r.Err)
			continue
		}
		delete(a.policyErr, src)
		if err := a.pol.SetPolicies(src, r.Policies); err != nil {
			a.policyErr[src] = err.Error()
			a.log.Error("policy file refused; its previous policies stay in force", "file", r.Path, "err", err)
			continue
		}
		a.log.Info("policy file loaded", "file", r.Path, "policies", len(r.Policies))
	}
	// Files that disappeared: their policies go.
	for _, l := range a.pol.Policies() {
		if len(l.Source) > 5 && l.Source[:5] == "file:" && !present[l.Source] {
			_ = a.pol.SetPolicies(l.Source, nil)
			a.log.Info("policy file removed; its policies are withdrawn", "source", l.Source)
		}
	}
	a.trigger()
}

// applyStorePolicies makes the engine's store policies equal to kvs.
func (a *agent) applyStorePolicies(kvs []store.KV) {
	present := map[string]bool{}
	for _, kv := range kvs {
		name := kv.Key[len(store.PolicyPrefix):]
		src := policy.SourceStore(name)
		present[src] = true
		p, err := policy.DecodeStoreValue(name, kv.Value)
		if err != nil {
			if a.policyErr[src] != err.Error() {
				a.log.Error("store policy refused; skipping it", "key", kv.Key, "err", err)
			}
			a.policyErr[src] = err.Error()
			continue
		}
		delete(a.policyErr, src)
		if err := a.pol.SetPolicies(src, []policy.Policy{p}); err != nil {
			a.policyErr[src] = err.Error()
			a.log.Error("store policy refused; skipping it", "key", kv.Key, "err", err)
		}
	}
	for _, l := range a.pol.Policies() {
		if len(l.Source) > 6 && l.Source[:6] == "store:" && !present[l.Source] {
			_ = a.pol.SetPolicies(l.Source, nil)
		}
	}
	a.trigger()
}

// watch follows a prefix of the store with blocking queries, backing off
// with jitter on errors; fn gets the whole prefix after each change.
func (a *agent) watch(ctx context.Context, prefix string, fn func([]store.KV)) {
	var index uint64
	backoff := time.Second
	for ctx.Err() == nil {
		kvs, next, err := a.st.Watch(ctx, prefix, index, 5*time.Minute)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Warn("store watch failed; keeping the last known state", "prefix", prefix, "err", err, "retry_in", backoff)
			a.retryWait(ctx, jitter(backoff))
			backoff = min(backoff*2, time.Minute)
			continue
		}
		backoff = time.Second
		if next < index {
			// The store's index went backwards (a restored snapshot):
			// start over.
			next = 0
		}
		if next == index && index != 0 {
			continue
		}
		index = next
		fn(kvs)
		// Bound the rate of a busy prefix.
		sleep(ctx, 100*time.Millisecond)
	}
}

func (a *agent) policyWatch(ctx context.Context) {
	a.watch(ctx, store.PolicyPrefix, func(kvs []store.KV) {
		a.syncMu.Lock()
		a.applyStorePolicies(kvs)
		a.syncMu.Unlock()
	})
}

// ipcacheWatch mirrors the other hosts' endpoint addresses into rw_ipcache.
func (a *agent) ipcacheWatch(ctx context.Context) {
	prefix := store.IPPrefix + a.cfg.Node.Cluster + "/"
	a.watch(ctx, prefix, func(kvs []store.KV) {
		a.syncMu.Lock()
		defer a.syncMu.Unlock()
		seen := map[netip.Prefix]bool{}
		own := map[string]bool{}
		for _, kv := range kvs {
			var e store.IPEntry
			if err := json.Unmarshal(kv.Value, &e); err != nil {
				a.log.Warn("skipping malformed ipcache entry", "key", kv.Key, "err", err)
				continue
			}
			ip, err := netip.ParseAddr(e.IP)
			if err != nil || e.Identity == 0 {
				a.log.Warn("skipping ipcache entry without a usable ip or identity", "key", kv.Key)
				continue
			}
			if e.Node == a.cfg.Node.Name {
				own[kv.Key] = true
				continue // ours: the endpoint manager wrote it
			}
			p := netip.PrefixFrom(ip, ip.BitLen())
			seen[p] = true
			hostIP, _ := netip.ParseAddr(e.HostIP)
			if old, ok := a.remoteIPs[p]; ok && old.identity == e.Identity && old.hostIP == hostIP {
				continue
			}
			if err := a.dp.UpsertIPCache(p, e.Identity, hostIP); err != nil {
				a.log.Error("cannot write ipcache entry", "ip", ip, "err", err)
				continue
			}
			a.remoteIPs[p] = remoteIP{identity: e.Identity, hostIP: hostIP}
		}
		for p := range a.remoteIPs {
			if !seen[p] {
				if err := a.dp.DeleteIPCache(p); err != nil {
					a.log.Warn("cannot delete ipcache entry", "prefix", p, "err", err)
				}
				delete(a.remoteIPs, p)
			}
		}
		// Our own entries gone from the store (the session was lost and
		// Consul deleted its keys): publish them again now, not at the
		// next session renew; the write also tells the store its session
		// is gone.
		for k := range a.published {
			if !own[k] {
				a.log.Info("own ipcache entry vanished from the store; publishing it again", "key", k)
				delete(a.published, k)
			}
		}
		a.trigger()
	})
}

// publishEndpoints writes this host's endpoint addresses to the store's
// ipcache (owned keys) and removes the ones of deleted endpoints. Called
// with syncMu held; store errors are retried by the next sync.
func (a *agent) publishEndpoints(ctx context.Context, eps []endpoint.Endpoint) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	want := map[string]bool{}
	for _, ep := range eps {
		if ep.State != endpoint.StateReady {
			continue
		}
		for _, ip := range ep.IPs() {
			k := store.IPKey(a.cfg.Node.Cluster, ip)
			want[k] = true
			if a.published[k] {
				continue
			}
			b, _ := json.Marshal(store.IPEntry{
				IP: ip.String(), Identity: uint32(ep.Identity), HostIP: a.hostIP.String(),
				Node: a.cfg.Node.Name, Endpoint: uint32(ep.ID), LabelsHash: ep.IdentityLabels.String(),
			})
			if err := a.st.Put(ctx, k, b, store.PutOptions{Owned: true}); err != nil {
				a.log.Debug("cannot publish endpoint address yet", "key", k, "err", err)
				continue
			}
			a.published[k] = true
		}
	}
	for k := range a.published {
		if _, ok := want[k]; ok {
			continue
		}
		if err := a.st.Delete(ctx, k); err != nil && !errors.Is(err, store.ErrNotFound) {
			continue
		}
		delete(a.published, k)
	}
}

func (a *agent) publishNode(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	b, _ := json.Marshal(store.NodeEntry{
		Name: a.cfg.Node.Name, Cluster: a.cfg.Node.Cluster, IPs: a.cfg.Node.Addresses,
		CIDRs: a.cfg.IPAM.CIDRs, BGPASN: a.cfg.BGP.LocalASN, Version: version.Version,
	})
	return a.st.Put(ctx, store.NodeKey(a.cfg.Node.Cluster, a.cfg.Node.Name), b, store.PutOptions{Owned: true})
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// reload applies the parts of a new config the agent can change live.
func (a *agent) reload(ctx context.Context, old, next config.Config) error {
	a.syncMu.Lock()
	a.cfg.Datapath.PolicyDir = next.Datapath.PolicyDir
	a.cfg.BGP = next.BGP
	a.syncMu.Unlock()
	// Policy files are re-read on every reload, changed or not: SIGHUP is
	// how an operator says "I edited policies.d".
	a.syncMu.Lock()
	a.loadPolicyDir(next.Datapath.PolicyDir)
	a.syncMu.Unlock()
	if old.Datapath.PolicyAuditMode != next.Datapath.PolicyAuditMode || old.Datapath.Attach != next.Datapath.Attach ||
		old.Datapath.PinDir != next.Datapath.PinDir || old.Datapath.IdentityLabels != nil && fmt.Sprint(old.Datapath.IdentityLabels) != fmt.Sprint(next.Datapath.IdentityLabels) {
		a.log.Warn("[datapath] attach, pin_dir, policy_audit_mode and identity_labels change only on restart (systemctl restart rackwired; forwarding continues)")
	}
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

// hostIPLoop keeps this host's own addresses in rw_ipcache as the host
// identity, so that `fromEntities: [host]` matches traffic the host
// originates (its source is one of these addresses).
func (a *agent) hostIPLoop(ctx context.Context) {
	var have map[netip.Prefix]bool
	for {
		now := map[netip.Prefix]bool{}
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			a.log.Warn("cannot list host addresses for the host identity", "err", err)
		}
		for _, ad := range addrs {
			pn, ok := ad.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(pn.IP)
			if !ok || ip.IsLinkLocalUnicast() {
				continue
			}
			ip = ip.Unmap()
			p := netip.PrefixFrom(ip, ip.BitLen())
			now[p] = true
			if have[p] {
				continue
			}
			a.syncMu.Lock()
			_, remote := a.remoteIPs[p]
			a.syncMu.Unlock()
			if remote || a.isLocalEndpointIP(p) {
				continue
			}
			if err := a.dp.UpsertIPCache(p, uint32(identity.Host), ip); err != nil {
				a.log.Warn("cannot write host address to the ipcache", "ip", ip, "err", err)
				delete(now, p)
			}
		}
		for p := range have {
			if !now[p] {
				_ = a.dp.DeleteIPCache(p)
			}
		}
		have = now
		select {
		case <-ctx.Done():
			return
		case <-time.After(30 * time.Second):
		}
	}
}

// nodeWatch puts the other hosts' addresses in rw_ipcache as remote-node.
func (a *agent) nodeWatch(ctx context.Context) {
	prefix := store.NodePrefix + a.cfg.Node.Cluster + "/"
	have := map[netip.Prefix]bool{}
	a.watch(ctx, prefix, func(kvs []store.KV) {
		now := map[netip.Prefix]bool{}
		own := false
		for _, kv := range kvs {
			own = own || kv.Key == store.NodeKey(a.cfg.Node.Cluster, a.cfg.Node.Name)
			var n store.NodeEntry
			if err := json.Unmarshal(kv.Value, &n); err != nil {
				a.log.Warn("skipping malformed node entry", "key", kv.Key, "err", err)
				continue
			}
			if n.Name == a.cfg.Node.Name {
				continue
			}
			for _, s := range n.IPs {
				ip, err := netip.ParseAddr(s)
				if err != nil {
					continue
				}
				p := netip.PrefixFrom(ip, ip.BitLen())
				now[p] = true
				if !have[p] {
					if err := a.dp.UpsertIPCache(p, uint32(identity.RemoteNode), ip); err != nil {
						a.log.Warn("cannot write node address to the ipcache", "ip", ip, "err", err)
						delete(now, p)
					}
				}
			}
		}
		for p := range have {
			if !now[p] {
				_ = a.dp.DeleteIPCache(p)
			}
		}
		have = now
		if !own {
			// Gone with a lost session (or deleted by hand): write it
			// again, which also makes the store notice the lost session.
			go func() {
				if err := a.publishNode(ctx); err != nil {
					a.log.Debug("cannot publish this node yet", "err", err)
				}
			}()
		}
	})
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

// runGC runs the identity garbage collector; with Consul, only the host
// that holds the GC lock deletes.
func (a *agent) runGC(ctx context.Context) {
	opts := identity.GCOptions{Log: a.log.With("subsys", "identity-gc")}
	if e, ok := a.st.(interface {
		Elector(string) *consul.Elector
	}); ok {
		opts.Elector = e.Elector("locks/identity-gc")
	}
	if err := identity.NewGC(a.st, opts).Run(ctx); err != nil && ctx.Err() == nil {
		a.log.Error("identity garbage collector stopped", "err", err)
	}
}

func (a *agent) auditFile() string { return filepath.Join(a.cfg.Agent.StateDir, "endpoint-audit.json") }

// restoreAudit re-applies per-endpoint audit mode after a restart (the
// endpoint restore writes the global setting into rw_endpoints).
func (a *agent) restoreAudit() {
	b, err := os.ReadFile(a.auditFile())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("cannot read per-endpoint audit state; no endpoint is in audit mode", "err", err)
		}
		return
	}
	var names []string
	if err := json.Unmarshal(b, &names); err != nil {
		a.log.Warn("per-endpoint audit state is corrupt; ignoring it", "file", a.auditFile(), "err", err)
		return
	}
	for _, n := range names {
		ep, err := a.eps.Get(n)
		if err != nil {
			continue
		}
		if err := a.dp.SetAudit(ep.ID, true); err != nil {
			a.log.Warn("cannot restore audit mode", "endpoint", n, "err", err)
			continue
		}
		a.audit[n] = true
	}
}

// setAudit puts one endpoint in or out of audit mode and persists it.
func (a *agent) setAudit(ctx context.Context, nameOrID string, on bool) (endpoint.Endpoint, error) {
	ep, err := a.endpoint(nameOrID)
	if err != nil {
		return ep, err
	}
	a.syncMu.Lock()
	if err := a.dp.SetAudit(ep.ID, on || a.cfg.Datapath.PolicyAuditMode); err != nil {
		a.syncMu.Unlock()
		return ep, err
	}
	if on {
		a.audit[ep.Name] = true
	} else {
		delete(a.audit, ep.Name)
	}
	a.saveAuditLocked()
	a.syncMu.Unlock()
	a.log.Warn("endpoint audit mode changed", "endpoint", ep.Name, "endpoint_id", ep.ID, "audit", on)
	a.sync(ctx)
	return ep, nil
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// forgetAudit drops a deleted endpoint's audit mode.
func (a *agent) forgetAudit(name string) {
	a.syncMu.Lock()
	defer a.syncMu.Unlock()
	if a.audit[name] {
		delete(a.audit, name)
		a.saveAuditLocked()
	}
}

// saveAuditLocked persists the audit set; syncMu must be held.
func (a *agent) saveAuditLocked() {
	names := make([]string, 0, len(a.audit))
	for n := range a.audit {
		names = append(names, n)
	}
	sort.Strings(names)
	b, _ := json.Marshal(names)
	if err := writeFileAtomic(a.auditFile(), b); err != nil {
		a.log.Warn("cannot persist per-endpoint audit mode; it lasts until the agent restarts", "err", err)
	}
}

// retryWait waits d before a failed watch is retried, but returns early,
// after a random delay of up to 5s, once the store reports itself healthy
// again: recovery takes seconds rather than a full backoff, and a fleet
// does not come back in one burst.
func (a *agent) retryWait(ctx context.Context, d time.Duration) {
	deadline := time.Now().Add(d)
	wasOK := a.st.Health().State == store.StateOK
	for time.Now().Before(deadline) {
		sleep(ctx, min(500*time.Millisecond, time.Until(deadline)))
		if ctx.Err() != nil {
			return
		}
		ok := a.st.Health().State == store.StateOK
		if ok && !wasOK {
			sleep(ctx, min(time.Duration(rand.Int64N(int64(5*time.Second))), time.Until(deadline)))
			return
		}
		wasOK = ok
	}
}

// probeStore makes one cheap read every 5–10 s while the store is not
// healthy. The watches sleep in backoff during an outage; this probe is
// what notices the store's return (its success marks the store healthy),
// and retryWait then wakes them with jitter. One request per host per
// probe interval is all an outage costs the store.
func (a *agent) probeStore(ctx context.Context) {
	key := store.NodeKey(a.cfg.Node.Cluster, a.cfg.Node.Name)
	for {
		sleep(ctx, 5*time.Second+time.Duration(rand.Int64N(int64(5*time.Second))))
		if ctx.Err() != nil {
			return
		}
		if a.st.Health().State == store.StateOK {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := a.st.Get(pctx, key)
		cancel()
		if err == nil || errors.Is(err, store.ErrNotFound) {
			a.log.Info("store answers again; watches resume", "health", a.st.Health().State)
		}
	}
}
