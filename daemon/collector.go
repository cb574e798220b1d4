package daemon

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/metrics"
	"github.com/rackwire/rackwire/daemon/policysync"
)

// agentCollector exports the components' state on every scrape, read from
// their owners (datapath counters, endpoints, identities, BIRD), so that
// no second copy of that state is kept for metrics.
type agentCollector struct {
	a *agent

	dpPackets, dpBytes, endpoints, identities, policies *prometheus.Desc
	bgpUp, bgpExported, bgpImported, bgpDrained, vipUp  *prometheus.Desc

	epPolicy, polLoaded, polWrites, polWriteErrs, syncAge *prometheus.Desc
	ipcEntries, ipcFailing, refused, dupNode              *prometheus.Desc
	evReported, evSuppressed, evLost                      *prometheus.Desc
	hrPackets, hrBytes                                    *prometheus.Desc
}

func newAgentCollector(a *agent) *agentCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(metrics.Namespace+"_"+name, help, labels, nil)
	}
	return &agentCollector{
		a:           a,
		dpPackets:   d("datapath_packets_total", "Packets seen by the datapath, by verdict reason and direction.", "reason", "direction"),
		dpBytes:     d("datapath_bytes_total", "Bytes seen by the datapath, by verdict reason and direction.", "reason", "direction"),
		endpoints:   d("endpoints", "Endpoints on this host, by state.", "state"),
		identities:  d("identities", "Cluster identities known to this agent."),
		policies:    d("policies", "Policies in force."),
		bgpUp:       d("bgp_session_up", "1 when the BGP session to the peer is established.", "peer"),
		bgpExported: d("bgp_routes_exported", "Routes announced to the peer.", "peer"),
		bgpImported: d("bgp_routes_imported", "Routes learned from the peer.", "peer"),
		bgpDrained:  d("bgp_drained", "1 while this host is drained."),
		vipUp:       d("bgp_vip_announced", "1 while the VIP is announced (healthy and not drained).", "vip"),

		epPolicy:     d("endpoint_policy", "Endpoints by enforcement state: enforced, policy-pending (closed until the store is loaded), policy-error (closed: the policy could not be written).", "state"),
		polLoaded:    d("policy_loaded", "1 once the store's policies and identities are loaded and maps may be widened; 0 while maps keep their last state."),
		polWrites:    d("policy_map_writes_total", "Policy map writes (atomic swaps or no-ops) attempted."),
		polWriteErrs: d("policy_map_write_errors_total", "Policy map writes that failed (the direction was closed instead)."),
		syncAge:      d("policy_sync_age_seconds", "Seconds since the policy sync loop last finished a pass (the watchdog stops past 30 s)."),
		ipcEntries:   d("ipcache_entries", "Prefixes in the ipcache by the source whose entry is in force.", "source"),
		ipcFailing:   d("ipcache_writes_failing", "Ipcache prefixes whose last map write failed, retried every second."),
		refused:      d("store_records_refused", "Store records of other hosts refused by the checks, by reason.", "reason"),
		dupNode:      d("node_name_duplicate", "1 while another host publishes under this host's node name."),

		evReported:   d("events_reported_total", "Datapath events (drops, audit, traces) of the endpoint written for `rackwire monitor`.", "endpoint"),
		evSuppressed: d("events_suppressed_total", "Datapath events of the endpoint not reported because they exceeded its rate limit ([datapath] events_rate, events_burst); the packets were not affected.", "endpoint"),
		hrPackets:    d("host_routing_packets_total", "Packets of eBPF host routing by outcome: egress_forwarded, ingress_forwarded (the fast path to and from other hosts), or stack_* (left to the host stack, by why).", "outcome"),
		hrBytes:      d("host_routing_bytes_total", "Bytes of eBPF host routing by outcome, as host_routing_packets_total.", "outcome"),
		evLost:       d("events_lost_total", "Datapath events of the endpoint within its rate limit that the transport refused (full, or a perf array without a reader).", "endpoint"),
	}
}

