package iplog

import (
	"context"
	"errors"
	"hash/maphash"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/backoff"
)

// Follower keeps this agent's copy of a cluster's ipcache keys with as few
// reads of the whole prefix as it can (package doc).
type Follower struct {
	St      store.Store
	Cluster string
	Log     *slog.Logger
	// Wait bounds one blocking query. Default 5m.
	Wait time.Duration
	// Resync is how often the prefix is listed again anyway. Default 30m
	// (jittered).
	Resync time.Duration
	// Legacy reports whether some host of the fleet does not write the
	// log (nil: none). While it does, the follower watches the ipcache
	// prefix itself, as agents without the log do.
	Legacy func() bool
	// Retry waits after a failed store call (default: plain sleep).
	Retry func(ctx context.Context, d time.Duration)
	// Stats, if set, gets the follower's counters after every step.
	Stats func(Stats)
	// Quiet is the pause after a read that changed none of the keys (an
	// entry of values it held already: a restarted host journals its keys
	// again; a prune): the daemon's coalescing pause, so that a fleet-wide
	// restart does not cost every follower a read per start. nil: the
	// 100 ms pace after every read.
	Quiet func() time.Duration

	// ips holds a hash of each key's value (hash/maphash, seed): enough
	// to tell a change from a rewrite of the same value. The values
	// themselves are the consumer's (every delivery hands them on), so
	// an agent does not hold the fleet's records twice (docs/scale.md).
	ips      map[string]uint64
	seed     maphash.Seed
	base     uint64 // every change up to this index is applied
	logIndex uint64 // index of the last log read, 0 = read at once
	listed   time.Time
	// fresh: no log read since the last list.
	fresh bool
	// seen holds the entry keys of the last log read (nil: read whole).
	seen map[string]bool
	// lagging counts consecutive reads that lagged their names; while
	// it is not 0 the next read comes after the short pace, not Quiet.
	lagging int
	legacy  bool
	stats   Stats
	// whole: the keys were listed (list) since the last delivery; else
	// changes holds the keys written or deleted since then.
	whole   bool
	list    []store.KV
	changes map[string]change
}

// change is a key's last write (or deletion) since the last delivery.
type change struct {
	val []byte
	del bool
}

// Delivery is what the follower hands on after a change: the whole set of
// keys after a list, else only the keys written and deleted since the
// last delivery (a change costs the agent the change, not the fleet's
// 30,000 keys: docs/scale.md).
type Delivery struct {
	// Whole: Set holds every key (in no order). Else Changed holds the
	// keys written since the last delivery, with their values, and
	// Removed the keys deleted.
	Whole   bool
	Set     []store.KV
	Changed []store.KV
	Removed []string
}

// Size is the number of keys d carries.
func (d Delivery) Size() int { return len(d.Set) + len(d.Changed) + len(d.Removed) }

// WholeDelivery is the delivery of a list: every key.
func WholeDelivery(kvs []store.KV) Delivery { return Delivery{Whole: true, Set: kvs} }

// Stats counts what the follower did, for status and metrics.
type Stats struct {
	Mode     string // "log" or "list" (legacy hosts in the fleet)
	Lists    int    // full lists of the ipcache prefix
	LogReads int    // reads of the log's entries
	// EntryReads counts reads of new entries only (store.MultiGetter),
	// each of at most store.MaxBatch keys.
	EntryReads int
	KeyReads   int // reads of the log's key names only
	Applied    int // entries applied
	Behind     int // lists because the log was pruned past this follower
	Malformed  int // entries skipped
	// BehindAfterList counts the times it was behind right after a list
	// (a list slower than the log's keep: it cannot catch up).
	BehindAfterList int
	// LagReads counts reads of new entries that came back without an
	// entry the names listed, not pruned (the horizon is below it): the
	// server that answered the read had not applied what the one that
	// listed the names had. The read is done again (lagRetries times at
	// most, then the follower lists).
	LagReads int
}

// lagRetries bounds the reads of entries that lag their names before the
// follower gives up on the log and lists the ipcache (a name that never
// becomes readable is not an entry the pruner took: something else
// deleted it).
const lagRetries = 50

