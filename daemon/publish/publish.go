// Package publish writes this host's own records to the store: the node
// record and the ipcache entries of its endpoints (owned keys, held by the
// host's session).
//
// What it owns: the wanted set of own keys with their values, and what it
// believes the store holds. Who changes it: the agent sets the wanted set
// (Set) whenever endpoints change, and reports which own keys a watch saw
// (Seen) so that keys lost with a session are written again. Only Run
// talks to the store, in its own goroutine with its own timeouts, so a
// stalled store never blocks an API call or the policy sync.
//
// On restart the set starts empty and every wanted key is written once (a
// put of an unchanged owned key is cheap; on Consul it takes the key over
// from the previous run's session). A failed write is retried with
// jittered backoff; nothing is lost.
//
// A journal (SetJournal, the ipcache change log of daemon/iplog) gets the
// writes and deletions of keys under its prefix after each pass, once they
// are in the store; changes it could not take are handed to it again on
// the next pass, before newer ones.
//
// A restart journals only what changed. Every host follows the journal,
// so a fleet-wide restart that journaled every key of every host again
// cost each host a read of every other host's entries (docs/scale.md
// "Fleet-wide restart"), for values nobody's ipcache lacked. So the first
// pass reads (store.MultiGetter: one read per 64 keys) what the store
// holds of the keys it is about to write under the journal's prefix; a
// key that already holds the wanted value is written (taken over) but not
// journaled. That is safe only if the previous run journaled every write
// it made: a run that died between a write and its journal entry left a
// value in the store that followers never saw. The journaled mark
// (SetJournaledMark, a file in the state dir) says so: it is removed
// before any write under the journal's prefix and put back after a pass
// that left nothing pending and nothing unjournaled. Without it at start
// (a crash, a first run, an older release) every key is journaled, as
// before.
package publish

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/atomicfile"
	"github.com/rackwire/rackwire/internal/backoff"
)

// Publisher is the owner described in the package doc.
type Publisher struct {
	st      store.Store
	log     *slog.Logger
	timeout time.Duration
	kick    chan struct{}

	mu        sync.Mutex        // guards want, published and groups
	want      map[string][]byte // key -> value this host wants in the store
	published map[string][]byte // key -> value written and not since lost
	groups    map[string]map[string]bool
	failing   bool

	// Set before Run; owned by Run afterwards.
	journalPrefix string
	journal       func(context.Context, []Change) error
	unjournaled   []Change // changes the journal has not taken yet
	rejournal     atomic.Bool

	// The journaled mark (package doc). Set before Run; owned by Run.
	markPath  string
	markOn    bool // the mark file exists
	trustMark bool // it existed at start: unchanged keys need no journal entry
	firstDone bool // the first pass's read of the store was made
}

// Change is one write (or deletion) of a pass, as the journal gets it.
type Change struct {
	Key     string
	Value   []byte
	Deleted bool
}

// SetJournal makes fn get every pass's changes of keys under prefix, in
// order, after they are in the store. Call it before Run.
func (p *Publisher) SetJournal(prefix string, fn func(context.Context, []Change) error) {
	p.journalPrefix, p.journal = prefix, fn
}

// SetJournaledMark names the journaled mark's file (package doc) and reads
// whether the previous run left it. Call it after SetJournal, before Run.
func (p *Publisher) SetJournaledMark(path string) {
	p.markPath = path
	_, err := os.Stat(path)
	p.markOn = err == nil
	p.trustMark = p.markOn
	if !p.markOn && !errors.Is(err, os.ErrNotExist) {
		p.log.Warn("cannot read the journaled mark; every own ipcache key is journaled again", "file", path, "err", err)
	}
}

// New returns a Publisher; timeout bounds each store call (default 5s).
func New(st store.Store, timeout time.Duration, log *slog.Logger) *Publisher {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	return &Publisher{st: st, log: log, timeout: timeout, kick: make(chan struct{}, 1),
		want: map[string][]byte{}, published: map[string][]byte{}, groups: map[string]map[string]bool{}}
}

// Set makes the wanted keys of group (e.g. "endpoints", "node") equal to
// kvs. Keys of the group not in kvs are deleted from the store.
func (p *Publisher) Set(group string, kvs map[string][]byte) {
	p.mu.Lock()
	old := p.groups[group]
	next := make(map[string]bool, len(kvs))
	changed := false
	for k, v := range kvs {
		next[k] = true
		if !bytes.Equal(p.want[k], v) {
			p.want[k] = v
			changed = true
		}
	}
	for k := range old {
		if !next[k] {
			delete(p.want, k)
			changed = true
		}
	}
	p.groups[group] = next
	p.mu.Unlock()
	if changed {
		p.Kick()
	}
}

