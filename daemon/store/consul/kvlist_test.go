package consul

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/store"
)

// randomKVs is a KV list as Consul writes it: keys with characters JSON
// escapes (quotes, backslashes, <>&, control characters, non-ASCII),
// values null, empty, binary and JSON, sessions on some.
func randomKVs(r *rand.Rand, n int) api.KVPairs {
	pieces := []string{"a", "ip/v1/prod/10.0.0.1", "é", "<&>", `"`, `\`, "\n", "\x01", "☃", "/", " ", "\u2028"}
	sessions := []string{"", "2285d9c3-ba58-f47f-83e5-1ff2778b5edc", "faa770f3-4dfe-9791-ad3c-ec4e3db9efe0"}
	out := make(api.KVPairs, 0, n)
	for i := range n {
		var k strings.Builder
		k.WriteString("rackwire/")
		for range r.IntN(6) {
			k.WriteString(pieces[r.IntN(len(pieces))])
		}
		fmt.Fprintf(&k, "/%d", i)
		p := &api.KVPair{Key: k.String(), CreateIndex: r.Uint64N(1 << 40), ModifyIndex: r.Uint64(),
			LockIndex: r.Uint64N(5), Flags: r.Uint64N(3), Session: sessions[r.IntN(len(sessions))]}
		switch r.IntN(4) {
		case 0:
		case 1:
			p.Value = []byte{}
		case 2:
			p.Value = make([]byte, r.IntN(300))
			for j := range p.Value {
				p.Value[j] = byte(r.IntN(256))
			}
		default:
			p.Value = []byte(`{"ip":"10.1.2.3","identity":16777516,"node":"n001"}`)
		}
		out = append(out, p)
	}
	return out
}

func sameKVs(t *testing.T, what string, got, want []store.KV) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d keys, encoding/json gives %d", what, len(got), len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Key != w.Key || !bytes.Equal(g.Value, w.Value) || (g.Value == nil) != (w.Value == nil) ||
			g.CreateIndex != w.CreateIndex || g.ModifyIndex != w.ModifyIndex || g.Owner != w.Owner {
			t.Fatalf("%s: entry %d = %+v, encoding/json gives %+v", what, i, g, w)
		}
	}
}

// TestDecodeKVListSameAsJSON: the one-pass decoder gives what the API
// client's encoding/json gives, for lists as Consul writes them (Go's
// encoder: HTML-safe escapes, base64 values) and for the shapes it does
// not know, where it must give up rather than guess.
func TestDecodeKVListSameAsJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		ps := randomKVs(r, r.IntN(40))
		b, err := json.Marshal(ps)
		if err != nil {
			t.Fatal(err)
		}
		if round%3 == 0 {
			var ind bytes.Buffer
			_ = json.Indent(&ind, b, "", "    ") // ?pretty
			b = ind.Bytes()
		}
		want, err := decodeKVListJSON(b, "rackwire/")
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeKVList(b, "rackwire/")
		if err != nil {
			t.Fatalf("round %d: %v on a list Consul could write:\n%.300s", round, err, b)
		}
		sameKVs(t, fmt.Sprintf("round %d", round), got, want)
	}
	for _, doc := range []string{
		`null`, `[]`, ` [ ] `,
		`[{}]`,
		`[{"Key":"a","Value":null,"Session":null,"Namespace":"default","Partition":null}]`,
	} {
		want, err := decodeKVListJSON([]byte(doc), "")
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeKVList([]byte(doc), "")
		if err != nil {
			t.Fatalf("%s: %v", doc, err)
		}
		sameKVs(t, doc, got, want)
	}
	// Shapes it gives up on (encoding/json decides them).
	for _, doc := range []string{
		`[{"key":"a"}]`,                 // case-folded field name
		`[{"Key":"a","Key":"b"}]`,       // repeated field
		`[{"Key":"a","Other":{"x":1}}]`, // unknown field
		`[{"K\u0065y":"a"}]`,            // escaped field name
		`[{"Key":"a","CreateIndex":1e3}]`,
		`[{"Key":"a","CreateIndex":-1}]`,
		`[{"Key":"a","Value":"!!"}]`,
		"[{\"Key\":\"a\xff\"}]", // invalid UTF-8
		`[{"Key":"a"}`, `[{"Key":"a"},]`, `[{"Key":"a"}] x`, `{}`, ``,
	} {
		if _, err := decodeKVList([]byte(doc), ""); err == nil {
			t.Errorf("%q: decoded, want it left to encoding/json", doc)
		}
	}
}

// FuzzDecodeKVList: whatever the bytes, the one-pass decoder either gives
// up or gives exactly what encoding/json gives.
func FuzzDecodeKVList(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 8 {
		b, _ := json.Marshal(randomKVs(r, 3))
		f.Add(b)
	}
	f.Add([]byte(`[{"Key":"a","Value":"","Session":"s","CreateIndex":0,"ModifyIndex":18446744073709551615}]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeKVList(b, "")
		if err != nil {
			return
		}
		want, jerr := decodeKVListJSON(b, "")
		if jerr != nil {
			t.Fatalf("decoded %q, which encoding/json refuses: %v", b, jerr)
		}
		sameKVs(t, string(b), got, want)
	})
}

// BenchmarkDecodeKVList: a 30,000-entry list of the ipcache prefix (the
// largest read of an agent), decoded by the API client's way and in one
// pass; ratio = one-pass / encoding/json, in the same run.
func BenchmarkDecodeKVList(b *testing.B) {
	ps := make(api.KVPairs, 0, 30000)
	for i := range 30000 {
		ps = append(ps, &api.KVPair{Key: fmt.Sprintf("rackwire/state/ip/v1/prod/10.%d.%d.%d", i>>16, i>>8&255, i&255),
			Value:       []byte(fmt.Sprintf(`{"ip":"10.%d.%d.%d","identity":16777516,"host_ip":"172.16.%d.1","node":"n%03d"}`, i>>16, i>>8&255, i&255, i%100, i%100)),
			CreateIndex: uint64(1000 + i), ModifyIndex: uint64(2000 + i), Session: fmt.Sprintf("%08d-ba58-f47f-83e5-1ff2778b5edc", i%100)})
	}
	doc, _ := json.Marshal(ps)
	var tJSON, tFast float64
	for b.Loop() {
		for _, fast := range []bool{false, true} {
			start := time.Now()
			var err error
			if fast {
				_, err = decodeKVList(doc, "rackwire/")
			} else {
				_, err = decodeKVListJSON(doc, "rackwire/")
			}
			if err != nil {
				b.Fatal(err)
			}
			if el := time.Since(start).Seconds(); fast {
				tFast += el
			} else {
				tJSON += el
			}
		}
	}
	b.ReportMetric(tJSON/float64(b.N)*1e3, "ms/list-json")
	b.ReportMetric(tFast/float64(b.N)*1e3, "ms/list-onepass")
	b.ReportMetric(tFast/tJSON, "onepass/json")
}
