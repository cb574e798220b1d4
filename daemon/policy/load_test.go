package policy

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadAccepts(t *testing.T) {
	tests := []struct {
		name  string
		data  string
		names []string
	}{
		{"one document", doc("a", `{`+sel+`, ingress: [{}]}`), []string{"a"}},
		{"stream of documents", doc("a", `{`+sel+`, ingress: [{}]}`) + "---\n" + doc("b", `{`+sel+`, ingress: [{}]}`) + "--- # trailing\n", []string{"a", "b"}},
		{"leading separator and comments-only document", "# policies\n---\n" + doc("a", `{`+sel+`, ingress: [{}]}`), []string{"a"}},
		{"content on the separator line", "--- " + `{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: inline}, spec: {endpointSelector: {}, ingress: [{}]}}` + "\n", []string{"inline"}},
		{"JSON object", `{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"j"},"spec":{"endpointSelector":{},"ingress":[{}]}}`, []string{"j"}},
		{"JSON array", `[{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"j1"},"spec":{"endpointSelector":{},"ingress":[{}]}},` +
			`{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"j2"},"spec":{"endpointSelector":{},"ingress":[{}]}}]`, []string{"j1", "j2"}},
		{"kind List", "apiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n  metadata: {name: l1}\n  spec: {endpointSelector: {}, ingress: [{}]}\n", []string{"l1"}},
		{"specs", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: s}\nspecs:\n- {endpointSelector: {}, ingress: [{}]}\n- {endpointSelector: {}, ingress: [{}]}\n", []string{"s"}},
		{"clusterwide kind", "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c}\nspec: {endpointSelector: {}, ingress: [{}]}\n", []string{"c"}},
		{"metadata labels, annotations, description", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: m, labels: {team: x}, annotations: {a: b}}\nspec: {endpointSelector: {}, ingress: [{}], description: hi}\n", []string{"m"}},
		{"every L3/L4 field", doc("all", `{endpointSelector: {matchLabels: {"k8s:app": web}, matchExpressions: [{key: "any:env", operator: NotIn, values: [dev]}, {key: tier, operator: Exists}, {key: x, operator: DoesNotExist}, {key: app, operator: In, values: [web]}]},
  ingress: [{fromEndpoints: [{}, {matchLabels: {"reserved:host": ""}}]}, {fromCIDR: [10.0.0.0/8, 192.0.2.1/32], fromCIDRSet: [{cidr: 172.16.0.0/12, except: [172.16.1.0/24]}]}, {fromEntities: [host, remote-node, world, cluster, all, health, init, unmanaged, ingress, none]},
    {toPorts: [{ports: [{port: 80, protocol: TCP}, {port: "8000", endPort: 8100, protocol: UDP}, {port: "3868", protocol: SCTP}, {protocol: ANY}, {port: "8", protocol: ICMP}, {port: "128", protocol: ICMPv6}]}]},
    {icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv6}, {type: "3", family: IPv4}]}]}],
  ingressDeny: [{fromCIDR: ["2001:db8::/32"]}],
  egress: [{toEndpoints: [{}]}, {toCIDR: [0.0.0.0/0]}, {toCIDRSet: [{cidr: "::/0"}]}, {toEntities: [world]}],
  egressDeny: [{toEntities: [world], toPorts: [{ports: [{port: 25}]}]}]}`), []string{"all"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ps, err := Load("t.yaml", []byte(tt.data))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			var names []string
			for _, p := range ps {
				names = append(names, p.Metadata.Name)
			}
			if strings.Join(names, ",") != strings.Join(tt.names, ",") {
				t.Fatalf("Load names = %v, want %v", names, tt.names)
			}
		})
	}
}

