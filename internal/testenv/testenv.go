// Package testenv lets tests that need real infrastructure (root, bpffs,
// network namespaces, clang, bpftool, BIRD, Consul, systemd, Salt) say so.
//
// Outside CI a missing prerequisite skips the test with the command that
// installs it. Under CI=true it fails loudly instead: in CI a skipped test
// would pass for one that never ran.
package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// InstallHint is the one command that installs every test prerequisite.
const InstallHint = "make deps (as root)"

// CI reports whether the tests run in CI.
func CI() bool { return os.Getenv("CI") == "true" }

// Missing reports a prerequisite this machine lacks: a skip outside CI,
// a failure under CI=true.
func Missing(t testing.TB, what string) {
	t.Helper()
	missing(t, what)
}

func missing(t testing.TB, what string) {
	t.Helper()
	if CI() {
		t.Fatalf("prerequisite missing under CI=true: %s; install with: %s", what, InstallHint)
	}
	t.Skipf("prerequisite missing: %s; install with: %s", what, InstallHint)
}

// RequireRoot needs uid 0 (namespaces, BPF, netlink).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "root (run the tests as root)")
	}
}

// RequireBPFFS needs a mounted bpffs at /sys/fs/bpf.
func RequireBPFFS(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	if _, err := os.Stat("/sys/fs/bpf"); err != nil {
		missing(t, "bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")
	}
}

// RequireCommand needs an executable on PATH and returns its path.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, name+" on PATH")
	}
	return p
}

// CacheDir is where make deps puts built tools (Consul, Salt).
func CacheDir() string {
	if d := os.Getenv("RACKWIRE_CACHE"); d != "" {
		return d
	}
	return "/var/cache/rackwire-test"
}

// RequireCached needs a tool that make deps builds into the cache (e.g.
// "consul", "salt-call") and returns its path.
func RequireCached(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(CacheDir(), name)
	if _, err := os.Stat(p); err != nil {
		if lp, lerr := exec.LookPath(name); lerr == nil {
			return lp
		}
		missing(t, name+" in "+CacheDir())
	}
	return p
}

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// Binaries builds rackwired, rackwire and rackwire-cni (beside them) from
// the work tree once per test binary, into a temporary directory (bin/ belongs to `make build`), and
// returns their paths. Call RemoveBinaries from TestMain.
func Binaries(t testing.TB) (rackwired, rackwire string) {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "rackwire-test-bin-")
		if binErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "go", "build", "-o", binDir+"/",
			"github.com/rackwire/rackwire/cmd/rackwired", "github.com/rackwire/rackwire/cmd/rackwire",
			"github.com/rackwire/rackwire/cmd/rackwire-cni").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build rackwired rackwire rackwire-cni: %w\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return filepath.Join(binDir, "rackwired"), filepath.Join(binDir, "rackwire")
}

// RemoveBinaries deletes what Binaries built.
func RemoveBinaries() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}
