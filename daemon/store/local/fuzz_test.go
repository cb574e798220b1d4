package local

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
)

// fuzzDir is a fresh directory for one fuzz input: on tmpfs when there is
// one, so that the fsyncs of the code under test cost nothing. A fuzz
// worker stopped at the end of -fuzztime skips its cleanups: directories
// of earlier runs older than ten minutes are removed on the first call.
func fuzzDir(t testing.TB) string {
	sweepOnce.Do(func() {
		old, _ := filepath.Glob("/dev/shm/rackwire-fuzz-*")
		for _, d := range old {
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > 10*time.Minute {
				os.RemoveAll(d)
			}
		}
	})
	if d, err := os.MkdirTemp("/dev/shm", "rackwire-fuzz-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	return t.TempDir()
}

var sweepOnce sync.Once

// storeTemplate is a store file with a few hundred keys of the real
// layout, over several pages.
func storeTemplate(t testing.TB) []byte {
	path := filepath.Join(fuzzDir(t), "template.db")
	s, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 300 {
		key := fmt.Sprintf("%s%d", store.IdentityIDPrefix, 50331648+256+i)
		if err := s.Put(ctx, key, []byte(fmt.Sprintf("app=w%d;", i)), store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 100 {
		s.Put(ctx, fmt.Sprintf("%sprod/10.250.%d.%d", store.IPPrefix, i/250, i%250+1), bytes.Repeat([]byte{'v'}, 150), store.PutOptions{})
	}
	for i := range 20 {
		s.Delete(ctx, fmt.Sprintf("%s%d", store.IdentityIDPrefix, 50331648+256+i*7))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzStoreFile damages a valid store file (bytes overwritten at an
// offset, or the file cut short) and opens and uses it. The package
// promises that a damaged file is reported with ErrCorrupt and never
// crashes the agent: no panic may escape, no call may hang, and what the
// store still answers is consistent (a key put is read back, listed
// records decode). Records decode(encode(x)) == x.
func FuzzStoreFile(f *testing.F) {
	tmpl := storeTemplate(f)
	f.Add(uint32(0), []byte{}, false)
	f.Add(uint32(0), []byte("not a bbolt file"), false)
	f.Add(uint32(4096*2+16), bytes.Repeat([]byte{0xff}, 64), false)
	f.Add(uint32(4096*3), bytes.Repeat([]byte{0}, 4096), false)
	f.Add(uint32(4096*4+100), []byte{1, 2, 3, 4, 5, 6, 7, 8}, false)
	f.Add(uint32(4096*2), []byte{}, true)
	f.Add(uint32(len(tmpl)-4096), []byte{0xde, 0xad}, true)
	f.Fuzz(func(t *testing.T, off uint32, patch []byte, cut bool) {
		b := bytes.Clone(tmpl)
		pos := int(off % uint32(len(b)+1))
		if cut {
			b = b[:pos]
		}
		copy(b[min(pos, len(b)):], patch)
		path := filepath.Join(fuzzDir(t), "store.db")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		done := make(chan string, 1)
		go func() {
			defer func() {
				if r := recover(); r != nil {
					done <- fmt.Sprintf("panic escaped: %v", r)
				}
			}()
			done <- useStore(path)
		}()
		select {
		case msg := <-done:
			if msg != "" {
				t.Fatalf("damaged store file (offset %d, %d bytes, cut %v): %s", pos, len(patch), cut, msg)
			}
		case <-time.After(8 * time.Second): // below the engine's own 10s limit per input
			t.Fatalf("damaged store file (offset %d, %d bytes, cut %v): a call hangs", pos, len(patch), cut)
		}
	})
}

// useStore opens the store at path and runs every call on it; it returns
// what went wrong, "" if nothing did.
func useStore(path string) string {
	ctx := context.Background()
	s, err := OpenWith(path, Options{LockTimeout: 200 * time.Millisecond})
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			return fmt.Sprintf("Open: %v, not ErrCorrupt", err)
		}
		return ""
	}
	defer s.Close()
	corruptOK := func(err error) bool { return err == nil || errors.Is(err, ErrCorrupt) }
	kvs, _, err := s.List(ctx, "")
	if !corruptOK(err) {
		return fmt.Sprintf("List: %v", err)
	}
	for _, kv := range kvs {
		rec := binary.BigEndian.AppendUint64(nil, kv.ModifyIndex)
		again, err := decode(kv.Key, append(rec, kv.Value...))
		if err != nil || again.Key != kv.Key || again.ModifyIndex != kv.ModifyIndex || !bytes.Equal(again.Value, kv.Value) {
			return fmt.Sprintf("record round trip of %q: %+v, %v", kv.Key, again, err)
		}
	}
	if _, err := s.Get(ctx, store.IdentityIDKey(50331648+300)); err != nil && !errors.Is(err, store.ErrNotFound) && !corruptOK(err) {
		return fmt.Sprintf("Get: %v", err)
	}
	key, val := "fuzz/key", []byte("value")
	if err := s.Put(ctx, key, val, store.PutOptions{}); err != nil {
		if !corruptOK(err) {
			return fmt.Sprintf("Put: %v", err)
		}
		return ""
	}
	kv, err := s.Get(ctx, key)
	if err != nil {
		if corruptOK(err) {
			return ""
		}
		return fmt.Sprintf("Get after Put: %v", err)
	}
	if !bytes.Equal(kv.Value, val) {
		return fmt.Sprintf("Get after Put = %q, want %q", kv.Value, val)
	}
	if ok, err := s.CAS(ctx, key, []byte("v2"), kv.ModifyIndex, store.PutOptions{}); !corruptOK(err) || (err == nil && !ok) {
		return fmt.Sprintf("CAS at the current index: %v, %v", ok, err)
	}
	if _, _, err := s.Watch(ctx, "fuzz/", 0, time.Millisecond); !corruptOK(err) {
		return fmt.Sprintf("Watch: %v", err)
	}
	if err := s.Delete(ctx, key); !corruptOK(err) {
		return fmt.Sprintf("Delete: %v", err)
	}
	for _, kv := range kvs[:min(len(kvs), 20)] {
		if _, err := s.DeleteCAS(ctx, kv.Key, kv.ModifyIndex); !corruptOK(err) {
			return fmt.Sprintf("DeleteCAS: %v", err)
		}
	}
	if _, _, err := s.List(ctx, store.IdentityIDPrefix); !corruptOK(err) {
		return fmt.Sprintf("List after writes: %v", err)
	}
	return ""
}
