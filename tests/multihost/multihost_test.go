package multihost

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	rwapi "github.com/rackwire/rackwire/daemon/api"
)

// policyYAML: web accepts TCP 8080 from app=client only; client may send
// only to app=web on TCP 8080. The client side makes host A depend on the
// ipcache entries it learns from Consul (an unknown address is world and
// the egress rule would drop it); the web side makes host B depend on the
// client's entry.
const policyYAML = `apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rwm-web
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rwm-client
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
    - toEndpoints:
        - matchLabels:
            app: web
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
`

// importPolicy imports the test policies through one host's CLI (they go
// to Consul and reach every host) and waits until every host has them.
func importPolicy(t *testing.T, f *fabric, via *host) {
	t.Helper()
	dir := t.TempDir()
	for i, doc := range strings.Split(policyYAML, "---\n") {
		p := filepath.Join(dir, fmt.Sprintf("p%d.yaml", i))
		if err := os.WriteFile(p, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		via.mustCLI(t, "policy", "import", p)
	}
	for _, h := range f.hosts {
		waitFor(t, 30*time.Second, "policies on "+h.name, func() bool {
			out, err := h.cli("policy", "list", "--json")
			return err == nil && strings.Contains(out, "rwm-web") && strings.Contains(out, "rwm-client")
		})
	}
}

// TestTwoHosts: an endpoint on host A reaches an endpoint on host B only
// as B's policy allows, by identities learned through Consul; the CLI
// shows the Consul view; malformed data in Consul is skipped.
func TestTwoHosts(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 2})
	a, b := f.hosts[0], f.hosts[1]
	a.start(t)
	b.start(t)

	client := a.addEndpoint(t, "client", "app=client,env=rwm")
	other := a.addEndpoint(t, "other", "app=other,env=rwm")
	web := b.addEndpoint(t, "web", "app=web,env=rwm")
	web.serve(t)
	importPolicy(t, f, a)

	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Fatalf("client on %s -> web on %s: not allowed after %s", a.name, b.name, d)
	} else {
		t.Logf("client -> web allowed after %s", d.Truncate(time.Millisecond))
	}
	if other.probe(web, 2*time.Second) {
		t.Fatalf("other (app=other) on %s -> web on %s: connected, want dropped by web's ingress policy", a.name, b.name)
	}

	t.Run("cli", func(t *testing.T) { checkCLI(t, f) })
	t.Run("malformed", func(t *testing.T) { checkMalformed(t, f, client, other, web) })
}

// checkCLI: identity list, node list and status show what Consul holds.
func checkCLI(t *testing.T, f *fabric) {
	a, b := f.hosts[0], f.hosts[1]
	idOf := func(h *host, labels string) uint32 {
		var ids []rwapi.Identity
		h.cliJSON(t, &ids, "identity", "list")
		for _, id := range ids {
			if strings.Contains(id.Labels, labels) {
				return id.ID
			}
		}
		return 0
	}
	// The same label set has the same identity on both hosts, learned
	// through Consul (web is used only on B, client only on A).
	for _, l := range []string{"app=web", "app=client"} {
		ia, ib := idOf(a, l), idOf(b, l)
		if ia == 0 || ia != ib {
			t.Errorf("identity of %s: %d on %s, %d on %s, want one non-zero id", l, ia, a.name, ib, b.name)
		}
		if ia>>24 != 1 {
			t.Errorf("identity %d of %s: cluster byte %d, want 1", ia, l, ia>>24)
		}
	}
	var nodes []rwapi.Node
	a.cliJSON(t, &nodes, "node", "list")
	names := map[string]bool{}
	for _, n := range nodes {
		names[n.Name] = true
	}
	for _, h := range f.hosts {
		if !names[h.name] {
			t.Errorf("node list on %s: %v, missing %s", a.name, nodes, h.name)
		}
	}
	for _, h := range f.hosts {
		st, err := h.status()
		if err != nil {
			t.Fatal(err)
		}
		if st.Store.State != rwapi.StateOK {
			t.Errorf("%s: store state %q, want ok (%s)", h.name, st.Store.State, st.Store.Message)
		}
		for _, k := range []string{"leader", "session", "last_contact"} {
			if st.Store.Detail[k] == "" {
				t.Errorf("%s: status store detail %q empty: %v", h.name, k, st.Store.Detail)
			}
		}
		for _, k := range []string{"last_sync", "lag"} {
			if st.Identities.Detail[k] == "" {
				t.Errorf("%s: status identities detail %q empty: %v", h.name, k, st.Identities.Detail)
			}
		}
		txt := h.mustCLI(t, "status")
		for _, w := range []string{st.Store.Detail["leader"], st.Store.Detail["session"]} {
			if !strings.Contains(txt, w) {
				t.Errorf("%s: `rackwire status` does not show %q:\n%s", h.name, w, txt)
			}
		}
	}
	t.Logf("status on %s:\n%s", a.name, a.mustCLI(t, "status"))
}

