package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// The load protocol, one TCP port: a connection whose first byte is
// streamMagic is a stream (the server counts what it receives until EOF and
// answers the count as 8 bytes, big-endian); any other first byte starts an
// echo of 1-byte requests.
const streamMagic = 'S'

// Load kinds.
const (
	kindRR     = "rr"     // request/response, 1 byte, one connection
	kindCRR    = "crr"    // connect, 1-byte request/response, close
	kindStream = "stream" // bulk TCP, client to server
	kindProbe  = "probe"  // one connect: reports whether it was refused, timed out or connected
)

// result is what one client run prints, as one JSON line.
type result struct {
	Kind    string  `json:"kind"`
	Ops     int64   `json:"ops"`   // transactions or connections
	Bytes   int64   `json:"bytes"` // stream: bytes the server received
	Seconds float64 `json:"seconds"`
	Errors  int64   `json:"errors"`
	Probe   string  `json:"probe,omitempty"` // probe: connected, refused or timeout
	Error   string  `json:"error,omitempty"`
}

// rate is ops/s, or bits/s for a stream.
func (r result) rate() float64 {
	if r.Seconds <= 0 {
		return 0
	}
	if r.Kind == kindStream {
		return float64(r.Bytes) * 8 / r.Seconds
	}
	return float64(r.Ops) / r.Seconds
}

func cmdServe(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "", "address:port to listen on")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if *listen == "" {
		return fmt.Errorf("%w: serve needs -listen", errUsage)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	fmt.Fprintln(stdout, "ready")
	return serve(ctx, ln)
}

// serve runs until ctx ends, then closes the listener and every open
// connection and waits for their goroutines.
func serve(ctx context.Context, ln net.Listener) error {
	var (
		wg sync.WaitGroup
		mu sync.Mutex // guards conns
	)
	conns := map[net.Conn]struct{}{}
	stopped := make(chan struct{})
	go func() {
		<-ctx.Done()
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		close(stopped)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				<-stopped
				wg.Wait()
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			handle(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		}()
	}
}

func handle(c net.Conn) {
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return
	}
	if b[0] == streamMagic {
		n, _ := io.Copy(io.Discard, c)
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		c.Write(out[:])
		return
	}
	for {
		if _, err := c.Write(b[:]); err != nil {
			return
		}
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return
		}
	}
}

// request asks the client for one measurement.
type request struct {
	Kind string        `json:"kind"`
	Addr string        `json:"addr"`
	Dur  time.Duration `json:"dur"`
	Max  int64         `json:"max"` // transactions or connections
}

// cmdClient answers requests, one JSON line each on stdin, with one result
// line each on stdout, until stdin ends: a long-lived client lets the
// orchestrator alternate short measurements without starting a process for
// each.
func cmdClient(ctx context.Context, args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	dec := json.NewDecoder(stdin)
	enc := json.NewEncoder(stdout)
	for {
		var req request
		if err := dec.Decode(&req); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("read request: %w", err)
		}
		r, err := measureOnce(ctx, req)
		if err != nil {
			r = result{Kind: req.Kind, Error: err.Error()}
		}
		if err := enc.Encode(r); err != nil {
			return fmt.Errorf("write result: %w", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

func measureOnce(ctx context.Context, req request) (result, error) {
	if req.Addr == "" || req.Dur <= 0 || req.Max <= 0 {
		return result{}, fmt.Errorf("request %+v: want an address, a positive duration and count", req)
	}
	switch req.Kind {
	case kindRR:
		return runRR(ctx, req.Addr, req.Dur, req.Max)
	case kindCRR:
		return runCRR(ctx, req.Addr, req.Dur, req.Max)
	case kindStream:
		return runStream(ctx, req.Addr, req.Dur)
	case kindProbe:
		return probe(req.Addr, req.Dur), nil
	}
	return result{}, fmt.Errorf("unknown kind %q", req.Kind)
}

// deadlineCheck is how many operations pass between two looks at the clock.
const deadlineCheck = 64

func runRR(ctx context.Context, addr string, dur time.Duration, maxOps int64) (result, error) {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return result{}, fmt.Errorf("rr: connect %s: %w", addr, err)
	}
	defer c.Close()
	r := result{Kind: kindRR}
	var b [1]byte
	start := time.Now()
	end := start.Add(dur)
	c.SetDeadline(end.Add(time.Second))
	for r.Ops < maxOps {
		if r.Ops%deadlineCheck == 0 && (time.Now().After(end) || ctx.Err() != nil) {
			break
		}
		b[0] = 'r'
		if _, err := c.Write(b[:]); err != nil {
			return r, fmt.Errorf("rr: write: %w", err)
		}
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return r, fmt.Errorf("rr: read: %w", err)
		}
		r.Ops++
	}
	r.Seconds = time.Since(start).Seconds()
	return r, ctx.Err()
}

// maxCRRErrors ends a connect/request/close run that keeps failing.
const maxCRRErrors = 100

func runCRR(ctx context.Context, addr string, dur time.Duration, maxOps int64) (result, error) {
	r := result{Kind: kindCRR}
	one := func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		b := [1]byte{'c'}
		if _, err := c.Write(b[:]); err != nil {
			return err
		}
		_, err = io.ReadFull(c, b[:])
		return err
	}
	start := time.Now()
	end := start.Add(dur)
	var last error
	for r.Ops < maxOps && time.Now().Before(end) && ctx.Err() == nil {
		if err := one(); err != nil {
			last = err
			if r.Errors++; r.Errors >= maxCRRErrors {
				return r, fmt.Errorf("crr: %d failed connections, last: %w", r.Errors, last)
			}
			continue
		}
		r.Ops++
	}
	r.Seconds = time.Since(start).Seconds()
	return r, ctx.Err()
}

func runStream(ctx context.Context, addr string, dur time.Duration) (result, error) {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return result{}, fmt.Errorf("stream: connect %s: %w", addr, err)
	}
	defer c.Close()
	tc := c.(*net.TCPConn)
	buf := make([]byte, 128<<10)
	buf[0] = streamMagic
	start := time.Now()
	end := start.Add(dur)
	c.SetDeadline(end.Add(5 * time.Second))
	for i := 0; ; i++ {
		if i%8 == 0 && (time.Now().After(end) || ctx.Err() != nil) {
			break
		}
		if _, err := c.Write(buf); err != nil {
			return result{}, fmt.Errorf("stream: write: %w", err)
		}
		buf[0] = 0
	}
	if err := tc.CloseWrite(); err != nil {
		return result{}, fmt.Errorf("stream: close write side: %w", err)
	}
	var out [8]byte
	if _, err := io.ReadFull(c, out[:]); err != nil {
		return result{}, fmt.Errorf("stream: read the received count: %w", err)
	}
	// The server's count ends when it read our FIN: the rate is what it
	// received over the time until we learned that.
	return result{Kind: kindStream, Ops: 1, Bytes: int64(binary.BigEndian.Uint64(out[:])),
		Seconds: time.Since(start).Seconds()}, ctx.Err()
}

// probe connects once: "refused" means the SYN reached the server
// namespace's stack, "timeout" that something dropped it.
func probe(addr string, timeout time.Duration) result {
	r := result{Kind: kindProbe}
	c, err := net.DialTimeout("tcp", addr, timeout)
	var ne net.Error
	switch {
	case err == nil:
		c.Close()
		r.Probe = "connected"
	case errors.As(err, &ne) && ne.Timeout():
		r.Probe = "timeout"
	default:
		r.Probe = "refused"
	}
	return r
}
