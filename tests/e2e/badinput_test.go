package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/api"
)

// snapshot is what a failed `endpoint add` must leave exactly as it was.
type snapshot struct {
	links  []string // host rw* links
	eps    []string // endpoint list: name/ip
	state  []string // <state_dir>/endpoints
	pins   []string // pin dir
	ipcach int      // ipcache entries
}

func (a *agent) snapshot(t *testing.T) snapshot {
	t.Helper()
	var s snapshot
	s.links = hostLinks(t)
	var eps []api.Endpoint
	a.rwJSON(&eps, "endpoint", "list")
	for _, e := range eps {
		s.eps = append(s.eps, e.Name+"/"+e.IPv4+"/"+e.State)
	}
	ents, _ := os.ReadDir(filepath.Join(a.dir, "state", "endpoints"))
	for _, e := range ents {
		s.state = append(s.state, e.Name())
	}
	ents, _ = os.ReadDir(a.pinDir)
	for _, e := range ents {
		s.pins = append(s.pins, e.Name())
	}
	var ic []api.IPCacheEntry
	a.rwJSON(&ic, "bpf", "ipcache", "list")
	s.ipcach = len(ic)
	return s
}

func (s snapshot) diff(o snapshot) string {
	var d []string
	if !slices.Equal(s.links, o.links) {
		d = append(d, "host links "+strings.Join(s.links, ",")+" -> "+strings.Join(o.links, ","))
	}
	if !slices.Equal(s.eps, o.eps) {
		d = append(d, "endpoints "+strings.Join(s.eps, ",")+" -> "+strings.Join(o.eps, ","))
	}
	if !slices.Equal(s.state, o.state) {
		d = append(d, "state files "+strings.Join(s.state, ",")+" -> "+strings.Join(o.state, ","))
	}
	if !slices.Equal(s.pins, o.pins) {
		d = append(d, "pins "+strings.Join(s.pins, ",")+" -> "+strings.Join(o.pins, ","))
	}
	if s.ipcach != o.ipcach {
		d = append(d, "ipcache entry count changed")
	}
	return strings.Join(d, "; ")
}

