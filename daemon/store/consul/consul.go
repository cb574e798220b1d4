// Package consul is the Consul backend of store.Store: rackwire's shared
// state (identities, ipcache, nodes, policies) lives in Consul KV under a
// configurable prefix, so that every host sees the same identities.
//
// Who changes it: the store owner. Who imports it: daemon wiring only
// (everything else talks to store.Store).
//
// Behaviour worth knowing:
//   - Get and List are default-consistency reads (served by the leader);
//     Watch is a blocking query that allows stale reads, because it is the
//     hot path and every host runs several.
//   - CAS maps to Consul's check-and-set (index 0 = create only); owned
//     writes are lock acquisitions on this host's session.
//   - One session per host, TTL from config (default 24h), behavior
//     delete, renewed every RenewInterval. When a renew says the session is
//     gone, a new session is created and every owned key the backend still
//     remembers is written again: it never deletes what the host still uses.
//   - On restart a new session is created; keys the previous session of
//     this host still holds are taken over (delete-cas + lock in one
//     transaction) when written again, and the old session is destroyed
//     after OldSessionGrace, which removes only what was not written again.
//   - Consul unreachable: calls fail with store.ErrUnavailable, the session
//     loop retries with exponential backoff and jitter, Health says
//     degraded and since when. Nothing local is flushed.
//   - Values are opaque bytes: the backend never parses them, so malformed
//     data cannot break it; writes over store.MaxValueSize are refused.
//   - Only Options decide how Consul is reached: the environment's
//     CONSUL_HTTP_* variables (token, token file, address, TLS, verify,
//     namespace, partition) and HTTP(S)_PROXY are ignored, and the ACL token
//     (read from TokenFile) is never logged.
package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/rackwire/rackwire/internal/backoff"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/config"
	"github.com/rackwire/rackwire/daemon/store"
)

// Options configure the backend. The zero values of the tuning fields pick
// the defaults noted on each.
type Options struct {
	Address       string // host:port of a Consul agent's HTTP API
	Scheme        string // "http" or "https"
	Datacenter    string
	TokenFile     string // ACL token file (mode 0600); the token never lives in config
	TLSCAFile     string
	TLSCertFile   string
	TLSKeyFile    string
	TLSServerName string
	Prefix        string // e.g. "rackwire/"
	Node          string // this host's name; names the session
	// AllowInsecure allows the token over plain http to an address that
	// is not loopback ([store] allow_insecure).
	AllowInsecure bool
	// Gzip asks Consul to compress its answers ([store] gzip).
	Gzip bool

	SessionTTL time.Duration // default 24h, at most 24h (Consul's 86400s)
	// RenewInterval is how often the session is renewed and checked; it
	// bounds how long a lost session goes unnoticed. Default 1m (capped
	// at TTL/2).
	RenewInterval time.Duration
	// OldSessionGrace is how long sessions of a previous run of this host
	// live on before they are destroyed. Default 10m.
	OldSessionGrace time.Duration
	// BackoffMin/BackoffMax bound the reconnect backoff. Default 1s/1m.
	BackoffMin, BackoffMax time.Duration
	// CallTimeout bounds one non-blocking request made by the backend's
	// own loops. Default 10s.
	CallTimeout time.Duration
}

// FromConfig builds Options from the [store] section and the node name.
func FromConfig(c config.Store, node string) Options {
	return Options{
		Address: c.Address, Scheme: c.Scheme, Datacenter: c.Datacenter,
		TokenFile: c.TokenFile, TLSCAFile: c.TLSCAFile, TLSCertFile: c.TLSCertFile,
		TLSKeyFile: c.TLSKeyFile, TLSServerName: c.TLSServerName,
		Prefix: c.Prefix, Node: node, SessionTTL: c.SessionTTL.Duration,
		AllowInsecure: c.AllowInsecure, Gzip: c.Gzip,
	}
}

// maxSessionTTL is Consul's upper bound for a session TTL.
const maxSessionTTL = 24 * time.Hour

// maxWait is Consul's upper bound for a blocking query's wait.
const maxWait = 10 * time.Minute

// Store is the Consul backend. Safe for concurrent use.
type Store struct {
	opts   Options
	client *api.Client
	kv     *api.KV
	// http is the client's HTTP client (pinnedAuth), for listKV.
	http   *http.Client
	log    *slog.Logger
	prefix string

	kick   chan struct{} // asks the session loop to check the session now
	cancel context.CancelFunc
	done   chan struct{}

	mu sync.Mutex // guards the fields below
	// session is this host's current session id, "" while there is none.
	session string
	// sessionUp is closed when session becomes non-empty; replaced when
	// the session is lost.
	sessionUp chan struct{}
	// owned remembers every owned key this host wrote, with its value, so
	// that a new session can take them all back.
	owned       map[string][]byte
	searchedOld bool // sessions of an earlier run were looked for (session loop only)
	// previous is the session of this host's previous run (the newest
	// earlier one) while it may still hold keys: until it is destroyed
	// after OldSessionGrace; "" when there was none. heldBy is the
	// session each owned key was last written under. A key written for
	// the first time since the restart is taken from previous in one
	// transaction.
	previous string
	heldBy   map[string]string
	// sessionNode is the Consul node the session is bound to (the agent
	// this backend talks to), and onServer whether that agent is a server.
	sessionNode string
	onServer    bool
	state       string
	since       time.Time
	lastErr     string
	lastContact time.Time
	leader      string
	closed      bool
}

