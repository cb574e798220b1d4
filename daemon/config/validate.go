package config

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/rackwire/rackwire/birdconf"
)

var (
	reNodeName  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	reCluster   = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)
	reProtoName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,31}$`)
	// reZoneWord: BIRD reads an address's zone as a plain word.
	reZoneWord  = regexp.MustCompile(`^[A-Za-z0-9_]+$`)
	reCommunity = regexp.MustCompile(`^\d+:\d+(:\d+)?$`)
	reLabelKey  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/:-]{0,252}\*?$`)
	// dockerDriverRE: the Docker driver name, the socket's base name.
	dockerDriverRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
)

const maxASN = 4294967295

// validate fills the per-entry defaults of repeated tables and returns every
// problem. Problems carry Key only; Parse adds file and line.
func (c *Config) validate() []Problem {
	var ps []Problem
	bad := func(key, format string, args ...any) {
		ps = append(ps, Problem{Key: key, Msg: fmt.Sprintf(format, args...)})
	}

	if c.Version != 1 {
		bad("version", "version %d is not supported; write `version = 1`", c.Version)
	}

	// [node]
	if c.Node.Name != "" && !reNodeName.MatchString(c.Node.Name) {
		bad("node.name", "%q is not a valid node name; use letters, digits, '.', '-', '_' (at most 63), or leave it empty for the hostname", c.Node.Name)
	}
	if !reCluster.MatchString(c.Node.Cluster) {
		bad("node.cluster", "%q is not a valid cluster name; use lower-case letters, digits and '-' (at most 32), e.g. \"default\"", c.Node.Cluster)
	}
	if c.Node.ClusterID < 1 || c.Node.ClusterID > 255 {
		bad("node.cluster_id", "%d is out of range; the cluster id is the upper 8 bits of every identity: write 1..255", c.Node.ClusterID)
	}
	for i, a := range c.Node.Addresses {
		if _, err := netip.ParseAddr(a); err != nil {
			bad(fmt.Sprintf("node.addresses[%d]", i), "%q is not an IP address; write e.g. \"10.1.1.10\" or \"2001:db8::10\"", a)
		}
	}

	// [agent]
	checkAbs := func(key, v string, required bool) {
		if v == "" {
			if required {
				bad(key, "must not be empty; write an absolute path")
			}
			return
		}
		if !filepath.IsAbs(v) {
			bad(key, "%q is not an absolute path; write it from / (e.g. %q)", v, "/"+strings.TrimLeft(v, "./"))
		}
	}
	checkAbs("agent.state_dir", c.Agent.StateDir, true)
	checkAbs("agent.socket", c.Agent.Socket, true)
	if g := c.Agent.AdminGroup; g != "" {
		var unknown user.UnknownGroupError
		if _, err := user.LookupGroup(g); errors.As(err, &unknown) {
			bad("agent.admin_group", "group %q does not exist on this host; create it (groupadd %s) or leave admin_group empty (then only root may change the agent)", g, g)
		} else if err != nil {
			bad("agent.admin_group", "cannot look up group %q: %v", g, err)
		}
	}

	// [ipam]
	if len(c.IPAM.CIDRs) == 0 {
		bad("ipam.cidrs", "at least one workload CIDR is required, e.g. cidrs = [\"10.250.1.0/24\"]")
	}
	var cidrs []netip.Prefix
	for i, s := range c.IPAM.CIDRs {
		key := fmt.Sprintf("ipam.cidrs[%d]", i)
		p, err := netip.ParsePrefix(s)
		if err != nil {
			bad(key, "%q is not a CIDR; write e.g. \"10.250.1.0/24\" or \"fd00:250:1::/112\"", s)
			continue
		}
		if p.Masked() != p {
			bad(key, "%q has host bits set; did you mean %q?", s, p.Masked().String())
			continue
		}
		if (p.Addr().Is4() && p.Bits() > 30) || (p.Addr().Is6() && p.Bits() > 126) {
			bad(key, "%q is too small to hand out workload addresses; use at most /30 (IPv4) or /126 (IPv6)", s)
			continue
		}
		for _, q := range cidrs {
			if q.Overlaps(p) {
				bad(key, "%q overlaps %q; workload CIDRs must be disjoint", s, q.String())
			}
		}
		cidrs = append(cidrs, p)
	}

	// [store]
	switch c.Store.Backend {
	case "local":
		checkAbs("store.path", c.Store.Path, false)
	case "consul":
		if _, _, err := net.SplitHostPort(c.Store.Address); err != nil {
			bad("store.address", "%q is not host:port; write e.g. \"127.0.0.1:8500\"", c.Store.Address)
		}
		for _, f := range []struct{ key, v string }{
			{"store.token_file", c.Store.TokenFile}, {"store.tls_ca_file", c.Store.TLSCAFile},
			{"store.tls_cert_file", c.Store.TLSCertFile}, {"store.tls_key_file", c.Store.TLSKeyFile},
		} {
			checkAbs(f.key, f.v, false)
		}
		if (c.Store.TLSCertFile == "") != (c.Store.TLSKeyFile == "") {
			bad("store.tls_cert_file", "tls_cert_file and tls_key_file go together; set both or neither")
		}
		c.validateConsulTransport(bad)
	default:
		bad("store.backend", "%q is not a store backend; write \"local\" (embedded, one host) or \"consul\"", c.Store.Backend)
	}
	if c.Store.Scheme != "http" && c.Store.Scheme != "https" {
		bad("store.scheme", "%q is not a scheme; write \"http\" or \"https\"", c.Store.Scheme)
	}
	if c.Store.Prefix == "" || strings.HasPrefix(c.Store.Prefix, "/") || !strings.HasSuffix(c.Store.Prefix, "/") {
		bad("store.prefix", "%q is not a key prefix; write a relative prefix that ends in '/', e.g. \"rackwire/\"", c.Store.Prefix)
	}
	if d := c.Store.SessionTTL.Duration; d < 10*time.Second || d > 24*time.Hour {
		bad("store.session_ttl", "%s is out of range; Consul accepts 10s..24h (86400s); the default is \"24h\"", d)
	}
	if c.Store.ListTimeout.Duration <= 0 {
		bad("store.list_timeout", "must be more than zero; large fleets use \"3h\"")
	}
	if c.Store.IPCacheSync != "list" && c.Store.IPCacheSync != "log" {
		bad("store.ipcache_sync", "%q is not a sync mode; write \"list\" (every release) or \"log\" (once every host writes the change log)", c.Store.IPCacheSync)
	}
	if d := c.Store.IPCacheLogKeep.Duration; d < 5*time.Second || d > time.Hour {
		bad("store.ipcache_log_keep", "%s is out of range; write 5s..1h (default \"2m\")", d)
	}

	// [datapath]
	checkAbs("datapath.pin_dir", c.Datapath.PinDir, true)
	checkAbs("datapath.policy_dir", c.Datapath.PolicyDir, false)
	switch c.Datapath.Attach {
	case "auto", "tcx", "tc":
	default:
		bad("datapath.attach", "%q is not an attach mode; write \"auto\", \"tcx\" or \"tc\" (legacy clsact)", c.Datapath.Attach)
	}
	for i, l := range c.Datapath.IdentityLabels {
		if !reLabelKey.MatchString(l) {
			bad(fmt.Sprintf("datapath.identity_labels[%d]", i), "%q is not a label key or \"prefix*\"", l)
		}
	}
	checkRange := func(key string, v, lo, hi int) {
		if v < lo || v > hi {
			bad(key, "%d is out of range; write %d..%d", v, lo, hi)
		}
	}
	checkRange("datapath.ct_max_entries", c.Datapath.CTMaxEntries, 1024, 1<<26)
	checkRange("datapath.ct_other_max_entries", c.Datapath.CTOtherMaxEntries, 1024, 1<<26)
	c.validateCTTimeouts(bad)
	checkRange("datapath.policy_max_entries", c.Datapath.PolicyMaxEntries, 16, 1<<20)
	checkRange("datapath.ipcache_max_entries", c.Datapath.IPCacheMaxEntries, 1024, 1<<24)
	checkRange("datapath.frag_max_entries", c.Datapath.FragMaxEntries, 256, 1<<20)
	switch c.Datapath.Events {
	case "auto", "ringbuf", "perf":
	default:
		bad("datapath.events", "%q is not an event transport; write \"auto\", \"ringbuf\" (kernel 5.8+) or \"perf\" (perf event array)", c.Datapath.Events)
	}
	// Events per second and burst per endpoint: at least one, and at most
	// what one reader decodes (a million a second).
	checkRange("datapath.events_rate", int(c.Datapath.EventsRate), 1, 1_000_000)
	checkRange("datapath.events_burst", int(c.Datapath.EventsBurst), 1, 1_000_000)
	switch c.Datapath.HostRouting {
	case "auto", "bpf", "legacy":
	default:
		bad("datapath.host_routing", "%q is not a host routing mode; write \"auto\", \"bpf\" (kernel 5.12+) or \"legacy\" (the host stack)", c.Datapath.HostRouting)
	}
	for i, u := range c.Datapath.Uplinks {
		if u == "" || len(u) > 15 || strings.ContainsAny(u, "/ \t\n") {
			bad(fmt.Sprintf("datapath.uplinks[%d]", i), "%q is not a network device name", u)
		}
	}
	if p := c.Datapath.ServiceCgroup; p != "" && !filepath.IsAbs(p) {
		bad("datapath.service_cgroup", "%q is not an absolute path; write a cgroup-v2 directory (default /sys/fs/cgroup) or \"\" to turn service load balancing off", p)
	}
	checkRange("datapath.service_max_entries", c.Datapath.ServiceMaxEntries, 16, 1<<20)
	checkRange("datapath.service_backend_max_entries", c.Datapath.ServiceBackendMaxEntries, 16, 1<<22)

	// [bgp]
	c.validateBGP(bad, cidrs)

	// [[services]]
	c.validateServices(bad, cidrs)

	// [restart]
	if c.Restart.FleetSize < 1 || c.Restart.FleetSize > 1_000_000 {
		bad("restart.fleet_size", "%d is out of range; write the number of hosts in the fleet (1..1000000)", c.Restart.FleetSize)
	}
	if c.Restart.JitterWindow.Duration > 24*time.Hour {
		bad("restart.jitter_window", "%s is longer than a day; write e.g. \"20m\", or \"0s\" to disable the gate", c.Restart.JitterWindow.Duration)
	}
	if c.Restart.BackoffMin.Duration <= 0 {
		bad("restart.backoff_min", "must be more than zero, e.g. \"10s\"")
	}
	if c.Restart.BackoffMax.Duration < c.Restart.BackoffMin.Duration {
		bad("restart.backoff_max", "%s is less than backoff_min %s", c.Restart.BackoffMax.Duration, c.Restart.BackoffMin.Duration)
	}

	// [metrics]
	if c.Metrics.Listen != "" {
		if _, port, err := net.SplitHostPort(c.Metrics.Listen); err != nil || port == "" {
			bad("metrics.listen", "%q is not host:port; write e.g. \"127.0.0.1:9962\", or \"\" to disable", c.Metrics.Listen)
		}
	}

	// [docker]
	if c.Docker.Enabled {
		checkAbs("docker.socket", c.Docker.Socket, true)
		checkAbs("docker.engine_socket", c.Docker.EngineSocket, true)
		if name, ok := strings.CutSuffix(filepath.Base(c.Docker.Socket), ".sock"); !ok || !dockerDriverRE.MatchString(name) {
			bad("docker.socket", "%q does not end in NAME.sock with a driver NAME of lower-case letters, digits, '-', '_' or '.'; write e.g. \"/run/docker/plugins/rackwire.sock\"", c.Docker.Socket)
		}
	}

	// [log]
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not a level; write \"debug\", \"info\", \"warn\" or \"error\"", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "json", "text":
	default:
		bad("log.format", "%q is not a format; write \"auto\", \"json\" or \"text\"", c.Log.Format)
	}
	return ps
}

