package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testLimits are defaultLimits scaled down so that the tests take seconds.
var testLimits = limits{readHeader: 300 * time.Millisecond, read: 600 * time.Millisecond, writeStall: 400 * time.Millisecond,
	idle: time.Second, maxHeader: MaxHeaderBytes, maxBody: MaxPolicyBody}

// serve runs newServer(h) on a unix socket and returns its path.
func serve(t *testing.T, h http.Handler, l limits) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := newServer(h, context.Background(), l)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func dial(t *testing.T, sock string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedWithin reads c until the server closes it and returns how long it
// took (failing after max).
func closedWithin(t *testing.T, c net.Conn, max time.Duration) (time.Duration, []byte) {
	t.Helper()
	t0 := time.Now()
	c.SetReadDeadline(t0.Add(max))
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v", max)
	}
	return time.Since(t0), b
}

func TestSlowHeaders(t *testing.T) {
	sock := serve(t, http.NotFoundHandler(), testLimits)
	c := dial(t, sock)
	fmt.Fprintf(c, "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
	took, b := closedWithin(t, c, 5*time.Second)
	t.Logf("partial headers: closed after %v (read header timeout %v), reply %q", took, testLimits.readHeader, b)
	if took < testLimits.readHeader-50*time.Millisecond {
		t.Errorf("closed after %v, before the header timeout", took)
	}
}

func TestSlowBody(t *testing.T) {
	handled := make(chan error, 1)
	sock := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var v EndpointAdd
		handled <- DecodeBody(r, &v)
	}), testLimits)
	c := dial(t, sock)
	fmt.Fprintf(c, "POST /v1/endpoints HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"name\":")
	took, _ := closedWithin(t, c, 5*time.Second)
	t.Logf("partial body: closed after %v (read timeout %v)", took, testLimits.read)
	select {
	case err := <-handled:
		if err == nil {
			t.Error("DecodeBody of a cut body succeeded")
		}
	case <-time.After(time.Second):
		t.Error("the handler still waits for the body")
	}
}

func TestHeaderTooLarge(t *testing.T) {
	sock := serve(t, http.NotFoundHandler(), testLimits)
	c := dial(t, sock)
	go fmt.Fprintf(c, "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n", strings.Repeat("a", 64<<10))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("64 KiB header: %s, want 431", resp.Status)
	}
}

// TestLongHandlerNotCut: once the body is read, neither the read timeout
// nor the write stall timeout cuts a handler that works longer than both,
// and the reply arrives.
func TestLongHandlerNotCut(t *testing.T) {
	ctxErr := make(chan error, 1)
	sock := serve(t, Handle(func(r *http.Request) (any, error) {
		var v EndpointAdd
		if err := DecodeBody(r, &v); err != nil {
			return nil, err
		}
		select {
		case <-r.Context().Done():
			ctxErr <- r.Context().Err()
			return nil, r.Context().Err()
		case <-time.After(3 * (testLimits.read + testLimits.writeStall)):
		}
		ctxErr <- nil
		return v, nil
	}), testLimits)
	hc := unixClient(sock)
	resp, err := hc.Post("http://x/v1/endpoints", "application/json", strings.NewReader(`{"name":"a"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"name": "a"`) {
		t.Errorf("long handler: %s %s", resp.Status, b)
	}
	if err := <-ctxErr; err != nil {
		t.Errorf("long handler's context: %v", err)
	}
}

// TestClientGoneCancels: a handler's context ends when its client goes,
// also after a body (DecodeBody reads it to the end).
func TestClientGoneCancels(t *testing.T) {
	started, gone := make(chan struct{}), make(chan time.Time, 1)
	sock := serve(t, Handle(func(r *http.Request) (any, error) {
		var v EndpointAdd
		if err := DecodeBody(r, &v); err != nil {
			return nil, err
		}
		close(started)
		select {
		case <-r.Context().Done():
			gone <- time.Now()
		case <-time.After(5 * time.Second):
			gone <- time.Time{}
		}
		return nil, nil
	}), testLimits)
	c := dial(t, sock)
	body := `{"name":"a"}` + "\n"
	fmt.Fprintf(c, "POST /v1/endpoints HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	<-started
	closed := time.Now()
	c.Close()
	if at := <-gone; at.IsZero() {
		t.Error("the handler's context was not cancelled when the client went")
	} else {
		t.Logf("context cancelled %v after the client went", at.Sub(closed))
	}
}

// TestStreamOutlivesTimeouts: a stream that its client reads lives past
// every timeout; a client that stops reading is cut after the stall
// timeout.
func TestStreamOutlivesTimeouts(t *testing.T) {
	stopped := make(chan string, 2)
	sock := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fl := w.(http.Flusher)
		w.WriteHeader(200)
		fl.Flush()
		chunk := bytes.Repeat([]byte("x"), 32<<10)
		chunk[len(chunk)-1] = '\n'
		if r.URL.Query().Get("slow") != "" {
			chunk = []byte("tick\n")
		}
		t0 := time.Now()
		for {
			select {
			case <-r.Context().Done():
				stopped <- fmt.Sprintf("context ended after %v", time.Since(t0).Round(time.Millisecond))
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := w.Write(chunk); err != nil {
				stopped <- fmt.Sprintf("write failed after %v: %v", time.Since(t0).Round(time.Millisecond), err)
				return
			}
			fl.Flush()
		}
	}), testLimits)

	// A reading client: 3x every timeout, and the stream still flows.
	hc := unixClient(sock)
	resp, err := hc.Get("http://x/v1/monitor?slow=1")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(resp.Body)
	t0 := time.Now()
	n := 0
	for time.Since(t0) < 3*(testLimits.read+testLimits.writeStall) && sc.Scan() {
		n++
	}
	if time.Since(t0) < 3*(testLimits.read+testLimits.writeStall) {
		t.Errorf("stream ended after %v (%d lines): %v", time.Since(t0), n, sc.Err())
	}
	resp.Body.Close()
	select {
	case s := <-stopped:
		t.Logf("reading client went: handler %s", s)
	case <-time.After(2 * time.Second):
		t.Error("handler still streaming 2s after its client went")
	}

	// A client that never reads: cut once the socket buffers are full and
	// a write stalls for the stall timeout.
	c := dial(t, sock)
	fmt.Fprintf(c, "GET /v1/monitor HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case s := <-stopped:
		t.Logf("client that does not read: handler %s (stall timeout %v)", s, testLimits.writeStall)
	case <-time.After(10 * time.Second):
		t.Error("handler still blocked 10s on a client that does not read")
	}
}