// New connects the backend and starts its session loop. It does not wait
// for Consul: an unreachable Consul leaves the store degraded and the
// loop keeps trying.
func New(opts Options, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Node == "" {
		return nil, errors.New("consul store: node name is empty")
	}
	if opts.SessionTTL <= 0 {
		opts.SessionTTL = maxSessionTTL
	}
	if opts.SessionTTL > maxSessionTTL {
		opts.SessionTTL = maxSessionTTL
	}
	if opts.SessionTTL < 10*time.Second {
		opts.SessionTTL = 10 * time.Second
	}
	if opts.RenewInterval <= 0 {
		opts.RenewInterval = time.Minute
	}
	if opts.RenewInterval > opts.SessionTTL/2 {
		opts.RenewInterval = opts.SessionTTL / 2
	}
	if opts.OldSessionGrace <= 0 {
		opts.OldSessionGrace = 10 * time.Minute
	}
	if opts.BackoffMin <= 0 {
		opts.BackoffMin = time.Second
	}
	if opts.BackoffMax <= 0 {
		opts.BackoffMax = time.Minute
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = 10 * time.Second
	}
	if opts.Address == "" {
		opts.Address = config.Default().Store.Address
	}
	if opts.Scheme == "" {
		opts.Scheme = "http"
	}
	client, hc, hasToken, err := newClient(opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{
		opts: opts, client: client, kv: client.KV(), http: hc,
		log:       log.With("subsys", "store", "backend", "consul"),
		prefix:    opts.Prefix,
		kick:      make(chan struct{}, 1),
		cancel:    cancel,
		done:      make(chan struct{}),
		sessionUp: make(chan struct{}),
		owned:     map[string][]byte{},
		state:     store.StateConnecting,
		since:     time.Now(),
	}
	s.log.Debug("consul client configured", "address", opts.Address, "scheme", opts.Scheme,
		"datacenter", opts.Datacenter, "token_file", opts.TokenFile, "token_set", hasToken,
		"tls_ca_file", opts.TLSCAFile, "tls_server_name", opts.TLSServerName)
	go s.sessionLoop(ctx)
	return s, nil
}

// The connection pool: room for every request the store keeps open at
// once, and an idle connection's lifetime.
const (
	maxIdleConns    = 16
	idleConnTimeout = 30 * time.Second
)

// newClient builds the Consul API client from opts alone. api.NewClient
// reads the environment (CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE,
// CONSUL_HTTP_SSL_VERIFY, CONSUL_CACERT, CONSUL_NAMESPACE, ...) and fills
// every field left empty from it, so nothing is left to it: the HTTP
// client, with its TLS settings, is built here; the token file it would
// read is /dev/null; and every request goes through pinnedAuth, which
// puts back the token from opts (or none) whatever the library set. It
// reports whether a token is configured; the token itself is not
// returned, logged or kept outside the HTTP client, which is returned too
// (for listKV).
func newClient(opts Options) (*api.Client, *http.Client, bool, error) {
	if opts.Scheme != "http" && opts.Scheme != "https" {
		return nil, nil, false, fmt.Errorf("consul scheme %q: write \"http\" or \"https\"", opts.Scheme)
	}
	if strings.Contains(opts.Address, "://") {
		// api.NewClient would take a scheme (or a unix socket) from it.
		return nil, nil, false, fmt.Errorf("consul address %q: write host:port and set the scheme on its own", opts.Address)
	}
	if opts.Scheme == "http" && (opts.TLSCAFile != "" || opts.TLSCertFile != "" || opts.TLSKeyFile != "") {
		return nil, nil, false, errors.New(`consul TLS files are set but scheme = "http" ignores them; set scheme = "https"`)
	}
	token := ""
	if opts.TokenFile != "" {
		if err := config.CheckTokenFile(opts.TokenFile); err != nil {
			return nil, nil, false, fmt.Errorf("consul token file: %w", err)
		}
		b, err := os.ReadFile(opts.TokenFile)
		if err != nil {
			return nil, nil, false, fmt.Errorf("read consul token file %s: %w", opts.TokenFile, unwrapPath(err))
		}
		if token = strings.TrimSpace(string(b)); token == "" {
			return nil, nil, false, fmt.Errorf("consul token file %s is empty; write the ACL token in it, or remove token_file", opts.TokenFile)
		}
		if opts.Scheme == "http" && !opts.AllowInsecure && !config.LoopbackAddress(opts.Address) {
			return nil, nil, false, fmt.Errorf("consul at %s over plain http: the ACL token would cross the network in clear text; "+
				"use scheme = \"https\", the local agent, or allow_insecure = true", opts.Address)
		}
	}
	// A pooled transport, without a proxy (HTTP(S)_PROXY are environment
	// too). The store keeps a dozen requests open at once (the blocking
	// watches, session renewal, writes); each goes back to the pool when
	// answered, so an agent holds about as many connections as it has
	// requests in flight. The transport the backend first used opened a
	// connection per request: at a fleet's cold start that was 12% of an
	// agent's CPU in connect and teardown (and a TLS handshake per
	// request with https), and as much again on the Consul side
	// (TestStoreReusesConnections, docs/scale.md). An idle connection is
	// closed after idleConnTimeout, below the idle timeouts of the load
	// balancers that sometimes stand in front of Consul; a request that
	// finds its pooled connection closed by the agent is retried by the
	// transport on a new one when nothing of it was sent.
	tr := api.DefaultConfig().Transport
	tr.Proxy = nil
	tr.MaxIdleConnsPerHost = maxIdleConns
	tr.IdleConnTimeout = idleConnTimeout
	// Answers uncompressed unless [store] gzip: Go's transport asks for
	// gzip by itself, and Consul then compresses every answer, a 6 MB
	// list as much as a 200-byte one (TestStoreGzipOnlyWhenAsked).
	tr.DisableCompression = !opts.Gzip
	tlsConf, err := api.SetupTLSConfig(&api.TLSConfig{
		Address: opts.TLSServerName, CAFile: opts.TLSCAFile,
		CertFile: opts.TLSCertFile, KeyFile: opts.TLSKeyFile,
	})
	if err != nil {
		return nil, nil, false, fmt.Errorf("consul TLS settings: %w", err)
	}
	tr.TLSClientConfig = tlsConf
	hc := &http.Client{Transport: &pinnedAuth{base: tr, token: token}}
	cfg := &api.Config{
		Address:    opts.Address,
		Scheme:     opts.Scheme,
		Datacenter: opts.Datacenter,
		Transport:  tr,
		HttpClient: hc,
		Token:      token,
		// Set, so that NewClient reads this (empty) file instead of
		// CONSUL_HTTP_TOKEN_FILE's, which could also fail the start.
		TokenFile: os.DevNull,
	}
	client, err := api.NewClient(cfg)
	if err != nil {
		return nil, nil, false, fmt.Errorf("build consul client for %s: %w", opts.Address, err)
	}
	return client, hc, token != "", nil
}

// NewAPIClient builds a Consul API client exactly as the store does (the
// same address, TLS, token and the environment ignored), for other readers
// of the local Consul agent such as the service catalog watch.
func NewAPIClient(opts Options) (*api.Client, error) {
	if opts.Address == "" {
		opts.Address = config.Default().Store.Address
	}
	if opts.Scheme == "" {
		opts.Scheme = "http"
	}
	c, _, _, err := newClient(opts)
	return c, err
}

// pinnedAuth makes every request carry exactly the configured token (or
// none) and no namespace or partition: what api.NewClient took from the
// environment never reaches Consul.
type pinnedAuth struct {
	base  http.RoundTripper
	token string
}

func (p *pinnedAuth) RoundTrip(req *http.Request) (*http.Response, error) {
	r := req.Clone(req.Context())
	r.Header.Del("X-Consul-Token")
	r.Header.Del("Authorization")
	if p.token != "" {
		r.Header.Set("X-Consul-Token", p.token)
	}
	if q := r.URL.Query(); q.Has("ns") || q.Has("partition") || q.Has("token") {
		q.Del("ns")
		q.Del("partition")
		q.Del("token")
		r.URL.RawQuery = q.Encode()
	}
	return p.base.RoundTrip(r)
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Session returns the current session id, "" while there is none.
func (s *Store) Session() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.session
}

func (s *Store) full(key string) string { return s.prefix + key }

func (s *Store) rel(key string) string { return strings.TrimPrefix(key, s.prefix) }

// noteOK records a successful round trip.
func (s *Store) noteOK() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastContact = time.Now()
	if s.state != store.StateOK && s.session != "" {
		s.state = store.StateOK
		s.since = time.Now()
		s.lastErr = ""
	}
}

