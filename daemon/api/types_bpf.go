package api

import "time"

// CTEntry is one tracked flow (GET /v1/bpf/ct): the tuple of its first
// packet, the local endpoint and the direction that packet had. It mirrors
// the JSON of daemon/datapath.CTEntry.
type CTEntry struct {
	Src            string `json:"src"` // "ADDR:PORT"
	Dst            string `json:"dst"`
	Proto          uint8  `json:"proto"`     // IP protocol number; ProtoName names it
	Direction      string `json:"direction"` // ingress, egress
	Endpoint       uint16 `json:"endpoint"`
	RemoteIdentity uint32 `json:"remote_identity"`
	Packets        uint64 `json:"packets"`
	Bytes          uint64 `json:"bytes"`
	TCPFlags       uint8  `json:"tcp_flags,omitempty"`
	Audit          bool   `json:"audit,omitempty"` // forwarded by audit mode
	// State: "syn-only", "established" or "closing" (TCP), "open" (others).
	State    string    `json:"state"`
	FINOrig  bool      `json:"fin_orig,omitempty"`  // FIN from the first packet's sender
	FINReply bool      `json:"fin_reply,omitempty"` // FIN from the other side
	RST      bool      `json:"rst,omitempty"`
	Revision uint32    `json:"revision"` // policy revision the flow was last checked at
	Created  time.Time `json:"created"`
	LastSeen time.Time `json:"last_seen"`
	// ExpiresIn is the lifetime left without traffic, in nanoseconds.
	ExpiresIn time.Duration `json:"expires_in"`
	// NextHop: where host routing "bpf" sends the endpoint's packets of
	// the flow to another host; absent until one was kept.
	NextHop *CTNextHop `json:"next_hop,omitempty"`
}

// CTNextHop is the FIB's last answer for a flow's packets to another host,
// kept in its CT entry and asked again once older than 16.8 ms.
type CTNextHop struct {
	Ifindex int           `json:"ifindex"` // the device the packets leave by
	MAC     string        `json:"mac"`     // the next hop's
	MTU     int           `json:"mtu"`     // the device's
	Age     time.Duration `json:"age"`     // since the FIB answered, in nanoseconds (about 1 ms resolution)
}

// CTFlushed is the reply of POST /v1/bpf/ct/flush.
type CTFlushed struct {
	Endpoint string `json:"endpoint,omitempty"` // "" = every endpoint
	Deleted  int    `json:"deleted"`
}

// Metric is one datapath counter (GET /v1/bpf/metrics), summed over CPUs.
// It mirrors the JSON of daemon/datapath.Metric.
type Metric struct {
	Reason    string `json:"reason"`    // "forwarded", "policy denied", ...
	Direction string `json:"direction"` // ingress, egress
	Packets   uint64 `json:"packets"`
	Bytes     uint64 `json:"bytes"`
}

// AllowAll is the reply of POST /v1/bpf/policy/{ep}/allow-all.
type AllowAll struct {
	Endpoint string `json:"endpoint"`
	// Result says what happened, e.g. "opened (all traffic allowed in both
	// directions)" or "closed again (policy enforced)".
	Result string `json:"result"`
}
