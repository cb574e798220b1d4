package policy

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
)

// The scale of the performance goal: 1,000 endpoints x 5,000 identities x
// 500 policies; a full computation under 2 s, one new identity under 5 ms.
const (
	benchEndpoints  = 1000
	benchIdentities = 5000
	benchPolicies   = 500
	goalFull        = 2 * time.Second
	goalIncremental = 5 * time.Millisecond
)

func benchPolicy(k int) string {
	return fmt.Sprintf(`apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p%d}
spec:
  endpointSelector: {matchLabels: {app: app%d}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: r%d}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "443", protocol: TCP}]}]
  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [app%d, app%d]}]}]
    toPorts: [{ports: [{port: "8000", endPort: 8100, protocol: TCP}]}]
  - fromEntities: [host]
  egress:
  - toEndpoints: [{matchLabels: {app: app%d}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toCIDRSet: [{cidr: 10.%d.0.0/16, except: [10.%d.1.0/24]}]
    toPorts: [{ports: [{port: "443"}]}]
  egressDeny:
  - toEntities: [world]
    toPorts: [{ports: [{port: "25", protocol: TCP}]}]
`, k, k, k%50, (k+1)%benchPolicies, (k+2)%benchPolicies, (k+3)%benchPolicies, k%50, k%50)
}

func benchIdentityLabels(i int) identity.Labels {
	return identity.MustLabels("app", fmt.Sprintf("app%d", i%benchPolicies), "role", fmt.Sprintf("r%d", i%50), "zone", fmt.Sprintf("z%d", i%10))
}

type benchInput struct {
	policies []Policy
	cidrIDs  map[identity.ID]identity.Labels
}

func newBenchInput(b *testing.B) benchInput {
	b.Helper()
	in := benchInput{cidrIDs: map[identity.ID]identity.Labels{}}
	for k := 0; k < benchPolicies; k++ {
		ps, err := Load("bench.yaml", []byte(benchPolicy(k)))
		if err != nil {
			b.Fatal(err)
		}
		in.policies = append(in.policies, ps...)
	}
	// The daemon allocates one identity per prefix the policies name.
	e := New(nil, Options{})
	if err := e.SetPolicies("bench", in.policies); err != nil {
		b.Fatal(err)
	}
	for i, p := range e.CIDRPrefixes() {
		in.cidrIDs[identity.LocalMin+identity.ID(i)] = CIDRLabels(p)
	}
	return in
}

// fullCompute builds the whole state and collects every endpoint's entries.
func fullCompute(b *testing.B, in benchInput) (*Engine, int) {
	e := New(nil, Options{})
	for i := 0; i < benchIdentities; i++ {
		e.UpsertIdentity(identity.Make(1, 256+uint32(i)), benchIdentityLabels(i))
	}
	for id, ls := range in.cidrIDs {
		e.UpsertIdentity(id, ls)
	}
	for j := 0; j < benchEndpoints; j++ {
		e.UpsertEndpoint(uint16(j+1), identity.Make(1, 256+uint32(j)), benchIdentityLabels(j), false)
	}
	if err := e.SetPolicies("bench", in.policies); err != nil {
		b.Fatal(err)
	}
	n := 0
	for _, ch := range e.Changes() {
		n += len(ch.Add)
	}
	return e, n
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkEngine reports, at the goal's scale, the full computation and
// the incremental update for one new identity, each against its goal and
// against a baseline measured in the same run: the cost of merely filling
// a Go map with as many entries as the full computation produces.
func BenchmarkEngine(b *testing.B) {
	in := newBenchInput(b)
	var entries int
	var fullTime time.Duration

	b.Run("Full", func(b *testing.B) {
		before := heapInUse()
		var e *Engine
		start := time.Now()
		for i := 0; i < b.N; i++ {
			e, entries = fullCompute(b, in)
		}
		fullTime = time.Since(start) / time.Duration(b.N)
		mem := heapInUse() - before
		runtime.KeepAlive(e)
		b.ReportMetric(float64(fullTime.Milliseconds()), "ms/full")
		b.ReportMetric(float64(mem)/(1<<20), "MB_retained")
		b.ReportMetric(float64(entries), "entries")
		b.ReportMetric(float64(fullTime)/float64(goalFull), "x_goal")
		b.Logf("full: %v for %d endpoints x %d identities x %d policies -> %d entries, %.1f MB retained (goal %v, ratio %.2f)",
			fullTime, benchEndpoints, benchIdentities+len(in.cidrIDs), benchPolicies, entries, float64(mem)/(1<<20), goalFull, float64(fullTime)/float64(goalFull))
	})

	b.Run("Baseline", func(b *testing.B) {
		n := entries
		if n == 0 {
			n = 300000
		}
		start := time.Now()
		for i := 0; i < b.N; i++ {
			m := make(map[Key]bool)
			for j := 0; j < n; j++ {
				m[Key{Identity: uint32(j), Port: uint16(j)}] = true
			}
			runtime.KeepAlive(m)
		}
		base := time.Since(start) / time.Duration(b.N)
		if fullTime > 0 {
			b.ReportMetric(float64(fullTime)/float64(base), "full/baseline")
			b.Logf("baseline: filling a map with %d entries takes %v; full computation is %.1fx that", n, base, float64(fullTime)/float64(base))
		}
	})

	b.Run("IncrementalIdentity", func(b *testing.B) {
		e, _ := fullCompute(b, in)
		b.ReportAllocs()
		b.ResetTimer()
		var total time.Duration
		changed := 0
		for i := 0; i < b.N; i++ {
			id := identity.Make(2, 256+uint32(i%100000))
			ls := benchIdentityLabels(i * 7)
			start := time.Now()
			e.UpsertIdentity(id, ls)
			for _, ch := range e.Changes() {
				changed += len(ch.Add)
			}
			total += time.Since(start)
			b.StopTimer()
			e.DeleteIdentity(id)
			e.Changes()
			b.StartTimer()
		}
		per := total / time.Duration(b.N)
		b.ReportMetric(float64(per.Microseconds()), "us/identity")
		b.ReportMetric(float64(changed)/float64(b.N), "entries/identity")
		b.ReportMetric(float64(per)/float64(goalIncremental), "x_goal")
		if fullTime > 0 {
			b.ReportMetric(float64(fullTime)/float64(per), "full/incremental")
		}
		b.Logf("incremental: one new identity in %v, %.0f entries added (goal %v, ratio %.3f)",
			per, float64(changed)/float64(b.N), goalIncremental, float64(per)/float64(goalIncremental))
	})

	b.Run("IncrementalPolicy", func(b *testing.B) {
		e, _ := fullCompute(b, in)
		b.ReportAllocs()
		b.ResetTimer()
		var total time.Duration
		for i := 0; i < b.N; i++ {
			p := in.policies[i%len(in.policies)]
			start := time.Now()
			if err := e.UpsertPolicy("extra", p); err != nil {
				b.Fatal(err)
			}
			e.Changes()
			total += time.Since(start)
			b.StopTimer()
			e.DeletePolicy("extra", p.Metadata.Name)
			e.Changes()
			b.StartTimer()
		}
		per := total / time.Duration(b.N)
		b.ReportMetric(float64(per.Microseconds()), "us/policy")
		b.Logf("incremental: one policy added in %v", per)
	})
}