// noteErr records a failed round trip and classifies the error.
func (s *Store) noteErr(step string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", step, err)
	}
	if !unavailable(err) {
		return fmt.Errorf("%s: %w", step, err)
	}
	s.mu.Lock()
	if s.state != store.StateDegraded {
		s.state = store.StateDegraded
		s.since = time.Now()
	}
	s.lastErr = err.Error()
	s.mu.Unlock()
	return fmt.Errorf("%s: %w: %w", step, store.ErrUnavailable, err)
}

// unavailable reports whether err means "Consul cannot answer now" (as
// opposed to a refusal such as a missing ACL permission).
func unavailable(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code >= 500 || se.Code == 429
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "Unexpected response code: 5") ||
		strings.Contains(msg, "connection refused") || strings.Contains(msg, "EOF")
}

func invalidSession(err error) bool {
	return err != nil && strings.Contains(err.Error(), "invalid session")
}

func (s *Store) checkClosed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return store.ErrClosed
	}
	return nil
}

func (s *Store) qopts(ctx context.Context, stale bool) *api.QueryOptions {
	q := &api.QueryOptions{Datacenter: s.opts.Datacenter, AllowStale: stale}
	return q.WithContext(ctx)
}

func (s *Store) wopts(ctx context.Context) *api.WriteOptions {
	w := &api.WriteOptions{Datacenter: s.opts.Datacenter}
	return w.WithContext(ctx)
}

func (s *Store) toKV(p *api.KVPair) store.KV {
	return store.KV{Key: s.rel(p.Key), Value: p.Value, ModifyIndex: p.ModifyIndex,
		CreateIndex: p.CreateIndex, Owner: p.Session}
}

// Get implements store.Store.
func (s *Store) Get(ctx context.Context, key string) (store.KV, error) {
	if err := s.checkClosed(); err != nil {
		return store.KV{}, err
	}
	p, _, err := s.kv.Get(s.full(key), s.qopts(ctx, false))
	if err != nil {
		return store.KV{}, s.noteErr("get "+key, err)
	}
	s.noteOK()
	if p == nil {
		return store.KV{}, fmt.Errorf("get %s: %w", key, store.ErrNotFound)
	}
	return s.toKV(p), nil
}

// List implements store.Store.
func (s *Store) List(ctx context.Context, prefix string) ([]store.KV, uint64, error) {
	if err := s.checkClosed(); err != nil {
		return nil, 0, err
	}
	kvs, meta, err := s.listKV(ctx, prefix, false, 0, 0)
	if err != nil {
		return nil, 0, s.noteErr("list "+prefix, err)
	}
	if err := s.checkFiltered("list "+prefix, meta.Filtered); err != nil {
		return nil, 0, err
	}
	s.noteOK()
	return kvs, nonZero(meta.LastIndex), nil
}

// checkFiltered refuses a list that Consul filtered by ACLs: with a token
// that may not read some keys, Consul answers 200 with those keys left out,
// which would read as "deleted" (a policy gone, an endpoint gone). The
// store is marked degraded with what to do.
func (s *Store) checkFiltered(step string, filtered bool) error {
	if !filtered {
		return nil
	}
	msg := "the ACL token may not read every key under " + s.opts.Prefix + "; grant it read (and write) on the whole prefix (docs/consul.md)"
	s.mu.Lock()
	if s.state != store.StateDegraded {
		s.state = store.StateDegraded
		s.since = time.Now()
	}
	s.lastErr = step + ": " + msg
	s.mu.Unlock()
	return fmt.Errorf("%s: %w: %s", step, store.ErrFiltered, msg)
}

// nonZero keeps an index usable for the next blocking query: Consul's
// rules say never to block on index 0 after the first call.
func nonZero(i uint64) uint64 {
	if i == 0 {
		return 1
	}
	return i
}

// Watch implements store.Store with a stale-allowed blocking query. The
// returned index is never 0; when it is lower than the one given (a
// snapshot restore or a new cluster), callers reset to 0 and list again,
// as Consul's blocking-query rules require.
func (s *Store) Watch(ctx context.Context, prefix string, index uint64, wait time.Duration) ([]store.KV, uint64, error) {
	if err := s.checkClosed(); err != nil {
		return nil, 0, err
	}
	if wait > maxWait {
		wait = maxWait
	}
	kvs, meta, err := s.listKV(ctx, prefix, true, index, wait)
	if err != nil {
		return nil, 0, s.noteErr("watch "+prefix, err)
	}
	if err := s.checkFiltered("watch "+prefix, meta.Filtered); err != nil {
		return nil, 0, err
	}
	s.noteOK()
	return kvs, nonZero(meta.LastIndex), nil
}

