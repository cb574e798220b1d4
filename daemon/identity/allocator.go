package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rackwire/rackwire/internal/backoff"

	"github.com/rackwire/rackwire/daemon/store"
)

// ErrExhausted: no free identity was found.
var ErrExhausted = errors.New("no free identity")

// AllocatorOptions configure an Allocator. Zero tuning fields take the
// defaults noted on each.
type AllocatorOptions struct {
	Node      string // this host; names its value keys
	ClusterID uint8  // 1..255, the upper 8 bits of every identity
	Log       *slog.Logger
	// WatchWait is the wait of one blocking watch call. Default 5m.
	WatchWait time.Duration
	// WatchMinInterval is the least time between two watch calls, so a
	// busy prefix cannot turn the watch into a request storm. Default 250ms.
	WatchMinInterval time.Duration
	// BackoffMin/BackoffMax bound the retry after a failed watch.
	// Default 1s/1m.
	BackoffMin, BackoffMax time.Duration
}

// Identity is one id with its labels.
type Identity struct {
	ID     ID     `json:"id"`
	Labels Labels `json:"labels"`
}

// idEntry is one id key as the cache knows it.
type idEntry struct {
	labels Labels
	canon  string
	create uint64 // CreateIndex (or ModifyIndex if the backend has none)
	modify uint64
}

// use is this host's use of one label set.
type use struct {
	id ID
	n  int
}

// Allocator maps label sets to cluster identities through a store.Store
// (Consul or the local store); docs/consul.md explains the algorithm and
// why two hosts racing on a new label set end with one id. Safe for
// concurrent use.
//
// It owns this host's value keys (state/identities/v1/value/<labels>/<node>)
// and creates id keys; it never deletes an id other than one it created a
// moment ago and lost a race with (the GC deletes the rest).
//
// On restart the reference counts start empty: the caller allocates again
// for every endpoint it restores, which finds the same ids (the cache, the
// claims) and rewrites the value keys; the Consul backend takes over keys
// the previous run's session still holds. Malformed data in the store (ids
// that are not numbers, labels that do not parse, huge values) is skipped
// with one log line per key version and never stops the watch.
type Allocator struct {
	st   store.Store
	opts AllocatorOptions
	log  *slog.Logger

	cancel context.CancelFunc
	done   chan struct{}

	// allocMu serializes the store-side steps of first uses on this
	// host, so that two local callers never race each other.
	allocMu sync.Mutex

	mu       sync.Mutex // guards the fields below
	ids      map[ID]idEntry
	byLabels map[string][]ID // canonical labels -> ids, oldest first
	refs     map[string]*use // canonical labels -> this host's use
	badSeen  map[string]uint64
	// pendingRelease: label sets whose value key delete failed.
	pendingRelease map[string]bool
	synced         chan struct{}
	isSynced       bool
	lastSync       time.Time
}

