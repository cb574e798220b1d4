package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/rackwire/rackwire/daemon/identity"
)

// The identity universe of the conformance suite.
var (
	idWeb    = identity.Make(1, 256)
	idClient = identity.Make(1, 257)
	idDB     = identity.Make(1, 258)
	idOther  = identity.Make(1, 259)
	idNoApp  = identity.Make(1, 260)
)

type testIdentity struct {
	id     identity.ID
	labels identity.Labels
}

func universe() map[string]testIdentity {
	u := map[string]testIdentity{
		"web":    {idWeb, identity.MustLabels("app", "web")},
		"client": {idClient, identity.MustLabels("app", "client")},
		"db":     {idDB, identity.MustLabels("app", "db", "tier", "backend")},
		"other":  {idOther, identity.MustLabels("app", "other", "env", "prod")},
		"noapp":  {idNoApp, identity.MustLabels("role", "batch")},
	}
	for id, n := range identity.Reserved() {
		u[n] = testIdentity{id, identity.ReservedLabels(id)}
	}
	for i, c := range []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.168.0.0/16", "2001:db8::/32"} {
		p := netip.MustParsePrefix(c)
		u[c] = testIdentity{identity.LocalMin + identity.ID(i), CIDRLabels(p)}
	}
	return u
}

const tcp, udp, sctp, icmp, icmp6 = ProtoTCP, ProtoUDP, ProtoSCTP, ProtoICMP, ProtoICMPv6

type check struct {
	dir   uint8
	peer  string
	port  uint16
	proto uint8
	want  bool
}

func in(peer string, port uint16, proto uint8, want bool) check {
	return check{Ingress, peer, port, proto, want}
}
func out(peer string, port uint16, proto uint8, want bool) check {
	return check{Egress, peer, port, proto, want}
}

// doc wraps a flow-style spec in a policy document.
func doc(name, spec string) string {
	return fmt.Sprintf("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: %s}\nspec: %s\n", name, spec)
}

const sel = "endpointSelector: {matchLabels: {app: web}}"

// lookup is the datapath's decision over an entry list (docs/datapath.md
// "Lookup order"): any matching deny drops, else any matching allow
// passes, else drop.
func lookup(es []Entry, id uint32, dir uint8, dport uint16, proto uint8) bool {
	allow, deny := false, false
	for _, e := range es {
		if e.Direction != dir || (e.Identity != 0 && e.Identity != id) || (e.Proto != 0 && e.Proto != proto) {
			continue
		}
		if e.Port != 0 {
			if e.EndPort == 0 && dport != e.Port || e.EndPort != 0 && (dport < e.Port || dport > e.EndPort) {
				continue
			}
		}
		if e.Deny {
			deny = true
		} else {
			allow = true
		}
	}
	return allow && !deny
}

// fakeMaps applies Changes the way the datapath does.
type fakeMaps map[uint16]map[Key]bool

func (m fakeMaps) apply(t *testing.T, chs []EndpointChange) {
	t.Helper()
	for _, ch := range chs {
		switch {
		case ch.Removed:
			delete(m, ch.Endpoint)
			continue
		case ch.Full:
			m[ch.Endpoint] = map[Key]bool{}
		}
		mp := m[ch.Endpoint]
		if mp == nil {
			t.Fatalf("change for endpoint %d that the datapath never saw in full", ch.Endpoint)
		}
		for _, e := range ch.Add {
			mp[e.Key()] = e.Deny
		}
		for _, e := range ch.Delete {
			if _, ok := mp[e.Key()]; !ok {
				t.Fatalf("endpoint %d: delete of absent entry %+v", ch.Endpoint, e)
			}
			delete(mp, e.Key())
		}
	}
}

func (m fakeMaps) entries(ep uint16) []Entry {
	var out []Entry
	for k, d := range m[ep] {
		out = append(out, k.entry(d))
	}
	sortEntries(out)
	return out
}

func mustLoad(t testing.TB, docs ...string) []Policy {
	t.Helper()
	ps, err := Load("test.yaml", []byte(strings.Join(docs, "---\n")))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return ps
}

type conformanceCase struct {
	name   string
	docs   []string
	epLbls identity.Labels // default app=web
	checks []check
}

