package identity

import (
	"fmt"
	"sort"
	"sync"
)

// LocalAllocator hands out host-local identities (cluster byte 0, range
// LocalMin..LocalMax) for CIDR prefixes. They never leave the host and no
// store is involved; a restart starts from scratch (the caller re-allocates
// from its policies). Safe for concurrent use.
type LocalAllocator struct {
	mu       sync.Mutex // guards the fields below
	byPrefix map[string]*localUse
	byID     map[ID]string
	next     ID
	free     []ID // released ids, reused lowest first
}

type localUse struct {
	id ID
	n  int
}

// NewLocalAllocator returns an empty allocator.
func NewLocalAllocator() *LocalAllocator {
	return &LocalAllocator{byPrefix: map[string]*localUse{}, byID: map[ID]string{}, next: LocalMin}
}

// Allocate returns the identity of prefix and counts one more use.
func (l *LocalAllocator) Allocate(prefix string) (ID, bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if u := l.byPrefix[prefix]; u != nil {
		u.n++
		return u.id, false, nil
	}
	var id ID
	switch {
	case len(l.free) > 0:
		id, l.free = l.free[0], l.free[1:]
	case l.next <= LocalMax:
		id = l.next
		l.next++
	default:
		return 0, false, fmt.Errorf("allocate local identity for %s: %w", prefix, ErrExhausted)
	}
	l.byPrefix[prefix] = &localUse{id: id, n: 1}
	l.byID[id] = prefix
	return id, true, nil
}

// Release drops one use of prefix and reports whether the id was freed.
func (l *LocalAllocator) Release(prefix string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	u := l.byPrefix[prefix]
	if u == nil {
		return false
	}
	u.n--
	if u.n > 0 {
		return false
	}
	delete(l.byPrefix, prefix)
	delete(l.byID, u.id)
	i := sort.Search(len(l.free), func(i int) bool { return l.free[i] >= u.id })
	l.free = append(l.free, 0)
	copy(l.free[i+1:], l.free[i:])
	l.free[i] = u.id
	return true
}

// Lookup returns the prefix of a local identity.
func (l *LocalAllocator) Lookup(id ID) (string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	p, ok := l.byID[id]
	return p, ok
}
