package api

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/rackwire/rackwire/internal/testenv"
)

// Fake callers. The admin group of the tests is gid 4242.
var (
	rootCaller    = Creds{PID: 1, UID: 0, GID: 0}
	adminPrimary  = Creds{PID: 2, UID: 1001, GID: 4242}
	adminSupp     = Creds{PID: 3, UID: 1002, GID: 1002, Groups: []uint32{100, 4242}}
	reader        = Creds{PID: 4, UID: 1003, GID: 1003, Groups: []uint32{100}}
	rootGroupOnly = Creds{PID: 5, UID: 1004, GID: 0, Groups: []uint32{0}}
)

var withGroup = Policy{AdminGroup: "rwadmin", AdminGID: 4242, HasAdminGID: true}

func TestAllows(t *testing.T) {
	noGroup := Policy{}
	// A configured group that could not be resolved: root only.
	unresolved := Policy{AdminGroup: "gone"}
	tests := []struct {
		name   string
		p      Policy
		cr     Creds
		access Access
		want   bool
	}{
		{"root reads", withGroup, rootCaller, Read, true},
		{"root changes", withGroup, rootCaller, Admin, true},
		{"root changes without admin group", noGroup, rootCaller, Admin, true},
		{"admin group as primary gid", withGroup, adminPrimary, Admin, true},
		{"admin group as supplementary group", withGroup, adminSupp, Admin, true},
		{"admin group member reads", withGroup, adminSupp, Read, true},
		{"reader reads", withGroup, reader, Read, true},
		{"reader may not change", withGroup, reader, Admin, false},
		{"no admin group: member of gid 4242 may not change", noGroup, adminSupp, Admin, false},
		{"unresolved admin group: nobody but root", unresolved, adminPrimary, Admin, false},
		// gid 0 is not uid 0: the root group grants nothing, and the zero
		// AdminGID of a Policy without a group must not match it.
		{"root group is not root", noGroup, rootGroupOnly, Admin, false},
		{"root group is not the admin group", withGroup, rootGroupOnly, Admin, false},
		{"invalid access refused even to root", withGroup, rootCaller, invalid, false},
		{"unknown access refused", withGroup, rootCaller, Access(9), false},
	}
	for _, tt := range tests {
		if got := tt.p.Allows(tt.cr, tt.access); got != tt.want {
			t.Errorf("%s: Allows(%+v, %v) = %t, want %t", tt.name, tt.cr, tt.access, got, tt.want)
		}
	}
}

func TestCheckMessages(t *testing.T) {
	ctx := WithCreds(context.Background(), reader)
	if err := withGroup.Check(ctx, Read, "GET /v1/endpoints"); err != nil {
		t.Errorf("reader on a Read route: %v", err)
	}

	err := withGroup.Check(ctx, Admin, "POST /v1/endpoints")
	var he *HTTPError
	if !errors.As(err, &he) || he.Code != http.StatusForbidden {
		t.Fatalf("reader on an Admin route = %v, want a 403", err)
	}
	full := (&Error{Code: he.Code, ErrorBody: ErrorBody{Error: he.Msg, Hint: he.Hint}}).Error()
	for _, w := range []string{"permission denied", "POST /v1/endpoints", "changes the agent", "uid 1003 may only read",
		"run it as root or as a member of the admin group rwadmin ([agent] admin_group)"} {
		if !strings.Contains(full, w) {
			t.Errorf("403 reads %q; want it to contain %q", full, w)
		}
	}

	err = withGroup.Check(ctx, Admin, "GET /v1/bgp/render")
	if !errors.As(err, &he) || !strings.Contains(he.Msg, "shows the agent's configuration") {
		t.Errorf("admin GET refusal = %v, want it to say it shows the configuration", err)
	}

	err = Policy{}.Check(ctx, Admin, "DELETE /v1/policies/{name}")
	if !errors.As(err, &he) || he.Code != http.StatusForbidden || !strings.Contains(he.Hint, "run it as root") ||
		!strings.Contains(he.Hint, "[agent] admin_group") {
		t.Errorf("refusal without admin group = %v (hint %q), want 403 saying root and naming [agent] admin_group", err, he.Hint)
	}

	// No credentials (the server lacks ConnContext): fail closed, for
	// reads too.
	for _, a := range []Access{Read, Admin} {
		err := withGroup.Check(context.Background(), a, "GET /v1/endpoints")
		if !errors.As(err, &he) || he.Code != http.StatusInternalServerError || !strings.Contains(he.Msg, "ConnContext") {
			t.Errorf("%v without credentials = %v, want a 500 naming ConnContext", a, err)
		}
	}
}

