package ipcache

import (
	"testing"

	"github.com/rackwire/rackwire/internal/testenv"
)

// TestPureGo keeps the package free of BPF and netlink code: it writes the
// maps through the Writer interface.
func TestPureGo(t *testing.T) {
	testenv.ForbidDeps(t, []string{"github.com/rackwire/rackwire/daemon/ipcache"},
		"github.com/cilium/ebpf", "github.com/vishvananda/netlink", "github.com/vishvananda/netns")
}
