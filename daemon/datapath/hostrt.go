package datapath

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/bpf"
)

// Host routing modes ([datapath] host_routing).
const (
	// HostRoutingAuto: HostRoutingBPF where the kernel has the helpers
	// (Features().HostRouting), else HostRoutingLegacy.
	HostRoutingAuto = "auto"
	// HostRoutingBPF: traffic to other hosts leaves through bpf_fib_lookup +
	// bpf_redirect and traffic from them enters through rw_from_uplink;
	// neither passes the host's routing and netfilter (docs/datapath.md).
	HostRoutingBPF = "bpf"
	// HostRoutingLegacy: traffic to and from other hosts is routed by the
	// host stack (FORWARD chain, conntrack, routing) as before.
	HostRoutingLegacy = "legacy"
)

// Legacy tc filter of rw_from_uplink on an uplink's clsact ingress: a
// priority of its own, so another program there (the services datapath,
// an operator's filter) keeps its own.
const (
	tcUplinkHandle   = 0x7275 // "ru"
	tcUplinkPriority = 0x7275
)

// chooseHostRouting resolves the configured mode against the kernel: the
// mode in force and why.
func chooseHostRouting(mode string, f Features) (string, string, error) {
	switch mode {
	case HostRoutingLegacy:
		return HostRoutingLegacy, `[datapath] host_routing = "legacy"`, nil
	case HostRoutingBPF:
		if !f.HostRouting {
			return "", "", fmt.Errorf(`[datapath] host_routing = "bpf": the kernel lacks %s; set "auto" or "legacy"`, f.hostRoutingMissing())
		}
		return HostRoutingBPF, `[datapath] host_routing = "bpf"`, nil
	case HostRoutingAuto, "":
		if f.HostRouting {
			return HostRoutingBPF, "auto: the kernel has bpf_fib_lookup, bpf_check_mtu and bpf_redirect_peer", nil
		}
		return HostRoutingLegacy, "auto: the kernel lacks " + f.hostRoutingMissing(), nil
	}
	return "", "", fmt.Errorf("host_routing %q: want auto, bpf or legacy", mode)
}

// HostRouting reports the host routing mode in force (HostRoutingBPF or
// HostRoutingLegacy) and why it was chosen.
func (d *Datapath) HostRouting() (mode, why string) { return d.hostRouting, d.hostRoutingWhy }

// DefaultUplinks returns the devices of the default routes (IPv4 and IPv6)
// of the calling thread's network namespace, sorted, without duplicates.
func DefaultUplinks() ([]string, error) {
	var names []string
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst != nil && !isDefault(r.Dst) {
				continue
			}
			idx := []int{r.LinkIndex}
			for _, nh := range r.MultiPath {
				idx = append(idx, nh.LinkIndex)
			}
			for _, i := range idx {
				if i <= 0 {
					continue
				}
				l, err := netlink.LinkByIndex(i)
				if err != nil {
					continue
				}
				names = append(names, l.Attrs().Name)
			}
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

func (d *Datapath) uplinkPin(name string) string {
	return filepath.Join(d.opts.PinDir, "links", "rw_uplink_"+name)
}

// SetUplinks attaches rw_from_uplink to the ingress of each named device
// and detaches it from every uplink it was attached to before (by this or
// a previous agent) that is not named. With host routing "legacy" and
// north-south balancing off (SetNorthSouth) it only detaches.
// Attachments are pinned (tcx links under links/rw_uplink_NAME) or legacy
// tc filters of their own priority, so forwarding survives an agent
// restart, and they never displace another program on the device.
// A device that does not exist is an error; the others are attached.
func (d *Datapath) SetUplinks(names []string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.hostRouting != HostRoutingBPF && !d.northSouth || d.uplink == nil {
		names = nil
	}
	var errs []error
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
		if err := d.attachUplinkLocked(n); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range d.attachedUplinks() {
		if !want[n] {
			errs = append(errs, d.detachUplinkLocked(n))
		}
	}
	return errors.Join(errs...)
}

// Uplinks lists the devices rw_from_uplink is attached to (pinned tcx
// links, and legacy tc filters recorded by their pin marker).
func (d *Datapath) Uplinks() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.attachedUplinks()
}

func (d *Datapath) attachedUplinks() []string {
	ents, _ := os.ReadDir(filepath.Join(d.opts.PinDir, "links"))
	var out []string
	for _, e := range ents {
		if n, ok := strings.CutPrefix(e.Name(), "rw_uplink_"); ok {
			out = append(out, n)
		}
	}
	return out
}