// NewAllocator returns an allocator and starts the watch that feeds its
// cache. Stop it with Close.
func NewAllocator(st store.Store, opts AllocatorOptions) (*Allocator, error) {
	if opts.Node == "" {
		return nil, errors.New("identity allocator: node name is empty")
	}
	if opts.ClusterID == 0 {
		return nil, errors.New("identity allocator: cluster id must be 1..255")
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.WatchWait <= 0 {
		opts.WatchWait = 5 * time.Minute
	}
	if opts.WatchMinInterval <= 0 {
		opts.WatchMinInterval = 250 * time.Millisecond
	}
	if opts.BackoffMin <= 0 {
		opts.BackoffMin = time.Second
	}
	if opts.BackoffMax <= 0 {
		opts.BackoffMax = time.Minute
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Allocator{
		st: st, opts: opts,
		log:    opts.Log.With("subsys", "identity", "node", opts.Node),
		cancel: cancel, done: make(chan struct{}),
		ids: map[ID]idEntry{}, byLabels: map[string][]ID{}, refs: map[string]*use{},
		badSeen: map[string]uint64{}, pendingRelease: map[string]bool{}, synced: make(chan struct{}),
	}
	go a.watchLoop(ctx)
	return a, nil
}

// Close stops the watch. It leaves this host's value keys in the store.
func (a *Allocator) Close() {
	a.cancel()
	<-a.done
}

// WaitSynced waits until the cache has seen the store once.
func (a *Allocator) WaitSynced(ctx context.Context) error {
	select {
	case <-a.synced:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for identity sync: %w", ctx.Err())
	}
}

// LastSync returns when the cache last heard from the store.
func (a *Allocator) LastSync() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lastSync
}

// Allocate returns the identity of labels, allocating one cluster-wide if
// the label set has none, and counts one more local use of it. isNew
// reports whether this call created the identity. While the store is
// unreachable, a label set the cache knows still resolves (its value key
// is written when the store is back).
func (a *Allocator) Allocate(ctx context.Context, labels Labels) (ID, bool, error) {
	canon := labels.String()
	if canon == "" {
		return 0, false, fmt.Errorf("allocate identity: %w: empty label set", ErrBadLabels)
	}
	if id, ok := a.bump(canon); ok {
		return id, false, nil
	}
	if len(store.IdentityValueKey(canon, a.opts.Node)) > 2048 {
		return 0, false, fmt.Errorf("allocate identity: %w: label set too long for a key", ErrBadLabels)
	}
	a.allocMu.Lock()
	defer a.allocMu.Unlock()
	if id, ok := a.bump(canon); ok {
		return id, false, nil
	}
	// Without one full view of the ids, a label set allocated elsewhere
	// and used by nobody right now would look new.
	if err := a.WaitSynced(ctx); err != nil {
		return 0, false, fmt.Errorf("allocate identity for %s: %w: %w", canon, store.ErrUnavailable, err)
	}
	id, isNew, err := a.resolve(ctx, canon)
	if err != nil {
		return 0, false, err
	}
	a.mu.Lock()
	a.refs[canon] = &use{id: id, n: 1}
	a.mu.Unlock()
	return id, isNew, nil
}

// bump counts one more use of a label set this host already uses.
func (a *Allocator) bump(canon string) (ID, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if u := a.refs[canon]; u != nil {
		u.n++
		return u.id, true
	}
	return 0, false
}

// Release drops one local use of labels; the last one deletes this host's
// value key (and only that).
func (a *Allocator) Release(ctx context.Context, labels Labels) error {
	canon := labels.String()
	a.mu.Lock()
	u := a.refs[canon]
	if u == nil {
		a.mu.Unlock()
		return nil
	}
	u.n--
	if u.n > 0 {
		a.mu.Unlock()
		return nil
	}
	delete(a.refs, canon)
	a.mu.Unlock()
	a.allocMu.Lock()
	defer a.allocMu.Unlock()
	a.mu.Lock()
	reused := a.refs[canon] != nil // allocated again meanwhile
	a.mu.Unlock()
	if reused {
		return nil
	}
	if err := a.st.Delete(ctx, store.IdentityValueKey(canon, a.opts.Node)); err != nil {
		// Retried by the watch loop once the store answers again.
		a.mu.Lock()
		a.pendingRelease[canon] = true
		a.mu.Unlock()
		return fmt.Errorf("release identity of %s: %w", canon, err)
	}
	return nil
}

// retryReleases deletes value keys whose release failed earlier, unless
// the label set is in use again.
func (a *Allocator) retryReleases(ctx context.Context) {
	a.mu.Lock()
	var todo []string
	for canon := range a.pendingRelease {
		if a.refs[canon] != nil {
			delete(a.pendingRelease, canon)
			continue
		}
		todo = append(todo, canon)
	}
	a.mu.Unlock()
	if len(todo) == 0 {
		return
	}
	if !a.allocMu.TryLock() {
		return // an allocation is running; the next watch round retries
	}
	defer a.allocMu.Unlock()
	for _, canon := range todo {
		a.mu.Lock()
		inUse := a.refs[canon] != nil
		a.mu.Unlock()
		if !inUse {
			if err := a.st.Delete(ctx, store.IdentityValueKey(canon, a.opts.Node)); err != nil {
				return
			}
		}
		a.mu.Lock()
		delete(a.pendingRelease, canon)
		a.mu.Unlock()
	}
}

// Lookup returns the labels of id from the cache.
func (a *Allocator) Lookup(id ID) (Labels, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e, ok := a.ids[id]; ok {
		return e.labels, true
	}
	for canon, u := range a.refs {
		if u.id == id {
			ls, err := ParseCanonical(canon)
			return ls, err == nil
		}
	}
	return nil, false
}

// LookupLabels returns the identity of a label set from the cache.
func (a *Allocator) LookupLabels(labels Labels) (ID, bool) {
	canon := labels.String()
	a.mu.Lock()
	defer a.mu.Unlock()
	if u := a.refs[canon]; u != nil {
		return u.id, true
	}
	if ids := a.byLabels[canon]; len(ids) > 0 {
		return ids[0], true
	}
	return 0, false
}

// List returns every identity the cache knows, sorted by id.
func (a *Allocator) List() []Identity {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Identity, 0, len(a.ids))
	for id, e := range a.ids {
		out = append(out, Identity{ID: id, Labels: e.labels})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// InUse returns the number of label sets this host uses.
func (a *Allocator) InUse() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.refs)
}

