package api

import "encoding/json"

// PolicyImport is the body of POST /v1/policies: a policy file's name (for
// messages and the policy's source) and its content, YAML or JSON. The
// reply is the imported policies, []PolicySummary.
type PolicyImport struct {
	File string `json:"file"`
	Data string `json:"data"`
}

// PolicyDocument is one element of the reply of GET /v1/policies/{name}:
// a policy in force and where it comes from. Policy is the document as the
// agent loaded it; its schema is the policy file format (docs/policy.md),
// owned by daemon/policy, so it is carried verbatim.
type PolicyDocument struct {
	Source string          `json:"source"` // "file:PATH" or "store"
	Policy json.RawMessage `json:"policy"`
}

// TraceResult is the reply of POST /v1/policy/trace: whether a connection
// src -> dst:dport/proto passes. It mirrors the JSON of
// daemon/policy.TraceResult.
type TraceResult struct {
	Verdict string        `json:"verdict"` // "allowed" or "denied"
	Src     TraceResolved `json:"src"`
	Dst     TraceResolved `json:"dst"`
	DPort   uint16        `json:"dport"`
	Proto   uint8         `json:"proto"`
	// Egress is the source's egress side, Ingress the destination's.
	Egress  TraceSide `json:"egress"`
	Ingress TraceSide `json:"ingress"`
}

// TraceResolved is one end of a trace as the agent understood it.
type TraceResolved struct {
	Kind     string `json:"kind"` // endpoint, workload, reserved, cidr, world
	Identity uint32 `json:"identity"`
	Labels   string `json:"labels"`
	Endpoint uint16 `json:"endpoint,omitempty"`
	IP       string `json:"ip,omitempty"`
}

// TraceSide is the verdict of one side of a trace and the rule that
// decided it.
type TraceSide struct {
	// Verdict is allowed, denied-by-default (selected, nothing allows it),
	// denied-by-rule (a deny rule matches) or open (no policy selects it).
	Verdict string `json:"verdict"`
	Source  string `json:"source,omitempty"`
	Policy  string `json:"policy,omitempty"`
	// Rule is the deciding rule's path in the document, e.g.
	// "spec.ingress[0]"; RuleIndex is the spec index (-1 if none).
	Rule      string `json:"rule,omitempty"`
	RuleIndex int    `json:"rule_index"`
	Audit     bool   `json:"audit,omitempty"` // the endpoint is in audit mode: a deny is only reported
	Reason    string `json:"reason"`
}
