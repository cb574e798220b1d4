package daemon

import (
	"errors"
	"net/http"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/identity"
)

func (a *agent) bpfRoutes(h route) {
	h(api.Read, "GET /v1/bpf/policy/{ep}", func(r *http.Request) (any, error) {
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
	h(api.Admin, "POST /v1/bpf/policy/{ep}", func(r *http.Request) (any, error) { return a.rawEntry(r, true) })
	h(api.Admin, "DELETE /v1/bpf/policy/{ep}", func(r *http.Request) (any, error) { return a.rawEntry(r, false) })
	h(api.Admin, "POST /v1/bpf/policy/{ep}/allow-all", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		if err != nil {
			return nil, err
		}
		revert := r.URL.Query().Get("revert") == "true"
		if err := a.dp.AllowAll(ep.ID, revert); err != nil {
			return nil, err
		}
		verb := "opened (all traffic allowed in both directions)"
		if revert {
			verb = "closed again (policy enforced)"
		}
		a.log.Warn("emergency allow-all", "endpoint_id", ep.ID, "endpoint", ep.Name, "revert", revert)
		return api.AllowAll{Endpoint: ep.Name, Result: verb}, nil
	})
	h(api.Read, "GET /v1/bpf/ipcache", func(r *http.Request) (any, error) {
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
	h(api.Read, "GET /v1/bpf/ipcache/{ip}", func(r *http.Request) (any, error) {
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
	h(api.Read, "GET /v1/bpf/ct", func(r *http.Request) (any, error) {
		id, _, err := a.ctEndpoint(r)
		if err != nil {
			return nil, err
		}
		es, err := a.dp.CT()
		if err != nil {
			return nil, err
		}
		out := make([]api.CTEntry, 0, len(es))
		for _, e := range es {
			if id == 0 || e.Endpoint == id {
				out = append(out, toAPICT(e))
			}
		}
		return out, nil
	})
	h(api.Admin, "POST /v1/bpf/ct/flush", func(r *http.Request) (any, error) {
		id, name, err := a.ctEndpoint(r)
		if err != nil {
			return nil, err
		}
		n, err := a.dp.FlushCT(id)
		if err != nil {
			return nil, err
		}
		a.log.Warn("connection tracking flushed", "endpoint_id", id, "endpoint", name, "deleted", n)
		return api.CTFlushed{Endpoint: name, Deleted: n}, nil
	})
	h(api.Read, "GET /v1/bpf/metrics", func(r *http.Request) (any, error) {
		ms, err := a.dp.Metrics()
		if err != nil {
			return nil, err
		}
		out := make([]api.Metric, 0, len(ms))
		for _, m := range ms {
			out = append(out, api.Metric{Reason: m.Reason.String(), Direction: m.Direction.String(), Packets: m.Packets, Bytes: m.Bytes})
		}
		return out, nil
	})
}

// toAPICT converts a CT entry to its wire type, the same JSON.
func toAPICT(e datapath.CTEntry) api.CTEntry {
	return api.CTEntry{
		Src: addrPortText(e.Src), Dst: addrPortText(e.Dst), Proto: e.Proto, Direction: e.Direction.String(),
		Endpoint: e.Endpoint, RemoteIdentity: e.RemoteIdentity, Packets: e.Packets, Bytes: e.Bytes,
		TCPFlags: e.TCPFlags, Audit: e.Audit, State: e.State, FINOrig: e.FINOrig, FINReply: e.FINReply, RST: e.RST,
		Revision: e.Revision, Created: e.Created, LastSeen: e.LastSeen, ExpiresIn: e.ExpiresIn,
		NextHop: (*api.CTNextHop)(e.NextHop),
	}
}

// ctEndpoint resolves the optional ?endpoint= (name or id) of the CT
// routes: id 0 and name "" when absent.
func (a *agent) ctEndpoint(r *http.Request) (uint16, string, error) {
	v := r.URL.Query().Get("endpoint")
	if v == "" {
		return 0, "", nil
	}
	ep, err := a.endpoint(v)
	if err != nil {
		return 0, "", err
	}
	return ep.ID, ep.Name, nil
}

// addrPortText writes an address and port as their JSON text does: "" for
// the zero AddrPort.
func addrPortText(ap netip.AddrPort) string {
	b, _ := ap.MarshalText()
	return string(b)
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
