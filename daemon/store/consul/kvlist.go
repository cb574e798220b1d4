package consul

// A recursive KV read of the ipcache prefix is the largest thing an agent
// decodes: at 30,000 entries, about 6 MB of JSON that the API client
// read whole, scanned twice and decoded by reflection into api.KVPair,
// 0.44 s of an agent's 1 s start (docs/scale.md). listKV reads the same
// endpoint with the same HTTP client (token, TLS, the environment
// ignored: pinnedAuth) and decodes the answer as it arrives, in one pass,
// with a kvDecoder that knows the shape Consul writes and holds a window
// of the body, never the whole of it: a body read whole cost its size
// twice over in fresh memory (the buffer's doublings), and at a fleet's
// cold start the page faults of those buffers were 15% of an agent's CPU.
// Anything the decoder does not expect (escapes in a field name, a nested
// value, a malformed document) makes it give up; the list is then read
// again, without blocking, and decoded by encoding/json, so the result
// is the same either way (TestDecodeKVListSameAsJSON, FuzzDecodeKVList).

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/store"
)

// kvMeta is what listKV reads from the answer's headers.
type kvMeta struct {
	LastIndex uint64
	Filtered  bool // X-Consul-Results-Filtered-By-ACLs
}

// listKV is GET /v1/kv/<prefix>?recurse, blocking on index for at most
// wait when index is not 0, from any server when stale. Keys come back
// relative to the store's prefix, sorted.
func (s *Store) listKV(ctx context.Context, prefix string, stale bool, index uint64, wait time.Duration) ([]store.KV, kvMeta, error) {
	resp, meta, err := s.getKV(ctx, prefix, stale, index, wait)
	if err != nil || resp == nil {
		return nil, meta, err
	}
	kvs, err := decodeKVListFrom(resp.Body, s.prefix)
	resp.Body.Close()
	if errors.Is(err, errUnexpected) {
		// Read again, without blocking (the state the first answer came
		// from or a later one: what a list or a watch may return), and
		// decode it the API client's way.
		if resp, meta, err = s.getKV(ctx, prefix, stale, 0, 0); err != nil || resp == nil {
			return nil, meta, err
		}
		var b []byte
		b, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			kvs, err = decodeKVListJSON(b, s.prefix)
		}
	}
	if err != nil {
		return nil, kvMeta{}, fmt.Errorf("read the list of %s: %w", prefix, err)
	}
	if !slices.IsSortedFunc(kvs, func(a, b store.KV) int { return strings.Compare(a.Key, b.Key) }) {
		slices.SortFunc(kvs, func(a, b store.KV) int { return strings.Compare(a.Key, b.Key) })
	}
	return kvs, meta, nil
}

// getKV sends listKV's request. It returns the answer with its body to
// read and close when Consul answered 200, no answer (nil) for 404 (no
// key under the prefix), an error otherwise.
func (s *Store) getKV(ctx context.Context, prefix string, stale bool, index uint64, wait time.Duration) (*http.Response, kvMeta, error) {
	q := url.Values{"recurse": {""}}
	if s.opts.Datacenter != "" {
		q.Set("dc", s.opts.Datacenter)
	}
	if stale {
		q.Set("stale", "")
	}
	if index != 0 {
		q.Set("index", strconv.FormatUint(index, 10))
		if wait > 0 {
			q.Set("wait", strconv.FormatInt(wait.Milliseconds(), 10)+"ms")
		}
	}
	u := url.URL{Scheme: s.opts.Scheme, Host: s.opts.Address, Path: "/v1/kv/" + s.full(prefix), RawQuery: q.Encode()}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, kvMeta{}, err
	}
	resp, err := s.http.Do(req)
	if err != nil {
		return nil, kvMeta{}, err
	}
	var meta kvMeta
	if v := resp.Header.Get("X-Consul-Index"); v != "" {
		if meta.LastIndex, err = strconv.ParseUint(v, 10, 64); err != nil {
			resp.Body.Close()
			return nil, kvMeta{}, fmt.Errorf("consul answered an X-Consul-Index of %q", v)
		}
	}
	meta.Filtered = resp.Header.Get("X-Consul-Results-Filtered-By-ACLs") == "true"
	switch resp.StatusCode {
	case http.StatusOK:
		return resp, meta, nil
	case http.StatusNotFound:
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		return nil, meta, nil
	default:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		return nil, kvMeta{}, api.StatusError{Code: resp.StatusCode, Body: strings.TrimSpace(string(body))}
	}
}

