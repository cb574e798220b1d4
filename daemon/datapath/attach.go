package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// EndpointSpec is one local endpoint as the datapath needs it.
type EndpointSpec struct {
	ID       uint16           // endpoint id; names rw_policy_NNNNN
	IfIndex  int              // host-side veth
	IPs      []netip.Addr     // the endpoint's addresses
	MAC      net.HardwareAddr // endpoint-side MAC (may be nil)
	NodeMAC  net.HardwareAddr // host-side MAC (may be nil)
	Identity uint32
	Audit    bool // per-endpoint audit mode
}

// tc filter handle and priority rackwire owns on a veth's clsact hooks.
const (
	tcHandle   = 0x7277 // "rw"
	tcPriority = 0x7277
)

func policyMapName(id uint16) string { return fmt.Sprintf("rw_policy_%05d", id) }

func (d *Datapath) linkPin(id uint16, dir Direction) string {
	name := "from"
	if dir == Ingress {
		name = "to"
	}
	return filepath.Join(d.opts.PinDir, "links", fmt.Sprintf("rw_ep_%05d_%s", id, name))
}

// AttachEndpoint makes the datapath enforce policy on an endpoint: it
// creates (or, after a restart, re-adopts) rw_policy_NNNNN, writes the
// endpoint's rw_endpoints entries and attaches both programs to its veth,
// atomically replacing programs a previous agent attached. A new policy map
// starts closed in both directions (only the meta entries): nothing passes
// until SetPolicy writes the endpoint's policy (OpenEntries for an endpoint
// no policy selects). A re-adopted map is left as it is.
func (d *Datapath) AttachEndpoint(ep EndpointSpec) error {
	if ep.IfIndex <= 0 {
		return fmt.Errorf("attach endpoint %d: ifindex %d: %w", ep.ID, ep.IfIndex, ErrInvalidEntry)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.addEndpointLocked(ep); err != nil {
		return fmt.Errorf("attach endpoint %d: %w", ep.ID, err)
	}
	for _, a := range []struct {
		dir  Direction
		prog *ebpf.Program
	}{{Egress, d.from}, {Ingress, d.to}} {
		var err error
		if d.mode == AttachTCX {
			err = d.attachTCX(ep, a.dir, a.prog)
			if err == nil {
				err = detachTC(ep.IfIndex, a.dir)
			}
		} else {
			err = attachTC(ep.IfIndex, a.dir, a.prog)
			if err == nil {
				err = d.detachTCX(ep.ID, a.dir)
			}
		}
		if err != nil {
			return fmt.Errorf("attach endpoint %d: %w", ep.ID, err)
		}
	}
	d.log.Info("endpoint attached", "endpoint_id", ep.ID, "ifindex", ep.IfIndex, "identity", ep.Identity, "attach", d.mode)
	// Identity, audit flag or programs may have changed.
	if err := d.bumpRev(); err != nil {
		return fmt.Errorf("attach endpoint %d: %w", ep.ID, err)
	}
	return nil
}

// addEndpointLocked creates or re-adopts the policy map and writes the
// rw_endpoints entries; d.mu must be held.
func (d *Datapath) addEndpointLocked(ep EndpointSpec) error {
	if _, err := d.policyMapLocked(ep.ID, true); err != nil {
		return err
	}
	info := endpointInfo{Ifindex: uint32(ep.IfIndex), Identity: ep.Identity, Endpoint: ep.ID}
	if ep.Audit {
		info.Flags |= epFlagAudit
	}
	copy(info.MAC[:], ep.MAC)
	copy(info.NodeMAC[:], ep.NodeMAC)
	for _, ip := range ep.IPs {
		if err := d.maps["rw_endpoints"].Put(newIPKey(ip), info); err != nil {
			return fmt.Errorf("write rw_endpoints %s: %w", ip, err)
		}
	}
	return nil
}

// tcxAttach: the endpoint's egress is the veth's ingress hook and vice versa.
func tcxAttach(dir Direction) ebpf.AttachType {
	if dir == Egress {
		return ebpf.AttachTCXIngress
	}
	return ebpf.AttachTCXEgress
}

func (d *Datapath) attachTCX(ep EndpointSpec, dir Direction, prog *ebpf.Program) error {
	pin := d.linkPin(ep.ID, dir)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ep.IfIndex {
			err := l.Update(prog)
			l.Close()
			if err != nil {
				return fmt.Errorf("replace tcx program on ifindex %d: %w", ep.IfIndex, err)
			}
			return nil
		}
		// A link of a veth that is gone (or another one): drop it.
		l.Unpin()
		l.Close()
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ep.IfIndex, Program: prog, Attach: tcxAttach(dir)})
	if err != nil {
		return fmt.Errorf("attach tcx %s on ifindex %d: %w", dir, ep.IfIndex, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin tcx link %s: %w", pin, err)
	}
	return nil
}