func checkSize(key string, value []byte) error {
	if len(value) > store.MaxValueSize {
		return fmt.Errorf("write %s: %d bytes: %w (at most %d)", key, len(value), store.ErrTooLarge, store.MaxValueSize)
	}
	return nil
}

// Put implements store.Store. An owned Put is remembered even when it
// cannot be written now (no session, Consul down): the session loop
// writes it as soon as it can, and the error says store.ErrUnavailable.
func (s *Store) Put(ctx context.Context, key string, value []byte, opts store.PutOptions) error {
	if err := s.checkClosed(); err != nil {
		return err
	}
	if err := checkSize(key, value); err != nil {
		return err
	}
	if !opts.Owned {
		if _, err := s.kv.Put(&api.KVPair{Key: s.full(key), Value: value}, s.wopts(ctx)); err != nil {
			return s.noteErr("put "+key, err)
		}
		s.noteOK()
		return nil
	}
	s.mu.Lock()
	s.owned[key] = append([]byte(nil), value...)
	s.mu.Unlock()
	sid, err := s.waitSession(ctx)
	if err != nil {
		return fmt.Errorf("put owned %s: %w", key, err)
	}
	return s.acquire(ctx, sid, key, value)
}

// waitSession returns the current session, waiting for one until ctx ends.
func (s *Store) waitSession(ctx context.Context) (string, error) {
	for {
		s.mu.Lock()
		sid, up, closed := s.session, s.sessionUp, s.closed
		s.mu.Unlock()
		if closed {
			return "", store.ErrClosed
		}
		if sid != "" {
			return sid, nil
		}
		select {
		case <-up:
		case <-ctx.Done():
			return "", fmt.Errorf("wait for consul session: %w: %w", store.ErrUnavailable, ctx.Err())
		}
	}
}

// acquire writes an owned key under session sid. A key still held by
// another session (this host's previous run) is taken over atomically.
func (s *Store) acquire(ctx context.Context, sid, key string, value []byte) error {
	full := s.full(key)
	if ok, err := s.takeFromPrevious(ctx, sid, key, value); ok || err != nil {
		return err
	}
	for attempt := 0; attempt < 3; attempt++ {
		ok, _, err := s.kv.Acquire(&api.KVPair{Key: full, Value: value, Session: sid}, s.wopts(ctx))
		if invalidSession(err) {
			s.kickSession()
			return fmt.Errorf("put owned %s: session %s is gone: %w", key, sid, store.ErrUnavailable)
		}
		if err != nil {
			return s.noteErr("put owned "+key, err)
		}
		s.noteOK()
		if ok {
			s.noteHeld(key, sid)
			return nil
		}
		// Held by another session, or inside a lock delay.
		cur, _, err := s.kv.Get(full, s.qopts(ctx, false))
		if err != nil {
			return s.noteErr("read holder of "+key, err)
		}
		if cur == nil || cur.Session == "" || cur.Session == sid {
			continue
		}
		ops := api.KVTxnOps{
			{Verb: api.KVDeleteCAS, Key: full, Index: cur.ModifyIndex},
			{Verb: api.KVLock, Key: full, Value: value, Session: sid},
		}
		ok, _, _, err = s.kv.Txn(ops, s.qopts(ctx, false))
		if invalidSession(err) {
			s.kickSession()
			return fmt.Errorf("put owned %s: session %s is gone: %w", key, sid, store.ErrUnavailable)
		}
		if err != nil {
			return s.noteErr("take over "+key, err)
		}
		if ok {
			s.log.Debug("took over owned key from an old session", "key", key, "old_session", cur.Session)
			s.noteHeld(key, sid)
			return nil
		}
	}
	return fmt.Errorf("put owned %s: lock not acquired (held by another session)", key)
}

// PutOwnedBatch implements store.OwnedBatchPutter: the holders of kvs are
// read in one transaction, and the keys are written in another, each
// locked with this host's session; a key still held by another session
// (this host's previous run) is deleted (check-and-set on the index just
// read) and locked in the same transaction, as acquire does one key at a
// time. When the write is refused (a key changed hands between the read
// and the write, or is inside a lock delay) every key goes through
// acquire, which retries and says which key failed.
func (s *Store) PutOwnedBatch(ctx context.Context, kvs []store.KV) (int, error) {
	if err := s.checkClosed(); err != nil {
		return 0, err
	}
	if len(kvs) > store.MaxBatch/2 {
		return 0, fmt.Errorf("put %d owned keys in one transaction: at most %d", len(kvs), store.MaxBatch/2)
	}
	for _, kv := range kvs {
		if err := checkSize(kv.Key, kv.Value); err != nil {
			return 0, err
		}
	}
	s.mu.Lock()
	for _, kv := range kvs {
		s.owned[kv.Key] = append([]byte(nil), kv.Value...)
	}
	s.mu.Unlock()
	sid, err := s.waitSession(ctx)
	if err != nil {
		return 0, fmt.Errorf("put %d owned keys: %w", len(kvs), err)
	}
	keys := make([]string, len(kvs))
	for i, kv := range kvs {
		keys[i] = kv.Key
	}
	held, _, err := s.GetMany(ctx, keys)
	if err != nil {
		return 0, err
	}
	holder := make(map[string]store.KV, len(held))
	for _, kv := range held {
		holder[kv.Key] = kv
	}
	ops := make(api.KVTxnOps, 0, 2*len(kvs))
	for _, kv := range kvs {
		full := s.full(kv.Key)
		if cur, ok := holder[kv.Key]; ok && cur.Owner != "" && cur.Owner != sid {
			ops = append(ops, &api.KVTxnOp{Verb: api.KVDeleteCAS, Key: full, Index: cur.ModifyIndex})
		}
		ops = append(ops, &api.KVTxnOp{Verb: api.KVLock, Key: full, Value: kv.Value, Session: sid})
	}
	ok, _, _, err := s.kv.Txn(ops, s.qopts(ctx, false))
	if invalidSession(err) {
		s.kickSession()
		return 0, fmt.Errorf("put %d owned keys: session %s is gone: %w", len(kvs), sid, store.ErrUnavailable)
	}
	if err != nil {
		return 0, s.noteErr(fmt.Sprintf("put %d owned keys", len(kvs)), err)
	}
	s.noteOK()
	if ok {
		for _, kv := range kvs {
			s.noteHeld(kv.Key, sid)
		}
		return len(kvs), nil
	}
	for i, kv := range kvs {
		if err := s.acquire(ctx, sid, kv.Key, kv.Value); err != nil {
			return i, err
		}
	}
	return len(kvs), nil
}

