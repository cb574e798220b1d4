package config

import (
	"fmt"
	"net/netip"

	"github.com/rackwire/rackwire/daemon/service"
)

// ServiceLimits is what every service source's data is checked against:
// the VIP in [bgp] vip_ranges (when set) and outside [ipam] cidrs.
func (c *Config) ServiceLimits() service.Limits {
	l := service.Limits{Workload: c.Prefixes()}
	for _, s := range c.BGP.VIPRanges {
		if p, err := netip.ParsePrefix(s); err == nil {
			l.VIPRanges = append(l.VIPRanges, p.Masked())
		}
	}
	return l
}

// ServiceSpecs returns [[services]] as service specs.
func (c *Config) ServiceSpecs() []service.Spec {
	out := make([]service.Spec, len(c.Services))
	for i, s := range c.Services {
		out[i] = service.Spec{Name: s.Name, VIP: s.VIP, Port: s.Port, Protocol: s.Protocol, Backends: s.Backends}
	}
	return out
}

// validateServices checks [[services]]: in the config, a bad service or
// backend is an error (in the store or Consul it is skipped and logged).
func (c *Config) validateServices(bad func(key, format string, args ...any), cidrs []netip.Prefix) {
	l := c.ServiceLimits()
	l.Workload = cidrs
	names := map[string]bool{}
	fronts := map[service.Frontend]string{}
	for i, spec := range c.ServiceSpecs() {
		key := fmt.Sprintf("services[%d]", i)
		if spec.Protocol == "" {
			c.Services[i].Protocol = "tcp"
		}
		svc, skipped, err := spec.Build(service.SourceConfig, l)
		if err != nil {
			bad(key, "%v", err)
			continue
		}
		for _, p := range skipped {
			bad(key+".backends", "%s", p)
		}
		if names[spec.Name] {
			bad(key+".name", "%q names another [[services]] too; names must be unique", spec.Name)
		}
		names[spec.Name] = true
		if other, ok := fronts[svc.Frontend]; ok {
			bad(key+".vip", "%s is also the frontend of %q; one service per VIP, port and protocol", svc.Frontend, other)
		}
		fronts[svc.Frontend] = spec.Name
	}
}
