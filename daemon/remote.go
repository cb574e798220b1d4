package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/ipcache"
	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/publish"
	"github.com/rackwire/rackwire/daemon/store"
)

// remote follows the other hosts' records in the store (their node records
// and their endpoints' ipcache records), checks them (ipcache.Nodes and
// ipcache.Remote: store data is checked, not trusted) and hands what passes
// to the ipcache owner. It also notices another host publishing under this
// host's node name, and own records lost with the session.
//
// It owns the node list the node watch delivered and, through the memo
// (ipcache.RemoteMemo), each ipcache record's last check, because an
// ipcache record is checked against its publisher's node record. The log
// follower delivers changes, not the fleet's whole set: a changed record
// is checked again, and a node record changed in its addresses or CIDRs
// re-checks that node's records; the ipcache gets the difference. A list
// (at start, when behind the log, every 30 min, and every change in list
// mode) is checked whole, reusing every unchanged check, and replaces
// the remote endpoints. Records that arrive before the first node list
// wait in ipsWaiting (checked with no nodes, every record would be an
// unknown node's and be withdrawn).
type remote struct {
	ipc    *ipcache.Cache
	pub    *publish.Publisher
	self   ipcache.Self
	hostID string
	log    *slog.Logger

	mu        sync.Mutex // guards the fields below
	nodes     map[string]ipcache.Node
	nodesSeen bool
	// ipsSeen: a list of the ipcache records was delivered. applied: the
	// ipcache holds its check, so changes apply to it; until then the
	// records wait in ipsWaiting.
	ipsSeen    bool
	applied    bool
	ipsWaiting map[string]store.KV
	rejected   map[string]string // key -> reason, of the last lists
	duplicate  string            // what is known of another host using this node name; "" if none
	pruned     bool
	// legacyNodes counts hosts that do not write the ipcache change log;
	// logStats is the log follower's last report.
	legacyNodes int
	logStats    iplog.Stats
	// checked holds the node view and every record's check.
	checked ipcache.RemoteMemo
	// worked counts the records checked and applied since takeWorked:
	// what the garbage of a delivery scales with (records that only
	// wait for the node list are not garbage yet).
	worked int
}

// takeWorked returns the records checked and applied since the last call.
func (r *remote) takeWorked() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.worked
	r.worked = 0
	return n
}

func newRemote(ipc *ipcache.Cache, pub *publish.Publisher, self ipcache.Self, hostID string, log *slog.Logger) *remote {
	return &remote{ipc: ipc, pub: pub, self: self, hostID: hostID, log: log, rejected: map[string]string{}}
}

// ipcacheWatch follows the other hosts' endpoint addresses: by listing
// the prefix on every change ([store] ipcache_sync = "list"), or through
// the change log ("log", daemon/iplog).
func (a *agent) ipcacheWatch(ctx context.Context) {
	prefix := store.IPPrefix + a.cfg.Node.Cluster + "/"
	deliver := func(d iplog.Delivery) {
		a.remote.deliverIPs(d)
		a.pub.Seen(prefix, a.remote.ipValue, true)
		a.memRel.after(a.remote.takeWorked(), time.Now())
	}
	if a.cfg.Store.IPCacheSync != "log" {
		a.watch(ctx, prefix, func(kvs []store.KV) { deliver(iplog.WholeDelivery(kvs)) })
		return
	}
	f := &iplog.Follower{St: a.st, Cluster: a.cfg.Node.Cluster, Log: a.log.With("subsys", "iplog"),
		Legacy: a.remote.legacy, Retry: a.retryWait, Stats: a.remote.setLogStats, Quiet: settle}
	f.Run(ctx, deliver)
}

// legacy reports whether a host of the fleet does not write the ipcache
// change log (its node record lacks the feature), or the node list has not
// been read yet: until then the log cannot be trusted to be complete.
func (r *remote) legacy() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.nodesSeen {
		return true
	}
	r.legacyNodes = 0
	for _, n := range r.nodes {
		if !slices.Contains(n.Features, iplog.Feature) {
			r.legacyNodes++
		}
	}
	return r.legacyNodes > 0
}

