package bgp

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/config"
)

func TestProbe(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/bad" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	target := strings.TrimPrefix(srv.URL, "http://")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	tests := []struct {
		name   string
		h      config.VIPHealth
		wantOK bool
	}{
		{"tcp open", config.VIPHealth{Type: "tcp", Target: target}, true},
		{"tcp closed", config.VIPHealth{Type: "tcp", Target: closed}, false},
		{"http 200", config.VIPHealth{Type: "http", Target: target, Path: "/healthz"}, true},
		{"http 503", config.VIPHealth{Type: "http", Target: target, Path: "/bad"}, false},
		{"http closed", config.VIPHealth{Type: "http", Target: closed}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.h.Timeout = config.D(time.Second)
			err := probe(context.Background(), tc.h)
			if (err == nil) != tc.wantOK {
				t.Errorf("probe(%+v) = %v, want ok %v", tc.h, err, tc.wantOK)
			}
		})
	}
}

// TestHealthRiseFall drives one checker through rise and fall against a
// local listener and checks that Status follows.
func TestHealthRiseFall(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	cfg := config.BGP{
		Enabled: false, // health checks run only when enabled; enable below
		VIPs:    []string{"10.96.100.10/32"},
		VIPHealth: []config.VIPHealth{{VIP: "10.96.100.10/32", Type: "tcp", Target: addr,
			Interval: config.D(20 * time.Millisecond), Timeout: config.D(100 * time.Millisecond), Rise: 3, Fall: 2}},
	}
	m := New(cfg, nil, "test", nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return")
		}
	}()
	cfg.Enabled = true
	cfg.BirdConfig, cfg.BirdSocket, cfg.BirdBinary = t.TempDir()+"/bird.conf", t.TempDir()+"/absent.ctl", "bird"
	cfg.RouterID, cfg.LocalASN = "10.1.1.10", 65101
	m.Reload(cfg, nil)
	vip := func() VIPStatus { return m.Status(context.Background()).VIPs[0] }
	if v := vip(); v.Healthy {
		t.Errorf("VIP healthy before %d checks: %+v", 3, v)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !vip().Healthy && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if v := vip(); !v.Healthy || v.OKRun < 3 {
		t.Fatalf("VIP after rise = %+v, want healthy after 3 checks", v)
	}
	ln.Close()
	for vip().Healthy && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if v := vip(); v.Healthy || v.FailRun < 2 || v.LastError == "" {
		t.Errorf("VIP after fall = %+v, want unhealthy with the error", v)
	}
	b, err := json.Marshal(m.Status(context.Background()))
	if err != nil || !strings.Contains(string(b), `"vips"`) {
		t.Errorf("json.Marshal(Status) = %s, %v", b, err)
	}
}