func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.dpPackets, c.dpBytes, c.endpoints, c.identities, c.policies,
		c.bgpUp, c.bgpExported, c.bgpImported, c.bgpDrained, c.vipUp,
		c.epPolicy, c.polLoaded, c.polWrites, c.polWriteErrs, c.syncAge, c.ipcEntries, c.ipcFailing, c.refused, c.dupNode,
		c.evReported, c.evSuppressed, c.evLost, c.hrPackets, c.hrBytes} {
		ch <- d
	}
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	if ms, err := a.dp.Metrics(); err == nil {
		for _, m := range ms {
			ch <- prometheus.MustNewConstMetric(c.dpPackets, prometheus.CounterValue, float64(m.Packets), m.Reason.String(), m.Direction.String())
			ch <- prometheus.MustNewConstMetric(c.dpBytes, prometheus.CounterValue, float64(m.Bytes), m.Reason.String(), m.Direction.String())
		}
	}
	if hs, err := a.dp.HostRoutingCounters(); err == nil {
		for _, h := range hs {
			ch <- prometheus.MustNewConstMetric(c.hrPackets, prometheus.CounterValue, float64(h.Packets), h.Name)
			ch <- prometheus.MustNewConstMetric(c.hrBytes, prometheus.CounterValue, float64(h.Bytes), h.Name)
		}
	}
	if evs, err := a.dp.EventCounts(); err == nil {
		for _, e := range evs {
			ep := strconv.Itoa(int(e.Endpoint))
			ch <- prometheus.MustNewConstMetric(c.evReported, prometheus.CounterValue, float64(e.Reported), ep)
			ch <- prometheus.MustNewConstMetric(c.evSuppressed, prometheus.CounterValue, float64(e.Suppressed), ep)
			ch <- prometheus.MustNewConstMetric(c.evLost, prometheus.CounterValue, float64(e.Lost), ep)
		}
	}
	counts := map[endpoint.State]int{endpoint.StateReady: 0, endpoint.StatePending: 0}
	for _, ep := range a.eps.List() {
		counts[ep.State]++
	}
	for s, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.endpoints, prometheus.GaugeValue, float64(n), string(s))
	}
	ch <- prometheus.MustNewConstMetric(c.identities, prometheus.GaugeValue, float64(len(a.ids.List())))
	ch <- prometheus.MustNewConstMetric(c.policies, prometheus.GaugeValue, float64(len(a.pol.Policies())))
	sum := a.sync.Summary()
	for state, n := range map[string]int{policysync.StateEnforced: sum.Enforced, policysync.StatePending: sum.Pending, policysync.StateError: sum.Errors} {
		ch <- prometheus.MustNewConstMetric(c.epPolicy, prometheus.GaugeValue, float64(n), state)
	}
	ch <- prometheus.MustNewConstMetric(c.polLoaded, prometheus.GaugeValue, boolGauge(sum.Loaded))
	ch <- prometheus.MustNewConstMetric(c.polWrites, prometheus.CounterValue, float64(sum.Writes))
	ch <- prometheus.MustNewConstMetric(c.polWriteErrs, prometheus.CounterValue, float64(sum.WriteErrors))
	ch <- prometheus.MustNewConstMetric(c.syncAge, prometheus.GaugeValue, time.Since(a.sync.LastBeat()).Seconds())
	for src, n := range a.ipc.Stats() {
		ch <- prometheus.MustNewConstMetric(c.ipcEntries, prometheus.GaugeValue, float64(n), src.String())
	}
	ch <- prometheus.MustNewConstMetric(c.ipcFailing, prometheus.GaugeValue, float64(a.ipc.Failing()))
	for reason, n := range a.remote.rejections() {
		ch <- prometheus.MustNewConstMetric(c.refused, prometheus.GaugeValue, float64(n), reason)
	}
	ch <- prometheus.MustNewConstMetric(c.dupNode, prometheus.GaugeValue, boolGauge(a.remote.duplicateNode() != ""))
	if a.bgp == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st := a.bgp.Status(ctx)
	drained := 0.0
	if st.Drained {
		drained = 1
	}
	ch <- prometheus.MustNewConstMetric(c.bgpDrained, prometheus.GaugeValue, drained)
	for _, p := range st.Protocols {
		if p.Proto != "BGP" {
			continue
		}
		up := 0.0
		if p.BGPState == "Established" {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(c.bgpUp, prometheus.GaugeValue, up, p.Name)
		ch <- prometheus.MustNewConstMetric(c.bgpExported, prometheus.GaugeValue, float64(p.RoutesExported), p.Name)
		ch <- prometheus.MustNewConstMetric(c.bgpImported, prometheus.GaugeValue, float64(p.RoutesImported), p.Name)
	}
	for _, v := range st.VIPs {
		up := 0.0
		if v.Announced {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(c.vipUp, prometheus.GaugeValue, up, v.VIP)
	}
}
