package endpoint

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestPureGo keeps the endpoint manager free of the eBPF datapath and of
// the concrete identity allocator: it drives both through the Datapath,
// Identities and Enforcer interfaces, and the adapters live in the wiring
// (daemon/adapters.go). It may use netlink: plumbing veths is its job.
func TestPureGo(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatalf("the go command is needed to walk the import graph: %v", err)
	}
	out, err := exec.Command("go", "list", "-deps", "github.com/rackwire/rackwire/daemon/endpoint").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %d packages: %v", len(deps), deps)
	}
	for _, d := range deps {
		for _, banned := range []string{"github.com/cilium/ebpf", "github.com/rackwire/rackwire/daemon/datapath", "github.com/rackwire/rackwire/bpf"} {
			if d == banned || strings.HasPrefix(d, banned+"/") {
				t.Errorf("daemon/endpoint depends on %s", d)
			}
		}
	}
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