func (d *Datapath) attachUplinkLocked(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("uplink %s: %w", name, err)
	}
	ifindex := l.Attrs().Index
	pin := d.uplinkPin(name)
	if d.mode == AttachTCX {
		if pl, err := link.LoadPinnedLink(pin, nil); err == nil {
			info, ierr := pl.Info()
			if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
				err := pl.Update(d.uplink)
				pl.Close()
				if err != nil {
					return fmt.Errorf("replace rw_from_uplink on %s: %w", name, err)
				}
				return detachTCUplink(ifindex)
			}
			pl.Unpin()
			pl.Close()
		} else {
			os.Remove(pin) // a tc marker of a previous legacy run
		}
		// Appended after the programs already there: they see the packet first.
		tl, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: d.uplink, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("attach tcx rw_from_uplink on %s: %w", name, err)
		}
		defer tl.Close()
		if err := tl.Pin(pin); err != nil {
			return fmt.Errorf("pin tcx link %s: %w", pin, err)
		}
		if err := detachTCUplink(ifindex); err != nil {
			return err
		}
		d.log.Info("uplink attached", "uplink", name, "ifindex", ifindex, "attach", d.mode)
		return nil
	}
	// Legacy tc: the filter itself survives the agent; a plain file under
	// links/ records the uplink so the next agent knows to detach it.
	if pl, err := link.LoadPinnedLink(pin, nil); err == nil {
		pl.Unpin()
		pl.Close()
	}
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc on %s: %w", name, err)
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS, Handle: tcUplinkHandle,
			Priority: tcUplinkPriority, Protocol: unix.ETH_P_ALL,
		},
		Fd: d.uplink.FD(), Name: "rw_from_uplink", DirectAction: true,
	}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("attach tc rw_from_uplink on %s: %w", name, err)
	}
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(pin, 0o700); err != nil {
			return fmt.Errorf("record uplink %s: %w", name, err)
		}
	}
	d.log.Info("uplink attached", "uplink", name, "ifindex", ifindex, "attach", d.mode)
	return nil
}

// cleanupUplinkFilters removes the legacy tc filter of rw_from_uplink from
// every uplink recorded under pinDir (best effort: Cleanup goes on).
func cleanupUplinkFilters(pinDir string) {
	ents, _ := os.ReadDir(filepath.Join(pinDir, "links"))
	for _, e := range ents {
		if n, ok := strings.CutPrefix(e.Name(), "rw_uplink_"); ok && e.IsDir() {
			if l, err := netlink.LinkByName(n); err == nil {
				_ = detachTCUplink(l.Attrs().Index)
			}
		}
	}
}

func detachTCUplink(ifindex int) error {
	f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: ifindex, Parent: netlink.HANDLE_MIN_INGRESS, Handle: tcUplinkHandle,
		Priority: tcUplinkPriority, Protocol: unix.ETH_P_ALL,
	}}
	err := netlink.FilterDel(f)
	if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return fmt.Errorf("detach tc rw_from_uplink on ifindex %d: %w", ifindex, err)
}

func (d *Datapath) detachUplinkLocked(name string) error {
	pin := d.uplinkPin(name)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		l.Unpin() // detaches
		l.Close()
	} else if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove uplink record %s: %w", pin, err)
	}
	if l, err := netlink.LinkByName(name); err == nil {
		if err := detachTCUplink(l.Attrs().Index); err != nil {
			return err
		}
	}
	d.log.Info("uplink detached", "uplink", name)
	return nil
}

// HostRoutingSlot names an rw_hostrt counter.
type HostRoutingSlot uint32

// rw_hostrt slots (enum rw_hostrt_slot in bpf/datapath_types.h).
const (
	HREgressForwarded  HostRoutingSlot = 0
	HRIngressForwarded HostRoutingSlot = 1
	HRStackTTL         HostRoutingSlot = 2
	HRStackMTU         HostRoutingSlot = 3
	HRStackNoNeigh     HostRoutingSlot = 4
	HRStackFIB         HostRoutingSlot = 5
	HRStackOther       HostRoutingSlot = 6
	HRStackNotLocal    HostRoutingSlot = 7
	// North-south service balancing (bpf/northsouth.h): flows from an
	// uplink to a VIP that got a local backend, packets translated to it,
	// and replies given the VIP back.
	HRSvcNewFlow    HostRoutingSlot = 8
	HRSvcTranslated HostRoutingSlot = 9
	HRSvcReply      HostRoutingSlot = 10
	// Of HREgressForwarded: packets sent to the next hop their flow's CT
	// entry kept from an earlier FIB answer (bpf/hostrt.h, RW_NH_RECHECK).
	HREgressCached   HostRoutingSlot = 11
	hostRoutingSlots HostRoutingSlot = 12
)

