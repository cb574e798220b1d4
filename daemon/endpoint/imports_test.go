package endpoint

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/internal/testenv"
)

// TestPureGo keeps the endpoint manager free of the eBPF datapath and of
// the concrete identity allocator: it drives both through the Datapath,
// Identities and Enforcer interfaces, and the adapters live in the wiring
// (daemon/adapters.go). It may use netlink: plumbing veths is its job.
func TestPureGo(t *testing.T) {
	testenv.ForbidDeps(t, []string{"github.com/rackwire/rackwire/daemon/endpoint"},
		"github.com/cilium/ebpf", "github.com/rackwire/rackwire/daemon/datapath", "github.com/rackwire/rackwire/bpf")
	// The identity package is allowed for labels and ids, not its
	// allocator: no non-test file names identity.Allocator.
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(af, func(n ast.Node) bool {
			if sel, ok := n.(*ast.SelectorExpr); ok {
				if x, ok := sel.X.(*ast.Ident); ok && x.Name == "identity" && (sel.Sel.Name == "Allocator" || sel.Sel.Name == "NewAllocator") {
					t.Errorf("%s: uses identity.%s; go through the Identities interface", fset.Position(sel.Pos()), sel.Sel.Name)
				}
			}
			return true
		})
	}
}