// takeFromPrevious moves key from the previous run's session to sid in one
// transaction (check that the previous session holds it, delete, lock),
// the first time the key is written after a restart: the acquire, the read
// of the holder and the take-over were three requests per key. It reports
// false, and nothing written, when there is no previous session, the key
// was written in this session already, or the previous session does not
// hold it (the caller then goes the usual way).
func (s *Store) takeFromPrevious(ctx context.Context, sid, key string, value []byte) (bool, error) {
	ok, _, err := s.takeOver(ctx, sid, key, value, nil, "put owned "+key)
	return ok, err
}

// takeOver runs pre, checks that the previous run's session holds key,
// deletes key and locks it under sid with value, in one transaction. It
// reports whether the transaction was applied and, if not, whether one of
// pre's operations failed (else the previous session does not hold key,
// or there is none, or key was written in this session already: nothing
// is sent then).
func (s *Store) takeOver(ctx context.Context, sid, key string, value []byte, pre api.KVTxnOps, what string) (ok, preFailed bool, err error) {
	s.mu.Lock()
	prev, mine := s.previous, s.heldBy[key] == sid
	s.mu.Unlock()
	if prev == "" || mine {
		return false, false, nil
	}
	full := s.full(key)
	ops := append(append(api.KVTxnOps{}, pre...),
		&api.KVTxnOp{Verb: api.KVCheckSession, Key: full, Session: prev},
		&api.KVTxnOp{Verb: api.KVDelete, Key: full},
		&api.KVTxnOp{Verb: api.KVLock, Key: full, Value: value, Session: sid})
	ok, resp, _, err := s.kv.Txn(ops, s.qopts(ctx, false))
	if invalidSession(err) {
		s.kickSession()
		return false, false, fmt.Errorf("%s: session %s is gone: %w", what, sid, store.ErrUnavailable)
	}
	if err != nil {
		return false, false, s.noteErr(what, err)
	}
	s.noteOK()
	if ok {
		s.log.Debug("took over owned key from the previous session", "key", key, "old_session", prev)
		s.noteHeld(key, sid)
		return true, false, nil
	}
	for _, e := range resp.Errors {
		if e.OpIndex < len(pre) {
			return false, true, nil
		}
	}
	return false, false, nil
}

// noteHeld records that key was written under session sid.
func (s *Store) noteHeld(key, sid string) {
	s.mu.Lock()
	if s.heldBy == nil {
		s.heldBy = map[string]string{}
	}
	s.heldBy[key] = sid
	s.mu.Unlock()
}

// CAS implements store.Store. An owned CAS checks and locks in one
// transaction.
func (s *Store) CAS(ctx context.Context, key string, value []byte, index uint64, opts store.PutOptions) (bool, error) {
	if err := s.checkClosed(); err != nil {
		return false, err
	}
	if err := checkSize(key, value); err != nil {
		return false, err
	}
	full := s.full(key)
	if !opts.Owned {
		ok, _, err := s.kv.CAS(&api.KVPair{Key: full, Value: value, ModifyIndex: index}, s.wopts(ctx))
		if err != nil {
			return false, s.noteErr("cas "+key, err)
		}
		s.noteOK()
		return ok, nil
	}
	sid, err := s.waitSession(ctx)
	if err != nil {
		return false, fmt.Errorf("cas owned %s: %w", key, err)
	}
	check := &api.KVTxnOp{Verb: api.KVCheckIndex, Key: full, Index: index}
	if index == 0 {
		check = &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: full}
	}
	ok, _, _, err := s.kv.Txn(api.KVTxnOps{check, {Verb: api.KVLock, Key: full, Value: value, Session: sid}}, s.qopts(ctx, false))
	if invalidSession(err) {
		s.kickSession()
		return false, fmt.Errorf("cas owned %s: session is gone: %w", key, store.ErrUnavailable)
	}
	if err != nil {
		return false, s.noteErr("cas owned "+key, err)
	}
	s.noteOK()
	if ok {
		s.mu.Lock()
		s.owned[key] = append([]byte(nil), value...)
		s.mu.Unlock()
		s.noteHeld(key, sid)
	}
	return ok, nil
}

// CASPutOwned check-and-sets casKey (index 0: create only) and writes
// ownedKey as an owned key, in one transaction: both or neither. It
// reports false when the check-and-set lost. The identity allocator uses
// it to touch or create an id and claim it in one round trip.
func (s *Store) CASPutOwned(ctx context.Context, casKey string, casValue []byte, casIndex uint64, ownedKey string, ownedValue []byte) (bool, error) {
	if err := s.checkClosed(); err != nil {
		return false, err
	}
	if err := checkSize(casKey, casValue); err != nil {
		return false, err
	}
	if err := checkSize(ownedKey, ownedValue); err != nil {
		return false, err
	}
	// Remembered before the write (a session change meanwhile must
	// rewrite it), forgotten again if the write did not happen.
	s.mu.Lock()
	prev, had := s.owned[ownedKey]
	s.owned[ownedKey] = append([]byte(nil), ownedValue...)
	s.mu.Unlock()
	ok, err := s.casPutOwned(ctx, casKey, casValue, casIndex, ownedKey, ownedValue)
	if !ok {
		s.mu.Lock()
		if had {
			s.owned[ownedKey] = prev
		} else {
			delete(s.owned, ownedKey)
			delete(s.heldBy, ownedKey)
		}
		s.mu.Unlock()
	}
	return ok, err
}