// Seen tells the publisher what a watch holds under prefix: get looks a
// key up in the watch's whole view (called only for own keys, so that a
// watch that follows changes need not build a map of the fleet's keys).
// A published key that is missing was lost (with an expired session, or
// deleted by hand) and is written again. With reassert, a published key
// that holds another value (overwritten by someone else) is written again
// too; without it (the node record, which a duplicate host would fight
// over) an overwrite is left for the duplicate detection to report.
func (p *Publisher) Seen(prefix string, get func(key string) ([]byte, bool), reassert bool) {
	p.mu.Lock()
	lost := 0
	for k, v := range p.published {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		cur, ok := get(k)
		if ok && (!reassert || bytes.Equal(cur, v)) {
			continue
		}
		if _, wanted := p.want[k]; wanted {
			if ok {
				p.log.Warn("own key overwritten in the store by someone else; publishing it again", "key", k)
			} else {
				p.log.Info("own key vanished from the store; publishing it again", "key", k)
			}
			lost++
		}
		delete(p.published, k)
	}
	p.mu.Unlock()
	if lost > 0 {
		p.Kick()
	}
}

// Kick asks Run for a pass now.
func (p *Publisher) Kick() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Pending reports how many wanted keys are not (known to be) in the store.
func (p *Publisher) Pending() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for k, v := range p.want {
		if !bytes.Equal(p.published[k], v) {
			n++
		}
	}
	for k := range p.published {
		if _, ok := p.want[k]; !ok {
			n++
		}
	}
	return n
}

// Run writes differences until ctx ends: at once on Kick, again every
// interval, and after a failure with jittered backoff.
func (p *Publisher) Run(ctx context.Context, interval time.Duration) {
	b := backoff.New(time.Second, time.Minute)
	for {
		wait := interval
		if err := p.pass(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			if !p.failing {
				p.log.Warn("cannot publish own records to the store yet; retrying", "err", err, "pending", p.Pending())
			}
			p.failing = true
			wait = b.Next()
		} else {
			if p.failing {
				p.log.Info("own records published again")
			}
			p.failing = false
			b.Reset()
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-p.kick:
		case <-t.C:
		}
		t.Stop()
	}
}

// pass writes every wanted key not yet published and deletes published
// keys no longer wanted. It holds no lock during store calls.
// op is one write (val) or deletion of a pass.
type op struct {
	key string
	val []byte
}

