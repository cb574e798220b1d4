// Package consultxn holds store operations on Consul's transaction API
// that the Consul store (daemon/store/consul) does not offer yet, for the
// one user each has. Today: Txn, store.CASBatchDeleter, for the ipcache
// change log's pruner (daemon/iplog), which raises its horizon and deletes
// the first batch of entries in one write. When the Consul store
// implements store.CASBatchDeleter itself, the pruner uses the store's and
// this package can go.
//
// Who may import it: daemon (wiring) and tests. It imports daemon/store
// and Consul's API client.
package consultxn

import (
	"context"
	"fmt"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/store"
)

// Txn is store.CASBatchDeleter on Consul's transaction API: one key's
// check-and-set and other keys' delete-cas in one transaction.
//
// KV is a client built like the store's (consul.NewAPIClient with the
// store's options), Prefix the store's key prefix (keys given are relative
// to it, as the store's are).
type Txn struct {
	KV     *api.KV
	Prefix string
}

// CASDeleteCASBatch implements store.CASBatchDeleter.
func (c Txn) CASDeleteCASBatch(ctx context.Context, set store.KV, kvs []store.KV) (bool, error) {
	if len(kvs)+1 > store.MaxBatch {
		return false, fmt.Errorf("set %s and delete %d keys in one transaction: at most %d operations", set.Key, len(kvs), store.MaxBatch)
	}
	if len(set.Value) > store.MaxValueSize {
		return false, fmt.Errorf("set %s: %w", set.Key, store.ErrTooLarge)
	}
	ops := make(api.KVTxnOps, 0, len(kvs)+1)
	ops = append(ops, &api.KVTxnOp{Verb: api.KVCAS, Key: c.Prefix + set.Key, Value: set.Value, Index: set.ModifyIndex})
	for _, kv := range kvs {
		ops = append(ops, &api.KVTxnOp{Verb: api.KVDeleteCAS, Key: c.Prefix + kv.Key, Index: kv.ModifyIndex})
	}
	ok, _, _, err := c.KV.Txn(ops, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return false, fmt.Errorf("consul transaction (set %s, delete %d keys): %w: %w", set.Key, len(kvs), store.ErrUnavailable, err)
	}
	return ok, nil
}
