// Package config is rackwired's configuration: the TOML file that Salt renders
// per host (/etc/rackwire/rackwire.toml), its defaults, and its validation.
//
// The data it owns is a plain value (Config) with no behaviour beyond
// Validate: the daemon loads it once at start and again on SIGHUP, and the
// components receive the parts they need. Loading is strict: an unknown key, a
// wrong type or a bad value is an error that names the file and line and says
// what to write instead, so a typo can never silently change behaviour. A
// failed load never returns a partially filled Config.
//
// Any package may import config; config imports nothing of rackwire's.
package config

import (
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// DefaultPath is where the daemon and the CLI look for the config file.
const DefaultPath = "/etc/rackwire/rackwire.toml"

// Config is the whole file. The TOML key names are a contract shared with the
// Salt formula, the docs and the tests: add keys, never rename them.
type Config struct {
	Version  int      `toml:"version" json:"version"`
	Node     Node     `toml:"node" json:"node"`
	Agent    Agent    `toml:"agent" json:"agent"`
	IPAM     IPAM     `toml:"ipam" json:"ipam"`
	Store    Store    `toml:"store" json:"store"`
	Datapath Datapath `toml:"datapath" json:"datapath"`
	BGP      BGP      `toml:"bgp" json:"bgp"`
	Restart  Restart  `toml:"restart" json:"restart"`
	Metrics  Metrics  `toml:"metrics" json:"metrics"`
	Log      Log      `toml:"log" json:"log"`
	Docker   Docker   `toml:"docker" json:"docker"`
	// Services are this host's [[services]] (docs/services.md).
	Services []Service `toml:"services" json:"services"`

	// File is the path the config was loaded from ("" for defaults only).
	File string `toml:"-" json:"file"`
}

// Node identifies this host in the cluster.
type Node struct {
	Name      string   `toml:"name" json:"name"`
	Cluster   string   `toml:"cluster" json:"cluster"`
	ClusterID int      `toml:"cluster_id" json:"cluster_id"`
	Addresses []string `toml:"addresses" json:"addresses"`
}

// Agent holds the daemon's local paths.
type Agent struct {
	StateDir    string `toml:"state_dir" json:"state_dir"`
	Socket      string `toml:"socket" json:"socket"`
	SocketGroup string `toml:"socket_group" json:"socket_group"`
	// AdminGroup's members may change the agent through the API, like
	// root; "" = only root (docs/security.md).
	AdminGroup string `toml:"admin_group" json:"admin_group"`
}

// IPAM holds the workload CIDRs this host hands out addresses from.
type IPAM struct {
	CIDRs []string `toml:"cidrs" json:"cidrs"`
}

// Store selects and configures the key-value store. Secrets are never
// in it: TokenFile names the file that holds the ACL token, so printing or
// serving a Config shows the path, never the token.
type Store struct {
	Backend       string   `toml:"backend" json:"backend"`
	Path          string   `toml:"path" json:"path"`
	Address       string   `toml:"address" json:"address"`
	Scheme        string   `toml:"scheme" json:"scheme"`
	Datacenter    string   `toml:"datacenter" json:"datacenter"`
	TokenFile     string   `toml:"token_file" json:"token_file"`
	TLSCAFile     string   `toml:"tls_ca_file" json:"tls_ca_file"`
	TLSCertFile   string   `toml:"tls_cert_file" json:"tls_cert_file"`
	TLSKeyFile    string   `toml:"tls_key_file" json:"tls_key_file"`
	TLSServerName string   `toml:"tls_server_name" json:"tls_server_name"`
	Prefix        string   `toml:"prefix" json:"prefix"`
	SessionTTL    Duration `toml:"session_ttl" json:"session_ttl"`
	ListTimeout   Duration `toml:"list_timeout" json:"list_timeout"`
	// IPCacheSync is how the other hosts' ipcache entries are followed:
	// "log" (the default) lists once and follows the change log that
	// this release writes, and lists on every change by itself while a
	// host of the fleet does not write the log (an older release);
	// "list" re-lists the ipcache prefix on every change (docs/scale.md).
	IPCacheSync string `toml:"ipcache_sync" json:"ipcache_sync"`
	// IPCacheLogKeep is how long a change-log entry stays before the
	// elected pruner deletes it; an agent further behind lists again.
	IPCacheLogKeep Duration `toml:"ipcache_log_keep" json:"ipcache_log_keep"`
	// AllowInsecure allows the ACL token over plain http to a Consul
	// agent that is not on loopback (a trusted network only).
	AllowInsecure bool `toml:"allow_insecure" json:"allow_insecure"`
	// Gzip asks Consul to compress its answers. Off by default: the
	// local Consul agent is on loopback, where compressing costs CPU on
	// both ends and saves nothing (at a fleet's cold start, gzip was a
	// third of the Consul servers' CPU); on for an agent that reaches
	// Consul over a slow link.
	Gzip bool `toml:"gzip" json:"gzip"`
}

// Datapath configures the eBPF datapath.
type Datapath struct {
	PinDir          string   `toml:"pin_dir" json:"pin_dir"`
	Attach          string   `toml:"attach" json:"attach"`
	PolicyAuditMode bool     `toml:"policy_audit_mode" json:"policy_audit_mode"`
	IdentityLabels  []string `toml:"identity_labels" json:"identity_labels"`
	CTMaxEntries    int      `toml:"ct_max_entries" json:"ct_max_entries"`
	// Connection tracking: non-TCP map size and idle lifetimes.
	CTOtherMaxEntries int      `toml:"ct_other_max_entries" json:"ct_other_max_entries"`
	CTTimeoutTCP      Duration `toml:"ct_timeout_tcp" json:"ct_timeout_tcp"`
	CTTimeoutTCPSYN   Duration `toml:"ct_timeout_tcp_syn" json:"ct_timeout_tcp_syn"`
	CTTimeoutTCPClose Duration `toml:"ct_timeout_tcp_close" json:"ct_timeout_tcp_close"`
	CTTimeoutOther    Duration `toml:"ct_timeout_other" json:"ct_timeout_other"`
	PolicyMaxEntries  int      `toml:"policy_max_entries" json:"policy_max_entries"`
	IPCacheMaxEntries int      `toml:"ipcache_max_entries" json:"ipcache_max_entries"`
	FragMaxEntries    int      `toml:"frag_max_entries" json:"frag_max_entries"`
	PolicyDir         string   `toml:"policy_dir" json:"policy_dir"`
	// Events is the event transport: "auto" (ring buffer where the kernel
	// has one, else perf event array), "ringbuf" or "perf".
	Events string `toml:"events" json:"events"`
	// EventsRate and EventsBurst limit each endpoint's events (drops,
	// audit, traces): per second, and bucket size. Packets are not limited.
	EventsRate  uint32 `toml:"events_rate" json:"events_rate"`
	EventsBurst uint32 `toml:"events_burst" json:"events_burst"`
	// HostRouting: "auto" (BPF where the kernel has the helpers), "bpf"
	// or "legacy": whether traffic to and from other hosts bypasses the
	// host's routing and netfilter (docs/datapath.md "Host routing").
	HostRouting string `toml:"host_routing" json:"host_routing"`
	// Uplinks are the devices rw_from_uplink attaches to with host routing
	// "bpf"; empty: the devices of the default routes.
	Uplinks []string `toml:"uplinks" json:"uplinks"`
	// ServiceCgroup is the cgroup-v2 directory whose processes' sockets
	// are service-balanced (connect-time translation of VIPs); "" turns
	// service load balancing off. ServiceMaxEntries bounds the frontends,
	// ServiceBackendMaxEntries the distinct backends.
	ServiceCgroup            string `toml:"service_cgroup" json:"service_cgroup"`
	ServiceMaxEntries        int    `toml:"service_max_entries" json:"service_max_entries"`
	ServiceBackendMaxEntries int    `toml:"service_backend_max_entries" json:"service_backend_max_entries"`
}

// BGP configures the BIRD integration.
type BGP struct {
	Enabled    bool     `toml:"enabled" json:"enabled"`
	BirdConfig string   `toml:"bird_config" json:"bird_config"`
	BirdSocket string   `toml:"bird_socket" json:"bird_socket"`
	BirdBinary string   `toml:"bird_binary" json:"bird_binary"`
	RouterID   string   `toml:"router_id" json:"router_id"`
	LocalASN   int64    `toml:"local_asn" json:"local_asn"`
	VIPs       []string `toml:"vips" json:"vips"`
	// VIPRanges, when set, is the set of prefixes every VIP must fall in.
	VIPRanges []string `toml:"vip_ranges" json:"vip_ranges"`
	// Import is what BIRD may install from the routers (default: the
	// default routes only).
	Import []string `toml:"import" json:"import"`
	// DrainKeep lists prefixes still announced while drained.
	DrainKeep   []string    `toml:"drain_keep" json:"drain_keep"`
	Communities []string    `toml:"communities" json:"communities"`
	Peers       []Peer      `toml:"peers" json:"peers"`
	VIPHealth   []VIPHealth `toml:"vip_health" json:"vip_health"`
	// AnnounceServiceVIPs announces the VIP of every service that has an
	// active backend on this host, and withdraws it when none is left.
	AnnounceServiceVIPs bool `toml:"announce_service_vips" json:"announce_service_vips"`
}

// Service is one [[services]] table: a VIP balanced over fixed backends.
type Service struct {
	Name     string   `toml:"name" json:"name"`
	VIP      string   `toml:"vip" json:"vip"`
	Port     int      `toml:"port" json:"port"`
	Protocol string   `toml:"protocol" json:"protocol"` // "tcp" (default) or "udp"
	Backends []string `toml:"backends" json:"backends"` // "ip:port"
}

// Peer is one BGP neighbour, typically a top-of-rack router.
type Peer struct {
	Name            string   `toml:"name" json:"name"`
	Address         string   `toml:"address" json:"address"`
	ASN             int64    `toml:"asn" json:"asn"`
	SourceAddress   string   `toml:"source_address" json:"source_address"`
	Multihop        int      `toml:"multihop" json:"multihop"`
	BFD             bool     `toml:"bfd" json:"bfd"`
	BFDMinRx        Duration `toml:"bfd_min_rx" json:"bfd_min_rx"`
	BFDMinTx        Duration `toml:"bfd_min_tx" json:"bfd_min_tx"`
	BFDMultiplier   int      `toml:"bfd_multiplier" json:"bfd_multiplier"`
	GracefulRestart bool     `toml:"graceful_restart" json:"graceful_restart"`
	HoldTime        int      `toml:"hold_time" json:"hold_time"`
	KeepaliveTime   int      `toml:"keepalive_time" json:"keepalive_time"`
	PasswordFile    string   `toml:"password_file" json:"password_file"`
	Communities     []string `toml:"communities" json:"communities"`
	LocalPref       int      `toml:"local_pref" json:"local_pref"`
}

// VIPHealth is the health check that decides whether a VIP is announced.
type VIPHealth struct {
	VIP         string   `toml:"vip" json:"vip"`
	Type        string   `toml:"type" json:"type"` // "tcp" or "http"
	Target      string   `toml:"target" json:"target"`
	Path        string   `toml:"path" json:"path"`
	Interval    Duration `toml:"interval" json:"interval"`
	Timeout     Duration `toml:"timeout" json:"timeout"`
	Rise        int      `toml:"rise" json:"rise"`
	Fall        int      `toml:"fall" json:"fall"`
	Communities []string `toml:"communities" json:"communities"`
	LocalPref   int      `toml:"local_pref" json:"local_pref"`
}

// Restart configures the prestart jitter and backoff gate.
type Restart struct {
	FleetSize    int      `toml:"fleet_size" json:"fleet_size"`
	JitterWindow Duration `toml:"jitter_window" json:"jitter_window"`
	BackoffMin   Duration `toml:"backoff_min" json:"backoff_min"`
	BackoffMax   Duration `toml:"backoff_max" json:"backoff_max"`
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Listen string `toml:"listen" json:"listen"`
}

// Docker configures the Docker network and IPAM driver (docs/containers.md).
// The driver's name, for `docker network create --driver`, is the base name
// of Socket without ".sock".
type Docker struct {
	Enabled bool `toml:"enabled" json:"enabled"`
	// Socket is where the agent serves Docker's plugin protocol; dockerd
	// finds plugins under /run/docker/plugins.
	Socket string `toml:"socket" json:"socket"`
	// EngineSocket is the Docker Engine API the agent reads container
	// labels from.
	EngineSocket string `toml:"engine_socket" json:"engine_socket"`
}

// Log configures logging.
type Log struct {
	Level  string `toml:"level" json:"level"`
	Format string `toml:"format" json:"format"`
}

// Duration is a time.Duration written as a Go duration string ("24h",
// "10s"). The zero Duration with Set false means "not written".
type Duration struct {
	time.Duration
	Set bool
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "" {
		*d = Duration{}
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration; write it like \"30s\", \"10m\" or \"24h\"", s)
	}
	if v < 0 {
		return fmt.Errorf("%q is negative; durations must be zero or more", s)
	}
	*d = Duration{Duration: v, Set: true}
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) {
	if !d.Set {
		return []byte(""), nil
	}
	return []byte(d.Duration.String()), nil
}

