package policy

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/rackwire/rackwire/daemon/identity"
)

func newTestEngine(t *testing.T) (*Engine, fakeMaps) {
	t.Helper()
	e := New(nil, Options{})
	for _, ti := range universe() {
		e.UpsertIdentity(ti.id, ti.labels)
	}
	e.UpsertEndpoint(1, idWeb, identity.MustLabels("app", "web"), false)
	m := fakeMaps{}
	m.apply(t, e.Changes())
	return e, m
}

var openEntries = []Entry{{Direction: Ingress}, {Direction: Egress}}

func TestOpenEndpointHoldsWildcards(t *testing.T) {
	e, m := newTestEngine(t)
	got, ok := e.Desired(1)
	if !ok || !cmp.Equal(got, openEntries) {
		t.Fatalf("Desired(1) = %v, %v, want %v", got, ok, openEntries)
	}
	if diff := cmp.Diff(openEntries, m.entries(1)); diff != "" {
		t.Fatalf("applied changes differ:\n%s", diff)
	}
	if _, ok := e.Desired(2); ok {
		t.Fatalf("Desired(2) reports an endpoint that does not exist")
	}
}

func TestQuickstartEntries(t *testing.T) {
	e, m := newTestEngine(t)
	ps, err := LoadFile("../../docs/examples/quickstart.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.SetPolicies("file:quickstart.yaml", ps); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	want := []Entry{
		{Identity: uint32(idClient), Direction: Ingress, Proto: ProtoTCP, Port: 80},
		{Direction: Egress},
	}
	got, _ := e.Desired(1)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("Desired (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(want, m.entries(1)); diff != "" {
		t.Fatalf("applied (-want +got):\n%s", diff)
	}
}

func TestRemovalRestoresOpenness(t *testing.T) {
	e, m := newTestEngine(t)
	if err := e.SetPolicies("store", mustLoad(t, doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`))); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if !e.DeletePolicy("store", "p") {
		t.Fatalf("DeletePolicy reported no policy")
	}
	chs := e.Changes()
	m.apply(t, chs)
	if diff := cmp.Diff(openEntries, m.entries(1)); diff != "" {
		t.Fatalf("after removal (-want +got):\n%s", diff)
	}
	want := []EndpointChange{{Endpoint: 1,
		Add:    []Entry{{Direction: Ingress}},
		Delete: []Entry{{Identity: uint32(idClient), Direction: Ingress}}}}
	if diff := cmp.Diff(want, chs); diff != "" {
		t.Fatalf("Changes (-want +got):\n%s", diff)
	}
	if e.DeletePolicy("store", "p") {
		t.Fatalf("second DeletePolicy reported a policy")
	}
	// Emptying a source does the same.
	if err := e.SetPolicies("f", mustLoad(t, doc("q", `{`+sel+`, egress: [{}]}`))); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if err := e.SetPolicies("f", nil); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if diff := cmp.Diff(openEntries, m.entries(1)); diff != "" {
		t.Fatalf("after emptying source (-want +got):\n%s", diff)
	}
}

func TestRemoveOneOfTwoPolicies(t *testing.T) {
	e, m := newTestEngine(t)
	ps := mustLoad(t,
		doc("a", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`),
		doc("b", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: db}}]}]}`))
	if err := e.SetPolicies("s", ps); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if err := e.SetPolicies("s", ps[1:]); err != nil {
		t.Fatal(err)
	}
	chs := e.Changes()
	m.apply(t, chs)
	want := []Entry{{Identity: uint32(idDB), Direction: Ingress}, {Direction: Egress}}
	if diff := cmp.Diff(want, m.entries(1)); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	if len(chs) != 1 || len(chs[0].Add) != 0 || len(chs[0].Delete) != 1 {
		t.Fatalf("Changes = %+v, want one delete only", chs)
	}
}

func TestIdentityLifecycleIsIncremental(t *testing.T) {
	e, m := newTestEngine(t)
	if err := e.SetPolicies("s", mustLoad(t, doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]}`))); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	late := identity.Make(2, 999) // another cluster's client, arriving later
	e.UpsertIdentity(late, identity.MustLabels("app", "client"))
	chs := e.Changes()
	want := []EndpointChange{{Endpoint: 1, Add: []Entry{{Identity: uint32(late), Direction: Ingress, Proto: ProtoTCP, Port: 80}}}}
	if diff := cmp.Diff(want, chs); diff != "" {
		t.Fatalf("after new identity (-want +got):\n%s", diff)
	}
	m.apply(t, chs)
	// Same labels again: nothing.
	e.UpsertIdentity(late, identity.MustLabels("app", "client"))
	if chs := e.Changes(); len(chs) != 0 {
		t.Fatalf("re-upsert produced changes %+v", chs)
	}
	// Relabelled out of the selection.
	e.UpsertIdentity(late, identity.MustLabels("app", "other"))
	chs = e.Changes()
	want = []EndpointChange{{Endpoint: 1, Delete: []Entry{{Identity: uint32(late), Direction: Ingress, Proto: ProtoTCP, Port: 80}}}}
	if diff := cmp.Diff(want, chs); diff != "" {
		t.Fatalf("after relabel (-want +got):\n%s", diff)
	}
	m.apply(t, chs)
	e.UpsertIdentity(late, identity.MustLabels("app", "client"))
	m.apply(t, e.Changes())
	e.DeleteIdentity(late)
	chs = e.Changes()
	if len(chs) != 1 || len(chs[0].Delete) != 1 || chs[0].Delete[0].Identity != uint32(late) {
		t.Fatalf("after delete: %+v", chs)
	}
	m.apply(t, chs)
	got, _ := e.Desired(1)
	if diff := cmp.Diff(got, m.entries(1)); diff != "" {
		t.Fatalf("(-desired +applied):\n%s", diff)
	}
}

