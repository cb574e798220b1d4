package restart

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
)

// maxStateSize bounds what load reads; the real file is a few hundred bytes.
const maxStateSize = 64 * 1024

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
	if st.Failures < 0 || st.Failures > 1_000_000 {
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
	tmp, err := os.CreateTemp(dir, "."+StateFile+".tmp*")
	if err != nil {
		return fmt.Errorf("create temp state file in %s: %w", dir, err)
	}
	name := tmp.Name()
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(name)
		}
	}()
	if _, err := tmp.Write(b); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", name, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", name, err)
	}
	dst := filepath.Join(dir, StateFile)
	if err := os.Rename(name, dst); err != nil {
		return fmt.Errorf("rename %s to %s: %w", name, dst, err)
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		// Make the rename durable; an error here leaves a valid file.
		_ = d.Sync()
		d.Close()
	}
	return nil
}

func randFloat() float64 { return rand.Float64() }