// checkMalformed writes garbage under every prefix the agents watch and
// checks it is logged and skipped: agents keep running, the datapath
// keeps its entries and verdicts.
func checkMalformed(t *testing.T, f *fabric, client, other, web *endpoint) {
	before := map[string]string{}
	for _, h := range f.hosts {
		before[h.name] = h.mustCLI(t, "bpf", "ipcache", "list", "--json")
	}
	kv := f.consul.Client(t).KV()
	big := bytes.Repeat([]byte("A"), 400*1024)
	bad := map[string][]byte{
		"rackwire/state/ip/v1/default/10.213.99.1":                 []byte("{not json"),
		"rackwire/state/ip/v1/default/10.213.99.2":                 []byte(`{"ip": 5, "identity": "x"}`),
		"rackwire/state/ip/v1/default/10.213.99.3":                 big,
		"rackwire/state/ip/v1/default/10.213.99.4":                 []byte(`{"ip": "10.213.99.4", "identity": -7}`),
		"rackwire/state/identities/v1/id/16777999":                 []byte("\x00\xffgarbage;;=;"),
		"rackwire/state/identities/v1/id/not-a-number":             []byte("app=x;"),
		"rackwire/state/identities/v1/id/16778000":                 big,
		"rackwire/state/identities/v1/value/app=z/hZ":              []byte("banana"),
		"rackwire/state/nodes/v1/default/hZ":                       []byte(`[1,2,3]`),
		"rackwire/state/nodes/v1/default/hY":                       big,
		"rackwire/policies/v1/rwm-garbage":                         []byte("kind: [unclosed"),
		"rackwire/policies/v1/rwm-big":                             big,
		"rackwire/state/ip/v1/default/" + strings.Repeat("9", 200): []byte(`{}`),
	}
	for k, v := range bad {
		if _, err := kv.Put(&api.KVPair{Key: k, Value: v}, nil); err != nil {
			t.Fatalf("put %s: %v", k, err)
		}
	}
	t.Cleanup(func() {
		for k := range bad {
			_, _ = kv.Delete(k, nil)
		}
	})
	// Let every watch fire (the rate limit is well below a second) and
	// the sync loop run.
	time.Sleep(5 * time.Second)
	for _, h := range f.hosts {
		if !h.running() {
			t.Fatalf("rackwired on %s exited after malformed data", h.name)
		}
		if _, err := h.status(); err != nil {
			t.Fatalf("rackwired on %s does not answer after malformed data: %v", h.name, err)
		}
		after := h.mustCLI(t, "bpf", "ipcache", "list", "--json")
		if after != before[h.name] {
			t.Errorf("%s: rw_ipcache changed after malformed data:\nbefore %s\nafter  %s", h.name, before[h.name], after)
		}
		var ids []rwapi.Identity
		h.cliJSON(t, &ids, "identity", "list")
		for _, id := range ids {
			if id.ID == 16777999 || id.ID == 16778000 {
				t.Errorf("%s: identity list has the garbage id %d (%q)", h.name, id.ID, id.Labels)
			}
		}
		log, _ := os.ReadFile(h.logf)
		if !strings.Contains(string(log), "store record refused") {
			t.Errorf("%s: the log does not mention the malformed ipcache entries", h.name)
		}
	}
	if !client.probe(web, 2*time.Second) {
		t.Errorf("client -> web no longer allowed after malformed data")
	}
	if other.probe(web, 2*time.Second) {
		t.Errorf("other -> web allowed after malformed data")
	}
}

// TestThreeHosts: clients and servers on three hosts, allowed and denied
// by identity across every pair that carries traffic.
func TestThreeHosts(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 3})
	for _, h := range f.hosts {
		h.start(t)
	}
	a, b, c := f.hosts[0], f.hosts[1], f.hosts[2]
	clientA := a.addEndpoint(t, "client", "app=client")
	otherA := a.addEndpoint(t, "other", "app=other")
	webB := b.addEndpoint(t, "web", "app=web")
	webC := c.addEndpoint(t, "web", "app=web")
	clientC := c.addEndpoint(t, "client", "app=client")
	otherC := c.addEndpoint(t, "other", "app=other")
	webB.serve(t)
	webC.serve(t)
	importPolicy(t, f, c)

	for _, tc := range []struct {
		name     string
		src, dst *endpoint
		allowed  bool
	}{
		{"A client -> B web", clientA, webB, true},
		{"A client -> C web", clientA, webC, true},
		{"C client -> B web", clientC, webB, true},
		{"A other -> B web", otherA, webB, false},
		{"A other -> C web", otherA, webC, false},
		{"C other -> B web", otherC, webB, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.allowed {
				if d, ok := tc.src.waitProbe(tc.dst, true, 30*time.Second); !ok {
					t.Fatalf("%s: not allowed after %s", tc.name, d)
				}
				return
			}
			if tc.src.probe(tc.dst, 2*time.Second) {
				t.Fatalf("%s: connected, want dropped", tc.name)
			}
		})
	}
}
