package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/policy"
	"github.com/rackwire/rackwire/daemon/policysync"
	"github.com/rackwire/rackwire/daemon/store"
)

// Fuzz targets for the API request bodies that reach validation code of
// this package: POST /v1/endpoints (EndpointAdd), POST /v1/policy/trace
// (TraceRequest) and POST /v1/policies (PolicyImport). Each decodes the
// body with api.DecodeBody and runs the handler's own function, not the
// HTTP server. Properties: no panic; a refused body is an *api.HTTPError
// with a 4xx code (bad input is never a 500); what is accepted is what was
// asked for.

func decodeBody(t *testing.T, body []byte, v any) error {
	t.Helper()
	r := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
	err := api.DecodeBody(r, v)
	if err != nil {
		want4xx(t, "DecodeBody", err)
		return err
	}
	// Strict: one JSON value and nothing after it.
	if json.Unmarshal(body, new(json.RawMessage)) != nil {
		t.Fatalf("DecodeBody accepted %q, which is not one JSON value", body)
	}
	return nil
}

// want4xx fails unless err is an *api.HTTPError with a 4xx code.
func want4xx(t *testing.T, what string, err error) {
	t.Helper()
	var he *api.HTTPError
	if !errors.As(err, &he) || he.Code < 400 || he.Code > 499 {
		t.Fatalf("%s: refusal %v (%T) is not a 4xx API error", what, err, err)
	}
}

// fuzzNetns moves a requested netns path under dir, where nothing exists:
// the manager opens the path it is given, and a fuzzer running as root
// must not touch the host's files, whatever the open does. The form of the
// path (empty, relative, long, NUL bytes) is kept for the validation.
func fuzzNetns(dir, s string) string {
	if !strings.HasPrefix(s, "/") {
		return s
	}
	return dir + "/netns-absent" + filepath.Clean(s)
}

func fuzzManager(t testing.TB) *endpoint.Manager {
	dir := t.TempDir()
	m, err := endpoint.New(endpoint.Options{StateDir: dir}, nil, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("endpoint manager: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func FuzzEndpointAdd(f *testing.F) {
	f.Add([]byte(`{"name":"web-1","netns":"/run/netns/web-1","labels":"app=web,env=prod"}`), "web-1", "/run/netns/web-1", "app=web", "10.250.1.5", "fd00::5")
	f.Add([]byte(`{"name":"web-1","netns":"/run/netns/web-1","labels":"app=web","ip":"10.250.1.5","ipv6":"fd00::5"}`), "db", "", "app=db", "", "")
	f.Add([]byte(`{"name":"web-1","unknown":1}`), "12345", "x", "reserved:host", "10.250.1.5", "10.250.1.6")
	f.Add([]byte(`{"name":"a"} {"name":"b"}`), "-bad", "x", "a=b,a=c", "fe80::1%eth0", "::ffff:10.0.0.1")
	f.Add([]byte(`null`), "a", "x", "", "not-an-ip", "")
	f.Add([]byte(`{"labels":5}`), strings.Repeat("a", 64), "x", "k="+strings.Repeat("v", 254), "", "")
	// One manager for every input: a refused request changes nothing.
	m := fuzzManager(f)
	a := &agent{log: slog.New(slog.DiscardHandler), eps: m}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, body []byte, name, netns, labels, ip, ip6 string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var in api.EndpointAdd
		if decodeBody(t, body, &in) == nil {
			in.Netns = fuzzNetns(dir, in.Netns)
			if _, err := a.addEndpoint(ctx, in); err == nil {
				t.Fatalf("endpoint %+v added without a namespace", in)
			} else {
				want4xx(t, "decoded body", err)
			}
		}
		// The same fields, well-formed JSON: validation alone decides.
		in = api.EndpointAdd{Name: name, Netns: fuzzNetns(dir, netns), Labels: labels, IP: ip, IPv6: ip6}
		_, err := a.addEndpoint(ctx, in)
		if err == nil {
			t.Fatalf("endpoint %+v added without a namespace", in)
		}
		want4xx(t, fmt.Sprintf("%+v", in), err)
		if len(m.List()) != 0 {
			t.Fatalf("a refused request left endpoints %v", m.List())
		}
	})
}

