package ipcache

import (
	"bytes"

	"github.com/rackwire/rackwire/daemon/store"
)

// decodeIPRecord decodes an ipcache record in the one shape the publisher
// writes it (json.Marshal of store.IPEntry: its fields in their order, no
// white space, endpoint and labels_hash only when set, strings of
// printable ASCII without escapes) in one pass, without reflection: the
// check of a 30,000-record list spent most of its time in encoding/json
// (BenchmarkDecodeIPRecord). Anything else (another order, white space,
// an escape, a number that does not fit) gives ok false, and the caller
// decodes it with encoding/json, so the result is the same either way
// (TestDecodeIPRecordSameAsJSON, FuzzDecodeIPRecord).
func decodeIPRecord(b []byte) (r store.IPEntry, ok bool) {
	d := recDecoder{b: b}
	if !d.lit(`{"ip":`) {
		return r, false
	}
	if r.IP, ok = d.str(); !ok || !d.lit(`,"identity":`) {
		return r, false
	}
	if r.Identity, ok = d.u32(); !ok || !d.lit(`,"host_ip":`) {
		return r, false
	}
	if r.HostIP, ok = d.str(); !ok || !d.lit(`,"node":`) {
		return r, false
	}
	if r.Node, ok = d.str(); !ok {
		return r, false
	}
	if d.lit(`,"endpoint":`) {
		if r.Endpoint, ok = d.u32(); !ok {
			return r, false
		}
	}
	if d.lit(`,"labels_hash":`) {
		if r.LabelsHash, ok = d.str(); !ok {
			return r, false
		}
	}
	return r, d.lit("}") && d.i == len(d.b)
}

type recDecoder struct {
	b []byte
	i int
}

func (d *recDecoder) lit(s string) bool {
	if bytes.HasPrefix(d.b[d.i:], []byte(s)) {
		d.i += len(s)
		return true
	}
	return false
}

// str reads a string of printable ASCII other than '"' and '\'.
func (d *recDecoder) str() (string, bool) {
	if d.i >= len(d.b) || d.b[d.i] != '"' {
		return "", false
	}
	start := d.i + 1
	for j := start; j < len(d.b); j++ {
		switch c := d.b[j]; {
		case c == '"':
			d.i = j + 1
			return string(d.b[start:j]), true
		case c < 0x20 || c > 0x7e || c == '\\':
			return "", false
		}
	}
	return "", false
}

// u32 reads a decimal number without sign, fraction, exponent or leading
// zero that fits in 32 bits.
func (d *recDecoder) u32() (uint32, bool) {
	start := d.i
	var n uint64
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		n = n*10 + uint64(d.b[d.i]-'0')
		d.i++
		if n > 1<<32-1 {
			return 0, false
		}
	}
	if d.i == start || (d.b[start] == '0' && d.i-start > 1) {
		return 0, false
	}
	if d.i < len(d.b) && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E') {
		return 0, false
	}
	return uint32(n), true
}
