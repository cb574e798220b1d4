package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/rackwire/rackwire/internal/backoff"

	"github.com/rackwire/rackwire/daemon/store"
)

// Elector elects one GC leader among the hosts. Lead blocks until this
// host leads (or ctx ends) and returns a channel closed when leadership is
// lost. The Consul backend provides one built on a Consul lock; with the
// local store there is one host and no Elector is needed.
type Elector interface {
	Lead(ctx context.Context) (<-chan struct{}, error)
	Resign() error
}

// GCOptions configure the identity garbage collector.
type GCOptions struct {
	Log *slog.Logger
	// Interval between two rounds. Default 10m.
	Interval time.Duration
	// MaxDeletes per round. Default 500.
	MaxDeletes int
	// DeleteGap is the least time between two deletions. Default 20ms.
	DeleteGap time.Duration
	// Elector; nil means this host always leads (local store).
	Elector Elector
}

// GC deletes identities nobody uses. An id is deleted only when, in two
// consecutive rounds, no value key named it and its ModifyIndex stayed the
// same (an allocator that starts using an id touches it, which resets the
// count), and then only with a check-and-set delete at that index.
type GC struct {
	st   store.Store
	opts GCOptions
	log  *slog.Logger
	// unused holds, from the previous round, the ids with no value key
	// and their ModifyIndex. Owned by the goroutine running Run/Round.
	unused map[ID]uint64
}

// NewGC returns a collector; run it with Run.
func NewGC(st store.Store, opts GCOptions) *GC {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Interval <= 0 {
		opts.Interval = 10 * time.Minute
	}
	if opts.MaxDeletes <= 0 {
		opts.MaxDeletes = 500
	}
	if opts.DeleteGap <= 0 {
		opts.DeleteGap = 20 * time.Millisecond
	}
	return &GC{st: st, opts: opts, log: opts.Log.With("subsys", "identity-gc"), unused: map[ID]uint64{}}
}

// Run collects until ctx ends, leading first when an Elector is set.
func (g *GC) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		lost := make(<-chan struct{})
		if g.opts.Elector != nil {
			l, err := g.opts.Elector.Lead(ctx)
			if err != nil {
				if ctx.Err() != nil {
					break
				}
				g.log.Warn("gc election failed; retrying", "err", err)
				if sleepCtx(ctx, backoff.Jitter(g.opts.Interval/10+time.Second)) != nil {
					break
				}
				continue
			}
			lost = l
			g.log.Info("leading identity gc")
		}
		g.unused = map[ID]uint64{} // a new leader starts counting afresh
	lead:
		for {
			if _, err := g.Round(ctx); err != nil && ctx.Err() == nil {
				g.log.Warn("identity gc round failed", "err", err)
			}
			select {
			case <-ctx.Done():
				break lead
			case <-lost:
				g.log.Info("lost identity gc leadership")
				break lead
			case <-time.After(backoff.Jitter(g.opts.Interval)):
			}
		}
	}
	if g.opts.Elector != nil {
		_ = g.opts.Elector.Resign()
	}
	return nil
}

// Round runs one collection round and returns the ids it deleted.
func (g *GC) Round(ctx context.Context) ([]ID, error) {
	ids, _, err := g.st.List(ctx, store.IdentityIDPrefix)
	if err != nil {
		return nil, fmt.Errorf("list identities: %w", err)
	}
	vals, _, err := g.st.List(ctx, store.IdentityValuePrefix)
	if err != nil {
		return nil, fmt.Errorf("list value keys: %w", err)
	}
	used := map[ID]bool{}
	for _, kv := range vals {
		if len(kv.Value) > 16 {
			continue
		}
		if v, err := strconv.ParseUint(strings.TrimSpace(string(kv.Value)), 10, 32); err == nil {
			used[ID(v)] = true
		}
	}
	next := map[ID]uint64{}
	var deleted []ID
	for _, kv := range ids {
		id, ok := idOfKey(kv.Key)
		if !ok {
			continue // not ours to judge; an operator's mistake, logged by the allocators
		}
		if used[id] {
			continue
		}
		prev, seen := g.unused[id]
		if !seen || prev != kv.ModifyIndex {
			next[id] = kv.ModifyIndex
			continue
		}
		if len(deleted) >= g.opts.MaxDeletes {
			next[id] = kv.ModifyIndex
			continue
		}
		ok, err := g.st.DeleteCAS(ctx, kv.Key, kv.ModifyIndex)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return deleted, err
			}
			g.unused = next
			return deleted, fmt.Errorf("delete identity %d: %w", id, err)
		}
		if ok {
			deleted = append(deleted, id)
			g.log.Info("identity deleted: unused for two rounds", "identity", id, "labels", string(kv.Value))
		}
		if err := sleepCtx(ctx, g.opts.DeleteGap); err != nil {
			return deleted, err
		}
	}
	g.unused = next
	return deleted, nil
}
