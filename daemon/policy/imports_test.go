package policy

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPureGo keeps policy and identity free of BPF and netlink code: they
// compute desired state, only the datapath touches the kernel.
func TestPureGo(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatalf("the go command is needed to walk the import graph: %v", err)
	}
	cmd := exec.Command("go", "list", "-deps", "github.com/rackwire/rackwire/daemon/policy", "github.com/rackwire/rackwire/daemon/identity")
	outb, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, outb)
	}
	deps := strings.Fields(string(outb))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %d packages: %v", len(deps), deps)
	}
	for _, d := range deps {
		for _, banned := range []string{"github.com/cilium/ebpf", "github.com/vishvananda/netlink", "github.com/vishvananda/netns"} {
			if d == banned || strings.HasPrefix(d, banned+"/") {
				t.Errorf("daemon/policy or daemon/identity depends on %s", d)
			}
		}
	}
}