func (a *Allocator) cachedBest(canon string) (ID, idEntry, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if ids := a.byLabels[canon]; len(ids) > 0 {
		return ids[0], a.ids[ids[0]], true
	}
	return 0, idEntry{}, false
}

func (a *Allocator) known(id ID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.ids[id]
	return ok
}

// learn puts one id key into the cache (ahead of the watch).
func (a *Allocator) learn(id ID, canon string, kv store.KV) {
	ls, err := ParseCanonical(canon)
	if err != nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ids[id] = idEntry{labels: ls, canon: canon, create: createIndex(kv), modify: kv.ModifyIndex}
	a.reindexLocked(canon)
}

// learnNew caches an id this host just created; its indexes are not known
// yet (the watch fills them in), so it sorts as the newest.
func (a *Allocator) learnNew(id ID, canon string) {
	ls, err := ParseCanonical(canon)
	if err != nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ids[id] = idEntry{labels: ls, canon: canon, create: ^uint64(0)}
	a.reindexLocked(canon)
}

// forget drops one id from the cache (it is gone or changed in the store).
func (a *Allocator) forget(id ID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.ids[id]
	if !ok {
		return
	}
	delete(a.ids, id)
	a.reindexLocked(e.canon)
}

func (a *Allocator) reindexLocked(canon string) {
	var ids []ID
	for id, e := range a.ids {
		if e.canon == canon {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		delete(a.byLabels, canon)
		return
	}
	sort.Slice(ids, func(i, j int) bool { return older(a.ids[ids[i]], ids[i], a.ids[ids[j]], ids[j]) })
	a.byLabels[canon] = ids
}

func older(a idEntry, aid ID, b idEntry, bid ID) bool {
	if a.create != b.create {
		return a.create < b.create
	}
	return aid < bid
}

func createIndex(kv store.KV) uint64 {
	if kv.CreateIndex != 0 {
		return kv.CreateIndex
	}
	return kv.ModifyIndex
}

const maxResolveAttempts = 16

// resolve finds or creates the id of canon and writes this host's value
// key. Called with allocMu held.
func (a *Allocator) resolve(ctx context.Context, canon string) (ID, bool, error) {
	var lastErr error
	for attempt := 0; attempt < maxResolveAttempts; attempt++ {
		if attempt > 0 {
			if err := sleepCtx(ctx, backoff.Jitter(time.Duration(attempt)*10*time.Millisecond)); err != nil {
				return 0, false, fmt.Errorf("allocate identity for %s: %w", canon, err)
			}
		}
		id, isNew, err := a.tryResolve(ctx, canon)
		if err == nil {
			return id, isNew, nil
		}
		if errors.Is(err, errRetry) {
			lastErr = err
			continue
		}
		// The store cannot help now: a label set the cache knows still
		// resolves; its value key is remembered by the backend and
		// written when the store is back.
		if cid, _, ok := a.cachedBest(canon); ok && errors.Is(err, store.ErrUnavailable) {
			perr := a.st.Put(ctx, store.IdentityValueKey(canon, a.opts.Node), []byte(strconv.FormatUint(uint64(cid), 10)), store.PutOptions{Owned: true})
			a.log.Warn("store unavailable; using the cached identity", "labels", canon, "identity", cid, "err", err, "value_key_err", perr)
			return cid, false, nil
		}
		return 0, false, fmt.Errorf("allocate identity for %s: %w", canon, err)
	}
	return 0, false, fmt.Errorf("allocate identity for %s: gave up after %d attempts: %w", canon, maxResolveAttempts, lastErr)
}

var errRetry = errors.New("retry")

// tryResolve is one attempt: candidate and claim, then converge.
func (a *Allocator) tryResolve(ctx context.Context, canon string) (ID, bool, error) {
	vkey := store.IdentityValueKey(canon, a.opts.Node)
	cand, fresh, err := a.candidate(ctx, canon, vkey)
	if err != nil {
		return 0, false, err
	}
	// Converge: the oldest claim (value key) that names an identity
	// really holding these labels decides.
	claims, err := a.claims(ctx, canon)
	if err != nil {
		return 0, false, err
	}
	winner := cand
	for _, c := range claims {
		if c == cand {
			break
		}
		kv, err := a.st.Get(ctx, store.IdentityIDKey(uint32(c)))
		if errors.Is(err, store.ErrNotFound) || (err == nil && string(kv.Value) != canon) {
			a.log.Warn("a claim names an identity without these labels; ignoring it", "labels", canon, "identity", c)
			continue
		}
		if err != nil {
			return 0, false, fmt.Errorf("read claimed identity %d: %w", c, err)
		}
		a.learn(c, canon, kv)
		winner = c
		break
	}
	if winner == cand {
		return cand, fresh, nil
	}
	a.log.Debug("lost an allocation race; taking the older claim", "labels", canon, "mine", cand, "winner", winner)
	if err := a.st.Put(ctx, vkey, idBytes(winner), store.PutOptions{Owned: true}); err != nil {
		return 0, false, fmt.Errorf("rewrite value key to the winner: %w", err)
	}
	if fresh {
		a.dropFresh(ctx, cand, canon, 0)
	}
	return winner, false, nil
}

func idBytes(id ID) []byte { return []byte(strconv.FormatUint(uint64(id), 10)) }

// claimWriter is implemented by backends that can check-and-set one key
// and write one owned key in a single transaction (Consul). With others
// the allocator makes two calls, in the same order.
type claimWriter interface {
	CASPutOwned(ctx context.Context, casKey string, casValue []byte, casIndex uint64, ownedKey string, ownedValue []byte) (bool, error)
}

// casAndClaim check-and-sets the id key to canon at index (0: create) and
// then writes this host's claim vkey = id. It reports whether the
// check-and-set happened; claimed says whether the claim was written too.
func (a *Allocator) casAndClaim(ctx context.Context, id ID, canon string, index uint64, vkey string) (ok, claimed bool, err error) {
	key := store.IdentityIDKey(uint32(id))
	if cw, yes := a.st.(claimWriter); yes {
		ok, err := cw.CASPutOwned(ctx, key, []byte(canon), index, vkey, idBytes(id))
		if err != nil {
			// ok: the id key was written, the claim was not (the backend's
			// two-step fallback); the caller drops an id it created.
			return ok, false, fmt.Errorf("write %s with claim: %w", key, err)
		}
		return ok, ok, nil
	}
	ok, err = a.st.CAS(ctx, key, []byte(canon), index, store.PutOptions{})
	if err != nil {
		return false, false, fmt.Errorf("write %s: %w", key, err)
	}
	if !ok {
		return false, false, nil
	}
	if err := a.st.Put(ctx, vkey, idBytes(id), store.PutOptions{Owned: true}); err != nil {
		return true, false, fmt.Errorf("write value key: %w", err)
	}
	return true, true, nil
}

// candidate finds an id for canon and writes this host's claim on it: a
// known id is touched (so that a concurrent GC cannot delete it) in the
// same step, a new one is created in the same step.
func (a *Allocator) candidate(ctx context.Context, canon, vkey string) (ID, bool, error) {
	id, e, ok := a.cachedBest(canon)
	if !ok {
		// The cache may lag: other hosts' claims name the id.
		cs, err := a.claims(ctx, canon)
		if err != nil {
			return 0, false, err
		}
		for _, cid := range cs {
			kv, err := a.st.Get(ctx, store.IdentityIDKey(uint32(cid)))
			if err == nil && string(kv.Value) == canon {
				a.learn(cid, canon, kv)
				id, e, ok = cid, idEntry{modify: kv.ModifyIndex}, true
				break
			} else if err != nil && !errors.Is(err, store.ErrNotFound) {
				return 0, false, err
			}
		}
	}
	if ok {
		if err := a.touch(ctx, id, canon, e.modify, vkey); err != nil {
			return 0, false, err
		}
		return id, false, nil
	}
	return a.create(ctx, canon, vkey)
}

// touch rewrites a known id key with a check-and-set, so that its
// ModifyIndex changes (the GC deletes an id only if the index stayed the
// same over two rounds, so a touch between them saves it), and claims it.
func (a *Allocator) touch(ctx context.Context, id ID, canon string, index uint64, vkey string) error {
	key := store.IdentityIDKey(uint32(id))
	for i := 0; i < 4; i++ {
		ok, claimed, err := a.casAndClaim(ctx, id, canon, index, vkey)
		if err != nil {
			return err
		}
		if ok && claimed {
			return nil
		}
		kv, err := a.st.Get(ctx, key)
		if errors.Is(err, store.ErrNotFound) || (err == nil && string(kv.Value) != canon) {
			a.forget(id)
			return fmt.Errorf("identity %d is gone or changed: %w", id, errRetry)
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", key, err)
		}
		index = kv.ModifyIndex
		a.learn(id, canon, kv)
	}
	// Others touched it at the same time: it is in use and was changed
	// after our read, which protects it from the GC just as well.
	if err := a.st.Put(ctx, vkey, idBytes(id), store.PutOptions{Owned: true}); err != nil {
		return fmt.Errorf("write value key: %w", err)
	}
	return nil
}

// create picks a free id, creates its key (create-only CAS) and claims it.
func (a *Allocator) create(ctx context.Context, canon, vkey string) (ID, bool, error) {
	for i := 0; i < 32; i++ {
		local := ClusterLocalMin + rand.Uint32N(ClusterLocalMax-ClusterLocalMin+1)
		id := Make(a.opts.ClusterID, local)
		if !id.IsCluster() || a.known(id) {
			continue
		}
		ok, claimed, err := a.casAndClaim(ctx, id, canon, 0, vkey)
		if ok {
			a.learnNew(id, canon)
		}
		if err != nil {
			if ok && !claimed {
				a.dropFresh(ctx, id, canon, 0)
			}
			return 0, false, err
		}
		if !ok {
			continue // taken: another label set; the watch will tell us
		}
		return id, true, nil
	}
	return 0, false, fmt.Errorf("pick a candidate id: %w", ErrExhausted)
}

// dropFresh deletes an id this host just created and no longer needs
// (it lost the race). Only if nobody changed it since (DeleteCAS).
func (a *Allocator) dropFresh(ctx context.Context, id ID, canon string, index uint64) {
	key := store.IdentityIDKey(uint32(id))
	for i := 0; i < 5; i++ {
		if index == 0 {
			// Not read back after creation (saves a round trip on the
			// common path); read it now. Nobody else adopts a losing id:
			// adopters pick the oldest claim or the oldest id key.
			kv, err := a.st.Get(ctx, key)
			if errors.Is(err, store.ErrNotFound) || (err == nil && string(kv.Value) != canon) {
				a.forget(id)
				return
			}
			if err == nil {
				index = kv.ModifyIndex
			}
		}
		if index == 0 {
			if ctx.Err() != nil || sleepCtx(ctx, backoff.Jitter(time.Duration(i+1)*200*time.Millisecond)) != nil {
				break
			}
			continue
		}
		ok, err := a.st.DeleteCAS(ctx, key, index)
		if err == nil {
			if ok {
				a.forget(id)
			}
			return
		}
		if ctx.Err() != nil || sleepCtx(ctx, backoff.Jitter(time.Duration(i+1)*200*time.Millisecond)) != nil {
			break
		}
	}
	// Left behind: it has no value key, so the GC removes it.
	a.log.Warn("could not delete a losing identity; the GC will", "identity", id)
}

// claims returns the identities named by the value keys of canon, oldest
// key (smallest CreateIndex) first, each once. Malformed claims are
// skipped with a log line.
func (a *Allocator) claims(ctx context.Context, canon string) ([]ID, error) {
	kvs, _, err := a.st.List(ctx, store.IdentityValuePrefixFor(canon))
	if err != nil {
		return nil, fmt.Errorf("list claims: %w", err)
	}
	type claim struct {
		id  ID
		idx uint64
	}
	var cs []claim
	for _, kv := range kvs {
		if len(kv.Value) > 16 {
			a.skip(kv, "value too long")
			continue
		}
		v, err := strconv.ParseUint(strings.TrimSpace(string(kv.Value)), 10, 32)
		if err != nil || !ID(v).IsCluster() {
			a.skip(kv, "value is not a cluster identity")
			continue
		}
		cs = append(cs, claim{ID(v), createIndex(kv)})
	}
	sort.Slice(cs, func(i, j int) bool {
		if cs[i].idx != cs[j].idx {
			return cs[i].idx < cs[j].idx
		}
		return cs[i].id < cs[j].id
	})
	out := make([]ID, 0, len(cs))
	seen := map[ID]bool{}
	for _, c := range cs {
		if !seen[c.id] {
			seen[c.id] = true
			out = append(out, c.id)
		}
	}
	return out, nil
}

// skip logs a malformed key once per version.
func (a *Allocator) skip(kv store.KV, why string) {
	a.mu.Lock()
	seen := a.badSeen[kv.Key] == kv.ModifyIndex
	a.badSeen[kv.Key] = kv.ModifyIndex
	a.mu.Unlock()
	if !seen {
		a.log.Warn("skipping malformed identity data", "key", kv.Key, "reason", why, "bytes", len(kv.Value))
	}
}

// watchLoop feeds the cache from the id prefix.
func (a *Allocator) watchLoop(ctx context.Context) {
	defer close(a.done)
	var index uint64
	bo := backoff.New(a.opts.BackoffMin, a.opts.BackoffMax)
	failing := false
	for ctx.Err() == nil {
		start := time.Now()
		kvs, next, err := a.st.Watch(ctx, store.IdentityIDPrefix, index, a.opts.WatchWait)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !failing {
				a.log.Warn("identity watch failed; keeping the cached identities", "err", err)
				failing = true
			}
			if !backoff.Sleep(ctx, bo.Next()) {
				return
			}
			continue
		}
		if failing {
			a.log.Info("identity watch back")
			failing = false
		}
		bo.Reset()
		// Consul's rules: an index that goes backwards means a reset;
		// list again from 0. Never block on 0 afterwards.
		if next < index {
			index = 0
		} else {
			index = max(next, 1)
		}
		a.apply(kvs)
		a.retryReleases(ctx)
		if sleepCtx(ctx, backoff.Jitter(a.opts.WatchMinInterval)-time.Since(start)) != nil {
			return
		}
	}
}

