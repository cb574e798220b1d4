package bgp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/rackwire/rackwire/birdconf"
	"github.com/rackwire/rackwire/daemon/config"
)

// Status is what `rackwire bgp status` shows. It is JSON-able.
type Status struct {
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
	Announced   []string              `json:"announced"`
	Protocols   []ProtocolStatus      `json:"protocols"`
	BFDSessions []birdconf.BFDSession `json:"bfd_sessions"`
	LastApply   ApplyStatus           `json:"last_apply"`
	VIPs        []VIPStatus           `json:"vips"`
}

// ProtocolStatus is one BIRD protocol as BIRD reports it.
type ProtocolStatus struct {
	birdconf.ProtocolDetail
	UptimeSeconds float64 `json:"uptime_seconds"`
	// Reason says why a BGP session is not established: BIRD's last error,
	// or its state info.
	Reason string `json:"reason,omitempty"`
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

// Status reports the Manager's state and, when BIRD runs, its protocols and
// BFD sessions. It never fails: what cannot be read is said in the result.
func (m *Manager) Status(ctx context.Context) Status {
	m.mu.Lock()
	st := Status{
		Enabled:   m.cfg.Enabled,
		Config:    m.cfg.BirdConfig,
		Socket:    m.cfg.BirdSocket,
		Drained:   m.drained,
		DrainKeep: m.drained && m.keep,
		Announced: slices.Clone(m.announce),
		LastApply: m.last,
	}
	announced := map[string]bool{}
	for _, a := range m.announce {
		announced[a] = true
	}
	specs := map[netip.Prefix]config.VIPHealth{}
	for _, h := range m.cfg.VIPHealth {
		if p, err := netip.ParsePrefix(h.VIP); err == nil {
			specs[p] = h
		}
	}
	for _, s := range m.cfg.VIPs {
		v := VIPStatus{VIP: s, Healthy: true}
		if p, err := netip.ParsePrefix(s); err == nil {
			v.Announced = announced[p.String()]
			if h, ok := specs[p]; ok {
				// Checked VIPs are unhealthy until their checker says so.
				v.Checked, v.Healthy, v.Type, v.Target = true, false, h.Type, h.Target
			}
			if c, ok := m.checks[p]; ok {
				v.Checked, v.Healthy = true, c.healthy
				v.Type, v.Target = c.spec.Type, c.spec.Target
				v.OKRun, v.FailRun, v.LastError, v.LastCheck = c.okRun, c.failRun, c.lastErr, c.lastCheck
			}
		}
		st.VIPs = append(st.VIPs, v)
	}
	m.mu.Unlock()
	if !st.Enabled {
		return st
	}

	c := &birdconf.Client{Socket: st.Socket, Timeout: 5 * time.Second}
	protos, err := c.ShowProtocols(ctx)
	if err != nil {
		st.BirdError = err.Error()
		return st
	}
	st.BirdRunning = true
	now := time.Now()
	for _, p := range protos {
		ps := ProtocolStatus{ProtocolDetail: birdconf.ProtocolDetail{Protocol: p}}
		if d, err := c.ShowProtocolsAll(ctx, p.Name); err == nil {
			ps.ProtocolDetail = d
		}
		if !p.Since.IsZero() && p.State == "up" {
			ps.UptimeSeconds = now.Sub(p.Since).Seconds()
		}
		if p.Proto == "BGP" && ps.BGPState != "Established" {
			ps.Reason = ps.LastError
			if ps.Reason == "" {
				ps.Reason = p.Info
			}
		}
		st.Protocols = append(st.Protocols, ps)
	}
	if ss, err := c.ShowBFDSessions(ctx); err == nil {
		st.BFDSessions = ss
	} else if !errors.Is(err, birdconf.ErrRefused) {
		// No BFD protocol configured is not an error worth reporting.
		st.BirdError = err.Error()
	}
	return st
}

// Summary condenses s for `rackwire status`: state is "disabled",
// "unavailable" (BIRD not reachable), "degraded" (a BGP session is down or
// the last apply failed) or "ok"; message says why in one line; detail has
// one entry per BGP session ("Established", or BIRD's reason).
func (s Status) Summary() (state, message string, detail map[string]string) {
	if !s.Enabled {
		return "disabled", "[bgp] enabled = false", nil
	}
	detail = map[string]string{}
	up, total := 0, 0
	for _, p := range s.Protocols {
		if p.Proto != "BGP" {
			continue
		}
		total++
		if p.BGPState == "Established" {
			up++
			detail[p.Name] = "Established"
		} else {
			detail[p.Name] = strings.TrimSpace(p.BGPState + " " + p.Reason)
		}
	}
	var parts []string
	if s.Drained {
		parts = append(parts, "drained")
	}
	parts = append(parts, fmt.Sprintf("%d prefixes announced", len(s.Announced)))
	switch {
	case !s.BirdRunning:
		state = "unavailable"
		parts = append([]string{s.BirdError}, parts...)
	case !s.LastApply.OK && s.LastApply.Error != "":
		state = "degraded"
		parts = append([]string{"last apply failed: " + s.LastApply.Error}, parts...)
	case up < total:
		state = "degraded"
		parts = append([]string{fmt.Sprintf("%d/%d BGP sessions established", up, total)}, parts...)
	default:
		state = "ok"
		parts = append([]string{fmt.Sprintf("%d/%d BGP sessions established", up, total)}, parts...)
	}
	return state, strings.Join(parts, "; "), detail
}
