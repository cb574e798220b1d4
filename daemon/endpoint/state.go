package endpoint

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/rackwire/rackwire/internal/atomicfile"

	"github.com/rackwire/rackwire/daemon/identity"
)

// stateVersion is the version of the state file format.
const stateVersion = 1

// stateFile is the JSON document in <state_dir>/endpoints/NNNNN.json.
type stateFile struct {
	Version  int      `json:"version"`
	Endpoint Endpoint `json:"endpoint"`
}

var stateName = regexp.MustCompile(`^([0-9]{5})\.json$`)

func statePath(dir string, id uint16) string {
	return filepath.Join(dir, fmt.Sprintf("%05d.json", id))
}

// writeState writes an endpoint's state file atomically: a temp file in the
// same directory, fsync, rename over the old one, fsync of the directory. A
// crash leaves the old file or the new one, never a torn one.
func writeState(dir string, ep Endpoint) error {
	b, err := json.MarshalIndent(stateFile{Version: stateVersion, Endpoint: ep}, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state of endpoint %d: %w", ep.ID, err)
	}
	b = append(b, '\n')
	if err := atomicfile.Write(statePath(dir, ep.ID), b, atomicfile.Options{Mode: 0o600}); err != nil {
		return fmt.Errorf("write state of endpoint %d: %w", ep.ID, err)
	}
	return nil
}

func removeState(dir string, id uint16) error {
	if err := os.Remove(statePath(dir, id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove state file: %w", err)
	}
	return atomicfile.SyncDir(dir)
}

// loadStates reads every state file of dir. A file that does not decode or
// does not describe a sane endpoint is renamed to NAME.corrupt-UNIXTIME and
// reported in corrupt; a leftover temp file is removed. Two files that claim
// the same name or address keep the lower id and move the other aside.
func loadStates(dir string, log *slog.Logger) (eps []Endpoint, corrupt []string, err error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("read state dir: %w", err)
	}
	names := map[string]uint16{}
	addrs := map[string]uint16{}
	for _, de := range des {
		n := de.Name()
		if filepath.Ext(n) == ".tmp" {
			os.Remove(filepath.Join(dir, n))
			continue
		}
		m := stateName.FindStringSubmatch(n)
		if m == nil || !de.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, n)
		ep, perr := parseState(path, m[1])
		if perr == nil {
			if other, dup := names[ep.Name]; dup {
				perr = fmt.Errorf("name %q is also endpoint %d's", ep.Name, other)
			}
			for _, a := range ep.IPs() {
				if other, dup := addrs[a.String()]; dup {
					perr = fmt.Errorf("address %s is also endpoint %d's", a, other)
				}
			}
		}
		if perr != nil {
			aside := fmt.Sprintf("%s.corrupt-%d", path, time.Now().Unix())
			if rerr := os.Rename(path, aside); rerr != nil {
				return nil, nil, fmt.Errorf("move corrupt state file %s aside: %w", path, rerr)
			}
			log.Error("corrupt endpoint state file moved aside; its endpoint is not restored, delete its veth by hand if it still exists",
				"file", path, "moved_to", aside, "err", perr)
			corrupt = append(corrupt, path)
			continue
		}
		names[ep.Name] = ep.ID
		for _, a := range ep.IPs() {
			addrs[a.String()] = ep.ID
		}
		eps = append(eps, ep)
	}
	return eps, corrupt, nil
}

func parseState(path, idStr string) (Endpoint, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Endpoint{}, err
	}
	var sf stateFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sf); err != nil {
		return Endpoint{}, fmt.Errorf("decode: %w", err)
	}
	if sf.Version != stateVersion {
		return Endpoint{}, fmt.Errorf("version %d, this agent reads %d", sf.Version, stateVersion)
	}
	ep := sf.Endpoint
	id, _ := strconv.Atoi(idStr)
	if id < 1 || id > 65535 || uint16(id) != ep.ID {
		return Endpoint{}, fmt.Errorf("file name says id %s, content says %d", idStr, ep.ID)
	}
	if err := checkName(ep.Name); err != nil {
		return Endpoint{}, err
	}

	if ep.Labels, err = checkLabels(ep.Labels); err != nil {
		return Endpoint{}, err
	}
	// Identity labels go to the allocator at Restore: the same checks as
	// Add's (canonical order, no reserved: keys).
	if ep.IdentityLabels, err = checkLabels(ep.IdentityLabels); err != nil {
		return Endpoint{}, fmt.Errorf("identity labels: %w", err)
	}
	switch ep.State {
	case StateLost:
	case StateCreating, StateReady:
		if ep.Pending != "" {
			return Endpoint{}, fmt.Errorf("state %q with a pending reason", ep.State)
		}
	case StatePending:
		if len(ep.IdentityLabels) != 0 {
			return Endpoint{}, fmt.Errorf("state %q with identity labels", ep.State)
		}
	default:
		return Endpoint{}, fmt.Errorf("unknown state %q", ep.State)
	}
	if err := checkDocker(ep.Docker); err != nil {
		return Endpoint{}, err
	}
	if ep.IPv4.IsValid() && !ep.IPv4.Is4() || ep.IPv6.IsValid() && !ep.IPv6.Is6() {
		return Endpoint{}, fmt.Errorf("address of the wrong family")
	}
	if err := CheckAttachment(ep.IfName, ep.ContainerID, ep.Network); err != nil {
		return Endpoint{}, err
	}
	if len(ep.IPs()) == 0 || ep.HostIfName == "" {
		return Endpoint{}, fmt.Errorf("no address or no host interface")
	}
	return ep, nil
}

// checkLabels validates and canonicalises an endpoint's labels. Keys in the
// "reserved:" namespace name the reserved identities (host, world, ...): a
// workload that could set them could claim to be the host.
func checkLabels(ls identity.Labels) (identity.Labels, error) {
	m := make(map[string]string, len(ls))
	for _, l := range ls {
		if strings.HasPrefix(l.Key, "reserved:") {
			return nil, fmt.Errorf("%w: %q is a reserved identity's label and cannot be set on an endpoint", identity.ErrBadLabels, l.Key)
		}
		if _, dup := m[l.Key]; dup {
			return nil, fmt.Errorf("%w: label %q given twice", identity.ErrBadLabels, l.Key)
		}
		m[l.Key] = l.Value
	}
	return identity.NewLabels(m)
}
