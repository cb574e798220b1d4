package endpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/vishvananda/netns"

	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/identity"
)

// DefaultLinkPrefix names host-side veths: "rw" + the 5-digit endpoint id.
const DefaultLinkPrefix = "rw"

// Options configure a Manager.
type Options struct {
	// StateDir is [agent] state_dir; state files go to StateDir/endpoints.
	StateDir string
	// CIDRs are the [ipam] cidrs addresses are allocated from.
	CIDRs []netip.Prefix
	// IdentityLabels is [datapath] identity_labels.
	IdentityLabels []string
	// Audit is [datapath] policy_audit_mode, passed to the datapath.
	Audit bool
	// HostNetns is the namespace endpoints are plugged into; "" is the
	// agent's own. Simulated hosts and tests set it.
	HostNetns string
	// LinkPrefix names host-side veths (prefix + 5-digit id); at most 10
	// characters. Default DefaultLinkPrefix.
	LinkPrefix string
	// MTU of both veth ends; 0 is the kernel default.
	MTU int
	// Timeout bounds each identity call of Restore and of a rollback.
	// Default 10s.
	Timeout time.Duration
	// Enforcer puts policy and addresses in force; nil leaves new
	// endpoints closed (see Enforcer).
	Enforcer Enforcer
}

// OptionsFromConfig takes the Manager options from the config.
func OptionsFromConfig(cfg *config.Config) Options {
	return Options{
		StateDir:       cfg.Agent.StateDir,
		CIDRs:          cfg.Prefixes(),
		IdentityLabels: cfg.Datapath.IdentityLabels,
		Audit:          cfg.Datapath.PolicyAuditMode,
	}
}

// Manager is the one owner of this host's endpoint table.
type Manager struct {
	opts Options
	dir  string
	dp   Datapath
	ids  Identities
	log  *slog.Logger
	host *host

	// opMu serialises the operations that change endpoints (Add, Delete,
	// Restore): each runs whole, so two Adds never race for one id or
	// address and a half-created endpoint is never in the table.
	opMu sync.Mutex

	// mu guards byID, held (identity references taken by this process),
	// nextID and reserved. It is held only briefly, so List and Get never wait for
	// netlink or the store.
	mu     sync.Mutex
	byID   map[uint16]*Endpoint
	held   map[uint16]bool
	nextID uint16
	// reserved are addresses an IPAM (Docker's) handed out for an
	// endpoint not plugged yet, with their expiry; see Reserve.
	reserved map[netip.Addr]time.Time
}

