package policy

import (
	"testing"

	"github.com/rackwire/rackwire/internal/testenv"
)

// TestPureGo keeps policy and identity free of BPF and netlink code: they
// compute desired state, only the datapath touches the kernel.
func TestPureGo(t *testing.T) {
	testenv.ForbidDeps(t, []string{"github.com/rackwire/rackwire/daemon/policy", "github.com/rackwire/rackwire/daemon/identity"},
		"github.com/cilium/ebpf", "github.com/vishvananda/netlink", "github.com/vishvananda/netns")
}