func conformanceCases() []conformanceCase {
	return []conformanceCase{
		// Selection and default deny per direction.
		{name: "no policy: both directions open", checks: []check{
			in("client", 80, tcp, true), in("world", 1, udp, true), out("10.0.0.0/8", 443, tcp, true), out("host", 0, icmp, true)}},
		{name: "policy for another app leaves web open", docs: []string{doc("p", `{endpointSelector: {matchLabels: {app: db}}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, true), out("world", 53, udp, true)}},
		{name: "ingress allow selects ingress only", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("client", 9, udp, true), in("db", 80, tcp, false), in("world", 80, tcp, false), out("world", 443, tcp, true)}},
		{name: "egress allow selects egress only", docs: []string{doc("p", `{`+sel+`, egress: [{toEndpoints: [{matchLabels: {app: db}}]}]}`)},
			checks: []check{out("db", 5432, tcp, true), out("client", 80, tcp, false), out("world", 443, tcp, false), in("world", 80, tcp, true)}},
		{name: "ingress [{}] is default deny", docs: []string{doc("p", `{`+sel+`, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false), in("host", 80, tcp, false), in("world", 0, icmp, false), out("world", 443, tcp, true)}},
		{name: "egress [{}] is default deny", docs: []string{doc("p", `{`+sel+`, egress: [{}]}`)},
			checks: []check{out("client", 80, tcp, false), out("world", 53, udp, false), in("client", 80, tcp, true)}},
		{name: "empty ingress list does not select", docs: []string{doc("p", `{`+sel+`, ingress: [], egress: [{toEntities: [world]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("world", 22, tcp, true), out("world", 443, tcp, true), out("db", 80, tcp, false)}},
		{name: "empty endpointSelector selects every endpoint", docs: []string{doc("p", `{endpointSelector: {}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false)}},
		{name: "matchLabels needs every label", docs: []string{doc("p", `{endpointSelector: {matchLabels: {app: web, env: prod}}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, true)}},
		{name: "endpointSelector In", docs: []string{doc("p", `{endpointSelector: {matchExpressions: [{key: app, operator: In, values: [db, web]}]}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false)}},
		{name: "endpointSelector NotIn other value selects", docs: []string{doc("p", `{endpointSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false)}},
		{name: "endpointSelector NotIn own value does not select", docs: []string{doc("p", `{endpointSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, true)}},
		{name: "endpointSelector Exists", docs: []string{doc("p", `{endpointSelector: {matchExpressions: [{key: app, operator: Exists}]}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false)}},
		{name: "endpointSelector DoesNotExist does not select", docs: []string{doc("p", `{endpointSelector: {matchExpressions: [{key: app, operator: DoesNotExist}]}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, true)}},
		{name: "endpointSelector NotIn on absent key selects", epLbls: identity.MustLabels("app", "web"),
			docs:   []string{doc("p", `{endpointSelector: {matchExpressions: [{key: env, operator: NotIn, values: [prod]}]}, ingress: [{}]}`)},
			checks: []check{in("client", 80, tcp, false)}},
		{name: "k8s: source prefix maps to the plain key", docs: []string{doc("p", `{endpointSelector: {matchLabels: {"k8s:app": web}}, ingress: [{fromEndpoints: [{matchLabels: {"k8s:app": client}}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("db", 80, tcp, false)}},
		{name: "any: source prefix maps to the plain key", docs: []string{doc("p", `{endpointSelector: {matchLabels: {"any:app": web}}, ingress: [{fromEndpoints: [{matchExpressions: [{key: "any:tier", operator: Exists}]}]}]}`)},
			checks: []check{in("db", 80, tcp, true), in("client", 80, tcp, false)}},

		// Peer selectors.
		{name: "fromEndpoints {} is every workload, not reserved or CIDR", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("db", 1, udp, true), in("noapp", 80, tcp, true), in("web", 80, tcp, true),
				in("host", 80, tcp, false), in("world", 80, tcp, false), in("remote-node", 80, tcp, false), in("10.0.0.0/8", 80, tcp, false)}},
		{name: "toEndpoints {} is every workload", docs: []string{doc("p", `{`+sel+`, egress: [{toEndpoints: [{}]}]}`)},
			checks: []check{out("db", 5432, tcp, true), out("world", 443, tcp, false), out("host", 443, tcp, false)}},
		{name: "peer In", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [client, db]}]}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("db", 80, tcp, true), in("other", 80, tcp, false), in("noapp", 80, tcp, false)}},
		{name: "peer NotIn includes workloads without the key, not world", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: [client]}]}]}]}`)},
			checks: []check{in("client", 80, tcp, false), in("db", 80, tcp, true), in("noapp", 80, tcp, true), in("world", 80, tcp, false), in("host", 80, tcp, false)}},
		{name: "peer Exists", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchExpressions: [{key: tier, operator: Exists}]}]}]}`)},
			checks: []check{in("db", 80, tcp, true), in("client", 80, tcp, false)}},
		{name: "peer DoesNotExist", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: DoesNotExist}]}]}]}`)},
			checks: []check{in("noapp", 80, tcp, true), in("client", 80, tcp, false), in("host", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "peer matchLabels and matchExpressions together", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: other}, matchExpressions: [{key: env, operator: In, values: [prod]}]}]}]}`)},
			checks: []check{in("other", 80, tcp, true), in("client", 80, tcp, false)}},
		{name: "peer reserved:host label", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {"reserved:host": ""}}]}]}`)},
			checks: []check{in("host", 80, tcp, true), in("client", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "peer reserved:world label is the world entity", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {"reserved:world": ""}}]}]}`)},
			checks: []check{in("world", 80, tcp, true), in("10.1.0.0/16", 80, tcp, true), in("client", 80, tcp, false), in("host", 80, tcp, false)}},
		{name: "several fromEndpoints selectors union", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}, {matchLabels: {app: db}}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("db", 80, tcp, true), in("other", 80, tcp, false)}},

		// Entities.
		{name: "entity host", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [host]}]}`)},
			checks: []check{in("host", 80, tcp, true), in("remote-node", 80, tcp, false), in("client", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "entity remote-node", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [remote-node]}]}`)},
			checks: []check{in("remote-node", 80, tcp, true), in("host", 80, tcp, false)}},
		{name: "entity world includes CIDR identities", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [world]}]}`)},
			checks: []check{in("world", 80, tcp, true), in("10.0.0.0/8", 80, tcp, true), in("2001:db8::/32", 80, tcp, true), in("client", 80, tcp, false), in("host", 80, tcp, false)}},
		{name: "entity cluster", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [cluster]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("host", 80, tcp, true), in("remote-node", 80, tcp, true), in("health", 80, tcp, true), in("init", 80, tcp, true),
				in("world", 80, tcp, false), in("10.0.0.0/8", 80, tcp, false)}},
		{name: "entity all", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("world", 80, tcp, true), in("10.1.2.0/24", 1, udp, true), in("host", 0, icmp, true)}},
		{name: "toEntities world", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [world]}]}`)},
			checks: []check{out("world", 443, tcp, true), out("192.168.0.0/16", 443, tcp, true), out("db", 5432, tcp, false)}},
		{name: "toEntities health and host", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [health, host]}]}`)},
			checks: []check{out("health", 4240, tcp, true), out("host", 53, udp, true), out("remote-node", 53, udp, false)}},

		// Ports and protocols.
		{name: "port 80 TCP only", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("client", 81, tcp, false), in("client", 80, udp, false), in("db", 80, tcp, false)}},
		{name: "protocol ANY covers TCP UDP SCTP", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "53", protocol: ANY}]}]}]}`)},
			checks: []check{in("client", 53, tcp, true), in("client", 53, udp, true), in("client", 53, sctp, true), in("client", 54, udp, false)}},
		{name: "missing protocol is ANY", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: 53}]}]}]}`)},
			checks: []check{in("client", 53, tcp, true), in("client", 53, udp, true), in("client", 80, tcp, false)}},
		{name: "port range", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "8000", endPort: 8080, protocol: TCP}]}]}]}`)},
			checks: []check{in("client", 8000, tcp, true), in("client", 8042, tcp, true), in("client", 8080, tcp, true), in("client", 7999, tcp, false), in("client", 8081, tcp, false), in("client", 8042, udp, false)}},
		{name: "endPort equal to port is a single port", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "9000", endPort: 9000, protocol: UDP}]}]}]}`)},
			checks: []check{in("client", 9000, udp, true), in("client", 9001, udp, false)}},
		{name: "UDP port", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [world], toPorts: [{ports: [{port: "123", protocol: UDP}]}]}]}`)},
			checks: []check{out("world", 123, udp, true), out("world", 123, tcp, false)}},
		{name: "SCTP port", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "3868", protocol: SCTP}]}]}]}`)},
			checks: []check{in("client", 3868, sctp, true), in("client", 3868, tcp, false)}},
		{name: "ports without peers apply to every peer", docs: []string{doc("p", `{`+sel+`, ingress: [{toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]}`)},
			checks: []check{in("world", 80, tcp, true), in("client", 80, tcp, true), in("10.0.0.0/8", 80, tcp, true), in("client", 81, tcp, false)}},
		{name: "several ports and port rules", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "443", protocol: TCP}]}, {ports: [{port: "53", protocol: UDP}]}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("client", 443, tcp, true), in("client", 53, udp, true), in("client", 53, tcp, false)}},
		{name: "ICMP type via icmps", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], icmps: [{fields: [{type: 8, family: IPv4}]}]}]}`)},
			checks: []check{in("client", 8, icmp, true), in("client", 3, icmp, false), in("client", 8, tcp, false), in("client", 8, icmp6, false)}},
		{name: "ICMPv6 type by name", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], icmps: [{fields: [{type: EchoRequest, family: IPv6}]}]}]}`)},
			checks: []check{in("client", 128, icmp6, true), in("client", 8, icmp, false)}},
		{name: "protocol ICMP without port is every type", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{protocol: ICMP}]}]}]}`)},
			checks: []check{in("client", 8, icmp, true), in("client", 3, icmp, true), in("client", 80, tcp, false)}},
		{name: "protocol ANY without port is every protocol", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{protocol: ANY}]}]}]}`)},
			checks: []check{in("client", 8, icmp, true), in("client", 80, tcp, true), in("world", 80, tcp, false)}},
		{name: "TCP without port is every TCP port", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{protocol: TCP}]}]}]}`)},
			checks: []check{in("client", 1, tcp, true), in("client", 65535, tcp, true), in("client", 53, udp, false)}},

		// Deny precedence.
		{name: "ingressDeny beats allow-all", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}], ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`)},
			checks: []check{in("client", 80, tcp, false), in("db", 80, tcp, true), in("world", 80, tcp, true)}},
		{name: "ingressDeny alone selects: default deny", docs: []string{doc("p", `{`+sel+`, ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}]}]}`)},
			checks: []check{in("client", 80, tcp, false), in("db", 80, tcp, false), out("db", 80, tcp, true)}},
		{name: "deny one port beats allow all ports", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}], ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "22", protocol: TCP}]}]}]}`)},
			checks: []check{in("client", 22, tcp, false), in("client", 80, tcp, true), in("client", 22, udp, true)}},
		{name: "deny in one policy beats allow in another", docs: []string{
			doc("allow", `{`+sel+`, ingress: [{fromEndpoints: [{}]}]}`),
			doc("deny", `{endpointSelector: {}, ingressDeny: [{fromEndpoints: [{matchLabels: {app: db}}]}]}`)},
			checks: []check{in("db", 80, tcp, false), in("client", 80, tcp, true)}},
		{name: "egressDeny CIDR beats toEntities all", docs: []string{doc("p", `{`+sel+`, egress: [{toEntities: [all]}], egressDeny: [{toCIDR: [10.0.0.0/8]}]}`)},
			checks: []check{out("10.0.0.0/8", 443, tcp, false), out("10.1.2.0/24", 443, tcp, false), out("192.168.0.0/16", 443, tcp, true), out("world", 443, tcp, true)}},
		{name: "deny world beats allow CIDR", docs: []string{doc("p", `{`+sel+`, ingress: [{fromCIDR: [10.0.0.0/8]}], ingressDeny: [{fromEntities: [world]}]}`)},
			checks: []check{in("10.1.0.0/16", 80, tcp, false), in("world", 80, tcp, false)}},
		{name: "deny port range beats allow inside it", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "8080", protocol: TCP}]}]}], ingressDeny: [{fromEndpoints: [{}], toPorts: [{ports: [{port: "8000", endPort: 8999, protocol: TCP}]}]}]}`)},
			checks: []check{in("client", 8080, tcp, false), in("client", 9000, tcp, false)}},

		// CIDR.
		{name: "fromCIDR matches identities of prefixes inside it", docs: []string{doc("p", `{`+sel+`, ingress: [{fromCIDR: [10.0.0.0/8]}]}`)},
			checks: []check{in("10.0.0.0/8", 80, tcp, true), in("10.1.0.0/16", 80, tcp, true), in("10.1.2.0/24", 80, tcp, true), in("192.168.0.0/16", 80, tcp, false), in("world", 80, tcp, false), in("client", 80, tcp, false)}},
		{name: "fromCIDRSet except carves out", docs: []string{doc("p", `{`+sel+`, ingress: [{fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}]}`)},
			checks: []check{in("10.0.0.0/8", 80, tcp, true), in("10.1.0.0/16", 80, tcp, false), in("10.1.2.0/24", 80, tcp, false)}},
		{name: "longer prefix than the rule is not matched by a shorter identity", docs: []string{doc("p", `{`+sel+`, ingress: [{fromCIDR: [10.1.2.0/24]}]}`)},
			checks: []check{in("10.1.2.0/24", 80, tcp, true), in("10.1.0.0/16", 80, tcp, false), in("10.0.0.0/8", 80, tcp, false)}},
		{name: "toCIDR egress", docs: []string{doc("p", `{`+sel+`, egress: [{toCIDR: [192.168.0.0/16], toPorts: [{ports: [{port: "443", protocol: TCP}]}]}]}`)},
			checks: []check{out("192.168.0.0/16", 443, tcp, true), out("192.168.0.0/16", 80, tcp, false), out("10.0.0.0/8", 443, tcp, false)}},
		{name: "toCIDRSet with except", docs: []string{doc("p", `{`+sel+`, egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.2.0/24]}]}]}`)},
			checks: []check{out("10.1.0.0/16", 443, tcp, true), out("10.1.2.0/24", 443, tcp, false)}},
		{name: "toCIDR 0.0.0.0/0 includes world", docs: []string{doc("p", `{`+sel+`, egress: [{toCIDR: [0.0.0.0/0]}]}`)},
			checks: []check{out("world", 443, tcp, true), out("10.0.0.0/8", 443, tcp, true), out("2001:db8::/32", 443, tcp, false), out("client", 443, tcp, false)}},
		{name: "IPv6 CIDR", docs: []string{doc("p", `{`+sel+`, egress: [{toCIDR: ["2001:db8::/16"]}]}`)},
			checks: []check{out("2001:db8::/32", 443, tcp, true), out("10.0.0.0/8", 443, tcp, false)}},

		// Unions.
		{name: "two policies union", docs: []string{
			doc("a", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]}`),
			doc("b", `{`+sel+`, ingress: [{fromEndpoints: [{matchLabels: {app: db}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]}`)},
			checks: []check{in("client", 80, tcp, true), in("db", 5432, tcp, true), in("client", 5432, tcp, false), in("db", 80, tcp, false)}},
		{name: "specs with several rules", docs: []string{"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: s}\nspecs:\n" +
			"- {" + sel + ", ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]}\n" +
			"- {" + sel + ", egress: [{toEndpoints: [{matchLabels: {app: db}}]}]}\n"},
			checks: []check{in("client", 80, tcp, true), in("db", 80, tcp, false), out("db", 5432, tcp, true), out("world", 443, tcp, false)}},
		{name: "two sections of one rule union", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [host]}, {fromEndpoints: [{matchLabels: {app: client}}]}]}`)},
			checks: []check{in("host", 80, tcp, true), in("client", 80, tcp, true), in("db", 80, tcp, false)}},
		{name: "one policy per direction", docs: []string{
			doc("i", `{`+sel+`, ingress: [{fromEntities: [host]}]}`),
			doc("e", `{endpointSelector: {}, egress: [{toEntities: [host]}]}`)},
			checks: []check{in("host", 80, tcp, true), in("client", 80, tcp, false), out("host", 53, udp, true), out("world", 53, udp, false)}},
		{name: "allow-all entity plus narrower allow", docs: []string{doc("p", `{`+sel+`, ingress: [{fromEntities: [all]}, {fromEndpoints: [{matchLabels: {app: client}}], toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]}`)},
			checks: []check{in("world", 22, tcp, true), in("client", 80, tcp, true)}},
		{name: "kind List of policies", docs: []string{"apiVersion: v1\nkind: List\nitems:\n- " + strings.ReplaceAll(strings.TrimSpace(doc("a", `{`+sel+`, ingress: [{fromEntities: [host]}]}`)), "\n", "\n  ") +
			"\n- " + strings.ReplaceAll(strings.TrimSpace(doc("b", `{`+sel+`, ingress: [{fromEntities: [remote-node]}]}`)), "\n", "\n  ") + "\n"},
			checks: []check{in("host", 80, tcp, true), in("remote-node", 80, tcp, true), in("world", 80, tcp, false)}},
		{name: "JSON array of policies", docs: []string{`[{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "j"}, "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "egress": [{"toEntities": ["world"], "toPorts": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}]}}]`},
			checks: []check{out("world", 443, tcp, true), out("world", 80, tcp, false)}},
	}
}

