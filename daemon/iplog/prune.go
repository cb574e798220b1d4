package iplog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/backoff"
)

// Elector elects the one host that prunes (store/consul.Elector); nil on
// a single-host store.
type Elector interface {
	Lead(ctx context.Context) (<-chan struct{}, error)
	Resign() error
}

// Pruner deletes log entries older than Keep, raising the horizon first.
type Pruner struct {
	St      store.Store
	Cluster string
	Keep    time.Duration
	Elector Elector
	Log     *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Round prunes once and returns the number of entries deleted.
func (p *Pruner) Round(ctx context.Context) (int, error) {
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	kvs, _, err := p.St.List(ctx, ClusterPrefix(p.Cluster))
	if err != nil {
		return 0, fmt.Errorf("list the ipcache log: %w", err)
	}
	cutoff := now().Add(-p.Keep).UnixMilli()
	pr := parse(kvs, p.Cluster)
	var old []logged
	var top uint64
	for _, l := range pr.entries {
		// Malformed entries (Time -1) go too.
		if l.e.Time < cutoff {
			old = append(old, l)
			top = max(top, l.index)
		}
	}
	if len(old) == 0 {
		return 0, nil
	}
	sort.Slice(old, func(i, j int) bool { return old[i].index < old[j].index })
	n := 0
	// The horizon first: a follower must never miss a deleted entry
	// without knowing it. Where the store can, the horizon and the first
	// batch go in one transaction: every write under the log's prefix
	// wakes every follower (a read of the key names and one of the
	// horizon), so a round of two writes cost the fleet two wake-ups. In
	// one transaction a follower sees both or neither; it still lists
	// again when the deleted entries held something it had not applied.
	raise := top > pr.horizon || pr.badHorizon
	if txn := p.txn(); raise && txn != nil {
		// top is the highest index of all the old entries, so the horizon
		// covers whatever batch goes with it; the oldest go first.
		chunk := old[:min(len(old), store.MaxBatch-1)]
		kvs := make([]store.KV, 0, len(chunk))
		for _, l := range chunk {
			kvs = append(kvs, store.KV{Key: l.key, ModifyIndex: l.index})
		}
		set := store.KV{Key: HorizonKey(p.Cluster), Value: []byte(strconv.FormatUint(top, 10)), ModifyIndex: pr.horizonIndex}
		ok, err := txn.CASDeleteCASBatch(ctx, set, kvs)
		if err != nil {
			return 0, fmt.Errorf("raise the ipcache log horizon and delete %d entries: %w", len(kvs), err)
		}
		if ok {
			n, old, raise = len(chunk), old[len(chunk):], false
		}
		// Else the horizon or an entry changed since the list: the
		// two-write way below reads the horizon again and skips what
		// changed.
	}
	if raise {
		cur, err := p.St.Get(ctx, HorizonKey(p.Cluster))
		var idx uint64
		switch {
		case err == nil:
			idx = cur.ModifyIndex
			if h, perr := strconv.ParseUint(string(cur.Value), 10, 64); perr == nil && h >= top {
				top = h
			}
		case errors.Is(err, store.ErrNotFound):
		default:
			return 0, fmt.Errorf("read the ipcache log horizon: %w", err)
		}
		ok, err := p.St.CAS(ctx, HorizonKey(p.Cluster), []byte(strconv.FormatUint(top, 10)), idx, store.PutOptions{})
		if err != nil {
			return 0, fmt.Errorf("raise the ipcache log horizon: %w", err)
		}
		if !ok {
			return 0, errors.New("raise the ipcache log horizon: changed meanwhile; next round")
		}
	}
	// In batches where the store can (one Consul transaction of up to
	// store.MaxBatch deletions): every deletion is a change of the log
	// prefix that wakes every follower, so one by one, a large bulk woke
	// the whole fleet once per entry.
	bd, _ := p.St.(store.BatchDeleter)
	for len(old) > 0 {
		chunk := old[:min(len(old), store.MaxBatch)]
		old = old[len(chunk):]
		if bd != nil && len(chunk) > 1 {
			kvs := make([]store.KV, 0, len(chunk))
			for _, l := range chunk {
				kvs = append(kvs, store.KV{Key: l.key, ModifyIndex: l.index})
			}
			ok, err := bd.DeleteCASBatch(ctx, kvs)
			if err != nil {
				return n, fmt.Errorf("delete %d ipcache log entries: %w", len(kvs), err)
			}
			if ok {
				n += len(chunk)
				continue
			}
			// An entry changed meanwhile: one by one, skipping it.
		}
		for _, l := range chunk {
			if ok, err := p.St.DeleteCAS(ctx, l.key, l.index); err != nil {
				return n, fmt.Errorf("delete ipcache log entry %s: %w", l.key, err)
			} else if ok {
				n++
			}
		}
	}
	return n, nil
}

// txn is the store's CASBatchDeleter (Consul: the horizon and the first
// batch in one transaction), or nil: two writes.
func (p *Pruner) txn() store.CASBatchDeleter {
	t, _ := p.St.(store.CASBatchDeleter)
	return t
}

// Run prunes every Keep/2 while this host leads.
func (p *Pruner) Run(ctx context.Context) {
	every := max(p.Keep/2, time.Second)
	for ctx.Err() == nil {
		lost := make(<-chan struct{})
		if p.Elector != nil {
			l, err := p.Elector.Lead(ctx)
			if err != nil {
				if ctx.Err() != nil {
					break
				}
				p.Log.Warn("ipcache log pruner election failed; retrying", "err", err)
				backoff.Sleep(ctx, every)
				continue
			}
			lost = l
		}
	lead:
		for {
			if n, err := p.Round(ctx); err != nil && ctx.Err() == nil {
				p.Log.Warn("ipcache log prune round failed", "err", err)
			} else if n > 0 {
				p.Log.Debug("ipcache log pruned", "entries", n)
			}
			select {
			case <-ctx.Done():
				break lead
			case <-lost:
				break lead
			case <-time.After(every):
			}
		}
	}
	if p.Elector != nil {
		_ = p.Elector.Resign()
	}
}
