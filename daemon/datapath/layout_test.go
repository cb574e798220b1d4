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
		svc    bool // only in the socket load balancer's object
	}{
		{"ip_key", ipKey{}, false},
		{"ipcache_lpm_key", ipcacheLPMKey{}, false},
		{"ipcache_value", ipcacheValue{}, false},
		{"endpoint_info", endpointInfo{}, false},
		{"policy_key", policyKey{}, false},
		{"policy_value", policyValue{}, false},
		{"ct4_key", ct4Key{}, false},
		{"ct6_key", ct6Key{}, false},
		{"ct_entry", ctEntry{}, false},
		{"frag_key", fragKey{}, false},
		{"frag_value", fragValue{}, false},
		{"metrics_value", metricsValue{}, false},
		{"event", rawEvent{}, false},
		{"event_limit", eventLimit{}, false},
		{"svc_nat_key", svcNATKey{}, false},
		{"svc_nat_value", svcNATValue{}, false},
		{"svc_key", svcKey{}, true},
		{"svc_value", svcValue{}, true},
		{"svc_addr", svcAddr{}, true},
		{"svc_revnat_key", svcRevNATKey{}, true},
		{"svc_event", rawSvcEvent{}, true},
	}
	for i, load := range []func() (*ebpf.CollectionSpec, error){bpf.LoadFromEndpoint, bpf.LoadToEndpoint, bpf.LoadSockLB} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range mirrors {
			if m.svc && i < 2 {
				continue
			}
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
			"RW_DROP_FRAG_NO_HEAD": DropFragNoHead, "RW_DROP_NO_SVC_BACKEND": DropNoSvcBackend,
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
