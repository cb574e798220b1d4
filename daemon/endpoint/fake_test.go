package endpoint

import (
	"context"
	"fmt"
	"net/netip"
	"sync"

	"github.com/rackwire/rackwire/daemon/identity"
)

// fakeDatapath records what the manager asks of the datapath, and plays
// the agent's Enforcer: the ipcache entries of admitted endpoints.
type fakeDatapath struct {
	mu        sync.Mutex
	eps       map[uint16]AttachSpec
	attaches  map[uint16]int
	ipcache   map[netip.Prefix]identity.ID
	failAtt   error
	failCache error
}

func newFakeDatapath() *fakeDatapath {
	return &fakeDatapath{eps: map[uint16]AttachSpec{}, attaches: map[uint16]int{}, ipcache: map[netip.Prefix]identity.ID{}}
}

func (f *fakeDatapath) AttachEndpoint(s AttachSpec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failAtt != nil {
		return f.failAtt
	}
	f.eps[s.ID] = s
	f.attaches[s.ID]++
	return nil
}

func (f *fakeDatapath) DetachEndpoint(id uint16, _ int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.eps, id)
	return nil
}

func (f *fakeDatapath) Admit(_ context.Context, ep Endpoint) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failCache != nil {
		return f.failCache
	}
	if _, ok := f.eps[ep.ID]; !ok {
		return fmt.Errorf("admit of endpoint %d before its datapath was attached", ep.ID)
	}
	for _, a := range ep.IPs() {
		f.ipcache[netip.PrefixFrom(a, a.BitLen())] = ep.Identity
	}
	return nil
}

func (f *fakeDatapath) Readopt(ep Endpoint) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range ep.IPs() {
		f.ipcache[netip.PrefixFrom(a, a.BitLen())] = ep.Identity
	}
}

func (f *fakeDatapath) Gone(ep Endpoint) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range ep.IPs() {
		delete(f.ipcache, netip.PrefixFrom(a, a.BitLen()))
	}
}

func (f *fakeDatapath) counts() (eps, cache int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.eps), len(f.ipcache)
}

// fakeIdentities hands out cluster identities and counts references.
type fakeIdentities struct {
	mu   sync.Mutex
	ids  map[string]identity.ID
	refs map[string]int
	fail error
}

func newFakeIdentities() *fakeIdentities {
	return &fakeIdentities{ids: map[string]identity.ID{}, refs: map[string]int{}}
}

func (f *fakeIdentities) Allocate(_ context.Context, ls identity.Labels) (identity.ID, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return 0, f.fail
	}
	k := ls.String()
	id, ok := f.ids[k]
	if !ok {
		id = identity.Make(1, identity.ClusterLocalMin+uint32(len(f.ids)))
		f.ids[k] = id
	}
	f.refs[k]++
	return id, nil
}

func (f *fakeIdentities) Release(_ context.Context, ls identity.Labels) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := ls.String()
	if f.refs[k] <= 0 {
		return fmt.Errorf("release of %q without a reference", k)
	}
	f.refs[k]--
	return nil
}

func (f *fakeIdentities) total() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, r := range f.refs {
		n += r
	}
	return n
}
