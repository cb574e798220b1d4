package consul

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/internal/backoff"
)

// Elector elects one leader among hosts with a Consul lock on a key under
// the store prefix (e.g. "locks/identity-gc"). It satisfies
// identity.Elector. The lock has its own short-TTL session, separate from
// the host's long-lived one, so a dead leader is replaced within a minute.
//
// Only the leader holds a session. A host that waits does not contend
// with a session of its own (what Consul's lock recipe does: a session
// renewed every 15 s and a 30 s blocking query per waiting host and lock,
// which for two locks was 9 of a host's 10 requests a minute when idle
// and 3 session creates per start; at 10,000 hosts some 1,300 renewals a
// second on the leader for nothing). It watches the lock key with a
// blocking query instead, and when the key is free (absent, or held by no
// session) waits a random part of electSpread, still watching, before it
// takes a session and tries once: the first host whose wait ends takes
// the lock, its write wakes the others, and they go back to watching, so
// a fleet that lost its leader (or restarted) creates a handful of
// sessions, not one per host. The cost: a new leader is elected up to
// electSpread after the old one is gone (plus Consul's lock delay after
// a session invalidation).
type Elector struct {
	s   *Store
	key string

	mu   sync.Mutex // guards lock
	lock *api.Lock
	// spread overrides electSpread (tests).
	spread time.Duration
}

// electSpread bounds the random wait of a host that found the lock free.
const electSpread = 10 * time.Second

// Elector returns an elector on key (relative to the prefix).
func (s *Store) Elector(key string) *Elector { return &Elector{s: s, key: key} }

// Lead blocks until this host holds the lock or ctx ends; the returned
// channel is closed when the lock is lost.
func (e *Elector) Lead(ctx context.Context) (<-chan struct{}, error) {
	spread := e.spread
	if spread <= 0 {
		spread = electSpread
	}
	bo := backoff.New(time.Second, 30*time.Second)
	var index uint64
	wait := spread // doubles after each failed try while the key stays free
	for {
		free, next, err := e.free(ctx, index, 5*time.Minute)
		if err == nil && free {
			// Free: wait a random part of spread, watching; a host
			// that takes the lock meanwhile wakes this query.
			// (never 0: a blocking query without a wait waits 5 min)
			free, next, err = e.free(ctx, next, max(backoff.Random(wait), 50*time.Millisecond))
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("acquire lock %s: %w", e.key, ctx.Err())
			}
			index = 0
			if !backoff.Sleep(ctx, bo.Next()) {
				return nil, fmt.Errorf("acquire lock %s: %w", e.key, ctx.Err())
			}
			continue
		}
		bo.Reset()
		index = next
		if !free {
			wait = spread
			continue
		}
		lost, err := e.tryLock(ctx)
		if err != nil || lost != nil {
			return lost, err
		}
		// Another host was faster (the key is held: watch it again), or
		// Consul's lock delay after a dead leader's session is on (the
		// key stays free for 15 s): wait longer before the next try, so
		// that a fleet does not take a session per host per try.
		wait = min(2*wait, 8*spread)
		index = 0
	}
}

// free reads the lock key, blocking while its index is index (for up to
// wait; index 0 returns at once), and reports whether no session holds it.
func (e *Elector) free(ctx context.Context, index uint64, wait time.Duration) (bool, uint64, error) {
	q := e.s.qopts(ctx, true)
	q.WaitIndex, q.WaitTime = index, wait
	pair, meta, err := e.s.kv.Get(e.s.full(e.key), q)
	if err != nil {
		return false, 0, err
	}
	next := nonZero(meta.LastIndex)
	if next < index {
		next = 0 // the store's index went backwards: read afresh next time
	}
	return pair == nil || pair.Session == "", next, nil
}

// tryLock takes a session and tries the lock once; it returns a nil
// channel and no error when another host holds it (or the lock delay is
// on), after destroying the session it took.
func (e *Elector) tryLock(ctx context.Context) (<-chan struct{}, error) {
	l, err := e.s.client.LockOpts(&api.LockOptions{
		Key:              e.s.full(e.key),
		Value:            []byte(e.s.opts.Node),
		SessionName:      "rackwire-lock:" + e.s.opts.Node,
		SessionTTL:       "30s",
		MonitorRetries:   5,
		MonitorRetryTime: 2 * time.Second,
		LockTryOnce:      true,
		LockWaitTime:     time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("build lock %s: %w", e.key, err)
	}
	// The attempt (a blocking query of up to LockWaitTime, or Consul's
	// lock-delay retry of 5 s) reads no context (the stop channel is read
	// between queries), so it runs on its own: Lead returns as soon as
	// ctx ends, and a lock the abandoned attempt still acquires is
	// released at once.
	type result struct {
		lost <-chan struct{}
		err  error
	}
	stop, done := make(chan struct{}), make(chan result, 1)
	go func() {
		lost, err := l.Lock(stop)
		done <- result{lost, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		close(stop)
		go func() {
			if r := <-done; r.err == nil && r.lost != nil {
				_ = l.Unlock()
			}
		}()
		return nil, fmt.Errorf("acquire lock %s: %w", e.key, ctx.Err())
	}
	if r.err != nil {
		return nil, fmt.Errorf("acquire lock %s: %w", e.key, r.err)
	}
	if r.lost == nil {
		return nil, nil // not this time
	}
	lost := r.lost
	e.mu.Lock()
	e.lock = l
	e.mu.Unlock()
	return lost, nil
}

// Resign releases the lock if held.
func (e *Elector) Resign() error {
	e.mu.Lock()
	l := e.lock
	e.lock = nil
	e.mu.Unlock()
	if l == nil {
		return nil
	}
	if err := l.Unlock(); err != nil && err != api.ErrLockNotHeld {
		return fmt.Errorf("release lock %s: %w", e.key, err)
	}
	return nil
}
