package endpoint

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/internal/testenv"
)

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return st.Ino
}

// openTimed runs openNetns with a deadline: a FIFO must not hang it.
func openTimed(t *testing.T, path string) (int, time.Duration, error) {
	t.Helper()
	type res struct {
		fd  int
		err error
	}
	done := make(chan res, 1)
	t0 := time.Now()
	go func() {
		h, err := openNetns(path)
		done <- res{int(h), err}
	}()
	select {
	case r := <-done:
		return r.fd, time.Since(t0), r.err
	case <-time.After(5 * time.Second):
		t.Fatalf("openNetns(%.60q) still blocked after 5s", path)
		return -1, 0, nil
	}
}

// TestOpenNetns: only network namespace files open; everything else is
// refused at once with the one message, without opening it for real and
// without leaking a descriptor.
func TestOpenNetns(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	name, nsPath := newNetns(t, "o")
	dir := t.TempDir()

	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	reg := filepath.Join(dir, "file")
	if err := os.WriteFile(reg, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(nsPath, link); err != nil {
		t.Fatal(err)
	}
	procLink := filepath.Join(dir, "proclink") // a symlink to a /proc magic link
	if err := os.Symlink("/proc/self/ns/net", procLink); err != nil {
		t.Fatal(err)
	}
	// A descriptor of this process on another FIFO: /proc/self/fd/N is a
	// procfs magic link to it, followed, and still refused. (The first FIFO
	// has no opener at all: a blocking open of it would hang.)
	fifo2 := filepath.Join(dir, "fifo2")
	if err := unix.Mkfifo(fifo2, 0o600); err != nil {
		t.Fatal(err)
	}
	ff, err := os.OpenFile(fifo2, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ff.Close()

	// A process inside the namespace, for /proc/PID/ns/net.
	sleeper := exec.Command("ip", "netns", "exec", name, "sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleeper.Process.Kill(); sleeper.Wait() })
	pid := strconv.Itoa(sleeper.Process.Pid)
	want := inode(t, nsPath)
	deadline := time.Now().Add(5 * time.Second)
	for inode(t, "/proc/"+pid+"/ns/net") != want {
		if time.Now().After(deadline) {
			t.Fatalf("process %s did not enter %s", pid, name)
		}
		time.Sleep(10 * time.Millisecond)
	}

	good := []string{
		nsPath,
		"/proc/" + pid + "/ns/net",
		"/proc/" + pid + "/task/" + pid + "/ns/net",
		"/proc/self/ns/net", // the test's own: a namespace all the same (Add refuses the host's)
	}
	if fi, err := os.Lstat("/var/run"); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		good = append(good, "/var/run/netns/"+name) // a symlinked directory on the way
	}
	bad := map[string]string{
		"fifo":                  fifo,
		"/dev/null":             "/dev/null",
		"/dev/zero":             "/dev/zero",
		"directory":             dir,
		"regular file":          reg,
		"symlink to a netns":    link,
		"symlink to /proc link": procLink,
		"mount namespace":       "/proc/self/ns/mnt",
		"user namespace":        "/proc/self/ns/user",
		"/proc magic link fifo": "/proc/self/fd/" + strconv.Itoa(int(ff.Fd())),
		"/proc/self":            "/proc/self",
		"missing":               "/run/netns/rwb-does-not-exist",
		"missing dir":           "/nonexistent/dir/net",
		"relative":              "run/netns/" + name,
		"dot relative":          "./" + nsPath,
		"64 KiB path":           "/" + strings.Repeat("a/", 32<<10),
		"4096 bytes":            "/" + strings.Repeat("a", 4095),
		"NUL":                   nsPath + "\x00x",
	}

	before := openFDs(t)
	for _, p := range good {
		fd, took, err := openTimed(t, p)
		if err != nil {
			t.Errorf("openNetns(%s) = %v (%s), want a handle", p, err, NetnsReason(err))
			continue
		}
		t.Logf("%-40s ok in %v", p, took)
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || (p != "/proc/self/ns/net" && st.Ino != want) {
			t.Errorf("openNetns(%s): inode %d, want %d (%v)", p, st.Ino, want, err)
		}
		unix.Close(fd)
	}
	for what, p := range bad {
		_, took, err := openTimed(t, p)
		if err == nil {
			t.Errorf("%s: openNetns(%.60q) succeeded", what, p)
			continue
		}
		t.Logf("%-22s refused in %v: %s", what, took, NetnsReason(err))
		if err.Error() != NetnsMsg || !errors.Is(err, ErrNoNetns) {
			t.Errorf("%s: error %q, want exactly %q (errors.Is ErrNoNetns)", what, err, NetnsMsg)
		}
		if took > time.Second {
			t.Errorf("%s: refused after %v, want < 1s", what, took)
		}
	}
	if after := openFDs(t); after != before {
		t.Errorf("open descriptors %d before, %d after: leaked", before, after)
	}

	// The empty path keeps its own message (nothing to hide).
	if _, err := openNetns(""); !errors.Is(err, ErrNoNetns) || err.Error() == NetnsMsg {
		t.Errorf("openNetns(\"\") = %v", err)
	}
}

func TestCheckNetnsPath(t *testing.T) {
	for _, p := range []string{"/run/netns/x", "/proc/1/ns/net", "/" + strings.Repeat("a", MaxNetnsPath-1)} {
		if err := CheckNetnsPath(p); err != nil {
			t.Errorf("CheckNetnsPath(%.40q) = %v", p, err)
		}
	}
	for _, p := range []string{"", "x", "run/netns/x", "/" + strings.Repeat("a", MaxNetnsPath), "/a\x00b"} {
		if err := CheckNetnsPath(p); !errors.Is(err, ErrNoNetns) {
			t.Errorf("CheckNetnsPath(%.40q) = %v, want ErrNoNetns", p, err)
		}
	}
}
