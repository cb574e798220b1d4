// Package bgp is the agent side of the BIRD integration: it owns what this
// host announces.
//
// The Manager turns [bgp], the host's workload CIDRs, the health of each
// VIP and the drain state into a birdconf.Config, renders it, and applies
// it to BIRD safely (temporary file, `bird -p`, rename, configure through
// the control socket, rollback when BIRD refuses). Only the Manager writes
// bird_config; the daemon wiring (package daemon) creates one Manager and
// calls Reload on SIGHUP or when the CIDRs change, Drain/Undrain from the
// API, and Status for `rackwire status` and `rackwire bgp status`.
//
// On restart nothing is assumed: VIPs with a health check start unhealthy
// and are announced only after `rise` good checks, so an agent starting
// with no state announces nothing it should not; the drain state survives a
// restart when DrainFile is set. When BIRD is missing or not running the
// Manager keeps running, reports it in Status, and retries. Bad input is
// refused by config validation; what slips through (an unreadable password
// file at render time) fails the render, and the previous file stays.
//
// The peers' passwords (read from password_file at every render) go into
// BIRD's file and nowhere else: Render, which the API serves, shows
// `password "<redacted>"`, and errors, log lines and Status have every
// password replaced the same way.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rackwire/rackwire/birdconf"
	"github.com/rackwire/rackwire/daemon/config"
)

// Manager renders and applies this host's BIRD config and runs the VIP
// health checks.
type Manager struct {
	log     *slog.Logger
	version string
	kick    chan struct{} // buffered 1: "state changed, apply"

	// RetryInterval is how long Run waits before retrying a failed apply
	// (BIRD missing, not running, or refusing). Set it before Run; default
	// 5s.
	RetryInterval time.Duration
	// DrainFile, when set before Run, keeps the drain state across
	// restarts: it exists while the host is drained and holds "keep" or
	// "all".
	DrainFile string

	applyMu sync.Mutex // serializes applies (Run and ApplyNow)

	mu       sync.Mutex // guards the fields below
	cfg      config.BGP
	cidrs    []netip.Prefix
	drained  bool
	keep     bool
	checks   map[netip.Prefix]*checker
	runCtx   context.Context // nil until Run starts the health checks
	last     ApplyStatus
	failing  bool // the last apply failed: the next one reconfigures even if the text is unchanged
	wg       sync.WaitGroup
	announce []string
	// svcVIPs are the service VIPs with an active local backend
	// ([bgp] announce_service_vips; SetServiceVIPs).
	svcVIPs []netip.Prefix
}

// New returns a Manager for cfg (validated by package config) and the
// host's workload CIDRs. version goes into the header of the rendered file.
func New(cfg config.BGP, cidrs []netip.Prefix, version string, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Manager{
		log:     log.With("subsys", "bgp"),
		version: version,
		kick:    make(chan struct{}, 1),
		cfg:     cfg,
		cidrs:   slices.Clone(cidrs),
		checks:  map[netip.Prefix]*checker{},
	}
}

func (m *Manager) poke() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Run applies the config, then re-applies it whenever something changes or
// a failed apply is due for a retry, until ctx ends. It runs the VIP health
// checks and stops them, and waits for them, before it returns.
func (m *Manager) Run(ctx context.Context) error {
	retry := m.RetryInterval
	if retry <= 0 {
		retry = 5 * time.Second
	}
	m.loadDrain()
	m.mu.Lock()
	m.runCtx = ctx
	m.syncChecksLocked()
	m.mu.Unlock()
	defer m.wg.Wait()

	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-m.kick:
		case <-timer.C:
		}
		if err := m.ApplyNow(ctx); err != nil && ctx.Err() == nil {
			timer.Reset(retry)
		}
	}
}

// Reload replaces the config and the CIDRs (SIGHUP, IPAM change). Health
// checks whose definition did not change keep their state.
func (m *Manager) Reload(cfg config.BGP, cidrs []netip.Prefix) {
	m.mu.Lock()
	m.cfg = cfg
	m.cidrs = slices.Clone(cidrs)
	m.syncChecksLocked()
	m.mu.Unlock()
	m.poke()
}

// Drain withdraws every announcement of this host. With keep, the prefixes
// in [bgp] drain_keep stay announced.
func (m *Manager) Drain(keep bool) {
	m.mu.Lock()
	m.drained, m.keep = true, keep
	m.mu.Unlock()
	m.saveDrain(true, keep)
	m.poke()
}

// Undrain restores the announcements Drain withdrew.
func (m *Manager) Undrain() {
	m.mu.Lock()
	m.drained, m.keep = false, false
	m.mu.Unlock()
	m.saveDrain(false, false)
	m.poke()
}

func (m *Manager) loadDrain() {
	if m.DrainFile == "" {
		return
	}
	b, err := os.ReadFile(m.DrainFile)
	if err != nil {
		return // absent: not drained
	}
	m.mu.Lock()
	m.drained, m.keep = true, strings.TrimSpace(string(b)) != "all"
	m.mu.Unlock()
	m.log.Info("host is drained (drain file present)", "path", m.DrainFile)
}