func TestNewPolicy(t *testing.T) {
	p, err := NewPolicy("")
	if err != nil || p.HasAdminGID || p.IsAdmin(adminPrimary) {
		t.Errorf(`NewPolicy("") = %+v, %v; want no admin group`, p, err)
	}
	p, err = NewPolicy("rw-no-such-group-x")
	if err == nil || p.HasAdminGID || p.AdminGroup != "rw-no-such-group-x" {
		t.Errorf("NewPolicy(missing) = %+v, %v; want an error and root only", p, err)
	}
	p, err = NewPolicy("root")
	if err != nil || !p.HasAdminGID || p.AdminGID != 0 {
		t.Errorf(`NewPolicy("root") = %+v, %v; want gid 0`, p, err)
	}
}

func TestRouterNeedsADecision(t *testing.T) {
	ok := func(r *http.Request) (any, error) { return nil, nil }
	for _, tc := range []struct {
		name    string
		access  Access
		pattern string
		want    string
	}{
		{"zero access", invalid, "GET /v1/x", "no access decision"},
		{"unknown access", Access(7), "POST /v1/x", "no access decision"},
		{"no method", Read, "/v1/x", "no method"},
		{"read on POST", Read, "POST /v1/x", "cannot be Read"},
		{"read on DELETE", Read, "DELETE /v1/x/{id}", "cannot be Read"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				r := recover()
				if r == nil || !strings.Contains(r.(string), tc.want) {
					t.Errorf("Handle(%v, %q) panicked with %v, want %q", tc.access, tc.pattern, r, tc.want)
				}
			}()
			NewRouter(http.NewServeMux(), Policy{}, nil).Handle(tc.access, tc.pattern, ok)
		})
	}
}

// serveAs serves rt's mux as if every connection came from cr.
func serveAs(mux *http.ServeMux, cr *Creds) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if cr != nil {
			r = r.WithContext(WithCreds(r.Context(), *cr))
		}
		mux.ServeHTTP(w, r)
	})
}

func TestRouterEnforces(t *testing.T) {
	mux := http.NewServeMux()
	rt := NewRouter(mux, withGroup, nil)
	called := map[string]int{}
	h := func(name string) func(r *http.Request) (any, error) {
		return func(r *http.Request) (any, error) { called[name]++; return map[string]string{"ok": name}, nil }
	}
	rt.Handle(Read, "GET /v1/things", h("list"))
	rt.Handle(Admin, "POST /v1/things", h("add"))
	rt.Handle(Admin, "GET /v1/secret", h("secret"))
	rt.HandleFunc(Read, "GET /v1/stream", func(w http.ResponseWriter, r *http.Request) { called["stream"]++ })

	want := []Route{{"GET /v1/things", Read}, {"POST /v1/things", Admin}, {"GET /v1/secret", Admin}, {"GET /v1/stream", Read}}
	if got := rt.Routes(); !slices.Equal(got, want) {
		t.Errorf("Routes() = %v, want %v", got, want)
	}

	for _, tc := range []struct {
		who  string
		cr   *Creds
		req  string
		code int
	}{
		{"reader", &reader, "GET /v1/things", 200},
		{"reader", &reader, "GET /v1/stream", 200},
		{"reader", &reader, "POST /v1/things", 403},
		{"reader", &reader, "GET /v1/secret", 403},
		{"admin", &adminSupp, "POST /v1/things", 200},
		{"admin", &adminSupp, "GET /v1/secret", 200},
		{"root", &rootCaller, "POST /v1/things", 200},
		{"nobody", nil, "GET /v1/things", 500},
		{"nobody", nil, "POST /v1/things", 500},
	} {
		before := maps.Clone(called)
		method, path, _ := strings.Cut(tc.req, " ")
		rec := httptest.NewRecorder()
		serveAs(mux, tc.cr).ServeHTTP(rec, httptest.NewRequest(method, path, nil))
		if rec.Code != tc.code {
			t.Errorf("%s %s = %d %s, want %d", tc.who, tc.req, rec.Code, rec.Body, tc.code)
		}
		ran := !maps.Equal(before, called)
		if ran != (tc.code == 200) {
			t.Errorf("%s %s: handler ran = %t with answer %d", tc.who, tc.req, ran, rec.Code)
		}
		if tc.code == 403 {
			var body ErrorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Hint == "" || !strings.Contains(body.Error, "permission denied") {
				t.Errorf("%s %s: 403 body %s, want an error and a hint", tc.who, tc.req, rec.Body)
			}
		}
	}
}

