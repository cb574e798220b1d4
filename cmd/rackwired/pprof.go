//go:build rackwire_pprof

package main

import (
	"net"
	"net/http"
	_ "net/http/pprof" // the profiles, on the socket below only
	"os"
)

// A profiling build (go build -tags rackwire_pprof, used by tests/fleet's
// TestFleetIdle) serves net/http/pprof on the unix socket named by
// RACKWIRE_PPROF_SOCKET. Release builds do not contain it.
func init() {
	path := os.Getenv("RACKWIRE_PPROF_SOCKET")
	if path == "" {
		return
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return
	}
	go func() { _ = http.Serve(l, http.DefaultServeMux) }()
}