func (m *Manager) saveDrain(drained, keep bool) {
	if m.DrainFile == "" {
		return
	}
	var err error
	if !drained {
		err = os.Remove(m.DrainFile)
		if errors.Is(err, os.ErrNotExist) {
			err = nil
		}
	} else {
		v := "all\n"
		if keep {
			v = "keep\n"
		}
		err = os.WriteFile(m.DrainFile, []byte(v), 0o644)
	}
	if err != nil {
		m.log.Warn("drain state not persisted; a restart forgets it", "path", m.DrainFile, "err", err)
	}
}

// input builds the renderer's input from the current state.
func (m *Manager) input() (birdconf.Config, error) {
	m.mu.Lock()
	cfg, cidrs, drained, keep := m.cfg, slices.Clone(m.cidrs), m.drained, m.keep
	health := map[netip.Prefix]bool{}
	for p, c := range m.checks {
		health[p] = c.healthy
	}
	svcVIPs := slices.Clone(m.svcVIPs)
	m.mu.Unlock()
	out, err := buildInput(cfg, cidrs, m.version, drained, keep, health)
	if err != nil || !cfg.AnnounceServiceVIPs {
		return out, err
	}
	return withServiceVIPs(out, svcVIPs), nil
}

// SetServiceVIPs replaces the service VIPs this host announces (those with
// at least one active local backend). A VIP also in [bgp] vips keeps its
// own entry (and health check). Applied only with announce_service_vips.
func (m *Manager) SetServiceVIPs(vips []netip.Addr) {
	ps := make([]netip.Prefix, len(vips))
	for i, v := range vips {
		ps[i] = netip.PrefixFrom(v, v.BitLen())
	}
	m.mu.Lock()
	same := slices.Equal(ps, m.svcVIPs)
	m.svcVIPs = ps
	m.mu.Unlock()
	if !same {
		m.poke()
	}
}

// withServiceVIPs adds the service VIPs not already configured, announced
// (Active) since each has a healthy local backend.
func withServiceVIPs(out birdconf.Config, vips []netip.Prefix) birdconf.Config {
	have := map[netip.Prefix]bool{}
	for _, v := range out.VIPs {
		have[v.Prefix] = true
	}
	for _, p := range vips {
		if !have[p] {
			have[p] = true
			out.VIPs = append(out.VIPs, birdconf.VIP{Route: birdconf.Route{Prefix: p}, Active: true})
		}
	}
	return out
}

// buildInput is input without the Manager: health says whether each VIP
// with a health check is healthy (a VIP with a check that is not in health
// counts as unhealthy).
func buildInput(cfg config.BGP, cidrs []netip.Prefix, version string, drained, keep bool, health map[netip.Prefix]bool) (birdconf.Config, error) {
	out := birdconf.Config{
		Version:     version,
		LocalASN:    uint32(cfg.LocalASN),
		Communities: cfg.Communities,
		Drained:     drained,
	}
	if cfg.LocalASN < 1 || cfg.LocalASN > 1<<32-1 {
		return out, fmt.Errorf("bgp.local_asn %d is not an ASN", cfg.LocalASN)
	}
	var err error
	if cfg.RouterID == "" {
		return out, errors.New("bgp.router_id is not set and was not derived from the host's addresses")
	}
	if out.RouterID, err = netip.ParseAddr(cfg.RouterID); err != nil {
		return out, fmt.Errorf("parse bgp.router_id: %w", err)
	}
	for _, p := range cidrs {
		out.CIDRs = append(out.CIDRs, birdconf.Route{Prefix: p.Masked()})
	}
	checks := map[netip.Prefix]config.VIPHealth{}
	for _, h := range cfg.VIPHealth {
		p, err := netip.ParsePrefix(h.VIP)
		if err != nil {
			return out, fmt.Errorf("parse bgp.vip_health vip: %w", err)
		}
		checks[p] = h
	}
	for _, s := range cfg.VIPs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return out, fmt.Errorf("parse bgp.vips: %w", err)
		}
		v := birdconf.VIP{Route: birdconf.Route{Prefix: p}, Active: true}
		if h, ok := checks[p]; ok {
			v.Communities = h.Communities
			v.LocalPref = uint32(h.LocalPref)
			v.Active = health[p]
		}
		out.VIPs = append(out.VIPs, v)
	}
	parse := func(key string, list []string) ([]netip.Prefix, error) {
		var ps []netip.Prefix
		for _, s := range list {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("parse %s: %w", key, err)
			}
			ps = append(ps, p)
		}
		return ps, nil
	}
	if out.Import, err = parse("bgp.import", cfg.Import); err != nil {
		return out, err
	}
	if keep {
		if out.DrainKeep, err = parse("bgp.drain_keep", cfg.DrainKeep); err != nil {
			return out, err
		}
	}
	for _, p := range cfg.Peers {
		bp := birdconf.Peer{
			Name:            p.Name,
			ASN:             uint32(p.ASN),
			Multihop:        p.Multihop,
			BFD:             p.BFD,
			BFDMinRx:        p.BFDMinRx.Duration,
			BFDMinTx:        p.BFDMinTx.Duration,
			BFDMultiplier:   p.BFDMultiplier,
			GracefulRestart: p.GracefulRestart,
			HoldTime:        p.HoldTime,
			KeepaliveTime:   p.KeepaliveTime,
			Communities:     p.Communities,
			LocalPref:       uint32(p.LocalPref),
		}
		if bp.Address, err = netip.ParseAddr(p.Address); err != nil {
			return out, fmt.Errorf("parse bgp.peers %s address: %w", p.Name, err)
		}
		if p.SourceAddress != "" {
			if bp.SourceAddress, err = netip.ParseAddr(p.SourceAddress); err != nil {
				return out, fmt.Errorf("parse bgp.peers %s source_address: %w", p.Name, err)
			}
		}
		if p.PasswordFile != "" {
			b, err := os.ReadFile(p.PasswordFile)
			if err != nil {
				return out, fmt.Errorf("read password of peer %s: %w", p.Name, err)
			}
			bp.Password = strings.TrimRight(string(b), "\r\n")
		}
		out.Peers = append(out.Peers, bp)
	}
	return out, nil
}

