// Package iplog is the ipcache change log: the store traffic of one
// endpoint change grows with the change, not with the fleet's state.
//
// Why: a Consul blocking query on a prefix returns the whole prefix, so
// an agent that watches state/ip/v1/<cluster>/ re-reads every entry of the
// fleet whenever one changes (300,000 entries × 10,000 hosts per change).
// With the log, an agent lists the ipcache prefix once (at start, when it
// fell behind, and every Resync as anti-entropy) and otherwise follows a
// short log of recent changes with a blocking query on the log's prefix;
// what that query returns is bounded by the changes of the last Keep, not
// by the number of entries (docs/scale.md). Where the store can (Consul),
// the blocking query asks for the key names only, and the entries are read
// when a new name appears; the pruner deletes in transactions of
// store.MaxBatch, so a prune wakes the followers once per batch, for a
// read of names; the horizon goes in the first batch's transaction
// (store.CASBatchDeleter), so a round of up to MaxBatch-1
// entries is one wake-up, not two.
//
// Layout (under the store prefix; the ipcache keys themselves are
// unchanged, so agents that only list them keep working):
//
//	state/iplog/v1/<cluster>/e/<node>/<unix-nano>-<seq>  → JSON {t, ops:[{k, v | d}]}
//	state/iplog/v1/<cluster>/horizon                     → decimal index
//
// Data and owners:
//   - Entries are written by every host (Writer, from the publisher) after
//     its ipcache keys are in the store; an entry carries the values, so a
//     follower never reads the ipcache keys to apply it. Entries are plain
//     keys (not session-bound): they outlive a dead writer until pruned.
//   - The horizon and the deletion of old entries belong to the elected
//     pruner (Pruner, one host). The horizon is raised to the highest
//     index of the entries about to be deleted before they are deleted, or
//     in the same transaction as the first of them, so a follower that has
//     not seen everything up to the horizon knows it may have missed
//     something, and lists again: no follower sees a deletion without the
//     horizon that covers it.
//   - Each agent's Follower owns its view of the ipcache keys (each key
//     with a hash of its value: the values are the consumer's), and hands
//     on what changed in it (Delivery): the whole set after a list, the
//     keys written and deleted since the last delivery otherwise, so that
//     a change costs the agent the change, not the fleet's entries.
//
// Ordering and restart: a follower that listed the ipcache prefix at
// index I applies, in index order, the entries written after I; after
// each log read it has seen everything up to that read's index. A change
// of an ipcache key and its entry have increasing indexes (the entry is
// written after the key), and an entry's values are applied as they are,
// so applying an entry twice or after its key's list is harmless. On
// restart a follower lists again; a writer that died between a key and its
// entry writes both again when it restarts (the publisher rewrites every
// own key), and Resync repairs what no writer repairs (keys deleted by a
// session's expiry have no entry; their node record goes with them, so
// the ipcache check refuses them meanwhile).
//
// Bad input: an entry that does not decode, or an op outside the ipcache
// prefix, is skipped and counted; values are checked later like listed
// ones (ipcache.Remote). A horizon that does not parse forces a list.
//
// Who may import it: daemon (wiring). It imports only daemon/store.
package iplog

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
)

// Prefix is the log's key prefix; a cluster's log is under Prefix+cluster+"/".
const Prefix = "state/iplog/v1/"

// Feature is what a node record lists in "features" when its host writes
// the log: a follower in log mode falls back to listing while any node
// lacks it (an agent of an older release is in the fleet).
const Feature = "iplog"

// ClusterPrefix is the prefix a follower watches.
func ClusterPrefix(cluster string) string { return Prefix + cluster + "/" }

// HorizonKey holds the highest index the pruner deleted.
func HorizonKey(cluster string) string { return ClusterPrefix(cluster) + "horizon" }

func entryPrefix(cluster string) string { return ClusterPrefix(cluster) + "e/" }

// Op is one change of an ipcache key.
type Op struct {
	Key    string `json:"k"`
	Value  []byte `json:"v,omitempty"`
	Delete bool   `json:"d,omitempty"`
}

// entry is the JSON value of a log key.
type entry struct {
	Time int64 `json:"t"` // unix milliseconds, the writer's clock
	Ops  []Op  `json:"ops"`
}

// maxEntry keeps an entry well below store.MaxValueSize.
const maxEntry = store.MaxValueSize / 4

// Writer appends this host's changes to the log.
type Writer struct {
	St      store.Store
	Cluster string
	Node    string
	seq     atomic.Uint64
}

// Append writes ops as one entry (several if they are large).
func (w *Writer) Append(ctx context.Context, ops []Op) error {
	for len(ops) > 0 {
		n, size := 0, 0
		for n < len(ops) && (n == 0 || size+len(ops[n].Key)+len(ops[n].Value)*4/3+32 < maxEntry) {
			size += len(ops[n].Key) + len(ops[n].Value)*4/3 + 32
			n++
		}
		now := time.Now()
		b, err := Encode(now, ops[:n])
		if err != nil {
			return err
		}
		if err := w.St.Put(ctx, EntryKey(w.Cluster, w.Node, now, w.seq.Add(1)), b, store.PutOptions{}); err != nil {
			return fmt.Errorf("append to the ipcache log: %w", err)
		}
		ops = ops[n:]
	}
	return nil
}

// EntryKey is the key of an entry written by node at t; seq tells apart
// the entries of one writer within a clock tick.
func EntryKey(cluster, node string, t time.Time, seq uint64) string {
	return fmt.Sprintf("%s%s/%019d-%d", entryPrefix(cluster), node, t.UnixNano(), seq)
}

// Encode is the value of an entry written at t.
func Encode(t time.Time, ops []Op) ([]byte, error) {
	b, err := json.Marshal(entry{Time: t.UnixMilli(), Ops: ops})
	if err != nil {
		return nil, fmt.Errorf("encode ipcache log entry: %w", err)
	}
	return b, nil
}

// parsed is a log list split into its parts.
type parsed struct {
	horizon    uint64
	badHorizon bool
	entries    []logged
	malformed  int

	// horizonIndex is the horizon key's ModifyIndex (0: no horizon yet).
	horizonIndex uint64
}

type logged struct {
	index uint64
	key   string
	e     entry
}

func parse(kvs []store.KV, cluster string) parsed {
	var p parsed
	hk, ep := HorizonKey(cluster), entryPrefix(cluster)
	for _, kv := range kvs {
		switch {
		case kv.Key == hk:
			p.horizonIndex = kv.ModifyIndex
			h, err := strconv.ParseUint(strings.TrimSpace(string(kv.Value)), 10, 64)
			if err != nil {
				p.badHorizon = true
				continue
			}
			p.horizon = h
		case strings.HasPrefix(kv.Key, ep):
			var e entry
			if len(kv.Value) > store.MaxValueSize || json.Unmarshal(kv.Value, &e) != nil {
				p.malformed++
				p.entries = append(p.entries, logged{index: kv.ModifyIndex, key: kv.Key, e: entry{Time: -1}})
				continue
			}
			p.entries = append(p.entries, logged{index: kv.ModifyIndex, key: kv.Key, e: e})
		}
	}
	return p
}
