package consul

// A recursive KV read of the ipcache prefix is the largest thing an agent
// decodes: at 30,000 entries, about 6 MB of JSON that the API client
// scanned twice and decoded by reflection into api.KVPair, 0.44 s of an
// agent's 1 s start (docs/scale.md). listKV reads the same endpoint with
// the same HTTP client (token, TLS, the environment ignored: pinnedAuth)
// and decodes the answer in one pass with decodeKVList, which knows the
// shape Consul writes. Anything it does not expect (escapes in a field
// name, a nested value, a malformed document) makes it give up, and the
// body is decoded by encoding/json instead, so the result is the same
// either way (TestDecodeKVListSameAsJSON, FuzzDecodeKVList).

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
	defer resp.Body.Close()
	var meta kvMeta
	if v := resp.Header.Get("X-Consul-Index"); v != "" {
		if meta.LastIndex, err = strconv.ParseUint(v, 10, 64); err != nil {
			return nil, kvMeta{}, fmt.Errorf("consul answered an X-Consul-Index of %q", v)
		}
	}
	meta.Filtered = resp.Header.Get("X-Consul-Results-Filtered-By-ACLs") == "true"
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		return nil, meta, nil
	default:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		return nil, kvMeta{}, api.StatusError{Code: resp.StatusCode, Body: strings.TrimSpace(string(body))}
	}
	var buf bytes.Buffer
	if resp.ContentLength > 0 {
		buf.Grow(int(min(resp.ContentLength, 1<<30)))
	}
	if _, err := buf.ReadFrom(resp.Body); err != nil {
		return nil, kvMeta{}, fmt.Errorf("read the list of %s: %w", prefix, err)
	}
	kvs, err := decodeKVList(buf.Bytes(), s.prefix)
	if err != nil {
		if kvs, err = decodeKVListJSON(buf.Bytes(), s.prefix); err != nil {
			return nil, kvMeta{}, fmt.Errorf("decode the list of %s: %w", prefix, err)
		}
	}
	if !slices.IsSortedFunc(kvs, func(a, b store.KV) int { return strings.Compare(a.Key, b.Key) }) {
		slices.SortFunc(kvs, func(a, b store.KV) int { return strings.Compare(a.Key, b.Key) })
	}
	return kvs, meta, nil
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

// decodeKVList decodes Consul's KV list (a JSON array of objects with
// LockIndex, Key, Flags, Value (base64 or null), Session, CreateIndex,
// ModifyIndex, and on Consul Enterprise Namespace and Partition) in one
// pass, or returns errUnexpected. Keys lose prefix; values are decoded
// into slices of their own; the few distinct session ids are shared.
func decodeKVList(b []byte, prefix string) ([]store.KV, error) {
	d := kvDecoder{b: b, sessions: map[string]string{}}
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
	// About 200 bytes per entry: a first guess that saves the growth.
	out := make([]store.KV, 0, len(b)/200+1)
	for {
		kv, err := d.entry(prefix)
		if err != nil {
			return nil, err
		}
		out = append(out, kv)
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

type kvDecoder struct {
	b        []byte
	i        int
	sessions map[string]string
}

// end accepts only white space up to the end of the document.
func (d *kvDecoder) end() error {
	d.ws()
	if d.i != len(d.b) {
		return errUnexpected
	}
	return nil
}

func (d *kvDecoder) ws() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

func (d *kvDecoder) byte(c byte) bool {
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

func (d *kvDecoder) lit(s string) bool {
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
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		d.i++
	}
	if d.i == start || (d.b[start] == '0' && d.i-start > 1) {
		return 0, errUnexpected
	}
	if d.i < len(d.b) && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E') {
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
