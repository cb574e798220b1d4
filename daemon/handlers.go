package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/store"
)

func (d *Daemon) agentRoutes() {
	a := d.agent
	h := func(pattern string, f func(r *http.Request) (any, error)) { d.mux.Handle(pattern, api.Handle(f)) }

	h("GET /v1/endpoints", func(r *http.Request) (any, error) {
		var out []api.Endpoint
		for _, ep := range a.eps.List() {
			e := toAPIEndpoint(ep)
			e.Audit = a.isAudit(ep.Name)
			out = append(out, e)
		}
		return nonNil(out), nil
	})
	h("GET /v1/endpoints/{ep}", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		e := toAPIEndpoint(ep)
		e.Audit = a.isAudit(ep.Name)
		return e, err
	})
	h("POST /v1/endpoints", func(r *http.Request) (any, error) {
		var in api.EndpointAdd
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.addEndpoint(r.Context(), in)
	})
	h("DELETE /v1/endpoints/{ep}", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		if err != nil {
			return nil, err
		}
		if err := a.eps.Delete(r.Context(), r.PathValue("ep")); err != nil {
			return nil, endpointErr(err)
		}
		a.forgetAudit(ep.Name)
		a.sync(r.Context())
		return map[string]string{"deleted": r.PathValue("ep")}, nil
	})

	h("POST /v1/endpoints/{ep}/audit", func(r *http.Request) (any, error) {
		var in struct {
			Enabled bool `json:"enabled"`
		}
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		ep, err := a.setAudit(r.Context(), r.PathValue("ep"), in.Enabled)
		if err != nil {
			return nil, err
		}
		out := toAPIEndpoint(ep)
		out.Audit = in.Enabled || a.cfg.Datapath.PolicyAuditMode
		return out, nil
	})

	h("GET /v1/identities", func(r *http.Request) (any, error) { return a.identities(), nil })
	h("GET /v1/identities/{id}", func(r *http.Request) (any, error) {
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

	h("GET /v1/nodes", func(r *http.Request) (any, error) { return a.nodes(r.Context()) })

	h("GET /v1/policies", func(r *http.Request) (any, error) {
		var out []api.PolicySummary
		for _, l := range a.pol.Policies() {
			out = append(out, api.PolicySummary{Name: l.Policy.Metadata.Name, Source: l.Source, Rules: len(l.Policy.Rules())})
		}
		return nonNil(out), nil
	})
	h("GET /v1/policies/{name}", func(r *http.Request) (any, error) {
		var out []policy.Listed
		for _, l := range a.pol.Policies() {
			if l.Policy.Metadata.Name == r.PathValue("name") {
				out = append(out, l)
			}
		}
		if len(out) == 0 {
			return nil, api.Errorf(http.StatusNotFound, "list them with `rackwire policy list`", "no policy named %q is in force", r.PathValue("name"))
		}
		return out, nil
	})
	h("POST /v1/policies", func(r *http.Request) (any, error) {
		var in struct {
			File string `json:"file"`
			Data string `json:"data"`
		}
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.importPolicies(r.Context(), in.File, []byte(in.Data))
	})
	h("DELETE /v1/policies/{name}", func(r *http.Request) (any, error) {
		return a.deletePolicy(r.Context(), r.PathValue("name"))
	})
	h("POST /v1/policy/trace", func(r *http.Request) (any, error) {
		var in api.TraceRequest
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.trace(in)
	})

	h("GET /v1/bpf/policy/{ep}", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		if err != nil {
			return nil, err
		}
		es, err := a.dp.Policy(ep.ID)
		if err != nil {
			return nil, err
		}
		return a.toAPIEntries(es), nil
	})
	h("POST /v1/bpf/policy/{ep}", func(r *http.Request) (any, error) { return a.rawEntry(r, true) })
	h("DELETE /v1/bpf/policy/{ep}", func(r *http.Request) (any, error) { return a.rawEntry(r, false) })
	h("POST /v1/bpf/policy/{ep}/allow-all", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		if err != nil {
			return nil, err
		}
		revert := r.URL.Query().Get("revert") == "true"
		a.syncMu.Lock()
		defer a.syncMu.Unlock()
		if err := a.dp.AllowAll(ep.ID, revert); err != nil {
			return nil, err
		}
		verb := "opened (all traffic allowed in both directions)"
		if revert {
			verb = "closed again (policy enforced)"
		}
		a.log.Warn("emergency allow-all", "endpoint_id", ep.ID, "endpoint", ep.Name, "revert", revert)
		return map[string]string{"endpoint": ep.Name, "result": verb}, nil
	})
	h("GET /v1/bpf/ipcache", func(r *http.Request) (any, error) {
		es, err := a.dp.IPCache()
		if err != nil {
			return nil, err
		}
		out := make([]api.IPCacheEntry, 0, len(es))
		for _, e := range es {
			out = append(out, a.toAPIIPCache(e))
		}
		return out, nil
	})
	h("GET /v1/bpf/ipcache/{ip}", func(r *http.Request) (any, error) {
		ip, err := netip.ParseAddr(r.PathValue("ip"))
		if err != nil {
			return nil, api.Errorf(http.StatusBadRequest, "", "%q is not an IP address", r.PathValue("ip"))
		}
		e, ok, err := a.dp.LookupIPCache(ip)
		if err != nil {
			return nil, err
		}
		if !ok {
			return api.IPCacheEntry{Prefix: ip.String(), Identity: uint32(identity.World), Labels: "reserved:world="}, nil
		}
		return a.toAPIIPCache(e), nil
	})
	h("GET /v1/bpf/ct", func(r *http.Request) (any, error) {
		es, err := a.dp.CT()
		return nonNil(es), err
	})
	h("GET /v1/bpf/metrics", func(r *http.Request) (any, error) {
		ms, err := a.dp.Metrics()
		return nonNil(ms), err
	})
	d.mux.HandleFunc("GET /v1/monitor", a.serveMonitor)

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

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func (a *agent) endpoint(nameOrID string) (endpoint.Endpoint, error) {
	ep, err := a.eps.Get(nameOrID)
	if err != nil {
		return ep, endpointErr(err)
	}
	return ep, nil
}

