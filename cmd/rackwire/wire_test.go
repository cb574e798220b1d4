package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

// The fake agent answers with the daemon/api wire types; the CLI decodes
// them and `--json` re-encodes them with the same field names and values.

var (
	t0 = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

	fakeBGPStatus = api.BGPStatus{
		Enabled: true, Config: "/etc/bird/bird.conf", Socket: "/run/bird/bird.ctl",
		BirdRunning: true, Drained: true, DrainKeep: true, Announced: []string{"10.1.0.0/24"},
		Protocols: []api.BGPProtocol{{
			Name: "tor1", Proto: "BGP", Table: "---", State: "start", Since: t0, SinceText: "2024-05-06 07:08:09", Info: "Active",
			BGPState: "Active", NeighborAddr: "192.0.2.1", NeighborAS: 65000, LastError: "Received: Bad peer AS",
			RoutesImported: 3, RoutesExported: 4, Channels: map[string]string{"ipv4": "DOWN"}, Reason: "Received: Bad peer AS",
		}},
		BFDSessions: []api.BFDSession{{Protocol: "bfd1", Address: "192.0.2.1", Interface: "eth0", State: "Up", Since: "07:08:09", Interval: time.Second, Timeout: 3 * time.Second}},
		LastApply:   api.BGPApply{Time: t0, Written: true, Error: "birdc configure: syntax error"},
		VIPs:        []api.VIPStatus{{VIP: "10.9.9.9/32", Checked: true, Healthy: false, Announced: false, Type: "tcp", Target: "127.0.0.1:80", FailRun: 2, LastCheck: t0}},
	}
	fakeTrace = api.TraceResult{
		Verdict: "denied",
		Src:     api.TraceResolved{Kind: "workload", Identity: 256, Labels: "app=client"},
		Dst:     api.TraceResolved{Kind: "endpoint", Identity: 257, Labels: "app=web", Endpoint: 7, IP: "10.1.0.7"},
		DPort:   80, Proto: 6,
		Egress:  api.TraceSide{Verdict: "open", RuleIndex: -1, Reason: "no policy selects the source"},
		Ingress: api.TraceSide{Verdict: "denied-by-rule", Source: "store", Policy: "web", Rule: "spec.ingressDeny[0]", RuleIndex: 0, Audit: true, Reason: "a deny rule matches"},
	}
	fakeCT = []api.CTEntry{{
		Src: "10.1.0.5:40000", Dst: "10.1.0.7:80", Proto: 6, Direction: "egress", Endpoint: 5, RemoteIdentity: 257,
		Packets: 1<<53 + 1, Bytes: 12345, TCPFlags: 2, Created: t0, LastSeen: t0.Add(time.Second),
		State: "established", FINOrig: true, Revision: 7, ExpiresIn: 6 * time.Hour,
		NextHop: &api.CTNextHop{Ifindex: 3, MAC: "02:00:00:21:0a:f1", MTU: 1500, Age: 5 * time.Millisecond},
	}}
	fakeCTFlushed = api.CTFlushed{Endpoint: "web", Deleted: 3}
	fakeMetrics   = []api.Metric{{Reason: "policy denied", Direction: "ingress", Packets: 3, Bytes: 180}}
)

func wireAgent(t *testing.T) string {
	mux := http.NewServeMux()
	reply := func(pattern string, v any) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) { api.WriteJSON(w, 200, v) })
	}
	reply("GET /v1/bgp/status", fakeBGPStatus)
	reply("GET /v1/bgp/render", api.BGPRender{Config: "router id 192.0.2.10;\n"})
	reply("POST /v1/bgp/drain", api.BGPDrain{Drained: true, Keep: true})
	reply("POST /v1/bgp/undrain", api.BGPUndrain{Drained: false})
	reply("GET /v1/bpf/ct", fakeCT)
	mux.HandleFunc("POST /v1/bpf/ct/flush", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("endpoint") != "web" {
			api.WriteJSON(w, 400, map[string]string{"error": "want ?endpoint=web"})
			return
		}
		api.WriteJSON(w, 200, fakeCTFlushed)
	})
	reply("GET /v1/bpf/metrics", fakeMetrics)
	reply("POST /v1/bpf/policy/web/allow-all", api.AllowAll{Endpoint: "web", Result: "opened (all traffic allowed in both directions)"})
	reply("DELETE /v1/endpoints/web", api.Deleted{Deleted: "web"})
	reply("DELETE /v1/policies/p1", api.Deleted{Deleted: "p1"})
	reply("GET /v1/policies/p1", []api.PolicyDocument{{Source: "store", Policy: json.RawMessage(`{"apiVersion":"rackwire.io/v1","kind":"NetworkPolicy","metadata":{"name":"p1"}}`)}})
	mux.HandleFunc("POST /v1/policies", func(w http.ResponseWriter, r *http.Request) {
		var in api.PolicyImport
		if err := api.DecodeBody(r, &in); err != nil {
			api.WriteError(w, err)
			return
		}
		if !strings.HasSuffix(in.File, "p1.yaml") || !strings.Contains(in.Data, "name: p1") {
			api.WriteError(w, api.Errorf(400, "", "unexpected import %+v", in))
			return
		}
		api.WriteJSON(w, 200, []api.PolicySummary{{Name: "p1", Source: "store", Rules: 2}})
	})
	mux.HandleFunc("POST /v1/policy/trace", func(w http.ResponseWriter, r *http.Request) {
		var in api.TraceRequest
		if err := api.DecodeBody(r, &in); err != nil {
			api.WriteError(w, err)
			return
		}
		api.WriteJSON(w, 200, fakeTrace)
	})
	mux.HandleFunc("POST /v1/endpoints/web/audit", func(w http.ResponseWriter, r *http.Request) {
		var in api.EndpointAudit
		if err := api.DecodeBody(r, &in); err != nil {
			api.WriteError(w, err)
			return
		}
		api.WriteJSON(w, 200, api.Endpoint{Name: "web", Audit: in.Enabled})
	})
	return fakeAgent(t, mux)
}

