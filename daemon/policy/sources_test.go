package policy

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestStoreValueRoundTrip(t *testing.T) {
	ps, err := LoadFile("../../docs/examples/deny.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, err := EncodeStoreValue(ps[0])
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeStoreValue("deny-examples", b)
	if err != nil {
		t.Fatalf("DecodeStoreValue: %v", err)
	}
	if diff := cmp.Diff(ps[0], back); diff != "" {
		t.Fatalf("round trip (-want +got):\n%s", diff)
	}
	if _, err := DecodeStoreValue("other", b); !errors.Is(err, ErrInvalid) {
		t.Fatalf("DecodeStoreValue under the wrong name = %v, want ErrInvalid", err)
	}
	two := doc("a", `{endpointSelector: {}, ingress: [{}]}`) + "---\n" + doc("b", `{endpointSelector: {}, ingress: [{}]}`)
	if _, err := DecodeStoreValue("a", []byte(two)); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "holds 2 policies") {
		t.Fatalf("DecodeStoreValue of two policies = %v, want ErrInvalid", err)
	}
	if got := SourceStore("web"); got != "store:web" {
		t.Fatalf("SourceStore = %q", got)
	}
	if got := SourceFile("/etc/rackwire/policies.d/a.yaml"); got != "file:/etc/rackwire/policies.d/a.yaml" {
		t.Fatalf("SourceFile = %q", got)
	}
}

func TestStoreValueRoundTripExamples(t *testing.T) {
	files, _ := filepath.Glob("../../docs/examples/*")
	for _, f := range files {
		ps, err := LoadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range ps {
			b, err := EncodeStoreValue(p)
			if err != nil {
				t.Fatal(err)
			}
			back, err := DecodeStoreValue(p.Metadata.Name, b)
			if err != nil {
				t.Fatalf("%s: DecodeStoreValue: %v", f, err)
			}
			if diff := cmp.Diff(p, back); diff != "" {
				t.Fatalf("%s: round trip (-want +got):\n%s", f, diff)
			}
		}
	}
}
