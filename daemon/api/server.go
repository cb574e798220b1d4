package api

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"time"
)

// Limits of the API server. Callers are local, but a stuck or hostile one
// must not hold the agent's goroutines, memory or descriptors.
const (
	// ReadHeaderTimeout bounds the request line and headers: a client that
	// sends part of them and waits (slowloris) is disconnected.
	ReadHeaderTimeout = 5 * time.Second
	// ReadTimeout bounds the whole request, headers and body. net/http
	// clears the read deadline once the body is read to its end (it then
	// watches the connection to cancel the request's context if the client
	// goes), so it never cuts a handler that runs longer, nor a stream.
	ReadTimeout = 10 * time.Second
	// WriteStallTimeout bounds each write of a reply, not the reply: a
	// client that stops reading is disconnected, a stream that a client
	// reads (GET /v1/monitor) lives as long as it wants. It replaces
	// http.Server.WriteTimeout, which bounds the whole reply, from the end
	// of the request's headers: measured with Go 1.26, a stream under a 1s
	// WriteTimeout has its writes fail and its context cancelled after 1s.
	WriteStallTimeout = 30 * time.Second
	// IdleTimeout closes a keep-alive connection that sends no new request.
	IdleTimeout = 30 * time.Second
	// MaxHeaderBytes bounds the request line and headers (net/http allows
	// 4 KiB more); the API's are a few hundred bytes. Beyond: 431.
	MaxHeaderBytes = 16 << 10
	// MaxBody bounds every request body but a policy import's: an
	// endpoint, audit, trace or raw map entry request is well under 1 KiB,
	// 37 KiB at most (an endpoint's name is at most 63 bytes, its netns path
	// 4 KiB, its labels 32 KiB). It leaves room above that so that an
	// oversized field still gets its own answer (a 64 KiB --netns gets the
	// netns message), not a body error.
	MaxBody = 128 << 10
	// MaxPolicyBody bounds a policy import (POST /v1/policies): the policy
	// file travels as a JSON string, escaped. Beyond: 413.
	MaxPolicyBody = 4 << 20
)

// limits are the server's timeouts; tests shorten them.
type limits struct {
	readHeader, read, writeStall, idle time.Duration
	maxHeader                          int
	maxBody                            int64
}

var defaultLimits = limits{readHeader: ReadHeaderTimeout, read: ReadTimeout, writeStall: WriteStallTimeout,
	idle: IdleTimeout, maxHeader: MaxHeaderBytes, maxBody: MaxPolicyBody}

// NewServer returns the API's http.Server for h: the timeouts and size
// limits above, and requests whose context derives from base (and is
// cancelled when the client goes, or base ends). Every request body is cut
// at MaxPolicyBody whatever the handler does; DecodeBody cuts tighter.
func NewServer(h http.Handler, base context.Context) *http.Server {
	return newServer(h, base, defaultLimits)
}

func newServer(h http.Handler, base context.Context, l limits) *http.Server {
	return &http.Server{
		Handler:           bounded(h, l),
		ReadHeaderTimeout: l.readHeader,
		ReadTimeout:       l.read,
		// WriteTimeout stays 0: bounded sets a deadline per write.
		IdleTimeout:    l.idle,
		MaxHeaderBytes: l.maxHeader,
		BaseContext:    func(net.Listener) context.Context { return base },
	}
}

// bounded caps the request body and bounds every write of the reply.
func bounded(h http.Handler, l limits) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		// A keep-alive connection keeps the deadline of its previous
		// reply; this one starts with none until it writes.
		_ = rc.SetWriteDeadline(time.Time{})
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = &boundedBody{w: w, orig: r.Body, r: http.MaxBytesReader(w, r.Body, l.maxBody)}
		}
		h.ServeHTTP(&stallWriter{ResponseWriter: w, rc: rc, d: l.writeStall}, r)
	})
}

// boundedBody is a request body cut at the server's maximum, or at the
// tighter limit DecodeBody sets before reading. It cuts with
// http.MaxBytesReader on the ResponseWriter: the server then marks the
// reply "Connection: close", half-closes and waits before closing, so that
// a client still sending its oversized body reads the 413 instead of
// failing on EPIPE (measured: with a limit that does not know the
// ResponseWriter, a client sending "Connection: close" often gets
// "broken pipe" and no reply).
type boundedBody struct {
	w    http.ResponseWriter
	orig io.ReadCloser
	r    io.ReadCloser
	read bool
}

func (b *boundedBody) Read(p []byte) (int, error) { b.read = true; return b.r.Read(p) }

func (b *boundedBody) Close() error { return b.r.Close() }

// limit lowers the cut to n bytes; it cannot once the body was read.
func (b *boundedBody) limit(n int64) bool {
	if b.read {
		return false
	}
	b.r = http.MaxBytesReader(b.w, b.orig, n)
	return true
}

// stallWriter moves the connection's write deadline to d ahead before a
// write or flush when less than d/2 is left: each write has between d/2
// and d to complete, however long the reply streams.
type stallWriter struct {
	http.ResponseWriter
	rc    *http.ResponseController
	d     time.Duration
	until time.Time
}

func (s *stallWriter) arm() {
	now := time.Now()
	if s.until.Sub(now) < s.d/2 {
		s.until = now.Add(s.d)
		_ = s.rc.SetWriteDeadline(s.until)
	}
}

func (s *stallWriter) WriteHeader(code int) { s.arm(); s.ResponseWriter.WriteHeader(code) }

func (s *stallWriter) Write(p []byte) (int, error) { s.arm(); return s.ResponseWriter.Write(p) }

// Flush is http.Flusher, which streaming handlers assert.
func (s *stallWriter) Flush() { s.arm(); _ = s.rc.Flush() }

// Unwrap lets http.ResponseController reach the connection.
func (s *stallWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// DecodeBody decodes a JSON request body strictly: unknown fields and
// anything after the value are errors (400), and a body larger than
// MaxBody (MaxPolicyBody for a *PolicyImport) is refused (413). It reads
// the body to its end, after which net/http cancels the request's context
// if the client goes away.
func DecodeBody(r *http.Request, v any) error {
	limit := int64(MaxBody)
	if _, ok := v.(*PolicyImport); ok {
		limit = MaxPolicyBody
	}
	body := r.Body
	if b, ok := body.(*boundedBody); !ok || !b.limit(limit) {
		body = http.MaxBytesReader(nil, body, limit)
	}
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = terr
			if err == nil {
				err = errors.New("data after the JSON value")
			}
		}
	}
	var big *http.MaxBytesError
	if errors.As(err, &big) {
		return Errorf(http.StatusRequestEntityTooLarge, "", "request body larger than %d bytes", big.Limit)
	}
	if err != nil {
		return Errorf(http.StatusBadRequest, "", "bad request body: %v", err)
	}
	return nil
}