// build feeds an engine in one of two orders: identities before or after
// the policies and the endpoint. The result must not depend on the order.
func build(t *testing.T, c conformanceCase, identitiesFirst bool) (*Engine, fakeMaps) {
	t.Helper()
	e := New(nil, Options{})
	maps := fakeMaps{}
	u := universe()
	addIDs := func() {
		for _, ti := range u {
			e.UpsertIdentity(ti.id, ti.labels)
			maps.apply(t, e.Changes())
		}
	}
	if identitiesFirst {
		addIDs()
	}
	lbls := c.epLbls
	if lbls == nil {
		lbls = identity.MustLabels("app", "web")
	}
	e.UpsertEndpoint(1, idWeb, lbls, false)
	maps.apply(t, e.Changes())
	for i, d := range c.docs {
		if err := e.SetPolicies(fmt.Sprintf("src%d", i), mustLoad(t, d)); err != nil {
			t.Fatalf("SetPolicies: %v", err)
		}
		maps.apply(t, e.Changes())
	}
	if !identitiesFirst {
		addIDs()
	}
	return e, maps
}

func TestConformance(t *testing.T) {
	cases := conformanceCases()
	if len(cases) < 60 {
		t.Fatalf("conformance suite has %d cases, want at least 60", len(cases))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { runConformanceCase(t, c) })
	}
}

