package policy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// semantics is what a compiled policy enforces, without the document it
// came from: two policies with equal semantics put the same entries in
// every map.
func semantics(c *compiled) string {
	var b strings.Builder
	for _, r := range c.rules {
		fmt.Fprintf(&b, "rule %s subject %q reserved=%v\n", r.path, r.subject.key, r.subject.reserved)
		for _, s := range r.sections {
			fmt.Fprintf(&b, "  %s dir=%d deny=%v wildcard=%v ports=%v\n", s.field, s.dir, s.deny, s.wildcard, s.ports)
			for _, p := range s.peers {
				sel := ""
				if p.sel != nil {
					sel = p.sel.key
				}
				fmt.Fprintf(&b, "    peer %s kind=%d sel=%q id=%d prefix=%v except=%v\n", p.key, p.kind, sel, p.id, p.prefix, p.except)
			}
		}
	}
	return b.String()
}

// FuzzDecodeStoreValue: a store value of policies/v1/<name> either decodes
// to exactly one valid policy named name, or is refused with an error.
// What it decodes survives EncodeStoreValue unchanged (the encoding is a
// fixed point and enforces the same), and the engine takes it.
func FuzzDecodeStoreValue(f *testing.F) {
	files, _ := filepath.Glob("../../docs/examples/*")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		ps, err := Load(p, b)
		if err != nil || len(ps) == 0 {
			continue
		}
		f.Add(ps[0].Metadata.Name, b)
		if enc, err := EncodeStoreValue(ps[0]); err == nil {
			f.Add(ps[0].Metadata.Name, enc)
		}
	}
	f.Add("web", []byte(`{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"web"},"spec":{"endpointSelector":{},"ingress":[{"fromEndpoints":[]}]}}`))
	f.Add("web", []byte(`{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"web","labels":{}},"spec":{"endpointSelector":{"matchLabels":{}},"ingress":[{"toPorts":[{"ports":[{"port":"80"},{"port":81,"endPort":90,"protocol":"UDP"}]}]}]}}`))
	f.Add("other", []byte(`{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"web"},"spec":{"endpointSelector":{},"ingress":[{}]}}`))
	f.Add("web", []byte("metadata: {name: web}\n---\nmetadata: {name: web2}\n"))
	f.Add("web", []byte(`[]`))
	f.Add("", []byte(``))
	f.Fuzz(func(t *testing.T, name string, value []byte) {
		p, err := DecodeStoreValue(name, value)
		if err != nil {
			if !strings.Contains(err.Error(), "policies/v1/") {
				t.Fatalf("error does not name the key: %v", err)
			}
			return
		}
		if p.Metadata.Name != name {
			t.Fatalf("key %q decoded as policy %q", name, p.Metadata.Name)
		}
		c1, err := compile("", &p)
		if err != nil {
			t.Fatalf("decoded policy does not compile: %v", err)
		}
		enc, err := EncodeStoreValue(p)
		if err != nil {
			t.Fatalf("encode decoded policy: %v", err)
		}
		p2, err := DecodeStoreValue(name, enc)
		if err != nil {
			t.Fatalf("the store value written for a decoded policy is refused: %v\n%s", err, enc)
		}
		enc2, err := EncodeStoreValue(p2)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding is not stable:\n%s\n%s", enc, enc2)
		}
		c2, err := compile("", &p2)
		if err != nil {
			t.Fatal(err)
		}
		if s1, s2 := semantics(c1), semantics(c2); s1 != s2 {
			t.Fatalf("round trip changes what the policy enforces:\nbefore:\n%s\nafter:\n%s", s1, s2)
		}
		e := New(nil, Options{})
		if err := e.SetPolicies(SourceStore(name), []Policy{p}); err != nil {
			t.Fatalf("engine refuses a decoded policy: %v", err)
		}
	})
}