func fuzzEngine() *policy.Engine {
	e := policy.New(nil, policy.Options{})
	e.UpsertIdentity(identity.Make(3, 300), identity.MustLabels("app", "web"))
	e.UpsertIdentity(identity.Make(3, 301), identity.MustLabels("app", "db"))
	files, _ := filepath.Glob("../docs/examples/*")
	sort.Strings(files)
	for _, p := range files {
		if ps, err := policy.LoadFile(p); err == nil {
			_ = e.SetPolicies(policy.SourceFile(p), ps)
		}
	}
	return e
}

func FuzzTraceRequest(f *testing.F) {
	f.Add([]byte(`{"src":{"labels":"app=web"},"dst":{"labels":"app=db"},"dport":"5432/tcp"}`), "app=web", "", "", "app=db", "", "", "80/tcp")
	f.Add([]byte(`{"src":{"ip":"10.0.0.1"},"dst":{"endpoint":"web-1"},"dport":"53/udp"}`), "", "10.0.0.1", "", "", "", "web-1", "53/udp")
	f.Add([]byte(`{"src":{"labels":"app=web","ip":"10.0.0.1"},"dst":{},"dport":"x"}`), "app=web", "10.0.0.1", "", "", "2001:db8::1", "", "0")
	f.Add([]byte(`{"dport":"65536/tcp"}`), "reserved:host", "", "", "app=db", "", "", "65535/icmpv6")
	f.Add([]byte(`{"src":1}`), "", "fe80::1%eth0", "", "", "::ffff:1.2.3.4", "", "80/any")
	// Trace only reads the engine and the endpoints: one of each.
	a := &agent{log: slog.New(slog.DiscardHandler), eps: fuzzManager(f), pol: fuzzEngine()}
	f.Fuzz(func(t *testing.T, body []byte, sl, sip, sep, dl, dip, dep, dport string) {
		check := func(in api.TraceRequest) {
			res, err := a.trace(in)
			if err != nil {
				want4xx(t, fmt.Sprintf("%+v", in), err)
				return
			}
			if res.Verdict != "allowed" && res.Verdict != "denied" {
				t.Fatalf("trace %+v: verdict %q", in, res.Verdict)
			}
			port, proto, err := policy.ParsePortProto(in.DPort)
			if err != nil || res.DPort != port || res.Proto != proto {
				t.Fatalf("trace %+v answered for %d/%d", in, res.DPort, res.Proto)
			}
			for _, s := range []api.TraceSubject{in.Src, in.Dst} {
				n := 0
				for _, f := range []string{s.Labels, s.IP, s.Endpoint} {
					if f != "" {
						n++
					}
				}
				if n != 1 {
					t.Fatalf("trace %+v accepted a subject with %d fields", in, n)
				}
			}
		}
		var in api.TraceRequest
		if decodeBody(t, body, &in) == nil {
			check(in)
		}
		check(api.TraceRequest{Src: api.TraceSubject{Labels: sl, IP: sip, Endpoint: sep}, Dst: api.TraceSubject{Labels: dl, IP: dip, Endpoint: dep}, DPort: dport})
	})
}

// memStore is a store.Store in memory, enough for importPolicies.
type memStore struct {
	mu    sync.Mutex
	kvs   map[string]store.KV
	index uint64
}

func (m *memStore) Get(_ context.Context, key string) (store.KV, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	kv, ok := m.kvs[key]
	if !ok {
		return kv, store.ErrNotFound
	}
	return kv, nil
}

