// Package daemon wires the rackwire agent: it owns one Daemon value that
// holds every component (store, identity allocator, policy engine, endpoint
// manager, datapath, BGP manager, API server, metrics), builds them in New
// and runs them in Run. It is the one place where components meet; they do
// not know each other.
//
// Lifecycle (systemd Type=notify):
//   - READY=1 is sent only once the API socket is serving and the datapath
//     and endpoints are restored; STATUS= lines say what the agent does.
//   - WATCHDOG=1 is sent at half of WATCHDOG_USEC when set.
//   - SIGHUP reloads the config: a bad file is logged and the running config
//     stays; a good one is applied as a difference (RELOADING=1, READY=1).
//   - SIGTERM/SIGINT stop gracefully (STOPPING=1). Stopping never touches the
//     datapath: pinned maps and attached programs keep forwarding.
//     `rackwired cleanup` is the explicit way to remove them.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/metrics"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/version"
)

// Options carry what the command line knows beyond the config.
type Options struct {
	// ConfigPath is re-read on SIGHUP.
	ConfigPath string
	// Level is the logger's level, changed on reload.
	Level *slog.LevelVar
	// Notify sends sd_notify messages; nil uses $NOTIFY_SOCKET.
	Notify func(state string)
}

// Daemon is the running agent.
type Daemon struct {
	log   *slog.Logger
	opts  Options
	start time.Time

	// mu guards cfg and the reload bookkeeping below; components hold
	// their own copies of what they need.
	mu          sync.Mutex
	cfg         config.Config
	reloads     int
	lastReload  time.Time
	reloadError string

	store   store.Store
	agent   *agent
	metrics *metrics.Registry
	mux     *http.ServeMux

	metricsStop context.CancelFunc

	// stallAge reports how long the sync loop has gone without finishing a
	// pass, once it runs (the watchdog's liveness check).
	stallAge func() (time.Duration, bool)

	// Filled by the components' wiring in New; read-only after.
	reloaders []reloader
	statusers []func(ctx context.Context, st *api.Status)
}

// New builds the agent's components from cfg. It opens the store and loads
// the datapath; it does not start serving.
func New(ctx context.Context, cfg config.Config, log *slog.Logger, opts Options) (*Daemon, error) {
	if opts.Notify == nil {
		opts.Notify = func(state string) { _, _ = sddaemon.SdNotify(false, state) }
	}
	d := &Daemon{log: log, opts: opts, cfg: cfg, start: time.Now()}
	d.metrics = metrics.New(version.Version, version.Commit(), d.start)
	countGateDecision(cfg.Agent.StateDir, d.metrics)

	d.notifyStatus("opening store (%s)", cfg.Store.Backend)
	st, err := openStore(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	d.store = st

	d.notifyStatus("loading datapath into %s", cfg.Datapath.PinDir)
	ag, err := newAgent(ctx, cfg, st, log)
	if err != nil {
		st.Close()
		return nil, err
	}
	d.agent = ag
	d.stallAge = func() (time.Duration, bool) {
		if !ag.started.Load() {
			return 0, false
		}
		return time.Since(ag.sync.LastBeat()), true
	}
	d.reloaders = append(d.reloaders, ag.reload)
	d.statusers = append(d.statusers, ag.status)
	d.metrics.MustRegister(newAgentCollector(ag))
	d.metrics.MustRegister(newServiceCollector(ag.svc))

	d.mux = http.NewServeMux()
	d.agentRoutes()
	return d, nil
}

// Run serves until ctx ends or SIGTERM/SIGINT, handling SIGHUP as reload.
func (d *Daemon) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()

	// Signals are ours before READY=1: a reload sent the moment systemd
	// sees READY must not kill the agent with SIGHUP's default action.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	cfg := d.config()
	l, err := api.Listen(cfg.Agent.Socket, cfg.Agent.SocketGroup)
	if err != nil {
		return err
	}
	// Timeouts, header and body limits: see api.NewServer.
	srv := api.NewServer(d.mux, ctx)
	srv.ConnContext = api.ConnContext
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("api server stopped", "err", err)
		}
	}()
	defer func() {
		sctx, c := context.WithTimeout(context.Background(), 3*time.Second)
		defer c()
		_ = srv.Shutdown(sctx)
		_ = os.Remove(cfg.Agent.Socket)
	}()

	if err := d.startMetrics(ctx, cfg.Metrics.Listen); err != nil {
		return err
	}

	wg.Add(1)
	go func() { defer wg.Done(); d.watchdog(ctx) }()
	if err := d.agent.start(ctx, &wg, d.notifyStatus); err != nil {
		return err
	}
	wg.Add(1)
	go func() { defer wg.Done(); d.watchStoreHealth(ctx) }()

	d.opts.Notify("READY=1")
	d.notifyStatus("serving on %s; store %s", cfg.Agent.Socket, cfg.Store.Backend)
	markReady(cfg.Agent.StateDir, d.log)
	d.log.Info("agent ready", "socket", cfg.Agent.Socket, "store", cfg.Store.Backend, "node", cfg.Node.Name, "version", version.Version)

	for {
		select {
		case <-ctx.Done():
			d.stopping("context cancelled")
			return nil
		case s := <-sigs:
			if s == syscall.SIGHUP {
				d.reload(ctx)
				continue
			}
			d.stopping("signal " + s.String())
			return nil
		}
	}
}

