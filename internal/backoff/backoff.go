// Package backoff is the one place that spreads retries in time: Jitter
// scales a delay by a random factor in [0.8, 1.2) so that a fleet does not
// retry in step, and Backoff doubles a delay between a floor and a cap.
// Sleep waits unless the context ends first. Every retry loop of the agent
// (store watches, the Consul session, the identity allocator and its GC,
// the publisher) uses these, so "jitter" means one thing everywhere.
//
// It imports nothing of rackwire's; anything may import it.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Jitter returns d scaled by a random factor in [0.8, 1.2).
func Jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// Random returns a uniformly random duration in [0, d).
func Random(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(d)))
}

// Sleep waits d, or until ctx ends; it reports whether the whole d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Backoff is an exponential backoff with jitter. The zero value is not
// usable; use New. It is not safe for concurrent use: each retry loop owns
// its own.
type Backoff struct {
	min, max, cur time.Duration
}

// New returns a Backoff that starts at lo and doubles up to hi.
func New(lo, hi time.Duration) *Backoff {
	if lo <= 0 {
		lo = time.Second
	}
	if hi < lo {
		hi = lo
	}
	return &Backoff{min: lo, max: hi}
}

// Next returns the next delay, jittered, and doubles the following one.
func (b *Backoff) Next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	}
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return Jitter(d)
}

// Reset starts over from the floor after a success.
func (b *Backoff) Reset() { b.cur = 0 }
