package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

// FuzzRawEntry: the body of POST/DELETE /v1/bpf/policy/{ep} (a RawEntry)
// through DecodeBody and RawEntry.Entry, the only validation it gets before
// it is written to an endpoint's policy map. A refused body or entry is an
// error (a 4xx for the body); an accepted entry is exactly what was asked
// for, and the entry written back in the CLI's words validates to itself.
func FuzzRawEntry(f *testing.F) {
	f.Add([]byte(`{"identity":50331948,"direction":"egress","proto":"tcp","port":80,"end_port":90,"deny":true}`), uint32(1), "ingress", "udp", uint16(53), uint16(0), false)
	f.Add([]byte(`{"identity":2,"proto":"ANY","port":0}`), uint32(2), "", "", uint16(0), uint16(0), true)
	f.Add([]byte(`{"identity":2,"proto":"132","port":1,"end_port":0}`), uint32(0), "egress", "58", uint16(1), uint16(65535), false)
	f.Add([]byte(`{"identity":2,"direction":"both"}`), uint32(2), "Ingress", "256", uint16(90), uint16(80), false)
	f.Add([]byte(`{"identity":-1}`), uint32(2), "egress", "-1", uint16(0), uint16(0), false)
	f.Add([]byte(`{"port":65536}`), uint32(2), "egress", "+6", uint16(0), uint16(0), false)
	f.Add([]byte(`{"deny":"yes"}`), uint32(2), "egress", "06", uint16(0), uint16(0), false)
	f.Add([]byte(`{"identity":1} {"identity":2}`), uint32(2), "egress", "icmpv6", uint16(0), uint16(0), false)
	f.Add([]byte(`{"identity":1,"extra":0}`), uint32(2), "egress", "SCTP", uint16(0), uint16(0), false)
	f.Fuzz(func(t *testing.T, body []byte, id uint32, dir, proto string, port, endPort uint16, deny bool) {
		var in RawEntry
		r := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
		if err := DecodeBody(r, &in); err != nil {
			var he *HTTPError
			if !errors.As(err, &he) || he.Code < 400 || he.Code > 499 {
				t.Fatalf("DecodeBody refusal %v is not a 4xx", err)
			}
		} else {
			if json.Unmarshal(body, new(json.RawMessage)) != nil {
				t.Fatalf("DecodeBody accepted %q, which is not one JSON value", body)
			}
			checkRawEntry(t, in)
		}
		checkRawEntry(t, RawEntry{Identity: id, Direction: dir, Proto: proto, Port: port, EndPort: endPort, Deny: deny})
	})
}

func checkRawEntry(t *testing.T, in RawEntry) {
	t.Helper()
	k, err := in.Entry()
	if err != nil {
		if err.Error() == "" {
			t.Fatal("refusal without a message")
		}
		return
	}
	if k.Identity != in.Identity || k.Port != in.Port || k.EndPort != in.EndPort || k.Deny != in.Deny {
		t.Fatalf("entry %+v from %+v", k, in)
	}
	switch {
	case k.Direction == 0 && (in.Direction == "ingress" || in.Direction == ""):
	case k.Direction == 1 && in.Direction == "egress":
	default:
		t.Fatalf("direction %d from %q", k.Direction, in.Direction)
	}
	if k.EndPort != 0 && k.EndPort < k.Port {
		t.Fatalf("range %d-%d accepted", k.Port, k.EndPort)
	}
	// The protocol is a name of ProtoName's (any case) or the decimal
	// number itself, never something that merely parses to one.
	name := ProtoName(k.Proto)
	switch p := strings.ToLower(in.Proto); {
	case p == name, p == "" && k.Proto == 0, p == strconv.Itoa(int(k.Proto)):
	default:
		if v, err := strconv.ParseUint(in.Proto, 10, 8); err != nil || uint8(v) != k.Proto {
			t.Fatalf("protocol %d from %q", k.Proto, in.Proto)
		}
	}
	// Written back the way the CLI prints it, it validates to itself.
	dir := "ingress"
	if k.Direction == 1 {
		dir = "egress"
	}
	again, err := RawEntry{Identity: k.Identity, Direction: dir, Proto: name, Port: k.Port, EndPort: k.EndPort, Deny: k.Deny}.Entry()
	if err != nil || again != k {
		t.Fatalf("round trip of %+v: %+v, %v", k, again, err)
	}
}

// FuzzDecodeBody: every request type through DecodeBody. It never panics,
// refuses with a 4xx, takes one JSON object with known fields only, and
// what it takes re-encodes to a body it takes again as the same value.
func FuzzDecodeBody(f *testing.F) {
	f.Add(uint8(0), []byte(`{"name":"web-1","netns":"/run/netns/web-1","labels":"app=web","ip":"10.0.0.1"}`))
	f.Add(uint8(1), []byte(`{"enabled":true}`))
	f.Add(uint8(2), []byte(`{"src":{"labels":"app=web"},"dst":{"ip":"10.0.0.1"},"dport":"80/tcp"}`))
	f.Add(uint8(3), []byte(`{"identity":2,"direction":"egress","proto":"tcp","port":80}`))
	f.Add(uint8(4), []byte(`{"file":"a.yaml","data":"apiVersion: cilium.io/v2\n"}`))
	f.Add(uint8(0), []byte(`{"name":"a","name":"b"}`))
	f.Add(uint8(0), []byte(`{"Name":"a"}`))
	f.Add(uint8(0), []byte("{\"name\":\"\xff\"}"))
	f.Add(uint8(1), []byte(`null`))
	f.Add(uint8(2), []byte(`{"src":{"labels":"a"}}   `))
	f.Add(uint8(4), []byte(`{"file":"a","data":"x"`))
	f.Fuzz(func(t *testing.T, kind uint8, body []byte) {
		var v any
		switch kind % 5 {
		case 0:
			v = new(EndpointAdd)
		case 1:
			v = new(EndpointAudit)
		case 2:
			v = new(TraceRequest)
		case 3:
			v = new(RawEntry)
		case 4:
			v = new(PolicyImport)
		}
		err := DecodeBody(httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body)), v)
		if err != nil {
			var he *HTTPError
			if !errors.As(err, &he) || he.Code < 400 || he.Code > 499 || he.Msg == "" {
				t.Fatalf("refusal %v is not a 4xx with a message", err)
			}
			return
		}
		if json.Unmarshal(body, new(json.RawMessage)) != nil {
			t.Fatalf("accepted %q, which is not one JSON value", body)
		}
		enc, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		w := newOf(v)
		if err := DecodeBody(httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(enc)), w); err != nil {
			t.Fatalf("the encoding %s of an accepted body is refused: %v", enc, err)
		}
		enc2, _ := json.Marshal(w)
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("round trip: %s then %s", enc, enc2)
		}
	})
}

func newOf(v any) any {
	switch v.(type) {
	case *EndpointAdd:
		return new(EndpointAdd)
	case *EndpointAudit:
		return new(EndpointAudit)
	case *TraceRequest:
		return new(TraceRequest)
	case *RawEntry:
		return new(RawEntry)
	case *PolicyImport:
		return new(PolicyImport)
	}
	panic("unknown type")
}