// memRelease hands the garbage of the ipcache's large reads back to the
// kernel. A list of the ipcache prefix decodes every entry of the fleet
// (≈ 500 B of garbage per entry, 15 MB at 30,000), the log follower's
// catch-up read after it and every delivery's check add more; then the
// agent is idle, nothing else allocates, and the Go runtime keeps the heap
// at twice the live data (GOGC=100) for minutes: 75–95 MB of RSS at 30,000
// entries with a live heap of 18–24 MB (docs/scale.md). A delivery or a
// node list that checked and applied at least releaseMin records (records
// that only wait for the first node list do not count: their check, where
// the garbage is, comes with it) schedules a collection that returns the
// free pages (a few ms of CPU at that size) releaseSettle later, once the
// reads that follow a list are done too; at most one per releaseEvery.
type memRelease struct {
	mu      sync.Mutex
	last    time.Time
	pending bool
}

const (
	releaseMin    = 5000
	releaseSettle = 5 * time.Second
	releaseEvery  = time.Minute
)

func (m *memRelease) after(keys int, now time.Time) {
	if keys < releaseMin {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pending {
		return
	}
	m.pending = true
	time.AfterFunc(max(releaseSettle, releaseEvery-now.Sub(m.last)), func() {
		m.mu.Lock()
		m.pending, m.last = false, time.Now()
		m.mu.Unlock()
		debug.FreeOSMemory()
	})
}

func (r *remote) setLogStats(s iplog.Stats) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.logStats = s
}

// syncDetail says how the ipcache is followed, for status.
func (r *remote) syncDetail() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.logStats.Mode == "" {
		return nil
	}
	return map[string]string{
		"ipcache_sync":              r.logStats.Mode,
		"ipcache_sync_legacy_hosts": strconv.Itoa(r.legacyNodes),
		"ipcache_sync_lists":        strconv.Itoa(r.logStats.Lists),
		"ipcache_log_reads":         strconv.Itoa(r.logStats.LogReads),
		"ipcache_log_key_reads":     strconv.Itoa(r.logStats.KeyReads),
		"ipcache_log_entry_reads":   strconv.Itoa(r.logStats.EntryReads),
		"ipcache_log_behind":        strconv.Itoa(r.logStats.Behind),
		"ipcache_log_behind_list":   strconv.Itoa(r.logStats.BehindAfterList),
		"ipcache_log_lag_reads":     strconv.Itoa(r.logStats.LagReads),
		"ipcache_log_malformed":     strconv.Itoa(r.logStats.Malformed),
	}
}

// nodeWatch follows the other hosts' node records; every host's start
// changes them, so the watch coalesces (watchCoalesced).
func (a *agent) nodeWatch(ctx context.Context) {
	prefix := store.NodePrefix + a.cfg.Node.Cluster + "/"
	a.watchCoalesced(ctx, prefix, func(kvs []store.KV) {
		a.remote.setNodes(kvs)
		a.pub.Seen(prefix, lookupIn(kvs), false)
		// The first node list applies the records that waited for it.
		a.memRel.after(a.remote.takeWorked(), time.Now())
	})
}

func (r *remote) setNodes(kvs []store.KV) {
	nodes, rej := ipcache.Nodes(kvs, r.self)
	other, dup := ipcache.Duplicate(kvs, r.self, r.hostID)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes, r.nodesSeen = nodes, true
	moved := r.checked.SetNodes(nodes, r.self)
	r.noteRejected(store.NodePrefix, rej)
	if dup {
		msg := fmt.Sprintf("another host (host_id %s, addresses %v) publishes under this host's node name %q; give each host a unique [node] name",
			other.HostID, other.IPs, r.self.Node)
		if r.duplicate != msg {
			r.log.Error("duplicate node name: two hosts share identity claims and overwrite each other's node record", "node", r.self.Node,
				"other_host_id", other.HostID, "other_addresses", fmt.Sprint(other.IPs))
		}
		r.duplicate = msg
	} else if r.duplicate != "" {
		r.log.Info("the duplicate node name is gone", "node", r.self.Node)
		r.duplicate = ""
	}
	if err := r.ipc.Replace(ipcache.RemoteNode, ipcache.NodeEntries(nodes, r.self)); err != nil {
		r.log.Warn("cannot write every node address to the ipcache; retrying", "err", err)
	}
	switch {
	case r.applied:
		r.applyDeltaLocked(moved)
	case r.ipsSeen:
		kvs := make([]store.KV, 0, len(r.ipsWaiting))
		for _, kv := range r.ipsWaiting {
			kvs = append(kvs, kv)
		}
		r.ipsWaiting = nil
		r.applyWholeLocked(kvs)
	}
}

