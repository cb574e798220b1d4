package policy

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unicode"

	"github.com/google/go-cmp/cmp"
)

// Conformance with Cilium where rackwire used to differ: each test below
// covers one difference, as table cases next to the engine. The engine
// cases run through runConformanceCase (both identity orders, the applied
// changes, Trace); the refusal cases through runRefusals.

const (
	p22  = `toPorts: [{ports: [{port: "22", protocol: TCP}]}]`
	p80  = `toPorts: [{ports: [{port: "80", protocol: TCP}]}]`
	p443 = `toPorts: [{ports: [{port: "443", protocol: TCP}]}]`
	ping = `icmps: [{fields: [{type: 8}]}]`
)

// jsonDoc is doc in JSON form; spec is JSON.
func jsonDoc(name, spec string) string {
	return `{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "` + name + `"}, "spec": ` + spec + `}`
}

// emptyPeerListCases: an explicitly empty peer list selects no peer, also
// with ports (where leaving the field out selects every peer), and in deny
// rules denies no one. Difference 1.
func emptyPeerListCases() []conformanceCase {
	web := `{"matchLabels": {"app": "web"}}`
	return []conformanceCase{
		// Allow rules: the direction is selected (default deny) and nothing is allowed.
		{name: "fromEndpoints [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [], `+p80+`}]}`)},
			checks: []check{in("client", 80, tcp, false), in("world", 80, tcp, false), in("host", 80, tcp, false), in("10.0.0.0/8", 80, tcp, false), out("world", 443, tcp, true)}},
		{name: "fromCIDR [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromCIDR: [], `+p80+`}]}`)},
			checks: []check{in("10.0.0.0/8", 80, tcp, false), in("world", 80, tcp, false), in("client", 80, tcp, false)}},
		{name: "fromCIDRSet [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromCIDRSet: [], `+p80+`}]}`)},
			checks: []check{in("10.0.0.0/8", 80, tcp, false), in("world", 80, tcp, false), in("client", 80, tcp, false)}},
		{name: "fromEntities [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [], `+p80+`}]}`)},
			checks: []check{in("host", 80, tcp, false), in("world", 80, tcp, false), in("client", 80, tcp, false)}},
		{name: "fromEndpoints [] with icmps allows no peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [], `+ping+`}]}`)},
			checks: []check{in("client", 8, icmp, false), in("world", 8, icmp, false)}},
		{name: "fromEndpoints [] without ports allows no peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: []}]}`)},
			checks: []check{in("client", 80, tcp, false), in("world", 80, tcp, false), out("world", 443, tcp, true)}},
		{name: "toEndpoints [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, egress: [{toEndpoints: [], `+p443+`}]}`)},
			checks: []check{out("db", 443, tcp, false), out("world", 443, tcp, false), in("client", 80, tcp, true)}},
		{name: "toCIDR [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, egress: [{toCIDR: [], `+p443+`}]}`)},
			checks: []check{out("192.168.0.0/16", 443, tcp, false), out("world", 443, tcp, false)}},
		{name: "toCIDRSet [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, egress: [{toCIDRSet: [], `+p443+`}]}`)},
			checks: []check{out("192.168.0.0/16", 443, tcp, false), out("world", 443, tcp, false)}},
		{name: "toEntities [] with ports allows no peer", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [], `+p443+`}]}`)},
			checks: []check{out("world", 443, tcp, false), out("host", 443, tcp, false), out("db", 443, tcp, false)}},

		// Deny rules: an empty list denies no one.
		{name: "ingressDeny fromEndpoints [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromEndpoints: [], `+p22+`}]}`)},
			checks: []check{in("client", 22, tcp, true), in("world", 22, tcp, true), in("host", 22, tcp, true)}},
		{name: "ingressDeny fromCIDR [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromCIDR: [], `+p22+`}]}`)},
			checks: []check{in("10.0.0.0/8", 22, tcp, true), in("world", 22, tcp, true)}},
		{name: "ingressDeny fromCIDRSet [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromCIDRSet: [], `+p22+`}]}`)},
			checks: []check{in("10.0.0.0/8", 22, tcp, true), in("world", 22, tcp, true)}},
		{name: "ingressDeny fromEntities [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromEntities: [], `+p22+`}]}`)},
			checks: []check{in("world", 22, tcp, true), in("client", 22, tcp, true)}},
		{name: "ingressDeny fromEndpoints [] with icmps denies no one", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromEndpoints: [], `+ping+`}]}`)},
			checks: []check{in("client", 8, icmp, true), in("world", 8, icmp, true)}},
		{name: "egressDeny toEndpoints [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toEndpoints: [], `+p443+`}]}`)},
			checks: []check{out("db", 443, tcp, true), out("world", 443, tcp, true)}},
		{name: "egressDeny toCIDR [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toCIDR: [], `+p443+`}]}`)},
			checks: []check{out("192.168.0.0/16", 443, tcp, true), out("world", 443, tcp, true)}},
		{name: "egressDeny toCIDRSet [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toCIDRSet: [], `+p443+`}]}`)},
			checks: []check{out("192.168.0.0/16", 443, tcp, true), out("world", 443, tcp, true)}},
		{name: "egressDeny toEntities [] with ports denies no one", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toEntities: [], `+p443+`}]}`)},
			checks: []check{out("world", 443, tcp, true), out("db", 443, tcp, true)}},
		{name: "ingressDeny with an empty list alone still selects ingress", docs: []string{doc("p", `{`+sel+`, ingressDeny: [{fromEndpoints: [], `+p22+`}]}`)},
			checks: []check{in("client", 80, tcp, false), in("client", 22, tcp, false), out("world", 443, tcp, true)}},

		// Leaving the peer fields out (or null) still selects every peer.
		{name: "absent peers with ingress ports: every peer", docs: []string{doc("p", `{`+sel+`, ingress: [{`+p80+`}]}`)},
			checks: []check{in("client", 80, tcp, true), in("world", 80, tcp, true), in("10.0.0.0/8", 80, tcp, true), in("client", 81, tcp, false)}},
		{name: "absent peers with egress ports: every peer", docs: []string{doc("p", `{`+sel+`, egress: [{`+p443+`}]}`)},
			checks: []check{out("world", 443, tcp, true), out("db", 443, tcp, true), out("db", 80, tcp, false)}},
		{name: "absent peers with deny ports: deny every peer", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{`+p22+`}]}`)},
			checks: []check{in("client", 22, tcp, false), in("world", 22, tcp, false), in("client", 80, tcp, true)}},
		{name: "null peer list is absent", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: null, `+p80+`}]}`)},
			checks: []check{in("world", 80, tcp, true), in("client", 80, tcp, true)}},

		// JSON keeps the distinction as YAML does.
		{name: "JSON fromEndpoints [] with ports allows no peer", docs: []string{jsonDoc("j", `{"endpointSelector": `+web+`, "ingress": [{"fromEndpoints": [], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}`)},
			checks: []check{in("client", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "JSON egressDeny toCIDR [] denies no one", docs: []string{jsonDoc("j", `{"endpointSelector": `+web+`, "egress": [{"toEntities": ["all"]}], "egressDeny": [{"toCIDR": [], "toPorts": [{"ports": [{"port": 443}]}]}]}`)},
			checks: []check{out("192.168.0.0/16", 443, tcp, true), out("world", 443, tcp, true)}},
		{name: "JSON absent peers with ports: every peer", docs: []string{jsonDoc("j", `{"endpointSelector": `+web+`, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("world", 80, tcp, true)}},
	}
}

