package endpoint

import (
	"fmt"
	"net/netip"
	"strings"
)

// Address rules (docs/endpoints.md "Addressing"): every address of a CIDR may
// go to an endpoint except, for IPv4 prefixes of /30 and shorter, the network
// and broadcast addresses, and for IPv6 prefixes shorter than /127 the
// subnet-router anycast address (the all-zero interface id). No address is
// kept for a gateway: endpoints route through link-local gateways that live
// on no interface.

// reserved reports whether a is an address of p that is never handed out.
func reserved(p netip.Prefix, a netip.Addr) bool {
	if a == p.Addr() {
		if a.Is4() {
			return p.Bits() <= 30
		}
		return p.Bits() < 127
	}
	return a.Is4() && p.Bits() <= 30 && a == lastAddr(p)
}

// lastAddr returns the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

// familyPrefixes returns the prefixes of one family.
func familyPrefixes(ps []netip.Prefix, v4 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is4() == v4 {
			out = append(out, p)
		}
	}
	return out
}

// checkRequested validates an address the caller asked for.
func checkRequested(ps []netip.Prefix, a netip.Addr, used map[netip.Addr]string) error {
	fam := familyPrefixes(ps, a.Is4())
	if len(fam) == 0 {
		return fmt.Errorf("%w: %s is %s but [ipam] cidrs has no %s CIDR; omit the address or add a CIDR",
			ErrIPOutsideCIDR, a, family(a), family(a))
	}
	for _, p := range fam {
		if !p.Contains(a) {
			continue
		}
		if reserved(p, a) {
			return fmt.Errorf("%w: %s is the network, broadcast or anycast address of %s; pick another address of it",
				ErrIPOutsideCIDR, a, p)
		}
		if owner, ok := used[a]; ok {
			return fmt.Errorf("%w: %s belongs to endpoint %s; pick another address or omit it to get a free one",
				ErrIPInUse, a, owner)
		}
		return nil
	}
	return fmt.Errorf("%w: %s is not in %s; pick an address inside them or omit it to get a free one",
		ErrIPOutsideCIDR, a, prefixList(fam))
}

// allocate returns the lowest free address of the first prefix of the family
// that has one. It looks at no more than len(used)+3 candidates per prefix,
// so a /64 costs no more than a /24.
func allocate(ps []netip.Prefix, v4 bool, used map[netip.Addr]string) (netip.Addr, error) {
	fam := familyPrefixes(ps, v4)
	for _, p := range fam {
		for a := p.Addr(); a.IsValid() && p.Contains(a); a = a.Next() {
			if reserved(p, a) {
				continue
			}
			if _, ok := used[a]; !ok {
				return a, nil
			}
		}
	}
	f := "IPv4"
	if !v4 {
		f = "IPv6"
	}
	return netip.Addr{}, fmt.Errorf("%w: no free %s address in %s; delete unused endpoints or add a CIDR to [ipam] cidrs",
		ErrCIDRExhausted, f, prefixList(fam))
}