func (c *Config) validateBGP(bad func(key, format string, args ...any), cidrs []netip.Prefix) {
	b := &c.BGP
	checkASN := func(key string, v int64) {
		if v < 1 || v > maxASN {
			bad(key, "%d is not an ASN; write 1..4294967295 (private: 64512..65534 or 4200000000..4294967294)", v)
		}
	}
	checkASN("bgp.local_asn", b.LocalASN)
	if b.RouterID != "" {
		if a, err := netip.ParseAddr(b.RouterID); err != nil || !a.Is4() {
			bad("bgp.router_id", "%q is not an IPv4 address; BIRD's router id is written like one, e.g. \"10.1.1.10\"", b.RouterID)
		}
	}
	if b.BirdBinary == "" {
		bad("bgp.bird_binary", "must not be empty; write \"bird\" or its absolute path")
	}
	checkPrefixes := func(key string, list []string) []netip.Prefix {
		var out []netip.Prefix
		for i, s := range list {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				if a, aerr := netip.ParseAddr(s); aerr == nil {
					bad(fmt.Sprintf("%s[%d]", key, i), "%q is an address, not a prefix; did you mean %q?", s, netip.PrefixFrom(a, a.BitLen()).String())
				} else {
					bad(fmt.Sprintf("%s[%d]", key, i), "%q is not a prefix; write e.g. \"10.96.100.10/32\"", s)
				}
				continue
			}
			if p.Masked() != p {
				bad(fmt.Sprintf("%s[%d]", key, i), "%q has host bits set; did you mean %q?", s, p.Masked().String())
				continue
			}
			out = append(out, p)
		}
		return out
	}
	ranges := checkPrefixes("bgp.vip_ranges", b.VIPRanges)
	vips := checkPrefixes("bgp.vips", b.VIPs)
	checkPrefixes("bgp.import", b.Import)
	checkPrefixes("bgp.drain_keep", b.DrainKeep)
	for i, v := range vips {
		if len(ranges) > 0 && !containedIn(v, ranges) {
			bad(fmt.Sprintf("bgp.vips[%d]", i), "%q is outside every bgp.vip_ranges entry; add its range or fix the VIP", v.String())
		}
		if containedIn(v, cidrs) {
			bad(fmt.Sprintf("bgp.vips[%d]", i), "%q lies inside this host's workload CIDR; a VIP must not overlap [ipam] cidrs", v.String())
		}
	}
	checkCommunities := func(key string, list []string) {
		for i, s := range list {
			if !validCommunity(s) {
				bad(fmt.Sprintf("%s[%d]", key, i), "%q is not a community; write \"65000:100\" (standard) or \"4200000000:1:2\" (large)", s)
			}
		}
	}
	checkCommunities("bgp.communities", b.Communities)

	names := map[string]bool{}
	for i := range b.Peers {
		p := &b.Peers[i]
		key := fmt.Sprintf("bgp.peers[%d]", i)
		if p.Name == "" {
			p.Name = "peer" + itoa(i+1)
		}
		if !reProtoName.MatchString(p.Name) {
			bad(key+".name", "%q is not usable as a BIRD protocol name; use letters, digits and '_' starting with a letter, e.g. \"tor_a\"", p.Name)
		} else if birdconf.IsBirdWord(p.Name) {
			bad(key+".name", "%q is a word BIRD reserves (a keyword or predefined symbol); pick another, e.g. \"%s_1\"", p.Name, p.Name)
		}
		if names[p.Name] {
			bad(key+".name", "%q is used by another peer; peer names must be unique", p.Name)
		}
		names[p.Name] = true
		if a, err := netip.ParseAddr(p.Address); err != nil {
			bad(key+".address", "%q is not an IP address; write the router's address, e.g. \"10.1.1.1\"", p.Address)
		} else if z := a.Zone(); z != "" && !reZoneWord.MatchString(z) {
			bad(key+".address", "zone %q: BIRD takes only letters, digits and '_' after the %%; name the link so, or give a global address", z)
		}
		checkASN(key+".asn", p.ASN)
		if p.SourceAddress != "" {
			if _, err := netip.ParseAddr(p.SourceAddress); err != nil {
				bad(key+".source_address", "%q is not an IP address", p.SourceAddress)
			}
		}
		if p.Multihop > 0 && p.BFD && p.SourceAddress == "" {
			bad(key+".source_address", "a multihop peer with bfd = true needs source_address (BIRD refuses multihop BFD without it)")
		}
		if p.Multihop < 0 || p.Multihop > 255 {
			bad(key+".multihop", "%d is out of range; write 0 (directly connected) or a TTL 1..255", p.Multihop)
		}
		if p.BFDMultiplier == 0 {
			p.BFDMultiplier = 3
		}
		if !p.BFDMinRx.Set {
			p.BFDMinRx = D(100 * time.Millisecond)
		}
		if !p.BFDMinTx.Set {
			p.BFDMinTx = D(100 * time.Millisecond)
		}
		if p.BFDMultiplier < 1 || p.BFDMultiplier > 255 {
			bad(key+".bfd_multiplier", "%d is out of range; write 1..255", p.BFDMultiplier)
		}
		if p.BFDMinRx.Duration < time.Millisecond || p.BFDMinTx.Duration < time.Millisecond {
			bad(key+".bfd_min_rx", "BFD intervals must be at least 1ms")
		}
		if p.HoldTime != 0 && (p.HoldTime < 3 || p.HoldTime > 65535) {
			bad(key+".hold_time", "%d is out of range; write 0 (BIRD's default) or 3..65535 seconds", p.HoldTime)
		}
		if p.KeepaliveTime != 0 && (p.KeepaliveTime < 1 || p.KeepaliveTime*3 > cmp.Or(p.HoldTime, 240)) {
			bad(key+".keepalive_time", "%d is out of range; write 1 second or more and at most a third of hold_time (BIRD's default hold time is 240)", p.KeepaliveTime)
		}
		if p.LocalPref < 0 || p.LocalPref > maxASN {
			bad(key+".local_pref", "%d is out of range; write 0..4294967295", p.LocalPref)
		}
		if p.PasswordFile != "" {
			if !filepath.IsAbs(p.PasswordFile) {
				bad(key+".password_file", "%q is not an absolute path", p.PasswordFile)
			} else if pw, err := os.ReadFile(p.PasswordFile); err != nil {
				bad(key+".password_file", "cannot read %s: %v; the file must exist and be readable by the agent", p.PasswordFile, unwrapPathErr(err))
			} else if strings.ContainsAny(strings.TrimRight(string(pw), "\r\n"), "\"\\\n") {
				bad(key+".password_file", "the password in %s contains a quote, a backslash or a line break, which BIRD cannot take; choose another password", p.PasswordFile)
			}
		}
		checkCommunities(key+".communities", p.Communities)
	}

	vipSet := map[netip.Prefix]bool{}
	for _, v := range vips {
		vipSet[v] = true
	}
	for i := range b.VIPHealth {
		h := &b.VIPHealth[i]
		key := fmt.Sprintf("bgp.vip_health[%d]", i)
		if p, err := netip.ParsePrefix(h.VIP); err != nil || !vipSet[p] {
			bad(key+".vip", "%q is not one of bgp.vips; a health check belongs to a configured VIP", h.VIP)
		}
		if h.Type == "" {
			h.Type = "tcp"
		}
		if h.Type != "tcp" && h.Type != "http" {
			bad(key+".type", "%q is not a check type; write \"tcp\" or \"http\"", h.Type)
		}
		if _, port, err := net.SplitHostPort(h.Target); err != nil || port == "" {
			bad(key+".target", "%q is not host:port; write the local backend, e.g. \"127.0.0.1:8080\"", h.Target)
		}
		if !h.Interval.Set {
			h.Interval = D(time.Second)
		}
		if !h.Timeout.Set {
			h.Timeout = D(time.Second)
		}
		if h.Rise == 0 {
			h.Rise = 2
		}
		if h.Fall == 0 {
			h.Fall = 3
		}
		if h.Rise < 1 || h.Fall < 1 || h.Rise > 100 || h.Fall > 100 {
			bad(key+".rise", "rise and fall must be 1..100")
		}
		if h.Interval.Duration < 10*time.Millisecond {
			bad(key+".interval", "must be at least 10ms")
		}
		if h.Type == "http" && h.Path == "" {
			h.Path = "/"
		}
		checkCommunities(key+".communities", h.Communities)
	}
}