func TestCiliumEmptyPeerList(t *testing.T) {
	for _, c := range emptyPeerListCases() {
		t.Run(c.name, func(t *testing.T) { runConformanceCase(t, c) })
	}
	runRefusals(t, []refusal{
		// Cilium would let the empty list make the whole rule select no
		// peer; that is never what a second peer list means, so it is refused.
		{"empty list next to another peer kind", doc("bad", `{`+sel+`, ingress: [{fromEndpoints: [], fromCIDR: [10.0.0.0/8]}]}`), ErrInvalid, "spec.ingress[0]", "fromEndpoints: []"},
		{"empty CIDR list next to a CIDR set", doc("bad", `{`+sel+`, egressDeny: [{toCIDR: [], toCIDRSet: [{cidr: 10.0.0.0/8}]}]}`), ErrInvalid, "spec.egressDeny[0]", "toCIDR: []"},
	})
}

// TestCiliumEmptyPeerListStoreRoundTrip: the store encoding keeps "absent"
// and "present but empty" apart, and the decoded policy means the same.
func TestCiliumEmptyPeerListStoreRoundTrip(t *testing.T) {
	for _, c := range emptyPeerListCases() {
		t.Run(c.name, func(t *testing.T) {
			ps := mustLoad(t, c.docs...)
			var back []Policy
			for _, p := range ps {
				b, err := EncodeStoreValue(p)
				if err != nil {
					t.Fatal(err)
				}
				q, err := DecodeStoreValue(p.Metadata.Name, b)
				if err != nil {
					t.Fatalf("DecodeStoreValue(%s): %v", b, err)
				}
				if diff := cmp.Diff(p, q); diff != "" {
					t.Fatalf("round trip through %s (-loaded +decoded):\n%s", b, diff)
				}
				back = append(back, q)
			}
			want, _ := engineFor(t, ps).Desired(1)
			got, _ := engineFor(t, back).Desired(1)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Fatalf("entries after the round trip differ (-loaded +decoded):\n%s", diff)
			}
		})
	}
}

