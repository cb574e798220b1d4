// Package local is the embedded store: store.Store on one bbolt file under
// the state directory (config StorePath, /var/lib/rackwire/store.db by
// default), for a host that runs without Consul.
//
// The daemon opens it once and owns it; the file is locked while open, so a
// second agent pointed at the same file fails with an error naming it. Every
// write is one bbolt transaction, fsynced before the call returns: a write
// that returned nil survives a crash or power loss, a write that did not
// return may or may not be there, never half. After a restart the store
// holds exactly the committed keys and indexes continue from where they
// were.
//
// Indexes. A counter in the meta bucket grows by one on every write (put,
// CAS that happened, delete of an existing key); the key written gets it as
// its ModifyIndex. The index of a prefix (List, Watch) is the larger of the
// highest ModifyIndex under the prefix and the index of the last delete
// anywhere in the store, and at least 1. Any put under the prefix raises
// it (the new ModifyIndex is the largest ever) and any delete under it
// raises it, so a change always changes the index. A delete elsewhere also
// raises it: watchers then wake once and get the same keys with a new
// index. That costs a spurious wake per delete and saves keeping tombstones.
//
// Watch waits on a channel that every committed write closes and replaces,
// then recomputes the prefix index; it starts no goroutine.
//
// Bad input: an empty key, a key over MaxKeySize or a value over
// store.MaxValueSize is refused (the latter two with store.ErrTooLarge). A
// file that is not a valid store is reported with ErrCorrupt and what to do;
// bbolt panics on damaged pages are turned into that error, never a crash.
//
// Who may import it: daemon (to open the configured backend) and tests.
package local

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/rackwire/rackwire/daemon/store"
)

// ErrCorrupt: the store file is damaged or not a store file.
var ErrCorrupt = errors.New("store file corrupt")

// Limits and defaults.
const (
	// MaxKeySize bounds one key.
	MaxKeySize = 4096
	// DefaultLockTimeout is how long Open waits for another process to
	// release the file.
	DefaultLockTimeout = 5 * time.Second
	// DefaultWait is Watch's wait when the caller gives none.
	DefaultWait = 5 * time.Minute
)

var (
	bucketKV   = []byte("kv")
	bucketMeta = []byte("meta")
	metaIndex  = []byte("index")       // last index handed out
	metaDelete = []byte("last_delete") // index of the last delete
)

// Options tune Open.
type Options struct {
	// LockTimeout: how long to wait for the file lock; 0 means
	// DefaultLockTimeout.
	LockTimeout time.Duration
	Log         *slog.Logger
}

// Store is the embedded store. It is safe for concurrent use.
type Store struct {
	db    *bolt.DB
	path  string
	log   *slog.Logger
	since time.Time

	mu      sync.Mutex    // guards changed
	changed chan struct{} // closed and replaced after every committed write

	closed    chan struct{}
	closeOnce sync.Once
}

var _ store.Store = (*Store)(nil)

// Open opens (creating if needed) the store file at path with the default
// lock timeout.
func Open(path string, log *slog.Logger) (*Store, error) {
	return OpenWith(path, Options{Log: log})
}

// OpenWith opens the store file at path.
func OpenWith(path string, opts Options) (s *Store, err error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = DefaultLockTimeout
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create directory of %s: %w", path, err)
	}
	if fi, err := os.Stat(path); err == nil && !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("open %s: not a regular file; point [store] path at a file", path)
	}
	var db *bolt.DB
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true)) // see tx
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				db.Close()
			}
			s, err = nil, corrupt(path, fmt.Errorf("%v", r))
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: opts.LockTimeout})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("lock %s: still held by another process after %s; is another rackwired (or a tool) using the same [store] path or [agent] state_dir? stop it or give this agent its own state_dir: %w", path, opts.LockTimeout, err)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrInvalidMapping),
		// A file cut short (less than two pages); bbolt has no sentinel
		// error for it.
		err != nil && strings.Contains(err.Error(), "file size too small"):
		return nil, corrupt(path, err)
	case err != nil:
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKV, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("create bucket %s: %w", b, err)
			}
		}
		if v := tx.Bucket(bucketMeta).Get(metaIndex); v != nil && len(v) != 8 {
			return fmt.Errorf("meta index has %d bytes, want 8", len(v))
		}
		return nil
	})
	if err != nil {
		db.Close()
		if errors.Is(err, bolterrors.ErrIncompatibleValue) || errors.Is(err, bolterrors.ErrBucketExists) {
			return nil, corrupt(path, err)
		}
		return nil, fmt.Errorf("initialise %s: %w", path, err)
	}
	s = &Store{
		db:      db,
		path:    path,
		log:     opts.Log,
		since:   time.Now(),
		changed: make(chan struct{}),
		closed:  make(chan struct{}),
	}
	s.log.Info("local store open", "path", path)
	return s, nil
}