func (m *memStore) List(_ context.Context, prefix string) ([]store.KV, uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []store.KV
	for k, kv := range m.kvs {
		if strings.HasPrefix(k, prefix) {
			out = append(out, kv)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, max(m.index, 1), nil
}

func (m *memStore) Put(_ context.Context, key string, value []byte, _ store.PutOptions) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(value) > store.MaxValueSize {
		return store.ErrTooLarge
	}
	m.index++
	m.kvs[key] = store.KV{Key: key, Value: bytes.Clone(value), ModifyIndex: m.index}
	return nil
}

func (m *memStore) CAS(ctx context.Context, key string, value []byte, index uint64, o store.PutOptions) (bool, error) {
	return false, errors.New("memStore: CAS not implemented")
}

func (m *memStore) Delete(_ context.Context, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.kvs, key)
	m.index++
	return nil
}

func (m *memStore) DeleteCAS(context.Context, string, uint64) (bool, error) {
	return false, errors.New("memStore: DeleteCAS not implemented")
}

func (m *memStore) Watch(ctx context.Context, prefix string, _ uint64, _ time.Duration) ([]store.KV, uint64, error) {
	return m.List(ctx, prefix)
}

func (m *memStore) Health() store.Health { return store.Health{Backend: "mem", State: store.StateOK} }
func (m *memStore) Close() error         { return nil }

type nopWriter struct{}

func (nopWriter) SetPolicy(uint16, []policy.Entry) error { return nil }

type nopSink struct{}

func (nopSink) SetCIDR(netip.Prefix, identity.ID) error { return nil }
func (nopSink) DeleteCIDR(netip.Prefix) error           { return nil }

// FuzzPolicyImport: what POST /v1/policies accepts is written to the store
// and, read back from the store by the same path every agent uses
// (policy.DecodeStoreValue through the syncer), is in force, unchanged; what
// it refuses is a 4xx and writes nothing.
func FuzzPolicyImport(f *testing.F) {
	files, _ := filepath.Glob("../docs/examples/*")
	sort.Strings(files)
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			body, _ := json.Marshal(api.PolicyImport{File: filepath.Base(p), Data: string(b)})
			f.Add(body, filepath.Base(p), string(b))
		}
	}
	f.Add([]byte(`{"file":"x.yaml","data":""}`), "", "---\n")
	f.Add([]byte(`{"file":"x.yaml","data":"[]","extra":true}`), "x.json", `{"apiVersion":"cilium.io/v2","kind":"List","items":[]}`)
	f.Fuzz(func(t *testing.T, body []byte, file, data string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		run := func(in api.PolicyImport) {
			st := &memStore{kvs: map[string]store.KV{}}
			eng := policy.New(nil, policy.Options{})
			a := &agent{log: slog.New(slog.DiscardHandler), st: st, pol: eng,
				sync: policysync.New(eng, nopWriter{}, nopSink{}, nil)}
			out, err := a.importPolicies(ctx, in.File, []byte(in.Data))
			if err != nil {
				want4xx(t, "import", err)
				if len(st.kvs) != 0 {
					t.Fatalf("refused import wrote %d keys", len(st.kvs))
				}
				return
			}
			want, err := policy.Load("request", []byte(in.Data))
			if err != nil || len(want) != len(out) || len(out) == 0 {
				t.Fatalf("import of %d policies answered %v (load: %v)", len(want), out, err)
			}
			inForce := map[string]policy.Policy{}
			for _, l := range eng.Policies() {
				inForce[l.Source] = l.Policy
			}
			for i, s := range out {
				p, ok := inForce[policy.SourceStore(s.Name)]
				if !ok {
					t.Fatalf("imported policy %q is not in force: the store decoder refused what import accepted", s.Name)
				}
				b1, _ := policy.EncodeStoreValue(p)
				b2, _ := policy.EncodeStoreValue(want[i])
				if s.Name != want[i].Metadata.Name || !bytes.Equal(b1, b2) {
					t.Fatalf("policy %q in force differs from the imported one:\n%s\n%s", s.Name, b1, b2)
				}
			}
		}
		var in api.PolicyImport
		if decodeBody(t, body, &in) == nil {
			run(in)
		}
		run(api.PolicyImport{File: file, Data: data})
	})
}
