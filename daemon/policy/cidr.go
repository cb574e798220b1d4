package policy

import (
	"net/netip"
	"strings"

	"github.com/rackwire/rackwire/daemon/identity"
)

// CIDRLabelPrefix starts the label key of a CIDR identity.
const CIDRLabelPrefix = "cidr:"

// CIDRLabels is the label set of the host-local identity of prefix p:
// {"cidr:<p>": "", "reserved:world": ""}, where <p> is p masked and in its
// canonical text form (netip.Prefix.String: "10.0.0.0/8",
// "2001:db8::/32"). Every CIDR identity carries reserved:world, as in
// Cilium: what a CIDR names lies outside the cluster.
func CIDRLabels(p netip.Prefix) identity.Labels {
	p = p.Masked()
	return identity.Labels{
		{Key: CIDRLabelPrefix + p.String(), Value: ""},
		{Key: "reserved:world", Value: ""},
	}
}

// CIDRFromLabels returns the prefix of a CIDR identity's label set.
func CIDRFromLabels(ls identity.Labels) (netip.Prefix, bool) {
	for _, l := range ls {
		if rest, ok := strings.CutPrefix(l.Key, CIDRLabelPrefix); ok {
			p, err := netip.ParsePrefix(rest)
			if err != nil || p != p.Masked() {
				return netip.Prefix{}, false
			}
			return p, true
		}
	}
	return netip.Prefix{}, false
}
