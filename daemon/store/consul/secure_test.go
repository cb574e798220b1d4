package consul

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/consultest"
)

// writeUntrustedCA writes a CA certificate that signed nothing Consul
// serves.
func writeUntrustedCA(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "untrusted test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "other-ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeToken writes token to a file with exactly mode perm.
func writeToken(t *testing.T, token string, perm os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "consul.token")
	if err := os.WriteFile(p, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, perm); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestNewRefuses: the transport checks of [store] hold for any caller of
// New, not only for a config that went through validation.
func TestNewRefuses(t *testing.T) {
	tok := writeToken(t, "s3cr3t-token", 0o600)
	open := writeToken(t, "s3cr3t-token", 0o644)
	empty := writeToken(t, "", 0o600)
	tests := []struct {
		name string
		opts Options
		want string // "" : accepted
	}{
		{"token file 0644", Options{Address: "127.0.0.1:8500", TokenFile: open}, "run `chmod 600 " + open + "`"},
		{"token file missing", Options{Address: "127.0.0.1:8500", TokenFile: "/nonexistent/consul.token"}, "cannot read /nonexistent/consul.token"},
		{"token file empty", Options{Address: "127.0.0.1:8500", TokenFile: empty}, "is empty"},
		{"token over http to 10.1.2.3", Options{Address: "10.1.2.3:8500", TokenFile: tok}, "allow_insecure"},
		{"TLS with http", Options{Address: "127.0.0.1:8500", Scheme: "http", TLSCAFile: "/etc/ca.pem"}, `set scheme = "https"`},
		{"scheme in the address", Options{Address: "https://127.0.0.1:8500"}, "host:port"},
		{"token over http to loopback", Options{Address: "127.0.0.1:8500", TokenFile: tok}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.opts
			o.Node, o.Prefix = "host-x", "rwd-test/"
			// Nothing listens on the port: the session loop only retries.
			s, err := New(o, nil)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("New = %v, want no error", err)
				}
				s.Stop()
				return
			}
			if err == nil {
				s.Stop()
				t.Fatalf("New succeeded, want an error with %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New error = %q, want it to contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "s3cr3t-token") {
				t.Errorf("error shows the token: %q", err)
			}
		})
	}
}

// TestEnvironmentIgnored: with every CONSUL_HTTP_* variable set, requests
// carry only what Options say: no token (or the configured one), no basic
// auth, no namespace or partition, to the configured address.
func TestEnvironmentIgnored(t *testing.T) {
	type seen struct {
		token, auth, query string
	}
	envTok := writeToken(t, "env-file-token", 0o600)
	t.Setenv("CONSUL_HTTP_TOKEN", "env-token")
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", envTok)
	t.Setenv("CONSUL_HTTP_AUTH", "user:env-password")
	t.Setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
	t.Setenv("CONSUL_HTTP_SSL", "true")
	t.Setenv("CONSUL_NAMESPACE", "env-ns")
	t.Setenv("CONSUL_PARTITION", "env-partition")
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, tc := range []struct {
		name, tokenFile, want string
	}{
		{"no token in the config", "", ""},
		{"token in the config", writeToken(t, "config-token", 0o600), "config-token"},
	} {
		// A server per case: a request the previous store had written
		// when Stop cancelled it may still reach its server's handler.
		var mu sync.Mutex
		var got []seen
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			got = append(got, seen{r.Header.Get("X-Consul-Token"), r.Header.Get("Authorization"), r.URL.RawQuery})
			mu.Unlock()
			w.Header().Set("X-Consul-Index", "1")
			w.WriteHeader(http.StatusNotFound)
		}))
		addr := strings.TrimPrefix(srv.URL, "http://")
		s, err := New(Options{Address: addr, TokenFile: tc.tokenFile, Prefix: "rwd-test/", Node: "host-env",
			BackoffMin: time.Hour, BackoffMax: time.Hour}, nil)
		if err != nil {
			t.Fatalf("%s: New: %v", tc.name, err)
		}
		if _, err := s.Get(ctx, "k"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("%s: Get = %v, want ErrNotFound from the test server (not the env's address or proxy)", tc.name, err)
		}
		s.Stop()
		mu.Lock()
		if len(got) == 0 {
			t.Errorf("%s: no request reached the configured address", tc.name)
		}
		for _, r := range got {
			if r.token != tc.want || r.auth != "" || strings.Contains(r.query, "ns=") || strings.Contains(r.query, "partition=") {
				t.Errorf("%s: request carried token %q, authorization %q, query %q; want token %q and nothing from the environment",
					tc.name, r.token, r.auth, r.query, tc.want)
			}
		}
		mu.Unlock()
		srv.Close()
	}
}

