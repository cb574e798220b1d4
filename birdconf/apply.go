package birdconf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// ErrInvalid means `bird -p` refused the rendered text; nothing was written.
var ErrInvalid = errors.New("BIRD rejects the rendered config")

// ErrBirdMissing means the bird binary was not found, so the text could not
// be checked; nothing was written.
var ErrBirdMissing = errors.New("bird binary not found")

// Applier writes a rendered config safely and makes BIRD load it.
type Applier struct {
	// Path is the config file BIRD was started with (bird -c).
	Path string
	// Binary is the bird executable used to parse-check (default "bird").
	Binary string
	// Client reaches the running BIRD.
	Client *Client
	// Check parse-checks a file; nil runs `Binary -p -c FILE`. Tests
	// replace it to get a file past the check that BIRD then refuses.
	Check func(ctx context.Context, file string) error
}

// Result says what Apply did.
type Result struct {
	// Written reports whether the file on disk was replaced.
	Written bool
	// Reconfigured reports whether BIRD accepted a configure.
	Reconfigured bool
	// RolledBack reports whether BIRD refused the new file and the previous
	// one was put back.
	RolledBack bool
}

// Apply makes text the content of a.Path and BIRD's running config:
//
//  1. if the file already holds text and force is false, nothing happens;
//  2. text is written to a temporary file next to Path and parsed with
//     `bird -p -c`; if that fails, the temporary file is removed (ErrInvalid);
//  3. the temporary file is renamed over Path (atomic on one file system);
//  4. BIRD is told to `configure`. If BIRD refuses, the previous file is put
//     back and BIRD is reconfigured with it (the error wraps ErrRefused).
//     If BIRD is not running the new file stays: BIRD reads it when it
//     starts (the error wraps ErrNotRunning); call again with force to
//     reconfigure once it runs.
func (a *Applier) Apply(ctx context.Context, text string, force bool) (Result, error) {
	var res Result
	prev, err := os.ReadFile(a.Path)
	hadPrev := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, fmt.Errorf("read current BIRD config: %w", err)
	}
	if hadPrev && string(prev) == text && !force {
		return res, nil
	}
	if !hadPrev || string(prev) != text {
		if err := a.write(ctx, []byte(text), true); err != nil {
			return res, err
		}
		res.Written = true
	}
	err = a.Client.Configure(ctx)
	switch {
	case err == nil:
		res.Reconfigured = true
		return res, nil
	case errors.Is(err, ErrRefused) && res.Written:
		if hadPrev {
			if rerr := a.write(ctx, prev, false); rerr != nil {
				return res, fmt.Errorf("%w; restore previous config: %v", err, rerr)
			}
		} else if rerr := os.Remove(a.Path); rerr != nil {
			return res, fmt.Errorf("%w; remove refused config: %v", err, rerr)
		}
		res.RolledBack = true
		if rerr := a.Client.Configure(ctx); rerr != nil && hadPrev {
			return res, fmt.Errorf("%w; reconfigure with previous config: %v", err, rerr)
		}
		return res, err
	default:
		return res, err
	}
}

// write puts data at a.Path through a checked temporary file.
func (a *Applier) write(ctx context.Context, data []byte, check bool) error {
	dir := filepath.Dir(a.Path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(a.Path)+".rackwire-*")
	if err != nil {
		return fmt.Errorf("create temporary BIRD config: %w", err)
	}
	tmp := f.Name()
	done := false
	defer func() {
		if !done {
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	// Keep the owner and mode of the file being replaced: Debian's BIRD
	// runs as user bird and re-reads its config with that user's rights.
	mode, uid, gid := os.FileMode(0o640), -1, -1
	if fi, err := os.Stat(a.Path); err == nil {
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if uid >= 0 && (uid != os.Geteuid() || gid != os.Getegid()) {
		if err := f.Chown(uid, gid); err != nil {
			f.Close()
			return fmt.Errorf("chown %s to the owner of %s: %w", tmp, a.Path, err)
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if check {
		if err := a.check(ctx, tmp); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, a.Path); err != nil {
		return fmt.Errorf("replace %s: %w", a.Path, err)
	}
	done = true
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

func (a *Applier) check(ctx context.Context, file string) error {
	if a.Check != nil {
		return a.Check(ctx, file)
	}
	return ParseCheck(ctx, a.Binary, file)
}

// ParseCheck runs `bird -p -c file`, which parses a config without running
// anything. binary "" means "bird" on PATH.
func ParseCheck(ctx context.Context, binary, file string) error {
	if binary == "" {
		binary = "bird"
	}
	path, err := exec.LookPath(binary)
	if err != nil {
		return fmt.Errorf("%w: %s (install bird2 or set [bgp] bird_binary): %v", ErrBirdMissing, binary, err)
	}
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, path, "-p", "-c", file)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("bird -p -c %s: %w", file, ctx.Err())
		}
		return fmt.Errorf("%w: bird -p -c %s: %s", ErrInvalid, file, strings.TrimSpace(out.String()))
	}
	return nil
}
