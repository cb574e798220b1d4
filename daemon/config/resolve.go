package config

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
)

// Resolve fills the host-dependent defaults that the file left empty: the
// node name from the hostname, the node addresses from the interface of the
// default route, and the BGP router id from the first IPv4 address. It
// reports what it could not fill when that makes the config unusable.
func (c *Config) Resolve() error {
	if c.Node.Name == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			return fmt.Errorf("node.name is empty and the hostname cannot be read; set [node] name")
		}
		c.Node.Name = strings.SplitN(h, ".", 2)[0]
	}
	if len(c.Node.Addresses) == 0 {
		c.Node.Addresses = defaultRouteAddrs()
	}
	if c.BGP.Enabled && c.BGP.RouterID == "" {
		for _, a := range c.Node.Addresses {
			if ip, err := netip.ParseAddr(a); err == nil && ip.Is4() {
				c.BGP.RouterID = a
				break
			}
		}
		if c.BGP.RouterID == "" {
			return &Error{Problems: []Problem{{File: c.File, Key: "bgp.router_id",
				Msg: "not set and this host has no IPv4 address to take it from; set [bgp] router_id = \"A.B.C.D\""}}}
		}
	}
	return nil
}

// defaultRouteAddrs returns the addresses of the interface that carries the
// IPv4 default route, read from /proc so that config needs no netlink.
func defaultRouteAddrs() []string {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return []string{}
	}
	defer f.Close()
	var ifname string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fs := strings.Fields(s.Text())
		if len(fs) > 2 && fs[1] == "00000000" && fs[2] != "Destination" {
			ifname = fs[0]
			break
		}
	}
	out := []string{}
	if ifname == "" {
		return out
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return out
	}
	addrs, _ := ifi.Addrs()
	for _, a := range addrs {
		if pn, ok := a.(*net.IPNet); ok && pn.IP.IsGlobalUnicast() {
			out = append(out, pn.IP.String())
		}
	}
	return out
}
