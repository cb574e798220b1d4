// Package consultest starts real Consul agents for tests: a one-node dev
// server, or a cluster of servers on loopback, each with its own ports and
// data directory, stopped by pid in t.Cleanup (also when the test fails).
//
// Who may import it: _test.go files only. The Consul binary comes from the
// test cache (internal/testenv.RequireCached "consul"); without it the
// test skips, or fails under CI=true. Ports are taken from 18500-18999
// (the range set aside for these tests) after checking they are free.
package consultest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/internal/testenv"
)

// Port range reserved for these tests.
const (
	portMin = 18500
	portMax = 18999
	// portsPerAgent: http, serf lan, serf wan, server rpc.
	portsPerAgent = 4
)

// Agent is one running Consul agent.
type Agent struct {
	Name     string
	HTTPAddr string // 127.0.0.1:port
	SerfLAN  int
	Server   int
	dir      string
	args     []string
	bin      string
	t        testing.TB
	token    string // management token when ACLs are on
	caFile   string // set when the API is HTTPS

	mu  sync.Mutex // guards cmd, done, died
	cmd *exec.Cmd
	// done is closed when the running process has been reaped (by the
	// waiter start launches); died says how it ended when nobody asked
	// for it (Kill clears cmd first).
	done chan struct{}
	died string
}

var portMu sync.Mutex // serializes port picking within one test binary

func portFree(p int) bool {
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
	if err != nil {
		return false
	}
	l.Close()
	u, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p))
	if err != nil {
		return false
	}
	u.Close()
	return true
}

// taken holds the ports handed out and not yet released; guarded by portMu.
var taken = map[int]bool{}

// pickPorts returns portsPerAgent consecutive free ports in the range.
func pickPorts(t testing.TB) []int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	slots := (portMax - portMin + 1) / portsPerAgent
	start := rand.IntN(slots)
	for i := 0; i < slots; i++ {
		base := portMin + ((start+i)%slots)*portsPerAgent
		ok := true
		for p := base; p < base+portsPerAgent; p++ {
			if taken[p] || !portFree(p) {
				ok = false
				break
			}
		}
		if ok {
			ps := make([]int, portsPerAgent)
			for j := range ps {
				ps[j] = base + j
				taken[base+j] = true
			}
			return ps
		}
	}
	t.Fatalf("no free ports for a consul agent in %d-%d", portMin, portMax)
	return nil
}

func newAgent(t testing.TB, name string) *Agent {
	bin := testenv.RequireCached(t, "consul")
	ps := pickPorts(t)
	t.Cleanup(func() { // runs after the agent's Kill (cleanups run last-in first-out)
		portMu.Lock()
		defer portMu.Unlock()
		for _, p := range ps {
			delete(taken, p)
		}
	})
	return &Agent{
		Name: name, HTTPAddr: "127.0.0.1:" + strconv.Itoa(ps[0]),
		SerfLAN: ps[1], Server: ps[3], dir: t.TempDir(), bin: bin, t: t,
		args: []string{
			"agent", "-bind", "127.0.0.1", "-client", "127.0.0.1",
			"-node", name, "-data-dir", "", // filled in start
			"-http-port", strconv.Itoa(ps[0]), "-serf-lan-port", strconv.Itoa(ps[1]),
			"-serf-wan-port", strconv.Itoa(ps[2]), "-server-port", strconv.Itoa(ps[3]),
			"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
			"-log-level", "warn", "-disable-host-node-id",
		},
	}
}

// Start starts one dev-mode server and waits for it to lead.
func Start(t testing.TB) *Agent {
	t.Helper()
	a := newAgent(t, fmt.Sprintf("rwd-dev-%d", rand.IntN(1_000_000)))
	a.args = append(a.args, "-dev")
	a.start()
	t.Cleanup(a.Kill)
	WaitLeader(t, a.Client(t), 60*time.Second)
	return a
}

// StartACL starts one dev-mode server with ACLs on (default deny) and
// mgmt as the initial management token.
func StartACL(t testing.TB, mgmt string) *Agent {
	t.Helper()
	a := newAgent(t, fmt.Sprintf("rwd-acl-%d", rand.IntN(1_000_000)))
	a.args = append(a.args, "-dev", "-hcl",
		`acl { enabled = true, default_policy = "deny", tokens { initial_management = "`+mgmt+`", agent = "`+mgmt+`" } }`)
	a.start()
	t.Cleanup(a.Kill)
	a.token = mgmt
	WaitLeader(t, a.Client(t), 60*time.Second)
	return a
}

