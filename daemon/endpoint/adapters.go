package endpoint

import (
	"context"
	"net/netip"

	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/identity"
)

// BPF adapts the eBPF datapath to Datapath.
type BPF struct{ D *datapath.Datapath }

// AttachEndpoint implements Datapath.
func (b BPF) AttachEndpoint(s AttachSpec) error {
	return b.D.AttachEndpoint(datapath.EndpointSpec{ID: s.ID, IfIndex: s.IfIndex, IPs: s.IPs,
		MAC: s.PeerMAC, NodeMAC: s.HostMAC, Identity: uint32(s.Identity), Audit: s.Audit})
}

// DetachEndpoint implements Datapath.
func (b BPF) DetachEndpoint(id uint16, ifindex int) error { return b.D.DetachEndpoint(id, ifindex) }

// UpsertIPCache implements Datapath.
func (b BPF) UpsertIPCache(p netip.Prefix, id identity.ID, hostIP netip.Addr) error {
	return b.D.UpsertIPCache(p, uint32(id), hostIP)
}

// DeleteIPCache implements Datapath.
func (b BPF) DeleteIPCache(p netip.Prefix) error { return b.D.DeleteIPCache(p) }

// Allocator adapts the identity allocator to Identities.
type Allocator struct{ A *identity.Allocator }

// Allocate implements Identities.
func (a Allocator) Allocate(ctx context.Context, ls identity.Labels) (identity.ID, error) {
	id, _, err := a.A.Allocate(ctx, ls)
	return id, err
}

// Release implements Identities.
func (a Allocator) Release(ctx context.Context, ls identity.Labels) error {
	return a.A.Release(ctx, ls)
}

var (
	_ Datapath   = BPF{}
	_ Identities = Allocator{}
)