func corrupt(path string, err error) error {
	return fmt.Errorf("%s is not a valid store file (%v): stop rackwired, move it aside (mv %s %s.corrupt) and start again; the agent rebuilds its local state: %w",
		path, err, path, path, ErrCorrupt)
}

// Get returns key, or store.ErrNotFound.
func (s *Store) Get(ctx context.Context, key string) (store.KV, error) {
	if err := s.check(ctx); err != nil {
		return store.KV{}, err
	}
	var kv store.KV
	err := s.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketKV).Get([]byte(key))
		if v == nil {
			return fmt.Errorf("get %q: %w", key, store.ErrNotFound)
		}
		var err error
		kv, err = decode(key, v)
		return err
	})
	return kv, err
}

// List returns the keys under prefix, sorted, and the prefix index.
func (s *Store) List(ctx context.Context, prefix string) ([]store.KV, uint64, error) {
	if err := s.check(ctx); err != nil {
		return nil, 0, err
	}
	var (
		out []store.KV
		idx uint64
	)
	err := s.view(func(tx *bolt.Tx) error {
		out, idx = nil, 0
		p := []byte(prefix)
		c := tx.Bucket(bucketKV).Cursor()
		for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			if len(k) > MaxKeySize {
				// Not a key this store wrote: a damaged page. Checked
				// before the key is copied, which could ask for gigabytes.
				return fmt.Errorf("key of %d bytes under %q: %w", len(k), prefix, ErrCorrupt)
			}
			kv, err := decode(string(k), v)
			if err != nil {
				return err
			}
			idx = max(idx, kv.ModifyIndex)
			out = append(out, kv)
		}
		idx = max(idx, getU64(tx.Bucket(bucketMeta), metaDelete), 1)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return out, idx, nil
}

// Put writes key. opts.Owned has no effect on the local store.
func (s *Store) Put(ctx context.Context, key string, value []byte, opts store.PutOptions) error {
	_, err := s.write(ctx, "put", key, value, func(cur []byte) bool { return true })
	return err
}

// CAS writes key only if it does not exist (index 0) or its ModifyIndex
// still equals index, and reports whether it wrote.
func (s *Store) CAS(ctx context.Context, key string, value []byte, index uint64, opts store.PutOptions) (bool, error) {
	return s.write(ctx, "cas", key, value, func(cur []byte) bool {
		if index == 0 {
			return cur == nil
		}
		return cur != nil && modIndex(cur) == index
	})
}

// Delete removes key; a missing key is not an error and changes nothing.
func (s *Store) Delete(ctx context.Context, key string) error {
	_, err := s.remove(ctx, "delete", key, func(cur []byte) bool { return true })
	return err
}

// DeleteCAS removes key only if its ModifyIndex still equals index, and
// reports whether it did; a missing key reports false.
func (s *Store) DeleteCAS(ctx context.Context, key string, index uint64) (bool, error) {
	return s.remove(ctx, "delete-cas", key, func(cur []byte) bool { return modIndex(cur) == index })
}

// Watch blocks until the prefix index differs from index, wait elapses
// (0 means DefaultWait) or ctx ends, and returns the prefix and its index.
// It returns ctx's error when ctx ends and store.ErrClosed when the store
// is closed while waiting.
func (s *Store) Watch(ctx context.Context, prefix string, index uint64, wait time.Duration) ([]store.KV, uint64, error) {
	if index == 0 {
		return s.List(ctx, prefix)
	}
	if wait <= 0 {
		wait = DefaultWait
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		// Take the channel before reading so a write between the read
		// and the wait still wakes us.
		ch := s.changedCh()
		kvs, idx, err := s.List(ctx, prefix)
		if err != nil || idx != index {
			return kvs, idx, err
		}
		select {
		case <-ch:
		case <-timer.C:
			return s.List(ctx, prefix)
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-s.closed:
			return nil, 0, fmt.Errorf("watch %q: %w", prefix, store.ErrClosed)
		}
	}
}

// Health reports "ok" while open; the detail names the file.
func (s *Store) Health() store.Health {
	h := store.Health{
		Backend: "local",
		State:   store.StateOK,
		Since:   s.since,
		Detail:  map[string]string{"path": s.path},
	}
	select {
	case <-s.closed:
		h.State, h.Error = store.StateDegraded, store.ErrClosed.Error()
	default:
	}
	return h
}

// Close wakes every watcher with store.ErrClosed and closes the file.
// Calls after the first return nil.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.closed)
		if e := s.db.Close(); e != nil {
			err = fmt.Errorf("close %s: %w", s.path, e)
		}
	})
	return err
}

