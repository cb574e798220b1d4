package daemon

import (
	"net/http"
	"os"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/version"
)

func (d *Daemon) routes() {
	d.mux.Handle("GET /v1/status", api.Handle(func(r *http.Request) (any, error) { return d.status(r), nil }))
}

func (d *Daemon) status(r *http.Request) api.Status {
	cfg := d.config()
	d.mu.Lock()
	reloads, last, rerr := d.reloads, d.lastReload, d.reloadError
	d.mu.Unlock()
	st := api.Status{
		Agent: api.AgentStatus{
			Version:     version.Version,
			Commit:      version.Commit(),
			PID:         os.Getpid(),
			StartedAt:   d.start.UTC(),
			Uptime:      time.Since(d.start).Truncate(time.Second).String(),
			ConfigFile:  cfg.File,
			Node:        cfg.Node.Name,
			Cluster:     cfg.Node.Cluster,
			ClusterID:   cfg.Node.ClusterID,
			Reloads:     reloads,
			ReloadError: rerr,
		},
	}
	if !last.IsZero() {
		st.Agent.LastReload = last.UTC().Format(time.RFC3339)
	}
	h := d.store.Health()
	st.Store = api.Component{State: h.State, Message: h.Error, Detail: map[string]string{"backend": h.Backend}}
	if !h.Since.IsZero() {
		s := h.Since.UTC()
		st.Store.Since = &s
	}
	for k, v := range h.Detail {
		st.Store.Detail[k] = v
	}
	for _, f := range d.statusers {
		f(r.Context(), &st)
	}
	unavailable := api.Component{State: api.StateUnavailable, Message: "not built into this agent yet"}
	for _, c := range []*api.Component{&st.Datapath, &st.BGP, &st.Endpoints, &st.Identities, &st.Policy} {
		if c.State == "" {
			*c = unavailable
		}
	}
	if !cfg.BGP.Enabled && st.BGP.State == api.StateUnavailable {
		st.BGP = api.Component{State: api.StateDisabled, Message: "[bgp] enabled = false"}
	}
	return st
}
