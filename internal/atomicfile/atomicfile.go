// Package atomicfile replaces a file so that a crash leaves the old content
// or the new one, never a torn file: a temporary file in the same
// directory, written and fsynced, optionally checked, renamed over the
// target, and the directory fsynced so the rename survives a power loss.
// Every state file of the agent (endpoint state, the restart gate, audit
// mode, the host id) and the rendered BIRD config are written with it.
//
// It imports nothing of rackwire's; anything may import it.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Options tune Write.
type Options struct {
	// Mode of a new file; default 0o600. With KeepOwner, an existing
	// target's mode wins.
	Mode os.FileMode
	// KeepOwner keeps the owner, group and mode of the file being
	// replaced (a config another daemon reads with its own rights).
	KeepOwner bool
	// Check, if set, is called with the temporary file's path before the
	// rename; an error leaves the target untouched.
	Check func(tmp string) error
}

// Write replaces path with data as the package doc describes.
func Write(path string, data []byte, opts Options) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	mode, uid, gid := opts.Mode, -1, -1
	if mode == 0 {
		mode = 0o600
	}
	if opts.KeepOwner {
		if fi, serr := os.Stat(path); serr == nil {
			mode = fi.Mode().Perm()
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				uid, gid = int(st.Uid), int(st.Gid)
			}
		}
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if uid >= 0 && (uid != os.Geteuid() || gid != os.Getegid()) {
		if err = f.Chown(uid, gid); err != nil {
			return fmt.Errorf("chown %s to the owner of %s: %w", tmp, path, err)
		}
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if opts.Check != nil {
		if err = opts.Check(tmp); err != nil {
			return err
		}
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making renames and removals in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s to fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
