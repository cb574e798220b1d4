package daemon

import (
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/docker"
)

// startDocker serves the Docker network and IPAM driver ([docker] enabled)
// once the endpoints are restored, and runs its resolver and reconciler
// (daemon/docker). Its socket is root's alone: whoever can call it plugs
// endpoints.
func (a *agent) startDocker(ctx context.Context, wg *sync.WaitGroup) error {
	if !a.cfg.Docker.Enabled {
		return nil
	}
	drv := docker.New(a.eps, docker.Options{Socket: a.cfg.Docker.Socket, EngineSocket: a.cfg.Docker.EngineSocket, Log: a.log})
	l, err := api.Listen(a.cfg.Docker.Socket, "")
	if err != nil {
		return fmt.Errorf("docker plugin: %w", err)
	}
	if err := os.Chmod(a.cfg.Docker.Socket, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("docker plugin: chmod socket: %w", err)
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := drv.Serve(ctx, l); err != nil {
			a.log.Error("docker plugin server stopped", "err", err)
		}
		_ = os.Remove(a.cfg.Docker.Socket)
	}()
	go func() { defer wg.Done(); drv.Run(ctx) }()
	a.log.Info("docker network and IPAM driver serving", "socket", a.cfg.Docker.Socket, "driver", drv.Name(),
		"engine_socket", a.cfg.Docker.EngineSocket)
	return nil
}
