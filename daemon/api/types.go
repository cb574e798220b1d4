package api

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Status is what `rackwire status --json` prints.
type Status struct {
	Agent      AgentStatus     `json:"agent"`
	Store      Component       `json:"store"`
	Datapath   Component       `json:"datapath"`
	BGP        Component       `json:"bgp"`
	Endpoints  Component       `json:"endpoints"`
	Identities Component       `json:"identities"`
	Policy     Component       `json:"policy"`
	Kernel     []KernelFeature `json:"kernel_features"`
}

// AgentStatus describes the running agent.
type AgentStatus struct {
	Version     string    `json:"version"`
	Commit      string    `json:"commit,omitempty"`
	PID         int       `json:"pid"`
	StartedAt   time.Time `json:"started_at"`
	Uptime      string    `json:"uptime"`
	ConfigFile  string    `json:"config_file"`
	Node        string    `json:"node"`
	Cluster     string    `json:"cluster"`
	ClusterID   int       `json:"cluster_id"`
	Reloads     int       `json:"reloads"`
	LastReload  string    `json:"last_reload,omitempty"`
	ReloadError string    `json:"reload_error,omitempty"`
}

// Component is one subsystem's state in `rackwire status`.
type Component struct {
	// State is "ok", "degraded", "connecting", "disabled" or "unavailable".
	State   string            `json:"state"`
	Message string            `json:"message,omitempty"`
	Since   *time.Time        `json:"since,omitempty"`
	Detail  map[string]string `json:"detail,omitempty"`
}

// Component states.
const (
	StateOK          = "ok"
	StateDegraded    = "degraded"
	StateConnecting  = "connecting"
	StateDisabled    = "disabled"
	StateUnavailable = "unavailable"
)

// KernelFeature is one probed kernel capability and what the agent does
// without it.
type KernelFeature struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Fallback  string `json:"fallback,omitempty"`
}

// Endpoint is one workload on this host.
type Endpoint struct {
	ID             uint16    `json:"id"`
	Name           string    `json:"name"`
	Netns          string    `json:"netns"`
	State          string    `json:"state"`
	Labels         string    `json:"labels"`
	IdentityLabels string    `json:"identity_labels"`
	Identity       uint32    `json:"identity"`
	IPv4           string    `json:"ipv4,omitempty"`
	IPv6           string    `json:"ipv6,omitempty"`
	HostIfName     string    `json:"host_ifname"`
	HostIfIndex    int       `json:"host_ifindex"`
	MAC            string    `json:"mac"`
	Audit          bool      `json:"audit"`
	Created        time.Time `json:"created"`
	// PolicyReason says why the state is policy-error or policy-pending:
	// which directions are closed and what to do.
	PolicyReason string `json:"policy_reason,omitempty"`

	// IfName is the interface in the endpoint's namespace; HostMAC the
	// host side's MAC. ContainerID and Network are the container
	// runtime's, for endpoints a runtime plugged (CNI, Docker).
	IfName      string `json:"ifname"`
	HostMAC     string `json:"host_mac"`
	ContainerID string `json:"container_id,omitempty"`
	Network     string `json:"network,omitempty"`
	// Gateways and Routes are what the endpoint's namespace routes
	// through: one gateway per family (a link-local address answered by
	// the host side) and a default route through each.
	GatewayIPv4 string          `json:"gateway_ipv4,omitempty"`
	GatewayIPv6 string          `json:"gateway_ipv6,omitempty"`
	Routes      []EndpointRoute `json:"routes,omitempty"`
}

// EndpointRoute is a route in an endpoint's namespace.
type EndpointRoute struct {
	Dst string `json:"dst"`
	Via string `json:"via"`
}

