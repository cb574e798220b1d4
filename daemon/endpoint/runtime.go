package endpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/rackwire/rackwire/daemon/identity"
)

// What a container runtime that plugs its sandboxes itself (Docker) needs
// beyond Add and Delete: address reservations for its IPAM, endpoints
// created before their labels are known, and the labels set later.
//
// Docker's IPAM hands out an address before the network driver creates
// the endpoint, and takes it back after the endpoint is deleted; Reserve
// and Unreserve hold the address in between, so that no other Add takes
// it. Reservations live in memory only, with an expiry: an agent restart
// drops them, and the runtime's next call then asks for the address
// explicitly (Request.IP), which Add grants if it is still free.

// ErrNotPending: SetLabels on an endpoint that already has its labels.
var ErrNotPending = errors.New("endpoint is not waiting for labels")

// dockerIDRE is a libnetwork id: 64 hex digits.
var dockerIDRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// checkDetached checks a request for a detached endpoint side.
func checkDetached(req Request) error {
	if req.MAC != nil && (len(req.MAC) != 6 || req.MAC[0]&1 == 1) {
		return fmt.Errorf("%w: MAC %s is not a unicast Ethernet address", ErrBadName, req.MAC)
	}
	return checkDocker(req.Docker)
}

func checkDocker(d *DockerAttachment) error {
	if d == nil {
		return nil
	}
	if !dockerIDRE.MatchString(d.NetworkID) || !dockerIDRE.MatchString(d.EndpointID) {
		return fmt.Errorf("%w: docker network id %q or endpoint id %q is not 64 hex digits", ErrBadName, truncPath(d.NetworkID), truncPath(d.EndpointID))
	}
	if len(d.SandboxKey) > MaxNetnsPath {
		return fmt.Errorf("%w: sandbox key of %d bytes", ErrBadName, len(d.SandboxKey))
	}
	return nil
}

// DetachedPeerName names the endpoint side of a detached endpoint with
// id: the host-side name with a "c" (container) appended, or "rwc" and
// the id when that does not fit in 15 characters.
func (m *Manager) DetachedPeerName(id uint16) string {
	if n := m.HostIfName(id) + "c"; len(n) <= 15 {
		return n
	}
	return "rwc" + strconv.Itoa(int(id))
}

// findDocker returns the endpoint Docker created as endpointID; m.mu held.
func (m *Manager) findDocker(endpointID string) *Endpoint {
	for _, ep := range m.byID {
		if ep.Docker != nil && ep.Docker.EndpointID == endpointID {
			return ep
		}
	}
	return nil
}

// FindDocker returns the endpoint Docker created as endpointID.
func (m *Manager) FindDocker(endpointID string) (Endpoint, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p := m.findDocker(endpointID); p != nil {
		return p.clone(), true
	}
	return Endpoint{}, false
}

// usedLocked returns the addresses in use: endpoints' and unexpired
// reservations; m.mu held.
func (m *Manager) usedLocked() map[netip.Addr]string {
	used := map[netip.Addr]string{}
	now := time.Now()
	for a, exp := range m.reserved {
		if now.After(exp) {
			delete(m.reserved, a)
			continue
		}
		used[a] = "(reserved by an IPAM request)"
	}
	for _, e := range m.byID {
		for _, a := range e.IPs() {
			used[a] = e.Name
		}
	}
	return used
}

// Reserve holds an address of the family (want, if valid, or the lowest
// free one) for ttl, for an endpoint that is added later with
// Request.Reserved. It fails as Add would: no CIDR of the family, want
// outside the CIDRs or in use, CIDR exhausted.
func (m *Manager) Reserve(v4 bool, want netip.Addr, ttl time.Duration) (netip.Addr, error) {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	used := m.usedLocked()
	var a netip.Addr
	var err error
	if want.IsValid() {
		a = want.Unmap()
		if a.Is4() != v4 {
			return netip.Addr{}, fmt.Errorf("%w: %s is not of the pool's family", ErrIPOutsideCIDR, a)
		}
		err = checkRequested(m.opts.CIDRs, a, used)
	} else {
		if len(familyPrefixes(m.opts.CIDRs, v4)) == 0 {
			f := "IPv4"
			if !v4 {
				f = "IPv6"
			}
			return netip.Addr{}, fmt.Errorf("%w: [ipam] cidrs has no %s CIDR; add one", ErrCIDRExhausted, f)
		}
		a, err = allocate(m.opts.CIDRs, v4, used)
	}
	if err != nil {
		return netip.Addr{}, err
	}
	m.reserved[a] = time.Now().Add(ttl)
	return a, nil
}

