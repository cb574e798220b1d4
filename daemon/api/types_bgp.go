package api

import "time"

// BGPStatus is the reply of GET /v1/bgp/status and what
// `rackwire bgp status --json` prints. It mirrors the JSON of
// daemon/bgp.Status field for field; the daemon converts.
type BGPStatus struct {
	Enabled bool   `json:"enabled"`
	Config  string `json:"bird_config"`
	Socket  string `json:"bird_socket"`
	// BirdRunning reports whether BIRD answered on its socket; BirdError
	// says why not.
	BirdRunning bool   `json:"bird_running"`
	BirdError   string `json:"bird_error,omitempty"`
	Drained     bool   `json:"drained"`
	DrainKeep   bool   `json:"drain_keep"`
	// Announced is what the last successful apply announces.
	Announced   []string      `json:"announced"`
	Protocols   []BGPProtocol `json:"protocols"`
	BFDSessions []BFDSession  `json:"bfd_sessions"`
	LastApply   BGPApply      `json:"last_apply"`
	VIPs        []VIPStatus   `json:"vips"`
}

// BGPProtocol is one BIRD protocol as BIRD reports it (the flattened JSON
// of daemon/bgp.ProtocolStatus).
type BGPProtocol struct {
	Name  string `json:"name"`
	Proto string `json:"proto"` // BGP, Static, Kernel, Device, BFD
	Table string `json:"table"`
	State string `json:"state"` // up, down, start, flush
	// Since is when the state last changed (zero when BIRD printed a format
	// the agent does not parse; SinceText has it verbatim).
	Since          time.Time         `json:"since"`
	SinceText      string            `json:"since_text"`
	Info           string            `json:"info"` // for BGP: Established, Active, Connect...
	BGPState       string            `json:"bgp_state,omitempty"`
	NeighborAddr   string            `json:"neighbor_address,omitempty"`
	NeighborAS     uint32            `json:"neighbor_as,omitempty"`
	LastError      string            `json:"last_error,omitempty"`
	RoutesImported int               `json:"routes_imported"`
	RoutesExported int               `json:"routes_exported"`
	RoutesFiltered int               `json:"routes_filtered"`
	Channels       map[string]string `json:"channels,omitempty"`
	UptimeSeconds  float64           `json:"uptime_seconds"`
	// Reason says why a BGP session is not established: BIRD's last error,
	// or its state info.
	Reason string `json:"reason,omitempty"`
}

// BFDSession is one BFD session of a BIRD BFD protocol.
type BFDSession struct {
	Protocol  string        `json:"protocol"`
	Address   string        `json:"address"`
	Interface string        `json:"interface"`
	State     string        `json:"state"` // Up, Down, Init, AdminDown
	Since     string        `json:"since"`
	Interval  time.Duration `json:"interval_ns"`
	Timeout   time.Duration `json:"timeout_ns"`
}

// BGPApply is the outcome of the last render-and-apply of the BIRD config.
type BGPApply struct {
	Time         time.Time `json:"time"`
	OK           bool      `json:"ok"`
	Written      bool      `json:"written"`
	Reconfigured bool      `json:"reconfigured"`
	RolledBack   bool      `json:"rolled_back"`
	Error        string    `json:"error,omitempty"`
}

// VIPStatus is the health of one configured VIP.
type VIPStatus struct {
	VIP       string    `json:"vip"`
	Checked   bool      `json:"checked"` // false: no health check, always active
	Healthy   bool      `json:"healthy"`
	Announced bool      `json:"announced"`
	Type      string    `json:"type,omitempty"`
	Target    string    `json:"target,omitempty"`
	OKRun     int       `json:"consecutive_ok"`
	FailRun   int       `json:"consecutive_fail"`
	LastError string    `json:"last_error,omitempty"`
	LastCheck time.Time `json:"last_check,omitzero"`
}

// BGPRender is the reply of GET /v1/bgp/render: the BIRD config the agent
// would write.
type BGPRender struct {
	Config string `json:"config"`
}

// BGPDrain is the reply of POST /v1/bgp/drain. Keep is whether the
// [bgp] drain_keep prefixes stay announced.
type BGPDrain struct {
	Drained bool `json:"drained"`
	Keep    bool `json:"keep"`
}

// BGPUndrain is the reply of POST /v1/bgp/undrain.
type BGPUndrain struct {
	Drained bool `json:"drained"`
}