// EndpointAdd is the body of POST /v1/endpoints.
type EndpointAdd struct {
	Name   string `json:"name"`
	Netns  string `json:"netns"`
	Labels string `json:"labels"`
	IP     string `json:"ip,omitempty"`
	IPv6   string `json:"ipv6,omitempty"`
	// IfName names the interface in the namespace (default eth0).
	IfName string `json:"ifname,omitempty"`
	// ContainerID and Network make the request a container runtime's
	// attachment: a repeated request for the same (network, container,
	// ifname) in the same namespace returns the endpoint it made.
	ContainerID string `json:"container_id,omitempty"`
	Network     string `json:"network,omitempty"`
}

// Attachment is a container runtime's key of an endpoint in a network.
type Attachment struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
}

// AttachmentGC is the body of POST /v1/attachments/gc: delete the
// endpoints of Network that no attachment in Keep names.
type AttachmentGC struct {
	Network string       `json:"network"`
	Keep    []Attachment `json:"keep"`
}

// AttachmentGCResult says what POST /v1/attachments/gc deleted, and what it
// could not delete (with why).
type AttachmentGCResult struct {
	Deleted []string `json:"deleted"`
	Failed  []string `json:"failed,omitempty"`
}

// Ready is the reply of GET /v1/ready: whether the agent plugs
// endpoints now (it has restored its endpoints and computed their policy),
// and if not, what it waits for.
type Ready struct {
	Ready  bool   `json:"ready"`
	Reason string `json:"reason,omitempty"`
}

// EndpointAudit is the body of POST /v1/endpoints/{ep}/audit; the reply
// is the Endpoint.
type EndpointAudit struct {
	Enabled bool `json:"enabled"`
}

// Deleted is the reply of DELETE /v1/endpoints/{ep} and
// DELETE /v1/policies/{name}: the name (or id) deleted, as given.
type Deleted struct {
	Deleted string `json:"deleted"`
}

// PolicyEntry is one entry of an endpoint's BPF policy map, decoded.
type PolicyEntry struct {
	Identity       uint32 `json:"identity"`
	IdentityLabels string `json:"identity_labels,omitempty"`
	Direction      string `json:"direction"` // ingress, egress
	Proto          string `json:"proto"`     // any, tcp, udp, sctp, icmp, icmpv6, or a number
	Port           uint16 `json:"port"`
	EndPort        uint16 `json:"end_port,omitempty"`
	Verdict        string `json:"verdict"` // allow, deny
	Emergency      bool   `json:"emergency,omitempty"`
	Packets        uint64 `json:"packets"`
	Bytes          uint64 `json:"bytes"`
}

// IPCacheEntry maps an address or prefix to its identity.
type IPCacheEntry struct {
	Prefix   string `json:"prefix"`
	Identity uint32 `json:"identity"`
	Labels   string `json:"labels,omitempty"`
	HostIP   string `json:"host_ip,omitempty"`
}

// Identity is a numeric identity and its labels.
type Identity struct {
	ID     uint32 `json:"id"`
	Labels string `json:"labels"`
	// Scope is "reserved", "cluster" or "local" (CIDR identities).
	Scope string `json:"scope"`
	// Users is how many local endpoints use it (cluster identities).
	Users int `json:"users,omitempty"`
}

// Node is one host of the cluster as the store knows it.
type Node struct {
	Name    string   `json:"name"`
	Cluster string   `json:"cluster"`
	IPs     []string `json:"ips"`
	CIDRs   []string `json:"cidrs"`
	BGPASN  int64    `json:"bgp_asn,omitempty"`
	Version string   `json:"version"`
}

// PolicySummary is one loaded policy.
type PolicySummary struct {
	Name   string `json:"name"`
	Source string `json:"source"` // "file:PATH" or "store"
	Rules  int    `json:"rules"`
}

