// Package service holds the shape of rackwire's service load-balancing
// table: the one per-host table into which the three sources (the Consul
// catalog, the config's [[services]] and the cluster-wide store) are merged,
// and which the datapath programs.
//
// The table is data only. Who changes it: the merger in this package (fed by
// its sources) builds a new Table whenever a source changes and hands the
// whole of it to a Sink; the datapath (daemon/datapath) is the Sink in the
// daemon and diffs against what it programmed last. A Table is immutable once
// handed over.
package service

import (
	"fmt"
	"net/netip"
	"strings"
)

// Proto is the L4 protocol of a frontend, by its IP protocol number.
type Proto uint8

// The protocols a service may balance.
const (
	TCP Proto = 6
	UDP Proto = 17
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// ParseProto reads "tcp" or "udp" (any case).
func ParseProto(s string) (Proto, error) {
	switch strings.ToLower(s) {
	case "tcp":
		return TCP, nil
	case "udp":
		return UDP, nil
	}
	return 0, fmt.Errorf("protocol %q: want tcp or udp", s)
}

// Source is where a service or a backend came from.
type Source string

// The sources, in the order the merger prefers them when two name the same
// frontend (config wins over the store, the store over Consul).
const (
	SourceConfig Source = "config"
	SourceStore  Source = "store"
	SourceConsul Source = "consul"
)

// State is a backend's health as the sources report it.
type State string

// Backend states. Only Active backends receive new connections; the others
// are listed so that `rackwire service get` can say why a backend is idle.
const (
	StateActive   State = "active"   // passing: takes new connections
	StateCritical State = "critical" // failing check: no new connections
	StateMaint    State = "maintenance"
)

// Frontend is what clients connect to: a VIP, a port and a protocol.
type Frontend struct {
	VIP   netip.Addr
	Port  uint16
	Proto Proto
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.VIP, f.Port), f.Proto)
}

// Backend is one instance behind a frontend.
type Backend struct {
	Addr   netip.Addr
	Port   uint16
	Node   string // the host (Consul node) that runs it, "" when unknown
	Local  bool   // it runs on this host (decides BGP announcement of the VIP)
	State  State
	Source Source
}

// AddrPort is the backend's address and port.
func (b Backend) AddrPort() netip.AddrPort { return netip.AddrPortFrom(b.Addr, b.Port) }

// Service is one frontend with its backends, sorted by address then port.
type Service struct {
	Name     string // the Consul service name, the config's name, or the stored name
	Frontend Frontend
	Source   Source
	Backends []Backend
}

// Active is the backends that take new connections, in table order.
func (s Service) Active() []Backend {
	var out []Backend
	for _, b := range s.Backends {
		if b.State == StateActive {
			out = append(out, b)
		}
	}
	return out
}

// Table is the merged per-host service table, sorted by frontend (VIP, port,
// protocol); at most one Service per frontend.
type Table struct {
	Services []Service
}

// Sink receives every new Table. Sync must be safe to call again with the
// same table (idempotent) and must leave the previous table in force when it
// fails.
type Sink interface {
	SyncServices(t Table) error
}
