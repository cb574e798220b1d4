// Package systemd is the real-systemd suite of the rackwire package: it boots
// systemd as PID 1 of its own PID, mount and network namespaces in a Debian
// bookworm root, installs the .deb there with dpkg and drives rackwired with
// systemctl and journalctl. Root (a throw-away overlay over a cached
// debootstrap root) and Boot are exported for the Salt suite, which applies
// the formula inside the same kind of root.
//
// Nothing here is a fake: the packages are built by packaging/build.sh, the
// root by tests/systemd/debroot.sh (once, cached outside the repository),
// and everything a run creates (overlay, namespaces, cgroups, BPF pins under
// its own prefix) is removed by the test's cleanup, also on failure.
package systemd

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// RepoRoot is the repository's top directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the repository")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// BuildPackages runs packaging/build.sh VERSION into dir and returns the
// .deb and .rpm it wrote.
func BuildPackages(t testing.TB, version, dir string) (deb, rpm string) {
	t.Helper()
	testenv.RequireCommand(t, "go")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(RepoRoot(t), "packaging", "build.sh"), version)
	cmd.Dir = RepoRoot(t)
	cmd.Env = append(os.Environ(), "DIST="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("packaging/build.sh %s: %v\n%s", version, err, out)
	}
	deb = filepath.Join(dir, "rackwire_"+version+"_amd64.deb")
	rpm = filepath.Join(dir, "rackwire-"+version+".x86_64.rpm")
	for _, p := range []string{deb, rpm} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("build.sh did not write %s: %v\n%s", p, err, out)
		}
	}
	return deb, rpm
}

// Root is a running systemd in a throw-away copy of the cached Debian root.
type Root struct {
	// Dir is the root's directory as the host sees it; files written here
	// are visible inside at the same relative path.
	Dir string
	// PID is systemd's PID on the host (PID 1 inside).
	PID int

	t       testing.TB
	run     string
	unshare *exec.Cmd
}

var (
	// env is the environment of every command run inside the root.
	env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER=", "TERM=dumb",
	}
)

// Boot builds the cached Debian root if needed (tests/systemd/debroot.sh),
// overlays a fresh writable layer on it and boots systemd there as PID 1 of
// new PID, mount, UTS, IPC and network namespaces, with the host's /sys
// (hence cgroups and bpffs) bind-mounted. Cleanup powers it off by SIGKILL
// and removes the overlay and the cgroups it created.
func Boot(t testing.TB) *Root {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	for _, c := range []string{"debootstrap", "unshare", "nsenter", "mount"} {
		testenv.RequireCommand(t, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(RepoRoot(t), "tests", "systemd", "debroot.sh")).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("tests/systemd/debroot.sh: %v\n%s", err, stderr)
	}
	lower := strings.TrimSpace(string(out))

	run, err := os.MkdirTemp(testenv.CacheDir(), "systemd-run-")
	if err != nil {
		t.Fatalf("make run dir: %v", err)
	}
	r := &Root{Dir: filepath.Join(run, "merged"), t: t, run: run}
	t.Cleanup(r.close)
	for _, d := range []string{"upper", "work", "merged"} {
		if err := os.MkdirAll(filepath.Join(run, d), 0o755); err != nil {
			t.Fatalf("make %s: %v", d, err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, filepath.Join(run, "upper"), filepath.Join(run, "work"))
	if out, err := exec.Command("mount", "-t", "overlay", "overlay", "-o", opts, r.Dir).CombinedOutput(); err != nil {
		t.Fatalf("mount overlay: %v\n%s", err, out)
	}

	// Inside the new namespaces, before chroot: move into a cgroup of our
	// own in every hierarchy (below the one we are in), so that this systemd
	// manages its own subtree and never the host's or another run's; record
	// the cgroups for cleanup; bind the host's /sys (cgroups, bpffs).
	script := `set -e
name=` + filepath.Base(run) + `
while IFS=: read -r id ctrl path; do
	if [ -z "$ctrl" ]; then
		mnt=$(awk '$3=="cgroup2" {print $2; exit}' /proc/self/mounts)
	else
		first=${ctrl%%,*}
		mnt=$(awk -v c="$first" '$3=="cgroup" {n=split($4,o,","); for (i=1;i<=n;i++) if (o[i]==c) {print $2; exit}}' /proc/self/mounts)
	fi
	[ -n "$mnt" ] || continue
	d="$mnt${path%/}/$name"
	if mkdir -p "$d" 2>/dev/null; then
		# cpuset refuses tasks in a new cgroup with no cpus: stay put there.
		if echo 0 >"$d/cgroup.procs" 2>/dev/null; then
			echo "$d" >>"$RUN/cgroups"
		else
			rmdir "$d" 2>/dev/null || true
		fi
	fi
done </proc/self/cgroup
mount --rbind /sys "$ROOT/sys"
# systemd makes / shared itself only outside containers; a host has it so,
# and mounts made later (ip netns add) must reach the services' namespaces.
exec chroot "$ROOT" /bin/sh -c 'mount -t proc proc /proc; mount -t tmpfs -o mode=755 tmpfs /run; mount --make-rshared /; exec /lib/systemd/systemd'
`
	console, err := os.Create(filepath.Join(run, "console.log"))
	if err != nil {
		t.Fatalf("create console log: %v", err)
	}
	defer console.Close()
	cmd := exec.Command("unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc", "--net",
		"--propagation", "private", "env", "container=rackwire", "RUN="+run, "ROOT="+r.Dir, "/bin/sh", "-c", script)
	cmd.Stdout, cmd.Stderr = console, console
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start unshare: %v", err)
	}
	r.unshare = cmd

	deadline := time.Now().Add(90 * time.Second)
	for r.PID == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no PID 1 under unshare %d", cmd.Process.Pid)
		}
		r.PID = childOf(cmd.Process.Pid)
		time.Sleep(50 * time.Millisecond)
	}
	for {
		out, _ := r.Exec("systemctl", "is-system-running")
		s := strings.TrimSpace(out)
		if s == "running" || s == "degraded" {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(run, "console.log"))
			t.Fatalf("systemd in %s did not finish booting (state %q)\nconsole:\n%s", r.Dir, s, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return r
}

// childOf returns a child PID of ppid, or 0.
func childOf(ppid int) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, skip past ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			return pid
		}
	}
	return 0
}