func TestEndpointLifecycle(t *testing.T) {
	e, m := newTestEngine(t)
	if err := e.SetPolicies("s", mustLoad(t, doc("p", `{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}`))); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if diff := cmp.Diff(openEntries, m.entries(1)); diff != "" {
		t.Fatalf("web is selected by a db policy:\n%s", diff)
	}
	// Relabel endpoint 1 as db: now selected.
	e.UpsertEndpoint(1, idDB, identity.MustLabels("app", "db"), false)
	chs := e.Changes()
	if len(chs) != 1 || chs[0].Full {
		t.Fatalf("relabel Changes = %+v, want one difference", chs)
	}
	m.apply(t, chs)
	want := []Entry{{Identity: uint32(idWeb), Direction: Ingress}, {Direction: Egress}}
	if diff := cmp.Diff(want, m.entries(1)); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	// Audit flag alone.
	e.UpsertEndpoint(1, idDB, identity.MustLabels("app", "db"), true)
	chs = e.Changes()
	if len(chs) != 1 || !chs[0].Audit || len(chs[0].Add)+len(chs[0].Delete) != 0 || chs[0].Full {
		t.Fatalf("audit change = %+v", chs)
	}
	if !e.Audit(1) {
		t.Fatalf("Audit(1) = false")
	}
	if chs := e.Changes(); len(chs) != 0 {
		t.Fatalf("idle Changes = %+v", chs)
	}
	e.DeleteEndpoint(1)
	chs = e.Changes()
	if diff := cmp.Diff([]EndpointChange{{Endpoint: 1, Removed: true}}, chs); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	// Added and removed between two reports: the datapath hears nothing.
	e.UpsertEndpoint(7, idWeb, identity.MustLabels("app", "web"), false)
	e.DeleteEndpoint(7)
	if chs := e.Changes(); len(chs) != 0 {
		t.Fatalf("Changes = %+v, want none", chs)
	}
}

func TestPolicySwapKeepsCommonEntries(t *testing.T) {
	e, m := newTestEngine(t)
	old := doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "81", protocol: TCP}]}]}]}`)
	new := doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "82", protocol: TCP}]}]}]}`)
	if err := e.SetPolicies("s", mustLoad(t, old)); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if err := e.SetPolicies("s", mustLoad(t, new)); err != nil {
		t.Fatal(err)
	}
	chs := e.Changes()
	want := []EndpointChange{{Endpoint: 1,
		Add:    []Entry{{Identity: uint32(idClient), Direction: Ingress, Proto: ProtoTCP, Port: 82}},
		Delete: []Entry{{Identity: uint32(idClient), Direction: Ingress, Proto: ProtoTCP, Port: 81}}}}
	if diff := cmp.Diff(want, chs); diff != "" {
		t.Fatalf("swap (-want +got):\n%s", diff)
	}
	// The same content again changes nothing.
	if err := e.SetPolicies("s", mustLoad(t, new)); err != nil {
		t.Fatal(err)
	}
	if chs := e.Changes(); len(chs) != 0 {
		t.Fatalf("identical SetPolicies produced %+v", chs)
	}
}

