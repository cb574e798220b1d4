package daemon

import (
	"net/http"

	"github.com/rackwire/rackwire/daemon/api"
)

// agentRoutes registers the agent's API, one file per resource:
// handlers_endpoint.go, handlers_identity.go, handlers_policy.go,
// handlers_bpf.go, handlers_bgp.go, handlers_monitor.go. No handler holds a
// lock across store I/O; reads come from the owners' memory.
//
// Every route carries its access decision (api.Read or api.Admin; see
// docs/security.md): uid 0 and members of [agent] admin_group may call
// every route, other callers only the Read ones. The admin group is
// resolved to its gid here, once: [agent] is read at start only.
func (d *Daemon) agentRoutes() {
	group := d.config().Agent.AdminGroup
	p, err := api.NewPolicy(group)
	if err != nil {
		// Validation checked that the group exists; it vanished since.
		// Fail closed: root only.
		d.log.Error("admin group not resolved; only root may change the agent", "err", err)
	} else if group != "" {
		d.log.Info("api: members of the admin group may change the agent", "admin_group", group, "gid", p.AdminGID)
	}
	rt := api.NewRouter(d.mux, p, d.log.With("subsys", "api"))
	rt.Handle(api.Read, "GET /v1/status", func(r *http.Request) (any, error) { return d.status(r), nil })
	registerAgentRoutes(d.agent, rt)
}

// route registers one JSON handler with its access decision. A route
// without a decision does not compile; an invalid one panics at start.
type route func(access api.Access, pattern string, f func(r *http.Request) (any, error))

func registerAgentRoutes(a *agent, rt *api.Router) {
	h := route(rt.Handle)
	a.endpointRoutes(h)
	a.identityRoutes(h)
	a.policyRoutes(h)
	a.bpfRoutes(h)
	a.bgpRoutes(h)
	a.serviceRoutes(h)
	// The event stream reads: it shows what the datapath does, changes
	// nothing.
	rt.HandleFunc(api.Read, "GET /v1/monitor", a.serveMonitor)
}

// Routes returns the table of the agent's routes and their access
// decisions, for tests that walk it (tests/e2e). It registers on a
// throwaway mux with an agent that serves nothing.
func Routes() []api.Route {
	rt := api.NewRouter(http.NewServeMux(), api.Policy{}, nil)
	rt.Handle(api.Read, "GET /v1/status", func(*http.Request) (any, error) { return nil, nil })
	registerAgentRoutes(&agent{}, rt)
	return rt.Routes()
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