func (s *Store) casPutOwned(ctx context.Context, casKey string, casValue []byte, casIndex uint64, ownedKey string, ownedValue []byte) (bool, error) {
	sid, err := s.waitSession(ctx)
	if err != nil {
		return false, fmt.Errorf("cas %s with owned %s: %w", casKey, ownedKey, err)
	}
	if ok, done, err := s.casTakeFromPrevious(ctx, sid, casKey, casValue, casIndex, ownedKey, ownedValue); done || err != nil {
		return ok, err
	}
	ops := api.KVTxnOps{
		{Verb: api.KVCAS, Key: s.full(casKey), Value: casValue, Index: casIndex},
		{Verb: api.KVLock, Key: s.full(ownedKey), Value: ownedValue, Session: sid},
	}
	ok, resp, _, err := s.kv.Txn(ops, s.qopts(ctx, false))
	if invalidSession(err) {
		s.kickSession()
		return false, fmt.Errorf("cas %s with owned %s: session is gone: %w", casKey, ownedKey, store.ErrUnavailable)
	}
	if err != nil {
		return false, s.noteErr("cas "+casKey+" with owned "+ownedKey, err)
	}
	s.noteOK()
	if ok {
		s.noteHeld(ownedKey, sid)
		return true, nil
	}
	lockFailed := false
	for _, e := range resp.Errors {
		if e.OpIndex == 1 {
			lockFailed = true
		}
	}
	if !lockFailed {
		return false, nil // the check-and-set lost
	}
	// The owned key is held by another session (this host's previous
	// run): do it in two steps, the second taking the key over.
	ok, _, err = s.kv.CAS(&api.KVPair{Key: s.full(casKey), Value: casValue, ModifyIndex: casIndex}, s.wopts(ctx))
	if err != nil {
		return false, s.noteErr("cas "+casKey, err)
	}
	if !ok {
		return false, nil
	}
	return true, s.acquire(ctx, sid, ownedKey, ownedValue)
}

// casTakeFromPrevious is casPutOwned's first try after a restart, when
// ownedKey is still held by the previous run's session (the identity
// allocator's value keys): check-and-set casKey and take ownedKey over
// (takeOver), in one transaction. The two-op transaction would be refused
// and fall back to a check-and-set and a take-over: three requests per key
// instead of one. done is false, with nothing written, when ownedKey is
// not the previous session's to take: the caller then goes the usual way.
// done with ok false says the check-and-set lost.
func (s *Store) casTakeFromPrevious(ctx context.Context, sid, casKey string, casValue []byte, casIndex uint64, ownedKey string, ownedValue []byte) (ok, done bool, err error) {
	ok, lost, err := s.takeOver(ctx, sid, ownedKey, ownedValue,
		api.KVTxnOps{{Verb: api.KVCAS, Key: s.full(casKey), Value: casValue, Index: casIndex}},
		"cas "+casKey+" with owned "+ownedKey)
	return ok, ok || lost || err != nil, err
}

// Delete implements store.Store; an owned key is forgotten first so that
// a session change cannot bring it back.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := s.checkClosed(); err != nil {
		return err
	}
	s.mu.Lock()
	delete(s.owned, key)
	delete(s.heldBy, key)
	s.mu.Unlock()
	if _, err := s.kv.Delete(s.full(key), s.wopts(ctx)); err != nil {
		return s.noteErr("delete "+key, err)
	}
	s.noteOK()
	return nil
}

// DeleteCAS implements store.Store.
func (s *Store) DeleteCAS(ctx context.Context, key string, index uint64) (bool, error) {
	if err := s.checkClosed(); err != nil {
		return false, err
	}
	ok, _, err := s.kv.DeleteCAS(&api.KVPair{Key: s.full(key), ModifyIndex: index}, s.wopts(ctx))
	if err != nil {
		return false, s.noteErr("delete-cas "+key, err)
	}
	s.noteOK()
	if ok {
		s.mu.Lock()
		delete(s.owned, key)
		delete(s.heldBy, key)
		s.mu.Unlock()
	}
	return ok, nil
}

// DeleteCASBatch implements store.BatchDeleter: one transaction of
// delete-cas operations (at most store.MaxBatch).
func (s *Store) DeleteCASBatch(ctx context.Context, kvs []store.KV) (bool, error) {
	if err := s.checkClosed(); err != nil {
		return false, err
	}
	if len(kvs) > store.MaxBatch {
		return false, fmt.Errorf("delete %d keys in one transaction: at most %d", len(kvs), store.MaxBatch)
	}
	return s.deleteTxn(ctx, nil, kvs, fmt.Sprintf("delete-cas %d keys", len(kvs)))
}

// deleteTxn runs ops and then a delete-cas of every key of kvs in one
// transaction; the deleted keys are no longer owned.
func (s *Store) deleteTxn(ctx context.Context, ops api.KVTxnOps, kvs []store.KV, what string) (bool, error) {
	for _, kv := range kvs {
		ops = append(ops, &api.KVTxnOp{Verb: api.KVDeleteCAS, Key: s.full(kv.Key), Index: kv.ModifyIndex})
	}
	ok, _, _, err := s.kv.Txn(ops, s.qopts(ctx, false))
	if err != nil {
		return false, s.noteErr(what, err)
	}
	s.noteOK()
	if ok {
		s.mu.Lock()
		for _, kv := range kvs {
			delete(s.owned, kv.Key)
			delete(s.heldBy, kv.Key)
		}
		s.mu.Unlock()
	}
	return ok, nil
}

// CASDeleteCASBatch implements store.CASBatchDeleter: one transaction of
// a check-and-set (index 0: create only) and delete-cas operations.
func (s *Store) CASDeleteCASBatch(ctx context.Context, set store.KV, kvs []store.KV) (bool, error) {
	if err := s.checkClosed(); err != nil {
		return false, err
	}
	if len(kvs)+1 > store.MaxBatch {
		return false, fmt.Errorf("set %s and delete %d keys in one transaction: at most %d operations", set.Key, len(kvs), store.MaxBatch)
	}
	if err := checkSize(set.Key, set.Value); err != nil {
		return false, err
	}
	ops := make(api.KVTxnOps, 0, len(kvs)+1)
	ops = append(ops, &api.KVTxnOp{Verb: api.KVCAS, Key: s.full(set.Key), Value: set.Value, Index: set.ModifyIndex})
	return s.deleteTxn(ctx, ops, kvs, fmt.Sprintf("set %s and delete %d keys", set.Key, len(kvs)))
}

