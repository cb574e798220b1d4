package policy

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzLoad feeds arbitrary bytes to the loader and every policy it accepts
// to an engine: nothing may panic, and what Load accepts the engine takes.
func FuzzLoad(f *testing.F) {
	files, _ := filepath.Glob("../../docs/examples/*")
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("[]"))
	f.Add([]byte("---\n---\n"))
	f.Add([]byte(`{"apiVersion":"cilium.io/v2","kind":"List","items":[{}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ps, err := Load("fuzz.yaml", data)
		if err != nil {
			if ps != nil {
				t.Fatalf("Load returned policies and an error")
			}
			return
		}
		e := New(nil, Options{})
		for _, ti := range universe() {
			e.UpsertIdentity(ti.id, ti.labels)
		}
		e.UpsertEndpoint(1, idWeb, universe()["web"].labels, false)
		if err := e.SetPolicies("fuzz", ps); err != nil {
			t.Fatalf("Load accepted what SetPolicies refuses: %v", err)
		}
		e.Desired(1)
		e.Changes()
		e.CIDRPrefixes()
		if _, err := e.Trace(Subject{Endpoint: 1}, Subject{Labels: universe()["client"].labels}, 80, ProtoTCP); err != nil {
			t.Fatalf("Trace: %v", err)
		}
	})
}
