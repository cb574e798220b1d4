package policy

import (
	"fmt"
	"math/rand"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/rackwire/rackwire/daemon/identity"
)

// TestIncrementalMatchesFresh drives an engine through random sequences of
// identity, endpoint and policy changes, applying Changes to a fake
// datapath at random moments, and checks at the end that the fake maps,
// Desired, and an engine built from scratch from the final state agree.
func TestIncrementalMatchesFresh(t *testing.T) {
	var pool [][]Policy
	cases := conformanceCases()
	cases = append(cases, emptyPeerListCases()...)
	cases = append(cases, entityNoneCases()...)
	cases = append(cases, sectionCases()...)
	for _, c := range cases {
		if len(c.docs) > 0 {
			pool = append(pool, mustLoad(t, c.docs...))
		}
	}
	labelChoices := []identity.Labels{
		identity.MustLabels("app", "web"), identity.MustLabels("app", "client"), identity.MustLabels("app", "db", "tier", "backend"),
		identity.MustLabels("app", "other", "env", "prod"), identity.MustLabels("role", "batch"), identity.MustLabels("app", "web", "env", "prod"),
	}
	var ids []testIdentity
	for _, ti := range universe() {
		ids = append(ids, ti)
	}
	for i := 0; i < 8; i++ {
		ids = append(ids, testIdentity{identity.Make(3, 256+uint32(i)), labelChoices[i%len(labelChoices)]})
	}
	for seed := int64(1); seed <= 40; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			e := New(nil, Options{})
			maps := fakeMaps{}
			liveIDs := map[identity.ID]identity.Labels{}
			liveEPs := map[uint16]identity.Labels{}
			liveSrc := map[string][]Policy{}
			for step := 0; step < 300; step++ {
				switch rng.Intn(6) {
				case 0:
					ti := ids[rng.Intn(len(ids))]
					ls := ti.labels
					if !ti.id.IsReserved() && !ti.id.IsLocal() && rng.Intn(3) == 0 {
						ls = labelChoices[rng.Intn(len(labelChoices))]
					}
					e.UpsertIdentity(ti.id, ls)
					liveIDs[ti.id] = ls
				case 1:
					ti := ids[rng.Intn(len(ids))]
					e.DeleteIdentity(ti.id)
					delete(liveIDs, ti.id)
				case 2:
					ep := uint16(1 + rng.Intn(4))
					ls := labelChoices[rng.Intn(len(labelChoices))]
					e.UpsertEndpoint(ep, idWeb, ls, false)
					liveEPs[ep] = ls
				case 3:
					ep := uint16(1 + rng.Intn(4))
					e.DeleteEndpoint(ep)
					delete(liveEPs, ep)
				case 4:
					src := fmt.Sprintf("s%d", rng.Intn(4))
					ps := pool[rng.Intn(len(pool))]
					if err := e.SetPolicies(src, ps); err != nil {
						t.Fatal(err)
					}
					liveSrc[src] = ps
				case 5:
					src := fmt.Sprintf("s%d", rng.Intn(4))
					if err := e.SetPolicies(src, nil); err != nil {
						t.Fatal(err)
					}
					delete(liveSrc, src)
				}
				if rng.Intn(3) == 0 {
					maps.apply(t, e.Changes())
				}
			}
			maps.apply(t, e.Changes())

			fresh := New(nil, Options{})
			for id := range identity.Reserved() {
				fresh.DeleteIdentity(id)
			}
			for id, ls := range liveIDs {
				fresh.UpsertIdentity(id, ls)
			}
			// Reserved identities the run never touched are still there; deleted ones stay deleted.
			for id := range identity.Reserved() {
				if _, ok := liveIDs[id]; !ok {
					if _, present := e.identities[id]; present {
						fresh.UpsertIdentity(id, identity.ReservedLabels(id))
					}
				}
			}
			for src, ps := range liveSrc {
				if err := fresh.SetPolicies(src, ps); err != nil {
					t.Fatal(err)
				}
			}
			for ep, ls := range liveEPs {
				fresh.UpsertEndpoint(ep, idWeb, ls, false)
			}
			if len(maps) != len(liveEPs) {
				t.Fatalf("datapath has %d maps, want %d", len(maps), len(liveEPs))
			}
			for ep := range liveEPs {
				got, _ := e.Desired(ep)
				want, _ := fresh.Desired(ep)
				if diff := cmp.Diff(want, got); diff != "" {
					t.Fatalf("endpoint %d: incremental Desired differs from fresh (-fresh +incremental):\n%s", ep, diff)
				}
				if diff := cmp.Diff(got, maps.entries(ep)); diff != "" {
					t.Fatalf("endpoint %d: applied changes differ from Desired (-desired +applied):\n%s", ep, diff)
				}
			}
		})
	}
}
