package birdconf

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLeaf keeps birdconf a leaf: plain struct in, text out. It must not
// depend on any other rackwire package (daemon/bgp adapts the config).
func TestLeaf(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v: %s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		// internal/atomicfile is itself standard-library only: the one
		// way the tree replaces a file.
		if strings.HasPrefix(dep, "github.com/") && dep != "github.com/rackwire/rackwire/birdconf" && dep != "github.com/rackwire/rackwire/internal/atomicfile" {
			t.Errorf("birdconf depends on %s; it must import only the standard library (and internal/atomicfile)", dep)
		}
	}
}