// Run follows the ipcache until ctx ends; deliver gets every change: the
// whole set after a list, the keys changed since the last delivery
// otherwise. It runs in the caller's goroutine.
func (f *Follower) Run(ctx context.Context, deliver func(Delivery)) {
	if f.Wait <= 0 {
		f.Wait = 5 * time.Minute
	}
	if f.Resync <= 0 {
		f.Resync = 30 * time.Minute
	}
	if f.Retry == nil {
		f.Retry = func(ctx context.Context, d time.Duration) { backoff.Sleep(ctx, d) }
	}
	f.seed = maphash.MakeSeed()
	bo := backoff.New(time.Second, time.Minute)
	resync := backoff.Jitter(f.Resync)
	for ctx.Err() == nil {
		changed, err := f.step(ctx, resync)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			wait := bo.Next()
			f.Log.Warn("ipcache follow failed; keeping the last known state", "mode", f.stats.Mode, "err", err, "retry_in", wait)
			f.Retry(ctx, wait)
			continue
		}
		bo.Reset()
		if f.Stats != nil {
			f.Stats(f.stats)
		}
		if changed {
			deliver(f.delivery())
		}
		// Bound the rate of a busy fleet, and of a store that answers a
		// blocking query at once.
		pause := 100 * time.Millisecond
		if !changed && f.Quiet != nil && f.ips != nil && f.lagging == 0 {
			pause = f.Quiet()
		}
		backoff.Sleep(ctx, pause)
	}
}

func (f *Follower) ipPrefix() string { return store.IPPrefix + f.Cluster + "/" }

// step does one list or one log read and reports whether the keys changed.
func (f *Follower) step(ctx context.Context, resync time.Duration) (bool, error) {
	legacy := f.Legacy != nil && f.Legacy()
	if legacy != f.legacy {
		if legacy {
			f.Log.Warn("a host of the fleet does not write the ipcache change log (an older release); listing the ipcache prefix on every change until every host does")
		} else if f.ips != nil {
			f.Log.Info("every host writes the ipcache change log; following it")
		}
		f.legacy = legacy
		f.logIndex = 0
		if legacy {
			f.ips = nil // list at once
		}
	}
	if legacy {
		f.stats.Mode = "list"
		// The prefix watch, with a short wait so that the end of the
		// rollout is noticed.
		wait := min(f.Wait, time.Minute)
		idx := f.base
		if f.ips == nil {
			idx = 0
		}
		kvs, next, err := f.St.Watch(ctx, f.ipPrefix(), idx, wait)
		if err != nil {
			return false, err
		}
		// The same index is no change (a wait that elapsed), unless the
		// count differs: a fresh local store's empty prefix and its first
		// write share index 1.
		if f.ips != nil && next == f.base && len(kvs) == len(f.ips) {
			return false, nil
		}
		f.setList(kvs, next)
		return true, nil
	}
	f.stats.Mode = "log"
	if f.ips == nil || time.Since(f.listed) > resync {
		// The log's index first: a list taken after it holds every change
		// whose entry is at or below it (a key is written before its
		// entry), so the list is complete through both indexes. Without
		// it, a horizon just above the ipcache prefix's own index (the
		// last key's entry, pruned) would send the follower back to
		// listing forever.
		_, logIdx, err := f.St.List(ctx, ClusterPrefix(f.Cluster))
		if err != nil {
			return false, err
		}
		kvs, idx, err := f.St.List(ctx, f.ipPrefix())
		if err != nil {
			return false, err
		}
		f.setList(kvs, max(idx, logIdx))
		f.fresh = true
		f.logIndex = 0 // read the log at once: it may hold changes after idx
		return true, nil
	}
	kvs, next, seen, missing, err := f.readLog(ctx)
	if err != nil {
		return false, err
	}
	if next < f.logIndex {
		// The store's index went backwards (a restored snapshot).
		f.Log.Warn("the store's index went backwards; listing the ipcache again")
		f.ips = nil
		return false, nil
	}
	if next == f.logIndex {
		return false, nil
	}
	if kvs == nil {
		// No new entry: the log only lost entries (the pruner) or its
		// horizon moved; the horizon, read after the keys, says whether
		// an entry came and went unseen.
		h, bad, err := f.horizon(ctx)
		if err != nil {
			return false, err
		}
		if bad || h > f.base {
			f.behind(h)
			return false, nil
		}
		f.base = max(f.base, next)
		f.logIndex = next
		f.fresh = false
		return false, nil
	}
	p := parse(kvs, f.Cluster)
	f.stats.Malformed = p.malformed
	if p.badHorizon || p.horizon > f.base {
		f.behind(p.horizon)
		return false, nil
	}
	if missing > 0 {
		// Named but not read, and not pruned (an entry new since base
		// that the pruner took would have raised the horizon above base):
		// the read came from a server behind the one that listed the
		// names (a stale read through a client agent, or a leader whose
		// state machine trails a follower's). Taking next as applied
		// would skip the entry for good; the read is done again, from
		// the same index, after the pace.
		f.stats.LagReads++
		f.lagging++
		if f.lagging >= lagRetries {
			f.Log.Warn("ipcache change log entries are listed but cannot be read; listing the ipcache", "missing", missing, "reads", f.lagging)
			f.lagging = 0
			f.ips = nil
		}
		return false, nil
	}
	f.lagging = 0
	f.fresh = false
	if seen != nil {
		f.seen = seen
	} else {
		f.seen = make(map[string]bool, len(p.entries))
		for _, l := range p.entries {
			f.seen[l.key] = true
		}
	}
	sort.Slice(p.entries, func(i, j int) bool { return p.entries[i].index < p.entries[j].index })
	prefix := f.ipPrefix()
	changed := false
	for _, l := range p.entries {
		if l.index <= f.base || l.e.Time < 0 {
			continue
		}
		f.stats.Applied++
		for _, op := range l.e.Ops {
			if !strings.HasPrefix(op.Key, prefix) {
				f.stats.Malformed++
				continue
			}
			if op.Delete {
				if _, ok := f.ips[op.Key]; ok {
					delete(f.ips, op.Key)
					f.changes[op.Key] = change{del: true}
					changed = true
				}
				continue
			}
			h := maphash.Bytes(f.seed, op.Value)
			if cur, ok := f.ips[op.Key]; !ok || cur != h {
				f.ips[op.Key] = h
				f.changes[op.Key] = change{val: op.Value}
				changed = true
			}
		}
	}
	f.base = max(f.base, next)
	f.logIndex = next
	return changed, nil
}