// TestTokenOnlyFromConfig: a Consul with ACLs (default deny) refuses the
// agent's requests when the config has no token, even though the
// environment holds the management token; the token from token_file is
// used.
func TestTokenOnlyFromConfig(t *testing.T) {
	const mgmt = "3d1c3b8e-6f0a-4c52-9b7e-a1f0c2d4e6b8"
	a := consultest.StartACL(t, mgmt)
	t.Setenv("CONSUL_HTTP_TOKEN", mgmt)
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", writeToken(t, mgmt, 0o600))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	anon, err := New(Options{Address: a.HTTPAddr, Prefix: "rwd-test/", Node: "host-anon",
		BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Stop()
	if err := anon.Put(ctx, "k", []byte("v"), store.PutOptions{}); err == nil || !strings.Contains(err.Error(), "403") {
		t.Errorf("Put without a configured token = %v, want 403 (the environment's token must not be used)", err)
	}
	if _, err := anon.Get(ctx, "k"); err == nil || errors.Is(err, store.ErrNotFound) || !strings.Contains(err.Error(), "403") {
		t.Errorf("Get without a configured token = %v, want 403", err)
	}

	s, err := New(Options{Address: a.HTTPAddr, Prefix: "rwd-test/", Node: "host-tok", TokenFile: writeToken(t, mgmt, 0o600),
		RenewInterval: time.Second, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Put(ctx, "k", []byte("v"), store.PutOptions{Owned: true}); err != nil {
		t.Fatalf("Put owned with the token from token_file: %v", err)
	}
	if kv, err := s.Get(ctx, "k"); err != nil || string(kv.Value) != "v" {
		t.Fatalf("Get with the token from token_file = %+v, %v", kv, err)
	}
}

// TestSecretsNotLogged runs stores against a Consul with ACLs, one with the
// right token and one with a wrong one (so that every step fails and
// logs), at debug level, and checks that neither token appears in the
// logs, the errors or Health.
func TestSecretsNotLogged(t *testing.T) {
	const mgmt = "9a7b5c3d-1e2f-4a6b-8c0d-e1f2a3b4c5d6"
	const wrong = "0f0e0d0c-0b0a-4909-8807-060504030201"
	a := consultest.StartACL(t, mgmt)
	var buf syncBuffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []string
	note := func(err error) {
		if err != nil {
			errs = append(errs, err.Error())
		}
	}

	s, err := New(Options{Address: a.HTTPAddr, Prefix: "rwd-test/", Node: "host-log", TokenFile: writeToken(t, mgmt, 0o600),
		RenewInterval: 200 * time.Millisecond, BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second}, log)
	if err != nil {
		t.Fatal(err)
	}
	note(s.Put(ctx, "a/1", []byte("v"), store.PutOptions{Owned: true}))
	_, err = s.Get(ctx, "a/1")
	note(err)
	_, idx, err := s.List(ctx, "a/")
	note(err)
	_, _, err = s.Watch(ctx, "a/", idx, 100*time.Millisecond)
	note(err)
	e := s.Elector("locks/gc")
	_, err = e.Lead(ctx)
	note(err)
	note(e.Resign())
	time.Sleep(500 * time.Millisecond) // a few renews
	note(s.Close())
	if len(errs) > 0 {
		t.Fatalf("store with the right token: %v", errs)
	}

	bad, err := New(Options{Address: a.HTTPAddr, Prefix: "rwd-test/", Node: "host-wrong", TokenFile: writeToken(t, wrong, 0o600),
		BackoffMin: 50 * time.Millisecond, BackoffMax: 100 * time.Millisecond}, log)
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.Get(ctx, "a/1")
	note(err)
	note(bad.Put(ctx, "a/2", []byte("v"), store.PutOptions{}))
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(buf.String(), "consul session step failed") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	h := bad.Health()
	bad.Stop()

	logs := buf.String()
	if !strings.Contains(logs, "consul client configured") || !strings.Contains(logs, "token_set=true") ||
		!strings.Contains(logs, "consul session step failed") {
		t.Fatalf("the logs lack the expected lines (test setup):\n%s", logs)
	}
	if len(errs) == 0 {
		t.Fatalf("the store with the wrong token reported no error (test setup)")
	}
	all := logs + "\n" + strings.Join(errs, "\n") + "\n" + h.Error + "\n" + strings.Join(values(h.Detail), "\n")
	for _, secret := range []string{mgmt, wrong} {
		if strings.Contains(all, secret) {
			t.Errorf("a token appears in the logs, errors or health:\n%s", all)
		}
	}
}

func values(m map[string]string) []string {
	var out []string
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var _ io.Writer = (*syncBuffer)(nil)

// TestFilteredListRefused: a token that may list the prefix but not read
// every key under it gets a list with those keys left out (HTTP 200, the
// header X-Consul-Results-Filtered-By-ACLs); List and Watch refuse it with
// store.ErrFiltered instead of reading the missing keys as deleted, and a
// token that may read everything lists everything.
func TestFilteredListRefused(t *testing.T) {
	const mgmt = "5e2c4b9f-7a1b-4d63-8c8f-b2a1d3e5f7c9"
	a := consultest.StartACL(t, mgmt)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := api.DefaultNonPooledConfig()
	cfg.Address, cfg.Token = a.HTTPAddr, mgmt
	admin, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pol, _, err := admin.ACL().PolicyCreate(&api.ACLPolicy{Name: "rw-partial",
		Rules: `key_prefix "rwd-test/" { policy = "write" }
key_prefix "rwd-test/hidden/" { policy = "deny" }
session_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
agent_prefix "" { policy = "read" }`}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := admin.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"rwd-test/seen/a", "rwd-test/hidden/b"} {
		if _, err := admin.KV().Put(&api.KVPair{Key: k, Value: []byte("v")}, nil); err != nil {
			t.Fatal(err)
		}
	}
	open := func(token string) *Store {
		s, err := New(Options{Address: a.HTTPAddr, Prefix: "rwd-test/", Node: "host-f", TokenFile: writeToken(t, token, 0o600),
			BackoffMin: 100 * time.Millisecond, BackoffMax: time.Second}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	partial := open(tok.SecretID)
	if _, _, err := partial.List(ctx, ""); !errors.Is(err, store.ErrFiltered) {
		t.Errorf("List with keys hidden by ACLs = %v, want ErrFiltered", err)
	}
	if _, _, err := partial.Watch(ctx, "", 0, time.Second); !errors.Is(err, store.ErrFiltered) {
		t.Errorf("Watch with keys hidden by ACLs = %v, want ErrFiltered", err)
	}
	if kvs, _, err := partial.List(ctx, "seen/"); err != nil || len(kvs) != 1 || kvs[0].Key != "seen/a" {
		t.Errorf("List of a prefix it may read = %+v, %v", kvs, err)
	}
	all := open(mgmt)
	if kvs, _, err := all.List(ctx, ""); err != nil || len(kvs) != 2 || kvs[0].Key != "hidden/b" || kvs[1].Key != "seen/a" {
		t.Errorf("List with the management token = %+v, %v; want both keys, sorted", kvs, err)
	}
}
