package docker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
)

// fakeEndpoints is an in-memory endpoint.Manager for the protocol tests.
type fakeEndpoints struct {
	mu       sync.Mutex
	cidrs    []netip.Prefix
	eps      map[string]*endpoint.Endpoint // by name
	reserved map[netip.Addr]bool
	nextID   uint16
	adds     []endpoint.Request
	deleted  []string
}

func newFake(cidrs ...string) *fakeEndpoints {
	f := &fakeEndpoints{eps: map[string]*endpoint.Endpoint{}, reserved: map[netip.Addr]bool{}}
	for _, c := range cidrs {
		f.cidrs = append(f.cidrs, netip.MustParsePrefix(c))
	}
	return f
}

func (f *fakeEndpoints) Add(_ context.Context, req endpoint.Request) (endpoint.Endpoint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.adds = append(f.adds, req)
	if req.IP.IsValid() && !f.reserved[req.IP] {
		return endpoint.Endpoint{}, fmt.Errorf("%w: %s not reserved", endpoint.ErrIPInUse, req.IP)
	}
	delete(f.reserved, req.IP)
	f.nextID++
	ep := &endpoint.Endpoint{ID: f.nextID, Name: req.Name, State: endpoint.StatePending, Pending: req.Pending, IPv4: req.IP, IPv6: req.IPv6,
		MAC: "02:00:00:00:00:01", HostMAC: "02:00:00:00:00:02", Identity: identity.Init, Docker: req.Docker, Created: time.Now()}
	if req.MAC != nil {
		ep.MAC = req.MAC.String()
	}
	f.eps[req.Name] = ep
	return *ep, nil
}

func (f *fakeEndpoints) Delete(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.eps[name]; !ok {
		return endpoint.ErrNotFound
	}
	delete(f.eps, name)
	f.deleted = append(f.deleted, name)
	return nil
}

func (f *fakeEndpoints) List() []endpoint.Endpoint {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []endpoint.Endpoint
	for _, ep := range f.eps {
		out = append(out, *ep)
	}
	return out
}

func (f *fakeEndpoints) FindDocker(eid string) (endpoint.Endpoint, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ep := range f.eps {
		if ep.Docker != nil && ep.Docker.EndpointID == eid {
			return *ep, true
		}
	}
	return endpoint.Endpoint{}, false
}

func (f *fakeEndpoints) Reserve(v4 bool, want netip.Addr, _ time.Duration) (netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.cidrs {
		if p.Addr().Is4() != v4 {
			continue
		}
		if want.IsValid() {
			if !p.Contains(want) || f.reserved[want] {
				return netip.Addr{}, endpoint.ErrIPInUse
			}
			f.reserved[want] = true
			return want, nil
		}
		for a := p.Addr().Next(); p.Contains(a); a = a.Next() {
			if !f.reserved[a] {
				f.reserved[a] = true
				return a, nil
			}
		}
	}
	return netip.Addr{}, endpoint.ErrCIDRExhausted
}

func (f *fakeEndpoints) Unreserve(a netip.Addr) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.reserved, a)
}

func (f *fakeEndpoints) Prefixes() []netip.Prefix          { return f.cidrs }
func (f *fakeEndpoints) DetachedPeerName(id uint16) string { return fmt.Sprintf("rw%05dc", id) }

func (f *fakeEndpoints) set(name string, fn func(ep *endpoint.Endpoint) error) (endpoint.Endpoint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ep, ok := f.eps[name]
	if !ok {
		return endpoint.Endpoint{}, endpoint.ErrNotFound
	}
	if err := fn(ep); err != nil {
		return *ep, err
	}
	return *ep, nil
}

func (f *fakeEndpoints) SetSandbox(name, key string) (endpoint.Endpoint, error) {
	return f.set(name, func(ep *endpoint.Endpoint) error { ep.Netns = key; return nil })
}

func (f *fakeEndpoints) SetPending(name, reason string) (endpoint.Endpoint, error) {
	return f.set(name, func(ep *endpoint.Endpoint) error { ep.Pending = reason; return nil })
}

