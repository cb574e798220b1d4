package consul

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/store"
)

// decodeKVList decodes a whole KV list in memory (decodeKVListFrom).
func decodeKVList(b []byte, prefix string) ([]store.KV, error) {
	return decodeKVListFrom(bytes.NewReader(b), prefix)
}

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
		// The same body as a network delivers it: in pieces that cut
		// tokens anywhere.
		got, err = decodeKVListFrom(&chunky{b: b, r: r}, "rackwire/")
		if err != nil {
			t.Fatalf("round %d, read in pieces: %v", round, err)
		}
		sameKVs(t, fmt.Sprintf("round %d, read in pieces", round), got, want)
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
		if _, err := decodeKVListFrom(iotest.OneByteReader(strings.NewReader(doc)), ""); err == nil {
			t.Errorf("%q, read a byte at a time: decoded, want it left to encoding/json", doc)
		}
	}
}

// chunky reads b in pieces of 1 to 300 bytes.
type chunky struct {
	b []byte
	r *rand.Rand
}

func (c *chunky) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.b), 1+c.r.IntN(300))
	copy(p, c.b[:n])
	c.b = c.b[n:]
	return n, nil
}

// TestDecodeKVListWindow: the decoder holds a window of the body, not the
// body: a list many windows long, with a value larger than the window,
// decodes as encoding/json decodes it while the window stays a few times
// the largest entry; a read error is the error, not a fallback.
func TestDecodeKVListWindow(t *testing.T) {
	ps := make(api.KVPairs, 0, 20000)
	for i := range 20000 {
		v := []byte(fmt.Sprintf(`{"ip":"10.0.%d.%d","identity":16777516}`, i>>8, i&255))
		if i == 10000 {
			v = bytes.Repeat([]byte{0xa5}, 300<<10) // 400 KB of base64
		}
		ps = append(ps, &api.KVPair{Key: fmt.Sprintf("rackwire/ip/%05d", i), Value: v, ModifyIndex: uint64(i + 1)})
	}
	b, err := json.Marshal(ps)
	if err != nil {
		t.Fatal(err)
	}
	want, err := decodeKVListJSON(b, "rackwire/")
	if err != nil {
		t.Fatal(err)
	}
	w := &widest{r: bytes.NewReader(b)}
	d := kvDecoder{r: w, b: make([]byte, 0, kvWindow), sessions: map[string]string{}}
	got, err := d.list("rackwire/")
	if err != nil {
		t.Fatal(err)
	}
	sameKVs(t, "a list of many windows", got, want)
	if len(b) < 40*kvWindow || cap(d.b) > 4*(400<<10) {
		t.Fatalf("a body of %d bytes went through a window of %d; want it bounded by the largest entry, not the body", len(b), cap(d.b))
	}
	t.Logf("a body of %d bytes went through a window of %d", len(b), cap(d.b))

	broken := errors.New("connection reset")
	if _, err := decodeKVListFrom(io.MultiReader(bytes.NewReader(b[:len(b)/2]), iotest.ErrReader(broken)), "rackwire/"); !errors.Is(err, broken) {
		t.Fatalf("a body cut by a read error: %v, want the read error", err)
	}
}

// widest reads from r in pieces of at most 4 KB.
type widest struct{ r io.Reader }

func (w *widest) Read(p []byte) (int, error) { return w.r.Read(p[:min(len(p), 4096)]) }

// TestListFallsBackToJSON: a list this decoder does not know the shape of
// (here an escaped field name, which encoding/json matches) is read
// again, without blocking, and decoded by encoding/json.
func TestListFallsBackToJSON(t *testing.T) {
	var reqs []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reqs = append(reqs, r.URL.RawQuery)
		w.Header().Set("X-Consul-Index", "42")
		_, _ = io.WriteString(w, `[{"K\u0065y":"rackwire/ip/a","Value":"MQ==","ModifyIndex":7}]`)
	}))
	defer srv.Close()
	s := &Store{opts: Options{Scheme: "http", Address: strings.TrimPrefix(srv.URL, "http://")}, http: srv.Client(), prefix: "rackwire/"}
	kvs, meta, err := s.listKV(context.Background(), "ip/", true, 40, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(kvs) != 1 || kvs[0].Key != "ip/a" || string(kvs[0].Value) != "1" || kvs[0].ModifyIndex != 7 || meta.LastIndex != 42 {
		t.Fatalf("listKV = %+v, %+v", kvs, meta)
	}
	if len(reqs) != 2 || !strings.Contains(reqs[0], "index=40") || strings.Contains(reqs[1], "index") {
		t.Fatalf("requests %q: want the blocking one, then one without an index", reqs)
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
		bytewise, berr := decodeKVListFrom(iotest.OneByteReader(bytes.NewReader(b)), "")
		if (err == nil) != (berr == nil) {
			t.Fatalf("%q: whole %v, a byte at a time %v", b, err, berr)
		}
		if err != nil {
			return
		}
		sameKVs(t, "a byte at a time", bytewise, got)
		want, jerr := decodeKVListJSON(b, "")
		if jerr != nil {
			t.Fatalf("decoded %q, which encoding/json refuses: %v", b, jerr)
		}
		sameKVs(t, string(b), got, want)
	})
}