// D is a shorthand for a set Duration.
func D(v time.Duration) Duration { return Duration{Duration: v, Set: true} }

// Default returns the configuration used for every key the file omits.
// Host-dependent defaults (node name, addresses) are filled by Resolve.
func Default() Config {
	return Config{
		Version: 1,
		Node:    Node{Cluster: "default", ClusterID: 1, Addresses: []string{}},
		Agent: Agent{
			StateDir:    "/var/lib/rackwire",
			Socket:      "/run/rackwire/rackwire.sock",
			SocketGroup: "rackwire",
		},
		IPAM: IPAM{CIDRs: []string{"10.250.1.0/24"}},
		Store: Store{
			Backend:     "local",
			Address:     "127.0.0.1:8500",
			Scheme:      "http",
			Prefix:      "rackwire/",
			SessionTTL:  D(24 * time.Hour),
			ListTimeout: D(3 * time.Hour),
			IPCacheSync: "log", IPCacheLogKeep: D(2 * time.Minute),
		},
		Datapath: Datapath{
			PinDir:            "/sys/fs/bpf/rackwire",
			Attach:            "auto",
			IdentityLabels:    []string{},
			CTMaxEntries:      524288,
			CTOtherMaxEntries: 262144,
			CTTimeoutTCP:      D(6 * time.Hour),
			CTTimeoutTCPSYN:   D(60 * time.Second),
			CTTimeoutTCPClose: D(10 * time.Second),
			CTTimeoutOther:    D(60 * time.Second),
			PolicyMaxEntries:  16384,
			IPCacheMaxEntries: 524288,
			FragMaxEntries:    8192,
			PolicyDir:         "/etc/rackwire/policies.d",
			Events:            "auto",
			EventsRate:        100,
			EventsBurst:       1000,
			HostRouting:       "auto",

			ServiceCgroup:            "/sys/fs/cgroup",
			ServiceMaxEntries:        65536,
			ServiceBackendMaxEntries: 65536,
		},
		BGP: BGP{
			BirdConfig: "/etc/bird/bird.conf",
			BirdSocket: "/run/bird/bird.ctl",
			BirdBinary: "bird",
			LocalASN:   65101,
			VIPs:       []string{},
			Import:     []string{"0.0.0.0/0", "::/0"},
		},
		Restart: Restart{
			FleetSize:  1000,
			BackoffMin: D(10 * time.Second),
			BackoffMax: D(30 * time.Minute),
		},
		Metrics: Metrics{Listen: "127.0.0.1:9962"},
		Log:     Log{Level: "info", Format: "auto"},
		Docker:  Docker{Socket: "/run/docker/plugins/rackwire.sock", EngineSocket: "/var/run/docker.sock"},
	}
}

// StorePath is the local store's file: [store] path or <state_dir>/store.db.
func (c *Config) StorePath() string {
	if c.Store.Path != "" {
		return c.Store.Path
	}
	return strings.TrimRight(c.Agent.StateDir, "/") + "/store.db"
}

// Prefixes returns the parsed [ipam] cidrs. Validate guarantees they parse.
func (c *Config) Prefixes() []netip.Prefix {
	out := make([]netip.Prefix, 0, len(c.IPAM.CIDRs))
	for _, s := range c.IPAM.CIDRs {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
		}
	}
	return out
}