// Unreserve drops the reservation of a, if any. It never touches an
// endpoint's address.
func (m *Manager) Unreserve(a netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.reserved, a.Unmap())
}

// Prefixes returns the CIDRs addresses come from.
func (m *Manager) Prefixes() []netip.Prefix { return append([]netip.Prefix(nil), m.opts.CIDRs...) }

// update changes a stored endpoint with f and writes its state file; f
// returns false to change nothing. opMu held.
func (m *Manager) update(nameOrID string, f func(ep *Endpoint) (bool, error)) (Endpoint, error) {
	m.mu.Lock()
	p := m.find(nameOrID)
	if p == nil {
		m.mu.Unlock()
		return Endpoint{}, fmt.Errorf("%w: %q; see rackwire endpoint list", ErrNotFound, nameOrID)
	}
	ep := p.clone()
	m.mu.Unlock()
	changed, err := f(&ep)
	if err != nil || !changed {
		return ep, err
	}
	if err := writeState(m.dir, ep); err != nil {
		return ep, err
	}
	m.mu.Lock()
	if p := m.byID[ep.ID]; p != nil {
		*p = ep.clone()
	}
	m.mu.Unlock()
	return ep, nil
}

// SetSandbox records the sandbox (network namespace path) a runtime moved
// a detached endpoint into.
func (m *Manager) SetSandbox(nameOrID, sandboxKey string) (Endpoint, error) {
	if len(sandboxKey) > MaxNetnsPath {
		return Endpoint{}, fmt.Errorf("%w: sandbox key of %d bytes", ErrBadName, len(sandboxKey))
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	return m.update(nameOrID, func(ep *Endpoint) (bool, error) {
		if ep.Netns == sandboxKey && (ep.Docker == nil || ep.Docker.SandboxKey == sandboxKey) {
			return false, nil
		}
		ep.Netns = sandboxKey
		if ep.Docker != nil {
			ep.Docker.SandboxKey = sandboxKey
		}
		return true, nil
	})
}

// SetPending records why a pending endpoint still has no labels (shown in
// endpoint list); the endpoint stays closed.
func (m *Manager) SetPending(nameOrID, reason string) (Endpoint, error) {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	return m.update(nameOrID, func(ep *Endpoint) (bool, error) {
		if ep.State != StatePending {
			return false, fmt.Errorf("%w: %s is %s", ErrNotPending, ep.Name, ep.State)
		}
		if ep.Pending == reason {
			return false, nil
		}
		ep.Pending = reason
		return true, nil
	})
}

// SetLabels gives a pending endpoint its labels, container id and network
// name: it takes the identity, writes it to the datapath (the map still
// closed), lets the Enforcer admit the endpoint (its policy goes into the
// map), and marks it ready. On failure the endpoint stays pending and
// closed, with the error as its reason. For an endpoint that is ready
// with the same labels it does nothing.
func (m *Manager) SetLabels(ctx context.Context, nameOrID, containerID, network string, labels identity.Labels) (ep Endpoint, err error) {
	if err := CheckAttachment("", containerID, network); err != nil {
		return Endpoint{}, err
	}
	labels, err = checkLabels(labels)
	if err != nil {
		return Endpoint{}, err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	p := m.find(nameOrID)
	if p != nil {
		ep = p.clone()
	}
	m.mu.Unlock()
	if p == nil {
		return Endpoint{}, fmt.Errorf("%w: %q; see rackwire endpoint list", ErrNotFound, nameOrID)
	}
	if ep.State != StatePending {
		if ep.Labels.Equal(labels) && ep.ContainerID == containerID {
			return ep, nil
		}
		return ep, fmt.Errorf("%w: %s is %s", ErrNotPending, ep.Name, ep.State)
	}
	idLabels := labels.Filter(m.opts.IdentityLabels)
	if len(idLabels) == 0 {
		return ep, fmt.Errorf("%w: no identity-relevant label among %q (identity_labels %q); add one, e.g. --label app=NAME",
			ErrBadLabels, labels.CLI(), m.opts.IdentityLabels)
	}
	next := ep.clone()
	next.Labels, next.IdentityLabels, next.ContainerID, next.Network = labels, idLabels, containerID, network
	next.Identity, err = m.ids.Allocate(ctx, idLabels)
	if err != nil {
		return ep, fmt.Errorf("allocate identity for %s: %w", idLabels.CLI(), err)
	}
	next.State, next.Pending = StateReady, ""
	u := undo{func() error { return m.release(idLabels) }}
	u.push(func() error { return m.dp.AttachEndpoint(m.spec(ep)) })
	defer func() {
		if err != nil {
			if rerr := u.run(); rerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back: %w", rerr))
			}
		}
	}()
	// The new identity goes into rw_endpoints while the map is still
	// closed; Admit then writes the policy.
	if err = m.dp.AttachEndpoint(m.spec(next)); err != nil {
		return ep, fmt.Errorf("attach datapath to %s: %w", ep.HostIfName, err)
	}
	u.push(func() error { m.opts.Enforcer.Gone(next.clone()); return nil })
	if err = m.opts.Enforcer.Admit(ctx, next.clone()); err != nil {
		return ep, fmt.Errorf("enforce policy of %s: %w", ep.Name, err)
	}
	if err = writeState(m.dir, next); err != nil {
		return ep, err
	}
	m.store(next, true)
	m.log.Info("endpoint got its labels; policy in force", "endpoint_id", next.ID, "endpoint", next.Name,
		"identity", next.Identity, "labels", labels.CLI(), "container_id", containerID)
	return next.clone(), nil
}

// EnsureSandboxNeighbours sets, in the sandbox a runtime moved a detached
// endpoint side into (Endpoint.Netns), the permanent neighbour entries
// gateway -> host-side MAC on that side, found by its MAC: what plumb does
// for the endpoints it configures itself. It reports false, without error,
// while the side is not there or not up yet (the runtime moves and
// configures it after Join; a move would flush the entries).
func (m *Manager) EnsureSandboxNeighbours(nameOrID string) (bool, error) {
	ep, err := m.Get(nameOrID)
	if err != nil {
		return false, err
	}
	if ep.Netns == "" || ep.State == StateLost {
		return false, nil
	}
	peerMAC, err := net.ParseMAC(ep.MAC)
	if err != nil {
		return false, fmt.Errorf("endpoint MAC %q: %w", ep.MAC, err)
	}
	hostMAC, err := net.ParseMAC(ep.HostMAC)
	if err != nil {
		return false, fmt.Errorf("host MAC %q: %w", ep.HostMAC, err)
	}
	ns, err := openNetns(ep.Netns)
	if err != nil {
		return false, err
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false, fmt.Errorf("open netlink in sandbox %s: %w", ep.Netns, err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		return false, fmt.Errorf("list links of sandbox %s: %w", ep.Netns, err)
	}
	var peer netlink.Link
	for _, l := range links {
		if bytes.Equal(l.Attrs().HardwareAddr, peerMAC) {
			peer = l
		}
	}
	if peer == nil || peer.Attrs().Flags&net.FlagUp == 0 {
		return false, nil
	}
	for _, a := range ep.IPs() {
		gw := GatewayIPv4
		if a.Is6() {
			gw = GatewayIPv6
		}
		if err := nl.NeighSet(&netlink.Neigh{LinkIndex: peer.Attrs().Index, Family: nlFamily(gw), State: netlink.NUD_PERMANENT,
			IP: gw.AsSlice(), HardwareAddr: hostMAC}); err != nil {
			return false, fmt.Errorf("add gateway neighbour %s in sandbox %s: %w", gw, ep.Netns, err)
		}
	}
	return true, nil
}