// TraceSubject is one end of a policy trace: exactly one field set.
type TraceSubject struct {
	Labels   string `json:"labels,omitempty"`
	IP       string `json:"ip,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
}

// TraceRequest is the body of POST /v1/policy/trace.
type TraceRequest struct {
	Src   TraceSubject `json:"src"`
	Dst   TraceSubject `json:"dst"`
	DPort string       `json:"dport"` // "80/tcp"
}

// Event is one datapath event as `rackwire monitor --json` prints it.
type Event struct {
	Time         time.Time `json:"time"`
	Type         string    `json:"type"` // drop, trace, audit; or suppressed (EventSuppressed)
	Endpoint     uint16    `json:"endpoint"`
	EndpointName string    `json:"endpoint_name,omitempty"`
	Direction    string    `json:"direction"`
	Src          string    `json:"src"`
	Dst          string    `json:"dst"`
	Proto        string    `json:"proto"`
	SrcIdentity  uint32    `json:"src_identity"`
	SrcLabels    string    `json:"src_labels,omitempty"`
	DstIdentity  uint32    `json:"dst_identity"`
	DstLabels    string    `json:"dst_labels,omitempty"`
	Verdict      string    `json:"verdict"`
	Reason       string    `json:"reason,omitempty"`
	Len          uint32    `json:"len"`
	// VIP is set on a service translation (trace) or refusal (drop, "no
	// service backend"): the VIP:port the client asked for; Dst is then
	// the backend chosen (the VIP itself when there was none).
	VIP string `json:"vip,omitempty"`
	// A "suppressed" line (about once a second per endpoint whose events
	// were over its rate limit): how many events of Endpoint the limit
	// suppressed and the transport lost since the previous line, and the
	// limit in force. The packet fields are empty.
	Suppressed uint64 `json:"suppressed,omitempty"`
	Lost       uint64 `json:"lost,omitempty"`
	Limit      string `json:"limit,omitempty"`
}

// EventSuppressed is the Type of a monitor line that counts suppressed events.
const EventSuppressed = "suppressed"

// RawEntry is an operator's raw policy map entry (`rackwire bpf policy add`).
type RawEntry struct {
	Identity  uint32 `json:"identity"`
	Direction string `json:"direction"` // ingress, egress
	Proto     string `json:"proto"`     // any, tcp, udp, sctp, icmp, icmpv6 or a number
	Port      uint16 `json:"port"`
	EndPort   uint16 `json:"end_port,omitempty"`
	Deny      bool   `json:"deny"`
}

// RawKey is a validated RawEntry.
type RawKey struct {
	Identity  uint32
	Direction uint8
	Proto     uint8
	Port      uint16
	EndPort   uint16
	Deny      bool
}

// Entry validates r.
func (r RawEntry) Entry() (RawKey, error) {
	k := RawKey{Identity: r.Identity, Port: r.Port, EndPort: r.EndPort, Deny: r.Deny}
	switch r.Direction {
	case "ingress", "":
		k.Direction = 0
	case "egress":
		k.Direction = 1
	default:
		return k, fmt.Errorf("direction %q: write ingress or egress", r.Direction)
	}
	p, err := ParseProto(r.Proto)
	if err != nil {
		return k, err
	}
	k.Proto = p
	if r.EndPort != 0 && r.EndPort < r.Port {
		return k, fmt.Errorf("end port %d is below port %d", r.EndPort, r.Port)
	}
	return k, nil
}

// ParseProto maps a protocol name or number to its IP protocol number.
func ParseProto(s string) (uint8, error) {
	switch strings.ToLower(s) {
	case "", "any":
		return 0, nil
	case "icmp":
		return 1, nil
	case "tcp":
		return 6, nil
	case "udp":
		return 17, nil
	case "icmpv6":
		return 58, nil
	case "sctp":
		return 132, nil
	}
	v, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("protocol %q: write any, tcp, udp, sctp, icmp, icmpv6 or a number", s)
	}
	return uint8(v), nil
}

// ProtoName names an IP protocol number the way the CLI writes it.
func ProtoName(p uint8) string {
	switch p {
	case 0:
		return "any"
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	case 132:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}
