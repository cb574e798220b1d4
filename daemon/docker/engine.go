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
	"regexp"
	"strings"
	"time"
)

// ErrGone: the Engine API says the network or container does not exist.
var ErrGone = errors.New("not found by the Docker Engine API")

// Engine is a minimal Docker Engine API client over its unix socket: the
// two reads the resolver and the reconciler need (a network, a container
// of the list; never GET /containers/{id}/json, which waits for the
// container's lock, held while dockerd waits on the plugin).
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
	ID   string `json:"Id"`
	Name string `json:"Name"`
	// Containers is keyed by container id; while a container is still
	// joining, its entry is keyed "ep-<endpoint id>" and has its Name.
	Containers map[string]NetworkMember `json:"Containers"`
}

// NetworkMember is one entry of NetworkInfo.Containers.
type NetworkMember struct {
	Name       string `json:"Name"`
	EndpointID string `json:"EndpointID"`
}

// ContainerSummary is one entry of GET /containers/json.
type ContainerSummary struct {
	ID     string            `json:"Id"`
	Names  []string          `json:"Names"`
	Labels map[string]string `json:"Labels"`
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

// ContainerByName lists the container named name (all states). The list
// is served from dockerd's snapshot, without the container's lock, so it
// answers even while dockerd waits on the plugin for that container.
func (e *Engine) ContainerByName(ctx context.Context, name string) (ContainerSummary, error) {
	f, _ := json.Marshal(map[string][]string{"name": {"^/" + regexp.QuoteMeta(strings.TrimPrefix(name, "/")) + "$"}})
	var cs []ContainerSummary
	if err := e.get(ctx, "/containers/json?all=1&filters="+url.QueryEscape(string(f)), &cs); err != nil {
		return ContainerSummary{}, err
	}
	if len(cs) != 1 {
		return ContainerSummary{}, fmt.Errorf("container %q: %d listed: %w", name, len(cs), ErrGone)
	}
	return cs[0], nil
}
