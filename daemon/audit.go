package daemon

import (
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"sort"
	"sync"

	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/internal/atomicfile"
)

// auditSet owns per-endpoint audit mode (by endpoint name), persisted in
// <state_dir>/endpoint-audit.json so that it survives a restart. The global
// [datapath] policy_audit_mode puts every endpoint in audit mode.
type auditSet struct {
	file   string
	global bool
	log    *slog.Logger

	mu    sync.Mutex // guards names and the file
	names map[string]bool
}

func newAuditSet(file string, global bool, log *slog.Logger) *auditSet {
	return &auditSet{file: file, global: global, log: log, names: map[string]bool{}}
}

// on reports whether the endpoint named name is in audit mode.
func (s *auditSet) on(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.global || s.names[name]
}

// load reads the persisted set; a corrupt file means no endpoint is in
// audit mode, which is the closed choice.
func (s *auditSet) load() []string {
	b, err := os.ReadFile(s.file)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("cannot read per-endpoint audit state; no endpoint is in audit mode", "err", err)
		}
		return nil
	}
	var names []string
	if err := json.Unmarshal(b, &names); err != nil {
		s.log.Warn("per-endpoint audit state is corrupt; no endpoint is in audit mode", "file", s.file, "err", err)
		return nil
	}
	return names
}

// set records name's audit mode and persists the set.
func (s *auditSet) set(name string, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.names[name] == on {
		return
	}
	if on {
		s.names[name] = true
	} else {
		delete(s.names, name)
	}
	s.saveLocked()
}

// forget drops a deleted endpoint's audit mode.
func (s *auditSet) forget(name string) { s.set(name, false) }

func (s *auditSet) saveLocked() {
	names := make([]string, 0, len(s.names))
	for n := range s.names {
		names = append(names, n)
	}
	sort.Strings(names)
	b, _ := json.Marshal(names)
	if err := atomicfile.Write(s.file, b, atomicfile.Options{Mode: 0o644}); err != nil {
		s.log.Warn("cannot persist per-endpoint audit mode; it lasts until the agent restarts", "err", err)
	}
}

// restoreAudit re-applies per-endpoint audit mode after a restart (the
// endpoint restore writes the global setting into rw_endpoints).
func (a *agent) restoreAudit() {
	for _, n := range a.audit.load() {
		ep, err := a.eps.Get(n)
		if err != nil {
			continue
		}
		if err := a.dp.SetAudit(ep.ID, true); err != nil {
			a.log.Warn("cannot restore audit mode", "endpoint", n, "err", err)
			continue
		}
		a.audit.set(n, true)
		a.sync.Upsert(a.syncEndpoint(ep))
	}
}

// setAudit puts one endpoint in or out of audit mode and persists it.
func (a *agent) setAudit(nameOrID string, on bool) (endpoint.Endpoint, error) {
	ep, err := a.endpoint(nameOrID)
	if err != nil {
		return ep, err
	}
	if err := a.dp.SetAudit(ep.ID, on || a.cfg.Datapath.PolicyAuditMode); err != nil {
		return ep, err
	}
	a.audit.set(ep.Name, on)
	a.log.Warn("endpoint audit mode changed", "endpoint", ep.Name, "endpoint_id", ep.ID, "audit", on)
	a.sync.Upsert(a.syncEndpoint(ep))
	a.sync.Sync()
	return ep, nil
}
