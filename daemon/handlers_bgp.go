package daemon

import (
	"net/http"
	"net/netip"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/bgp"
)

func (a *agent) bgpRoutes(h route) {
	h(api.Read, "GET /v1/bgp/status", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "set [bgp] enabled = true and restart the agent", "BGP is disabled on this host")
		}
		return toAPIBGPStatus(a.bgp.Status(r.Context())), nil
	})
	// Admin although a GET: it shows the BIRD config the agent writes
	// (peers, addresses, filters, password directives). Configuration, even
	// with its secrets redacted, is for those who may change it.
	h(api.Admin, "GET /v1/bgp/render", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "set [bgp] enabled = true and restart the agent", "BGP is disabled on this host")
		}
		text, err := a.bgp.Render()
		return api.BGPRender{Config: text}, err
	})
	h(api.Admin, "POST /v1/bgp/drain", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "", "BGP is disabled on this host")
		}
		keep := r.URL.Query().Get("keep") != "false"
		a.bgp.Drain(keep)
		return api.BGPDrain{Drained: true, Keep: keep}, a.bgp.ApplyNow(r.Context())
	})
	h(api.Admin, "POST /v1/bgp/undrain", func(r *http.Request) (any, error) {
		if a.bgp == nil {
			return nil, api.Errorf(http.StatusConflict, "", "BGP is disabled on this host")
		}
		a.bgp.Undrain()
		return api.BGPUndrain{Drained: false}, a.bgp.ApplyNow(r.Context())
	})
}

// toAPIBGPStatus converts the BGP manager's status to its wire type; the
// JSON is the same field for field (nil slices stay nil: null on the wire).
func toAPIBGPStatus(st bgp.Status) api.BGPStatus {
	out := api.BGPStatus{
		Enabled: st.Enabled, Config: st.Config, Socket: st.Socket,
		BirdRunning: st.BirdRunning, BirdError: st.BirdError,
		Drained: st.Drained, DrainKeep: st.DrainKeep, Announced: st.Announced,
		LastApply: api.BGPApply{
			Time: st.LastApply.Time, OK: st.LastApply.OK, Written: st.LastApply.Written,
			Reconfigured: st.LastApply.Reconfigured, RolledBack: st.LastApply.RolledBack, Error: st.LastApply.Error,
		},
	}
	if st.Protocols != nil {
		out.Protocols = make([]api.BGPProtocol, 0, len(st.Protocols))
	}
	for _, p := range st.Protocols {
		out.Protocols = append(out.Protocols, api.BGPProtocol{
			Name: p.Name, Proto: p.Proto, Table: p.Table, State: p.State,
			Since: p.Since, SinceText: p.SinceText, Info: p.Info,
			BGPState: p.BGPState, NeighborAddr: p.NeighborAddr, NeighborAS: p.NeighborAS, LastError: p.LastError,
			RoutesImported: p.RoutesImported, RoutesExported: p.RoutesExported, RoutesFiltered: p.RoutesFiltered,
			Channels: p.Channels, UptimeSeconds: p.UptimeSeconds, Reason: p.Reason,
		})
	}
	if st.BFDSessions != nil {
		out.BFDSessions = make([]api.BFDSession, 0, len(st.BFDSessions))
	}
	for _, s := range st.BFDSessions {
		out.BFDSessions = append(out.BFDSessions, api.BFDSession{
			Protocol: s.Protocol, Address: addrText(s.Address), Interface: s.Interface,
			State: s.State, Since: s.Since, Interval: s.Interval, Timeout: s.Timeout,
		})
	}
	if st.VIPs != nil {
		out.VIPs = make([]api.VIPStatus, 0, len(st.VIPs))
	}
	for _, v := range st.VIPs {
		out.VIPs = append(out.VIPs, api.VIPStatus{
			VIP: v.VIP, Checked: v.Checked, Healthy: v.Healthy, Announced: v.Announced,
			Type: v.Type, Target: v.Target, OKRun: v.OKRun, FailRun: v.FailRun,
			LastError: v.LastError, LastCheck: v.LastCheck,
		})
	}
	return out
}

// addrText writes an address as its JSON text does: "" for the zero Addr
// (where String would say "invalid IP").
func addrText(ip netip.Addr) string {
	b, _ := ip.MarshalText()
	return string(b)
}