func TestBodyLimits(t *testing.T) {
	sock := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var err error
		if strings.HasSuffix(r.URL.Path, "/policies") {
			var v PolicyImport
			err = DecodeBody(r, &v)
		} else {
			var v EndpointAdd
			err = DecodeBody(r, &v)
		}
		if err != nil {
			WriteError(w, err)
			return
		}
		WriteJSON(w, 200, struct{}{})
	}), defaultLimits)
	// Both with keep-alive and with "Connection: close": a client still
	// sending an oversized body must read the 413, not fail on EPIPE.
	hc, hcClose := unixClient(sock), unixClient(sock)
	hcClose.Transport.(*http.Transport).DisableKeepAlives = true
	post := func(path string, body []byte) (int, string) {
		t.Helper()
		resp, err := hc.Post("http://x"+path, "application/json", bytes.NewReader(body))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	str := func(n int) []byte { return []byte(`{"data":"` + strings.Repeat("a", n) + `"}`) }
	name := func(n int) []byte { return []byte(`{"name":"` + strings.Repeat("a", n) + `"}`) }
	cases := []struct {
		what, path string
		body       []byte
		want       int
	}{
		{"endpoint 120 KiB", "/v1/endpoints", name(120 << 10), 200},
		{"endpoint 200 KiB", "/v1/endpoints", name(200 << 10), 413},
		{"endpoint 5 MiB", "/v1/endpoints", name(5 << 20), 413},
		{"endpoint 1 MiB", "/v1/endpoints", name(1 << 20), 413},
		{"endpoint 400 KiB", "/v1/endpoints", name(400 << 10), 413},
		{"policy 3 MiB", "/v1/policies", str(3 << 20), 200},
		{"policy 5 MiB", "/v1/policies", str(5 << 20), 413},
		{"trailing data", "/v1/endpoints", []byte(`{"name":"a"} {}`), 400},
		{"trailing space", "/v1/endpoints", []byte("{\"name\":\"a\"} \n"), 200},
		{"unknown field", "/v1/endpoints", []byte(`{"nope":1}`), 400},
		{"empty", "/v1/endpoints", nil, 400},
	}
	for _, client := range []struct {
		name string
		c    *http.Client
	}{{"keep-alive", hc}, {"connection close", hcClose}} {
		hc = client.c
		for _, c := range cases {
			code, body := post(c.path, c.body)
			if code != c.want {
				t.Errorf("%s, %s: %d %.200s, want %d", client.name, c.what, code, body, c.want)
			} else if code == 413 {
				t.Logf("%s, %s: %d %s", client.name, c.what, code, strings.Join(strings.Fields(body), " "))
			}
		}
	}
}

func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
}
