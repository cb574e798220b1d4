package birdconf

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strings"

	"github.com/rackwire/rackwire/internal/atomicfile"
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

// write puts data at a.Path through a checked temporary file, keeping the
// owner and mode of the file it replaces: Debian's BIRD runs as user bird
// and re-reads its config with that user's rights.
func (a *Applier) write(ctx context.Context, data []byte, check bool) error {
	opts := atomicfile.Options{Mode: 0o640, KeepOwner: true}
	if check {
		opts.Check = func(tmp string) error { return a.check(ctx, tmp) }
	}
	return atomicfile.Write(a.Path, data, opts)
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
