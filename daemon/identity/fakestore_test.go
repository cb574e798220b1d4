package identity

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
)

// fakeStore is an in-memory store.Store for unit tests: linearizable,
// one global index, Watch wakes on any write.
type fakeStore struct {
	mu      sync.Mutex // guards all fields
	kvs     map[string]store.KV
	index   uint64
	changed chan struct{} // closed and replaced on every write
	down    bool          // every call fails with ErrUnavailable
}

func newFakeStore() *fakeStore {
	return &fakeStore{kvs: map[string]store.KV{}, index: 1, changed: make(chan struct{})}
}

func (f *fakeStore) setDown(d bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = d
}

func (f *fakeStore) checkLocked() error {
	if f.down {
		return fmt.Errorf("fake: %w", store.ErrUnavailable)
	}
	return nil
}

func (f *fakeStore) bumpLocked() uint64 {
	f.index++
	close(f.changed)
	f.changed = make(chan struct{})
	return f.index
}

func (f *fakeStore) Get(_ context.Context, key string) (store.KV, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.checkLocked(); err != nil {
		return store.KV{}, err
	}
	kv, ok := f.kvs[key]
	if !ok {
		return store.KV{}, fmt.Errorf("get %s: %w", key, store.ErrNotFound)
	}
	return kv, nil
}

func (f *fakeStore) listLocked(prefix string) []store.KV {
	var out []store.KV
	for k, kv := range f.kvs {
		if strings.HasPrefix(k, prefix) {
			out = append(out, kv)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

func (f *fakeStore) List(_ context.Context, prefix string) ([]store.KV, uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.checkLocked(); err != nil {
		return nil, 0, err
	}
	return f.listLocked(prefix), f.index, nil
}

func (f *fakeStore) putLocked(key string, value []byte, owned bool) {
	idx := f.bumpLocked()
	old, ok := f.kvs[key]
	ci := idx
	if ok {
		ci = old.CreateIndex
	}
	owner := ""
	if owned {
		owner = "fake-session"
	}
	f.kvs[key] = store.KV{Key: key, Value: append([]byte(nil), value...), ModifyIndex: idx, CreateIndex: ci, Owner: owner}
}

func (f *fakeStore) Put(_ context.Context, key string, value []byte, opts store.PutOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.checkLocked(); err != nil {
		return err
	}
	if len(value) > store.MaxValueSize {
		return store.ErrTooLarge
	}
	f.putLocked(key, value, opts.Owned)
	return nil
}

func (f *fakeStore) CAS(_ context.Context, key string, value []byte, index uint64, opts store.PutOptions) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.checkLocked(); err != nil {
		return false, err
	}
	old, ok := f.kvs[key]
	if (index == 0 && ok) || (index != 0 && (!ok || old.ModifyIndex != index)) {
		return false, nil
	}
	f.putLocked(key, value, opts.Owned)
	return true, nil
}

func (f *fakeStore) Delete(_ context.Context, key string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.checkLocked(); err != nil {
		return err
	}
	delete(f.kvs, key)
	f.bumpLocked()
	return nil
}

func (f *fakeStore) DeleteCAS(_ context.Context, key string, index uint64) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.checkLocked(); err != nil {
		return false, err
	}
	old, ok := f.kvs[key]
	if !ok || old.ModifyIndex != index {
		return false, nil
	}
	delete(f.kvs, key)
	f.bumpLocked()
	return true, nil
}

func (f *fakeStore) Watch(ctx context.Context, prefix string, index uint64, wait time.Duration) ([]store.KV, uint64, error) {
	deadline := time.After(wait)
	for {
		f.mu.Lock()
		if err := f.checkLocked(); err != nil {
			f.mu.Unlock()
			return nil, 0, err
		}
		if index == 0 || f.index != index {
			out, idx := f.listLocked(prefix), f.index
			f.mu.Unlock()
			return out, idx, nil
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			f.mu.Lock()
			out, idx := f.listLocked(prefix), f.index
			f.mu.Unlock()
			return out, idx, nil
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
}

func (f *fakeStore) Health() store.Health { return store.Health{Backend: "fake", State: store.StateOK} }
func (f *fakeStore) Close() error         { return nil }

var _ store.Store = (*fakeStore)(nil)