var hostRoutingSlotNames = [hostRoutingSlots]string{
	"egress_forwarded", "ingress_forwarded", "stack_ttl", "stack_mtu",
	"stack_no_neighbour", "stack_fib", "stack_other", "stack_not_local",
	"service_new_flow", "service_translated", "service_reply",
	"egress_cached_next_hop",
}

func (s HostRoutingSlot) String() string {
	if s < hostRoutingSlots {
		return hostRoutingSlotNames[s]
	}
	return fmt.Sprintf("slot_%d", uint32(s))
}

// HostRoutingCounter is one rw_hostrt counter, summed over CPUs.
type HostRoutingCounter struct {
	Slot    HostRoutingSlot `json:"-"`
	Name    string          `json:"name"`
	Packets uint64          `json:"packets"`
	Bytes   uint64          `json:"bytes"`
}

// HostRoutingCounters returns every rw_hostrt counter: packets the fast
// paths to and from other hosts forwarded, and those they left to the host
// stack, by why.
func (d *Datapath) HostRoutingCounters() ([]HostRoutingCounter, error) {
	out := make([]HostRoutingCounter, 0, hostRoutingSlots)
	for i := HostRoutingSlot(0); i < hostRoutingSlots; i++ {
		var per []metricsValue
		if err := d.maps["rw_hostrt"].Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read rw_hostrt %d: %w", i, err)
		}
		c := HostRoutingCounter{Slot: i, Name: i.String()}
		for _, v := range per {
			c.Packets += v.Packets
			c.Bytes += v.Bytes
		}
		out = append(out, c)
	}
	return out, nil
}

// SetNorthSouth turns north-south service balancing on or off: traffic
// from the uplinks to a service VIP:port balanced to the service's
// backends on this host (bpf/northsouth.h). It needs rw_from_uplink on the
// uplinks, so with host routing "legacy" the next SetUplinks attaches it
// (it then only balances and leaves every packet to the stack) or, when
// off, detaches it. With host routing "bpf" the uplinks carry it anyway,
// and a VIP that arrives there is balanced either way.
func (d *Datapath) SetNorthSouth(on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.northSouth = on
}

// NorthSouth reports whether traffic from the uplinks to a service VIP is
// balanced to local backends: rw_from_uplink is loaded, wanted on the
// uplinks (host routing "bpf" or SetNorthSouth) and attached to at least
// one; and why or why not.
func (d *Datapath) NorthSouth() (bool, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.uplink == nil:
		return false, fmt.Sprintf("rw_from_uplink does not load on this kernel: %v", d.uplinkErr)
	case d.hostRouting != HostRoutingBPF && !d.northSouth:
		return false, `host_routing "legacy" and [bgp] announce_service_vips off: rw_from_uplink is not attached`
	case len(d.attachedUplinks()) == 0:
		return false, "rw_from_uplink is on no uplink (yet): [datapath] uplinks, or no default route"
	case d.northSouth:
		return true, "[bgp] announce_service_vips; uplinks " + strings.Join(d.attachedUplinks(), ",")
	}
	return true, `host_routing "bpf"; uplinks ` + strings.Join(d.attachedUplinks(), ",")
}

// loadUplink loads rw_from_uplink on the datapath's maps.
func (d *Datapath) loadUplink() (*ebpf.Program, error) {
	spec, err := bpf.LoadFromUplink()
	if err != nil {
		return nil, fmt.Errorf("parse from_uplink object: %w", err)
	}
	if err := d.setVariables(spec); err != nil {
		return nil, err
	}
	for name, ms := range spec.Maps {
		if m, ok := d.maps[name]; ok {
			ms.MaxEntries = m.MaxEntries()
			ms.Flags = m.Flags()
		}
	}
	return loadProgram(spec, d.maps, "rw_from_uplink")
}

// ProgramStats returns the kernel's run statistics (ebpf.EnableStats must
// be on) of the programs this datapath loaded, by program name.
func (d *Datapath) ProgramStats() (map[string]ebpf.ProgramStats, error) {
	out := map[string]ebpf.ProgramStats{}
	for name, p := range map[string]*ebpf.Program{"rw_from_endpoint": d.from, "rw_to_endpoint": d.to, "rw_from_uplink": d.uplink} {
		if p == nil {
			continue
		}
		s, err := p.Stats()
		if err != nil {
			return nil, fmt.Errorf("stats of %s: %w", name, err)
		}
		out[name] = *s
	}
	return out, nil
}