// TestEndpointBadInput: every refused `endpoint add` exits non-zero with a
// clear message and leaves nothing behind (no veth on the host nor in the
// namespace, no endpoint, no state file, no map, no ipcache entry).
func TestEndpointBadInput(t *testing.T) {
	require(t)
	// A /30 holds two workload addresses (or fewer): small enough to run out.
	a := newAgent(t, agentOpts{tag: "b", cidrs: []string{"10.217.60.0/30"}, policyMax: 16})
	one := a.addEndpoint("one", "app=one")

	cases := []struct {
		name    string
		args    []string // after --netns, which is a fresh namespace unless given
		netns   string
		wantMsg string
	}{
		{"label key with a space", []string{"--name", "x1", "--labels", "my app=web"}, "", "label"},
		{"label given twice", []string{"--name", "x7", "--labels", "app=a,app=b"}, "", "twice"},
		{"empty label", []string{"--name", "x8", "--labels", "app=a,,b=c"}, "", "empty label"},
		{"labels with empty key", []string{"--name", "x2", "--labels", "=web"}, "", "label"},
		{"netns that does not exist", []string{"--name", "x3", "--labels", "app=x"}, "/run/netns/rwg-b-nonexistent", "namespace"},
		{"ip outside the cidr", []string{"--name", "x4", "--labels", "app=x", "--ip", "10.99.0.1"}, "", "outside"},
		{"ip not an address", []string{"--name", "x5", "--labels", "app=x", "--ip", "10.217.60.x"}, "", "not an IP"},
		{"ip in use", []string{"--name", "x6", "--labels", "app=x", "--ip", one.IPv4}, "", "in use"},
		{"duplicate name", []string{"--name", "one", "--labels", "app=x"}, "", "exists"},
		{"bad name", []string{"--name", "no/slash", "--labels", "app=x"}, "", "name"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ns := c.netns
			fresh := ""
			if ns == "" {
				fresh = newNetns(t, "rwg-b-bad"+string(rune('a'+i)))
				ns = "/run/netns/" + fresh
			}
			before := a.snapshot(t)
			out, errs, err := a.run(append([]string{"endpoint", "add", "--netns", ns}, c.args...)...)
			if err == nil {
				t.Fatalf("endpoint add %v succeeded: %s", c.args, out)
			}
			if !strings.Contains(strings.ToLower(errs), strings.ToLower(c.wantMsg)) || !strings.HasPrefix(errs, "rackwire endpoint add: ") {
				t.Errorf("stderr %q, want a message mentioning %q", errs, c.wantMsg)
			}
			if d := before.diff(a.snapshot(t)); d != "" {
				t.Errorf("half-created: %s", d)
			}
			if fresh != "" {
				if l := sh(t, "ip", "-n", fresh, "-br", "link"); strings.Count(strings.TrimSpace(l), "\n") != 0 {
					t.Errorf("the namespace kept a link:\n%s", l)
				}
			}
		})
	}

	t.Run("full policy map", func(t *testing.T) {
		var es []api.PolicyEntry
		var errs string
		for port := 1; port <= 40; port++ {
			a.rwJSON(&es, "bpf", "policy", "get", "one")
			_, e, err := a.run("bpf", "policy", "add", "one", "--proto", "tcp", "--port", strconv.Itoa(port))
			if err == nil {
				continue
			}
			errs = e
			var after []api.PolicyEntry
			a.rwJSON(&after, "bpf", "policy", "get", "one")
			if len(after) != len(es) {
				t.Errorf("failed add changed the map: %d entries before, %d after", len(es), len(after))
			}
			break
		}
		t.Logf("full map: %q", errs)
		if !strings.Contains(errs, "full") {
			t.Errorf("adding past policy_max_entries = 16: stderr %q, want a message saying the map is full", errs)
		}
		// Room for two keys, and a range that needs three (8000-8099 is
		// stored as three aligned blocks): refused, and none of its keys stay.
		a.rw("bpf", "policy", "delete", "one", "--proto", "tcp", "--port", "1")
		a.rw("bpf", "policy", "delete", "one", "--proto", "tcp", "--port", "2")
		a.rwJSON(&es, "bpf", "policy", "get", "one")
		_, e, err := a.run("bpf", "policy", "add", "one", "--proto", "udp", "--port", "8000-8099")
		var after []api.PolicyEntry
		a.rwJSON(&after, "bpf", "policy", "get", "one")
		switch {
		case err == nil:
			t.Logf("range fitted (the map holds more than its nominal size): %d entries", len(after))
		case !strings.Contains(e, "full"):
			t.Errorf("range into a full map: stderr %q, want a message saying the map is full", e)
		case len(after) != len(es):
			t.Errorf("a refused range left part of its keys: %d entries before, %d after: %+v", len(es), len(after), after)
		}
	})

	t.Run("policy larger than the map", func(t *testing.T) {
		var ports strings.Builder
		for p := 1; p <= 30; p++ {
			fmt.Fprintf(&ports, "            - {port: \"%d\", protocol: TCP}\n", 2*p+1)
		}
		var before []api.PolicyEntry
		a.rwJSON(&before, "bpf", "policy", "get", "one")
		a.importPolicy(t, "rwg-big", cnp("rwg-big", "one", `  ingress:
    - toPorts:
        - ports:
`+ports.String()))
		var st api.Status
		a.rwJSON(&st, "status")
		if st.Policy.State != "degraded" || !strings.Contains(st.Policy.Message, "policy_max_entries") {
			t.Errorf("policy status %+v, want degraded, naming policy_max_entries", st.Policy)
		}
		if st.Endpoints.State != "degraded" {
			t.Errorf("endpoints status %+v, want degraded (an endpoint has a policy error)", st.Endpoints)
		}
		// Fail closed: ingress closed (no ingress entry at all), egress,
		// which no policy selects, still open; the endpoint says why.
		var after []api.PolicyEntry
		a.rwJSON(&after, "bpf", "policy", "get", "one")
		for _, e := range after {
			if e.Direction == "ingress" {
				t.Errorf("a policy that does not fit left ingress entries in force: %+v (before: %d entries)", after, len(before))
				break
			}
		}
		if !slices.ContainsFunc(after, func(e api.PolicyEntry) bool { return e.Direction == "egress" && e.Identity == 0 && e.Proto == "any" }) {
			t.Errorf("egress wildcard gone after an ingress policy that does not fit: %+v", after)
		}
		var ep api.Endpoint
		a.rwJSON(&ep, "endpoint", "get", "one")
		if ep.State != "policy-error" || !strings.Contains(ep.PolicyReason, "ingress closed") {
			t.Errorf("endpoint after a policy that does not fit: state %q reason %q; want policy-error, ingress closed", ep.State, ep.PolicyReason)
		}
		// The policy goes: the endpoint is open again and enforced.
		a.rw("policy", "delete", "rwg-big")
		a.rwJSON(&ep, "endpoint", "get", "one")
		if ep.State != "ready" {
			t.Errorf("after the big policy was deleted: state %q (%s), want ready", ep.State, ep.PolicyReason)
		}
	})

	t.Run("exhausted cidr", func(t *testing.T) {
		// Fill the /30, then one more must fail cleanly.
		var errs string
		for i := 0; i < 4; i++ {
			ns := newNetns(t, "rwg-b-fill"+string(rune('a'+i)))
			before := a.snapshot(t)
			_, e, err := a.run("endpoint", "add", "--name", "fill"+string(rune('a'+i)), "--netns", "/run/netns/"+ns, "--labels", "app=fill")
			if err == nil {
				continue
			}
			errs = e
			if d := before.diff(a.snapshot(t)); d != "" {
				t.Errorf("half-created: %s", d)
			}
			break
		}
		if !strings.Contains(errs, "exhausted") {
			t.Errorf("no exhaustion error after filling the /30 (last stderr %q)", errs)
		}
	})
	if v := a.snapshot(t); len(v.eps) > 3 {
		t.Errorf("a /30 holds more than 2 endpoints: %v", v.eps)
	}

	t.Run("delete removes everything", func(t *testing.T) {
		a.rw("endpoint", "delete", "one")
		s := a.snapshot(t)
		if slices.Contains(s.links, one.HostIfName) {
			t.Errorf("host veth %s still there: %v", one.HostIfName, s.links)
		}
		for _, e := range s.eps {
			if strings.HasPrefix(e, "one/") {
				t.Errorf("endpoint list still has it: %v", s.eps)
			}
		}
		pin := fmt.Sprintf("rw_policy_%05d", one.ID)
		if slices.Contains(s.pins, pin) {
			t.Errorf("%s still pinned", pin)
		}
		if slices.Contains(s.state, fmt.Sprintf("%05d.json", one.ID)) {
			t.Errorf("state file still there: %v", s.state)
		}
		var ic api.IPCacheEntry
		a.rwJSON(&ic, "bpf", "ipcache", "get", one.IPv4)
		if ic.Identity == one.Identity {
			t.Errorf("ipcache still maps %s to the endpoint: %+v", one.IPv4, ic)
		}
		if l := sh(t, "ip", "-n", one.ns, "-br", "link"); strings.Count(strings.TrimSpace(l), "\n") != 0 {
			t.Errorf("the namespace kept a link:\n%s", l)
		}
		// Its name and address are free again.
		var ep api.Endpoint
		a.rwJSON(&ep, "endpoint", "add", "--name", "one", "--netns", "/run/netns/"+one.ns, "--labels", "app=one", "--ip", one.IPv4)
		if ep.IPv4 != one.IPv4 || ep.State != "ready" {
			t.Errorf("re-added endpoint: %+v", ep)
		}
	})
}