func TestLoadRejects(t *testing.T) {
	r := func(spec string) string { return doc("bad", spec) }
	tests := []struct {
		name     string
		data     string
		sentinel error
		field    string // must appear in the error
		text     string // must appear too
	}{
		// Refused features, named as not supported.
		{"L7 http rules", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 80}], rules: {http: [{method: GET}]}}]}]}`), ErrUnsupported, "spec.ingress[0].toPorts[0].rules", "L7"},
		{"L7 dns rules", r(`{` + sel + `, egress: [{toPorts: [{ports: [{port: 53}], rules: {dns: [{matchPattern: "*"}]}}]}]}`), ErrUnsupported, "spec.egress[0].toPorts[0].rules", "not supported"},
		{"L7 kafka rules", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 9092}], rules: {kafka: [{topic: x}]}}]}]}`), ErrUnsupported, "rules", "not supported"},
		{"toFQDNs", r(`{` + sel + `, egress: [{toFQDNs: [{matchName: example.org}]}]}`), ErrUnsupported, "spec.egress[0].toFQDNs", "not supported"},
		{"toServices", r(`{` + sel + `, egress: [{toServices: [{k8sService: {serviceName: x}}]}]}`), ErrUnsupported, "spec.egress[0].toServices", "not supported"},
		{"toGroups", r(`{` + sel + `, egress: [{toGroups: [{aws: {}}]}]}`), ErrUnsupported, "spec.egress[0].toGroups", "not supported"},
		{"fromRequires", r(`{` + sel + `, ingress: [{fromRequires: [{}]}]}`), ErrUnsupported, "spec.ingress[0].fromRequires", "not supported"},
		{"toNodes", r(`{` + sel + `, egress: [{toNodes: [{}]}]}`), ErrUnsupported, "spec.egress[0].toNodes", "not supported"},
		{"nodeSelector", r(`{nodeSelector: {}}`), ErrUnsupported, "spec.nodeSelector", "not supported"},
		{"authentication", r(`{` + sel + `, ingress: [{authentication: {mode: required}}]}`), ErrUnsupported, "spec.ingress[0].authentication", "not supported"},
		{"enableDefaultDeny", r(`{` + sel + `, enableDefaultDeny: {ingress: false}}`), ErrUnsupported, "spec.enableDefaultDeny", "not supported"},
		{"cidrGroupRef", r(`{` + sel + `, ingress: [{fromCIDRSet: [{cidrGroupRef: g}]}]}`), ErrUnsupported, "spec.ingress[0].fromCIDRSet[0].cidrGroupRef", "not supported"},
		{"metadata.namespace", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad, namespace: default}\nspec: {endpointSelector: {}, ingress: [{}]}\n", ErrUnsupported, "metadata.namespace", "not supported"},
		{"named port", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: http}]}]}]}`), ErrUnsupported, "spec.ingress[0].toPorts[0].ports[0].port", "named port"},
		{"host policy", r(`{endpointSelector: {matchLabels: {"reserved:host": ""}}}`), ErrUnsupported, "spec.endpointSelector", "host policies"},
		{"unknown label source", r(`{endpointSelector: {matchLabels: {"container:app": web}}}`), ErrUnsupported, `spec.endpointSelector.matchLabels.container:app`, "label source"},
		{"cidr label source", r(`{` + sel + `, ingress: [{fromEndpoints: [{matchLabels: {"cidr:10.0.0.0/8": ""}}]}]}`), ErrUnsupported, "fromEndpoints[0]", "fromCIDR"},
		{"entity world-ipv4", r(`{` + sel + `, egress: [{toEntities: [world-ipv4]}]}`), ErrUnsupported, "spec.egress[0].toEntities[0]", "not supported"},
		{"ICMP type 0", r(`{` + sel + `, ingress: [{icmps: [{fields: [{type: 0}]}]}]}`), ErrUnsupported, "spec.ingress[0].icmps[0].fields[0].type", "type 0"},
		{"combining peer kinds", r(`{` + sel + `, ingress: [{fromEndpoints: [{}], fromCIDR: [10.0.0.0/8]}]}`), ErrUnsupported, "spec.ingress[0]", "combining fromEndpoints and fromCIDR"},
		// Unknown fields.
		{"typo in a rule", r(`{` + sel + `, ingress: [{fromEndpoint: [{}]}]}`), ErrUnknownField, "spec.ingress[0].fromEndpoint", "not part of"},
		{"unknown top-level field", doc("bad", `{endpointSelector: {}, ingress: [{}]}`) + "status: {}\n", ErrUnknownField, "status", "not part of"},
		{"case matters", r(`{EndpointSelector: {}}`), ErrUnknownField, "spec.EndpointSelector", "not part of"},
		{"unknown selector field", r(`{endpointSelector: {matchLabel: {app: web}}}`), ErrUnknownField, "spec.endpointSelector.matchLabel", ""},
		{"unknown in List", "apiVersion: v1\nkind: List\nitems: []\nextra: 1\n", ErrUnknownField, "extra", ""},
		// Invalid values.
		{"apiVersion", "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec: {endpointSelector: {}, ingress: [{}]}\n", ErrInvalid, "apiVersion", "cilium.io/v2"},
		{"kind", "apiVersion: cilium.io/v2\nkind: NetworkPolicy\nmetadata: {name: bad}\nspec: {endpointSelector: {}, ingress: [{}]}\n", ErrInvalid, "kind", "CiliumNetworkPolicy"},
		{"missing name", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec: {endpointSelector: {}, ingress: [{}]}\n", ErrInvalid, "metadata.name", ""},
		{"upper-case name", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad}\nspec: {endpointSelector: {}, ingress: [{}]}\n", ErrInvalid, "metadata.name", ""},
		{"no spec", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\n", ErrInvalid, "spec", "spec or specs"},
		{"missing endpointSelector", r(`{ingress: [{}]}`), ErrInvalid, "spec.endpointSelector", "required"},
		{"missing endpointSelector in specs", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspecs:\n- {endpointSelector: {}, ingress: [{}]}\n- {}\n", ErrInvalid, "specs[1].endpointSelector", "required"},
		{"bad operator", r(`{endpointSelector: {matchExpressions: [{key: app, operator: Equals, values: [x]}]}}`), ErrInvalid, "spec.endpointSelector.matchExpressions[0].operator", "In, NotIn"},
		{"In without values", r(`{endpointSelector: {matchExpressions: [{key: app, operator: In}]}}`), ErrInvalid, "matchExpressions[0].values", "at least one"},
		{"Exists with values", r(`{endpointSelector: {matchExpressions: [{key: app, operator: Exists, values: [x]}]}}`), ErrInvalid, "matchExpressions[0].values", "no values"},
		{"unknown reserved name", r(`{` + sel + `, ingress: [{fromEndpoints: [{matchLabels: {"reserved:nobody": ""}}]}]}`), ErrInvalid, "fromEndpoints[0].matchLabels", "reserved"},
		{"bad CIDR", r(`{` + sel + `, ingress: [{fromCIDR: [10.0.0.0/33]}]}`), ErrInvalid, "spec.ingress[0].fromCIDR[0]", "not a prefix"},
		{"except outside", r(`{` + sel + `, ingress: [{fromCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]}]}`), ErrInvalid, "spec.ingress[0].fromCIDRSet[0].except[0]", "not a strict part"},
		{"unknown entity", r(`{` + sel + `, ingress: [{fromEntities: [everyone]}]}`), ErrInvalid, "spec.ingress[0].fromEntities[0]", "entity"},
		{"ports and icmps together", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 80}]}], icmps: [{fields: [{type: 8}]}]}]}`), ErrInvalid, "spec.ingress[0]", "separate rule"},
		{"port out of range", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 70000}]}]}]}`), ErrInvalid, "ports[0].port", "range"},
		{"endPort below port", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 90, endPort: 80}]}]}]}`), ErrInvalid, "ports[0].endPort", "below"},
		{"endPort without port", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{endPort: 80}]}]}]}`), ErrInvalid, "ports[0].endPort", "needs a port"},
		{"bad protocol", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 80, protocol: GRE}]}]}]}`), ErrInvalid, "ports[0].protocol", "TCP, UDP"},
		{"ICMP port too big", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: 300, protocol: ICMP}]}]}]}`), ErrInvalid, "ports[0].port", "ICMP type"},
		{"empty ports", r(`{` + sel + `, ingress: [{toPorts: [{ports: []}]}]}`), ErrInvalid, "spec.ingress[0].toPorts[0].ports", "empty"},
		{"bad ICMP family", r(`{` + sel + `, ingress: [{icmps: [{fields: [{type: 8, family: IPv5}]}]}]}`), ErrInvalid, "fields[0].family", "IPv4 or IPv6"},
		{"bad ICMP name", r(`{` + sel + `, ingress: [{icmps: [{fields: [{type: Hello}]}]}]}`), ErrInvalid, "fields[0].type", "ICMP type"},
		{"label value not a string", r(`{endpointSelector: {matchLabels: {app: 1}}}`), ErrInvalid, "spec.endpointSelector.matchLabels.app", "string"},
		{"list where a string list is wanted", r(`{` + sel + `, ingress: [{fromCIDR: 10.0.0.0/8}]}`), ErrInvalid, "spec.ingress[0].fromCIDR", "list"},
		{"port not a number or string", r(`{` + sel + `, ingress: [{toPorts: [{ports: [{port: [80]}]}]}]}`), ErrInvalid, "port", ""},
		{"not YAML", "spec: [unclosed\n", ErrInvalid, "", "not valid YAML"},
		{"duplicate YAML key", doc("bad", `{endpointSelector: {}, endpointSelector: {}}`), ErrInvalid, "", "not valid YAML"},
		{"scalar document", "42\n", ErrInvalid, "", "policy object"},
		{"List without items", "apiVersion: v1\nkind: List\n", ErrInvalid, "items", ""},
		{"list item not an object", "[1]", ErrInvalid, "[0]", ""},
		{"List item error names the item", "apiVersion: v1\nkind: List\nitems:\n- apiVersion: cilium.io/v2\n  kind: CiliumNetworkPolicy\n  metadata: {name: bad}\n  spec: {endpointSelector: {}, ingress: [{toFQDNs: []}]}\n", ErrUnsupported, "items[0].spec.ingress[0].toFQDNs", ""},
		{"duplicate names", doc("bad", `{endpointSelector: {}, ingress: [{}]}`) + "---\n" + doc("bad", `{endpointSelector: {}, ingress: [{}]}`), ErrInvalid, "metadata.name", "document 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ps, err := Load("/etc/rackwire/policies.d/x.yaml", []byte(tt.data))
			if err == nil {
				t.Fatalf("Load accepted it: %+v", ps)
			}
			if ps != nil {
				t.Errorf("Load returned policies with an error")
			}
			if !errors.Is(err, tt.sentinel) {
				t.Errorf("Load error %q is not %v", err, tt.sentinel)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "/etc/rackwire/policies.d/x.yaml: document ") {
				t.Errorf("error %q does not start with the file and document", msg)
			}
			if !strings.Contains(msg, tt.field) || !strings.Contains(msg, tt.text) {
				t.Errorf("error %q does not name %q / say %q", msg, tt.field, tt.text)
			}
			var le *LoadError
			if !errors.As(err, &le) {
				t.Fatalf("error is %T, want *LoadError", err)
			}
		})
	}
}

func TestLoadErrorNamesDocument(t *testing.T) {
	data := doc("good", `{endpointSelector: {}, ingress: [{}]}`) + "---\n" + doc("second", `{endpointSelector: {}, egress: [{toFQDNs: [{matchName: a.example}]}]}`)
	_, err := Load("p.yaml", []byte(data))
	var le *LoadError
	if !errors.As(err, &le) {
		t.Fatalf("Load = %v, want *LoadError", err)
	}
	if le.File != "p.yaml" || le.Doc != 2 || le.Name != "second" || le.Field != "spec.egress[0].toFQDNs" || !errors.Is(err, ErrUnsupported) {
		t.Fatalf("LoadError = %+v", le)
	}
	want := `p.yaml: document 2 ("second"): spec.egress[0].toFQDNs: not supported: DNS-name rules (toFQDNs) are not supported; use toCIDR/toCIDRSet`
	if err.Error() != want {
		t.Fatalf("error text\n got %s\nwant %s", err, want)
	}
}

func TestLoadDir(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"a.yaml":      doc("a", `{endpointSelector: {}, ingress: [{}]}`),
		"b.yml":       doc("b", `{endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: 80}], rules: {}}]}]}`),
		"c.json":      `{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"c"},"spec":{"endpointSelector":{},"ingress":[{}]}}`,
		"notes.txt":   "ignored",
		".hidden.yml": "ignored: [",
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 3 {
		t.Fatalf("LoadDir found %d files, want 3: %+v", len(res), res)
	}
	if res[0].Err != nil || len(res[0].Policies) != 1 || res[2].Err != nil || len(res[2].Policies) != 1 {
		t.Fatalf("good files: %+v / %+v", res[0], res[2])
	}
	if res[1].Err == nil || res[1].Policies != nil || !strings.Contains(res[1].Err.Error(), filepath.Join(dir, "b.yml")) {
		t.Fatalf("bad file: %+v", res[1])
	}
	if res, err := LoadDir(filepath.Join(dir, "missing")); err != nil || res != nil {
		t.Fatalf("LoadDir(missing) = %v, %v", res, err)
	}
}
