package daemon

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/api"
)

// TestRouteDecisions pins the access decision of every route
// (docs/security.md keeps the same table). A new route, or a changed
// decision, must be written here too: that is the review point.
func TestRouteDecisions(t *testing.T) {
	want := []api.Route{
		{Pattern: "GET /v1/status", Access: api.Read},
		{Pattern: "GET /v1/endpoints", Access: api.Read},
		{Pattern: "GET /v1/endpoints/{ep}", Access: api.Read},
		{Pattern: "POST /v1/endpoints", Access: api.Admin},
		{Pattern: "DELETE /v1/endpoints/{ep}", Access: api.Admin},
		{Pattern: "GET /v1/ready", Access: api.Read},
		{Pattern: "POST /v1/attachments/gc", Access: api.Admin},
		{Pattern: "POST /v1/endpoints/{ep}/audit", Access: api.Admin},
		{Pattern: "GET /v1/identities", Access: api.Read},
		{Pattern: "GET /v1/identities/{id}", Access: api.Read},
		{Pattern: "GET /v1/nodes", Access: api.Read},
		{Pattern: "GET /v1/policies", Access: api.Read},
		{Pattern: "GET /v1/policies/{name}", Access: api.Read},
		{Pattern: "POST /v1/policies", Access: api.Admin},
		{Pattern: "DELETE /v1/policies/{name}", Access: api.Admin},
		{Pattern: "POST /v1/policy/trace", Access: api.Admin},
		{Pattern: "GET /v1/bpf/policy/{ep}", Access: api.Read},
		{Pattern: "POST /v1/bpf/policy/{ep}", Access: api.Admin},
		{Pattern: "DELETE /v1/bpf/policy/{ep}", Access: api.Admin},
		{Pattern: "POST /v1/bpf/policy/{ep}/allow-all", Access: api.Admin},
		{Pattern: "GET /v1/bpf/ipcache", Access: api.Read},
		{Pattern: "GET /v1/bpf/ipcache/{ip}", Access: api.Read},
		{Pattern: "GET /v1/bpf/ct", Access: api.Read},
		{Pattern: "POST /v1/bpf/ct/flush", Access: api.Admin},
		{Pattern: "GET /v1/bpf/metrics", Access: api.Read},
		{Pattern: "GET /v1/bgp/status", Access: api.Read},
		{Pattern: "GET /v1/bgp/render", Access: api.Admin},
		{Pattern: "POST /v1/bgp/drain", Access: api.Admin},
		{Pattern: "POST /v1/bgp/undrain", Access: api.Admin},
		{Pattern: "GET /v1/services", Access: api.Read},
		{Pattern: "GET /v1/services/{name}", Access: api.Read},
		{Pattern: "POST /v1/services", Access: api.Admin},
		{Pattern: "DELETE /v1/services/{name}", Access: api.Admin},
		{Pattern: "GET /v1/monitor", Access: api.Read},
	}
	got := Routes()
	if !slices.Equal(got, want) {
		t.Errorf("route table changed; update this test and docs/security.md.\n got: %v\nwant: %v", got, want)
	}
}

// TestRoutesOnlyThroughTheRouter: outside api.Router, nothing in this
// package registers on the API mux, so no route can go without a decision.
func TestRoutesOnlyThroughTheRouter(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || (sel.Sel.Name != "Handle" && sel.Sel.Name != "HandleFunc") {
				return true
			}
			recv, ok := sel.X.(*ast.SelectorExpr)
			if !ok || recv.Sel.Name != "mux" {
				return true
			}
			pattern := ""
			if len(call.Args) > 0 {
				if lit, ok := call.Args[0].(*ast.BasicLit); ok {
					pattern, _ = strconv.Unquote(lit.Value)
				}
			}
			t.Errorf("%s: %q is registered on the mux directly; register it through api.Router with api.Read or api.Admin (handlers.go)",
				fset.Position(call.Pos()), pattern)
			return true
		})
	}
}
