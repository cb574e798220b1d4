package identity

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store/local"
)

// TestAllocatorOnLocalStore runs the allocator and the GC (no election:
// one host) on the embedded store.
func TestAllocatorOnLocalStore(t *testing.T) {
	st, err := local.Open(filepath.Join(t.TempDir(), "store.db"), nil)
	if err != nil {
		t.Fatalf("open local store: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	got := runAllocators(t, func(i int) *Allocator { return newTestAllocator(t, st, "host-a", nil) }, 1, 200, 200, time.Minute)
	checkInvariant(t, st, got)

	a := newTestAllocator(t, st, "host-b", nil)
	ctx := context.Background()
	web := labelSet(0)
	id, isNew, err := a.Allocate(ctx, web)
	if err != nil || isNew || id != got[0][web.String()] {
		t.Fatalf("Allocate(known) = %d, %v, %v; want %d, not new", id, isNew, err, got[0][web.String()])
	}
	tmp := MustLabels("app", "tmp")
	tmpID, _, err := a.Allocate(ctx, tmp)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, tmp); err != nil {
		t.Fatal(err)
	}
	g := NewGC(st, GCOptions{DeleteGap: time.Millisecond})
	for round := 1; round <= 2; round++ {
		del, err := g.Round(ctx)
		if err != nil {
			t.Fatalf("gc round %d: %v", round, err)
		}
		if want := round == 2; want != (len(del) == 1 && del[0] == tmpID) {
			t.Fatalf("gc round %d deleted %v (tmp is %d)", round, del, tmpID)
		}
	}
}