// decodeKVListJSON decodes a KV list the API client's way.
func decodeKVListJSON(b []byte, prefix string) ([]store.KV, error) {
	var ps api.KVPairs
	if err := json.Unmarshal(b, &ps); err != nil {
		return nil, err
	}
	out := make([]store.KV, 0, len(ps))
	for _, p := range ps {
		out = append(out, store.KV{Key: strings.TrimPrefix(p.Key, prefix), Value: p.Value,
			ModifyIndex: p.ModifyIndex, CreateIndex: p.CreateIndex, Owner: p.Session})
	}
	return out, nil
}

var errUnexpected = errors.New("not the KV list shape this decoder knows")

// decodeKVListFrom decodes Consul's KV list (a JSON array of objects with
// LockIndex, Key, Flags, Value (base64 or null), Session, CreateIndex,
// ModifyIndex, and on Consul Enterprise Namespace and Partition) in one
// pass as r delivers it, or returns errUnexpected (or r's error). Keys
// lose prefix; values are decoded into slices of their own (nothing
// points into the window, which is reused); the few distinct session ids
// are shared.
func decodeKVListFrom(r io.Reader, prefix string) ([]store.KV, error) {
	d := kvDecoder{r: r, b: make([]byte, 0, kvWindow), sessions: map[string]string{}}
	kvs, err := d.list(prefix)
	if d.err != nil {
		return nil, d.err
	}
	return kvs, err
}

// kvWindow is the decoder's window on the body: what a read brings in.
// An entry larger than the window (a value up to store.MaxValueSize)
// grows it; the bytes of entries decoded are dropped between entries.
const kvWindow = 64 << 10

func (d *kvDecoder) list(prefix string) ([]store.KV, error) {
	d.ws()
	if d.lit("null") {
		return nil, d.end()
	}
	if !d.byte('[') {
		return nil, errUnexpected
	}
	d.ws()
	if d.byte(']') {
		return nil, d.end()
	}
	var out []store.KV
	for {
		kv, err := d.entry(prefix)
		if err != nil {
			return nil, err
		}
		out = append(out, kv)
		d.drop()
		d.ws()
		if d.byte(',') {
			d.ws()
			continue
		}
		if !d.byte(']') {
			return nil, errUnexpected
		}
		if err := d.end(); err != nil {
			return nil, err
		}
		return out, nil
	}
}

// kvDecoder reads a KV list from r through the window b: b[i:] is what
// is read and not decoded yet. Within an entry the window only grows
// (more), so positions in it stay valid; drop moves the rest to the
// front between entries.
type kvDecoder struct {
	r        io.Reader
	b        []byte
	i        int
	eof      bool
	err      error // r's error other than io.EOF
	sessions map[string]string
}

// more reads from r into the window; false at the end of the body.
func (d *kvDecoder) more() bool {
	for !d.eof {
		if len(d.b) == cap(d.b) {
			d.b = slices.Grow(d.b, cap(d.b))
		}
		n, err := d.r.Read(d.b[len(d.b):cap(d.b)])
		d.b = d.b[:len(d.b)+n]
		if err != nil {
			d.eof = true
			if err != io.EOF {
				d.err = err
			}
		}
		if n > 0 {
			return true
		}
	}
	return false
}

// at reports whether the byte at d.i is in the window, reading if needed.
func (d *kvDecoder) at() bool {
	for d.i >= len(d.b) {
		if !d.more() {
			return false
		}
	}
	return true
}

// drop forgets the decoded bytes once they are half the window.
func (d *kvDecoder) drop() {
	if d.i >= kvWindow/2 {
		n := copy(d.b, d.b[d.i:])
		d.b, d.i = d.b[:n], 0
	}
}

// end accepts only white space up to the end of the document.
func (d *kvDecoder) end() error {
	d.ws()
	if d.at() {
		return errUnexpected
	}
	return nil
}

