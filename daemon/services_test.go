package daemon

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/daemon/store"
)

type tableSink struct {
	mu sync.Mutex
	n  int
}

func (s *tableSink) SyncServices(service.Table) error {
	s.mu.Lock()
	s.n++
	s.mu.Unlock()
	return nil
}

// TestServicesSourcesAndMetrics feeds the service wiring a config source and
// store keys (a good one, one whose key is not its name, one outside
// vip_ranges, one that is not JSON) and reads the metrics.
func TestServicesSourcesAndMetrics(t *testing.T) {
	cfg := config.Default()
	cfg.Node.Name = "rwsc-h"
	cfg.BGP.VIPRanges = []string{"10.96.0.0/16"}
	cfg.Services = []config.Service{{Name: "web", VIP: "10.96.0.10", Port: 80, Protocol: "tcp", Backends: []string{"10.250.1.5:8080"}}}
	sink := &tableSink{}
	s, err := newServices(cfg, sink, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	p := store.ServicePrefix + cfg.Node.Cluster + "/"
	svcs, problems := s.storeServices([]store.KV{
		{Key: p + "db", Value: []byte(`{"name":"db","vip":"10.96.0.20","port":5432,"backends":["10.250.2.5:5432","10.250.2.6:5432"]}`)},
		{Key: p + "other", Value: []byte(`{"name":"db2","vip":"10.96.0.21","port":5432}`)},
		{Key: p + "far", Value: []byte(`{"name":"far","vip":"192.0.2.1","port":80}`)},
		{Key: p + "junk", Value: []byte(`{"name":`)},
		{Key: p + "extra", Value: []byte(`{"name":"extra","vip":"10.96.0.22","port":80,"weight":3}`)},
	})
	if len(svcs) != 1 || svcs[0].Name != "db" || len(problems) != 4 {
		t.Fatalf("storeServices = %+v, %q; want db only and four problems", svcs, problems)
	}
	s.m.Set(service.SourceStore, svcs, problems)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.m.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if t, ok, _ := s.m.Table(); ok && len(t.Services) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the table with web and db never reached the sink")
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newServiceCollector(s))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			got[mf.GetName()+"{"+strings.Join(ls, ",")+"}"] = m.GetGauge().GetValue()
		}
	}
	for k, v := range map[string]float64{
		"rackwire_service_backends{service=db,state=active}":       2,
		"rackwire_service_backends{service=db,state=critical}":     0,
		"rackwire_service_backends{service=web,state=active}":      1,
		"rackwire_service_backends{service=web,state=maintenance}": 0,
		"rackwire_service_problems{}":                              4,
		"rackwire_service_table_programmed{}":                      1,
		"rackwire_services{source=config}":                         1,
		"rackwire_services{source=store}":                          1,
		"rackwire_services{source=consul}":                         0,
	} {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
}