func TestDenyFlipIsAnAdd(t *testing.T) {
	e, m := newTestEngine(t)
	allow := doc("a", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`)
	deny := doc("d", `{`+sel+`, ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`)
	if err := e.SetPolicies("a", mustLoad(t, allow)); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	if err := e.SetPolicies("d", mustLoad(t, deny)); err != nil {
		t.Fatal(err)
	}
	chs := e.Changes()
	want := []EndpointChange{{Endpoint: 1, Add: []Entry{{Identity: uint32(idClient), Direction: Ingress, Deny: true}}}}
	if diff := cmp.Diff(want, chs); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
}

func TestBadPolicyLeavesOldInForce(t *testing.T) {
	e, m := newTestEngine(t)
	good := mustLoad(t, doc("p", `{`+sel+`, ingress: [{}]}`))
	if err := e.SetPolicies("s", good); err != nil {
		t.Fatal(err)
	}
	m.apply(t, e.Changes())
	bad := []Policy{good[0], good[0]} // duplicate name
	if err := e.SetPolicies("s", bad); !errors.Is(err, ErrInvalid) {
		t.Fatalf("SetPolicies(duplicate) = %v, want ErrInvalid", err)
	}
	broken := good[0]
	broken.Spec = &Rule{} // no endpointSelector
	if err := e.UpsertPolicy("s", broken); err == nil || !strings.Contains(err.Error(), "endpointSelector") {
		t.Fatalf("UpsertPolicy(broken) = %v", err)
	}
	if chs := e.Changes(); len(chs) != 0 {
		t.Fatalf("a refused policy changed entries: %+v", chs)
	}
	if n := len(e.Policies()); n != 1 {
		t.Fatalf("Policies() has %d, want 1", n)
	}
}

func TestCIDRPrefixes(t *testing.T) {
	e := New(nil, Options{})
	if err := e.SetPolicies("s", mustLoad(t, doc("p", `{`+sel+`, egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}, {toCIDR: [0.0.0.0/0, 192.0.2.1/32, "2001:db8::/32"]}]}`))); err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("10.1.0.0/16"),
		netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("2001:db8::/32"),
	}
	if diff := cmp.Diff(want, e.CIDRPrefixes(), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Fatalf("CIDRPrefixes (-want +got):\n%s", diff)
	}
	e.DeletePolicy("s", "p")
	if got := e.CIDRPrefixes(); len(got) != 0 {
		t.Fatalf("after delete CIDRPrefixes = %v", got)
	}
}

func TestCIDRLabels(t *testing.T) {
	p := netip.MustParsePrefix("10.1.2.3/8")
	ls := CIDRLabels(p)
	if got, want := ls.String(), "cidr:10.0.0.0/8=;reserved:world=;"; got != want {
		t.Fatalf("CIDRLabels(%v) = %q, want %q", p, got, want)
	}
	if _, err := identity.ParseCanonical(ls.String()); err != nil {
		t.Fatalf("CIDR labels are not valid identity labels: %v", err)
	}
	back, ok := CIDRFromLabels(ls)
	if !ok || back != p.Masked() {
		t.Fatalf("CIDRFromLabels = %v, %v", back, ok)
	}
	v6 := CIDRLabels(netip.MustParsePrefix("2001:db8::/32"))
	if _, err := identity.ParseCanonical(v6.String()); err != nil {
		t.Fatalf("IPv6 CIDR labels are not valid identity labels: %v", err)
	}
}

func TestTrace(t *testing.T) {
	ipc := map[netip.Addr]identity.ID{
		netip.MustParseAddr("10.250.1.5"): idClient,
		netip.MustParseAddr("10.1.2.3"):   identity.LocalMin + 2,
	}
	e := New(nil, Options{IPLookup: func(a netip.Addr) (identity.ID, bool) { id, ok := ipc[a]; return id, ok }})
	for _, ti := range universe() {
		e.UpsertIdentity(ti.id, ti.labels)
	}
	if err := e.SetPolicies("file:/etc/rackwire/policies.d/web.yaml", mustLoad(t,
		doc("web", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}], ingressDeny: [{fromCIDR: [10.1.0.0/16]}]}`))); err != nil {
		t.Fatal(err)
	}
	web := Subject{Labels: identity.MustLabels("app", "web")}
	client := Subject{Labels: identity.MustLabels("app", "client")}
	tests := []struct {
		name          string
		src, dst      Subject
		port          uint16
		proto         uint8
		verdict       string
		egress, ingrs string
		rule          string
	}{
		{"allowed by rule", client, web, 80, tcp, VerdictAllowed, VerdictOpen, VerdictAllowed, "spec.ingress[0]"},
		{"denied by default", client, web, 81, tcp, VerdictDenied, VerdictOpen, VerdictDeniedByDefault, ""},
		{"from IP of a client", Subject{IP: netip.MustParseAddr("10.250.1.5")}, web, 80, tcp, VerdictAllowed, VerdictOpen, VerdictAllowed, "spec.ingress[0]"},
		{"denied by rule from CIDR", Subject{IP: netip.MustParseAddr("10.1.2.3")}, web, 80, tcp, VerdictDenied, VerdictOpen, VerdictDeniedByRule, "spec.ingressDeny[0]"},
		{"unknown IP is world", Subject{IP: netip.MustParseAddr("198.51.100.1")}, web, 80, tcp, VerdictDenied, VerdictOpen, VerdictDeniedByDefault, ""},
		{"labels without identity", Subject{Labels: identity.MustLabels("app", "client", "new", "yes")}, web, 80, tcp, VerdictAllowed, VerdictOpen, VerdictAllowed, "spec.ingress[0]"},
		{"unselected both sides", web, client, 80, tcp, VerdictAllowed, VerdictOpen, VerdictOpen, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := e.Trace(tt.src, tt.dst, tt.port, tt.proto)
			if err != nil {
				t.Fatal(err)
			}
			if r.Verdict != tt.verdict || r.Egress.Verdict != tt.egress || r.Ingress.Verdict != tt.ingrs || r.Ingress.Rule != tt.rule {
				t.Fatalf("Trace = %+v, want %s (egress %s, ingress %s by %q)", r, tt.verdict, tt.egress, tt.ingrs, tt.rule)
			}
			if tt.rule != "" && (r.Ingress.Policy != "web" || r.Ingress.Source != "file:/etc/rackwire/policies.d/web.yaml") {
				t.Fatalf("deciding policy = %q from %q", r.Ingress.Policy, r.Ingress.Source)
			}
		})
	}
	r, _ := e.Trace(client, web, 80, tcp)
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var top map[string]any
	if err := json.Unmarshal(b, &top); err != nil || top["verdict"] != "allowed" {
		t.Fatalf("JSON %s: top-level verdict = %v (%v)", b, top["verdict"], err)
	}
	if _, err := e.Trace(Subject{Endpoint: 42}, web, 80, tcp); err == nil {
		t.Fatalf("Trace from a missing endpoint succeeded")
	}
}

func TestParsePortProto(t *testing.T) {
	tests := []struct {
		in    string
		port  uint16
		proto uint8
		bad   bool
	}{
		{"80/tcp", 80, tcp, false}, {"53/udp", 53, udp, false}, {"8/icmp", 8, icmp, false},
		{"128/icmpv6", 128, icmp6, false}, {"443", 443, tcp, false}, {"0/any", 0, ProtoAny, false},
		{"x/tcp", 0, 0, true}, {"80/gre", 0, 0, true}, {"70000/tcp", 0, 0, true},
	}
	for _, tt := range tests {
		port, proto, err := ParsePortProto(tt.in)
		if (err != nil) != tt.bad || port != tt.port || proto != tt.proto {
			t.Errorf("ParsePortProto(%q) = %d, %d, %v", tt.in, port, proto, err)
		}
	}
}