func endpointErr(err error) error {
	switch {
	case errors.Is(err, endpoint.ErrNotFound):
		return api.Errorf(http.StatusNotFound, "list them with `rackwire endpoint list`", "%v", err)
	case errors.Is(err, endpoint.ErrExists), errors.Is(err, endpoint.ErrIPInUse):
		return api.Errorf(http.StatusConflict, "", "%v", err)
	case errors.Is(err, endpoint.ErrCIDRExhausted):
		return api.Errorf(http.StatusConflict, "add a CIDR to [ipam] cidrs or delete unused endpoints", "%v", err)
	case errors.Is(err, endpoint.ErrNoNetns), errors.Is(err, endpoint.ErrIPOutsideCIDR), errors.Is(err, identity.ErrBadLabels), errors.Is(err, endpoint.ErrBadName):
		return api.Errorf(http.StatusBadRequest, "", "%v", err)
	}
	return err
}

func (a *agent) addEndpoint(ctx context.Context, in api.EndpointAdd) (api.Endpoint, error) {
	ls, err := identity.ParseLabels(in.Labels)
	if err != nil {
		return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "write --labels k1=v1,k2=v2", "%v", err)
	}
	req := endpoint.Request{Name: in.Name, NetnsPath: in.Netns, Labels: ls}
	for _, s := range []string{in.IP, in.IPv6} {
		if s == "" {
			continue
		}
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "", "%q is not an IP address", s)
		}
		if ip.Is4() {
			req.IP = ip
		} else {
			req.IPv6 = ip
		}
	}
	ep, err := a.eps.Add(ctx, req)
	if err != nil {
		return api.Endpoint{}, endpointErr(err)
	}
	// Compute and write its policy before answering, so the caller never
	// sees the workload with a stale policy.
	a.sync(ctx)
	return toAPIEndpoint(ep), nil
}

