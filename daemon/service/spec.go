package service

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"sort"
)

// DefaultMaxBackends caps the backends of one service. A Consul service
// with more instances than this is still balanced, over the first
// DefaultMaxBackends of them (active ones first, then by address), and the
// excess is reported once; 10,000 instances cost a sort, never a stall.
const DefaultMaxBackends = 1000

// MaxNameLen bounds a service name (it is a store key segment and a metric
// label).
const MaxNameLen = 128

var reName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// Errors a Spec or a frontend is refused with; wrapped with the detail.
var (
	ErrBadName     = errors.New("bad service name")
	ErrBadVIP      = errors.New("bad VIP")
	ErrVIPRange    = errors.New("VIP outside [bgp] vip_ranges")
	ErrBadPort     = errors.New("bad port")
	ErrBadProtocol = errors.New("bad protocol")
	ErrBadBackend  = errors.New("bad backend")
)

// Spec is a service as an operator writes it: a [[services]] table of the
// config, the JSON value stored under state/services/v1/<cluster>/<name>
// (written by `rackwire service add`), and the API's request body.
type Spec struct {
	Name     string   `json:"name"`
	VIP      string   `json:"vip"`
	Port     int      `json:"port"`
	Protocol string   `json:"protocol,omitempty"` // "tcp" (default) or "udp"
	Backends []string `json:"backends"`           // "10.250.1.5:8080", "[fd00::5]:8080"
}

// Limits is what every source's data is checked against before it enters
// the table. The zero value checks syntax only.
type Limits struct {
	// VIPRanges, when non-empty, holds every VIP ([bgp] vip_ranges).
	VIPRanges []netip.Prefix
	// Workload holds this host's workload CIDRs ([ipam] cidrs): a VIP
	// there would shadow an endpoint, so it is refused.
	Workload []netip.Prefix
	// MaxBackends caps one service's backends; 0 means DefaultMaxBackends.
	MaxBackends int
}

func (l Limits) maxBackends() int {
	if l.MaxBackends > 0 {
		return l.MaxBackends
	}
	return DefaultMaxBackends
}

// CheckName reports whether name can name a service (a store key segment,
// a metric label): letters, digits, '.', '-', '_', at most MaxNameLen.
func CheckName(name string) error {
	if len(name) == 0 || len(name) > MaxNameLen || !reName.MatchString(name) {
		return fmt.Errorf("%w %q: use letters, digits, '.', '-' and '_' (at most %d), starting with a letter or digit", ErrBadName, name, MaxNameLen)
	}
	return nil
}

// CheckVIP reports whether vip may be a service VIP under l.
func (l Limits) CheckVIP(vip netip.Addr) error {
	if !vip.IsValid() || vip.IsUnspecified() || vip.IsLoopback() || vip.IsMulticast() || vip.IsLinkLocalUnicast() || vip.Zone() != "" {
		return fmt.Errorf("%w %s: write a unicast address, e.g. 10.96.100.10", ErrBadVIP, vip)
	}
	vip = vip.Unmap()
	if len(l.VIPRanges) > 0 && !inAny(vip, l.VIPRanges) {
		return fmt.Errorf("%w: %s is in none of %v; add its range to [bgp] vip_ranges or fix the VIP", ErrVIPRange, vip, l.VIPRanges)
	}
	if inAny(vip, l.Workload) {
		return fmt.Errorf("%w %s: it lies in this host's [ipam] cidrs, where it would shadow an endpoint", ErrBadVIP, vip)
	}
	return nil
}

// CheckPort reports whether p is a usable L4 port.
func CheckPort(p int) error {
	if p < 1 || p > 65535 {
		return fmt.Errorf("%w %d: write 1..65535", ErrBadPort, p)
	}
	return nil
}

