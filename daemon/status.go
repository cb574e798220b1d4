package daemon

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/policysync"
	"github.com/rackwire/rackwire/internal/version"
)

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

// eventLimitText describes each endpoint's event budget.
func eventLimitText(rate, burst uint32) string {
	return fmt.Sprintf("%d/s, burst %d, per endpoint", rate, burst)
}

// agentStatus fills the components the agent owns.
func (a *agent) status(ctx context.Context, st *api.Status) {
	f := a.dp.Features()
	st.Datapath = api.Component{State: api.StateOK, Detail: map[string]string{
		"attach": f.AttachMode, "pin_dir": a.dp.PinDir(), "audit": strconv.FormatBool(a.cfg.Datapath.PolicyAuditMode),
		"events": f.Events, "events_why": f.EventsWhy, "events_limit": eventLimitText(a.dp.EventLimit()),
	}}
	st.Datapath.Detail["host_routing"] = f.HostRoutingMode
	st.Datapath.Detail["host_routing_why"] = f.HostRoutingWhy
	st.Datapath.Detail["uplinks"] = strings.Join(a.dp.Uplinks(), ",")
	ns, nsWhy := a.dp.NorthSouth()
	st.Datapath.Detail["north_south"] = strconv.FormatBool(ns)
	st.Datapath.Detail["north_south_why"] = nsWhy
	if len(f.Fallbacks) > 0 {
		st.Datapath.State = api.StateDegraded
		st.Datapath.Message = strings.Join(f.Fallbacks, "; ")
	}
	a.uplinkMu.Lock()
	if a.uplinkErr != nil {
		st.Datapath.State = api.StateDegraded
		st.Datapath.Message = strings.TrimPrefix(st.Datapath.Message+"; uplinks: "+a.uplinkErr.Error()+" (their traffic takes the host stack)", "; ")
	}
	a.uplinkMu.Unlock()
	if !ns && a.nsWanted.Load() {
		st.Datapath.State = api.StateDegraded
		st.Datapath.Message = strings.TrimPrefix(st.Datapath.Message+"; north-south service balancing is off ("+nsWhy+"): service VIPs are not announced", "; ")
	}
	st.Kernel = []api.KernelFeature{
		{Name: "tcx", Available: f.TCX, Fallback: fallback(f.TCX, "legacy clsact tc filters")},
		{Name: "ringbuf", Available: f.RingBuf, Fallback: fallback(f.RingBuf, "events on a perf event array")},
		{Name: "redirect_peer", Available: f.RedirectPeer, Fallback: fallback(f.RedirectPeer, "local delivery through the host stack")},
		{Name: "host_routing", Available: f.HostRouting, Fallback: fallback(f.HostRouting, "traffic to and from other hosts through the host stack")},
		{Name: "lpm_trie", Available: f.LPM, Fallback: fallback(f.LPM, "no CIDR prefixes in the ipcache")},
		{Name: "btf", Available: f.BTF, Fallback: fallback(f.BTF, "no CO-RE; objects built for this kernel only")},
		{Name: "hash_of_maps", Available: f.HashOfMaps, Fallback: fallback(f.HashOfMaps, "required: the datapath cannot run")},
	}

	eps := a.eps.List()
	counts := map[string]int{}
	for _, ep := range eps {
		counts[string(ep.State)]++
	}
	st.Endpoints = api.Component{State: api.StateOK, Message: fmt.Sprintf("%d endpoints", len(eps)), Detail: map[string]string{}}
	for k, v := range counts {
		st.Endpoints.Detail[k] = strconv.Itoa(v)
	}
	if sum := a.sync.Summary(); sum.Errors > 0 {
		st.Endpoints.State = api.StateDegraded
		st.Endpoints.Detail[policysync.StateError] = strconv.Itoa(sum.Errors)
		st.Endpoints.Message += fmt.Sprintf(" (%d with a policy error: closed, see `rackwire endpoint list`)", sum.Errors)
	}
	if counts[string(endpoint.StateLost)] > 0 {
		st.Endpoints.State = api.StateDegraded
		st.Endpoints.Message += fmt.Sprintf(" (%d lost: their veth vanished; delete them with `rackwire endpoint delete`)", counts[string(endpoint.StateLost)])
	}

	st.Identities = api.Component{State: api.StateOK, Message: fmt.Sprintf("%d cluster identities known, %d used here", len(a.ids.List()), a.ids.InUse())}
	if ls := a.ids.LastSync(); !ls.IsZero() {
		st.Identities.Detail = map[string]string{"last_sync": ls.UTC().Format(time.RFC3339), "lag": time.Since(ls).Truncate(time.Millisecond).String()}
	} else {
		st.Identities.State = api.StateConnecting
		st.Identities.Message += "; waiting for the first list of identities from the store"
	}

	sum := a.sync.Summary()
	perr := a.sync.PolicyErrors()
	st.Policy = api.Component{State: api.StateOK, Message: fmt.Sprintf("%d policies in force", len(a.pol.Policies())),
		Detail: map[string]string{"last_sync": sum.LastSync.UTC().Format(time.RFC3339), "enforced": strconv.Itoa(sum.Enforced),
			"pending": strconv.Itoa(sum.Pending), "policy_errors": strconv.Itoa(sum.Errors)}}
	if !sum.Loaded {
		st.Policy.State = api.StateConnecting
		st.Policy.Message += "; " + sum.Waiting
	}
	if len(perr) > 0 {
		st.Policy.State = api.StateDegraded
		st.Policy.Message += fmt.Sprintf("; %d sources refused (see the log)", len(perr))
	}
	if sum.Errors > 0 {
		st.Policy.State = api.StateDegraded
		st.Policy.Message += fmt.Sprintf("; %d endpoints closed because their policy could not be written (rackwire endpoint list shows why)", sum.Errors)
	}
	if sum.SyncError != "" && sum.Loaded {
		st.Policy.State = api.StateDegraded
		st.Policy.Message += "; last sync: " + sum.SyncError
	}
	if stall := time.Since(a.sync.LastBeat()); stall > syncStallLimit {
		st.Policy.State = api.StateDegraded
		st.Policy.Message += fmt.Sprintf("; the sync loop has been stuck for %s", stall.Truncate(time.Second))
	}
	if n := a.ipc.Failing(); n > 0 {
		st.Datapath.State = api.StateDegraded
		st.Datapath.Message = strings.TrimPrefix(st.Datapath.Message+fmt.Sprintf("; %d ipcache writes failing, retried every second", n), "; ")
	}
	if dup := a.remote.duplicateNode(); dup != "" {
		st.Store.State = api.StateDegraded
		st.Store.Message = strings.TrimPrefix(st.Store.Message+"; "+dup, "; ")
	}
	if rej := a.remote.rejectedKeys(5); len(rej) > 0 {
		if st.Store.Detail == nil {
			st.Store.Detail = map[string]string{}
		}
		st.Store.Detail["refused_records"] = strings.Join(rej, "; ")
	}
	if d := a.remote.syncDetail(); d != nil {
		if st.Store.Detail == nil {
			st.Store.Detail = map[string]string{}
		}
		maps.Copy(st.Store.Detail, d)
	}

	if a.bgp != nil {
		bs := a.bgp.Status(ctx)
		state, msg, detail := bs.Summary()
		st.BGP = api.Component{State: state, Message: msg, Detail: detail}
	}
}

func fallback(ok bool, f string) string {
	if ok {
		return ""
	}
	return f
}
