package daemon

import (
	"context"
	"encoding/json"
	"net/http"
	"sort"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/store"
)

func (a *agent) identityRoutes(h route) {
	h(api.Read, "GET /v1/identities", func(r *http.Request) (any, error) { return a.identities(), nil })
	h(api.Read, "GET /v1/identities/{id}", func(r *http.Request) (any, error) {
		id, err := identity.ParseID(r.PathValue("id"))
		if err != nil {
			return nil, api.Errorf(http.StatusBadRequest, "", "%v", err)
		}
		for _, i := range a.identities() {
			if i.ID == uint32(id) {
				return i, nil
			}
		}
		return nil, api.Errorf(http.StatusNotFound, "list them with `rackwire identity list`", "identity %d is not known to this agent", id)
	})

	h(api.Read, "GET /v1/nodes", func(r *http.Request) (any, error) { return a.nodes(r.Context()) })

}

// labelsOf names an identity for operators.
func (a *agent) labelsOf(id uint32) string {
	iid := identity.ID(id)
	switch {
	case id == 0:
		return "any"
	case iid.IsReserved():
		if ls := identity.ReservedLabels(iid); ls != nil {
			return ls.CLI()
		}
		return "reserved"
	case iid.IsLocal():
		if p, ok := a.sync.LookupCIDR(iid); ok {
			return "cidr:" + p
		}
		return "local"
	}
	if ls, ok := a.ids.Lookup(iid); ok {
		return ls.CLI()
	}
	return ""
}

func (a *agent) identities() []api.Identity {
	var out []api.Identity
	for id, name := range identity.Reserved() {
		out = append(out, api.Identity{ID: uint32(id), Labels: "reserved:" + name, Scope: "reserved"})
	}
	for _, i := range a.ids.List() {
		out = append(out, api.Identity{ID: uint32(i.ID), Labels: i.Labels.CLI(), Scope: "cluster"})
	}
	for p, id := range a.sync.CIDRIdentities() {
		out = append(out, api.Identity{ID: uint32(id), Labels: "cidr:" + p.String(), Scope: "local"})
	}
	users := map[uint32]int{}
	for _, ep := range a.eps.List() {
		users[uint32(ep.Identity)]++
	}
	for i := range out {
		out[i].Users = users[out[i].ID]
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (a *agent) nodes(ctx context.Context) ([]api.Node, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	kvs, _, err := a.st.List(ctx, store.NodePrefix+a.cfg.Node.Cluster+"/")
	if err != nil {
		return nil, api.Errorf(http.StatusServiceUnavailable, "check the store with `rackwire status`", "list nodes: %v", err)
	}
	out := []api.Node{}
	for _, kv := range kvs {
		var n store.NodeEntry
		if err := json.Unmarshal(kv.Value, &n); err != nil {
			a.log.Warn("skipping malformed node entry", "key", kv.Key, "err", err)
			continue
		}
		out = append(out, api.Node{Name: n.Name, Cluster: n.Cluster, IPs: n.IPs, CIDRs: n.CIDRs, BGPASN: n.BGPASN, Version: n.Version})
	}
	return out, nil
}