// write puts key's new value in one transaction if ok(current value, nil
// if absent) agrees, and reports whether it did.
func (s *Store) write(ctx context.Context, op, key string, value []byte, ok func(cur []byte) bool) (bool, error) {
	if err := s.check(ctx); err != nil {
		return false, err
	}
	if err := checkKey(op, key); err != nil {
		return false, err
	}
	if len(value) > store.MaxValueSize {
		return false, fmt.Errorf("%s %q: value of %d bytes exceeds %d: %w", op, key, len(value), store.MaxValueSize, store.ErrTooLarge)
	}
	wrote := false
	err := s.update(func(tx *bolt.Tx) error {
		kv, meta := tx.Bucket(bucketKV), tx.Bucket(bucketMeta)
		if !ok(kv.Get([]byte(key))) {
			return nil
		}
		next := getU64(meta, metaIndex) + 1
		rec := make([]byte, 8+len(value))
		binary.BigEndian.PutUint64(rec, next)
		copy(rec[8:], value)
		if err := kv.Put([]byte(key), rec); err != nil {
			return fmt.Errorf("%s %q: %w", op, key, err)
		}
		wrote = true
		return putU64(meta, metaIndex, next)
	})
	if err != nil {
		return false, err
	}
	if wrote {
		s.notify()
	}
	return wrote, nil
}

// remove deletes key in one transaction if it exists and ok agrees.
func (s *Store) remove(ctx context.Context, op, key string, ok func(cur []byte) bool) (bool, error) {
	if err := s.check(ctx); err != nil {
		return false, err
	}
	if err := checkKey(op, key); err != nil {
		return false, err
	}
	removed := false
	err := s.update(func(tx *bolt.Tx) error {
		kv, meta := tx.Bucket(bucketKV), tx.Bucket(bucketMeta)
		cur := kv.Get([]byte(key))
		if cur == nil || !ok(cur) {
			return nil
		}
		if err := kv.Delete([]byte(key)); err != nil {
			return fmt.Errorf("%s %q: %w", op, key, err)
		}
		removed = true
		next := getU64(meta, metaIndex) + 1
		if err := putU64(meta, metaIndex, next); err != nil {
			return err
		}
		return putU64(meta, metaDelete, next)
	})
	if err != nil {
		return false, err
	}
	if removed {
		s.notify()
	}
	return removed, nil
}

func (s *Store) check(ctx context.Context) error {
	select {
	case <-s.closed:
		return store.ErrClosed
	default:
	}
	return ctx.Err()
}

func (s *Store) view(fn func(*bolt.Tx) error) error   { return s.tx(false, fn) }
func (s *Store) update(fn func(*bolt.Tx) error) error { return s.tx(true, fn) }

// tx runs fn in a transaction, mapping a closed database to store.ErrClosed
// and a bbolt panic (a damaged page) to ErrCorrupt.
func (s *Store) tx(writable bool, fn func(*bolt.Tx) error) (err error) {
	// A damaged page can make bbolt read outside its mapping. That fault
	// is fatal to the process unless it is turned into a panic, which the
	// recover below turns into ErrCorrupt. (Deferred first, so restored
	// after the recover.)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = corrupt(s.path, fmt.Errorf("%v", r))
		}
	}()
	if writable {
		err = s.db.Update(fn)
	} else {
		err = s.db.View(fn)
	}
	if errors.Is(err, bolterrors.ErrDatabaseNotOpen) {
		return store.ErrClosed
	}
	return err
}

func (s *Store) changedCh() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *Store) notify() {
	s.mu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

func checkKey(op, key string) error {
	if key == "" {
		return fmt.Errorf("%s: empty key", op)
	}
	if len(key) > MaxKeySize {
		return fmt.Errorf("%s: key of %d bytes exceeds %d: %w", op, len(key), MaxKeySize, store.ErrTooLarge)
	}
	return nil
}

// decode copies a record out of bbolt's memory, valid only inside the tx.
// A record that no write of this store can have made (shorter than its
// index, longer than the largest value) is ErrCorrupt; the size is checked
// before the copy.
func decode(key string, v []byte) (store.KV, error) {
	if len(v) < 8 || len(v) > 8+store.MaxValueSize {
		return store.KV{}, fmt.Errorf("record of %q has %d bytes, want 8 to %d: %w", key, len(v), 8+store.MaxValueSize, ErrCorrupt)
	}
	return store.KV{Key: key, Value: bytes.Clone(v[8:]), ModifyIndex: binary.BigEndian.Uint64(v)}, nil
}

func modIndex(rec []byte) uint64 {
	if len(rec) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(rec)
}

func getU64(b *bolt.Bucket, k []byte) uint64 {
	v := b.Get(k)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func putU64(b *bolt.Bucket, k []byte, v uint64) error {
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], v)
	if err := b.Put(k, buf[:]); err != nil {
		return fmt.Errorf("write meta %s: %w", k, err)
	}
	return nil
}
