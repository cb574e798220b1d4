package api

import "time"

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
