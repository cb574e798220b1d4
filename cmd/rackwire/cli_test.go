package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/api"
)

// fakeAgent serves canned replies on a unix socket, for CLI formatting
// tests; the real agent is driven in cmd/rackwired and tests/.
func fakeAgent(t *testing.T, mux *http.ServeMux) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "a.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var so, se bytes.Buffer
	code := run(context.Background(), args, &so, &se)
	return code, so.String(), se.String()
}

func TestAgentDown(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	code, _, stderr := runCLI(t, "--socket", sock, "status")
	if code != 1 {
		t.Errorf("exit = %d, want 1", code)
	}
	for _, want := range []string{"rackwired is not running", "systemctl start rackwired", sock} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr = %q, want it to contain %q", stderr, want)
		}
	}
}

func TestStatusTableAndJSON(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		api.WriteJSON(w, 200, api.Status{
			Agent: api.AgentStatus{Version: "1.2.3", Node: "h1", Cluster: "default", ClusterID: 1, Uptime: "5s"},
			Store: api.Component{State: "ok", Detail: map[string]string{"backend": "local"}},
		})
	})
	sock := fakeAgent(t, mux)
	code, out, se := runCLI(t, "status", "--socket", sock)
	if code != 0 {
		t.Fatalf("exit = %d, stderr %s", code, se)
	}
	for _, want := range []string{"rackwired 1.2.3", "h1 (cluster default, id 1)", "Store:", "ok [backend=local]"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runCLI(t, "--socket", sock, "status", "--json")
	var st api.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Agent.Version != "1.2.3" {
		t.Errorf("status --json = %d %q", code, out)
	}
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"nosuch"}, 2, `unknown command "nosuch"`},
		{[]string{"status", "extra"}, 2, "takes no arguments"},
		{[]string{"--bogus"}, 2, "unknown global flag"},
	}
	for _, tt := range tests {
		code, _, se := runCLI(t, tt.args...)
		if code != tt.code || !strings.Contains(se, tt.want) {
			t.Errorf("rackwire %v = %d %q, want %d containing %q", tt.args, code, se, tt.code, tt.want)
		}
	}
}

func TestAgentErrorPassesHint(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		api.WriteJSON(w, 409, api.ErrorBody{Error: "busy", Hint: "try later"})
	})
	sock := fakeAgent(t, mux)
	code, _, se := runCLI(t, "--socket", sock, "status")
	if code != 1 || !strings.Contains(se, "busy; try later") {
		t.Errorf("got %d %q", code, se)
	}
}

func TestGroupHelp(t *testing.T) {
	for _, args := range [][]string{{"policy", "--help"}, {"bpf", "policy", "-h"}, {"help"}, {"--help"}} {
		code, out, se := runCLI(t, args...)
		if code != 0 || !strings.Contains(out, "commands:") || se != "" {
			t.Errorf("rackwire %v = %d %q %q, want help on stdout and exit 0", args, code, out, se)
		}
	}
}

// TestForbiddenSaysWhatToDo: a call the agent refuses (403) prints what was
// refused and, on its own line, the agent's hint.
func TestForbiddenSaysWhatToDo(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("DELETE /v1/endpoints/{ep}", func(w http.ResponseWriter, r *http.Request) {
		api.WriteJSON(w, 403, api.ErrorBody{
			Error: "permission denied: this call (DELETE /v1/endpoints/{ep}) changes the agent, and uid 1001 may only read",
			Hint:  "run it as root or as a member of the admin group netadm ([agent] admin_group)",
		})
	})
	sock := fakeAgent(t, mux)
	code, out, se := runCLI(t, "--socket", sock, "endpoint", "delete", "web")
	want := "rackwire endpoint delete: permission denied: this call (DELETE /v1/endpoints/{ep}) changes the agent, and uid 1001 may only read\n" +
		"rackwire endpoint delete: run it as root or as a member of the admin group netadm ([agent] admin_group)\n"
	if code != 1 || out != "" || se != want {
		t.Errorf("got exit %d, stdout %q, stderr\n%s\nwant exit 1 and stderr\n%s", code, out, se, want)
	}
}

// TestMonitorSuppressedLine: a "suppressed" line of the monitor stream is
// printed as a sentence naming the count, the endpoint and the limit, and
// passes through unchanged with --json.
func TestMonitorSuppressedLine(t *testing.T) {
	lines := []api.Event{
		{Type: "drop", Endpoint: 7, EndpointName: "web", Direction: "egress", Src: "10.0.0.2:1000", Dst: "10.0.0.3:53",
			Proto: "udp", Verdict: "dropped", Reason: "policy denied"},
		{Type: api.EventSuppressed, Endpoint: 7, EndpointName: "web", Suppressed: 12345, Lost: 2, Limit: "100/s, burst 1000, per endpoint"},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/monitor", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		for _, l := range lines {
			_ = enc.Encode(l)
		}
	})
	sock := fakeAgent(t, mux)
	_, out, _ := runCLI(t, "--socket", sock, "monitor")
	for _, want := range []string{"ep=web egress udp 10.0.0.2:1000 -> 10.0.0.3:53",
		"12345 events of endpoint web suppressed (rate limit 100/s, burst 1000, per endpoint); 2 lost (transport full)"} {
		if !strings.Contains(out, want) {
			t.Errorf("monitor output lacks %q:\n%s", want, out)
		}
	}
	_, out, _ = runCLI(t, "--socket", sock, "monitor", "--json")
	var got []api.Event
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var ev api.Event
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatalf("monitor --json line %q: %v", l, err)
		}
		got = append(got, ev)
	}
	if len(got) != 2 || got[1] != lines[1] {
		t.Errorf("monitor --json = %+v, want the suppressed line %+v as sent", got, lines[1])
	}
}

// TestMonitorServiceLine: a service translation shows the VIP and the
// backend it chose; a refusal names the VIP and the reason.
func TestMonitorServiceLine(t *testing.T) {
	lines := []api.Event{
		{Type: "trace", Direction: "egress", Src: "0.0.0.0:0", Dst: "10.211.1.2:8080", VIP: "10.96.0.10:80",
			Proto: "tcp", DstIdentity: 70311, Verdict: "forwarded"},
		{Type: "drop", Direction: "egress", Src: "0.0.0.0:0", Dst: "10.96.0.11:80", VIP: "10.96.0.11:80",
			Proto: "tcp", Verdict: "dropped", Reason: "no service backend"},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/monitor", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		for _, l := range lines {
			_ = enc.Encode(l)
		}
	})
	sock := fakeAgent(t, mux)
	_, out, _ := runCLI(t, "--socket", sock, "monitor")
	for _, want := range []string{"tcp 0.0.0.0:0 -> 10.96.0.10:80 => 10.211.1.2:8080 id 0 [] -> 70311",
		"10.96.0.11:80 => 10.96.0.11:80", "dropped (no service backend)"} {
		if !strings.Contains(out, want) {
			t.Errorf("monitor output lacks %q:\n%s", want, out)
		}
	}
}