// readLog reads the log after f.logIndex. With a store that can watch key
// names (Consul), it blocks on the names only and reads entries when a
// name it has not seen appears; kvs is nil when none did. The pruner
// deletes entries in batches, and every batch wakes every follower: read
// whole, each wake cost every follower the rest of the log, values and
// all (after a large bulk, hundreds of reads of megabytes per follower:
// the "list loop" of docs/scale.md). With a store that reads many keys at
// once (store.MultiGetter) it reads only the new entries and the horizon,
// so a change costs a follower that change, not the log's window of
// recent changes; seen is then the entry names the log held at next.
// Without a key watcher it reads the log whole.
func (f *Follower) readLog(ctx context.Context) (kvs []store.KV, next uint64, seen map[string]bool, missing int, err error) {
	kw, ok := f.St.(store.KeyWatcher)
	if !ok || f.logIndex == 0 || f.seen == nil {
		kvs, next, err := f.St.Watch(ctx, ClusterPrefix(f.Cluster), f.logIndex, f.Wait)
		if err == nil {
			f.stats.LogReads++
			if kvs == nil {
				kvs = []store.KV{}
			}
		}
		return kvs, next, nil, 0, err
	}
	keys, next, err := kw.WatchKeys(ctx, ClusterPrefix(f.Cluster), f.logIndex, f.Wait)
	if err != nil {
		return nil, 0, nil, 0, err
	}
	f.stats.KeyReads++
	if next <= f.logIndex {
		return nil, next, nil, 0, nil
	}
	ep := entryPrefix(f.Cluster)
	var fresh []string
	for _, k := range keys {
		if strings.HasPrefix(k, ep) && !f.seen[k] {
			fresh = append(fresh, k)
		}
	}
	if len(fresh) == 0 {
		// Forget what was pruned, so that the set stays the log's size.
		seen := make(map[string]bool, len(keys))
		for _, k := range keys {
			if f.seen[k] {
				seen[k] = true
			}
		}
		f.seen = seen
		return nil, next, nil, 0, nil
	}
	if _, ok := f.St.(store.MultiGetter); ok {
		return f.readNew(ctx, keys, fresh, next)
	}
	kvs, idx, err := f.St.List(ctx, ClusterPrefix(f.Cluster))
	if err != nil {
		return nil, 0, nil, 0, err
	}
	f.stats.LogReads++
	if kvs == nil {
		kvs = []store.KV{}
	}
	return kvs, max(idx, next), nil, unread(fresh, kvs), nil
}

