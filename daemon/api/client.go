package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"
)

// DefaultSocket is the agent's socket unless configured otherwise.
const DefaultSocket = "/run/rackwire/rackwire.sock"

// ErrAgentDown is returned when nothing serves on the socket.
var ErrAgentDown = errors.New("rackwired is not running")

// Client talks to the agent over its unix socket.
type Client struct {
	Socket string
	hc     *http.Client
}

// NewClient returns a client for socket ("" = $RACKWIRE_SOCKET or the default).
func NewClient(socket string) *Client {
	if socket == "" {
		socket = os.Getenv("RACKWIRE_SOCKET")
	}
	if socket == "" {
		socket = DefaultSocket
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{Socket: socket, hc: &http.Client{Transport: tr}}
}

// Error is a non-2xx reply from the agent.
type Error struct {
	Code int
	ErrorBody
}

func (e *Error) Error() string {
	if e.Hint != "" {
		return e.ErrorBody.Error + "; " + e.Hint
	}
	return e.ErrorBody.Error
}

// Do sends method path with in as JSON body (nil for none) and decodes the
// reply into out (nil to discard).
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://rackwired"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		e := &Error{Code: resp.StatusCode}
		if json.Unmarshal(data, &e.ErrorBody) != nil || e.ErrorBody.Error == "" {
			e.ErrorBody.Error = fmt.Sprintf("agent replied %s", resp.Status)
		}
		return e
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decode reply of %s %s: %w", method, path, err)
		}
	}
	return nil
}

// Stream calls path and hands each JSON line of the reply to fn until ctx
// ends, the agent closes the stream, or fn returns an error.
func (c *Client) Stream(ctx context.Context, path string, fn func(json.RawMessage) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://rackwired"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return c.dialError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		e := &Error{Code: resp.StatusCode}
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(data, &e.ErrorBody) != nil || e.ErrorBody.Error == "" {
			e.ErrorBody.Error = fmt.Sprintf("agent replied %s", resp.Status)
		}
		return e
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		if err := fn(json.RawMessage(append([]byte(nil), sc.Bytes()...))); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}

func (c *Client) dialError(err error) error {
	var se syscall.Errno
	if errors.As(err, &se) && (se == syscall.ENOENT || se == syscall.ECONNREFUSED) {
		return fmt.Errorf("%w: nothing listens on %s; start it with `systemctl start rackwired` (or `rackwired --config FILE`), or point --socket / RACKWIRE_SOCKET at its socket", ErrAgentDown, c.Socket)
	}
	if errors.As(err, &se) && se == syscall.EACCES {
		return fmt.Errorf("permission denied on %s; run as root or as a member of the rackwire group", c.Socket)
	}
	return fmt.Errorf("reach rackwired on %s: %w", c.Socket, err)
}

// Timeout is the default per-call timeout of CLI calls.
const Timeout = 30 * time.Second
