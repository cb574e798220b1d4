package ipcache

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPureGo keeps the package free of BPF and netlink code: it writes the
// maps through the Writer interface.
func TestPureGo(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatalf("the go command is needed to walk the import graph: %v", err)
	}
	out, err := exec.Command("go", "list", "-deps", "github.com/rackwire/rackwire/daemon/ipcache").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %d packages: %v", len(deps), deps)
	}
	for _, d := range deps {
		for _, banned := range []string{"github.com/cilium/ebpf", "github.com/vishvananda/netlink", "github.com/vishvananda/netns"} {
			if d == banned || strings.HasPrefix(d, banned+"/") {
				t.Errorf("daemon/ipcache depends on %s", d)
			}
		}
	}
}
