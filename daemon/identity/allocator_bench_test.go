package identity

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/consultest"
)

// BenchmarkConsulAllocate measures allocations per second against one
// local Consul dev agent, next to a baseline of plain KV writes measured
// in the same run:
//   - kv-put: one plain KV write (the baseline)
//   - new: a label set no host has (create + claim + converge)
//   - known-cluster: a label set another host uses (touch + claim + converge)
//   - known-local: a label set this host already uses (refcount only)
func BenchmarkConsulAllocate(b *testing.B) {
	agent := consultest.Start(b)
	ctx := context.Background()
	s1 := newConsulStore(b, agent.HTTPAddr, "bench-1")
	s2 := newConsulStore(b, agent.HTTPAddr, "bench-2")
	a1 := newTestAllocator(b, s1, "bench-1", nil)
	a2 := newTestAllocator(b, s2, "bench-2", nil)
	if err := a1.WaitSynced(ctx); err != nil {
		b.Fatal(err)
	}
	var base float64
	report := func(b *testing.B, name string, start time.Time) {
		rate := float64(b.N) / time.Since(start).Seconds()
		b.ReportMetric(rate, "allocs/s")
		if name == "kv-put" {
			base = rate
			b.ReportMetric(1, "x_baseline")
			return
		}
		if base > 0 {
			b.ReportMetric(rate/base, "x_baseline")
		}
	}
	run := 0
	b.Run("kv-put", func(b *testing.B) {
		start := time.Now()
		for i := 0; i < b.N; i++ {
			if err := s1.Put(ctx, fmt.Sprintf("bench/%d", i), []byte("x"), store.PutOptions{}); err != nil {
				b.Fatal(err)
			}
		}
		report(b, "kv-put", start)
	})
	b.Run("new", func(b *testing.B) {
		run++
		start := time.Now()
		for i := 0; i < b.N; i++ {
			if _, _, err := a1.Allocate(ctx, MustLabels("bench", fmt.Sprintf("new-%d-%d", run, i))); err != nil {
				b.Fatal(err)
			}
		}
		report(b, "new", start)
	})
	b.Run("known-cluster", func(b *testing.B) {
		run++
		b.StopTimer()
		for i := 0; i < b.N; i++ {
			if _, _, err := a1.Allocate(ctx, MustLabels("bench", fmt.Sprintf("known-%d-%d", run, i))); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			if _, _, err := a2.Allocate(ctx, MustLabels("bench", fmt.Sprintf("known-%d-%d", run, i))); err != nil {
				b.Fatal(err)
			}
		}
		report(b, "known-cluster", start)
	})
	b.Run("known-local", func(b *testing.B) {
		ls := MustLabels("bench", "local")
		if _, _, err := a1.Allocate(ctx, ls); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for i := 0; i < b.N; i++ {
			if _, _, err := a1.Allocate(ctx, ls); err != nil {
				b.Fatal(err)
			}
		}
		report(b, "known-local", start)
	})
}