// lookupIn looks a key up in a list.
func lookupIn(kvs []store.KV) func(string) ([]byte, bool) {
	m := make(map[string][]byte, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	return func(k string) ([]byte, bool) { v, ok := m[k]; return v, ok }
}

// ipValue looks an ipcache record up in what the watch delivered: the
// agent's one copy of the fleet's records (the memo, or the records
// waiting for the node list).
func (r *remote) ipValue(key string) ([]byte, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.applied {
		kv, ok := r.ipsWaiting[key]
		return kv.Value, ok
	}
	return r.checked.Value(key)
}

// deliverIPs takes a delivery of the ipcache watch: a list is checked
// whole, a change as itself once the ipcache holds a list's check.
func (r *remote) deliverIPs(d iplog.Delivery) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case d.Whole && r.nodesSeen:
		r.ipsSeen, r.ipsWaiting = true, nil
		r.applyWholeLocked(d.Set)
	case d.Whole:
		r.ipsSeen = true
		r.ipsWaiting = make(map[string]store.KV, len(d.Set))
		for _, kv := range d.Set {
			r.ipsWaiting[kv.Key] = kv
		}
	case r.applied:
		r.worked += len(d.Changed) + len(d.Removed)
		r.applyDeltaLocked(r.checked.Update(d.Changed, d.Removed, r.self))
	default: // before the node list: the records wait
		if r.ipsWaiting == nil {
			r.ipsWaiting = map[string]store.KV{}
		}
		for _, kv := range d.Changed {
			r.ipsWaiting[kv.Key] = kv
		}
		for _, k := range d.Removed {
			delete(r.ipsWaiting, k)
		}
	}
}

// applyWholeLocked checks a list of the ipcache records against the node
// records and makes the ipcache's remote endpoints equal to what passes.
// r.mu held.
func (r *remote) applyWholeLocked(kvs []store.KV) {
	r.worked += len(kvs)
	set, rej := r.checked.Whole(kvs, r.self)
	r.applied = true
	r.noteRejected(store.IPPrefix, rej)
	if err := r.ipc.Replace(ipcache.RemoteEndpoint, set); err != nil {
		r.log.Warn("cannot write every remote endpoint to the ipcache; retrying", "err", err)
	}
}

// applyDeltaLocked writes a change of the checked set to the ipcache.
// r.mu held.
func (r *remote) applyDeltaLocked(d ipcache.Delta) {
	if err := r.ipc.Apply(ipcache.RemoteEndpoint, d.Upsert, d.Delete); err != nil {
		r.log.Warn("cannot write every remote endpoint to the ipcache; retrying", "err", err)
	}
	for k, reason := range d.Refused {
		switch {
		case reason == "":
			delete(r.rejected, k)
		case r.rejected[k] != reason:
			r.log.Warn("store record refused; it does not reach the datapath", "key", k, "reason", reason)
			r.rejected[k] = reason
		}
	}
}

// noteRejected logs records refused for a new reason and keeps the current
// refusals of one prefix for status and metrics. r.mu held.
func (r *remote) noteRejected(prefix string, rej []ipcache.Rejected) {
	now := make(map[string]string, len(rej))
	for _, x := range rej {
		now[x.Key] = x.Reason
		if r.rejected[x.Key] != x.Reason {
			r.log.Warn("store record refused; it does not reach the datapath", "key", x.Key, "reason", x.Reason)
		}
	}
	for k := range r.rejected {
		if len(k) >= len(prefix) && k[:len(prefix)] == prefix {
			if _, still := now[k]; !still {
				delete(r.rejected, k)
			}
		}
	}
	for k, v := range now {
		r.rejected[k] = v
	}
}

// rejections counts the refused records of the last lists by reason.
func (r *remote) rejections() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for _, reason := range r.rejected {
		out[reason]++
	}
	return out
}

// rejectedKeys lists up to n refused keys with their reasons, sorted.
func (r *remote) rejectedKeys(n int) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.rejected))
	for k, v := range r.rejected {
		out = append(out, k+": "+v)
	}
	sort.Strings(out)
	return out[:min(n, len(out))]
}

// duplicateNode says what is known of another host using this node name.
func (r *remote) duplicateNode() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.duplicate
}

// prune asks the ipcache owner, once, to drop the previous run's entries
// that no source claimed; it does so only once every source reported.
func (r *remote) prune() {
	r.mu.Lock()
	done := r.pruned
	r.mu.Unlock()
	if done {
		return
	}
	n, err := r.ipc.Prune()
	if err != nil {
		return // not every source has spoken yet, or a deletion is retried
	}
	r.mu.Lock()
	r.pruned = true
	r.mu.Unlock()
	if n > 0 {
		r.log.Info("stale ipcache entries of the previous run removed", "entries", n)
	}
}
