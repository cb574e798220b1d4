package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon"
	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/testenv"
)

// TestAPIAuthorization drives the API's access check (docs/security.md)
// with real users: a reader (member of the socket group only) and an
// admin (also a member of [agent] admin_group), both created here and
// removed at the end. The reader runs the read commands of the CLI
// (status, endpoint list, policy list, monitor) and is refused every
// mutating one with a 403 that says what to do; the admin and root may do
// everything.
//
// The walk over every route uses curl --unix-socket, run as each user: it
// is an independent client (the check must hold for any caller of the
// socket, not only for the CLI), exec'd with the user's credentials just
// like the CLI, and it is in `make deps`. The table walked is
// daemon.Routes(), the one the agent registers from, so a new route is
// walked as soon as it exists, and a new route cannot exist without a
// decision (it does not compile; see daemon/handlers.go). The calls carry
// no body and name objects that do not exist, so for admin and root they
// fail in the handler (400, 404, 409) and change nothing: what is checked
// is that the access check let them through (not 403) or stopped them
// (403) before the handler ran.
func TestAPIAuthorization(t *testing.T) {
	require(t)
	for _, c := range []string{"useradd", "userdel", "groupadd", "groupdel", "curl"} {
		testenv.RequireCommand(t, c)
	}
	n := strconv.Itoa(os.Getpid())
	sockGroup, adminGroup := "rwg-sock-"+n, "rwg-adm-"+n
	newGroup(t, sockGroup)
	newGroup(t, adminGroup)
	reader := newUser(t, "rwg-rd-"+n, sockGroup)
	admin := newUser(t, "rwg-ad-"+n, sockGroup, adminGroup)
	root := &testUser{name: "root"}

	a := newAgent(t, agentOpts{tag: "au", cidrs: []string{"10.217.90.0/30"}, socketGroup: sockGroup, adminGroup: adminGroup})
	// The CLI must be reachable by the users: binDir is root's 0700.
	cli := filepath.Join(a.dir, "rackwire")
	copyFile(t, filepath.Join(binDir, "rackwire"), cli, 0o755)

	if fi, err := os.Stat(a.sock); err != nil {
		t.Fatal(err)
	} else if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o660 || st.Uid != 0 || strconv.Itoa(int(st.Gid)) != groupID(t, sockGroup) {
		t.Fatalf("socket %s is %v uid %d gid %d, want 0660 root:%s", a.sock, fi.Mode().Perm(), st.Uid, st.Gid, sockGroup)
	}

	hint := fmt.Sprintf("run it as root or as a member of the admin group %s ([agent] admin_group)", adminGroup)

	t.Run("reader runs the read commands", func(t *testing.T) {
		for _, args := range [][]string{{"status"}, {"endpoint", "list"}, {"policy", "list"}, {"identity", "list"}, {"bpf", "ipcache", "list"}} {
			if out, errs, err := reader.run(a, cli, args...); err != nil {
				t.Errorf("as %s: rackwire %s: %v\n%s%s", reader.name, strings.Join(args, " "), err, out, errs)
			}
		}
		// The stream: refused, it would exit at once with the 403.
		cmd := reader.command(context.Background(), a, cli, "monitor")
		var errb bytes.Buffer
		cmd.Stderr = &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			t.Fatalf("as %s: rackwire monitor exited within a second: %v\n%s", reader.name, err, errb.String())
		case <-time.After(time.Second):
		}
		_ = cmd.Process.Signal(syscall.SIGINT)
		select {
		case err := <-done:
			if err != nil || strings.Contains(errb.String(), "permission denied") {
				t.Errorf("as %s: rackwire monitor stopped with %v\n%s", reader.name, err, errb.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("as %s: rackwire monitor did not stop on SIGINT", reader.name)
		}
	})

	t.Run("reader is refused the mutating commands", func(t *testing.T) {
		pol := filepath.Join(a.dir, "allow.yaml")
		if err := os.WriteFile(pol, []byte(l4Policy("rwg-au")), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{
			{"endpoint", "delete", "rwg-none"}, // refused before the handler: not a 404
			{"endpoint", "add", "--name", "x", "--netns", "/run/netns/rwg-none", "--labels", "app=x"},
			{"policy", "import", pol},
			{"policy", "delete", "rwg-none"},
			{"bgp", "drain"},
			{"bgp", "render"}, // a GET, but admin: it shows configuration
		} {
			out, errs, err := reader.run(a, cli, args...)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(errs, "permission denied") || !strings.Contains(errs, hint) {
				t.Errorf("as %s: rackwire %s = %v, want exit 1 with the 403 and %q\n%s%s", reader.name, strings.Join(args, " "), err, hint, out, errs)
			}
		}
	})

	t.Run("admin group member changes things", func(t *testing.T) {
		pol := filepath.Join(a.dir, "admin.yaml")
		if err := os.WriteFile(pol, []byte(l4Policy("rwg-au-admin")), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{{"policy", "import", pol}, {"policy", "get", "rwg-au-admin"}, {"policy", "delete", "rwg-au-admin"}} {
			if out, errs, err := admin.run(a, cli, args...); err != nil {
				t.Errorf("as %s: rackwire %s: %v\n%s%s", admin.name, strings.Join(args, " "), err, out, errs)
			}
		}
	})

	t.Run("route table", func(t *testing.T) {
		routes := daemon.Routes()
		reads, admins := 0, 0
		for _, r := range routes {
			method, path, _ := strings.Cut(r.Pattern, " ")
			path = fillPattern(path)
			for _, u := range []*testUser{reader, admin, root} {
				code, body := u.curl(t, a, method, path)
				refused := code == 403
				wantRefused := r.Access == api.Admin && u == reader
				switch {
				case refused != wantRefused:
					t.Errorf("as %s: %s %s (%s) = %d %s; want refused=%t", u.name, method, path, r.Access, code, body, wantRefused)
				case refused && !strings.Contains(body, hint):
					t.Errorf("as %s: %s %s: 403 body %s lacks %q", u.name, method, path, body, hint)
				case code == 500 || code == 0:
					t.Errorf("as %s: %s %s = %d %s; want an answer of the handler", u.name, method, path, code, body)
				}
			}
			if r.Access == api.Admin {
				admins++
			} else {
				reads++
			}
		}
		if reads < 10 || admins < 10 {
			t.Errorf("route table has %d read and %d admin routes; want at least 10 of each", reads, admins)
		}
	})
}

// testUser is a user the test runs commands as; uid 0 (root) when name is
// "root".
type testUser struct {
	name   string
	uid    uint32
	gid    uint32
	groups []uint32
}

// newGroup creates a group, removed in cleanup.
func newGroup(t *testing.T, name string) {
	t.Helper()
	_ = exec.Command("groupdel", name).Run() // left by an aborted run
	sh(t, "groupadd", name)
	t.Cleanup(func() {
		if out, err := exec.Command("groupdel", name).CombinedOutput(); err != nil {
			t.Errorf("groupdel %s: %v\n%s", name, err, out)
		}
	})
}

// newUser creates a user with no home and no login shell whose primary
// group is groups[0] and supplementary groups the rest; removed in
// cleanup (before the groups, which were created earlier).
func newUser(t *testing.T, name string, groups ...string) *testUser {
	t.Helper()
	_ = exec.Command("userdel", name).Run()
	args := []string{"useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", groups[0]}
	if len(groups) > 1 {
		args = append(args, "-G", strings.Join(groups[1:], ","))
	}
	sh(t, append(args, name)...)
	t.Cleanup(func() {
		if out, err := exec.Command("userdel", name).CombinedOutput(); err != nil {
			t.Errorf("userdel %s: %v\n%s", name, err, out)
		}
	})
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	// The groups a login would give it (initgroups): from the group file.
	gids, err := u.GroupIds()
	if err != nil {
		t.Fatal(err)
	}
	tu := &testUser{name: name, uid: atou32(t, u.Uid), gid: atou32(t, u.Gid)}
	for _, g := range gids {
		tu.groups = append(tu.groups, atou32(t, g))
	}
	return tu
}

func atou32(t *testing.T, s string) uint32 {
	t.Helper()
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(v)
}

func groupID(t *testing.T, name string) string {
	t.Helper()
	g, err := user.LookupGroup(name)
	if err != nil {
		t.Fatal(err)
	}
	return g.Gid
}

// exec builds a command that runs as u (root: as this process).
func (u *testUser) exec(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = "/"
	if u.name != "root" {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: u.groups}}
	}
	return cmd
}

// command is the CLI against agent a, run as u.
func (u *testUser) command(ctx context.Context, a *agent, cli string, args ...string) *exec.Cmd {
	cmd := u.exec(ctx, cli, args...)
	cmd.Env = []string{"RACKWIRE_SOCKET=" + a.sock, "PATH=/usr/bin:/bin", "HOME=/"}
	return cmd
}

// run runs the CLI as u and returns stdout, stderr and the exit error.
func (u *testUser) run(a *agent, cli string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := u.command(ctx, a, cli, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// curl calls method path on a's socket as u and returns the status code
// (0 when there was none) and the body. Streams are cut after 2 seconds.
func (u *testUser) curl(t *testing.T, a *agent, method, path string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := u.exec(ctx, "curl", "-sS", "--max-time", "2", "--unix-socket", a.sock, "-X", method,
		"-w", "\n%{http_code}", "http://rackwired"+path)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	body, codeStr := "", out.String()
	if i := strings.LastIndexByte(codeStr, '\n'); i >= 0 {
		body, codeStr = codeStr[:i], codeStr[i+1:]
	}
	code, _ := strconv.Atoi(strings.TrimSpace(codeStr))
	var ee *exec.ExitError
	// 28: --max-time hit, the normal end of a stream that was answered.
	if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 28 && code != 0) {
		t.Errorf("as %s: curl %s %s: %v\n%s", u.name, method, path, err, errb.String())
	}
	return code, strings.TrimSpace(body)
}

// fillPattern replaces the wildcards of a route pattern with values that
// name nothing that exists.
func fillPattern(p string) string {
	r := strings.NewReplacer("{ep}", "rwg-none", "{name}", "rwg-none", "{id}", "1", "{ip}", "10.217.91.1")
	p = r.Replace(p)
	if strings.Contains(p, "{") {
		panic("fillPattern: unknown wildcard in " + p + "; add it here")
	}
	return p
}

// l4Policy is a small valid policy document named name.
func l4Policy(name string) string {
	return `apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: ` + name + `
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
    - toPorts:
        - ports:
            - {port: "80", protocol: TCP}
`
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(to, mode); err != nil {
		t.Fatal(err)
	}
}
