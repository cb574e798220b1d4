package datapath

import (
	"reflect"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/rackwire/rackwire/bpf"
)

// TestLayoutMatchesBTF checks every Go mirror against the C struct it names,
// field by field, in the BTF of both compiled objects.
func TestLayoutMatchesBTF(t *testing.T) {
	mirrors := []struct {
		c      string
		mirror any
	}{
		{"ip_key", ipKey{}},
		{"ipcache_lpm_key", ipcacheLPMKey{}},
		{"ipcache_value", ipcacheValue{}},
		{"endpoint_info", endpointInfo{}},
		{"policy_key", policyKey{}},
		{"policy_value", policyValue{}},
		{"ct4_key", ct4Key{}},
		{"ct6_key", ct6Key{}},
		{"ct_entry", ctEntry{}},
		{"frag_key", fragKey{}},
		{"frag_value", fragValue{}},
		{"metrics_value", metricsValue{}},
		{"event", rawEvent{}},
		{"event_limit", eventLimit{}},
	}
	for _, load := range []func() (*ebpf.CollectionSpec, error){bpf.LoadFromEndpoint, bpf.LoadToEndpoint} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range mirrors {
			var st *btf.Struct
			if err := spec.Types.TypeByName(m.c, &st); err != nil {
				t.Errorf("struct %s not in BTF: %v", m.c, err)
				continue
			}
			gt := reflect.TypeOf(m.mirror)
			if gt.Size() != uintptr(st.Size) {
				t.Errorf("%s: Go size %d, C size %d", m.c, gt.Size(), st.Size)
			}
			if gt.NumField() != len(st.Members) {
				t.Errorf("%s: Go has %d fields, C %d", m.c, gt.NumField(), len(st.Members))
				continue
			}
			for i, mem := range st.Members {
				f := gt.Field(i)
				if got, want := f.Offset, uintptr(mem.Offset.Bytes()); got != want {
					t.Errorf("%s.%s: Go offset %d (%s), C offset %d", m.c, mem.Name, got, f.Name, want)
				}
				size, err := btf.Sizeof(mem.Type)
				if err != nil {
					t.Fatal(err)
				}
				if f.Type.Size() != uintptr(size) {
					t.Errorf("%s.%s: Go size %d, C size %d", m.c, mem.Name, f.Type.Size(), size)
				}
				norm := func(s string) string { return strings.ToLower(strings.ReplaceAll(s, "_", "")) }
				if norm(f.Name) != norm(mem.Name) {
					t.Errorf("%s: field %d is %s in Go, %s in C", m.c, i, f.Name, mem.Name)
				}
			}
		}
		var reasons *btf.Enum
		if err := spec.Types.TypeByName("rw_reason", &reasons); err != nil {
			t.Fatalf("enum rw_reason not in BTF: %v", err)
		}
		want := map[string]Reason{
			"RW_REASON_FORWARDED": ReasonForwarded, "RW_DROP_POLICY_DENIED": DropPolicyDenied,
			"RW_DROP_POLICY_DENY_RULE": DropPolicyDenyRule, "RW_DROP_NO_IDENTITY": DropNoIdentity,
			"RW_DROP_CT_INVALID": DropCTInvalid, "RW_DROP_UNSUPPORTED_L3": DropUnsupportedL3,
			"RW_DROP_UNSUPPORTED_L4": DropUnsupportedL4, "RW_AUDIT_WOULD_DENY": AuditWouldDeny,
			"RW_DROP_NO_POLICY_MAP": DropNoPolicyMap, "RW_DROP_SPOOFED_SOURCE": DropSpoofedSource,
			"RW_DROP_INVALID_PACKET": DropInvalidPacket, "RW_DROP_FRAGMENT": DropFragment,
			"RW_DROP_FRAG_NO_HEAD": DropFragNoHead,
		}
		seen := 0
		for _, v := range reasons.Values {
			r := Reason(int32(uint32(v.Value)))
			if v.Name == "RW_REASON_COUNT" {
				if int(r) != reasonCount {
					t.Errorf("RW_REASON_COUNT = %d, Go reasonCount %d", r, reasonCount)
				}
				continue
			}
			seen++
			if w, ok := want[v.Name]; !ok || w != r {
				t.Errorf("C reason %s = %d, Go has %d (known %v)", v.Name, r, w, ok)
			}
			if _, ok := reasonNames[r]; !ok {
				t.Errorf("C reason %s = %d has no Go name", v.Name, r)
			}
		}
		if seen != len(reasonNames) {
			t.Errorf("C has %d reasons, Go %d", seen, len(reasonNames))
		}
	}
}