// GetMany implements store.MultiGetter: one read-only transaction of
// get-or-empty operations (a plain get would fail the whole transaction
// for a key deleted meanwhile), default consistency like Get.
func (s *Store) GetMany(ctx context.Context, keys []string) ([]store.KV, uint64, error) {
	if err := s.checkClosed(); err != nil {
		return nil, 0, err
	}
	if len(keys) > store.MaxBatch {
		return nil, 0, fmt.Errorf("get %d keys in one transaction: at most %d", len(keys), store.MaxBatch)
	}
	if len(keys) == 0 {
		return nil, 0, nil
	}
	ops := make(api.KVTxnOps, 0, len(keys))
	for _, k := range keys {
		ops = append(ops, &api.KVTxnOp{Verb: api.KVGetOrEmpty, Key: s.full(k)})
	}
	ok, resp, meta, err := s.kv.Txn(ops, s.qopts(ctx, false))
	if err != nil {
		return nil, 0, s.noteErr(fmt.Sprintf("get %d keys", len(keys)), err)
	}
	if !ok {
		var errs []string
		if resp != nil {
			for _, e := range resp.Errors {
				errs = append(errs, e.What)
			}
		}
		return nil, 0, fmt.Errorf("get %d keys: transaction refused: %s", len(keys), strings.Join(errs, "; "))
	}
	s.noteOK()
	out := make([]store.KV, 0, len(keys))
	for _, p := range resp.Results {
		if p != nil && p.ModifyIndex != 0 { // get-or-empty: index 0 is a missing key
			out = append(out, s.toKV(p))
		}
	}
	var idx uint64
	if meta != nil {
		idx = meta.LastIndex
	}
	return out, nonZero(idx), nil
}

// WatchKeys implements store.KeyWatcher (a blocking ?keys query).
func (s *Store) WatchKeys(ctx context.Context, prefix string, index uint64, wait time.Duration) ([]string, uint64, error) {
	if err := s.checkClosed(); err != nil {
		return nil, 0, err
	}
	q := s.qopts(ctx, true)
	q.WaitIndex = index
	q.WaitTime = min(wait, maxWait)
	ks, meta, err := s.kv.Keys(s.full(prefix), "", q)
	if err != nil {
		return nil, 0, s.noteErr("watch keys "+prefix, err)
	}
	if err := s.checkFiltered("watch keys "+prefix, meta != nil && meta.ResultsFilteredByACLs); err != nil {
		return nil, 0, err
	}
	s.noteOK()
	out := make([]string, 0, len(ks))
	for _, k := range ks {
		out = append(out, s.rel(k))
	}
	sort.Strings(out)
	return out, nonZero(meta.LastIndex), nil
}

// Health implements store.Store.
func (s *Store) Health() store.Health {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := map[string]string{
		"address": s.opts.Address,
		"leader":  s.leader,
		"session": s.session,
		"owned":   fmt.Sprint(len(s.owned)),
	}
	if s.sessionNode != "" {
		d["session_node"] = s.sessionNode
		if s.onServer {
			d["session_node_role"] = "server"
		} else {
			d["session_node_role"] = "client"
		}
	}
	if !s.lastContact.IsZero() {
		d["last_contact"] = s.lastContact.UTC().Format(time.RFC3339Nano)
	}
	return store.Health{Backend: "consul", State: s.state, Since: s.since, Error: s.lastErr, Detail: d}
}

// Close stops the session loop and destroys the session, which deletes
// the owned keys: Close is for a host leaving the cluster (and tests), a
// plain daemon restart should use Stop.
func (s *Store) Close() error {
	sid := s.Stop()
	if sid == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.CallTimeout)
	defer cancel()
	if _, err := s.client.Session().Destroy(sid, s.wopts(ctx)); err != nil {
		return fmt.Errorf("destroy session %s: %w", sid, err)
	}
	return nil
}

// Stop stops the session loop and leaves the session (and owned keys) in
// Consul: the next run of this host takes them over. It returns the
// session id.
func (s *Store) Stop() string {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ""
	}
	s.closed = true
	sid := s.session
	s.mu.Unlock()
	s.cancel()
	<-s.done
	return sid
}

func (s *Store) kickSession() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Store) sessionName() string { return "rackwire:" + s.opts.Node }

// sessionLoop owns the session: it creates one, renews it, notices its
// loss, and writes every owned key again under a new one.
func (s *Store) sessionLoop(ctx context.Context) {
	defer close(s.done)
	bo := backoff.New(s.opts.BackoffMin, s.opts.BackoffMax)
	fail := func(step string, err error) {
		// Without a session the host cannot own keys, whatever the
		// reason (also a refused ACL token): degraded.
		s.mu.Lock()
		if s.state != store.StateDegraded {
			s.state = store.StateDegraded
			s.since = time.Now()
		}
		s.lastErr = step + ": " + err.Error()
		s.mu.Unlock()
		wait := bo.Next()
		s.log.Warn("consul session step failed, retrying", "step", step, "err", err, "retry_in", wait)
		backoff.Sleep(ctx, wait)
	}
	resync := false
	for ctx.Err() == nil {
		s.mu.Lock()
		sid := s.session
		s.mu.Unlock()
		if sid == "" {
			nsid, err := s.createSession(ctx)
			if err != nil {
				fail("create session", err)
				continue
			}
			s.mu.Lock()
			s.session = nsid
			close(s.sessionUp)
			s.mu.Unlock()
			s.log.Info("consul session created", "session", nsid, "ttl", s.opts.SessionTTL)
			sid = nsid
			resync = true
		}
		if resync {
			if err := s.rewriteOwned(ctx, sid); err != nil {
				fail("rewrite owned keys", err)
				continue
			}
			resync = false
		}
		s.refreshLeader(ctx)
		s.noteOK()
		bo.Reset()
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff.Jitter(s.opts.RenewInterval)):
		case <-s.kick:
		}
		cctx, cancel := context.WithTimeout(ctx, s.opts.CallTimeout)
		entry, _, err := s.client.Session().Renew(sid, s.wopts(cctx))
		cancel()
		if err != nil {
			fail("renew session", err)
			continue
		}
		if entry == nil {
			s.log.Warn("consul session lost; creating a new one and rewriting owned keys", "session", sid)
			s.mu.Lock()
			s.session = ""
			s.sessionUp = make(chan struct{})
			s.mu.Unlock()
		}
	}
}

