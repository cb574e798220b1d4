package bgp

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
)

// checker runs the health check of one VIP. Its counters are guarded by
// Manager.mu; spec and cancel are set once at creation.
type checker struct {
	spec   config.VIPHealth
	cancel context.CancelFunc

	healthy   bool
	okRun     int // consecutive successes
	failRun   int // consecutive failures
	lastErr   string
	lastCheck time.Time
}

// syncChecksLocked starts, keeps or stops checkers so that they match
// m.cfg.VIPHealth. Called with m.mu held; does nothing before Run.
func (m *Manager) syncChecksLocked() {
	if m.runCtx == nil {
		return
	}
	want := map[netip.Prefix]config.VIPHealth{}
	if m.cfg.Enabled {
		for _, h := range m.cfg.VIPHealth {
			if p, err := netip.ParsePrefix(h.VIP); err == nil {
				want[p] = h
			}
		}
	}
	for p, c := range m.checks {
		if h, ok := want[p]; ok && sameSpec(h, c.spec) {
			delete(want, p)
			continue
		}
		c.cancel() // its goroutine exits on its own; Run waits for it
		delete(m.checks, p)
	}
	for p, h := range want {
		ctx, cancel := context.WithCancel(m.runCtx)
		c := &checker{spec: h, cancel: cancel}
		m.checks[p] = c
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.runCheck(ctx, p, c)
		}()
	}
}

func sameSpec(a, b config.VIPHealth) bool {
	return a.VIP == b.VIP && a.Type == b.Type && a.Target == b.Target && a.Path == b.Path &&
		a.Interval == b.Interval && a.Timeout == b.Timeout && a.Rise == b.Rise && a.Fall == b.Fall &&
		fmt.Sprint(a.Communities) == fmt.Sprint(b.Communities) && a.LocalPref == b.LocalPref
}

func (m *Manager) runCheck(ctx context.Context, vip netip.Prefix, c *checker) {
	interval := c.spec.Interval.Duration
	if interval <= 0 {
		interval = time.Second
	}
	rise, fall := max(c.spec.Rise, 1), max(c.spec.Fall, 1)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		err := probe(ctx, c.spec)
		if ctx.Err() != nil {
			return
		}
		m.mu.Lock()
		c.lastCheck = time.Now()
		changed := false
		if err == nil {
			c.okRun, c.failRun, c.lastErr = c.okRun+1, 0, ""
			if !c.healthy && c.okRun >= rise {
				c.healthy, changed = true, true
			}
		} else {
			c.okRun, c.failRun, c.lastErr = 0, c.failRun+1, err.Error()
			if c.healthy && c.failRun >= fall {
				c.healthy, changed = false, true
			}
		}
		healthy := c.healthy
		m.mu.Unlock()
		if changed {
			m.log.Info("VIP health changed", "vip", vip.String(), "healthy", healthy, "target", c.spec.Target, "err", err)
			m.poke()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probe runs one check: a TCP connect, or an HTTP GET that must answer
// 2xx or 3xx.
func probe(ctx context.Context, h config.VIPHealth) error {
	timeout := h.Timeout.Duration
	if timeout <= 0 {
		timeout = time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch h.Type {
	case "http":
		path := h.Path
		if path == "" {
			path = "/"
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+h.Target+path, nil)
		if err != nil {
			return fmt.Errorf("build health request: %w", err)
		}
		// Our own transport: no proxy from the environment, no idle
		// connections kept between checks.
		client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("http health check: %w", err)
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("http health check: status %d", resp.StatusCode)
		}
		return nil
	default:
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", h.Target)
		if err != nil {
			return fmt.Errorf("tcp health check: %w", err)
		}
		conn.Close()
		return nil
	}
}