func (d *kvDecoder) ws() {
	for d.at() {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

func (d *kvDecoder) byte(c byte) bool {
	if d.at() && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

func (d *kvDecoder) lit(s string) bool {
	for len(d.b)-d.i < len(s) && d.more() {
	}
	if bytes.HasPrefix(d.b[d.i:], []byte(s)) {
		d.i += len(s)
		return true
	}
	return false
}

// raw returns the bytes of a string without its quotes, and whether it
// holds an escape.
func (d *kvDecoder) raw() ([]byte, bool, error) {
	if !d.byte('"') {
		return nil, false, errUnexpected
	}
	start, esc := d.i, false
	for d.at() {
		// The window's bytes first, without a call per byte.
		for d.i < len(d.b) {
			c := d.b[d.i]
			switch {
			case c == '"':
				s := d.b[start:d.i]
				d.i++
				return s, esc, nil
			case c == '\\':
				esc = true
				d.i += 2
			case c < 0x20:
				return nil, false, errUnexpected // a control character must be escaped
			default:
				d.i++
			}
		}
	}
	return nil, false, errUnexpected
}

// str decodes a JSON string; one with escapes goes through encoding/json.
func (d *kvDecoder) str() (string, error) {
	start := d.i
	s, esc, err := d.raw()
	if err != nil {
		return "", err
	}
	if !esc {
		if !isUTF8(s) {
			return "", errUnexpected // encoding/json would replace the bad bytes
		}
		return string(s), nil
	}
	var out string
	if err := json.Unmarshal(d.b[start:d.i], &out); err != nil {
		return "", errUnexpected
	}
	return out, nil
}

func isUTF8(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return utf8.Valid(b)
		}
	}
	return true
}

// uint reads a non-negative integer that fits in 64 bits.
func (d *kvDecoder) uint() (uint64, error) {
	start := d.i
	for d.at() && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		d.i++
	}
	if d.i == start || (d.b[start] == '0' && d.i-start > 1) {
		return 0, errUnexpected
	}
	if d.at() && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E') {
		return 0, errUnexpected
	}
	return strconv.ParseUint(string(d.b[start:d.i]), 10, 64)
}

// entry decodes one object of the list.
func (d *kvDecoder) entry(prefix string) (store.KV, error) {
	var kv store.KV
	if !d.byte('{') {
		return kv, errUnexpected
	}
	seen := 0
	d.ws()
	if d.byte('}') {
		return kv, nil
	}
	for {
		d.ws()
		name, esc, err := d.raw()
		if err != nil || esc {
			return kv, errUnexpected
		}
		d.ws()
		if !d.byte(':') {
			return kv, errUnexpected
		}
		d.ws()
		bit := 0
		switch string(name) {
		case "Key":
			bit = 1
			k, err := d.str()
			if err != nil {
				return kv, err
			}
			kv.Key = strings.TrimPrefix(k, prefix)
		case "Value":
			bit = 2
			if d.lit("null") {
				kv.Value = nil
				break
			}
			s, esc, err := d.raw()
			if err != nil || esc {
				return kv, errUnexpected
			}
			v := make([]byte, base64.StdEncoding.DecodedLen(len(s)))
			n, err := base64.StdEncoding.Decode(v, s)
			if err != nil {
				return kv, errUnexpected
			}
			kv.Value = v[:n:n]
		case "Session":
			bit = 4
			if d.lit("null") {
				kv.Owner = ""
				break
			}
			sid, err := d.str()
			if err != nil {
				return kv, err
			}
			if shared, ok := d.sessions[sid]; ok {
				sid = shared
			} else if len(d.sessions) < 1024 {
				d.sessions[sid] = sid
			}
			kv.Owner = sid
		case "CreateIndex", "ModifyIndex", "LockIndex", "Flags":
			n, err := d.uint()
			if err != nil {
				return kv, errUnexpected
			}
			switch string(name) {
			case "CreateIndex":
				bit, kv.CreateIndex = 8, n
			case "ModifyIndex":
				bit, kv.ModifyIndex = 16, n
			case "LockIndex":
				bit = 32
			default:
				bit = 64
			}
		case "Namespace", "Partition":
			bit = 128
			if string(name) == "Partition" {
				bit = 256
			}
			if !d.lit("null") {
				if _, err := d.str(); err != nil {
					return kv, err
				}
			}
		default:
			return kv, errUnexpected
		}
		// encoding/json lets a repeated field win; this decoder gives up.
		if seen&bit != 0 {
			return kv, errUnexpected
		}
		seen |= bit
		d.ws()
		if d.byte(',') {
			continue
		}
		if d.byte('}') {
			return kv, nil
		}
		return kv, errUnexpected
	}
}
