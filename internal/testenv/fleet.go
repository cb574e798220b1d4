package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// RemoveLeftovers deletes what a killed earlier run of a suite left
// behind: network namespaces and BPF pin directories whose names start
// with prefix, and the given links of the root namespace. Names without
// the prefix are never touched.
func RemoveLeftovers(prefix string, links ...string) {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			_ = exec.Command("ip", "netns", "del", f[0]).Run()
		}
	}
	for _, l := range links {
		_ = exec.Command("ip", "link", "del", l).Run()
	}
	pins, _ := filepath.Glob("/sys/fs/bpf/" + prefix + "*")
	for _, p := range pins {
		os.RemoveAll(p)
	}
}

// UnitEnv returns the Environment= assignments of the packaged unit
// (GOMEMLIMIT), so that suites run the agent as the unit runs it. root is
// the repository root relative to the test's directory.
func UnitEnv(t testing.TB, root string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "packaging/systemd/rackwired.service"))
	if err != nil {
		t.Fatalf("read the packaged unit: %v", err)
	}
	var env []string
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Environment="); ok {
			env = append(env, strings.Fields(v)...)
		}
	}
	return env
}
