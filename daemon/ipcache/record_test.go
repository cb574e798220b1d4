package ipcache

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
)

// randomRecord is an ipcache record as a publisher (or something else)
// might write it: strings with characters JSON escapes, numbers at the
// edges, fields left out.
func randomRecord(r *rand.Rand) store.IPEntry {
	pieces := []string{"10.1.2.3", "fd00::1", "node-7", "<&>", `"`, `\`, "\n", "é", "\u2028", "", " ", "a"}
	s := func() string {
		out := ""
		for range r.IntN(3) {
			out += pieces[r.IntN(len(pieces))]
		}
		return out
	}
	nums := []uint32{0, 1, 9, 10, 16777516, 1<<32 - 1, r.Uint32()}
	return store.IPEntry{IP: s(), Identity: nums[r.IntN(len(nums))], HostIP: s(), Node: s(),
		Endpoint: nums[r.IntN(len(nums))], LabelsHash: s()}
}

// TestDecodeIPRecordSameAsJSON: the one-pass decoder reads what the
// publisher writes, as encoding/json reads it, and gives up on every
// other shape rather than guess.
func TestDecodeIPRecordSameAsJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	fast := 0
	for range 2000 {
		e := randomRecord(r)
		b, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		got, ok := decodeIPRecord(b)
		if !ok {
			continue
		}
		fast++
		var want store.IPEntry
		if err := json.Unmarshal(b, &want); err != nil || got != want {
			t.Fatalf("%s: one pass %+v, encoding/json %+v (%v)", b, got, want, err)
		}
	}
	if fast < 100 {
		t.Fatalf("only %d of 2,000 records decoded in one pass; want the plain ones", fast)
	}
	b, _ := json.Marshal(store.IPEntry{IP: "10.9.0.1", Identity: 16777516, HostIP: "172.16.0.1", Node: "fl-001", Endpoint: 3, LabelsHash: "ab12"})
	if _, ok := decodeIPRecord(b); !ok {
		t.Fatalf("%s, as the publisher writes it: not decoded in one pass", b)
	}
	for _, doc := range []string{
		`{"ip":"10.0.0.1","identity":1,"host_ip":"","node":"n"} `, // trailing space
		`{"identity":1,"ip":"10.0.0.1","host_ip":"","node":"n"}`,  // order
		`{"ip":"10.0.0.1","identity":4294967296,"host_ip":"","node":"n"}`,
		`{"ip":"10.0.0.1","identity":01,"host_ip":"","node":"n"}`,
		`{"ip":"10.0.0.1","identity":1e3,"host_ip":"","node":"n"}`,
		`{"ip":"10.0.0.1","identity":-1,"host_ip":"","node":"n"}`,
		`{"ip":"10.0.0.1","identity":1,"host_ip":"","node":"n","x":1}`,
		`{"ip":"10.0.0.1","identity":1,"host_ip":"","node":"n\u0041"}`,
		`{"ip":"10.0.0.1","identity":1,"host_ip":null,"node":"n"}`,
		`{"ip":"10.0.0.1","identity":1,"host_ip":"","node":"n"}}`,
		`{"ip":"10.0.0.1","identity":1,"host_ip":"","node":"é"}`,
		``, `{`, `null`,
	} {
		if r, ok := decodeIPRecord([]byte(doc)); ok {
			t.Errorf("%s: decoded as %+v, want it left to encoding/json", doc, r)
		}
	}
}

// FuzzDecodeIPRecord: whatever the bytes, the one pass gives up or gives
// exactly what encoding/json gives.
func FuzzDecodeIPRecord(f *testing.F) {
	r := rand.New(rand.NewPCG(7, 8))
	for range 8 {
		b, _ := json.Marshal(randomRecord(r))
		f.Add(b)
	}
	f.Add([]byte(`{"ip":"10.0.0.1","identity":4294967295,"host_ip":"172.16.0.1","node":"n","endpoint":7,"labels_hash":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, ok := decodeIPRecord(b)
		if !ok {
			return
		}
		var want store.IPEntry
		if err := json.Unmarshal(b, &want); err != nil {
			t.Fatalf("decoded %q, which encoding/json refuses: %v", b, err)
		}
		if got != want {
			t.Fatalf("%q: one pass %+v, encoding/json %+v", b, got, want)
		}
	})
}

// BenchmarkDecodeIPRecord: 30,000 records as the publisher writes them,
// decoded by encoding/json and in one pass, alternately in one run;
// ratio = one pass / encoding/json.
func BenchmarkDecodeIPRecord(b *testing.B) {
	recs := make([][]byte, 30000)
	for i := range recs {
		recs[i], _ = json.Marshal(store.IPEntry{IP: fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&255, i&255), Identity: 16777516,
			HostIP: fmt.Sprintf("172.16.%d.1", i%100), Node: fmt.Sprintf("fl-%03d", i%100), Endpoint: uint32(i % 300), LabelsHash: "9f86d081884c7d65"})
	}
	var tJSON, tFast time.Duration
	for b.Loop() {
		start := time.Now()
		for _, rec := range recs {
			var e store.IPEntry
			if err := json.Unmarshal(rec, &e); err != nil {
				b.Fatal(err)
			}
		}
		tJSON += time.Since(start)
		start = time.Now()
		for _, rec := range recs {
			if _, ok := decodeIPRecord(rec); !ok {
				b.Fatalf("%s: not decoded in one pass", rec)
			}
		}
		tFast += time.Since(start)
	}
	b.ReportMetric(float64(tJSON.Nanoseconds())/float64(b.N*len(recs)), "ns/record-json")
	b.ReportMetric(float64(tFast.Nanoseconds())/float64(b.N*len(recs)), "ns/record-onepass")
	b.ReportMetric(float64(tFast)/float64(tJSON), "onepass/json")
}