// StartTLS starts one dev-mode server that serves its API over HTTPS only,
// with a fresh CA and a server certificate for 127.0.0.1 and
// "server.rwd.test". It returns the agent and the CA file.
func StartTLS(t testing.TB) (*Agent, string) {
	t.Helper()
	a := newAgent(t, fmt.Sprintf("rwd-tls-%d", rand.IntN(1_000_000)))
	ca, cert, key := writeTestPKI(t, a.dir)
	port := strings.TrimPrefix(a.HTTPAddr, "127.0.0.1:")
	for i := range a.args {
		if a.args[i] == "-http-port" {
			a.args[i+1] = "-1"
		}
	}
	a.args = append(a.args, "-dev", "-https-port", port, "-hcl",
		`tls { defaults { ca_file = "`+ca+`", cert_file = "`+cert+`", key_file = "`+key+`", verify_incoming = false } }`)
	a.caFile = ca
	a.start()
	t.Cleanup(a.Kill)
	WaitLeader(t, a.Client(t), 60*time.Second)
	return a, ca
}

// writeTestPKI writes a CA and a server certificate signed by it.
func writeTestPKI(t testing.TB, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "rwd test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(crand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "server.rwd.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"server.rwd.test", "localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	srvDER, err := x509.CreateCertificate(crand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile, certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "server.pem"), filepath.Join(dir, "server-key.pem")
	for f, blk := range map[string]*pem.Block{
		caFile:   {Type: "CERTIFICATE", Bytes: caDER},
		certFile: {Type: "CERTIFICATE", Bytes: srvDER},
		keyFile:  {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(f, pem.EncodeToMemory(blk), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return caFile, certFile, keyFile
}

// StartCluster starts n servers that join each other on loopback and
// waits until they have a leader.
func StartCluster(t testing.TB, n int) []*Agent {
	t.Helper()
	return StartClusterHCL(t, n)
}

// StartClusterHCL is StartCluster with extra -hcl snippets for every
// server (limits, telemetry).
func StartClusterHCL(t testing.TB, n int, hcl ...string) []*Agent {
	t.Helper()
	as := make([]*Agent, n)
	for i := range as {
		as[i] = newAgent(t, fmt.Sprintf("rwd-srv%d-%d", i, rand.IntN(1_000_000)))
	}
	for i, a := range as {
		a.args = append(a.args, "-server", "-bootstrap-expect", strconv.Itoa(n),
			"-hcl", `performance { raft_multiplier = 1 }`,
			"-hcl", `leave_on_terminate = false`)
		for _, h := range hcl {
			a.args = append(a.args, "-hcl", h)
		}
		for j, o := range as {
			if i != j {
				a.args = append(a.args, "-retry-join", "127.0.0.1:"+strconv.Itoa(o.SerfLAN))
			}
		}
	}
	for _, a := range as {
		a.start()
		t.Cleanup(a.Kill)
	}
	for _, a := range as {
		WaitLeader(t, a.Client(t), 90*time.Second)
	}
	return as
}

func (a *Agent) start() {
	a.t.Helper()
	args := append([]string(nil), a.args...)
	for i := range args {
		if args[i] == "-data-dir" {
			args[i+1] = filepath.Join(a.dir, "data")
		}
	}
	cmd := exec.Command(a.bin, args...)
	logf, err := os.OpenFile(filepath.Join(a.dir, "consul.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		a.t.Fatalf("open consul log: %v", err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		a.t.Fatalf("start consul %s: %v", a.Name, err)
	}
	logf.Close()
	done := make(chan struct{})
	a.mu.Lock()
	a.cmd, a.done, a.died = cmd, done, ""
	a.mu.Unlock()
	// One waiter per process: it reaps it at once, so that an agent that
	// dies on its own (the kernel's OOM killer under a fleet's load) is
	// noticed (Died) instead of looking like a slow server.
	go func() {
		err := cmd.Wait()
		a.mu.Lock()
		if a.cmd == cmd { // not stopped through Kill
			a.cmd = nil
			a.died = fmt.Sprintf("consul %s (pid %d) exited by itself: %v (see %s)", a.Name, cmd.Process.Pid, err, filepath.Join(a.dir, "consul.log"))
		}
		a.mu.Unlock()
		close(done)
	}()
}

// Died reports how the agent ended if it exited without Kill ("" while it
// runs or after Kill). The process is reaped already; its pid is in the
// text, so a test can look for the OOM killer's line about it.
func (a *Agent) Died() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.died
}

// Pid is the running agent's process id (0 when it does not run).
func (a *Agent) Pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil || a.cmd.Process == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// LogTail returns the last n lines of the agent's log.
func (a *Agent) LogTail(n int) string {
	b, err := os.ReadFile(filepath.Join(a.dir, "consul.log"))
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Client returns an API client for this agent.
func (a *Agent) Client(t testing.TB) *api.Client {
	cfg := api.DefaultNonPooledConfig()
	cfg.Address = a.HTTPAddr
	cfg.Token = a.token
	if a.caFile != "" {
		cfg.Scheme = "https"
		cfg.TLSConfig = api.TLSConfig{CAFile: a.caFile, Address: "server.rwd.test"}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatalf("consul client: %v", err)
	}
	return c
}

// Kill stops the agent with SIGKILL (by pid) and reaps it. Safe to call
// twice.
func (a *Agent) Kill() {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-done
}

// Pause stops the agent with SIGSTOP: its sockets stay open and every
// request hangs, as with a wedged server. Continue resumes it; the test
// must call Continue before the agent is killed or cleaned up.
func (a *Agent) Pause() { a.signal(syscall.SIGSTOP) }

// Continue resumes a paused agent (SIGCONT).
func (a *Agent) Continue() { a.signal(syscall.SIGCONT) }

func (a *Agent) signal(sig syscall.Signal) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil && a.cmd.Process != nil {
		_ = a.cmd.Process.Signal(sig)
	}
}

// Restart starts a killed agent again on the same ports and data dir.
func (a *Agent) Restart() {
	a.mu.Lock()
	running := a.cmd != nil
	a.mu.Unlock()
	if !running {
		a.start()
	}
}

// WaitLeader waits until the agent reports a raft leader.
func WaitLeader(t testing.TB, c *api.Client, timeout time.Duration) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		q := (&api.QueryOptions{}).WithContext(ctx)
		l, err := c.Status().LeaderWithQueryOptions(q)
		if err == nil && l != "" {
			// A leader also needs to accept writes (autopilot, ACL init).
			if _, err := c.KV().Put(&api.KVPair{Key: "rwd-probe", Value: []byte("1")}, (&api.WriteOptions{}).WithContext(ctx)); err == nil {
				return l
			} else {
				last = err
			}
		} else if err != nil {
			last = err
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("consul has no leader after %s: %v", timeout, last)
	return ""
}

// Leader returns the agent among as that is the current leader, or nil.
func Leader(t testing.TB, as []*Agent) *Agent {
	t.Helper()
	for _, a := range as {
		a.mu.Lock()
		up := a.cmd != nil
		a.mu.Unlock()
		if !up {
			continue
		}
		l, err := a.Client(t).Status().Leader()
		if err != nil || l == "" {
			continue
		}
		for _, b := range as {
			if l == "127.0.0.1:"+strconv.Itoa(b.Server) {
				return b
			}
		}
	}
	return nil
}

// Options tune StartWith.
type Options struct {
	// ClientAddrs are addresses the HTTP API listens on besides 127.0.0.1
	// (for agents in other network namespaces). They must exist when the
	// agent starts and when it is restarted.
	ClientAddrs []string
	// Persistent runs a one-node server that keeps its data on disk
	// instead of a -dev server, so that Kill and Restart keep the KV
	// store and the sessions.
	Persistent bool
	// HCL are extra -hcl snippets (telemetry, limits).
	HCL []string
	// ACL, when set, turns ACLs on (default deny) with this initial
	// management token, which Client then uses.
	ACL string
}

// StartWith starts one server as Start does, tuned by o, and waits for it
// to lead.
func StartWith(t testing.TB, o Options) *Agent {
	t.Helper()
	a := newAgent(t, fmt.Sprintf("rwd-opt-%d", rand.IntN(1_000_000)))
	if len(o.ClientAddrs) > 0 {
		for i := range a.args {
			if a.args[i] == "-client" {
				a.args[i+1] = strings.Join(append([]string{"127.0.0.1"}, o.ClientAddrs...), " ")
			}
		}
	}
	if o.Persistent {
		a.args = append(a.args, "-server", "-bootstrap-expect", "1",
			"-hcl", `performance { raft_multiplier = 1 }`, "-hcl", `leave_on_terminate = false`)
	} else {
		a.args = append(a.args, "-dev")
	}
	for _, h := range o.HCL {
		a.args = append(a.args, "-hcl", h)
	}
	if o.ACL != "" {
		a.args = append(a.args, "-hcl",
			`acl { enabled = true, default_policy = "deny", tokens { initial_management = "`+o.ACL+`", agent = "`+o.ACL+`" } }`)
		a.token = o.ACL
	}
	a.start()
	t.Cleanup(a.Kill)
	WaitLeader(t, a.Client(t), 60*time.Second)
	return a
}

// Port returns the agent's HTTP port.
func (a *Agent) Port() string { return strings.TrimPrefix(a.HTTPAddr, "127.0.0.1:") }
