package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// cnp renders one CiliumNetworkPolicy selecting app=<app> with spec body
// (YAML indented under spec:, two spaces).
func cnp(name, app, body string) string {
	return fmt.Sprintf(`apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: %s
spec:
  endpointSelector:
    matchLabels:
      app: %s
%s`, name, app, body)
}

// importPolicy applies a document through `rackwire policy import` and
// removes it (through `policy delete`) in cleanup.
func (a *agent) importPolicy(t *testing.T, name, doc string) {
	t.Helper()
	f := filepath.Join(a.dir, name+".yaml")
	writeFile(t, f, doc)
	a.rw("policy", "import", f)
	t.Cleanup(func() { _, _, _ = a.run("policy", "delete", name) })
}

// waitPolicies waits until `policy list` names exactly want (sorted as
// given is not required).
func (a *agent) waitPolicies(t *testing.T, want ...string) {
	t.Helper()
	err := eventually(10*time.Second, func() error {
		var ps []api.PolicySummary
		out, _, err := a.run("policy", "list", "--json")
		if err != nil {
			return err
		}
		if err := json.Unmarshal([]byte(out), &ps); err != nil {
			return err
		}
		got := map[string]bool{}
		for _, p := range ps {
			got[p.Name] = true
		}
		if len(got) != len(want) {
			return fmt.Errorf("policies %v, want %v", got, want)
		}
		for _, w := range want {
			if !got[w] {
				return fmt.Errorf("policies %v, want %v", got, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// trace runs `rackwire policy trace` and returns the verdict.
func (a *agent) trace(t *testing.T, args ...string) string {
	t.Helper()
	var out map[string]any
	a.rwJSON(&out, append([]string{"policy", "trace"}, args...)...)
	v, _ := out["verdict"].(string)
	return v
}

// TestPolicy is issue 4's real-traffic test: policy files applied through
// the CLI and through the policy directory, enforced on real traffic.
func TestPolicy(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "p", cidrs: []string{"10.217.40.0/24"}})
	web := a.addEndpoint("web", "app=web,tier=front")
	client := a.addEndpoint("client", "app=client")
	other := a.addEndpoint("other", "app=other")
	servers(t, web.ns, web.IPv4, 8080, 9090)
	// An outside network that is no endpoint: its addresses are CIDR or
	// world identities, never endpoint identities.
	ext := external(t, "rwg-p-ext", "rwgpext", "10.218.40.1/24", "10.218.40.2", "10.218.40.3")
	servers(t, ext, "10.218.40.2", 8080)
	servers(t, ext, "10.218.40.3", 8080)
	ext2, ext3 := "10.218.40.2:8080", "10.218.40.3:8080"
	mon := a.startMonitor("drop")

	// Nothing selected: open.
	mustPass(t, "no policy: other->web tcp/9090", tcpReq(other.ns, addr(web, 9090), okTimeout))
	mustPass(t, "no policy: client->ext .3", tcpReq(client.ns, ext3, okTimeout))

	t.Run("l3 allow by labels", func(t *testing.T) {
		a.importPolicy(t, "rwg-l3", cnp("rwg-l3", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
`))
		mustPass(t, "client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))
		mustPass(t, "client->web tcp/9090", tcpReq(client.ns, addr(web, 9090), okTimeout))
		mustPass(t, "client->web udp/9090", udpReq(client.ns, addr(web, 9090), okTimeout))
		mustPass(t, "client->web icmp", ping(client.ns, web.IPv4))
		mustFail(t, "other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))
		mustFail(t, "other->web icmp", ping(other.ns, web.IPv4))
		mon.wait(t, "drop other->web", 3*time.Second, func(ev api.Event) bool {
			return ev.Reason == "policy denied" && ev.EndpointName == "web" && strings.HasPrefix(ev.Src, other.IPv4+":")
		})
		// web's egress is not selected: still open.
		mustPass(t, "web->other icmp", ping(web.ns, other.IPv4))
		if v := a.trace(t, "--src-endpoint", "client", "--dst-endpoint", "web", "--dport", "8080/tcp"); v != "allowed" {
			t.Errorf("trace client->web: %q, want allowed", v)
		}
		if v := a.trace(t, "--src", "app=other", "--dst", "app=web", "--dport", "8080/tcp"); v != "denied" {
			t.Errorf("trace app=other->app=web: %q, want denied", v)
		}
	})
	mustPass(t, "policy deleted: other->web tcp/8080 open again", tcpReq(other.ns, addr(web, 8080), okTimeout))

	t.Run("l4 one port from policy_dir and SIGHUP", func(t *testing.T) {
		f := filepath.Join(a.polDir, "l4.yaml")
		writeFile(t, f, cnp("rwg-l4", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
`))
		a.hup()
		a.waitPolicies(t, "rwg-l4")
		// The reload applies asynchronously after the list shows it.
		if err := eventually(5*time.Second, func() error {
			if tcpReq(client.ns, addr(web, 9090), dropTimeout) == nil {
				return fmt.Errorf("client->web tcp/9090 still passes")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		mustPass(t, "client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))
		mustFail(t, "client->web udp/8080", udpReq(client.ns, addr(web, 8080), dropTimeout))
		mustFail(t, "other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))
		if _, errs, err := a.run("policy", "delete", "rwg-l4"); err == nil || !strings.Contains(errs, "l4.yaml") {
			t.Errorf("policy delete of a file policy: err %v, stderr %q; want a refusal naming the file", err, errs)
		}

		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
		a.hup()
		a.waitPolicies(t)
		if err := eventually(5*time.Second, func() error { return tcpReq(client.ns, addr(web, 9090), dropTimeout) }); err != nil {
			t.Errorf("file removed and SIGHUP: client->web tcp/9090 still dropped: %v", err)
		}
	})

	t.Run("bad documents refused, policies in force stay", func(t *testing.T) {
		f := filepath.Join(a.polDir, "web.yaml")
		good := cnp("rwg-file", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
`)
		writeFile(t, f, good)
		t.Cleanup(func() { _ = os.Remove(f); a.hup() })
		a.hup()
		a.waitPolicies(t, "rwg-file")
		if err := eventually(5*time.Second, func() error {
			if tcpReq(other.ns, addr(web, 8080), dropTimeout) == nil {
				return fmt.Errorf("other->web tcp/8080 still passes")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		// The same file, now also opening web to everyone, but with an
		// unsupported field in a second document: refused as a whole.
		writeFile(t, f, good+`---
`+cnp("rwg-file-fqdn", "web", `  ingress:
    - fromEndpoints:
        - {}
  egress:
    - toFQDNs:
        - matchName: example.invalid
`))
		a.hup()
		if err := eventually(5*time.Second, func() error {
			var st api.Status
			out, _, err := a.run("status", "--json")
			if err != nil {
				return err
			}
			if err := json.Unmarshal([]byte(out), &st); err != nil {
				return err
			}
			if st.Policy.State == "ok" {
				return fmt.Errorf("policy status %+v, want the refused file reported", st.Policy)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		a.waitPolicies(t, "rwg-file")
		mustFail(t, "refused file: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))
		mustPass(t, "refused file: client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))

		// Through the CLI: refused with the field named, nothing imported.
		bad := filepath.Join(a.dir, "bad-import.yaml")
		writeFile(t, bad, cnp("rwg-bad-import", "client", `  egress:
    - toEndpoints:
        - {}
      toPorts:
        - ports:
            - {port: "80", protocol: TCP}
          rules:
            http:
              - method: GET
`))
		_, errs, err := a.run("policy", "import", bad)
		if err == nil || !strings.Contains(errs, "rules") || !strings.Contains(errs, "not supported") || !strings.Contains(errs, "bad-import.yaml") {
			t.Errorf("import of an L7 rule: err %v, stderr %q; want a refusal naming the file and the field", err, errs)
		}
		a.waitPolicies(t, "rwg-file")
		mustPass(t, "after refused import: client->other icmp", ping(client.ns, other.IPv4))
	})
	a.waitPolicies(t)
	mustPass(t, "file removed: other->web tcp/8080", eventually(5*time.Second, func() error {
		return tcpReq(other.ns, addr(web, 8080), dropTimeout)
	}))

	t.Run("egress deny to a CIDR", func(t *testing.T) {
		a.importPolicy(t, "rwg-egress-deny", cnp("rwg-egress-deny", "client", `  egress:
    - toEntities:
        - all
  egressDeny:
    - toCIDR:
        - 10.218.40.3/32
`))
		mustPass(t, "client->ext .2", tcpReq(client.ns, ext2, okTimeout))
		mustPass(t, "client->web", tcpReq(client.ns, addr(web, 8080), okTimeout))
		mustFail(t, "client->ext .3 (denied CIDR)", tcpReq(client.ns, ext3, dropTimeout))
		mustFail(t, "client->ext .3 icmp (denied CIDR)", ping(client.ns, "10.218.40.3"))
		mon.wait(t, "deny-rule drop client->ext .3", 3*time.Second, func(ev api.Event) bool {
			return ev.Reason == "policy deny rule" && ev.EndpointName == "client" && ev.Direction == "egress" && ev.Dst == ext3
		})
		var ic api.IPCacheEntry
		a.rwJSON(&ic, "bpf", "ipcache", "get", "10.218.40.3")
		t.Logf("ipcache 10.218.40.3: %+v", ic)
		if ic.Identity == client.Identity || ic.Identity == web.Identity {
			t.Errorf("outside address resolves to an endpoint identity: %+v", ic)
		}
	})

	t.Run("egress allow to a CIDR only", func(t *testing.T) {
		a.importPolicy(t, "rwg-egress-cidr", cnp("rwg-egress-cidr", "client", `  egress:
    - toCIDR:
        - 10.218.40.2/32
`))
		mustPass(t, "client->ext .2", tcpReq(client.ns, ext2, okTimeout))
		mustFail(t, "client->ext .3", tcpReq(client.ns, ext3, dropTimeout))
		mustFail(t, "client->web (no egress rule for it)", tcpReq(client.ns, addr(web, 8080), dropTimeout))
	})

	t.Run("ingress from host", func(t *testing.T) {
		a.importPolicy(t, "rwg-host", cnp("rwg-host", "web", `  ingress:
    - fromEntities:
        - host
`))
		// The agent runs in the root namespace: that is the host.
		mustPass(t, "host->web tcp/8080", tcpReq("", addr(web, 8080), okTimeout))
		mustPass(t, "host->web icmp", ping("", web.IPv4))
		mustFail(t, "client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), dropTimeout))
		mustFail(t, "ext->web tcp/8080 (world)", tcpReq(ext, addr(web, 8080), dropTimeout))
	})

	t.Run("deny beats allow", func(t *testing.T) {
		a.importPolicy(t, "rwg-deny", cnp("rwg-deny", "web", `  ingress:
    - fromEndpoints:
        - {}
  ingressDeny:
    - fromEndpoints:
        - matchLabels:
            app: other
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
`))
		mustPass(t, "client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))
		mustPass(t, "other->web tcp/9090 (deny is for 8080 only)", tcpReq(other.ns, addr(web, 9090), okTimeout))
		mustFail(t, "other->web tcp/8080 (deny beats allow)", tcpReq(other.ns, addr(web, 8080), dropTimeout))
		mon.wait(t, "deny-rule drop other->web:8080", 3*time.Second, func(ev api.Event) bool {
			return ev.Reason == "policy deny rule" && ev.EndpointName == "web" && ev.Dst == addr(web, 8080) && strings.HasPrefix(ev.Src, other.IPv4+":")
		})
		if v := a.trace(t, "--src-endpoint", "other", "--dst-endpoint", "web", "--dport", "8080/tcp"); v != "denied" {
			t.Errorf("trace other->web 8080: %q, want denied", v)
		}
	})

	t.Run("policy swapped under a running connection", func(t *testing.T) {
		old := cnp("rwg-swap", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
`)
		a.importPolicy(t, "rwg-swap", old)
		conn := startFlow(t, "tcp", client.ns, addr(web, 8080))
		fresh := startFlow(t, "tcp-new", client.ns, addr(web, 8080))
		time.Sleep(300 * time.Millisecond)
		// The same policy rewritten: a port range and another peer.
		a.importPolicy(t, "rwg-swap", cnp("rwg-swap", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
        - matchLabels:
            app: other
      toPorts:
        - ports:
            - {port: "8000", endPort: 8089, protocol: TCP}
`))
		time.Sleep(300 * time.Millisecond)
		mustFail(t, "new policy: client->web tcp/9090", tcpReq(client.ns, addr(web, 9090), dropTimeout))
		mustPass(t, "new policy: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), okTimeout))
		// Then a second policy takes over and the first goes.
		a.importPolicy(t, "rwg-swap2", cnp("rwg-swap2", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
            - {port: "9090", protocol: TCP}
`))
		a.rw("policy", "delete", "rwg-swap")
		time.Sleep(300 * time.Millisecond)
		mustPass(t, "swapped: client->web tcp/9090", tcpReq(client.ns, addr(web, 9090), okTimeout))
		mustFail(t, "swapped: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))
		conn.finish(t, 50)
		fresh.finish(t, 50)
	})
}

// TestAuditMode: with policy_audit_mode a connection policy would drop
// passes and is reported as "audit: would deny".
func TestAuditMode(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "a", cidrs: []string{"10.217.50.0/24"}, audit: true})
	web := a.addEndpoint("web", "app=web")
	client := a.addEndpoint("client", "app=client")
	servers(t, web.ns, web.IPv4, 8080)
	mon := a.startMonitor("audit")
	a.importPolicy(t, "rwg-audit", cnp("rwg-audit", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: nobody
`))
	if v := a.trace(t, "--src-endpoint", "client", "--dst-endpoint", "web", "--dport", "8080/tcp"); v != "denied" {
		t.Errorf("trace client->web: %q, want denied", v)
	}
	mustPass(t, "audit mode: client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))
	ev := mon.wait(t, "audit client->web", 3*time.Second, func(ev api.Event) bool {
		return ev.EndpointName == "web" && ev.Dst == addr(web, 8080)
	})
	if ev.Type != "audit" || ev.Verdict != "audit: would deny" {
		t.Errorf("audit event %+v, want type audit, verdict %q", ev, "audit: would deny")
	}
}
