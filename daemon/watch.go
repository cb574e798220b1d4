package daemon

import (
	"context"
	"errors"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/backoff"
)

// watch follows a prefix of the store with blocking queries, backing off
// with jitter on errors; fn gets the whole prefix after each change. fn
// runs in the watch's goroutine and must not do store I/O of its own.
// After a change it reads again no sooner than watchPace: changes of
// operators' objects (policies, services) reach the agent at once. A wake
// that changed nothing under the prefix is not handed to fn, and is
// followed by the pause of watchCoalesced (below).
func (a *agent) watch(ctx context.Context, prefix string, fn func([]store.KV)) {
	a.watchPaced(ctx, prefix, false, false, fn)
}

// watchAnchored is watch for an operator prefix that is often empty (the
// policies, the services): it lists the prefix with its anchor (anchor.go)
// and hands fn the keys under the prefix only.
func (a *agent) watchAnchored(ctx context.Context, prefix string, fn func([]store.KV)) {
	a.watchPaced(ctx, prefix, false, true, fn)
}

// watchPace bounds the read rate of a busy prefix.
const watchPace = 100 * time.Millisecond

// Coalescing the wake-ups that other hosts' starts cause. Measured with
// the fleet harness (docs/scale.md "Fleet-wide restart"), a start woke
// every running agent's watches: the node prefix (every start writes its
// node record; a read of every record per change), and the policy and
// service prefixes although nothing under them changed: on Consul a
// blocking query on an empty prefix carries the index of the whole KV
// store, so any write anywhere (a start writes tens) wakes it. The gate
// spread the starts over its window, but each start still cost a read by
// every agent of each of those prefixes.
//
// So after a change of the node prefix, and after any wake that changed
// nothing, a watch waits settleMin plus a random part of up to
// settleSpread before it reads again: a window of starts costs each agent
// about one read per 1–2 s and prefix, whatever the rate of starts, and
// the jitter keeps the fleet's reads apart. The first change after a quiet
// spell still reaches the agent at once (its read is parked in the
// store). The cost: a node record change that follows another within the
// pause, or a policy or service written within the pause after an
// unrelated write, reaches the agent up to settleMin+settleSpread (2 s)
// later.
const (
	settleMin    = time.Second
	settleSpread = time.Second
)

// settle is the pause after a coalesced wake.
func settle() time.Duration { return settleBusy(0) }

// While changes keep coming, a coalescing watch pauses longer. With the
// pause above, a window of starts (a start every 0.6 s in the 100-agent
// gated restart) still cost every agent a read of every node record per
// 1–2 s: 21 of the node prefix per agent in that restart, the largest
// kind left once the anchors and the journal of changes only were in
// (docs/scale.md). A read that returns at once after a pause found
// changes piled up during it: the prefix is busy, and the next pause
// doubles its floor, up to settleMax (1–2 s, 2–3 s, then 4–5 s). A read
// that waited (busyRead or more) resets it. The cost: during sustained
// churn of node records, a node record change reaches the agent up to
// settleMax+settleSpread (5 s) later; a change after a quiet spell still
// at once.
const (
	settleMax = 4 * time.Second
	busyRead  = 250 * time.Millisecond
)

// settleBusy is the pause after a change of a coalescing watch that has
// found changes waiting busy times in a row.
func settleBusy(busy int) time.Duration {
	return min(settleMin<<min(busy, 3), settleMax) + backoff.Random(settleSpread)
}

// watchCoalesced is watch for a prefix that other hosts' starts change
// (node records): after every change it waits settleBusy before it reads
// again.
func (a *agent) watchCoalesced(ctx context.Context, prefix string, fn func([]store.KV)) {
	a.watchPaced(ctx, prefix, true, false, fn)
}

