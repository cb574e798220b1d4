package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/service"
	"github.com/rackwire/rackwire/daemon/service/catalog"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
)

// services wires the service table (docs/services.md): the merger with its
// three sources, the datapath as its Sink, and BGP as a subscriber.
//
// Sources: [[services]] (set at start and on reload), the store's
// state/services/v1/<cluster>/ prefix (a blocking watch, on the local store
// and on Consul alike), and on Consul the catalog watch against the local
// Consul agent (same address, TLS and token as [store]).
type services struct {
	log     *slog.Logger
	m       *service.Merger
	cat     *catalog.Watcher // nil without Consul
	limits  atomic.Pointer[service.Limits]
	cluster string
}

// newServices builds the merger for cfg. sink is the datapath when it
// balances services (nil: the table is served and announced only).
func newServices(cfg config.Config, sink service.Sink, log *slog.Logger) (*services, error) {
	s := &services{log: log, cluster: cfg.Node.Cluster}
	s.m = service.NewMerger(sink, selfOf(cfg), log)
	l := cfg.ServiceLimits()
	s.limits.Store(&l)
	for _, src := range []service.Source{service.SourceConfig, service.SourceStore} {
		s.m.Expect(src)
	}
	s.setConfig(cfg)
	if cfg.Store.Backend == "consul" {
		client, err := consul.NewAPIClient(consul.FromConfig(cfg.Store, cfg.Node.Name))
		if err != nil {
			return nil, fmt.Errorf("consul client for the service catalog: %w", err)
		}
		s.m.Expect(service.SourceConsul)
		s.cat = catalog.New(catalog.Options{
			Client: client, LimitsFunc: func() service.Limits { return *s.limits.Load() }, Log: log,
			Report: func(svcs []service.Service, problems []string) { s.m.Set(service.SourceConsul, svcs, problems) },
		})
	}
	return s, nil
}

func selfOf(cfg config.Config) service.Self {
	return service.Self{Node: cfg.Node.Name, CIDRs: cfg.Prefixes()}
}

// setConfig hands [[services]] to the merger (validated by config).
func (s *services) setConfig(cfg config.Config) {
	l := cfg.ServiceLimits()
	var out []service.Service
	var problems []string
	for _, spec := range cfg.ServiceSpecs() {
		out, problems = buildInto(out, problems, spec, service.SourceConfig, l, "service "+spec.Name)
	}
	s.m.Set(service.SourceConfig, out, problems)
}

// buildInto builds spec and appends it to out, or what is wrong with it to
// problems (each line starting with where).
func buildInto(out []service.Service, problems []string, spec service.Spec, src service.Source, l service.Limits, where string) ([]service.Service, []string) {
	svc, skipped, err := spec.Build(src, l)
	if err != nil {
		return out, append(problems, fmt.Sprintf("%s: %v", where, err))
	}
	for _, p := range skipped {
		problems = append(problems, fmt.Sprintf("%s: %s", where, p))
	}
	return append(out, svc), problems
}

// reload applies a new config: [[services]], what counts as local, and
// the limits ([bgp] vip_ranges), which the store and Consul data meet
// from their next change on.
func (s *services) reload(next config.Config) {
	l := next.ServiceLimits()
	s.limits.Store(&l)
	s.m.SetSelf(selfOf(next))
	s.setConfig(next)
}