// Exec runs a command inside the root (all of its namespaces, chrooted) and
// returns its combined output. It is bounded to two minutes.
func (r *Root) Exec(args ...string) (string, error) {
	return r.ExecTimeout(2*time.Minute, args...)
}

// ExecTimeout is Exec with an explicit bound.
func (r *Root) ExecTimeout(d time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	a := append([]string{"-t", strconv.Itoa(r.PID), "-m", "-p", "-u", "-i", "-n", "chroot", r.Dir}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", a...)
	cmd.Env = env
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return b.String(), err
}

// Must is Exec that fails the test on a non-zero exit.
func (r *Root) Must(args ...string) string {
	r.t.Helper()
	out, err := r.Exec(args...)
	if err != nil {
		r.t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// WriteFile writes a file inside the root (path as seen inside).
func (r *Root) WriteFile(path string, data []byte, mode os.FileMode) {
	r.t.Helper()
	p := filepath.Join(r.Dir, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		r.t.Fatalf("mkdir for %s: %v", path, err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		r.t.Fatalf("write %s: %v", path, err)
	}
}

// CopyIn copies a host file into the root.
func (r *Root) CopyIn(src, dst string) {
	r.t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		r.t.Fatalf("read %s: %v", src, err)
	}
	r.WriteFile(dst, b, 0o644)
}

// Show returns one property of a unit (systemctl show -p NAME --value).
func (r *Root) Show(unit, prop string) string {
	out, _ := r.Exec("systemctl", "show", "-p", prop, "--value", unit)
	return strings.TrimSpace(out)
}

// Journal returns the unit's journal as plain messages.
func (r *Root) Journal(unit string) string {
	out, _ := r.Exec("journalctl", "--no-pager", "-o", "cat", "-u", unit)
	return out
}

// WaitFor polls cond every 250ms until it is true or d has passed.
func WaitFor(d time.Duration, cond func() bool) bool {
	end := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func (r *Root) close() {
	if r.PID > 0 {
		_ = syscall.Kill(r.PID, syscall.SIGKILL)
	}
	if r.unshare != nil {
		done := make(chan struct{})
		go func() { _ = r.unshare.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = syscall.Kill(r.unshare.Process.Pid, syscall.SIGKILL)
		}
	}
	// The overlay is mounted in the host namespace; the copies inside the
	// dead namespace went with it.
	_ = exec.Command("umount", "-l", r.Dir).Run()
	if b, err := os.ReadFile(filepath.Join(r.run, "cgroups")); err == nil {
		for _, d := range strings.Fields(string(b)) {
			removeCgroup(d)
		}
	}
	_ = os.RemoveAll(r.run)
}

// removeCgroup removes a cgroup tree bottom-up; a cgroup whose last task is
// still exiting refuses rmdir for a moment, so it retries briefly.
func removeCgroup(dir string) {
	WaitFor(10*time.Second, func() bool {
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(dirs[i])
		}
		_, err := os.Stat(dir)
		return os.IsNotExist(err)
	})
}

// BindIn bind-mounts a host path into the root, at inside (a path as seen
// inside), in the root's own mount namespace only: the host never sees it
// and it goes away with the root.
func (r *Root) BindIn(hostPath, inside string, readOnly bool) {
	r.t.Helper()
	target := filepath.Join(r.Dir, inside)
	st, err := os.Stat(hostPath)
	if err != nil {
		r.t.Fatalf("bind %s: %v", hostPath, err)
	}
	if st.IsDir() {
		err = os.MkdirAll(target, 0o755)
	} else {
		err = os.MkdirAll(filepath.Dir(target), 0o755)
		if err == nil {
			err = os.WriteFile(target, nil, 0o644)
		}
	}
	if err != nil {
		r.t.Fatalf("bind target %s: %v", inside, err)
	}
	pid := strconv.Itoa(r.PID)
	if out, err := exec.Command("nsenter", "-t", pid, "-m", "mount", "--bind", hostPath, target).CombinedOutput(); err != nil {
		r.t.Fatalf("bind %s -> %s: %v\n%s", hostPath, inside, err, out)
	}
	if readOnly {
		if out, err := exec.Command("nsenter", "-t", pid, "-m", "mount", "-o", "remount,bind,ro", target).CombinedOutput(); err != nil {
			r.t.Fatalf("remount ro %s: %v\n%s", inside, err, out)
		}
	}
}