// watchPaced is watch; coalesce: settle after every change; anchored:
// list the prefix with its anchor (watchAnchored).
func (a *agent) watchPaced(ctx context.Context, prefix string, coalesce, anchored bool, fn func([]store.KV)) {
	listed := prefix
	if anchored {
		listed = anchorKey(prefix)
	}
	sleep := a.watchSleep
	if sleep == nil {
		sleep = backoff.Sleep
	}
	var index uint64
	var last []store.KV // what fn got last; nil: nothing yet
	busy := 0           // reads in a row that found changes waiting (settleBusy)
	bo := backoff.New(time.Second, time.Minute)
	for ctx.Err() == nil {
		began := time.Now()
		kvs, next, err := a.st.Watch(ctx, listed, index, 5*time.Minute)
		waited := time.Since(began) >= busyRead
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			wait := bo.Next()
			a.log.Warn("store watch failed; keeping the last known state", "prefix", prefix, "err", err, "retry_in", wait)
			a.retryWait(ctx, wait)
			continue
		}
		bo.Reset()
		if next < index {
			// The store's index went backwards (a restored snapshot):
			// start over.
			next = 0
		}
		if next == index && index != 0 {
			continue
		}
		index = next
		if anchored {
			kvs = a.anchors.under(prefix, kvs)
		}
		if last != nil && sameKVs(last, kvs) {
			// The store's index moved for a write elsewhere.
			sleep(ctx, settle())
			continue
		}
		if kvs == nil {
			kvs = []store.KV{}
		}
		first := last == nil
		last = kvs
		fn(kvs)
		if coalesce {
			if first || waited {
				busy = 0
			} else {
				busy++
			}
			sleep(ctx, settleBusy(busy))
		} else {
			sleep(ctx, watchPace)
		}
	}
}

// sameKVs reports whether two lists of a prefix hold the same keys at the
// same indexes.
func sameKVs(a, b []store.KV) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Key != b[i].Key || a[i].ModifyIndex != b[i].ModifyIndex {
			return false
		}
	}
	return true
}

// retryWait waits d before a failed watch is retried, but returns early,
// after a random delay of up to 5s, once the store reports itself healthy
// again: recovery takes seconds rather than a full backoff, and a fleet
// does not come back in one burst.
func (a *agent) retryWait(ctx context.Context, d time.Duration) {
	deadline := time.Now().Add(d)
	wasOK := a.st.Health().State == store.StateOK
	for time.Now().Before(deadline) {
		if !backoff.Sleep(ctx, min(500*time.Millisecond, time.Until(deadline))) {
			return
		}
		ok := a.st.Health().State == store.StateOK
		if ok && !wasOK {
			backoff.Sleep(ctx, min(backoff.Random(5*time.Second), time.Until(deadline)))
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
	session := a.st.Health().Detail["session"]
	for {
		if !backoff.Sleep(ctx, 5*time.Second+backoff.Random(5*time.Second)) {
			return
		}
		// A new session after an expired one: the store wrote the owned
		// keys back by itself; their change-log entries are written again
		// (publish.Rejournal).
		if s := a.st.Health().Detail["session"]; s != "" && s != session {
			if session != "" {
				a.log.Info("new store session; the change log gets this host's ipcache keys again", "session", s)
				a.pub.Rejournal()
			}
			session = s
		}
		if a.st.Health().State == store.StateOK {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := a.st.Get(pctx, key)
		cancel()
		if err == nil || errors.Is(err, store.ErrNotFound) {
			a.log.Info("store answers again; watches resume", "health", a.st.Health().State)
			a.pub.Kick()
		}
	}
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

// pruneIPLog runs the ipcache change log's pruner on the elected host (on
// Consul only: the log is written there only).
func (a *agent) pruneIPLog(ctx context.Context) {
	e, ok := a.st.(interface {
		Elector(string) *consul.Elector
	})
	if !ok {
		return
	}
	p := &iplog.Pruner{St: a.st, Cluster: a.cfg.Node.Cluster, Keep: a.cfg.Store.IPCacheLogKeep.Duration,
		Elector: e.Elector("locks/iplog-prune"), Log: a.log.With("subsys", "iplog-prune")}
	// The Consul store raises the horizon and deletes the first batch in
	// one transaction (store.CASBatchDeleter): one wake-up of every
	// follower per round, not two.
	p.Run(ctx)
}