func validCommunity(s string) bool {
	if !reCommunity.MatchString(s) {
		return false
	}
	parts := strings.Split(s, ":")
	limit := uint64(65535)
	if len(parts) == 3 {
		limit = maxASN
	}
	for _, p := range parts {
		v, err := strconv.ParseUint(p, 10, 64)
		if err != nil || v > limit {
			return false
		}
	}
	return true
}

func containedIn(p netip.Prefix, list []netip.Prefix) bool {
	for _, r := range list {
		if r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// validateCTTimeouts checks the connection-tracking lifetimes: each within
// its range, and a closing or SYN-only connection never outliving an
// established one.
func (c *Config) validateCTTimeouts(bad func(key, format string, args ...any)) {
	d := c.Datapath
	for _, t := range []struct {
		key    string
		v      Duration
		lo, hi time.Duration
	}{
		{"datapath.ct_timeout_tcp", d.CTTimeoutTCP, time.Minute, 7 * 24 * time.Hour},
		{"datapath.ct_timeout_tcp_syn", d.CTTimeoutTCPSYN, time.Second, time.Hour},
		{"datapath.ct_timeout_tcp_close", d.CTTimeoutTCPClose, time.Second, time.Hour},
		{"datapath.ct_timeout_other", d.CTTimeoutOther, time.Second, 24 * time.Hour},
	} {
		if t.v.Duration < t.lo || t.v.Duration > t.hi {
			bad(t.key, "%s is out of range; write a duration from %s to %s (e.g. \"%s\")", t.v.Duration, t.lo, t.hi, t.lo)
		}
	}
	for _, t := range []struct {
		key string
		v   Duration
	}{{"datapath.ct_timeout_tcp_syn", d.CTTimeoutTCPSYN}, {"datapath.ct_timeout_tcp_close", d.CTTimeoutTCPClose}} {
		if t.v.Duration > d.CTTimeoutTCP.Duration {
			bad(t.key, "%s is longer than datapath.ct_timeout_tcp %s; a SYN-only or closing connection must not outlive an established one", t.v.Duration, d.CTTimeoutTCP.Duration)
		}
	}
}
