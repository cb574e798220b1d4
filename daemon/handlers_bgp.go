package daemon

import (
	"net/http"

	"github.com/rackwire/rackwire/daemon/api"
)

func (a *agent) bgpRoutes(h route) {
	h("GET /v1/bgp/status", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "set [bgp] enabled = true and restart the agent", "BGP is disabled on this host")
		}
		return a.bgp.Status(r.Context()), nil
	})
	h("GET /v1/bgp/render", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "set [bgp] enabled = true and restart the agent", "BGP is disabled on this host")
		}
		text, err := a.bgp.Render()
		return map[string]string{"config": text}, err
	})
	h("POST /v1/bgp/drain", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "", "BGP is disabled on this host")
		}
		keep := r.URL.Query().Get("keep") != "false"
		a.bgp.Drain(keep)
		return map[string]any{"drained": true, "keep": keep}, a.bgp.ApplyNow(r.Context())
	})
	h("POST /v1/bgp/undrain", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "", "BGP is disabled on this host")
		}
		a.bgp.Undrain()
		return map[string]any{"drained": false}, a.bgp.ApplyNow(r.Context())
	})
}