// TestCiliumEmptyPeerListIsAChange: replacing an empty peer list by an
// absent one (or back) is a different policy, not the same one again.
func TestCiliumEmptyPeerListIsAChange(t *testing.T) {
	e, m := newTestEngine(t)
	empty := mustLoad(t, doc("p", `{`+sel+`, ingress: [{fromEndpoints: [], `+p80+`}]}`))
	absent := mustLoad(t, doc("p", `{`+sel+`, ingress: [{`+p80+`}]}`))
	if err := e.SetPolicies("s", empty); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if err := e.SetPolicies("s", absent); err != nil {
		t.Fatal(err)
	}
	want := []EndpointChange{{Endpoint: 1, Add: []Entry{{Direction: Ingress, Proto: ProtoTCP, Port: 80}}}}
	if diff := cmp.Diff(want, e.Changes()); diff != "" {
		t.Fatalf("empty -> absent (-want +got):\n%s", diff)
	}
	if err := e.SetPolicies("s", empty); err != nil {
		t.Fatal(err)
	}
	want = []EndpointChange{{Endpoint: 1, Delete: []Entry{{Direction: Ingress, Proto: ProtoTCP, Port: 80}}}}
	if diff := cmp.Diff(want, e.Changes()); diff != "" {
		t.Fatalf("absent -> empty (-want +got):\n%s", diff)
	}
}

// entityNoneCases: the entity none is accepted and matches nothing.
// Difference 2.
func entityNoneCases() []conformanceCase {
	return []conformanceCase{
		{name: "fromEntities none selects ingress and allows nothing", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [none]}]}`)},
			checks: []check{in("client", 80, tcp, false), in("world", 80, tcp, false), in("host", 80, tcp, false), out("world", 443, tcp, true)}},
		{name: "fromEntities none with ports allows nothing", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [none], `+p80+`}]}`)},
			checks: []check{in("client", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "none next to host adds nothing", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [none, host]}]}`)},
			checks: []check{in("host", 80, tcp, true), in("client", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "toEntities none allows nothing", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [none], `+p443+`}]}`)},
			checks: []check{out("world", 443, tcp, false), out("db", 443, tcp, false), in("client", 80, tcp, true)}},
		{name: "ingressDeny fromEntities none denies no one", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromEntities: [none], `+p22+`}]}`)},
			checks: []check{in("client", 22, tcp, true), in("world", 22, tcp, true)}},
		{name: "egressDeny toEntities none denies no one", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toEntities: [none]}]}`)},
			checks: []check{out("world", 443, tcp, true), out("db", 5432, tcp, true)}},
		{name: "JSON toEntities none", docs: []string{jsonDoc("j", `{"endpointSelector": {}, "egress": [{"toEntities": ["none"]}]}`)},
			checks: []check{out("world", 443, tcp, false), out("host", 53, udp, false)}},
	}
}

func TestCiliumEntityNone(t *testing.T) {
	for _, c := range entityNoneCases() {
		t.Run(c.name, func(t *testing.T) { runConformanceCase(t, c) })
	}
	runRefusals(t, []refusal{
		{"none next to a CIDR is still two peer kinds", doc("bad", `{`+sel+`, ingress: [{fromEntities: [none], fromCIDR: [10.0.0.0/8]}]}`), ErrUnsupported, "spec.ingress[0]", "combining"},
	})
}

// sectionCases: what a rule's sections mean once at least one list has an
// entry. Difference 3.
func sectionCases() []conformanceCase {
	return []conformanceCase{
		{name: "ingress [{}] is default deny and allows nothing", docs: []string{doc("p", `{`+sel+`, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false), in("host", 22, tcp, false), in("world", 8, icmp, false), out("world", 443, tcp, true)}},
		{name: "egress [{}] is default deny and allows nothing", docs: []string{doc("p", `{`+sel+`, egress: [{}]}`)},
			checks: []check{out("world", 443, tcp, false), out("db", 5432, tcp, false), in("client", 80, tcp, true)}},
		{name: "ingressDeny [{}] is default deny and denies nothing else", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [host]}], ingressDeny: [{}]}`)},
			checks: []check{in("host", 80, tcp, true), in("client", 80, tcp, false), out("world", 443, tcp, true)}},
		{name: "ingress [] next to egress selects egress only", docs: []string{doc("p", `{`+sel+`, ingress: [], egress: [{}]}`)},
			checks: []check{in("client", 80, tcp, true), in("world", 22, tcp, true), out("world", 443, tcp, false)}},
	}
}