// TestConnContextReadsThePeer serves on a real unix socket with
// ConnContext and checks that the handler sees this process's credentials.
func TestConnContextReadsThePeer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Creds, 1)
	srv := &http.Server{ConnContext: ConnContext, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cr, err := PeerCreds(r.Context())
		if err != nil {
			t.Errorf("PeerCreds: %v", err)
		}
		got <- cr
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	c := NewClient(sock)
	if err := c.Do(context.Background(), "GET", "/", nil, nil); err != nil {
		var ae *Error
		if !errors.As(err, &ae) {
			t.Fatal(err)
		}
	}
	cr := <-got
	if int(cr.PID) != os.Getpid() || int(cr.UID) != os.Geteuid() || int(cr.GID) != os.Getegid() {
		t.Errorf("creds = %+v, want pid %d uid %d gid %d", cr, os.Getpid(), os.Geteuid(), os.Getegid())
	}
	groups, _ := os.Getgroups()
	var want []uint32
	for _, g := range groups {
		want = append(want, uint32(g))
	}
	slices.Sort(want)
	have := slices.Clone(cr.Groups)
	slices.Sort(have)
	if !slices.Equal(have, want) {
		t.Errorf("groups = %v, want %v", have, want)
	}
}

// TestConnContextManyGroups has a child process with 100 supplementary
// groups call: more than peerGroups' first buffer holds.
func TestConnContextManyGroups(t *testing.T) {
	testenv.RequireRoot(t) // to give a child process other groups
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Creds, 1)
	srv := &http.Server{ConnContext: ConnContext, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cr, err := PeerCreds(r.Context())
		if err != nil {
			t.Errorf("PeerCreds: %v", err)
		}
		got <- cr
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	var groups []uint32
	for g := uint32(50000); g < 50100; g++ {
		groups = append(groups, g)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "RW_AUTH_HELPER_SOCK="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: 4242, Groups: groups}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	cr := <-got
	have := slices.Clone(cr.Groups)
	slices.Sort(have)
	if cr.GID != 4242 || !slices.Equal(have, groups) {
		t.Errorf("creds = gid %d, %d groups %v; want gid 4242 and groups 50000..50099", cr.GID, len(have), have)
	}
	// The same caller without uid 0: its primary gid is the admin group.
	if nonRoot := (Creds{UID: 1001, GID: cr.GID, Groups: cr.Groups}); !withGroup.IsAdmin(nonRoot) {
		t.Errorf("%+v is not admin, want admin by its primary gid 4242", nonRoot)
	}
}

// TestMain runs the child of TestConnContextManyGroups when it is asked
// to: call the socket once and exit, with no test run.
func TestMain(m *testing.M) {
	if sock := os.Getenv("RW_AUTH_HELPER_SOCK"); sock != "" {
		_ = NewClient(sock).Do(context.Background(), "GET", "/", nil, nil)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestConnContextNotUnix(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := PeerCreds(ConnContext(context.Background(), a)); err == nil {
		t.Error("PeerCreds on a pipe: no error, want one")
	}
}

func TestProcGroups(t *testing.T) {
	proc := t.TempDir()
	write := func(pid, body string) {
		if err := os.MkdirAll(filepath.Join(proc, pid), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(proc, pid, "status"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("10", "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t1000\t1000\t1000\t1000\nGroups:\t24 4242 \nNSpid:\t10\n")
	write("11", "Name:\tx\nUid:\t0\t0\t0\t0\nGroups:\t\n")
	if got := procGroups(proc, 10, 1001); !slices.Equal(got, []uint32{24, 4242}) {
		t.Errorf("groups of pid 10 as uid 1001 = %v", got)
	}
	// The effective uid differs: not the process that connected.
	if got := procGroups(proc, 10, 1000); got != nil {
		t.Errorf("groups of pid 10 as uid 1000 = %v, want none", got)
	}
	if got := procGroups(proc, 11, 0); len(got) != 0 {
		t.Errorf("groups of pid 11 = %v, want none", got)
	}
	// The pid exited.
	if got := procGroups(proc, 12, 0); got != nil {
		t.Errorf("groups of a gone pid = %v, want none", got)
	}
}
