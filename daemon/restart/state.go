package restart

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/rackwire/rackwire/internal/atomicfile"
)

// maxStateSize bounds what load reads; the real file is a few hundred bytes.
const maxStateSize = 64 * 1024

// maxFailures is the largest failure count load accepts; the count
// saturates there, so that the gate never writes a state it then refuses.
const maxFailures = 1_000_000

// load reads and checks the state file. A missing file returns an error
// matching fs.ErrNotExist.
func load(path string) (state, error) {
	var st state
	f, err := os.Open(path)
	if err != nil {
		return st, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxStateSize+1))
	if err != nil {
		return st, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > maxStateSize {
		return st, fmt.Errorf("read %s: larger than %d bytes", path, maxStateSize)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return state{}, fmt.Errorf("parse %s: %w", path, err)
	}
	if st.Version != stateVersion {
		return state{}, fmt.Errorf("parse %s: unknown version %d (want %d)", path, st.Version, stateVersion)
	}
	if st.Failures < 0 || st.Failures > maxFailures {
		return state{}, fmt.Errorf("parse %s: failures %d out of range", path, st.Failures)
	}
	return st, nil
}

// writeState replaces the state file atomically: a temp file in the same
// directory, fsync, rename over the old one, fsync of the directory.
func writeState(dir string, st state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode restart state: %w", err)
	}
	b = append(b, '\n')
	if err := atomicfile.Write(filepath.Join(dir, StateFile), b, atomicfile.Options{Mode: 0o600}); err != nil {
		return fmt.Errorf("write restart state: %w", err)
	}
	return nil
}

func randFloat() float64 { return rand.Float64() }