func toAPIEndpoint(ep endpoint.Endpoint) api.Endpoint {
	out := api.Endpoint{
		ID: ep.ID, Name: ep.Name, Netns: ep.Netns, State: string(ep.State),
		Labels: ep.Labels.CLI(), IdentityLabels: ep.IdentityLabels.CLI(), Identity: uint32(ep.Identity),
		HostIfName: ep.HostIfName, HostIfIndex: ep.HostIfIndex, MAC: ep.MAC, Created: ep.Created,
	}
	if ep.IPv4.IsValid() {
		out.IPv4 = ep.IPv4.String()
	}
	if ep.IPv6.IsValid() {
		out.IPv6 = ep.IPv6.String()
	}
	return out
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
		if p, ok := a.cidrs.Lookup(iid); ok {
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
	a.syncMu.Lock()
	for p, id := range a.cidrIDs {
		out = append(out, api.Identity{ID: uint32(id), Labels: "cidr:" + p.String(), Scope: "local"})
	}
	a.syncMu.Unlock()
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

func (a *agent) toAPIEntries(es []datapath.Entry) []api.PolicyEntry {
	out := make([]api.PolicyEntry, 0, len(es))
	for _, e := range es {
		v := "allow"
		if e.Deny {
			v = "deny"
		}
		out = append(out, api.PolicyEntry{
			Identity: e.Identity, IdentityLabels: a.labelsOf(e.Identity), Direction: e.Direction.String(),
			Proto: api.ProtoName(e.Proto), Port: e.Port, EndPort: e.EndPort, Verdict: v,
			Emergency: e.Emergency, Packets: e.Packets, Bytes: e.Bytes,
		})
	}
	return out
}

func (a *agent) toAPIIPCache(e datapath.IPCacheEntry) api.IPCacheEntry {
	out := api.IPCacheEntry{Prefix: e.Prefix.String(), Identity: e.Identity, Labels: a.labelsOf(e.Identity)}
	if e.HostIP.IsValid() {
		out.HostIP = e.HostIP.String()
	}
	return out
}

// rawEntry adds or deletes one raw policy map entry (operator access).
func (a *agent) rawEntry(r *http.Request, add bool) (any, error) {
	ep, err := a.endpoint(r.PathValue("ep"))
	if err != nil {
		return nil, err
	}
	var in api.RawEntry
	if err := api.DecodeBody(r, &in); err != nil {
		return nil, err
	}
	e, err := in.Entry()
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "", "%v", err)
	}
	de := datapath.Entry{Identity: e.Identity, Direction: datapath.Direction(e.Direction), Proto: e.Proto, Port: e.Port, EndPort: e.EndPort, Deny: e.Deny}
	a.syncMu.Lock()
	defer a.syncMu.Unlock()
	if add {
		err = a.dp.PutEntry(ep.ID, de)
	} else {
		err = a.dp.DeleteEntry(ep.ID, de)
	}
	if errors.Is(err, unix.E2BIG) {
		// The kernel's E2BIG on a hash map update means "no room left".
		return nil, api.Errorf(http.StatusConflict, "delete entries, or raise [datapath] policy_max_entries and run `rackwired cleanup` (existing maps keep their size)",
			"policy map of endpoint %s is full (policy_max_entries = %d): %v", ep.Name, a.cfg.Datapath.PolicyMaxEntries, err)
	}
	if err != nil {
		return nil, err
	}
	a.log.Warn("raw policy entry changed by operator; the next policy change of this endpoint rewrites its map",
		"endpoint_id", ep.ID, "add", add, "entry", de.String())
	return a.toAPIEntries([]datapath.Entry{de})[0], nil
}

func (a *agent) importPolicies(ctx context.Context, file string, data []byte) ([]api.PolicySummary, error) {
	if file == "" {
		file = "request"
	}
	ps, err := policy.Load(file, data)
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "fix the document; nothing was imported", "%v", err)
	}
	if len(ps) == 0 {
		return nil, api.Errorf(http.StatusBadRequest, "", "%s holds no policy", file)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out := []api.PolicySummary{}
	for _, p := range ps {
		b, err := policy.EncodeStoreValue(p)
		if err != nil {
			return out, err
		}
		if err := a.st.Put(ctx, store.PolicyKey(p.Metadata.Name), b, store.PutOptions{}); err != nil {
			return out, api.Errorf(http.StatusServiceUnavailable, "check the store with `rackwire status`; policies imported before this one stay", "store policy %s: %v", p.Metadata.Name, err)
		}
		out = append(out, api.PolicySummary{Name: p.Metadata.Name, Source: policy.SourceStore(p.Metadata.Name), Rules: len(p.Rules())})
	}
	// Apply now rather than on the watch's next turn.
	if kvs, _, err := a.st.List(ctx, store.PolicyPrefix); err == nil {
		a.syncMu.Lock()
		a.applyStorePolicies(kvs)
		a.syncMu.Unlock()
	}
	a.sync(ctx)
	return out, nil
}

