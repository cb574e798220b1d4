package daemon

import (
	"context"
	"errors"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/ipcache"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/policysync"
)

// The adapters below let the pure packages (endpoint, policysync, ipcache)
// drive the concrete datapath and allocator without importing them.

// The ipcache writes bulk lists in batches through the datapath itself.
var _ ipcache.BatchWriter = (*datapath.Datapath)(nil)

// endpointDatapath adapts the eBPF datapath to endpoint.Datapath.
type endpointDatapath struct{ d *datapath.Datapath }

func (b endpointDatapath) AttachEndpoint(s endpoint.AttachSpec) error {
	return b.d.AttachEndpoint(datapath.EndpointSpec{ID: s.ID, IfIndex: s.IfIndex, IPs: s.IPs,
		MAC: s.PeerMAC, NodeMAC: s.HostMAC, Identity: uint32(s.Identity), Audit: s.Audit})
}

func (b endpointDatapath) DetachEndpoint(id uint16, ifindex int) error {
	return b.d.DetachEndpoint(id, ifindex)
}

// endpointIdentities adapts the identity allocator to endpoint.Identities.
type endpointIdentities struct{ a *identity.Allocator }

func (a endpointIdentities) Allocate(ctx context.Context, ls identity.Labels) (identity.ID, error) {
	id, _, err := a.a.Allocate(ctx, ls)
	return id, err
}

func (a endpointIdentities) Release(ctx context.Context, ls identity.Labels) error {
	return a.a.Release(ctx, ls)
}

// policyWriter adapts the datapath's atomic policy swap to policysync.Writer.
type policyWriter struct{ d *datapath.Datapath }

func (w policyWriter) SetPolicy(id uint16, es []policy.Entry) error {
	out := make([]datapath.Entry, len(es))
	for i, e := range es {
		out[i] = datapath.Entry{
			Identity: e.Identity, Direction: datapath.Direction(e.Direction), Proto: e.Proto,
			Port: e.Port, EndPort: e.EndPort, Deny: e.Deny,
		}
	}
	err := w.d.SetPolicy(id, out)
	if errors.Is(err, datapath.ErrPolicyTooLarge) {
		return errors.Join(err, policysync.ErrTooLarge)
	}
	return err
}

var (
	_ endpoint.Datapath   = endpointDatapath{}
	_ endpoint.Identities = endpointIdentities{}
	_ policysync.Writer   = policyWriter{}
)
