// Package store is the key-value store behind rackwire's shared state:
// identities, the ipcache, nodes and cluster-wide policies, laid out as in
// docs/consul.md "Keys". It defines the small interface that both
// backends implement — the embedded local store (store/local, the default,
// one host, no Consul) and Consul (store/consul) — and the key layout.
//
// Semantics both backends keep:
//   - Every key has a ModifyIndex that grows on every write of that key; a
//     prefix has an index that grows on every write under it (List/Watch).
//   - CAS with index 0 creates a key only if it does not exist; otherwise it
//     writes only if the key's ModifyIndex still equals index.
//   - Owned keys belong to this host: on Consul they are bound to the host's
//     session and vanish when the host is gone for longer than the session
//     TTL; on the local store they are ordinary keys.
//   - Watch is a blocking list: it returns once the prefix index differs from
//     the one given (or the wait elapsed), with the whole prefix.
//
// Who may import it: everything in daemon/ that reads or writes shared state.
// It imports nothing of rackwire's and no BPF or netlink package.
package store

import (
	"context"
	"errors"
	"time"
)

// Sentinel errors; backends wrap them.
var (
	// ErrNotFound: the key does not exist.
	ErrNotFound = errors.New("key not found")
	// ErrUnavailable: the store cannot be reached now; callers keep their
	// last known state and retry with backoff.
	ErrUnavailable = errors.New("store unavailable")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store closed")
	// ErrTooLarge: the value exceeds MaxValueSize.
	ErrTooLarge = errors.New("value too large")
	// ErrFiltered: the store left keys out of a list because this agent
	// may not read them (Consul ACLs filter silently). A filtered list is
	// not a complete one, and is never used as if it were.
	ErrFiltered = errors.New("list filtered by the store's access rules")
)

// MaxValueSize bounds one value (Consul's default KV limit is 512 KiB).
const MaxValueSize = 512 * 1024

// KV is one key with its value.
type KV struct {
	Key         string `json:"key"`
	Value       []byte `json:"value"`
	ModifyIndex uint64 `json:"modify_index"`
	// CreateIndex is the index at which the key was created; it does not
	// change on later writes. Backends that cannot tell leave it 0 and
	// readers fall back to ModifyIndex.
	CreateIndex uint64 `json:"create_index,omitempty"`
	// Owner is the session (Consul) that holds the key, "" if none.
	Owner string `json:"owner,omitempty"`
}

// PutOptions tune a write.
type PutOptions struct {
	// Owned binds the key to this host (Consul session); see package doc.
	Owned bool
}

// Store is what the agent needs from a key-value store. Keys are relative
// to the configured prefix; backends add it.
type Store interface {
	Get(ctx context.Context, key string) (KV, error)
	// List returns every key under prefix, sorted, and the prefix index.
	List(ctx context.Context, prefix string) ([]KV, uint64, error)
	Put(ctx context.Context, key string, value []byte, opts PutOptions) error
	// CAS reports whether the write happened; see package doc.
	CAS(ctx context.Context, key string, value []byte, index uint64, opts PutOptions) (bool, error)
	Delete(ctx context.Context, key string) error
	// DeleteCAS deletes key only if its ModifyIndex still equals index.
	DeleteCAS(ctx context.Context, key string, index uint64) (bool, error)
	// Watch blocks until the index of prefix differs from index, wait
	// elapses or ctx ends, then returns the whole prefix and its index.
	// index 0 returns at once.
	Watch(ctx context.Context, prefix string, index uint64, wait time.Duration) ([]KV, uint64, error)
	// Health reports the backend's current state for `rackwire status`.
	Health() Health
	Close() error
}

// BatchDeleter is implemented by backends that delete many keys in one
// write (Consul: one transaction). DeleteCASBatch deletes every key whose
// ModifyIndex still equals the one given, or none and reports false.
// Callers fall back to DeleteCAS one key at a time on false.
type BatchDeleter interface {
	DeleteCASBatch(ctx context.Context, kvs []KV) (bool, error)
}

// CASBatchDeleter is implemented by backends that can check-and-set one
// key and delete-cas others in one write (Consul: one transaction).
// CASDeleteCASBatch writes set.Value to set.Key if its ModifyIndex still
// equals set.ModifyIndex (0: only if the key does not exist) and deletes
// every key of kvs whose ModifyIndex still equals the one given; all of
// it or nothing, reporting false when a check failed. At most MaxBatch
// operations in all (the set counts). The change log's pruner raises its
// horizon and deletes the first batch with it: one change of the log's
// prefix, so one wake-up of every follower, where two writes were two.
type CASBatchDeleter interface {
	CASDeleteCASBatch(ctx context.Context, set KV, kvs []KV) (bool, error)
}

// MaxBatch is the most keys one DeleteCASBatch takes (Consul's limit of
// operations per transaction).
const MaxBatch = 64

// KeyWatcher is implemented by backends that can watch a prefix's key
// names without the values (Consul: ?keys). WatchKeys is Watch without
// the values: what one change of a large prefix costs a reader that only
// needs to know whether new keys appeared.
type KeyWatcher interface {
	WatchKeys(ctx context.Context, prefix string, index uint64, wait time.Duration) ([]string, uint64, error)
}

// OwnedBatchPutter is implemented by backends that write several owned
// keys (PutOptions{Owned: true}) in few requests (Consul: one read of the
// keys' holders and one transaction per MaxBatch/2 keys, taking over the
// keys the host's previous session still holds, where Put costs up to
// three requests per key). PutOwnedBatch writes kvs in order, at most
// MaxBatch/2 of them, and returns how many were written before an error.
// A host's start writes all its endpoints' keys at once: 300 endpoints
// were 900 requests per host, in a fleet-wide restart 900 per second per
// host the gate lets through.
type OwnedBatchPutter interface {
	PutOwnedBatch(ctx context.Context, kvs []KV) (int, error)
}

// MultiGetter is implemented by backends that read several keys in one
// request (Consul: a read-only transaction). GetMany returns the keys that
// exist, in no order (missing ones are left out), and the store's index
// of the read; it takes at most MaxBatch keys. The ipcache change log
// reads only the entries it has not seen with it, instead of the whole log.
type MultiGetter interface {
	GetMany(ctx context.Context, keys []string) ([]KV, uint64, error)
}

// ReadKeys reads keys, in order of the batches: with MultiGetter in reads
// of MaxBatch keys, else one Get per key. Missing keys are left out. It
// returns the requests made, also on error.
func ReadKeys(ctx context.Context, st Store, keys []string) ([]KV, int, error) {
	out := make([]KV, 0, len(keys))
	reads := 0
	if mg, ok := st.(MultiGetter); ok {
		for len(keys) > 0 {
			n := min(len(keys), MaxBatch)
			got, _, err := mg.GetMany(ctx, keys[:n])
			if err != nil {
				return nil, reads, err
			}
			reads++
			out = append(out, got...)
			keys = keys[n:]
		}
		return out, reads, nil
	}
	for _, k := range keys {
		kv, err := st.Get(ctx, k)
		reads++
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, reads, err
		}
		out = append(out, kv)
	}
	return out, reads, nil
}

// Health is the store's state as the operator sees it.
type Health struct {
	Backend string    `json:"backend"`
	State   string    `json:"state"` // "ok", "degraded", "connecting"
	Since   time.Time `json:"since"`
	Error   string    `json:"error,omitempty"`
	// Detail holds backend specifics (Consul leader, session, path, ...).
	Detail map[string]string `json:"detail,omitempty"`
}

// Health states.
const (
	StateOK         = "ok"
	StateDegraded   = "degraded"
	StateConnecting = "connecting"
)
