package daemon

import (
	"fmt"
	"net/http"
	"net/netip"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
)

func (a *agent) policyRoutes(h route) {
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