// TestJSONIsTheWire checks that `--json` prints what the agent sent: the
// same fields with the same values.
func TestJSONIsTheWire(t *testing.T) {
	sock := wireAgent(t)
	for _, c := range []struct {
		args []string
		sent any
	}{
		{[]string{"bgp", "status"}, fakeBGPStatus},
		{[]string{"bgp", "render"}, api.BGPRender{Config: "router id 192.0.2.10;\n"}},
		{[]string{"bpf", "ct", "list"}, fakeCT},
		{[]string{"bpf", "ct", "flush", "--endpoint", "web"}, fakeCTFlushed},
		{[]string{"bpf", "metrics"}, fakeMetrics},
		{[]string{"bpf", "policy", "allow-all", "web"}, api.AllowAll{Endpoint: "web", Result: "opened (all traffic allowed in both directions)"}},
		{[]string{"endpoint", "delete", "web"}, api.Deleted{Deleted: "web"}},
		{[]string{"policy", "trace", "--src", "app=client", "--dst-endpoint", "web", "--dport", "80/tcp"}, fakeTrace},
		{[]string{"policy", "get", "p1"}, []api.PolicyDocument{{Source: "store", Policy: json.RawMessage(`{"apiVersion":"rackwire.io/v1","kind":"NetworkPolicy","metadata":{"name":"p1"}}`)}}},
	} {
		code, out, se := runCLI(t, append(append([]string{"--socket", sock}, c.args...), "--json")...)
		if code != 0 {
			t.Errorf("rackwire %v --json = %d, stderr %s", c.args, code, se)
			continue
		}
		want, _ := json.Marshal(c.sent)
		var got, exp any
		dec := json.NewDecoder(strings.NewReader(out))
		dec.UseNumber() // compare big counters exactly
		if err := dec.Decode(&got); err != nil {
			t.Errorf("rackwire %v --json printed no JSON: %v\n%s", c.args, err, out)
			continue
		}
		dec = json.NewDecoder(bytes.NewReader(want))
		dec.UseNumber()
		_ = dec.Decode(&exp)
		if !reflect.DeepEqual(got, exp) {
			t.Errorf("rackwire %v --json differs from the reply:\n got %s\nsent %s", c.args, out, want)
		}
	}
}

func TestTypedTables(t *testing.T) {
	sock := wireAgent(t)
	dir := t.TempDir()
	pf := dir + "/p1.yaml"
	if err := os.WriteFile(pf, []byte("metadata:\n  name: p1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"bgp", "status"}, []string{
			"BIRD: running", "Drained: true", "Announced: [10.1.0.0/24]", "Last apply error: birdc configure: syntax error",
			"tor1", "Received: Bad peer AS", "  192.0.2.1 eth0 Up", "VIP 10.9.9.9/32: healthy=false announced=false",
		}},
		{[]string{"bgp", "render"}, []string{"router id 192.0.2.10;"}},
		{[]string{"bgp", "drain"}, []string{"drained: announcements withdrawn"}},
		{[]string{"bgp", "undrain"}, []string{"undrained: announcements restored"}},
		{[]string{"bpf", "ct", "list"}, []string{"egress", "tcp", "10.1.0.5:40000", "10.1.0.7:80", "257", "established", "fin-orig", "6h0m0s", "9007199254740993", "12345", "2024-05-06T07:08:10Z"}},
		{[]string{"bpf", "ct", "flush", "--endpoint", "web"}, []string{"deleted 3 connection-tracking entries of endpoint web"}},
		{[]string{"bpf", "metrics"}, []string{"policy denied", "ingress", "180"}},
		{[]string{"bpf", "policy", "allow-all", "web"}, []string{"endpoint web opened (all traffic allowed in both directions)"}},
		{[]string{"endpoint", "delete", "web"}, []string{"endpoint web deleted"}},
		{[]string{"endpoint", "audit", "web", "on"}, []string{"endpoint web is in audit mode"}},
		{[]string{"policy", "delete", "p1"}, []string{"policy p1 deleted"}},
		{[]string{"policy", "import", pf}, []string{"imported p1 (2 rules)"}},
		{[]string{"policy", "trace", "--src", "app=client", "--dst-endpoint", "web", "--dport", "80/tcp"}, []string{
			"app=client -> app=web on 80/tcp: DENIED",
			"egress of source:", "open: no policy selects the source",
			"denied-by-rule by web spec.ingressDeny[0] (store): a deny rule matches [audit mode: reported, not dropped]",
		}},
	} {
		code, out, se := runCLI(t, append([]string{"--socket", sock}, c.args...)...)
		if code != 0 {
			t.Errorf("rackwire %v = %d, stderr %s", c.args, code, se)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("rackwire %v lacks %q:\n%s", c.args, w, out)
			}
		}
	}
}
