package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policysync"
)

func (a *agent) endpointRoutes(h route) {
	h(api.Read, "GET /v1/endpoints", func(r *http.Request) (any, error) {
		var out []api.Endpoint
		for _, ep := range a.eps.List() {
			out = append(out, a.toAPIEndpoint(ep))
		}
		return nonNil(out), nil
	})
	h(api.Read, "GET /v1/endpoints/{ep}", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		if err != nil {
			return nil, err
		}
		return a.toAPIEndpoint(ep), nil
	})
	h(api.Admin, "POST /v1/endpoints", func(r *http.Request) (any, error) {
		var in api.EndpointAdd
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.addEndpoint(r.Context(), in)
	})
	h(api.Admin, "DELETE /v1/endpoints/{ep}", func(r *http.Request) (any, error) {
		ep, err := a.endpoint(r.PathValue("ep"))
		if err != nil {
			return nil, err
		}
		// A container runtime deletes only its own attachment: an endpoint
		// of that name plugged for another container is not found.
		if cid := r.URL.Query().Get("container_id"); cid != "" && cid != ep.ContainerID {
			return nil, api.Errorf(http.StatusNotFound, "list them with `rackwire endpoint list`",
				"endpoint %q belongs to container %q, not %q", ep.Name, ep.ContainerID, cid)
		}
		if err := a.eps.Delete(r.Context(), r.PathValue("ep")); err != nil {
			return nil, endpointErr(err)
		}
		return api.Deleted{Deleted: r.PathValue("ep")}, nil
	})
	// Readiness, for CNI STATUS and health checks: it reads.
	h(api.Read, "GET /v1/ready", func(r *http.Request) (any, error) { return a.ready(), nil })
	h(api.Admin, "POST /v1/attachments/gc", func(r *http.Request) (any, error) {
		var in api.AttachmentGC
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.gcAttachments(r.Context(), in)
	})
	h(api.Admin, "POST /v1/endpoints/{ep}/audit", func(r *http.Request) (any, error) {
		var in api.EndpointAudit
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		ep, err := a.setAudit(r.PathValue("ep"), in.Enabled)
		if err != nil {
			return nil, err
		}
		return a.toAPIEndpoint(ep), nil
	})
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

// maxLabelsText bounds an endpoint's labels as the API receives them
// ("k1=v1,k2=v2"): room for 64 labels of 253-byte keys and values, the
// most identity.ParseLabels accepts.
const maxLabelsText = 32 << 10