func (d *Daemon) stopping(why string) {
	d.opts.Notify("STOPPING=1")
	d.notifyStatus("stopping (%s); the datapath stays in place", why)
	d.log.Info("agent stopping; datapath left in place", "reason", why)
}

// Close releases the components' resources. It never removes the datapath.
func (d *Daemon) Close() error {
	var errs []error
	if d.agent != nil {
		d.agent.close()
	}
	if d.store != nil {
		// A restart must not look like a host leaving the cluster: the
		// Consul session (and every key it holds) is left for the next
		// run to take over; only its TTL ends it if this host never
		// comes back.
		if s, ok := d.store.(interface{ Stop() string }); ok {
			s.Stop()
		} else {
			errs = append(errs, d.store.Close())
		}
	}
	return errors.Join(errs...)
}

func (d *Daemon) config() config.Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg
}

func (d *Daemon) notifyStatus(format string, args ...any) {
	d.opts.Notify("STATUS=" + fmt.Sprintf(format, args...))
}

// syncStallLimit is how long the policy sync loop may go without finishing
// a pass before the agent counts as wedged: the watchdog stops being
// pinged, so systemd restarts the agent, which re-adopts the datapath.
const syncStallLimit = 30 * time.Second

// watchdog pings systemd at half the interval it asked for, as long as the
// sync loop is alive.
func (d *Daemon) watchdog(ctx context.Context) {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return
	}
	t := time.NewTicker(time.Duration(usec) * time.Microsecond / 2)
	defer t.Stop()
	d.opts.Notify("WATCHDOG=1")
	stalled := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if since, ok := d.stallAge(); ok && since > syncStallLimit {
			if !stalled {
				d.log.Error("the policy sync loop is stuck; no longer pinging the systemd watchdog, so systemd restarts the agent (forwarding continues)",
					"stuck_for", since.Truncate(time.Second))
			}
			stalled = true
			continue
		}
		stalled = false
		d.opts.Notify("WATCHDOG=1")
	}
}

func (d *Daemon) watchStoreHealth(ctx context.Context) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	last := ""
	for {
		h := d.store.Health()
		if h.State == store.StateOK {
			d.metrics.StoreUp.Set(1)
		} else {
			d.metrics.StoreUp.Set(0)
		}
		if h.State != last {
			if last != "" {
				d.log.Info("store state changed", "state", h.State, "was", last, "err", h.Error)
			}
			last = h.State
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (d *Daemon) startMetrics(ctx context.Context, addr string) error {
	if d.metricsStop != nil {
		d.metricsStop()
		d.metricsStop = nil
	}
	if addr == "" {
		return nil
	}
	mctx, cancel := context.WithCancel(ctx)
	bound, _, err := d.metrics.Serve(mctx, addr)
	if err != nil {
		cancel()
		return err
	}
	d.metricsStop = cancel
	d.log.Info("metrics serving", "addr", bound.String())
	return nil
}
