package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"strconv"
)

// Policy is one CiliumNetworkPolicy document as written by the operator. It
// is what Load returns and what the Engine accepts; marshalled to JSON it is
// a valid document again (the store keeps it in that form).
type Policy struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Metadata   Metadata `json:"metadata"`
	// Spec is the single rule of the document; Specs holds more. Both may
	// be set: the rules are Spec followed by Specs.
	Spec  *Rule  `json:"spec,omitempty"`
	Specs []Rule `json:"specs,omitempty"`
}

// Metadata is the part of Kubernetes object metadata rackwire reads. Labels
// and annotations are kept but carry no meaning.
type Metadata struct {
	Name        string            `json:"name"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Rule selects endpoints and says what they may receive and send.
type Rule struct {
	EndpointSelector *Selector     `json:"endpointSelector,omitempty"`
	Ingress          []IngressRule `json:"ingress,omitempty"`
	IngressDeny      []IngressRule `json:"ingressDeny,omitempty"`
	Egress           []EgressRule  `json:"egress,omitempty"`
	EgressDeny       []EgressRule  `json:"egressDeny,omitempty"`
	Description      string        `json:"description,omitempty"`
}

// IngressRule names the peers an endpoint may receive from (or, in
// ingressDeny, must not) and on which ports.
//
// The peer lists tell "absent" (nil: the field was left out or null) from
// "present but empty" (a non-nil empty slice: `fromEndpoints: []`), as
// Cilium does: with every peer list absent, a rule with ports applies to
// every peer; an empty list selects no peer. omitzero keeps an empty list
// in the JSON encoding (the store value, the canonical form) while still
// leaving out an absent one.
type IngressRule struct {
	FromEndpoints []Selector `json:"fromEndpoints,omitzero"`
	FromCIDR      []string   `json:"fromCIDR,omitzero"`
	FromCIDRSet   []CIDRRule `json:"fromCIDRSet,omitzero"`
	FromEntities  []string   `json:"fromEntities,omitzero"`
	ToPorts       []PortRule `json:"toPorts,omitempty"`
	ICMPs         []ICMPRule `json:"icmps,omitempty"`
}

// EgressRule names the peers an endpoint may send to (or, in egressDeny,
// must not) and on which ports. Its peer lists are read as IngressRule's.
type EgressRule struct {
	ToEndpoints []Selector `json:"toEndpoints,omitzero"`
	ToCIDR      []string   `json:"toCIDR,omitzero"`
	ToCIDRSet   []CIDRRule `json:"toCIDRSet,omitzero"`
	ToEntities  []string   `json:"toEntities,omitzero"`
	ToPorts     []PortRule `json:"toPorts,omitempty"`
	ICMPs       []ICMPRule `json:"icmps,omitempty"`
}

// Selector is a Kubernetes label selector. The empty selector selects every
// endpoint of the cluster.
type Selector struct {
	MatchLabels      map[string]string `json:"matchLabels,omitempty"`
	MatchExpressions []Requirement     `json:"matchExpressions,omitempty"`
}

// Requirement is one matchExpressions entry.
type Requirement struct {
	Key      string   `json:"key"`
	Operator string   `json:"operator"`
	Values   []string `json:"values,omitempty"`
}

// CIDRRule is a prefix with carve-outs.
type CIDRRule struct {
	CIDR   string   `json:"cidr"`
	Except []string `json:"except,omitempty"`
}

// PortRule is one toPorts entry.
type PortRule struct {
	Ports []PortProtocol `json:"ports"`
}

// PortProtocol is a port (or range port..endPort) and a protocol.
type PortProtocol struct {
	Port     NumString `json:"port,omitempty"`
	EndPort  int32     `json:"endPort,omitempty"`
	Protocol string    `json:"protocol,omitempty"`
}

// ICMPRule is one icmps entry.
type ICMPRule struct {
	Fields []ICMPField `json:"fields"`
}

// ICMPField is an ICMP type of one family (IPv4, the default, or IPv6).
type ICMPField struct {
	Family string    `json:"family,omitempty"`
	Type   NumString `json:"type"`
}

// NumString is a field Cilium lets be written as a number or a string
// (`port: 80` and `port: "80"`).
type NumString string

// UnmarshalJSON accepts a JSON string or integer.
func (n *NumString) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*n = NumString(s)
		return nil
	}
	if _, err := strconv.ParseInt(string(b), 10, 64); err != nil {
		return &json.UnmarshalTypeError{Value: "neither a string nor an integer", Type: reflect.TypeOf("")}
	}
	*n = NumString(b)
	return nil
}

// Rules returns the document's rules in order: Spec, then Specs.
func (p *Policy) Rules() []Rule {
	var rs []Rule
	if p.Spec != nil {
		rs = append(rs, *p.Spec)
	}
	return append(rs, p.Specs...)
}

// rulePath is the field path of rule i as the operator wrote it.
func (p *Policy) rulePath(i int) string {
	if p.Spec != nil {
		if i == 0 {
			return "spec"
		}
		i--
	}
	return fmt.Sprintf("specs[%d]", i)
}
