// Package api is the agent's local control API: HTTP/JSON on a unix socket
// (default /run/rackwire/rackwire.sock, mode 0660, group rackwire), and the
// client the CLI and the CNI plugin use to reach it.
//
// The package owns the wire types (what `rackwire ... --json` prints is
// exactly these), the socket's creation and permissions, and the error
// envelope. It holds no agent state: the daemon registers handlers that
// read its components. A stale socket file left by a killed agent is
// replaced at start; a live one (another agent serving) is an error.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"
)

// ErrorBody is the JSON body of every non-2xx reply.
type ErrorBody struct {
	Error string `json:"error"`
	// Hint says what to do about it, when the server knows.
	Hint string `json:"hint,omitempty"`
}

// HTTPError is an error with a status code and a hint, for handlers.
type HTTPError struct {
	Code int
	Msg  string
	Hint string
}

func (e *HTTPError) Error() string { return e.Msg }

// Errorf builds an HTTPError.
func Errorf(code int, hint, format string, args ...any) *HTTPError {
	return &HTTPError{Code: code, Msg: fmt.Sprintf(format, args...), Hint: hint}
}

// WriteJSON writes v with status code.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// WriteError writes err as an ErrorBody; an *HTTPError keeps its code.
func WriteError(w http.ResponseWriter, err error) {
	var he *HTTPError
	if errors.As(err, &he) {
		WriteJSON(w, he.Code, ErrorBody{Error: he.Msg, Hint: he.Hint})
		return
	}
	WriteJSON(w, http.StatusInternalServerError, ErrorBody{Error: err.Error()})
}

// Handle adapts a func that returns (value, error) to an http.Handler.
func Handle(f func(r *http.Request) (any, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, err := f(r)
		if err != nil {
			WriteError(w, err)
			return
		}
		WriteJSON(w, http.StatusOK, v)
	})
}

// Listen creates the unix socket at path: the directory if needed, a stale
// socket replaced, mode 0660, group `group` when that group exists.
func Listen(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if _, err := os.Lstat(path); err == nil {
		c, derr := net.DialTimeout("unix", path, 500*time.Millisecond)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("another agent is serving on %s; stop it first (systemctl stop rackwired) or set [agent] socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	// Create with a restrictive umask so the socket is never briefly open.
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	if group != "" {
		if g, err := user.LookupGroup(group); err == nil {
			if gid, err := strconv.Atoi(g.Gid); err == nil {
				_ = os.Chown(path, 0, gid)
			}
		}
	}
	return l, nil
}