func TestCiliumRuleNeedsASection(t *testing.T) {
	for _, c := range sectionCases() {
		t.Run(c.name, func(t *testing.T) { runConformanceCase(t, c) })
	}
	const hint = "ingress: [{}]"
	runRefusals(t, []refusal{
		{"no section", doc("bad", `{`+sel+`}`), ErrInvalid, "spec", hint},
		{"empty endpointSelector and no section", doc("bad", `{endpointSelector: {}}`), ErrInvalid, "spec", hint},
		{"only ingress []", doc("bad", `{`+sel+`, ingress: []}`), ErrInvalid, "spec", hint},
		{"every section an empty list", doc("bad", `{`+sel+`, ingress: [], ingressDeny: [], egress: [], egressDeny: []}`), ErrInvalid, "spec", hint},
		{"sections null", doc("bad", `{`+sel+`, ingress: null, egress: null}`), ErrInvalid, "spec", hint},
		{"second of specs", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspecs:\n- {endpointSelector: {}, ingress: [{}]}\n- {endpointSelector: {}, egress: []}\n", ErrInvalid, "specs[1]", hint},
		{"JSON without section", jsonDoc("bad", `{"endpointSelector": {}, "egressDeny": []}`), ErrInvalid, "spec", hint},
	})
	// The engine refuses it too, whatever the policy came from.
	p := mustLoad(t, doc("p", `{`+sel+`, ingress: [{}]}`))[0]
	p.Spec.Ingress = []IngressRule{}
	if err := New(nil, Options{}).UpsertPolicy("s", p); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), hint) {
		t.Fatalf("UpsertPolicy(rule without sections) = %v, want ErrInvalid saying %q", err, hint)
	}
}

// TestCiliumBareAddress: a CIDR field needs a prefix length. Difference 4.
func TestCiliumBareAddress(t *testing.T) {
	runRefusals(t, []refusal{
		{"fromCIDR", doc("bad", `{`+sel+`, ingress: [{fromCIDR: [10.0.0.1]}]}`), ErrInvalid, "spec.ingress[0].fromCIDR[0]", "write 10.0.0.1/32"},
		{"toCIDR IPv6", doc("bad", `{`+sel+`, egress: [{toCIDR: ["2001:db8::1"]}]}`), ErrInvalid, "spec.egress[0].toCIDR[0]", "write 2001:db8::1/128"},
		{"egressDeny toCIDR", doc("bad", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toCIDR: [203.0.113.7]}]}`), ErrInvalid, "spec.egressDeny[0].toCIDR[0]", "write 203.0.113.7/32"},
		{"fromCIDRSet cidr", doc("bad", `{`+sel+`, ingress: [{fromCIDRSet: [{cidr: 192.0.2.1}]}]}`), ErrInvalid, "spec.ingress[0].fromCIDRSet[0].cidr", "write 192.0.2.1/32"},
		{"toCIDRSet except", doc("bad", `{`+sel+`, egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.2.3]}]}]}`), ErrInvalid, "spec.egress[0].toCIDRSet[0].except[0]", "write 10.1.2.3/32"},
		{"JSON fromCIDR", jsonDoc("bad", `{"endpointSelector": {}, "ingress": [{"fromCIDR": ["198.51.100.9"]}]}`), ErrInvalid, "spec.ingress[0].fromCIDR[0]", "write 198.51.100.9/32"},
	})
	ok := doc("ok", `{`+sel+`, ingress: [{fromCIDR: [10.0.0.1/32, "2001:db8::1/128"], fromCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.1/32]}]}]}`)
	if _, err := Load("ok.yaml", []byte(ok)); err != nil {
		t.Fatalf("prefixes with a length: %v", err)
	}
}

// portList renders n ports of one toPorts entry: {port: "1001"}, ...
func portList(first, n int) string {
	var ps []string
	for i := 0; i < n; i++ {
		ps = append(ps, fmt.Sprintf(`{port: "%d", protocol: TCP}`, first+i))
	}
	return "[" + strings.Join(ps, ", ") + "]"
}

// icmpFields renders n ICMP type fields, types first..first+n-1.
func icmpFields(first, n int) string {
	var fs []string
	for i := 0; i < n; i++ {
		fs = append(fs, fmt.Sprintf(`{type: %d}`, first+i))
	}
	return "[" + strings.Join(fs, ", ") + "]"
}

// TestCiliumPortLimit: at most 40 ports in one toPorts entry. Difference 5.
func TestCiliumPortLimit(t *testing.T) {
	runRefusals(t, []refusal{
		{"41 ingress ports", doc("bad", `{`+sel+`, ingress: [{toPorts: [{ports: `+portList(1001, 41)+`}]}]}`), ErrInvalid, "spec.ingress[0].toPorts[0].ports", "several toPorts entries"},
		{"41 egressDeny ports in the second entry", doc("bad", `{`+sel+`, egressDeny: [{toEntities: [world], toPorts: [{ports: [{port: "25"}]}, {ports: `+portList(2001, 41)+`}]}]}`), ErrInvalid, "spec.egressDeny[0].toPorts[1].ports", "at most 40"},
	})
	runConformanceCase(t, conformanceCase{name: "40 ports, and 41 over two entries",
		docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: `+portList(1001, 40)+`}]}, {toPorts: [{ports: `+portList(3001, 40)+`}, {ports: [{port: "4001"}]}]}]}`)},
		checks: []check{in("client", 1001, tcp, true), in("client", 1040, tcp, true), in("client", 1041, tcp, false),
			in("world", 3001, tcp, true), in("world", 3040, tcp, true), in("world", 4001, udp, true), in("world", 1001, tcp, false)}})
}