func (f *fakeEndpoints) SetLabels(_ context.Context, name, cid, network string, ls identity.Labels) (endpoint.Endpoint, error) {
	return f.set(name, func(ep *endpoint.Endpoint) error {
		if len(ls) == 0 {
			return fmt.Errorf("%w: no identity-relevant label", endpoint.ErrBadLabels)
		}
		ep.State, ep.Pending, ep.Labels, ep.ContainerID, ep.Network = endpoint.StateReady, "", ls, cid, network
		return nil
	})
}

func (f *fakeEndpoints) EnsureSandboxNeighbours(string) (bool, error) { return true, nil }

// serve runs h on a unix socket and returns a client of it.
func serve(t *testing.T, h http.Handler) (*http.Client, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}, sock
}

// call POSTs body to method as dockerd does and decodes the answer.
func call(t *testing.T, c *http.Client, method, body string) map[string]any {
	t.Helper()
	resp, err := c.Post("http://plugin/"+method, "application/vnd.docker.plugins.v1.2+json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("%s: %v", method, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: HTTP %s: %s", method, resp.Status, b)
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%s: %v: %s", method, err, b)
	}
	return out
}

func testDriver(t *testing.T, f *fakeEndpoints, engineSock string) (*Driver, *http.Client) {
	t.Helper()
	var logs bytes.Buffer
	d := New(f, Options{Socket: "/run/docker/plugins/rackwire.sock", EngineSocket: engineSock, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	c, _ := serve(t, d.Handler())
	return d, c
}

var (
	nid = strings.Repeat("a", 64)
	eid = strings.Repeat("b", 64)
)

func TestProtocol(t *testing.T) {
	f := newFake("10.9.0.0/24")
	d, c := testDriver(t, f, "/nonexistent")
	if d.Name() != "rackwire" {
		t.Errorf("Name() = %q, want rackwire", d.Name())
	}
	if got := fmt.Sprint(call(t, c, "Plugin.Activate", "")["Implements"]); got != "[NetworkDriver IpamDriver]" {
		t.Errorf("Activate: Implements %s", got)
	}
	if got := call(t, c, "NetworkDriver.GetCapabilities", ""); got["Scope"] != "local" {
		t.Errorf("GetCapabilities = %v, want Scope local", got)
	}
	// IPAM: the host's CIDR, a gateway that spends no address.
	pool := call(t, c, "IpamDriver.RequestPool", `{"AddressSpace":"rackwire","V6":false}`)
	if pool["Pool"] != "0.0.0.0/0" || pool["PoolID"] != poolV4 || pool["Data"].(map[string]any)[gatewayOption] != "169.254.1.1/32" {
		t.Errorf("RequestPool = %v", pool)
	}
	if got := call(t, c, "IpamDriver.RequestPool", `{"AddressSpace":"rackwire","Pool":"10.9.0.0/24"}`); got["Pool"] != "10.9.0.0/24" {
		t.Errorf("RequestPool of the host's CIDR = %v", got)
	}
	if got := call(t, c, "IpamDriver.RequestPool", `{"AddressSpace":"rackwire","V6":true}`); !strings.Contains(fmt.Sprint(got["Error"]), "no IPv6 CIDR") {
		t.Errorf("RequestPool v6 without an IPv6 CIDR = %v, want an Error", got)
	}
	if got := call(t, c, "IpamDriver.RequestPool", `{"AddressSpace":"rackwire","Pool":"172.18.0.0/16"}`); !strings.Contains(fmt.Sprint(got["Error"]), "omit --subnet") {
		t.Errorf("RequestPool of a foreign subnet = %v, want an Error", got)
	}
	if got := call(t, c, "IpamDriver.RequestAddress", `{"PoolID":"rackwire-ipv4","Options":{"RequestAddressType":"com.docker.network.gateway"}}`); got["Address"] != "169.254.1.1/32" {
		t.Errorf("gateway RequestAddress = %v", got)
	}
	addr := call(t, c, "IpamDriver.RequestAddress", `{"PoolID":"rackwire-ipv4"}`)
	if addr["Address"] != "10.9.0.1/32" {
		t.Fatalf("RequestAddress = %v, want 10.9.0.1/32", addr)
	}
	if got := call(t, c, "IpamDriver.RequestAddress", `{"PoolID":"nope"}`); got["Error"] == nil {
		t.Errorf("RequestAddress of an unknown pool = %v, want an Error", got)
	}

	// Network driver: a network of another IPAM is refused.
	if got := call(t, c, "NetworkDriver.CreateNetwork", `{"NetworkID":"`+nid+`","IPv4Data":[{"Pool":"172.18.0.0/16"}]}`); !strings.Contains(fmt.Sprint(got["Err"]), "--ipam-driver rackwire") {
		t.Errorf("CreateNetwork of a foreign pool = %v, want an Err naming --ipam-driver", got)
	}
	if got := call(t, c, "NetworkDriver.CreateNetwork", `{"NetworkID":"`+nid+`","IPv4Data":[{"Pool":"10.9.0.0/24","Gateway":"169.254.1.1/32"}]}`); len(got) != 0 {
		t.Errorf("CreateNetwork = %v, want {}", got)
	}
	if got := call(t, c, "NetworkDriver.CreateEndpoint", `{"NetworkID":"`+nid+`","EndpointID":"short","Interface":{"Address":"10.9.0.1/32"}}`); got["Err"] == nil {
		t.Errorf("CreateEndpoint with a bad id = %v, want an Err", got)
	}
	ce := call(t, c, "NetworkDriver.CreateEndpoint", `{"NetworkID":"`+nid+`","EndpointID":"`+eid+`","Interface":{"Address":"10.9.0.1/32"}}`)
	if mac := ce["Interface"].(map[string]any)["MacAddress"]; mac != "02:00:00:00:00:01" {
		t.Errorf("CreateEndpoint = %v, want the endpoint's MAC", ce)
	}
	req := f.adds[len(f.adds)-1]
	if !req.Detach || !req.Reserved || req.Pending == "" || req.IP != netip.MustParseAddr("10.9.0.1") || req.Docker.EndpointID != eid {
		t.Errorf("CreateEndpoint asked the manager for %+v; want a detached, pending endpoint on its reserved address", req)
	}
	j := call(t, c, "NetworkDriver.Join", `{"NetworkID":"`+nid+`","EndpointID":"`+eid+`","SandboxKey":"/var/run/docker/netns/x"}`)
	if j["Gateway"] != "169.254.1.1" || j["InterfaceName"].(map[string]any)["SrcName"] != "rw00001c" ||
		fmt.Sprint(j["StaticRoutes"]) != "[map[Destination:169.254.1.1/32 RouteType:1]]" {
		t.Errorf("Join = %v", j)
	}
	if ep, _ := f.FindDocker(eid); ep.Netns != "/var/run/docker/netns/x" {
		t.Errorf("Join did not record the sandbox: %+v", ep)
	}
	if got := call(t, c, "NetworkDriver.EndpointOperInfo", `{"NetworkID":"`+nid+`","EndpointID":"`+eid+`"}`); got["Value"].(map[string]any)["rackwire.state"] != "labels-pending" {
		t.Errorf("EndpointOperInfo = %v", got)
	}
	if got := call(t, c, "NetworkDriver.Join", `{"NetworkID":"`+nid+`","EndpointID":"`+strings.Repeat("c", 64)+`"}`); got["Err"] == nil {
		t.Errorf("Join of an unknown endpoint = %v, want an Err", got)
	}
	// DeleteEndpoint keeps the address until ReleaseAddress; unknown ids
	// are fine.
	call(t, c, "NetworkDriver.Leave", `{"NetworkID":"`+nid+`","EndpointID":"`+eid+`"}`)
	if got := call(t, c, "NetworkDriver.DeleteEndpoint", `{"NetworkID":"`+nid+`","EndpointID":"`+eid+`"}`); len(got) != 0 {
		t.Errorf("DeleteEndpoint = %v", got)
	}
	if _, ok := f.FindDocker(eid); ok || !f.reserved[netip.MustParseAddr("10.9.0.1")] {
		t.Errorf("after DeleteEndpoint: endpoint still there, or its address not held until ReleaseAddress")
	}
	if got := call(t, c, "NetworkDriver.DeleteEndpoint", `{"NetworkID":"`+nid+`","EndpointID":"`+eid+`"}`); len(got) != 0 {
		t.Errorf("second DeleteEndpoint = %v, want {}", got)
	}
	call(t, c, "IpamDriver.ReleaseAddress", `{"PoolID":"rackwire-ipv4","Address":"10.9.0.1"}`)
	if f.reserved[netip.MustParseAddr("10.9.0.1")] {
		t.Errorf("ReleaseAddress kept the reservation")
	}
	for _, m := range []string{"NetworkDriver.CreateEndpoint", "IpamDriver.RequestAddress"} {
		got := call(t, c, m, `{"PoolID": [`)
		if got["Err"] == nil && got["Error"] == nil {
			t.Errorf("%s with a bad body = %v, want an error", m, got)
		}
	}
}

// fakeEngine answers the two Engine API reads from maps; down makes it
// answer 500.
type fakeEngine struct {
	mu         sync.Mutex
	networks   map[string]NetworkInfo
	containers map[string]ContainerSummary // by name
	down       bool
}

func (e *fakeEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.down {
		http.Error(w, "down", http.StatusInternalServerError)
		return
	}
	var v any
	var ok bool
	switch {
	case strings.HasPrefix(r.URL.Path, "/networks/"):
		v, ok = e.networks[strings.TrimPrefix(r.URL.Path, "/networks/")]
	case r.URL.Path == "/containers/json":
		var f map[string][]string
		_ = json.Unmarshal([]byte(r.URL.Query().Get("filters")), &f)
		name := strings.TrimSuffix(strings.TrimPrefix(f["name"][0], "^/"), "$")
		list := []ContainerSummary{}
		if c, found := e.containers[name]; found {
			list = append(list, c)
		}
		v, ok = list, true
	}
	if !ok {
		http.Error(w, `{"message":"not found"}`, http.StatusNotFound)
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}

// networkWith lists members by key (a container id, or "ep-<endpoint id>"
// while joining): name and endpoint id.
func networkWith(name string, members map[string][2]string) NetworkInfo {
	n := NetworkInfo{ID: nid, Name: name, Containers: map[string]NetworkMember{}}
	for key, m := range members {
		n.Containers[key] = NetworkMember{Name: m[0], EndpointID: m[1]}
	}
	return n
}

func TestResolveAndReconcile(t *testing.T) {
	eng := &fakeEngine{networks: map[string]NetworkInfo{}, containers: map[string]ContainerSummary{}}
	_, engSock := serve(t, eng)
	f := newFake("10.9.0.0/24")
	d, c := testDriver(t, f, engSock)
	ctx := context.Background()

	mk := func(e string) string {
		a := call(t, c, "IpamDriver.RequestAddress", `{"PoolID":"rackwire-ipv4"}`)["Address"]
		call(t, c, "NetworkDriver.CreateEndpoint", `{"NetworkID":"`+nid+`","EndpointID":"`+e+`","Interface":{"Address":"`+a.(string)+`"}}`)
		return endpointName(e)
	}
	web, nol := mk(eid), mk(strings.Repeat("d", 64))
	cid, cid2 := strings.Repeat("1", 64), strings.Repeat("2", 64)

	// Engine down: closed, and the reason says so.
	eng.down = true
	d.resolvePass(ctx)
	if ep := f.eps[web]; ep.State != endpoint.StatePending || !strings.Contains(ep.Pending, "Docker Engine API") {
		t.Errorf("engine down: %+v, want pending with the engine in its reason", ep)
	}
	// Up, but the container has not joined yet: still pending.
	eng.down = false
	eng.networks[nid] = networkWith("rwd-net", nil)
	if fast := d.resolvePass(ctx); !fast || f.eps[web].State != endpoint.StatePending {
		t.Errorf("before the join is listed: fast %v, state %s; want a fast retry, pending", fast, f.eps[web].State)
	}
	// web is still joining (listed by name only), nol has joined.
	eng.networks[nid] = networkWith("rwd-net", map[string][2]string{"ep-" + eid: {"web", eid}, cid2: {"nol", strings.Repeat("d", 64)}})
	eng.containers["web"] = ContainerSummary{ID: cid, Names: []string{"/web"}, Labels: map[string]string{"app": "web"}}
	eng.containers["nol"] = ContainerSummary{ID: cid2, Names: []string{"/nol"}}
	d.resolvePass(ctx)
	if ep := f.eps[web]; ep.State != endpoint.StateReady || ep.Labels.CLI() != "app=web" || ep.ContainerID != cid || ep.Network != "rwd-net" {
		t.Errorf("resolved: %+v, want ready app=web of container %s on rwd-net", ep, cid)
	}
	if ep := f.eps[nol]; ep.State != endpoint.StatePending || !strings.Contains(ep.Pending, "no identity-relevant label") {
		t.Errorf("container without labels: %+v, want pending saying why", ep)
	}

	// Reconcile: young endpoints and an engine that does not answer delete
	// nothing; a gone network or container does.
	d.reconcile(ctx)
	if len(f.deleted) != 0 {
		t.Fatalf("reconcile deleted young endpoints: %v", f.deleted)
	}
	for _, ep := range f.eps {
		ep.Created = time.Now().Add(-time.Hour)
	}
	eng.down = true
	d.reconcile(ctx)
	if len(f.deleted) != 0 {
		t.Fatalf("reconcile with the engine down deleted %v", f.deleted)
	}
	eng.down = false
	eng.networks[nid] = networkWith("rwd-net", map[string][2]string{cid: {"web", eid}})
	d.reconcile(ctx)
	if fmt.Sprint(f.deleted) != "["+nol+"]" {
		t.Errorf("reconcile deleted %v, want [%s] (its container is gone)", f.deleted, nol)
	}
	delete(eng.networks, nid)
	d.reconcile(ctx)
	if len(f.eps) != 0 {
		t.Errorf("network gone: endpoints left %v", f.List())
	}
}

// TestJoinResolves: when the Engine API already lists the joining
// endpoint (by container name), Join returns with the endpoint's labels
// and policy in force; when it does not, Join still succeeds, closed.
func TestJoinResolves(t *testing.T) {
	eng := &fakeEngine{networks: map[string]NetworkInfo{}, containers: map[string]ContainerSummary{}}
	_, engSock := serve(t, eng)
	f := newFake("10.9.0.0/24")
	_, c := testDriver(t, f, engSock)
	cid := strings.Repeat("1", 64)
	eng.networks[nid] = networkWith("rwd-net", map[string][2]string{"ep-" + eid: {"cli", eid}})
	eng.containers["cli"] = ContainerSummary{ID: cid, Names: []string{"/cli"}, Labels: map[string]string{"app": "client"}}
	for i, e := range []string{eid, strings.Repeat("e", 64)} {
		a := call(t, c, "IpamDriver.RequestAddress", `{"PoolID":"rackwire-ipv4"}`)["Address"].(string)
		call(t, c, "NetworkDriver.CreateEndpoint", `{"NetworkID":"`+nid+`","EndpointID":"`+e+`","Interface":{"Address":"`+a+`"}}`)
		if got := call(t, c, "NetworkDriver.Join", `{"NetworkID":"`+nid+`","EndpointID":"`+e+`","SandboxKey":"/x"}`); got["Err"] != nil {
			t.Fatalf("Join = %v", got)
		}
		ep, _ := f.FindDocker(e)
		want := map[int]endpoint.State{0: endpoint.StateReady, 1: endpoint.StatePending}[i]
		if ep.State != want {
			t.Errorf("after Join of endpoint %d: %s (%s), want %s", i, ep.State, ep.Pending, want)
		}
		if i == 0 && (ep.ContainerID != cid || ep.Labels.CLI() != "app=client") {
			t.Errorf("resolved at Join: %+v", ep)
		}
	}
}