// storeServices turns the store's service keys into services; a key whose
// value is not a valid spec named like the key is skipped with a problem.
func (s *services) storeServices(kvs []store.KV) ([]service.Service, []string) {
	l := *s.limits.Load()
	prefix := store.ServicePrefix + s.cluster + "/"
	var out []service.Service
	var problems []string
	for _, kv := range kvs {
		name := strings.TrimPrefix(kv.Key, prefix)
		var spec service.Spec
		dec := json.NewDecoder(strings.NewReader(string(kv.Value)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&spec); err != nil {
			problems = append(problems, fmt.Sprintf("key %s: not a service (%v)", kv.Key, err))
			continue
		}
		if spec.Name != name {
			problems = append(problems, fmt.Sprintf("key %s: holds service %q; the key must be the name", kv.Key, spec.Name))
			continue
		}
		out, problems = buildInto(out, problems, spec, service.SourceStore, l, "key "+kv.Key)
	}
	return out, problems
}

// wireServices builds the service table with the datapath as its Sink, and
// makes BGP follow it. A datapath that cannot balance services (a build
// without the service maps) leaves the table served but neither programmed
// nor announced: a VIP that nothing answers on is never advertised.
func (a *agent) wireServices(cfg config.Config, log *slog.Logger) error {
	sink, ok := any(a.dp).(service.Sink)
	if !ok {
		log.Warn("this build's datapath does not balance services; the service table is listed but neither programmed nor announced")
	}
	var err error
	if a.svc, err = newServices(cfg, sink, log.With("subsys", "service")); err != nil {
		return err
	}
	if a.bgp != nil && sink != nil {
		a.svc.m.Subscribe(func(service.Table) { a.reannounceServiceVIPs() })
	}
	return nil
}

// reannounceServiceVIPs hands BGP the VIPs this host may announce, from
// the newest table the datapath took: none while north-south balancing
// does not run (nothing would answer on them; e.g. before rw_from_uplink
// is on an uplink). Called after every table the datapath took and after
// the uplinks changed; annMu keeps an older call from overwriting a newer.
func (a *agent) reannounceServiceVIPs() {
	if a.svc == nil || a.bgp == nil {
		return
	}
	a.annMu.Lock()
	defer a.annMu.Unlock()
	t, synced, _ := a.svc.m.Table()
	if !synced {
		return
	}
	if on, why := a.dp.NorthSouth(); !on {
		if vips := t.AnnounceVIPs(); len(vips) > 0 && a.nsWanted.Load() {
			a.log.Info("service VIPs are not announced while north-south balancing is off", "why", why, "vips", len(vips))
		}
		a.bgp.SetServiceVIPs(nil)
		return
	}
	a.bgp.SetServiceVIPs(t.AnnounceVIPs())
}

// serviceLoops returns the goroutines of the service table.
func (a *agent) serviceLoops() []func(context.Context) {
	s := a.svc
	loops := []func(context.Context){
		s.m.Run,
		func(ctx context.Context) {
			a.watchAnchored(ctx, store.ServicePrefix+s.cluster+"/", func(kvs []store.KV) {
				svcs, problems := s.storeServices(kvs)
				s.m.Set(service.SourceStore, svcs, problems)
			})
		},
	}
	if s.cat != nil {
		loops = append(loops, s.cat.Run)
	}
	return loops
}

func (a *agent) serviceRoutes(h route) {
	h(api.Read, "GET /v1/services", func(r *http.Request) (any, error) {
		t, programmed, errText := a.svc.m.Table()
		out := api.ServiceList{Services: []api.Service{}, Programmed: programmed, Error: errText, Problems: nonNil(a.svc.m.Problems())}
		for _, s := range t.Services {
			out.Services = append(out.Services, apiService(s))
		}
		return out, nil
	})
	h(api.Read, "GET /v1/services/{name}", func(r *http.Request) (any, error) {
		t, _, _ := a.svc.m.Table()
		s, ok := t.Lookup(r.PathValue("name"))
		if !ok {
			return nil, api.Errorf(http.StatusNotFound, "list them with `rackwire service list`", "no service named %q is in the table", r.PathValue("name"))
		}
		return apiService(s), nil
	})
	h(api.Admin, "POST /v1/services", func(r *http.Request) (any, error) {
		var in api.ServiceSpec
		if err := api.DecodeBody(r, &in); err != nil {
			return nil, err
		}
		return a.addService(r.Context(), service.Spec(in))
	})
	h(api.Admin, "DELETE /v1/services/{name}", func(r *http.Request) (any, error) {
		if err := a.deleteService(r.Context(), r.PathValue("name")); err != nil {
			return nil, err
		}
		return api.Deleted{Deleted: r.PathValue("name")}, nil
	})
}

func apiService(s service.Service) api.Service {
	out := api.Service{Name: s.Name, Frontend: s.Frontend.String(), VIP: s.Frontend.VIP.String(), Port: int(s.Frontend.Port),
		Protocol: s.Frontend.Proto.String(), Source: string(s.Source), Total: len(s.Backends), Backends: []api.ServiceBackend{}}
	for _, b := range s.Backends {
		if b.State == service.StateActive {
			out.Active++
		}
		out.Backends = append(out.Backends, api.ServiceBackend{Address: b.AddrPort().String(), Node: b.Node, Local: b.Local, State: string(b.State), Source: string(b.Source)})
	}
	return out
}

// addService stores spec cluster-wide after checking it as the agents will
// (a bad spec is refused here, not skipped later on every host).
func (a *agent) addService(ctx context.Context, spec service.Spec) (api.Service, error) {
	if spec.Protocol == "" {
		spec.Protocol = "tcp"
	}
	svc, skipped, err := spec.Build(service.SourceStore, *a.svc.limits.Load())
	if err != nil {
		return api.Service{}, api.Errorf(http.StatusBadRequest, "", "%v", err)
	}
	if len(skipped) > 0 {
		return api.Service{}, api.Errorf(http.StatusBadRequest, "fix or remove those backends", "%s", strings.Join(skipped, "; "))
	}
	t, _, _ := a.svc.m.Table()
	for _, s := range t.Services {
		if s.Source == service.SourceConfig && (s.Name == spec.Name || s.Frontend == svc.Frontend) {
			return api.Service{}, api.Errorf(http.StatusConflict, "[[services]] of this host's config wins over the store; pick another name or frontend, or change the config",
				"service %s (%s) of the config already has that name or frontend", s.Name, s.Frontend)
		}
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return api.Service{}, fmt.Errorf("encode service %s: %w", spec.Name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := a.st.Put(ctx, store.ServiceKey(a.cfg.Node.Cluster, spec.Name), b, store.PutOptions{}); err != nil {
		return api.Service{}, api.Errorf(http.StatusServiceUnavailable, "check the store with `rackwire status`", "store service %s: %v", spec.Name, err)
	}
	a.log.Info("service stored", "service", spec.Name, "frontend", svc.Frontend.String(), "backends", len(svc.Backends))
	return apiService(svc), nil
}

func (a *agent) deleteService(ctx context.Context, name string) error {
	if err := service.CheckName(name); err != nil {
		return api.Errorf(http.StatusBadRequest, "", "%v", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	key := store.ServiceKey(a.cfg.Node.Cluster, name)
	if _, err := a.st.Get(ctx, key); errors.Is(err, store.ErrNotFound) {
		hint := "list them with `rackwire service list`"
		t, _, _ := a.svc.m.Table()
		if s, ok := t.Lookup(name); ok {
			hint = fmt.Sprintf("it comes from %s: remove it there (config: [[services]]; consul: deregister or drop its rackwire_vip meta)", s.Source)
		}
		return api.Errorf(http.StatusNotFound, hint, "no stored service named %q", name)
	} else if err != nil {
		return api.Errorf(http.StatusServiceUnavailable, "check the store with `rackwire status`", "read service %s: %v", name, err)
	}
	if err := a.st.Delete(ctx, key); err != nil {
		return api.Errorf(http.StatusServiceUnavailable, "check the store with `rackwire status`", "delete service %s: %v", name, err)
	}
	a.log.Info("service deleted from the store", "service", name)
	return nil
}
