package api

// ServiceBackend is one backend of a service (`rackwire service get`).
type ServiceBackend struct {
	Address string `json:"address"` // ip:port
	Node    string `json:"node,omitempty"`
	Local   bool   `json:"local"`
	State   string `json:"state"`  // active, critical, maintenance
	Source  string `json:"source"` // config, store, consul
}

// Service is one entry of the merged service table (`rackwire service
// list|get`).
type Service struct {
	Name     string           `json:"name"`
	Frontend string           `json:"frontend"` // vip:port/proto
	VIP      string           `json:"vip"`
	Port     int              `json:"port"`
	Protocol string           `json:"protocol"`
	Source   string           `json:"source"`
	Active   int              `json:"active"`
	Total    int              `json:"total"`
	Backends []ServiceBackend `json:"backends"`
}

// ServiceList is GET /v1/services: the table, whether the datapath took it,
// and what the sources left out.
type ServiceList struct {
	Services []Service `json:"services"`
	// Programmed is false while the datapath refuses the table (the
	// previous one stays in force); Error says why.
	Programmed bool     `json:"programmed"`
	Error      string   `json:"error,omitempty"`
	Problems   []string `json:"problems"`
}

// ServiceSpec is the body of POST /v1/services (`rackwire service add`): a
// cluster-wide service stored under state/services/v1/<cluster>/<name>.
type ServiceSpec struct {
	Name     string   `json:"name"`
	VIP      string   `json:"vip"`
	Port     int      `json:"port"`
	Protocol string   `json:"protocol,omitempty"`
	Backends []string `json:"backends"`
}