// unread counts the names of fresh that kvs does not hold.
func unread(fresh []string, kvs []store.KV) int {
	got := make(map[string]bool, len(kvs))
	for _, kv := range kvs {
		got[kv.Key] = true
	}
	n := 0
	for _, k := range fresh {
		if !got[k] {
			n++
		}
	}
	return n
}

// readNew reads the entries named in fresh and the horizon, in
// transactions of store.MaxBatch keys (the horizon in the last, so that
// it is read after the entries). The index it reports is the names'
// (next), not the reads': an entry written after the names were listed
// is read at the next wake, and one that came and went meanwhile is
// caught by the horizon. An entry of fresh that is not read was pruned
// (the horizon read after it says so) or is not applied yet where the
// read was answered (missing counts them; step reads again).
func (f *Follower) readNew(ctx context.Context, keys, fresh []string, next uint64) ([]store.KV, uint64, map[string]bool, int, error) {
	kvs, reads, err := store.ReadKeys(ctx, f.St, append(fresh, HorizonKey(f.Cluster)))
	f.stats.EntryReads += reads
	if err != nil {
		return nil, 0, nil, 0, err
	}
	ep := entryPrefix(f.Cluster)
	seen := make(map[string]bool, len(keys))
	for _, k := range keys {
		if strings.HasPrefix(k, ep) {
			seen[k] = true
		}
	}
	return kvs, next, seen, unread(fresh, kvs), nil
}

// horizon reads the log's horizon (0 when there is none).
func (f *Follower) horizon(ctx context.Context) (uint64, bool, error) {
	kv, err := f.St.Get(ctx, HorizonKey(f.Cluster))
	if errors.Is(err, store.ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	h, perr := strconv.ParseUint(strings.TrimSpace(string(kv.Value)), 10, 64)
	return h, perr != nil, nil
}

// behind starts a list: the log was pruned past what was applied. Behind
// again right after a list means the list took longer than the log keeps
// its entries: the follower cannot catch up and lists in a loop, so it
// says so loudly (raise [store] ipcache_log_keep, or the store is
// overloaded: a fleet-wide start without the restart gate).
func (f *Follower) behind(horizon uint64) {
	f.stats.Behind++
	if f.fresh {
		f.stats.BehindAfterList++
		f.Log.Warn("the ipcache change log was pruned past this agent while it listed the ipcache: a list takes longer than [store] ipcache_log_keep; raise it, or look at the store's load; listing again",
			"horizon", horizon, "applied", f.base, "times", f.stats.BehindAfterList)
	} else {
		f.Log.Info("the ipcache change log was pruned past this agent; listing the ipcache again", "horizon", horizon, "applied", f.base)
	}
	f.ips = nil
}

func (f *Follower) setList(kvs []store.KV, idx uint64) {
	f.ips = make(map[string]uint64, len(kvs))
	for _, kv := range kvs {
		f.ips[kv.Key] = maphash.Bytes(f.seed, kv.Value)
	}
	f.base = idx
	f.listed = time.Now()
	f.stats.Lists++
	f.whole, f.list, f.changes = true, kvs, map[string]change{}
}

// delivery hands on what changed since the last one and forgets it.
func (f *Follower) delivery() Delivery {
	if f.whole {
		d := WholeDelivery(f.list)
		f.whole, f.list = false, nil
		clear(f.changes)
		return d
	}
	var d Delivery
	for k, c := range f.changes {
		if c.del {
			d.Removed = append(d.Removed, k)
		} else {
			d.Changed = append(d.Changed, store.KV{Key: k, Value: c.val})
		}
	}
	clear(f.changes)
	return d
}
