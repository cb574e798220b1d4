package daemon

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
)

func (a *agent) policyRoutes(h route) {
	h(api.Read, "GET /v1/policies", func(r *http.Request) (any, error) {
		var out []api.PolicySummary
		for _, l := range a.pol.Policies() {
			out = append(out, api.PolicySummary{Name: l.Policy.Metadata.Name, Source: l.Source, Rules: len(l.Policy.Rules())})
		}
		return nonNil(out), nil
	})
	h(api.Read, "GET /v1/policies/{name}", func(r *http.Request) (any, error) {
		var out []api.PolicyDocument
		for _, l := range a.pol.Policies() {
			if l.Policy.Metadata.Name == r.PathValue("name") {
				doc, err := json.Marshal(&l.Policy)
				if err != nil {
					return nil, fmt.Errorf("encode policy %s: %w", r.PathValue("name"), err)
				}
				out = append(out, api.PolicyDocument{Source: l.Source, Policy: doc})
			}
		}
		if len(out) == 0 {
			return nil, api.Errorf(http.StatusNotFound, "list them with `rackwire policy list`", "no policy named %q is in force", r.PathValue("name"))
		}
		return out, nil
	})
	h(api.Admin, "POST /v1/policies", func(r *http.Request) (any, error) {
		var in api.PolicyImport
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.importPolicies(r.Context(), in.File, []byte(in.Data))
	})
	h(api.Admin, "DELETE /v1/policies/{name}", func(r *http.Request) (any, error) {
		if err := a.deletePolicy(r.Context(), r.PathValue("name")); err != nil {
			return nil, err
		}
		return api.Deleted{Deleted: r.PathValue("name")}, nil
	})
	// Admin although it changes nothing: it is a POST (the query is a
	// body), and the rule is "only GET reads" (api.Router enforces it), so
	// that no route's method and decision can disagree. Readers can still
	// see every policy (GET /v1/policies/{name}).
	h(api.Admin, "POST /v1/policy/trace", func(r *http.Request) (any, error) {
		var in api.TraceRequest
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.trace(in)
	})

}

func (a *agent) trace(in api.TraceRequest) (api.TraceResult, error) {
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
		return api.TraceResult{}, api.Errorf(http.StatusBadRequest, "", "source: %v", err)
	}
	dst, err := subject("dst", in.Dst)
	if err != nil {
		return api.TraceResult{}, api.Errorf(http.StatusBadRequest, "", "destination: %v", err)
	}
	port, proto, err := policy.ParsePortProto(in.DPort)
	if err != nil {
		return api.TraceResult{}, api.Errorf(http.StatusBadRequest, "write --dport 80/tcp", "%v", err)
	}
	res, err := a.pol.Trace(src, dst, port, proto)
	if err != nil {
		return api.TraceResult{}, api.Errorf(http.StatusBadRequest, "", "%v", err)
	}
	return toAPITrace(res), nil
}

// toAPITrace converts a trace result to its wire type, the same JSON.
func toAPITrace(res policy.TraceResult) api.TraceResult {
	subject := func(s policy.ResolvedSubject) api.TraceResolved {
		return api.TraceResolved{Kind: s.Kind, Identity: s.Identity, Labels: s.Labels, Endpoint: s.Endpoint, IP: s.IP}
	}
	side := func(s policy.SideResult) api.TraceSide {
		return api.TraceSide{Verdict: s.Verdict, Source: s.Source, Policy: s.Policy, Rule: s.Rule, RuleIndex: s.RuleIndex, Audit: s.Audit, Reason: s.Reason}
	}
	return api.TraceResult{
		Verdict: res.Verdict, Src: subject(res.Src), Dst: subject(res.Dst), DPort: res.DPort, Proto: res.Proto,
		Egress: side(res.Egress), Ingress: side(res.Ingress),
	}
}