func (p *Publisher) pass(ctx context.Context) error {
	p.mu.Lock()
	var puts, dels []op
	for k, v := range p.want {
		if !bytes.Equal(p.published[k], v) {
			puts = append(puts, op{k, v})
		}
	}
	for k := range p.published {
		if _, ok := p.want[k]; !ok {
			dels = append(dels, op{key: k})
		}
	}
	p.mu.Unlock()
	sort.Slice(puts, func(i, j int) bool { return puts[i].key < puts[j].key })
	var quiet map[string]bool
	if !p.firstDone && p.touchesJournal(puts, nil) {
		quiet = p.unchanged(ctx, puts)
		p.firstDone = true
	}
	if p.markOn && p.touchesJournal(puts, dels) {
		if err := os.Remove(p.markPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			p.log.Error("cannot remove the journaled mark; the next run will trust it", "file", p.markPath, "err", err)
		}
		p.markOn = false
	}
	var errs []error
	written := func(o op) {
		p.mu.Lock()
		if bytes.Equal(p.want[o.key], o.val) {
			p.published[o.key] = o.val
		}
		p.mu.Unlock()
		if !quiet[o.key] {
			p.note(o.key, o.val, false)
		}
	}
	if bp, ok := p.st.(store.OwnedBatchPutter); ok && len(puts) > 1 {
		// A start writes every own key: a few requests per batch, not up
		// to three per key (store.OwnedBatchPutter).
		for rest := puts; len(rest) > 0; {
			batch := rest[:min(len(rest), store.MaxBatch/2)]
			rest = rest[len(batch):]
			kvs := make([]store.KV, len(batch))
			for i, o := range batch {
				kvs[i] = store.KV{Key: o.key, Value: o.val}
			}
			cctx, cancel := context.WithTimeout(ctx, p.timeout)
			n, err := bp.PutOwnedBatch(cctx, kvs)
			cancel()
			for _, o := range batch[:n] {
				written(o)
			}
			if err != nil {
				errs = append(errs, err)
				break
			}
		}
	} else {
		for _, o := range puts {
			cctx, cancel := context.WithTimeout(ctx, p.timeout)
			err := p.st.Put(cctx, o.key, o.val, store.PutOptions{Owned: true})
			cancel()
			if err != nil {
				errs = append(errs, err)
				break // the store is likely down; back off rather than time out once per key
			}
			written(o)
		}
	}
	for _, o := range dels {
		if len(errs) > 0 {
			break
		}
		cctx, cancel := context.WithTimeout(ctx, p.timeout)
		err := p.st.Delete(cctx, o.key)
		cancel()
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			errs = append(errs, err)
			break
		}
		p.mu.Lock()
		if _, wanted := p.want[o.key]; !wanted {
			delete(p.published, o.key)
		}
		p.mu.Unlock()
		p.note(o.key, nil, true)
	}
	if p.journal != nil && p.rejournal.Swap(false) {
		p.mu.Lock()
		keys := make([]string, 0, len(p.published))
		for k := range p.published {
			if strings.HasPrefix(k, p.journalPrefix) {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		for _, k := range keys {
			p.unjournaled = append(p.unjournaled, Change{Key: k, Value: p.published[k]})
		}
		p.mu.Unlock()
	}
	if p.journal != nil && len(p.unjournaled) > 0 {
		cctx, cancel := context.WithTimeout(ctx, p.timeout)
		err := p.journal(cctx, p.unjournaled)
		cancel()
		if err != nil {
			errs = append(errs, err)
		} else {
			p.unjournaled = nil
		}
	}
	// The mark is made only once this run's own keys were written and
	// journaled (firstDone): a run that started without it and died
	// before that must not leave it for the next.
	if p.markPath != "" && !p.markOn && p.firstDone && len(errs) == 0 && len(p.unjournaled) == 0 && p.Pending() == 0 {
		if err := atomicfile.Write(p.markPath, []byte("every own ipcache write was journaled\n"), atomicfile.Options{Mode: 0o600}); err != nil {
			p.log.Warn("cannot write the journaled mark; the next run journals every own ipcache key again", "file", p.markPath, "err", err)
		} else {
			p.markOn = true
		}
	}
	return errors.Join(errs...)
}

// touchesJournal reports whether a pass writes or deletes a key under the
// journal's prefix.
func (p *Publisher) touchesJournal(puts, dels []op) bool {
	if p.journal == nil {
		return false
	}
	under := func(o op) bool { return strings.HasPrefix(o.key, p.journalPrefix) }
	return slices.ContainsFunc(puts, under) || slices.ContainsFunc(dels, under)
}

// unchanged returns the keys of puts under the journal's prefix that the
// store already holds with the wanted value: written, not journaled
// (package doc). Called on the first pass that writes under the prefix;
// only when the previous run left the journaled mark. A failed read
// leaves every key journaled.
func (p *Publisher) unchanged(ctx context.Context, puts []op) map[string]bool {
	if !p.trustMark {
		return nil
	}
	var keys []string
	want := map[string][]byte{}
	for _, o := range puts {
		if strings.HasPrefix(o.key, p.journalPrefix) {
			keys = append(keys, o.key)
			want[o.key] = o.val
		}
	}
	rctx, cancel := context.WithTimeout(ctx, p.timeout)
	held, _, err := store.ReadKeys(rctx, p.st, keys)
	cancel()
	if err != nil {
		p.log.Warn("cannot read the own ipcache keys the previous run left; journaling every one again", "keys", len(keys), "err", err)
		return nil
	}
	quiet := map[string]bool{}
	for _, kv := range held {
		if v, ok := want[kv.Key]; ok && bytes.Equal(kv.Value, v) {
			quiet[kv.Key] = true
		}
	}
	p.log.Info("own ipcache keys the previous run left unchanged are taken over without a journal entry", "unchanged", len(quiet), "journaled", len(keys)-len(quiet))
	return quiet
}

// Rejournal hands every published key under the journal's prefix to the
// journal again at the next pass. For a store that rewrote them by itself:
// Consul deletes a host's owned keys when its session expires and the
// store writes them back under the new session, without a journal entry,
// so a follower that listed in between would not see them come back
// (until its 30-minute re-list).
func (p *Publisher) Rejournal() {
	p.rejournal.Store(true)
	p.Kick()
}

// note queues a change that reached the store for the journal.
func (p *Publisher) note(key string, val []byte, deleted bool) {
	if p.journal != nil && strings.HasPrefix(key, p.journalPrefix) {
		p.unjournaled = append(p.unjournaled, Change{Key: key, Value: val, Deleted: deleted})
	}
}