func (a *agent) deletePolicy(ctx context.Context, name string) (any, error) {
	for _, l := range a.pol.Policies() {
		if l.Policy.Metadata.Name == name && strings.HasPrefix(l.Source, "file:") {
			return nil, api.Errorf(http.StatusConflict, "remove it from that file and reload (systemctl reload rackwired)", "policy %q comes from %s, not from the store", name, strings.TrimPrefix(l.Source, "file:"))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := a.st.Get(ctx, store.PolicyKey(name)); errors.Is(err, store.ErrNotFound) {
		return nil, api.Errorf(http.StatusNotFound, "list them with `rackwire policy list`", "no store policy named %q", name)
	}
	if err := a.st.Delete(ctx, store.PolicyKey(name)); err != nil {
		return nil, err
	}
	a.syncMu.Lock()
	a.pol.DeletePolicy(policy.SourceStore(name), name)
	a.syncMu.Unlock()
	a.sync(ctx)
	return map[string]string{"deleted": name}, nil
}

func (a *agent) trace(in api.TraceRequest) (any, error) {
	subject := func(side string, s api.TraceSubject) (policy.Subject, error) {
		n := 0
		var out policy.Subject
		if s.Labels != "" {
			n++
			ls, err := identity.ParseLabels(s.Labels)
			if err != nil {
				return out, err
			}
			out.Labels = ls
		}
		if s.IP != "" {
			n++
			ip, err := netip.ParseAddr(s.IP)
			if err != nil {
				return out, fmt.Errorf("%q is not an IP address", s.IP)
			}
			out.IP = ip
		}
		if s.Endpoint != "" {
			n++
			ep, err := a.eps.Get(s.Endpoint)
			if err != nil {
				return out, err
			}
			out.Endpoint = ep.ID
		}
		if n != 1 {
			return out, fmt.Errorf("give exactly one of --%s, --%s-ip, --%s-endpoint", side, side, side)
		}
		return out, nil
	}
	src, err := subject("src", in.Src)
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "", "source: %v", err)
	}
	dst, err := subject("dst", in.Dst)
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "", "destination: %v", err)
	}
	port, proto, err := policy.ParsePortProto(in.DPort)
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "write --dport 80/tcp", "%v", err)
	}
	res, err := a.pol.Trace(src, dst, port, proto)
	if err != nil {
		return nil, api.Errorf(http.StatusBadRequest, "", "%v", err)
	}
	return res, nil
}

// serveMonitor streams datapath events as JSON lines until the client goes.
func (a *agent) serveMonitor(w http.ResponseWriter, r *http.Request) {
	typ := r.URL.Query().Get("type")
	if typ != "" && typ != "drop" && typ != "trace" && typ != "audit" {
		api.WriteError(w, api.Errorf(http.StatusBadRequest, "", "--type %q: write drop, trace or audit", typ))
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		api.WriteError(w, errors.New("streaming unsupported"))
		return
	}
	evs, done := a.mon.subscribe()
	defer func() {
		if lost := done(); lost > 0 {
			a.log.Info("monitor client lost events (too slow)", "lost", lost)
		}
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	fl.Flush()
	enc := json.NewEncoder(w)
	keep := time.NewTicker(15 * time.Second)
	defer keep.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-keep.C:
			_, _ = w.Write([]byte("\n"))
			fl.Flush()
		case ev := <-evs:
			v := eventVerdict(ev)
			if typ != "" && typ != v {
				continue
			}
			if err := enc.Encode(a.toAPIEvent(ev, v)); err != nil {
				return
			}
			fl.Flush()
		}
	}
}

func eventVerdict(ev datapath.Event) string {
	switch ev.Verdict {
	case datapath.Dropped:
		return "drop"
	case datapath.Audited:
		return "audit"
	}
	return "trace"
}

func (a *agent) toAPIEvent(ev datapath.Event, typ string) api.Event {
	out := api.Event{
		Time: ev.Time, Type: typ, Endpoint: ev.Endpoint, Direction: ev.Direction.String(),
		Src: ev.Src.String(), Dst: ev.Dst.String(), Proto: api.ProtoName(ev.Proto),
		SrcIdentity: ev.SrcIdentity, SrcLabels: a.labelsOf(ev.SrcIdentity),
		DstIdentity: ev.DstIdentity, DstLabels: a.labelsOf(ev.DstIdentity),
		Verdict: ev.Verdict.String(), Len: ev.Len,
	}
	if ev.Reason != 0 {
		out.Reason = ev.Reason.String()
	}
	if typ == "audit" {
		out.Verdict = "audit: would deny"
	}
	if ep, err := a.eps.Get(strconv.Itoa(int(ev.Endpoint))); err == nil {
		out.EndpointName = ep.Name
	}
	return out
}

func (a *agent) isAudit(name string) bool {
	a.syncMu.Lock()
	defer a.syncMu.Unlock()
	return a.cfg.Datapath.PolicyAuditMode || a.audit[name]
}
