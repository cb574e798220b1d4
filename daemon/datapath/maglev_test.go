package datapath

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

func backendNames(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("10.%d.%d.%d:8080", i/65536, i/256%256, i%256)
	}
	return names
}

// maglevCheck verifies the invariants every table must have: complete,
// only valid indices, every backend present, spread within one slot of
// M/N... (Maglev's own bound is looser; measured here).
func maglevCheck(t *testing.T, names []string, table []int) (minShare, maxShare int) {
	t.Helper()
	if len(table) != maglevM {
		t.Fatalf("table has %d slots, want %d", len(table), maglevM)
	}
	count := make([]int, len(names))
	for s, i := range table {
		if i < 0 || i >= len(names) {
			t.Fatalf("slot %d holds %d, outside 0..%d", s, i, len(names)-1)
		}
		count[i]++
	}
	return slices.Min(count), slices.Max(count)
}

// TestMaglevSpreadAndDisruption measures, for N backends, how evenly the
// slots spread and how many slots change owner when one backend leaves
// (ideal: only the leaving backend's ~M/N slots).
func TestMaglevSpreadAndDisruption(t *testing.T) {
	for _, n := range []int{1, 2, 3, 5, 10, 50, maglevMaxBackends} {
		names := backendNames(n)
		table := maglevTable(names, maglevM)
		lo, hi := maglevCheck(t, names, table)
		if lo == 0 {
			t.Fatalf("N=%d: a backend owns no slot", n)
		}
		ideal := float64(maglevM) / float64(n)
		// Spread: within 10% of even up to maglevMaxBackends.
		if float64(hi) > ideal*1.1+1 || float64(lo) < ideal*0.9-1 {
			t.Errorf("N=%d: slots per backend %d..%d, ideal %.1f", n, lo, hi, ideal)
		}
		if n == 1 {
			continue
		}
		// Remove the middle backend.
		gone := n / 2
		rest := slices.Delete(slices.Clone(names), gone, gone+1)
		after := maglevTable(rest, maglevM)
		moved, ofGone := 0, 0
		for s := range table {
			before := names[table[s]]
			if before == names[gone] {
				ofGone++
				continue
			}
			if rest[after[s]] != before {
				moved++
			}
		}
		frac := float64(moved) / float64(maglevM-ofGone)
		t.Logf("N=%3d: slots per backend %d..%d (ideal %.1f); removing one backend moves %d of the %d slots of the others (%.2f%%)",
			n, lo, hi, ideal, moved, maglevM-ofGone, 100*frac)
		// Maglev's disruption is small but not zero; bound it loosely.
		if frac > 0.1 {
			t.Errorf("N=%d: removing one backend moved %.1f%% of the other backends' slots", n, 100*frac)
		}
	}
}

// TestMaglevOrderIndependent: the table depends on the set of names only.
func TestMaglevOrderIndependent(t *testing.T) {
	names := backendNames(7)
	a := maglevTable(names, maglevM)
	shuffled := slices.Clone(names)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	b := maglevTable(shuffled, maglevM)
	for s := range a {
		if names[a[s]] != shuffled[b[s]] {
			t.Fatalf("slot %d: %s vs %s after shuffling the input", s, names[a[s]], shuffled[b[s]])
		}
	}
	if maglevTable(nil, maglevM) != nil {
		t.Error("empty backend set gives a table")
	}
}

// FuzzMaglev: any set of distinct names up to the cap gives a complete
// table in which every backend owns slots.
func FuzzMaglev(f *testing.F) {
	f.Add(uint8(3), uint64(1))
	f.Add(uint8(maglevMaxBackends), uint64(7))
	f.Add(uint8(1), uint64(0))
	f.Fuzz(func(t *testing.T, n uint8, seed uint64) {
		k := int(n)%maglevMaxBackends + 1
		r := rand.New(rand.NewPCG(seed, seed^0x5555))
		seen := map[string]bool{}
		var names []string
		for len(names) < k {
			s := fmt.Sprintf("%d.%d.%d.%d:%d", r.IntN(256), r.IntN(256), r.IntN(256), r.IntN(256), r.IntN(65535)+1)
			if !seen[s] {
				seen[s] = true
				names = append(names, s)
			}
		}
		table := maglevTable(names, maglevM)
		lo, _ := maglevCheck(t, names, table)
		if lo == 0 {
			t.Fatalf("%d backends: one owns no slot", k)
		}
	})
}
