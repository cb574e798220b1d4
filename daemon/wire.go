package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/datapath"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/metrics"
	"github.com/rackwire/rackwire/daemon/restart"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/daemon/store/local"
)

func openStore(ctx context.Context, cfg config.Config, log *slog.Logger) (store.Store, error) {
	switch cfg.Store.Backend {
	case "local":
		s, err := local.Open(cfg.StorePath(), log.With("subsys", "store"))
		if err != nil {
			return nil, fmt.Errorf("open local store: %w", err)
		}
		return s, nil
	case "consul":
		opts := consul.FromConfig(cfg.Store, cfg.Node.Name)
		// Reconnect within seconds of Consul's return (jittered, so a
		// fleet does not come back in one burst), not after a minute.
		opts.BackoffMax = 15 * time.Second
		s, err := consul.New(opts, log.With("subsys", "store"))
		if err != nil {
			return nil, fmt.Errorf("open consul store: %w", err)
		}
		return s, nil
	default:
		return nil, fmt.Errorf("store backend %q is not available in this build", cfg.Store.Backend)
	}
}

// journaledMarkFile, in the state dir, says that every own ipcache write
// of the previous run reached the change log (publish.SetJournaledMark).
const journaledMarkFile = "publish-journaled"

// countGateDecision exports the prestart gate's decision for this start.
func countGateDecision(stateDir string, m *metrics.Registry) {
	if reason, delayed := restart.LastReason(stateDir); reason != "" {
		decision := "start"
		if delayed {
			decision = "delay"
		}
		m.GateDecisions.WithLabelValues(decision, reason).Inc()
	}
}

func markReady(stateDir string, log *slog.Logger) {
	if err := restart.MarkReady(stateDir); err != nil {
		log.Warn("cannot record the ready start for the restart gate", "err", err)
	}
}

// Cleanup removes everything the agent created on this host: endpoints'
// links, attached programs, pinned maps. It is the only code path that cuts
// traffic, and runs only on an explicit `rackwired cleanup`.
func Cleanup(ctx context.Context, cfg config.Config, log *slog.Logger) error {
	var errs []error
	if err := endpoint.RemoveAll(endpoint.OptionsFromConfig(&cfg), log); err != nil {
		errs = append(errs, fmt.Errorf("remove endpoints: %w", err))
	}
	if err := datapath.Cleanup(cfg.Datapath.PinDir); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("cleanup done: endpoints, programs and pinned maps removed", "pin_dir", cfg.Datapath.PinDir)
	return nil
}
