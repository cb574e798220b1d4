package store

import (
	"fmt"
	"net/netip"
	"strings"
)

// Key prefixes under the configured store prefix (docs/consul.md "Keys").
const (
	IdentityIDPrefix    = "state/identities/v1/id/"
	IdentityValuePrefix = "state/identities/v1/value/"
	IPPrefix            = "state/ip/v1/"
	NodePrefix          = "state/nodes/v1/"
	PolicyPrefix        = "policies/v1/"
	ServicePrefix       = "state/services/v1/"
)

// ServiceKey is the key of a cluster-wide service (`rackwire service add`).
func ServiceKey(cluster, name string) string { return ServicePrefix + cluster + "/" + name }

// IdentityIDKey is the source-of-truth key of an identity.
func IdentityIDKey(id uint32) string { return fmt.Sprintf("%s%d", IdentityIDPrefix, id) }

// IdentityValueKey is the key a node holds while it uses a label set.
// Canonical labels contain no '/' that would confuse the layout: '/' in a
// label is escaped as %2F.
func IdentityValueKey(canonicalLabels, node string) string {
	return IdentityValuePrefix + EscapeSegment(canonicalLabels) + "/" + node
}

// IdentityValuePrefixFor is the prefix of every node's value key of a label set.
func IdentityValuePrefixFor(canonicalLabels string) string {
	return IdentityValuePrefix + EscapeSegment(canonicalLabels) + "/"
}

// IPKey is the ipcache key of an address.
func IPKey(cluster string, ip netip.Addr) string { return IPPrefix + cluster + "/" + ip.String() }

// NodeKey is the key of a node.
func NodeKey(cluster, node string) string { return NodePrefix + cluster + "/" + node }

// PolicyKey is the key of a cluster-wide policy.
func PolicyKey(name string) string { return PolicyPrefix + name }

// EscapeSegment makes s safe as one path segment.
func EscapeSegment(s string) string {
	return strings.NewReplacer("%", "%25", "/", "%2F").Replace(s)
}

// IPEntry is the JSON value of an ipcache key.
type IPEntry struct {
	IP         string `json:"ip"`
	Identity   uint32 `json:"identity"`
	HostIP     string `json:"host_ip"`
	Node       string `json:"node"`
	Endpoint   uint32 `json:"endpoint,omitempty"`
	LabelsHash string `json:"labels_hash,omitempty"`
}

// NodeEntry is the JSON value of a node key.
type NodeEntry struct {
	Name    string   `json:"name"`
	Cluster string   `json:"cluster"`
	IPs     []string `json:"ips"`
	CIDRs   []string `json:"cidrs"`
	BGPASN  int64    `json:"bgp_asn,omitempty"`
	Version string   `json:"version"`
	// HostID is a random id kept in the host's state dir: two hosts that
	// publish under one node name carry different ids, which is how the
	// duplicate is told from the same host's previous run.
	HostID string `json:"host_id,omitempty"`
	// Features lists what the host's release does that others may rely
	// on ("iplog": it writes the ipcache change log). Older releases
	// ignore the field.
	Features []string `json:"features,omitempty"`
}