func (d *Datapath) detachTCX(id uint16, dir Direction) error {
	l, err := link.LoadPinnedLink(d.linkPin(id, dir), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load pinned link: %w", err)
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin link: %w", err)
	}
	return nil
}

func tcParent(dir Direction) uint32 {
	if dir == Egress {
		return netlink.HANDLE_MIN_INGRESS
	}
	return netlink.HANDLE_MIN_EGRESS
}

func attachTC(ifindex int, dir Direction, prog *ebpf.Program) error {
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc on ifindex %d: %w", ifindex, err)
	}
	name := "rw_to_endpoint"
	if dir == Egress {
		name = "rw_from_endpoint"
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: tcParent(dir), Handle: tcHandle,
			Priority: tcPriority, Protocol: unix.ETH_P_ALL,
		},
		Fd: prog.FD(), Name: name, DirectAction: true,
	}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("attach tc %s on ifindex %d: %w", dir, ifindex, err)
	}
	return nil
}

func detachTC(ifindex int, dir Direction) error {
	f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: ifindex, Parent: tcParent(dir), Handle: tcHandle,
		Priority: tcPriority, Protocol: unix.ETH_P_ALL,
	}}
	err := netlink.FilterDel(f)
	if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return fmt.Errorf("detach tc %s on ifindex %d: %w", dir, ifindex, err)
}

// DetachEndpoint removes the endpoint's programs (tcx links and tc
// filters), its rw_endpoints entries and its policy map. Its CT entries age
// out of the LRU. ifindex may be 0 when the veth is already gone.
func (d *Datapath) DetachEndpoint(id uint16, ifindex int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for _, dir := range []Direction{Egress, Ingress} {
		errs = append(errs, d.detachTCX(id, dir))
		if ifindex > 0 {
			errs = append(errs, detachTC(ifindex, dir))
		}
	}
	// Endpoint entries pointing at this id.
	var (
		k     ipKey
		v     endpointInfo
		stale []ipKey
	)
	it := d.maps["rw_endpoints"].Iterate()
	for it.Next(&k, &v) {
		if v.Endpoint == id {
			stale = append(stale, k)
		}
	}
	errs = append(errs, it.Err())
	for _, k := range stale {
		if err := d.maps["rw_endpoints"].Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete rw_endpoints entry: %w", err))
		}
	}
	key := uint32(id)
	if err := d.maps["rw_policy_maps"].Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("delete from rw_policy_maps: %w", err))
	}
	// Its event budget and counters (a later endpoint with this id starts afresh).
	if err := d.maps["rw_event_limit"].Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("delete rw_event_limit entry: %w", err))
	}
	if m, ok := d.policy[id]; ok {
		m.Close()
		delete(d.policy, id)
	}
	if err := os.Remove(filepath.Join(d.opts.PinDir, policyMapName(id))); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("unpin policy map: %w", err))
	}
	errs = append(errs, d.removeTempPin(id))
	errs = append(errs, d.bumpRev())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach endpoint %d: %w", id, err)
	}
	d.log.Info("endpoint detached", "endpoint_id", id)
	return nil
}

