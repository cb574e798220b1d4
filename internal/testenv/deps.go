package testenv

import (
	"os/exec"
	"strings"
	"testing"
)

// ForbidDeps fails t when one of pkgs depends (in non-test code) on a
// package under one of the banned import paths: the pure packages keep
// their promise not to import BPF, netlink or the datapath this way.
func ForbidDeps(t testing.TB, pkgs []string, banned ...string) {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatalf("the go command is needed to walk the import graph: %v", err)
	}
	out, err := exec.Command("go", append([]string{"list", "-deps"}, pkgs...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %d packages: %v", len(deps), deps)
	}
	for _, d := range deps {
		for _, b := range banned {
			if d == b || strings.HasPrefix(d, b+"/") {
				t.Errorf("%v depends on %s", pkgs, d)
			}
		}
	}
}
