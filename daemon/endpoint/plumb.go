package endpoint

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// host is the network namespace endpoints are plugged into: the agent's own,
// or (for simulated hosts and tests) one named by Options.HostNetns.
type host struct {
	nsPath string // "" means the agent's own namespace
	ns     netns.NsHandle
	nl     *netlink.Handle
}

func openHost(path string) (*host, error) {
	h := &host{nsPath: path}
	var err error
	if path == "" {
		h.ns, err = netns.Get()
		if err != nil {
			return nil, fmt.Errorf("open own network namespace: %w", err)
		}
		h.nl, err = netlink.NewHandle()
	} else {
		h.ns, err = openNetns(path)
		if err != nil {
			// The host namespace comes from the operator's config, not
			// from a caller: say why it was refused.
			if why := NetnsReason(err); why != "" {
				err = fmt.Errorf("%w (%s)", err, why)
			}
			return nil, fmt.Errorf("open host namespace %s: %w", path, err)
		}
		h.nl, err = netlink.NewHandleAt(h.ns)
	}
	if err != nil {
		h.ns.Close()
		return nil, fmt.Errorf("open netlink in host namespace: %w", err)
	}
	return h, nil
}

func (h *host) close() {
	h.nl.Close()
	h.ns.Close()
}

// sysctl sets /proc/sys/<key> to val in the host namespace (/proc/sys/net
// resolves to the namespace of the opening thread) unless it already holds
// val (rewriting net.ipv4.ip_forward resets every interface's
// forwarding flag, so an unchanged value is not written again).
func (h *host) sysctl(key, val string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	write := func() error {
		cur, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("read %s: %w", key, err)
		}
		if strings.TrimSpace(string(cur)) == val {
			return nil
		}
		if err := os.WriteFile(path, []byte(val), 0o644); err != nil {
			return fmt.Errorf("set %s=%s: %w", key, val, err)
		}
		return nil
	}
	return h.do(write)
}