// addEndpoint plugs a workload in. The endpoint manager calls Admit before
// the veth goes up, so when this returns the endpoint's map holds its
// policy (or its directions are closed and its state says why).
func (a *agent) addEndpoint(ctx context.Context, in api.EndpointAdd) (api.Endpoint, error) {
	// The caller's strings are checked before anything else uses them: the
	// name (it reaches file names and logs), the size of the labels, the
	// netns path's form (length, absolute). The manager checks again.
	if err := endpoint.CheckName(in.Name); err != nil {
		return api.Endpoint{}, endpointErr(err)
	}
	if len(in.Labels) > maxLabelsText {
		return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "write --labels k1=v1,k2=v2", "--labels is %d bytes, at most %d", len(in.Labels), maxLabelsText)
	}
	if err := endpoint.CheckNetnsPath(in.Netns); err != nil {
		return api.Endpoint{}, endpointErr(err)
	}
	if err := endpoint.CheckAttachment(in.IfName, in.ContainerID, in.Network); err != nil {
		return api.Endpoint{}, endpointErr(err)
	}
	// A container runtime retries later (CNI code 11); an endpoint plugged
	// before the restore would race it.
	if in.ContainerID != "" {
		if rd := a.ready(); !rd.Ready {
			return api.Endpoint{}, api.Errorf(http.StatusServiceUnavailable, "try again in a few seconds", "%s", rd.Reason)
		}
	}
	ls, err := identity.ParseLabels(in.Labels)
	if err != nil {
		return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "write --labels k1=v1,k2=v2", "%v", err)
	}
	req := endpoint.Request{Name: in.Name, NetnsPath: in.Netns, Labels: ls, IfName: in.IfName, ContainerID: in.ContainerID, Network: in.Network}
	for _, s := range []string{in.IP, in.IPv6} {
		if s == "" {
			continue
		}
		ip, err := netip.ParseAddr(s)
		if err != nil {
			if len(s) > 64 {
				s = s[:64] + "..."
			}
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
	return a.toAPIEndpoint(ep), nil
}

// toAPIEndpoint shows an endpoint with its enforcement state: a ready
// endpoint whose policy is not (fully) in force shows policy-error or
// policy-pending, with the reason.
func (a *agent) toAPIEndpoint(ep endpoint.Endpoint) api.Endpoint {
	out := api.Endpoint{
		ID: ep.ID, Name: ep.Name, Netns: ep.Netns, State: string(ep.State),
		Labels: ep.Labels.CLI(), IdentityLabels: ep.IdentityLabels.CLI(), Identity: uint32(ep.Identity),
		HostIfName: ep.HostIfName, HostIfIndex: ep.HostIfIndex, MAC: ep.MAC, Created: ep.Created,
		Audit: a.audit.on(ep.Name), IfName: ep.PeerName(), HostMAC: ep.HostMAC, ContainerID: ep.ContainerID, Network: ep.Network,
	}
	if ep.IPv4.IsValid() {
		out.IPv4 = ep.IPv4.String()
		out.GatewayIPv4 = endpoint.GatewayIPv4.String()
		out.Routes = append(out.Routes, api.EndpointRoute{Dst: "0.0.0.0/0", Via: out.GatewayIPv4})
	}
	if ep.IPv6.IsValid() {
		out.IPv6 = ep.IPv6.String()
		out.GatewayIPv6 = endpoint.GatewayIPv6.String()
		out.Routes = append(out.Routes, api.EndpointRoute{Dst: "::/0", Via: out.GatewayIPv6})
	}
	if ep.State == endpoint.StatePending {
		out.PolicyReason = "closed in both directions: " + ep.Pending
	}
	if ep.State == endpoint.StateReady {
		if st, ok := a.sync.Status(ep.ID); ok && st.State != policysync.StateEnforced {
			out.State, out.PolicyReason = st.State, st.Reason
		}
	}
	return out
}

// ready says whether the agent plugs endpoints now: once start restored the
// endpoints and computed their policy.
func (a *agent) ready() api.Ready {
	if !a.started.Load() {
		return api.Ready{Reason: "rackwired is starting (restoring endpoints and policies)"}
	}
	return api.Ready{Ready: true}
}

// gcAttachments deletes the endpoints a container runtime plugged into
// in.Network that in.Keep does not name (CNI GC). Endpoints of other
// networks, and those not plugged by a runtime, are never touched.
func (a *agent) gcAttachments(ctx context.Context, in api.AttachmentGC) (api.AttachmentGCResult, error) {
	out := api.AttachmentGCResult{Deleted: []string{}}
	if err := endpoint.CheckAttachment("", "gc", in.Network); err != nil {
		return out, endpointErr(err)
	}
	if rd := a.ready(); !rd.Ready {
		return out, api.Errorf(http.StatusServiceUnavailable, "try again in a few seconds", "%s", rd.Reason)
	}
	keep := make(map[api.Attachment]bool, len(in.Keep))
	for _, k := range in.Keep {
		if k.IfName == "" {
			k.IfName = endpoint.PeerIfName
		}
		keep[k] = true
	}
	for _, ep := range a.eps.List() {
		if ep.ContainerID == "" || ep.Network != in.Network || keep[api.Attachment{ContainerID: ep.ContainerID, IfName: ep.PeerName()}] {
			continue
		}
		if err := a.eps.Delete(ctx, strconv.Itoa(int(ep.ID))); err != nil && !errors.Is(err, endpoint.ErrNotFound) {
			out.Failed = append(out.Failed, fmt.Sprintf("%s: %v", ep.Name, err))
			continue
		}
		out.Deleted = append(out.Deleted, ep.Name)
	}
	return out, nil
}