// apply replaces the cache with one snapshot of the id prefix.
func (a *Allocator) apply(kvs []store.KV) {
	ids := make(map[ID]idEntry, len(kvs))
	for _, kv := range kvs {
		v, ok := idOfKey(kv.Key)
		if !ok || !v.IsCluster() {
			a.skip(kv, "key is not a cluster identity")
			continue
		}
		if len(kv.Value) > 64*1024 {
			a.skip(kv, "labels too long")
			continue
		}
		ls, err := ParseCanonical(string(kv.Value))
		if err != nil || len(ls) == 0 {
			a.skip(kv, "labels do not parse")
			continue
		}
		ids[ID(v)] = idEntry{labels: ls, canon: string(kv.Value), create: createIndex(kv), modify: kv.ModifyIndex}
	}
	by := map[string][]ID{}
	for id, e := range ids {
		by[e.canon] = append(by[e.canon], id)
	}
	for _, l := range by {
		sort.Slice(l, func(i, j int) bool { return older(ids[l[i]], l[i], ids[l[j]], l[j]) })
	}
	a.mu.Lock()
	a.ids, a.byLabels = ids, by
	a.lastSync = time.Now()
	if !a.isSynced {
		a.isSynced = true
		close(a.synced)
	}
	a.mu.Unlock()
}

// idOfKey parses the id of an id key. Only the form IdentityIDKey writes
// is an id: "0256" or "256 " is not 256, so that two keys never name one
// identity.
func idOfKey(key string) (ID, bool) {
	rest, ok := strings.CutPrefix(key, store.IdentityIDPrefix)
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseUint(rest, 10, 32)
	if err != nil || strconv.FormatUint(v, 10) != rest {
		return 0, false
	}
	return ID(v), true
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