// policyMapLocked returns the endpoint's policy map: open, pinned, or (with
// create) newly created closed (only the meta entries), pinned and
// registered in rw_policy_maps. A pinned map is adopted as it is and
// registered again: if the agent died between renaming a new map over the
// pin and registering it (SetPolicy), this makes the newest policy the one
// in force. d.mu must be held.
func (d *Datapath) policyMapLocked(id uint16, create bool) (*ebpf.Map, error) {
	if m, ok := d.policy[id]; ok {
		return m, nil
	}
	name := policyMapName(id)
	path := filepath.Join(d.opts.PinDir, name)
	m, err := ebpf.LoadPinnedMap(path, nil)
	created := false
	switch {
	case err == nil:
		if m.KeySize() != policyKeySize || m.ValueSize() != policyValSize {
			m.Close()
			return nil, fmt.Errorf("map %s: %w", path, ErrIncompatibleMap)
		}
		// A temporary pin of a swap that never completed names a map
		// that was never in force.
		if err := d.removeTempPin(id); err != nil {
			d.log.Warn("leftover temporary policy map pin", "endpoint_id", id, "err", err)
		}
	case errors.Is(err, os.ErrNotExist) && create:
		spec := d.inner.Copy()
		spec.Name = name
		spec.Pinning = ebpf.PinNone
		m, err = ebpf.NewMap(spec)
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", name, err)
		}
		if err := m.Pin(path); err != nil {
			m.Close()
			return nil, fmt.Errorf("pin %s: %w", path, err)
		}
		created = true
		// Closed: no allow entry in either direction, only the meta
		// entries (no block sizes, no denies).
		if err := writeMeta(m); err != nil {
			m.Unpin()
			m.Close()
			return nil, err
		}
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("%s: %w", name, ErrUnknownEndpoint)
	default:
		return nil, fmt.Errorf("load pinned %s: %w", path, err)
	}
	// Registering is idempotent: after a restart the outer map already
	// points at this map, and Put replaces it with itself.
	if err := d.maps["rw_policy_maps"].Put(uint32(id), m); err != nil {
		if created {
			m.Unpin()
		}
		m.Close()
		return nil, fmt.Errorf("register %s in rw_policy_maps: %w", name, err)
	}
	d.policy[id] = m
	return m, nil
}

// EndpointEntry is one rw_endpoints entry: a local endpoint address.
type EndpointEntry struct {
	IP       netip.Addr `json:"ip"`
	ID       uint16     `json:"id"`
	IfIndex  int        `json:"ifindex"`
	Identity uint32     `json:"identity"`
	Audit    bool       `json:"audit"`
}

// Endpoints lists rw_endpoints, as the programs see the local endpoints.
func (d *Datapath) Endpoints() ([]EndpointEntry, error) {
	var (
		out []EndpointEntry
		k   ipKey
		v   endpointInfo
	)
	it := d.maps["rw_endpoints"].Iterate()
	for it.Next(&k, &v) {
		out = append(out, EndpointEntry{
			IP: addrFrom(k.Family, k.Addr), ID: v.Endpoint, IfIndex: int(v.Ifindex),
			Identity: v.Identity, Audit: v.Flags&epFlagAudit != 0,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list rw_endpoints: %w", err)
	}
	return out, nil
}

// SetAudit turns audit mode of one endpoint on or off: with it on, what
// its policy would drop is forwarded and reported as an audit event. The
// flag lives in the endpoint's rw_endpoints entries, so it survives an
// agent restart only if the agent sets it again (AttachEndpoint writes the
// spec's Audit).
func (d *Datapath) SetAudit(id uint16, on bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var (
		k     ipKey
		v     endpointInfo
		keys  []ipKey
		infos []endpointInfo
	)
	it := d.maps["rw_endpoints"].Iterate()
	for it.Next(&k, &v) {
		if v.Endpoint == id {
			keys = append(keys, k)
			infos = append(infos, v)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list rw_endpoints: %w", err)
	}
	if len(keys) == 0 {
		return fmt.Errorf("set audit of endpoint %d: %w", id, ErrUnknownEndpoint)
	}
	for i := range keys {
		if on {
			infos[i].Flags |= epFlagAudit
		} else {
			infos[i].Flags &^= epFlagAudit
		}
		if err := d.maps["rw_endpoints"].Put(keys[i], infos[i]); err != nil {
			return fmt.Errorf("set audit of endpoint %d: %w", id, err)
		}
	}
	if err := d.bumpRev(); err != nil {
		return fmt.Errorf("set audit of endpoint %d: %w", id, err)
	}
	return nil
}