func (s *Store) createSession(ctx context.Context) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, s.opts.CallTimeout)
	defer cancel()
	// Earlier sessions of this host (a previous run) keep their keys
	// until the new session has written them again. Only a fresh start
	// looks for them: after a session loss there is nothing left to find.
	// One read of the agent serves both the session search (its node
	// name) and the note of the node the session is bound to.
	self, selfErr := s.agentSelf(cctx)
	var old []*api.SessionEntry
	if !s.searchedOld {
		var err error
		old, err = s.listOwnSessions(cctx, self.name)
		if err != nil {
			return "", err
		}
	}
	// No node checks: the session must not die with the Consul agent it
	// was created through; only the TTL ends it.
	sid, _, err := s.client.Session().CreateNoChecks(&api.SessionEntry{
		Name:      s.sessionName(),
		TTL:       fmt.Sprintf("%ds", int(s.opts.SessionTTL/time.Second)),
		Behavior:  api.SessionBehaviorDelete,
		LockDelay: time.Millisecond,
	}, s.wopts(cctx))
	if err != nil {
		return "", err
	}
	s.searchedOld = true
	if selfErr == nil {
		s.noteSessionNode(sid, self)
	}
	var stale []string
	var newest *api.SessionEntry
	for _, e := range old {
		if e.Name == s.sessionName() && e.ID != sid {
			stale = append(stale, e.ID)
			if newest == nil || e.CreateIndex > newest.CreateIndex {
				newest = e
			}
		}
	}
	if len(stale) > 0 {
		s.log.Info("sessions of an earlier run found; destroying them after the grace period",
			"sessions", stale, "grace", s.opts.OldSessionGrace)
		// The newest holds what the last run wrote (it took the keys
		// over from the ones before it).
		s.mu.Lock()
		s.previous = newest.ID
		s.mu.Unlock()
		go s.destroyLater(ctx, stale)
	}
	return sid, nil
}

// agent is what /v1/agent/self says of the Consul agent this backend
// talks to.
type agent struct {
	name   string // its node name
	server bool
}

// agentSelf reads the Consul agent's node name and role. The read is
// bounded by ctx (Agent().Self() takes none, and a hung agent must not stop
// the session loop, which renews the session).
func (s *Store) agentSelf(ctx context.Context) (agent, error) {
	var self map[string]map[string]any
	if _, err := s.client.Raw().Query("/v1/agent/self", &self, s.qopts(ctx, false)); err != nil {
		return agent{}, err
	}
	cfg := self["Config"]
	name, _ := cfg["NodeName"].(string)
	server, _ := cfg["Server"].(bool)
	return agent{name: name, server: server}, nil
}

// noteSessionNode records which Consul node the session is bound to. A
// session lives and dies with its node whatever its checks: when that
// node is deregistered (a server that died is reaped by autopilot about
// 15 s later; a client agent that leaves), Consul invalidates the session
// and deletes every key it holds (tests/fleet
// TestServerDeathTakesItsSessions). With a client agent on the host that
// is the host's own fate; talking to a server directly ties this host's
// records to that server's, so it is said loudly, once per session.
func (s *Store) noteSessionNode(sid string, a agent) {
	s.mu.Lock()
	s.sessionNode, s.onServer = a.name, a.server
	s.mu.Unlock()
	if a.server {
		s.log.Warn("the store address is a Consul server, not a client agent on this host: this host's session is bound to that server's node, and if the server dies and is removed, Consul deletes this host's records with the session until this host reaches Consul again; run a Consul client agent on every host and point [store] address at it",
			"session", sid, "consul_node", a.name, "address", s.opts.Address)
	}
}

// listOwnSessions lists the sessions on the Consul node this backend talks
// to (node, where sessions are created), so that a fleet with a client
// agent per host never lists every session of the datacenter. Without the
// node's name (the agent could not say) it lists them all.
func (s *Store) listOwnSessions(ctx context.Context, node string) ([]*api.SessionEntry, error) {
	if node != "" {
		ss, _, err := s.client.Session().Node(node, s.qopts(ctx, true))
		return ss, err
	}
	ss, _, err := s.client.Session().List(s.qopts(ctx, true))
	return ss, err
}

// destroyLater destroys sessions of an earlier run once the grace period
// is over; what they still hold was not written again by this run.
func (s *Store) destroyLater(ctx context.Context, ids []string) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(s.opts.OldSessionGrace):
	}
	s.mu.Lock()
	if slices.Contains(ids, s.previous) {
		s.previous = ""
	}
	s.mu.Unlock()
	for _, id := range ids {
		cctx, cancel := context.WithTimeout(ctx, s.opts.CallTimeout)
		_, err := s.client.Session().Destroy(id, s.wopts(cctx))
		cancel()
		if err != nil {
			s.log.Warn("destroy old session failed", "session", id, "err", err)
		}
	}
}

// rewriteOwned writes every remembered owned key under session sid.
func (s *Store) rewriteOwned(ctx context.Context, sid string) error {
	s.mu.Lock()
	keys := make([]string, 0, len(s.owned))
	for k := range s.owned {
		keys = append(keys, k)
	}
	s.mu.Unlock()
	sort.Strings(keys)
	n := 0
	for _, k := range keys {
		s.mu.Lock()
		v, ok := s.owned[k]
		s.mu.Unlock()
		if !ok {
			continue // deleted meanwhile
		}
		cctx, cancel := context.WithTimeout(ctx, s.opts.CallTimeout)
		err := s.acquire(cctx, sid, k, v)
		cancel()
		if err != nil {
			return err
		}
		s.mu.Lock()
		_, still := s.owned[k]
		s.mu.Unlock()
		if !still { // deleted while it was being written: delete again
			cctx, cancel := context.WithTimeout(ctx, s.opts.CallTimeout)
			_, err := s.kv.Delete(s.full(k), s.wopts(cctx))
			cancel()
			if err != nil {
				return err
			}
		}
		n++
	}
	if n > 0 {
		s.log.Info("owned keys written under the new session", "session", sid, "keys", n)
	}
	return nil
}

func (s *Store) refreshLeader(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, s.opts.CallTimeout)
	defer cancel()
	l, err := s.client.Status().LeaderWithQueryOptions(s.qopts(cctx, false))
	if err != nil {
		return
	}
	s.mu.Lock()
	s.leader = l
	s.mu.Unlock()
}

var _ store.Store = (*Store)(nil)
