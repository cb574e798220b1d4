// Package metrics is the agent's Prometheus endpoint ([metrics] listen,
// default 127.0.0.1:9962) and the collectors every component registers on.
//
// It owns one registry per agent (no global default registry, so tests and
// several agents in one process do not collide). Components receive the
// *Registry and add their own collectors under the "rackwire_" namespace.
// An address already in use at start is an error the agent reports; the
// listener stops with the agent.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every metric.
const Namespace = "rackwire"

// Registry holds the agent's metrics.
type Registry struct {
	*prometheus.Registry

	Reloads       *prometheus.CounterVec // result=ok|failed
	GateDecisions *prometheus.CounterVec // decision, reason
	StoreUp       prometheus.Gauge
}

// New builds the registry with the agent-wide metrics: build info, uptime
// (via process start time), reloads, restart-gate decisions, store health.
func New(version, commit string, start time.Time) *Registry {
	r := &Registry{Registry: prometheus.NewRegistry()}
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	bi := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "build_info", Help: "Build information; the value is always 1.",
		ConstLabels: prometheus.Labels{"version": version, "commit": commit},
	})
	bi.Set(1)
	up := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "agent_uptime_seconds", Help: "Seconds since the agent started.",
	}, func() float64 { return time.Since(start).Seconds() })
	r.Reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "config_reloads_total", Help: "Config reloads on SIGHUP, by result.",
	}, []string{"result"})
	r.Reloads.WithLabelValues("ok")
	r.Reloads.WithLabelValues("failed")
	r.GateDecisions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "restart_gate_decisions_total",
		Help: "Decisions of the prestart gate that led to this agent's start, by decision and reason.",
	}, []string{"decision", "reason"})
	r.StoreUp = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "store_healthy", Help: "1 when the key-value store is reachable and healthy.",
	})
	r.MustRegister(bi, up, r.Reloads, r.GateDecisions, r.StoreUp)
	return r
}

// Serve listens on addr and serves /metrics until ctx ends. It returns once
// the listener is bound, so a busy port is reported at start.
func (r *Registry) Serve(ctx context.Context, addr string) (net.Addr, <-chan error, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("listen for metrics on %s: %w (set [metrics] listen to a free address, or \"\" to disable)", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(r.Registry, promhttp.HandlerOpts{Registry: r.Registry}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(l)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	return l.Addr(), done, nil
}