// runConformanceCase builds the case's engine in both orders and checks
// that the entries agree with each other, with the applied changes, with
// every check and with Trace.
func runConformanceCase(t *testing.T, c conformanceCase) {
	t.Helper()
	u := universe()
	e1, m1 := build(t, c, true)
	e2, m2 := build(t, c, false)
	d1, _ := e1.Desired(1)
	d2, _ := e2.Desired(1)
	if diff := cmp.Diff(d1, d2); diff != "" {
		t.Fatalf("entries depend on the order identities arrive (-first +after):\n%s", diff)
	}
	if diff := cmp.Diff(d1, m1.entries(1)); diff != "" {
		t.Fatalf("Changes applied in order differ from Desired (-desired +applied):\n%s", diff)
	}
	if diff := cmp.Diff(d2, m2.entries(1)); diff != "" {
		t.Fatalf("Changes (identities after) differ from Desired (-desired +applied):\n%s", diff)
	}
	for _, ck := range c.checks {
		ti, ok := u[ck.peer]
		if !ok {
			t.Fatalf("unknown peer %q", ck.peer)
		}
		got := lookup(d1, uint32(ti.id), ck.dir, ck.port, ck.proto)
		dirName := map[uint8]string{Ingress: "ingress from", Egress: "egress to"}[ck.dir]
		if got != ck.want {
			t.Errorf("%s %s port %d proto %d: allowed = %v, want %v; entries:\n%v", dirName, ck.peer, ck.port, ck.proto, got, ck.want, d1)
		}
		// Trace must agree with the map, from labels alone.
		var tr TraceResult
		var err error
		if ck.dir == Ingress {
			tr, err = e1.Trace(Subject{Labels: ti.labels}, Subject{Endpoint: 1}, ck.port, ck.proto)
		} else {
			tr, err = e1.Trace(Subject{Endpoint: 1}, Subject{Labels: ti.labels}, ck.port, ck.proto)
		}
		if err != nil {
			t.Fatalf("Trace: %v", err)
		}
		side := tr.Ingress
		if ck.dir == Egress {
			side = tr.Egress
		}
		if passes(side) != ck.want {
			t.Errorf("Trace %s %s port %d proto %d: side = %+v, want allowed %v", dirName, ck.peer, ck.port, ck.proto, side, ck.want)
		}
	}
}
