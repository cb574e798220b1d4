package daemon

import (
	"net/http"

	"github.com/rackwire/rackwire/daemon/api"
)

// agentRoutes registers the agent's API, one file per resource:
// handlers_endpoint.go, handlers_identity.go, handlers_policy.go,
// handlers_bpf.go, handlers_bgp.go, handlers_monitor.go. No handler holds a
// lock across store I/O; reads come from the owners' memory.
func (d *Daemon) agentRoutes() {
	a := d.agent
	h := func(pattern string, f func(r *http.Request) (any, error)) { d.mux.Handle(pattern, api.Handle(f)) }
	a.endpointRoutes(h)
	a.identityRoutes(h)
	a.policyRoutes(h)
	a.bpfRoutes(h)
	a.bgpRoutes(h)
	d.mux.HandleFunc("GET /v1/monitor", a.serveMonitor)
}

// route registers one JSON handler.
type route func(pattern string, f func(r *http.Request) (any, error))

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
