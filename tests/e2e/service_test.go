package e2e

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

// TestServiceSources drives the service table of a real agent on the
// embedded local store: a [[services]] table of the config, `rackwire
// service add|delete` stored cluster-wide, the config beating the store on
// one frontend (refused at add), refusals of bad input, and every command with --json.
func TestServiceSources(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "rwsc", cidrs: []string{"10.217.70.0/28"}, extra: `
[bgp]
vip_ranges = ["10.96.0.0/16"]

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
backends = ["10.217.70.5:8080", "10.217.99.5:8080"]
`})
	list := func() api.ServiceList {
		var l api.ServiceList
		a.rwJSON(&l, "service", "list")
		return l
	}
	waitList := func(what string, ok func(api.ServiceList) bool) api.ServiceList {
		t.Helper()
		var l api.ServiceList
		for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if l = list(); ok(l) {
				return l
			}
		}
		t.Fatalf("service list never showed %s; last: %+v", what, l)
		return l
	}
	find := func(l api.ServiceList, name string) (api.Service, bool) {
		for _, s := range l.Services {
			if s.Name == name {
				return s, true
			}
		}
		return api.Service{}, false
	}

	waitList("the config's web", func(l api.ServiceList) bool { _, ok := find(l, "web"); return ok })
	var web api.Service
	a.rwJSON(&web, "service", "get", "web")
	if web.Frontend != "10.96.0.10:80/tcp" || web.Source != "config" || web.Active != 2 || web.Total != 2 {
		t.Errorf("service get web = %+v, want 10.96.0.10:80/tcp from config with 2/2 active", web)
	}
	if len(web.Backends) != 2 || !web.Backends[0].Local || web.Backends[1].Local {
		t.Errorf("web backends = %+v, want 10.217.70.5 local (in [ipam] cidrs) and 10.217.99.5 not", web.Backends)
	}

	// Stored services reach the table through the store watch.
	var added api.Service
	a.rwJSON(&added, "service", "add", "dns", "--vip", "10.96.0.53", "--port", "53", "--protocol", "udp", "--backends", "10.217.70.6:53,10.217.98.6:53")
	if added.Frontend != "10.96.0.53:53/udp" || added.Total != 2 {
		t.Errorf("service add dns = %+v", added)
	}
	l := waitList("the stored dns", func(l api.ServiceList) bool { s, ok := find(l, "dns"); return ok && s.Source == "store" })
	if len(l.Services) != 2 {
		t.Errorf("service list = %+v, want web and dns", l.Services)
	}
	table := a.rw("service", "list")
	for _, want := range []string{"FRONTEND", "10.96.0.53:53/udp", "dns", "store", "2/2 active", "10.96.0.10:80/tcp"} {
		if !strings.Contains(table, want) {
			t.Errorf("service list table lacks %q:\n%s", want, table)
		}
	}

	// Refusals: the config's frontend, a VIP outside vip_ranges, port 0,
	// a bad backend; each exits 1 and says why.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"service", "add", "web2", "--vip", "10.96.0.10", "--port", "80"}, "of the config already has that name or frontend"},
		{[]string{"service", "add", "far", "--vip", "192.0.2.10", "--port", "80"}, "vip_ranges"},
		{[]string{"service", "add", "zero", "--vip", "10.96.0.11", "--port", "70000"}, "bad port"},
		{[]string{"service", "add", "bk", "--vip", "10.96.0.11", "--port", "80", "--backends", "10.217.70.9"}, "bad backend"},
		{[]string{"service", "delete", "web"}, "it comes from config"},
		{[]string{"service", "get", "nope"}, "no service named"},
	} {
		out, errs, err := a.run(tc.args...)
		if err == nil || !strings.Contains(errs, tc.want) {
			t.Errorf("rackwire %s = %v, %q%q; want exit 1 with %q", strings.Join(tc.args, " "), err, out, errs, tc.want)
		}
	}

	// A stored service leaves the table with delete. (A stored service on
	// a config frontend is refused above; how the merge resolves one that
	// reaches the store anyway is daemon/service's TestMergePrecedence.)
	var del api.Deleted
	a.rwJSON(&del, "service", "delete", "dns")
	if del.Deleted != "dns" {
		t.Errorf("service delete dns = %+v", del)
	}
	waitList("dns gone", func(l api.ServiceList) bool { _, ok := find(l, "dns"); return !ok })

	// Host-originated traffic to a stored service's VIP reaches the
	// backend, an endpoint of this host, over TCP and UDP.
	be := a.addEndpoint("rwscbe", "app=rwsc-web")
	servers(t, be.ns, be.IPv4, 8080)
	a.rw("service", "add", "hostweb", "--vip", "10.96.0.30", "--port", "80", "--backends", be.IPv4+":8080")
	a.rw("service", "add", "hostudp", "--vip", "10.96.0.30", "--port", "53", "--protocol", "udp", "--backends", be.IPv4+":8080")
	waitList("hostweb and hostudp programmed", func(l api.ServiceList) bool {
		_, ok1 := find(l, "hostweb")
		_, ok2 := find(l, "hostudp")
		return ok1 && ok2 && l.Programmed
	})
	ok := 0
	var lastErr error
	for i := 0; i < 20; i++ {
		if lastErr = tcpReq("", "10.96.0.30:80", 2*time.Second); lastErr == nil {
			ok++
		}
	}
	if ok != 20 {
		t.Errorf("host → VIP 10.96.0.30:80/tcp: %d of 20 requests answered (last error %v), want all", ok, lastErr)
	}
	if err := udpReq("", "10.96.0.30:53", 2*time.Second); err != nil {
		t.Errorf("host → VIP 10.96.0.30:53/udp: %v", err)
	}

	// SIGHUP applies a changed [[services]]: web2 appears.
	b, err := os.ReadFile(a.cfg)
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, []byte("\n[[services]]\nname = \"web2\"\nvip = \"10.96.0.12\"\nport = 443\nbackends = [\"10.217.70.7:443\"]\n")...)
	if err := os.WriteFile(a.cfg, b, 0o644); err != nil {
		t.Fatal(err)
	}
	a.hup()
	waitList("web2 from the reloaded config", func(l api.ServiceList) bool { s, ok := find(l, "web2"); return ok && s.Source == "config" })

	// The list says plainly whether the datapath balances the table.
	l = list()
	b, _ = json.Marshal(l)
	if !l.Programmed && l.Error == "" {
		t.Errorf("service list is not programmed and does not say why: %s", b)
	}
	t.Logf("service list --json: %s", b)
}
