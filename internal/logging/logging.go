// Package logging builds the one slog.Logger a rackwire binary uses: JSON
// when stderr goes to the journal or is not a terminal, text on a terminal,
// or as [log] format says.
package logging

import (
	"io"
	"log/slog"
	"os"

	"golang.org/x/sys/unix"
)

// New returns a logger writing to w at the level held by lv.
func New(w io.Writer, format string, lv *slog.LevelVar) *slog.Logger {
	opts := &slog.HandlerOptions{Level: lv}
	if format == "auto" || format == "" {
		format = "text"
		if os.Getenv("JOURNAL_STREAM") != "" || !isTerminal(w) {
			format = "json"
		}
	}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// ParseLevel maps "debug".."error" to a level (info on anything else).
func ParseLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