// ipcacheList is Consul's answer to a list of an ipcache prefix of n
// entries, as 100 hosts publish them.
func ipcacheList(n int) []byte {
	ps := make(api.KVPairs, 0, n)
	for i := range n {
		ps = append(ps, &api.KVPair{Key: fmt.Sprintf("rackwire/state/ip/v1/prod/10.%d.%d.%d", i>>16, i>>8&255, i&255),
			Value:       []byte(fmt.Sprintf(`{"ip":"10.%d.%d.%d","identity":16777516,"host_ip":"172.16.%d.1","node":"n%03d"}`, i>>16, i>>8&255, i&255, i%100, i%100)),
			CreateIndex: uint64(1000 + i), ModifyIndex: uint64(2000 + i), Session: fmt.Sprintf("%08d-ba58-f47f-83e5-1ff2778b5edc", i%100)})
	}
	doc, _ := json.Marshal(ps)
	return doc
}

// BenchmarkDecodeKVList: a 30,000-entry list of the ipcache prefix (the
// largest read of an agent), decoded by the API client's way and in one
// pass; ratio = one-pass / encoding/json, in the same run.
func BenchmarkDecodeKVList(b *testing.B) {
	doc := ipcacheList(30000)
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

// BenchmarkListKVFresh: a 30,000-entry list read from an HTTP server
// (gzip, as Consul answers) into memory the process has handed back to
// the kernel, as an agent's start and its reads after a memory release
// do: the body read whole (the way before) and decoded through the
// window; ratio = window / whole, with the page faults of each.
func BenchmarkListKVFresh(b *testing.B) {
	doc := ipcacheList(30000)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(doc)
	_ = zw.Close()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Consul-Index", "9")
		w.Header().Set("Content-Encoding", "gzip")
		_, _ = w.Write(gz.Bytes())
	}))
	defer srv.Close()
	s := &Store{opts: Options{Scheme: "http", Address: strings.TrimPrefix(srv.URL, "http://")}, http: srv.Client(), prefix: "rackwire/"}
	whole := func() ([]store.KV, error) {
		resp, _, err := s.getKV(context.Background(), "state/ip/v1/prod/", false, 0, 0)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var buf bytes.Buffer
		if _, err := buf.ReadFrom(resp.Body); err != nil {
			return nil, err
		}
		return decodeKVListJSONOr(buf.Bytes())
	}
	window := func() ([]store.KV, error) {
		kvs, _, err := s.listKV(context.Background(), "state/ip/v1/prod/", false, 0, 0)
		return kvs, err
	}
	faults := func() int64 {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return ru.Minflt
	}
	var t, f [2]float64
	for b.Loop() {
		for k, read := range []func() ([]store.KV, error){whole, window} {
			b.StopTimer()
			runtime.GC()
			debug.FreeOSMemory()
			b.StartTimer()
			f0, start := faults(), time.Now()
			kvs, err := read()
			t[k] += time.Since(start).Seconds()
			f[k] += float64(faults() - f0)
			if err != nil || len(kvs) != 30000 {
				b.Fatalf("%d entries, %v", len(kvs), err)
			}
		}
	}
	n := float64(b.N)
	b.ReportMetric(t[0]/n*1e3, "ms/list-whole")
	b.ReportMetric(t[1]/n*1e3, "ms/list-window")
	b.ReportMetric(f[0]/n, "faults/list-whole")
	b.ReportMetric(f[1]/n, "faults/list-window")
	b.ReportMetric(t[1]/t[0], "window/whole")
}

// decodeKVListJSONOr decodes in one pass from memory, as listKV did
// before it read through a window.
func decodeKVListJSONOr(b []byte) ([]store.KV, error) {
	kvs, err := decodeKVList(b, "rackwire/")
	if err != nil {
		return decodeKVListJSON(b, "rackwire/")
	}
	return kvs, nil
}
