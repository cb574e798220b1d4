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
// It owns the last lists the two watches delivered, because an ipcache
// record is checked against its publisher's node record: a change of
// either list re-checks the records.
type remote struct {
	ipc    *ipcache.Cache
	pub    *publish.Publisher
	self   ipcache.Self
	hostID string
	log    *slog.Logger

	mu        sync.Mutex // guards the fields below
	nodes     map[string]ipcache.Node
	nodesSeen bool
	ips       []store.KV
	ipsSeen   bool
	rejected  map[string]string // key -> reason, of the last lists
	duplicate string            // what is known of another host using this node name; "" if none
	pruned    bool
	// legacyNodes counts hosts that do not write the ipcache change log;
	// logStats is the log follower's last report.
	legacyNodes int
	logStats    iplog.Stats
	// checked remembers the checks of ips while nodes are the same.
	checked ipcache.RemoteMemo
}

func newRemote(ipc *ipcache.Cache, pub *publish.Publisher, self ipcache.Self, hostID string, log *slog.Logger) *remote {
	return &remote{ipc: ipc, pub: pub, self: self, hostID: hostID, log: log, rejected: map[string]string{}}
}

// ipcacheWatch follows the other hosts' endpoint addresses: by listing
// the prefix on every change ([store] ipcache_sync = "list"), or through
// the change log ("log", daemon/iplog).
func (a *agent) ipcacheWatch(ctx context.Context) {
	prefix := store.IPPrefix + a.cfg.Node.Cluster + "/"
	var rel memRelease
	deliver := func(kvs []store.KV) {
		a.remote.setIPs(kvs)
		a.pub.Seen(prefix, values(kvs), true)
		rel.after(len(kvs), time.Now())
	}
	if a.cfg.Store.IPCacheSync != "log" {
		a.watch(ctx, prefix, deliver)
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
// (≈ 500 B of garbage per entry, 15 MB at 30,000), and every delivery
// builds the checked set again; then the agent is idle, nothing else
// allocates, and the Go runtime keeps the heap at twice the live data
// (GOGC=100) for minutes: 75–95 MB of RSS at 30,000 entries with a live
// heap of 18–24 MB (docs/scale.md). After a delivery of at least
// releaseMin keys it runs a collection and returns the free pages (a few
// ms of CPU at that size), at most once per releaseEvery: a delivery
// within that time of the last release is released when it has passed.
type memRelease struct {
	mu      sync.Mutex
	last    time.Time
	pending bool
}

const (
	releaseMin   = 5000
	releaseEvery = time.Minute
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
	if wait := releaseEvery - now.Sub(m.last); wait > 0 {
		m.pending = true
		time.AfterFunc(wait, func() {
			m.mu.Lock()
			m.pending, m.last = false, time.Now()
			m.mu.Unlock()
			debug.FreeOSMemory()
		})
		return
	}
	m.last = now
	debug.FreeOSMemory()
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
		"ipcache_log_malformed":     strconv.Itoa(r.logStats.Malformed),
	}
}

// nodeWatch follows the other hosts' node records; every host's start
// changes them, so the watch coalesces (watchCoalesced).
func (a *agent) nodeWatch(ctx context.Context) {
	prefix := store.NodePrefix + a.cfg.Node.Cluster + "/"
	a.watchCoalesced(ctx, prefix, func(kvs []store.KV) {
		a.remote.setNodes(kvs)
		a.pub.Seen(prefix, values(kvs), false)
	})
}

func values(kvs []store.KV) map[string][]byte {
	m := make(map[string][]byte, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	return m
}

func (r *remote) setNodes(kvs []store.KV) {
	nodes, rej := ipcache.Nodes(kvs, r.self)
	other, dup := ipcache.Duplicate(kvs, r.self, r.hostID)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes, r.nodesSeen = nodes, true
	r.checked.Reset()
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
	if r.ipsSeen {
		r.applyIPsLocked()
	}
}

func (r *remote) setIPs(kvs []store.KV) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ips, r.ipsSeen = kvs, true
	if r.nodesSeen {
		r.applyIPsLocked()
	}
}

// applyIPsLocked checks the ipcache records against the node records and
// makes the ipcache's remote endpoints equal to what passes. r.mu held.
func (r *remote) applyIPsLocked() {
	set, rej := r.checked.Remote(r.ips, r.nodes, r.self)
	r.noteRejected(store.IPPrefix, rej)
	if err := r.ipc.Replace(ipcache.RemoteEndpoint, set); err != nil {
		r.log.Warn("cannot write every remote endpoint to the ipcache; retrying", "err", err)
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
