package daemon

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rackwire/rackwire/daemon/metrics"
	"github.com/rackwire/rackwire/daemon/service"
)

// serviceCollector exports the service table on every scrape, read from
// the merger (the table's one owner).
type serviceCollector struct {
	s                                        *services
	services, backends, programmed, problems *prometheus.Desc
}

func newServiceCollector(s *services) *serviceCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(metrics.Namespace+"_"+name, help, labels, nil)
	}
	return &serviceCollector{
		s:          s,
		services:   d("services", "Services in this host's table, by source (config, store, consul).", "source"),
		backends:   d("service_backends", "Backends of the service by state; only active ones take new connections (0 active: clients get no backend).", "service", "state"),
		programmed: d("service_table_programmed", "1 when the datapath took the newest service table; 0 while it refuses it (the previous one stays in force)."),
		problems:   d("service_problems", "Services, instances and backends the sources currently leave out (bad VIP, range, port, protocol, cap, conflicts); see `rackwire service list --json`."),
	}
}

func (c *serviceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.services
	ch <- c.backends
	ch <- c.programmed
	ch <- c.problems
}

func (c *serviceCollector) Collect(ch chan<- prometheus.Metric) {
	t, programmed, _ := c.s.m.Table()
	bySource := map[service.Source]int{service.SourceConfig: 0, service.SourceStore: 0, service.SourceConsul: 0}
	for _, s := range t.Services {
		bySource[s.Source]++
		n := map[service.State]int{service.StateActive: 0, service.StateCritical: 0, service.StateMaint: 0}
		for _, b := range s.Backends {
			n[b.State]++
		}
		for st, v := range n {
			ch <- prometheus.MustNewConstMetric(c.backends, prometheus.GaugeValue, float64(v), s.Name, string(st))
		}
	}
	for src, v := range bySource {
		ch <- prometheus.MustNewConstMetric(c.services, prometheus.GaugeValue, float64(v), string(src))
	}
	p := 0.0
	if programmed {
		p = 1
	}
	ch <- prometheus.MustNewConstMetric(c.programmed, prometheus.GaugeValue, p)
	ch <- prometheus.MustNewConstMetric(c.problems, prometheus.GaugeValue, float64(len(c.s.m.Problems())))
}