// do runs f with the calling thread in the host namespace: a netlink or
// bpf call that names an ifindex resolves it in the caller's namespace.
func (h *host) do(f func() error) error {
	if h.nsPath == "" {
		return f()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(h.ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter host namespace: %w", err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked and the runtime discards it when
			// this goroutine ends, so no goroutine runs in the wrong
			// namespace.
			errc <- errors.Join(ferr, fmt.Errorf("leave host namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// ensureForwarding turns on routing in the host namespace for the families
// in use.
func (h *host) ensureForwarding(v4, v6 bool) error {
	if v4 {
		if err := h.sysctl("net.ipv4.ip_forward", "1"); err != nil {
			return err
		}
	}
	if v6 {
		if err := h.sysctl("net.ipv6.conf.all.forwarding", "1"); err != nil {
			return err
		}
	}
	return nil
}

func addrNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

func nlFamily(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// plumbing is what plumb created.
type plumbing struct {
	hostIndex int
	hostMAC   net.HardwareAddr
	peerMAC   net.HardwareAddr
}

// plumb creates the veth pair hostName <-> peerName (in epNs) and
// configures both sides. On error it deletes the pair, which takes its addresses,
// routes and neighbours with it, so nothing is left behind.
func (h *host) plumb(epNs netns.NsHandle, hostName, peerName string, mtu int, ips []netip.Addr) (p plumbing, err error) {
	epnl, err := netlink.NewHandleAt(epNs)
	if err != nil {
		return p, fmt.Errorf("open netlink in endpoint namespace: %w", err)
	}
	defer epnl.Close()
	if _, err := epnl.LinkByName(peerName); err == nil {
		return p, fmt.Errorf("%w: the namespace already has an %s; give each endpoint a namespace of its own", ErrExists, peerName)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostName, MTU: mtu},
		PeerName:      peerName,
		PeerNamespace: netlink.NsFd(int(epNs)),
	}
	if err := h.nl.LinkAdd(veth); err != nil {
		return p, fmt.Errorf("create veth %s: %w", hostName, err)
	}
	defer func() {
		if err != nil {
			if derr := h.unplumb(hostName); derr != nil {
				err = errors.Join(err, fmt.Errorf("roll back veth: %w", derr))
			}
		}
	}()
	hl, err := h.nl.LinkByName(hostName)
	if err != nil {
		return p, fmt.Errorf("find new veth %s: %w", hostName, err)
	}
	pl, err := epnl.LinkByName(peerName)
	if err != nil {
		return p, fmt.Errorf("find new %s in endpoint namespace: %w", peerName, err)
	}
	p = plumbing{hostIndex: hl.Attrs().Index, hostMAC: hl.Attrs().HardwareAddr, peerMAC: pl.Attrs().HardwareAddr}

	// Endpoint side: /32 and /128 addresses, link up, a permanent
	// neighbour for each gateway pointing at the host-side MAC, then the
	// default routes through them.
	for _, a := range ips {
		addr := &netlink.Addr{IPNet: addrNet(a)}
		if a.Is6() {
			addr.Flags = unix.IFA_F_NODAD // usable at once; the host owns the prefix
		}
		if err := epnl.AddrAdd(pl, addr); err != nil {
			return p, fmt.Errorf("add %s to %s: %w", a, peerName, err)
		}
	}
	if err := epnl.LinkSetUp(pl); err != nil {
		return p, fmt.Errorf("set %s up: %w", peerName, err)
	}
	for _, a := range ips {
		gw := GatewayIPv4
		if a.Is6() {
			gw = GatewayIPv6
		}
		if err := epnl.NeighSet(&netlink.Neigh{LinkIndex: pl.Attrs().Index, Family: nlFamily(gw), State: netlink.NUD_PERMANENT,
			IP: gw.AsSlice(), HardwareAddr: p.hostMAC}); err != nil {
			return p, fmt.Errorf("add gateway neighbour %s in endpoint namespace: %w", gw, err)
		}
		if gw.Is4() {
			if err := epnl.RouteAdd(&netlink.Route{LinkIndex: pl.Attrs().Index, Dst: addrNet(gw), Scope: netlink.SCOPE_LINK,
				Protocol: RouteProtocol}); err != nil {
				return p, fmt.Errorf("add route to gateway %s in endpoint namespace: %w", gw, err)
			}
		}
		if err := epnl.RouteAdd(&netlink.Route{LinkIndex: pl.Attrs().Index, Gw: gw.AsSlice(), Family: nlFamily(gw),
			Protocol: RouteProtocol}); err != nil {
			return p, fmt.Errorf("add default route via %s in endpoint namespace: %w", gw, err)
		}
	}

	// The host side stays down, without routes, until activate: the
	// datapath and the endpoint's policy come first.
	return p, nil
}

// activate brings the host side of a plumbed veth up and installs its host
// routes and neighbours: from here on the endpoint carries traffic.
func (h *host) activate(ifindex int, peerMAC net.HardwareAddr, ips []netip.Addr) error {
	hl, err := h.nl.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("find host veth %d: %w", ifindex, err)
	}
	if err := h.nl.LinkSetUp(hl); err != nil {
		return fmt.Errorf("set %s up: %w", hl.Attrs().Name, err)
	}
	return h.ensureHostSide(ifindex, peerMAC, ips, false)
}

// ensureHostSide installs the host route (scope link, proto RouteProtocol)
// and the permanent neighbour entry of each endpoint address on the host-side
// veth. With replace it is idempotent (Restore); without, an existing route
// to the address is an error (Add).
func (h *host) ensureHostSide(ifindex int, peerMAC net.HardwareAddr, ips []netip.Addr, replace bool) error {
	for _, a := range ips {
		r := &netlink.Route{LinkIndex: ifindex, Dst: addrNet(a), Scope: netlink.SCOPE_LINK, Protocol: RouteProtocol}
		var err error
		if replace {
			err = h.nl.RouteReplace(r)
		} else {
			err = h.nl.RouteAdd(r)
		}
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("%w: the host already has a route to %s; remove it (ip route del %s) or pick another address", ErrIPInUse, a, a)
		}
		if err != nil {
			return fmt.Errorf("add host route to %s: %w", a, err)
		}
		if err := h.nl.NeighSet(&netlink.Neigh{LinkIndex: ifindex, Family: nlFamily(a), State: netlink.NUD_PERMANENT,
			IP: a.AsSlice(), HardwareAddr: peerMAC}); err != nil {
			return fmt.Errorf("add host neighbour %s: %w", a, err)
		}
	}
	return nil
}

// unplumb deletes the host-side veth by name (the kernel deletes its peer,
// addresses, routes and neighbours with it); an absent link is not an error.
func (h *host) unplumb(name string) error {
	l, err := h.nl.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("find veth %s: %w", name, err)
	}
	if err := h.nl.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete veth %s: %w", name, err)
	}
	return nil
}

// link returns the host-side veth by name, or nil if it is gone.
func (h *host) link(name string) (netlink.Link, error) {
	l, err := h.nl.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("find veth %s: %w", name, err)
	}
	return l, nil
}

func sameMAC(a string, b net.HardwareAddr) bool {
	m, err := net.ParseMAC(a)
	return err == nil && bytes.Equal(m, b)
}

// plumbDetached creates the veth pair hostName <-> peerName with both sides
// in the host namespace, down and without addresses, for a runtime that
// moves the peer into its sandbox and configures it itself (Docker). mac,
// if set, is the peer's MAC. On error it deletes the pair.
func (h *host) plumbDetached(hostName, peerName string, mtu int, mac net.HardwareAddr) (plumbing, error) {
	if l, err := h.link(peerName); err != nil || l != nil {
		if err == nil {
			err = fmt.Errorf("%w: the host already has a link %s", ErrExists, peerName)
		}
		return plumbing{}, err
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName, MTU: mtu}, PeerName: peerName, PeerHardwareAddr: mac}
	if err := h.nl.LinkAdd(veth); err != nil {
		return plumbing{}, fmt.Errorf("create veth %s: %w", hostName, err)
	}
	hl, herr := h.nl.LinkByName(hostName)
	pl, perr := h.nl.LinkByName(peerName)
	if err := errors.Join(herr, perr); err != nil {
		return plumbing{}, errors.Join(fmt.Errorf("find new veth pair %s: %w", hostName, err), h.unplumb(hostName))
	}
	return plumbing{hostIndex: hl.Attrs().Index, hostMAC: hl.Attrs().HardwareAddr, peerMAC: pl.Attrs().HardwareAddr}, nil
}
