package daemon

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/restart"
	"github.com/rackwire/rackwire/daemon/store"
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
	default:
		return nil, fmt.Errorf("store backend %q is not available in this build", cfg.Store.Backend)
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
	log.Info("cleanup: nothing to remove in this build")
	return nil
}
