package consul

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Elector elects one leader among hosts with a Consul lock on a key under
// the store prefix (e.g. "locks/identity-gc"). It satisfies
// identity.Elector. The lock has its own short-TTL session, separate from
// the host's long-lived one, so a dead leader is replaced within a minute.
type Elector struct {
	s   *Store
	key string

	mu   sync.Mutex // guards lock
	lock *api.Lock
}

// Elector returns an elector on key (relative to the prefix).
func (s *Store) Elector(key string) *Elector { return &Elector{s: s, key: key} }

// Lead blocks until this host holds the lock or ctx ends; the returned
// channel is closed when the lock is lost.
func (e *Elector) Lead(ctx context.Context) (<-chan struct{}, error) {
	l, err := e.s.client.LockOpts(&api.LockOptions{
		Key:              e.s.full(e.key),
		Value:            []byte(e.s.opts.Node),
		SessionName:      "rackwire-lock:" + e.s.opts.Node,
		SessionTTL:       "30s",
		MonitorRetries:   5,
		MonitorRetryTime: 2 * time.Second,
		LockWaitTime:     30 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("build lock %s: %w", e.key, err)
	}
	// The lock's wait is a blocking query of up to LockWaitTime that no
	// context reaches (the stop channel is read between queries), so it
	// runs on its own: Lead returns as soon as ctx ends, and a lock the
	// abandoned wait still acquires is released at once.
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
		return nil, fmt.Errorf("acquire lock %s: %w", e.key, ctx.Err())
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