func inAny(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ParseBackend reads "ip:port" ("[v6]:port" for IPv6) as a backend address.
func ParseBackend(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return ap, fmt.Errorf("%w %q: write ip:port, e.g. \"10.250.1.5:8080\" or \"[fd00::5]:8080\"", ErrBadBackend, s)
	}
	if err := checkBackendAddr(ap.Addr()); err != nil {
		return ap, err
	}
	if err := CheckPort(int(ap.Port())); err != nil {
		return ap, fmt.Errorf("%w %q: %w", ErrBadBackend, s, err)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func checkBackendAddr(a netip.Addr) error {
	if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
		return fmt.Errorf("%w %s: a backend is a unicast address", ErrBadBackend, a)
	}
	return nil
}

// Check validates s under l without building a Service.
func (s Spec) Check(l Limits) error {
	_, _, err := s.Build(SourceConfig, l)
	return err
}

// Build turns s into a Service with every backend Active (an operator's
// backend has no health check of its own). A problem with the frontend or
// the name refuses the whole Spec (the error); a bad or duplicate backend,
// or one past the cap, is left out and described in skipped.
func (s Spec) Build(src Source, l Limits) (svc Service, skipped []string, err error) {
	if err := CheckName(s.Name); err != nil {
		return svc, nil, err
	}
	vip, err := netip.ParseAddr(s.VIP)
	if err != nil {
		return svc, nil, fmt.Errorf("%w %q: write an address, e.g. 10.96.100.10", ErrBadVIP, s.VIP)
	}
	if err := l.CheckVIP(vip); err != nil {
		return svc, nil, err
	}
	if err := CheckPort(s.Port); err != nil {
		return svc, nil, err
	}
	proto := TCP
	if s.Protocol != "" {
		if proto, err = ParseProto(s.Protocol); err != nil {
			return svc, nil, fmt.Errorf("%w: %w", ErrBadProtocol, err)
		}
	}
	svc = Service{Name: s.Name, Source: src, Frontend: Frontend{VIP: vip.Unmap(), Port: uint16(s.Port), Proto: proto}}
	seen := map[netip.AddrPort]bool{}
	for _, b := range s.Backends {
		ap, err := ParseBackend(b)
		if err != nil {
			skipped = append(skipped, err.Error())
			continue
		}
		if ap.Addr().Is4() != svc.Frontend.VIP.Is4() {
			skipped = append(skipped, fmt.Sprintf("backend %s: its address family differs from the VIP's", ap))
			continue
		}
		if seen[ap] {
			skipped = append(skipped, fmt.Sprintf("backend %s is listed twice", ap))
			continue
		}
		seen[ap] = true
		svc.Backends = append(svc.Backends, Backend{Addr: ap.Addr(), Port: ap.Port(), State: StateActive, Source: src})
	}
	var n int
	svc.Backends, n = Cap(svc.Backends, l.maxBackends())
	if n > 0 {
		skipped = append(skipped, fmt.Sprintf("%d backends past the cap of %d are not used", n, l.maxBackends()))
	}
	return svc, skipped, nil
}

// Cap keeps at most max backends, Active ones first, then in address
// order, and returns them sorted (SortBackends) with how many it dropped.
func Cap(bs []Backend, max int) ([]Backend, int) {
	if len(bs) <= max {
		SortBackends(bs)
		return bs, 0
	}
	sort.SliceStable(bs, func(i, j int) bool {
		ai, aj := bs[i].State == StateActive, bs[j].State == StateActive
		if ai != aj {
			return ai
		}
		return lessBackend(bs[i], bs[j])
	})
	n := len(bs) - max
	bs = bs[:max:max]
	SortBackends(bs)
	return bs, n
}

// SortBackends sorts by address, then port: the table's order.
func SortBackends(bs []Backend) {
	sort.Slice(bs, func(i, j int) bool { return lessBackend(bs[i], bs[j]) })
}

func lessBackend(a, b Backend) bool {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c < 0
	}
	return a.Port < b.Port
}

// SpecOf is the Spec that describes svc (its backends as ip:port).
func SpecOf(svc Service) Spec {
	s := Spec{Name: svc.Name, VIP: svc.Frontend.VIP.String(), Port: int(svc.Frontend.Port), Protocol: svc.Frontend.Proto.String(), Backends: []string{}}
	for _, b := range svc.Backends {
		s.Backends = append(s.Backends, b.AddrPort().String())
	}
	return s
}
