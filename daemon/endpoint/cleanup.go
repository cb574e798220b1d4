package endpoint

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
)

// RemoveAll deletes the host-side veth of every endpoint recorded under
// opts.StateDir, then the endpoint state itself. It is what `rackwired
// cleanup` runs: the only way endpoints lose connectivity on purpose. It
// does not touch identities or the store.
func RemoveAll(opts Options, log *slog.Logger) error {
	dir := filepath.Join(opts.StateDir, "endpoints")
	h, err := openHost(opts.HostNetns)
	if err != nil {
		return err
	}
	defer h.close()
	eps, _, err := loadStates(dir, log)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var errs []error
	for _, ep := range eps {
		if err := h.unplumb(ep.HostIfName); err != nil {
			errs = append(errs, err)
			continue
		}
		log.Info("endpoint removed", "endpoint_id", ep.ID, "endpoint", ep.Name, "ifname", ep.HostIfName)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove endpoint state: %w", err)
	}
	return nil
}
