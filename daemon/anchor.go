package daemon

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/backoff"
)

// Anchors: a key beside each operator prefix that is often empty.
//
// The problem (measured, docs/scale.md "Fleet-wide restart, 100 agents"):
// a Consul blocking query on a prefix that holds no key carries the index
// of the whole KV store, and its wake-up is bound to the nearest key above
// it, so every write anywhere in the store wakes it. The cluster-wide
// policy and service prefixes are empty in most fleets, and during a
// fleet-wide restart every start's writes woke every agent's two watches:
// 44.6 of the 109 reads per agent in the 100-agent gated restart.
//
// The fix: the anchor, one key whose name is the prefix without its
// trailing "/" (policies/v1 beside policies/v1/, state/services/v1/<cluster>
// beside state/services/v1/<cluster>/). The watch lists that shorter
// prefix, which holds the anchor, so the prefix has an index of its own
// (the highest ModifyIndex under it) and a wake-up bound to it: the watch
// sleeps through writes elsewhere. The watch hands on only the keys under
// the real prefix.
//
// Why beside the prefix and not under it: every release lists the real
// prefix, with its "/", and reads each key there as a policy (or service).
// A key under it that is no policy would be refused by an older agent, and
// a policy refused at start keeps that agent's new endpoints closed
// (policysync). A key beside the prefix is not in any release's list of
// it: old and new agents, of this cluster or of another under the same
// store prefix, run side by side with no rollout order.
//
// What else the shorter prefix catches: keys of longer names that share
// it (policies/v10/..., a cluster named "prod2" beside "prod"). Their
// writes wake the watch, which hands on nothing new and pauses (settle).
//
// Data and who changes it: anchors are plain keys (not owned: they outlive
// every host) created only with CAS index 0, so hosts that create one at
// once write it once; nothing else writes them. An operator who deletes one
// loses only the saving; a host puts it back within anchorEvery.
//
// Only the Consul backend needs them: the embedded store's empty prefixes
// have indexes of their own (anchorLoop does nothing there; the watch is
// the same).
//
// Restart: nothing to restore. Each delivery tells the anchors whether
// the anchor is there; the first check comes anchorFirst plus a random
// part after the start, after the first deliveries. When a whole fleet
// upgrades at once, the first host's write wakes every watch, which then
// sees the anchor: only hosts that check within that moment write (a
// failed CAS each).
const (
	anchorFirst  = 10 * time.Second
	anchorSpread = 30 * time.Second
	anchorEvery  = 5 * time.Minute
)

// anchorKey is the anchor of prefix (which ends in "/").
func anchorKey(prefix string) string { return strings.TrimSuffix(prefix, "/") }

// anchorValue tells an operator who reads the key what it is.
var anchorValue = []byte("rackwire: gives the prefix below an index of its own in Consul, so that its watches sleep through other writes; holds nothing (docs/consul.md)")

// anchors tracks whether the anchored prefixes' last lists held their
// anchor.
type anchors struct {
	mu      sync.Mutex
	missing map[string]bool // anchor key -> the last list lacked it
}

// under returns the keys of kvs (a list of anchorKey(prefix)) that are
// under prefix, and records whether the anchor was there.
func (an *anchors) under(prefix string, kvs []store.KV) []store.KV {
	key := anchorKey(prefix)
	found := false
	out := kvs[:0:0]
	for _, kv := range kvs {
		switch {
		case kv.Key == key:
			found = true
		case strings.HasPrefix(kv.Key, prefix):
			out = append(out, kv)
		}
	}
	an.mu.Lock()
	defer an.mu.Unlock()
	if an.missing == nil {
		an.missing = map[string]bool{}
	}
	an.missing[key] = !found
	return out
}

// lacking returns the anchors the last lists lacked, sorted.
func (an *anchors) lacking() []string {
	an.mu.Lock()
	defer an.mu.Unlock()
	var out []string
	for k, m := range an.missing {
		if m {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// anchorLoop creates the anchors the watches found missing. Consul only.
func (a *agent) anchorLoop(ctx context.Context) {
	if a.cfg.Store.Backend != "consul" {
		return
	}
	wait := anchorFirst + backoff.Random(anchorSpread)
	for backoff.Sleep(ctx, wait) {
		wait = anchorEvery + backoff.Random(anchorEvery)
		a.createAnchors(ctx)
	}
}

// createAnchors creates the anchors the last lists lacked; it returns how
// many it wrote.
func (a *agent) createAnchors(ctx context.Context) int {
	n := 0
	for _, key := range a.anchors.lacking() {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ok, err := a.st.CAS(cctx, key, anchorValue, 0, store.PutOptions{})
		cancel()
		switch {
		case err != nil:
			a.log.Warn("cannot create the anchor of a watched prefix; its watch wakes on every write in the store until one exists", "key", key, "err", err)
		case ok:
			n++
			a.log.Info("created the anchor of a watched prefix: its watch now wakes only on its own changes", "key", key)
		}
	}
	return n
}