// TestCiliumICMPFieldLimit: at most 40 fields in one icmps entry.
// Difference 6.
func TestCiliumICMPFieldLimit(t *testing.T) {
	runRefusals(t, []refusal{
		{"41 ingress fields", doc("bad", `{`+sel+`, ingress: [{icmps: [{fields: `+icmpFields(1, 41)+`}]}]}`), ErrInvalid, "spec.ingress[0].icmps[0].fields", "several icmps entries"},
		{"41 egress fields in the second entry", doc("bad", `{`+sel+`, egress: [{toEntities: [world], icmps: [{fields: [{type: 8}]}, {fields: `+icmpFields(100, 41)+`}]}]}`), ErrInvalid, "spec.egress[0].icmps[1].fields", "at most 40"},
	})
	runConformanceCase(t, conformanceCase{name: "40 fields, and 41 over two entries",
		docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], icmps: [{fields: `+icmpFields(1, 40)+`}]}, {fromEntities: [world], icmps: [{fields: `+icmpFields(100, 40)+`}, {fields: [{type: 200}]}]}]}`)},
		checks: []check{in("client", 1, icmp, true), in("client", 40, icmp, true), in("client", 41, icmp, false),
			in("world", 100, icmp, true), in("world", 139, icmp, true), in("world", 200, icmp, true), in("world", 140, icmp, false)}})
}

// refusal is a document Load must refuse: with sentinel, naming field,
// saying text, in a message that starts lower-case.
type refusal struct {
	name     string
	data     string
	sentinel error
	field    string
	text     string
}

func runRefusals(t *testing.T, rs []refusal) {
	t.Helper()
	for _, r := range rs {
		t.Run("refused: "+r.name, func(t *testing.T) {
			ps, err := Load("x.yaml", []byte(r.data))
			if err == nil {
				t.Fatalf("Load accepted it: %+v", ps)
			}
			var le *LoadError
			if !errors.As(err, &le) {
				t.Fatalf("error %v is %T, want *LoadError", err, err)
			}
			if !errors.Is(err, r.sentinel) {
				t.Errorf("error %q is not %v", err, r.sentinel)
			}
			if le.Field != r.field {
				t.Errorf("error %q names field %q, want %q", err, le.Field, r.field)
			}
			if !strings.Contains(le.Err.Error(), r.text) {
				t.Errorf("error %q does not say %q", err, r.text)
			}
			_, why, _ := strings.Cut(le.Err.Error(), ": ")
			if first := []rune(why + " ")[0]; unicode.IsUpper(first) {
				t.Errorf("error %q does not start lower-case", err)
			}
		})
	}
}

// engineFor is an engine holding ps, the test universe and endpoint 1.
func engineFor(t *testing.T, ps []Policy) *Engine {
	t.Helper()
	e, _ := newTestEngine(t)
	if err := e.SetPolicies("s", ps); err != nil {
		t.Fatal(err)
	}
	return e
}
