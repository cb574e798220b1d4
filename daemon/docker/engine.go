package docker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// ErrGone: the Engine API says the network or container does not exist.
var ErrGone = errors.New("not found by the Docker Engine API")

// Engine is a minimal Docker Engine API client over its unix socket: the
// two reads the resolver and the reconciler need.
type Engine struct {
	sock string
	hc   *http.Client
}

// NewEngine returns a client of the Engine API at sock.
func NewEngine(sock string) *Engine {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", sock)
		},
		MaxIdleConns: 2, IdleConnTimeout: 30 * time.Second,
	}
	return &Engine{sock: sock, hc: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
}

// NetworkInfo is what GET /networks/{id} says of a network.
type NetworkInfo struct {
	ID         string `json:"Id"`
	Name       string `json:"Name"`
	Containers map[string]struct {
		EndpointID string `json:"EndpointID"`
	} `json:"Containers"`
}

// ContainerInfo is what GET /containers/{id}/json says of a container.
type ContainerInfo struct {
	ID     string `json:"Id"`
	Name   string `json:"Name"`
	Config struct {
		Labels map[string]string `json:"Labels"`
	} `json:"Config"`
	NetworkSettings struct {
		Networks map[string]struct {
			NetworkID  string `json:"NetworkID"`
			EndpointID string `json:"EndpointID"`
		} `json:"Networks"`
	} `json:"NetworkSettings"`
}

func (e *Engine) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+path, nil)
	if err != nil {
		return err
	}
	resp, err := e.hc.Do(req)
	if err != nil {
		return fmt.Errorf("docker engine API %s: %w", e.sock, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return fmt.Errorf("docker engine API GET %s: %w", path, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("GET %s: %w", path, ErrGone)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("docker engine API GET %s: %s: %.200s", path, resp.Status, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("docker engine API GET %s: %w", path, err)
	}
	return nil
}

// Network inspects a network.
func (e *Engine) Network(ctx context.Context, id string) (NetworkInfo, error) {
	var n NetworkInfo
	err := e.get(ctx, "/networks/"+url.PathEscape(id), &n)
	return n, err
}

// Container inspects a container.
func (e *Engine) Container(ctx context.Context, id string) (ContainerInfo, error) {
	var c ContainerInfo
	err := e.get(ctx, "/containers/"+url.PathEscape(id)+"/json", &c)
	return c, err
}