// New opens the host namespace and reads the state directory (creating it if
// needed). Corrupt state files are moved aside and logged. It changes nothing
// in the kernel: call Restore before serving requests.
func New(opts Options, dp Datapath, ids Identities, log *slog.Logger) (*Manager, error) {
	if opts.LinkPrefix == "" {
		opts.LinkPrefix = DefaultLinkPrefix
	}
	if len(opts.LinkPrefix) > 10 {
		return nil, fmt.Errorf("link prefix %q is longer than 10 characters; interface names hold 15", opts.LinkPrefix)
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.Enforcer == nil {
		opts.Enforcer = noEnforcer{}
	}
	if opts.StateDir == "" {
		return nil, errors.New("no state dir; set [agent] state_dir")
	}
	dir := filepath.Join(opts.StateDir, "endpoints")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	h, err := openHost(opts.HostNetns)
	if err != nil {
		return nil, err
	}
	m := &Manager{opts: opts, dir: dir, dp: dp, ids: ids, log: log.With("subsys", "endpoint"), host: h,
		byID: map[uint16]*Endpoint{}, held: map[uint16]bool{}, reserved: map[netip.Addr]time.Time{}}
	eps, _, err := loadStates(dir, m.log)
	if err != nil {
		h.close()
		return nil, err
	}
	for i := range eps {
		ep := eps[i]
		m.byID[ep.ID] = &ep
		m.nextID = max(m.nextID, ep.ID)
	}
	return m, nil
}

// Close releases the manager's namespace handles. Endpoints stay.
func (m *Manager) Close() error {
	m.host.close()
	return nil
}

// HostIfName returns the host-side veth name of endpoint id.
func (m *Manager) HostIfName(id uint16) string { return fmt.Sprintf("%s%05d", m.opts.LinkPrefix, id) }

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// CheckName checks an endpoint name: 1..63 letters, digits, '.', '_' or
// '-', starting with a letter or digit, not all digits. The API checks it
// before anything else; Add checks it again.
func CheckName(n string) error { return checkName(n) }

// truncPath shortens a caller's path for the log.
func truncPath(p string) string {
	if len(p) > 256 {
		return fmt.Sprintf("%s... (%d bytes)", p[:256], len(p))
	}
	return p
}

func checkName(n string) error {
	if len(n) > 63 {
		return fmt.Errorf("%w: %d bytes long; use 1..63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrBadName, len(n))
	}
	if !nameRE.MatchString(n) {
		return fmt.Errorf("%w: %q; use 1..63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrBadName, n)
	}
	if _, err := strconv.Atoi(n); err == nil {
		return fmt.Errorf("%w: %q is all digits, which reads as an endpoint id; add a letter", ErrBadName, n)
	}
	return nil
}

// ifNameRE is what the kernel takes as an interface name, less what would
// be awkward in a file name or a log: 1..15 of letters, digits, '.', '_', '-'.
var ifNameRE = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,14}$`)

// containerIDRE is what the CNI spec allows as a container id, bounded.
var containerIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$`)

// CheckAttachment checks the runtime's part of a request: the interface
// name in the namespace and, when a container id is given, the id and the
// network name.
func CheckAttachment(ifName, containerID, network string) error {
	if ifName != "" && (!ifNameRE.MatchString(ifName) || ifName == "." || ifName == "..") {
		return fmt.Errorf("%w: interface name %q; use 1..15 letters, digits, '.', '_' or '-'", ErrBadName, truncPath(ifName))
	}
	if containerID == "" {
		if network != "" {
			return fmt.Errorf("%w: a network without a container id", ErrBadName)
		}
		return nil
	}
	if !containerIDRE.MatchString(containerID) {
		return fmt.Errorf("%w: container id %q; use 1..256 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrBadName, truncPath(containerID))
	}
	if !containerIDRE.MatchString(network) {
		return fmt.Errorf("%w: network name %q; use 1..256 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrBadName, truncPath(network))
	}
	return nil
}

// FindAttachment returns the endpoint a container runtime plugged for
// (network, containerID, ifName); ifName "" is PeerIfName.
func (m *Manager) FindAttachment(network, containerID, ifName string) (Endpoint, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p := m.findAttachment(network, containerID, ifName); p != nil {
		return p.clone(), true
	}
	return Endpoint{}, false
}

// findAttachment is FindAttachment with m.mu held.
func (m *Manager) findAttachment(network, containerID, ifName string) *Endpoint {
	if ifName == "" {
		ifName = PeerIfName
	}
	for _, ep := range m.byID {
		if ep.ContainerID != "" && ep.ContainerID == containerID && ep.Network == network && ep.PeerName() == ifName {
			return ep
		}
	}
	return nil
}

// List returns every endpoint, by id.
func (m *Manager) List() []Endpoint {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Endpoint, 0, len(m.byID))
	for _, ep := range m.byID {
		out = append(out, ep.clone())
	}
	slices.SortFunc(out, func(a, b Endpoint) int { return int(a.ID) - int(b.ID) })
	return out
}

// Get returns the endpoint named nameOrID, or with that id if it is all
// digits.
func (m *Manager) Get(nameOrID string) (Endpoint, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ep := m.find(nameOrID)
	if ep == nil {
		return Endpoint{}, fmt.Errorf("%w: %q; see rackwire endpoint list", ErrNotFound, nameOrID)
	}
	return ep.clone(), nil
}

// find looks up by id or name; m.mu held.
func (m *Manager) find(nameOrID string) *Endpoint {
	if n, err := strconv.ParseUint(nameOrID, 10, 16); err == nil {
		return m.byID[uint16(n)]
	}
	for _, ep := range m.byID {
		if ep.Name == nameOrID {
			return ep
		}
	}
	return nil
}

// undo is a stack of rollback steps.
type undo []func() error

func (u *undo) push(f func() error) { *u = append(*u, f) }

func (u undo) run() error {
	var errs []error
	for i := len(u) - 1; i >= 0; i-- {
		if err := u[i](); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Add creates an endpoint: it validates the request, allocates an id and
// addresses, resolves the identity, plugs a veth into the namespace, writes
// the state file and programs the datapath. On any failure it undoes what it
// did and returns the first error (with rollback errors joined, if any).
//
// A container runtime's request (ContainerID set) is idempotent: if the
// attachment (Network, ContainerID, IfName) exists in the same namespace
// with the same labels, Add returns it unchanged (a runtime that retries
// an ADD whose answer it lost gets the same result); in another namespace
// or with other labels it is ErrExists.
func (m *Manager) Add(ctx context.Context, req Request) (ep Endpoint, err error) {
	if err := checkName(req.Name); err != nil {
		return Endpoint{}, err
	}
	if err := CheckAttachment(req.IfName, req.ContainerID, req.Network); err != nil {
		return Endpoint{}, err
	}
	if req.IfName == PeerIfName {
		req.IfName = ""
	}
	labels, err := checkLabels(req.Labels)
	if err != nil {
		return Endpoint{}, fmt.Errorf("endpoint %s: %w", req.Name, err)
	}
	want4, want6, err := requested(req)
	if err != nil {
		return Endpoint{}, err
	}
	var epNs netns.NsHandle = -1
	if req.Detach {
		if err := checkDetached(req); err != nil {
			return Endpoint{}, err
		}
	} else {
		epNs, err = openNetns(req.NetnsPath)
		if err != nil {
			if why := NetnsReason(err); why != "" {
				// The caller gets NetnsMsg only; the reason is for the operator.
				m.log.Info("endpoint add: netns refused", "endpoint", req.Name, "netns", truncPath(req.NetnsPath), "reason", why)
			}
			return Endpoint{}, err
		}
		defer epNs.Close()
		if epNs.Equal(m.host.ns) {
			return Endpoint{}, fmt.Errorf("%w: %s is the host's own namespace; an endpoint needs a namespace of its own", ErrNoNetns, req.NetnsPath)
		}
	}

	m.opMu.Lock()
	defer m.opMu.Unlock()

	m.mu.Lock()
	if req.Docker != nil {
		if p := m.findDocker(req.Docker.EndpointID); p != nil {
			old := p.clone()
			m.mu.Unlock()
			return old, nil
		}
	}
	if req.ContainerID != "" {
		if p := m.findAttachment(req.Network, req.ContainerID, req.IfName); p != nil {
			old := p.clone()
			m.mu.Unlock()
			if old.Netns == req.NetnsPath && old.State == StateReady && old.Labels.Equal(labels) {
				return old, nil
			}
			return Endpoint{}, fmt.Errorf("%w: container %s is attached to network %s as endpoint %s (netns %s, labels %s); delete that attachment first (CNI DEL)",
				ErrExists, req.ContainerID, req.Network, old.Name, old.Netns, old.Labels.CLI())
		}
	}
	used := m.usedLocked()
	if req.Reserved {
		// The caller's own reservations are free for it.
		for _, a := range []netip.Addr{want4, want6} {
			if _, ok := m.reserved[a]; ok {
				delete(used, a)
			}
		}
	}
	var nameTaken *Endpoint
	netnsTaken := ""
	for _, e := range m.byID {
		if e.Name == req.Name {
			nameTaken = e
		}
		if !req.Detach && e.Netns == req.NetnsPath && e.State != StateLost {
			netnsTaken = e.Name
		}
	}
	m.mu.Unlock()
	if nameTaken != nil {
		return Endpoint{}, fmt.Errorf("%w: %q is endpoint %d; pick another name or delete it first", ErrExists, req.Name, nameTaken.ID)
	}
	if netnsTaken != "" {
		return Endpoint{}, fmt.Errorf("%w: netns %s already holds endpoint %s; give each endpoint a namespace of its own", ErrExists, req.NetnsPath, netnsTaken)
	}

	idLabels := labels.Filter(m.opts.IdentityLabels)
	if len(idLabels) == 0 && req.Pending == "" {
		return Endpoint{}, fmt.Errorf("endpoint %s: %w: no identity-relevant label among %q (identity_labels %q); add one, e.g. app=%s",
			req.Name, ErrBadLabels, labels.CLI(), m.opts.IdentityLabels, req.Name)
	}
	ep = Endpoint{Name: req.Name, Netns: req.NetnsPath, State: StateCreating, Labels: labels,
		IdentityLabels: idLabels, Created: time.Now().UTC().Truncate(time.Second),
		IfName: req.IfName, ContainerID: req.ContainerID, Network: req.Network}
	if req.Pending != "" {
		ep.Labels, ep.IdentityLabels, ep.Pending = nil, nil, req.Pending
	}
	if req.Docker != nil {
		d := *req.Docker
		ep.Docker = &d
	}
	if len(m.opts.CIDRs) == 0 {
		return Endpoint{}, fmt.Errorf("%w: no [ipam] cidrs configured; add this host's workload CIDR", ErrCIDRExhausted)
	}
	if ep.IPv4, err = m.pickAddr(true, want4, used); err != nil {
		return Endpoint{}, err
	}
	if ep.IPv6, err = m.pickAddr(false, want6, used); err != nil {
		return Endpoint{}, err
	}
	prevNext := m.nextID
	if ep.ID, err = m.allocID(); err != nil {
		return Endpoint{}, err
	}
	ep.HostIfName = m.HostIfName(ep.ID)
	log := m.log.With("endpoint_id", ep.ID, "endpoint", ep.Name)

	// A failed Add hands its id out again next time.
	u := undo{func() error { m.mu.Lock(); m.nextID = prevNext; m.mu.Unlock(); return nil }}
	defer func() {
		if err != nil {
			if rerr := u.run(); rerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back endpoint %s: %w", ep.Name, rerr))
			}
			ep = Endpoint{}
		}
	}()
	// The "creating" state file comes first: if the agent dies mid-Add,
	// Restore finds it and removes what this Add left.
	if err = writeState(m.dir, ep); err != nil {
		return ep, err
	}
	u.push(func() error { return removeState(m.dir, ep.ID) })

	if err = ctx.Err(); err != nil {
		return ep, err
	}
	if ep.Pending != "" {
		ep.Identity = identity.Init
	} else {
		ep.Identity, err = m.ids.Allocate(ctx, ep.IdentityLabels)
		if err != nil {
			return ep, fmt.Errorf("allocate identity for %s: %w", ep.IdentityLabels.CLI(), err)
		}
		u.push(func() error { return m.release(ep.IdentityLabels) })
	}

	if err = m.host.ensureForwarding(ep.IPv4.IsValid(), ep.IPv6.IsValid()); err != nil {
		return ep, err
	}
	if err = ctx.Err(); err != nil {
		return ep, err
	}
	var p plumbing
	if req.Detach {
		p, err = m.host.plumbDetached(ep.HostIfName, m.DetachedPeerName(ep.ID), m.opts.MTU, req.MAC)
	} else {
		p, err = m.host.plumb(epNs, ep.HostIfName, ep.PeerName(), m.opts.MTU, ep.IPs())
	}
	if err != nil {
		return ep, err
	}
	u.push(func() error { return m.host.unplumb(ep.HostIfName) })
	ep.HostIfIndex, ep.HostMAC, ep.MAC = p.hostIndex, p.hostMAC.String(), p.peerMAC.String()

	if err = ctx.Err(); err != nil {
		return ep, err
	}
	// The undo steps go first: a datapath call that fails half-way
	// (policy map created, program not attached) is undone too, and
	// Detach tolerates what is absent.
	u.push(func() error { return m.dp.DetachEndpoint(ep.ID, ep.HostIfIndex) })
	if err = m.dp.AttachEndpoint(m.spec(ep)); err != nil {
		return ep, fmt.Errorf("attach datapath to %s: %w", ep.HostIfName, err)
	}
	// The programs are attached with a closed map and the host side is
	// still down: Admit writes the policy before anything can pass.
	ep.State = StateReady
	if ep.Pending != "" {
		// Fail closed: no Admit, so the map stays closed until SetLabels.
		ep.State = StatePending
	} else {
		u.push(func() error { m.opts.Enforcer.Gone(ep.clone()); return nil })
		if err = m.opts.Enforcer.Admit(ctx, ep.clone()); err != nil {
			return ep, fmt.Errorf("enforce policy of %s: %w", ep.Name, err)
		}
	}
	if err = m.host.activate(ep.HostIfIndex, p.peerMAC, ep.IPs()); err != nil {
		return ep, err
	}

	if err = writeState(m.dir, ep); err != nil {
		return ep, err
	}
	m.mu.Lock()
	stored := ep.clone()
	m.byID[ep.ID] = &stored
	m.held[ep.ID] = ep.Pending == ""
	if req.Reserved {
		for _, a := range ep.IPs() {
			delete(m.reserved, a)
		}
	}
	m.mu.Unlock()
	if ep.Pending != "" {
		log.Warn("endpoint added without labels: closed in both directions until its labels are known", "reason", ep.Pending,
			"ifindex", ep.HostIfIndex, "ipv4", ep.IPv4, "ipv6", ep.IPv6)
	} else {
		log.Info("endpoint added", "identity", ep.Identity, "ifindex", ep.HostIfIndex, "ipv4", ep.IPv4, "ipv6", ep.IPv6)
	}
	return ep.clone(), nil
}

// requested sorts the requested addresses by family.
func requested(req Request) (v4, v6 netip.Addr, err error) {
	for _, a := range []netip.Addr{req.IP, req.IPv6} {
		if !a.IsValid() {
			continue
		}
		a = a.Unmap()
		if a.Zone() != "" {
			return v4, v6, fmt.Errorf("%w: %s has a zone; give a plain address", ErrIPOutsideCIDR, a)
		}
		if a.Is4() {
			if v4.IsValid() {
				return v4, v6, fmt.Errorf("%w: two IPv4 addresses requested (%s, %s); give at most one per family", ErrIPOutsideCIDR, v4, a)
			}
			v4 = a
		} else {
			if v6.IsValid() {
				return v4, v6, fmt.Errorf("%w: two IPv6 addresses requested (%s, %s); give at most one per family", ErrIPOutsideCIDR, v6, a)
			}
			v6 = a
		}
	}
	if req.IPv6.IsValid() && req.IPv6.Unmap().Is4() {
		return v4, v6, fmt.Errorf("%w: %s given as the IPv6 address is IPv4", ErrIPOutsideCIDR, req.IPv6)
	}
	return v4, v6, nil
}

// pickAddr checks a requested address or allocates one of the family, if
// the family has a CIDR.
func (m *Manager) pickAddr(v4 bool, want netip.Addr, used map[netip.Addr]string) (netip.Addr, error) {
	if want.IsValid() {
		return want, checkRequested(m.opts.CIDRs, want, used)
	}
	if len(familyPrefixes(m.opts.CIDRs, v4)) == 0 {
		return netip.Addr{}, nil
	}
	return allocate(m.opts.CIDRs, v4, used)
}

// allocID returns the next free endpoint id after the last one handed out,
// wrapping at 65535, so a freed id is reused as late as possible. An id
// whose veth name is taken in the host namespace (a leftover of a lost state
// file) is skipped. opMu held.
func (m *Manager) allocID() (uint16, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := m.nextID
	for range 65535 {
		id++
		if id == 0 {
			id = 1
		}
		if _, ok := m.byID[id]; ok {
			continue
		}
		if l, err := m.host.link(m.HostIfName(id)); err != nil || l != nil {
			continue
		}
		m.nextID = id
		return id, nil
	}
	return 0, fmt.Errorf("%w: all 65535 ids are in use; delete unused endpoints", ErrIDsExhausted)
}

func (m *Manager) spec(ep Endpoint) AttachSpec {
	hm, _ := net.ParseMAC(ep.HostMAC)
	pm, _ := net.ParseMAC(ep.MAC)
	return AttachSpec{ID: ep.ID, IfIndex: ep.HostIfIndex, IfName: ep.HostIfName, HostMAC: hm, PeerMAC: pm,
		IPs: ep.IPs(), Identity: ep.Identity, Audit: m.opts.Audit}
}

func (m *Manager) release(ls identity.Labels) error {
	ctx, cancel := context.WithTimeout(context.Background(), m.opts.Timeout)
	defer cancel()
	if err := m.ids.Release(ctx, ls); err != nil {
		return fmt.Errorf("release identity of %s: %w", ls.CLI(), err)
	}
	return nil
}

// Delete removes an endpoint: its ipcache entries, its datapath attachment,
// its veth (with addresses, routes and neighbours), its identity reference
// and its state file. Every step tolerates what is already gone, so a failed
// Delete can be repeated; the endpoint stays listed until all kernel steps
// succeeded.
func (m *Manager) Delete(ctx context.Context, nameOrID string) error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	p := m.find(nameOrID)
	var ep Endpoint
	if p != nil {
		ep = p.clone()
	}
	held := m.held[ep.ID]
	m.mu.Unlock()
	if p == nil {
		return fmt.Errorf("%w: %q; see rackwire endpoint list", ErrNotFound, nameOrID)
	}
	if err := m.teardown(ep); err != nil {
		return fmt.Errorf("delete endpoint %s: %w; run the delete again", ep.Name, err)
	}
	if err := removeState(m.dir, ep.ID); err != nil {
		return fmt.Errorf("delete endpoint %s: %w", ep.Name, err)
	}
	m.mu.Lock()
	delete(m.byID, ep.ID)
	delete(m.held, ep.ID)
	m.mu.Unlock()
	m.opts.Enforcer.Gone(ep)
	if held {
		if err := m.release(ep.IdentityLabels); err != nil {
			// The endpoint is gone; the store's session expiry collects
			// the reference, so this is not the caller's failure.
			m.log.Warn("endpoint deleted but its identity reference was not released", "endpoint_id", ep.ID, "err", err)
		}
	}
	m.log.Info("endpoint deleted", "endpoint_id", ep.ID, "endpoint", ep.Name)
	return nil
}

// teardown removes an endpoint's datapath state and veth; each step
// tolerates absence.
func (m *Manager) teardown(ep Endpoint) error {
	var errs []error
	ifindex := ep.HostIfIndex
	if ep.State == StateLost {
		ifindex = 0 // the veth is gone; the number may be another link's now
	}
	if err := m.dp.DetachEndpoint(ep.ID, ifindex); err != nil {
		errs = append(errs, fmt.Errorf("detach datapath: %w", err))
	}
	if err := m.host.unplumb(ep.HostIfName); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// RestoreReport says what Restore did, by endpoint id.
type RestoreReport struct {
	Restored []uint16 // re-adopted, veth and maps kept
	Lost     []uint16 // veth vanished; marked lost, id and addresses kept
	Cleaned  []uint16 // a half-done Add of a previous run, removed
	Failed   []uint16 // re-adoption failed; see the error
}

// Restore re-adopts the endpoints read by New, at agent start. For each one
// whose host-side veth exists it re-takes the identity reference (keeping
// the stored identity if the store does not answer: a store outage never
// stops forwarding), ensures the host routes and neighbours, calls the
// datapath's idempotent AttachEndpoint, which re-adopts pinned maps and
// links instead of re-creating them, and tells the Enforcer (Readopt),
// which must not widen the map. Nothing is deleted or re-created for a
// working endpoint. Endpoints whose veth vanished are
// marked lost. Restore returns an error only for endpoints that could not be
// re-adopted; the others are restored regardless.
func (m *Manager) Restore(ctx context.Context) (RestoreReport, error) {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	var rep RestoreReport
	var errs []error
	for _, ep := range m.List() {
		log := m.log.With("endpoint_id", ep.ID, "endpoint", ep.Name)
		if ep.State == StateCreating {
			err := errors.Join(m.teardown(ep), removeState(m.dir, ep.ID))
			if err != nil {
				rep.Failed = append(rep.Failed, ep.ID)
				errs = append(errs, fmt.Errorf("clean up half-created endpoint %s: %w", ep.Name, err))
				continue
			}
			m.mu.Lock()
			delete(m.byID, ep.ID)
			m.mu.Unlock()
			log.Warn("removed an endpoint whose creation the previous run did not finish")
			rep.Cleaned = append(rep.Cleaned, ep.ID)
			continue
		}
		if err := m.readopt(ctx, &ep, log); err != nil {
			rep.Failed = append(rep.Failed, ep.ID)
			errs = append(errs, fmt.Errorf("restore endpoint %s: %w", ep.Name, err))
			continue
		}
		if ep.State == StateLost {
			rep.Lost = append(rep.Lost, ep.ID)
		} else {
			rep.Restored = append(rep.Restored, ep.ID)
		}
	}
	return rep, errors.Join(errs...)
}

// readopt restores one endpoint and stores the result; opMu held.
func (m *Manager) readopt(ctx context.Context, ep *Endpoint, log *slog.Logger) error {
	l, err := m.host.link(ep.HostIfName)
	if err != nil {
		return err
	}
	if l == nil {
		if ep.State != StateLost {
			ep.State = StateLost
			if err := writeState(m.dir, *ep); err != nil {
				return err
			}
			log.Warn("endpoint's veth is gone (was its namespace deleted?); marked lost, delete it with rackwire endpoint delete",
				"ifname", ep.HostIfName)
		}
		m.store(*ep, false)
		return nil
	}
	changed := ep.State != StateReady && ep.State != StatePending
	if ep.State != StatePending {
		ep.State = StateReady
	}
	if idx := l.Attrs().Index; idx != ep.HostIfIndex {
		log.Warn("veth has a new ifindex", "ifname", ep.HostIfName, "ifindex", idx, "old_ifindex", ep.HostIfIndex)
		ep.HostIfIndex, changed = idx, true
	}
	if !sameMAC(ep.HostMAC, l.Attrs().HardwareAddr) {
		ep.HostMAC, changed = l.Attrs().HardwareAddr.String(), true
	}
	if err := m.host.ensureForwarding(ep.IPv4.IsValid(), ep.IPv6.IsValid()); err != nil {
		return err
	}
	pm, err := net.ParseMAC(ep.MAC)
	if err != nil {
		return fmt.Errorf("endpoint MAC %q in state: %w", ep.MAC, err)
	}
	if err := m.host.ensureHostSide(ep.HostIfIndex, pm, ep.IPs(), true); err != nil {
		return err
	}

	if ep.State == StatePending {
		// No labels, no identity reference, no Enforcer: the map stays
		// as closed as it was.
		if err := m.dp.AttachEndpoint(m.spec(*ep)); err != nil {
			return fmt.Errorf("re-attach datapath to %s: %w", ep.HostIfName, err)
		}
		if changed {
			if err := writeState(m.dir, *ep); err != nil {
				return err
			}
		}
		m.store(*ep, false)
		log.Warn("endpoint restored without labels: closed until its labels are known", "reason", ep.Pending, "ifindex", ep.HostIfIndex)
		return nil
	}
	m.mu.Lock()
	already := m.held[ep.ID]
	m.mu.Unlock()
	held := false
	var id identity.ID
	if already {
		// A second Restore: the reference is held since the first.
		id = ep.Identity
	} else {
		ictx, cancel := context.WithTimeout(ctx, m.opts.Timeout)
		id, err = m.ids.Allocate(ictx, ep.IdentityLabels)
		cancel()
	}
	switch {
	case already:
	case err != nil:
		log.Warn("identity store did not answer; keeping the stored identity", "identity", ep.Identity, "err", err)
	case id != ep.Identity:
		log.Warn("identity of the endpoint's labels changed in the store", "identity", id, "old_identity", ep.Identity)
		ep.Identity, changed, held = id, true, true
	default:
		held = true
	}
	if err := m.dp.AttachEndpoint(m.spec(*ep)); err != nil {
		m.unhold(ep, held)
		return fmt.Errorf("re-attach datapath to %s: %w", ep.HostIfName, err)
	}
	if changed {
		if err := writeState(m.dir, *ep); err != nil {
			m.unhold(ep, held)
			return err
		}
	}
	m.store(*ep, held)
	m.opts.Enforcer.Readopt(ep.clone())
	log.Info("endpoint restored", "identity", ep.Identity, "ifindex", ep.HostIfIndex)
	return nil
}

func (m *Manager) unhold(ep *Endpoint, held bool) {
	if held {
		if err := m.release(ep.IdentityLabels); err != nil {
			m.log.Warn("identity reference not released", "endpoint_id", ep.ID, "err", err)
		}
	}
}

func (m *Manager) store(ep Endpoint, held bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := ep.clone()
	m.byID[ep.ID] = &c
	if held {
		m.held[ep.ID] = true
	}
}