// Render returns the config text the Manager would write now, for
// display (GET /v1/bgp/render): every peer password is replaced by
// birdconf.Redacted. The file written for BIRD holds the real ones
// (renderFile).
func (m *Manager) Render() (string, error) {
	in, err := m.input()
	if err != nil {
		return "", fmt.Errorf("build BIRD config input: %w", err)
	}
	text, err := birdconf.RenderRedacted(in)
	if err != nil {
		return "", redact(fmt.Errorf("render BIRD config: %w", err), passwords(in))
	}
	return text, nil
}

// renderFile returns the text for BIRD's file, passwords included, with
// the input it was rendered from. Never show or log the text.
func (m *Manager) renderFile() (string, birdconf.Config, error) {
	in, err := m.input()
	if err != nil {
		return "", in, fmt.Errorf("build BIRD config input: %w", err)
	}
	text, err := birdconf.Render(in)
	if err != nil {
		return "", in, redact(fmt.Errorf("render BIRD config: %w", err), passwords(in))
	}
	return text, in, nil
}

// passwords returns the peers' passwords in in.
func passwords(in birdconf.Config) []string {
	var out []string
	for _, p := range in.Peers {
		if p.Password != "" {
			out = append(out, p.Password)
		}
	}
	return out
}

// redact returns err with every secret in its text replaced by
// birdconf.Redacted (BIRD's messages may quote the file); err itself when
// its text holds none. errors.Is and errors.As still see the original.
func redact(err error, secrets []string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := redactText(msg, secrets)
	if clean == msg {
		return err
	}
	return &redactedError{msg: clean, err: err}
}

func redactText(s string, secrets []string) string {
	for _, sec := range secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, birdconf.Redacted)
		}
	}
	return s
}

type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// ApplyStatus is the outcome of the last apply.
type ApplyStatus struct {
	Time         time.Time `json:"time"`
	OK           bool      `json:"ok"`
	Written      bool      `json:"written"`
	Reconfigured bool      `json:"reconfigured"`
	RolledBack   bool      `json:"rolled_back"`
	Error        string    `json:"error,omitempty"`
}

// ApplyNow renders and applies the config once, synchronously. It does
// nothing while [bgp] enabled is false.
func (m *Manager) ApplyNow(ctx context.Context) error {
	m.applyMu.Lock()
	defer m.applyMu.Unlock()
	m.mu.Lock()
	cfg, force := m.cfg, m.failing
	m.mu.Unlock()
	if !cfg.Enabled {
		return nil
	}
	st := ApplyStatus{Time: time.Now()}
	var res birdconf.Result
	var announced []string
	text, in, err := m.renderFile()
	if err == nil {
		for _, r := range in.Announced() {
			announced = append(announced, r.Prefix.String())
		}
		a := &birdconf.Applier{
			Path:   cfg.BirdConfig,
			Binary: cfg.BirdBinary,
			Client: &birdconf.Client{Socket: cfg.BirdSocket},
		}
		res, err = a.Apply(ctx, text, force)
		// What BIRD says about the file may quote it.
		err = redact(err, passwords(in))
	}
	st.Written, st.Reconfigured, st.RolledBack = res.Written, res.Reconfigured, res.RolledBack
	if err != nil {
		st.Error = err.Error()
		m.log.Warn("BIRD config not applied; retrying", "err", err, "written", res.Written, "rolled_back", res.RolledBack)
	} else {
		st.OK = true
		if res.Written || res.Reconfigured {
			m.log.Info("BIRD config applied", "path", cfg.BirdConfig, "written", res.Written, "announced", announced)
		}
	}
	m.mu.Lock()
	m.last = st
	m.failing = err != nil
	if err == nil {
		m.announce = announced
	}
	m.mu.Unlock()
	return err
}
