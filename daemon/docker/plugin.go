package docker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
)

// Endpoints is the part of endpoint.Manager the driver uses.
type Endpoints interface {
	Add(ctx context.Context, req endpoint.Request) (endpoint.Endpoint, error)
	Delete(ctx context.Context, nameOrID string) error
	List() []endpoint.Endpoint
	FindDocker(endpointID string) (endpoint.Endpoint, bool)
	Reserve(v4 bool, want netip.Addr, ttl time.Duration) (netip.Addr, error)
	Unreserve(a netip.Addr)
	Prefixes() []netip.Prefix
	DetachedPeerName(id uint16) string
	SetSandbox(nameOrID, sandboxKey string) (endpoint.Endpoint, error)
	SetPending(nameOrID, reason string) (endpoint.Endpoint, error)
	SetLabels(ctx context.Context, nameOrID, containerID, network string, labels identity.Labels) (endpoint.Endpoint, error)
	EnsureSandboxNeighbours(nameOrID string) (bool, error)
}

// Protocol constants.
const (
	// gatewayOption is libnetwork's RequestAddress option key, and the
	// RequestPool data key, of a network's gateway.
	gatewayOption = "com.docker.network.gateway"
	// requestTypeOption is libnetwork's RequestAddress option saying what
	// the address is for.
	requestTypeOption = "RequestAddressType"
	poolV4, poolV6    = "rackwire-ipv4", "rackwire-ipv6"
	contentType       = "application/vnd.docker.plugins.v1+json"
	// reserveTTL bounds an address reservation: Docker creates the
	// endpoint (or releases the address) milliseconds after asking.
	reserveTTL = 5 * time.Minute
	// joinLookup bounds the label lookup Join tries before it returns.
	joinLookup = 2 * time.Second
	// maxBody bounds a request body; Docker's are a few hundred bytes.
	maxBody = 1 << 20
	// PendingReason is a new endpoint's reason until the resolver says more.
	PendingReason = "waiting for the container's labels from the Docker Engine API"
)

// Options configure a Driver.
type Options struct {
	// Socket is where the plugin is served; its base name without
	// ".sock" is the driver's name.
	Socket string
	// EngineSocket is the Docker Engine API.
	EngineSocket string
	Log          *slog.Logger
}

// Driver serves the plugin protocols and runs the resolver.
type Driver struct {
	eps    Endpoints
	engine *Engine
	log    *slog.Logger
	opts   Options
	kick   chan struct{}

	// mu guards neigh: the Docker endpoint ids whose gateway neighbours
	// are in their sandbox.
	mu    sync.Mutex
	neigh map[string]bool
}

// New returns a driver over eps.
func New(eps Endpoints, opts Options) *Driver {
	return &Driver{eps: eps, engine: NewEngine(opts.EngineSocket), log: opts.Log.With("subsys", "docker"), opts: opts,
		kick: make(chan struct{}, 1), neigh: map[string]bool{}}
}

// Name is the driver's name for `docker network create --driver`.
func (d *Driver) Name() string { return strings.TrimSuffix(filepath.Base(d.opts.Socket), ".sock") }

// Handler returns the protocol handler.
func (d *Driver) Handler() http.Handler {
	mux := http.NewServeMux()
	h := func(method string, f func(body []byte) (any, error), errField string) {
		mux.HandleFunc("POST /"+method, func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
			if err == nil && len(body) > maxBody {
				err = fmt.Errorf("request body over %d bytes", maxBody)
			}
			var out any
			if err == nil {
				out, err = f(body)
			}
			w.Header().Set("Content-Type", contentType)
			if err != nil {
				d.log.Warn("docker plugin call failed", "method", method, "err", err)
				out = map[string]string{errField: err.Error()}
			} else {
				d.log.Debug("docker plugin call", "method", method)
			}
			_ = json.NewEncoder(w).Encode(out)
		})
	}
	h("Plugin.Activate", func([]byte) (any, error) {
		return map[string][]string{"Implements": {"NetworkDriver", "IpamDriver"}}, nil
	}, "Err")
	for m, f := range map[string]func([]byte) (any, error){
		"GetCapabilities": func([]byte) (any, error) {
			return map[string]string{"Scope": "local", "ConnectivityScope": "local"}, nil
		},
		"CreateNetwork":               d.createNetwork,
		"DeleteNetwork":               empty,
		"CreateEndpoint":              d.createEndpoint,
		"DeleteEndpoint":              d.deleteEndpoint,
		"EndpointOperInfo":            d.endpointOperInfo,
		"Join":                        d.join,
		"Leave":                       empty,
		"DiscoverNew":                 empty,
		"DiscoverDelete":              empty,
		"ProgramExternalConnectivity": empty,
		"RevokeExternalConnectivity":  empty,
	} {
		h("NetworkDriver."+m, f, "Err")
	}
	for m, f := range map[string]func([]byte) (any, error){
		"GetCapabilities": func([]byte) (any, error) {
			return map[string]bool{"RequiresMACAddress": false, "RequiresRequestReplay": false}, nil
		},
		"GetDefaultAddressSpaces": func([]byte) (any, error) {
			return map[string]string{"LocalDefaultAddressSpace": "rackwire", "GlobalDefaultAddressSpace": "rackwire"}, nil
		},
		"RequestPool":    d.requestPool,
		"ReleasePool":    empty,
		"RequestAddress": d.requestAddress,
		"ReleaseAddress": d.releaseAddress,
	} {
		h("IpamDriver."+m, f, "Error")
	}
	return mux
}

func empty([]byte) (any, error) { return struct{}{}, nil }

// decode reads a request body; an empty body decodes as {}.
func decode(body []byte, v any) error {
	if len(strings.TrimSpace(string(body))) == 0 {
		return nil
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("bad request body: %w", err)
	}
	return nil
}

// Serve serves the plugin on its socket until ctx ends.
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: d.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10, BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ---- IPAM ----

func (d *Driver) family(v6 bool) (netip.Prefix, error) {
	for _, p := range d.eps.Prefixes() {
		if p.Addr().Is6() == v6 {
			return p, nil
		}
	}
	f := "IPv4"
	if v6 {
		f = "IPv6"
	}
	return netip.Prefix{}, fmt.Errorf("this host has no %s CIDR in [ipam] cidrs; add one to rackwire.toml, or create the network without IPv6", f)
}

func gatewayOf(v6 bool) netip.Prefix {
	if v6 {
		return netip.PrefixFrom(endpoint.GatewayIPv6, 128)
	}
	return netip.PrefixFrom(endpoint.GatewayIPv4, 32)
}

func (d *Driver) requestPool(body []byte) (any, error) {
	var in struct {
		AddressSpace string
		Pool         string
		SubPool      string
		Options      map[string]string
		V6           bool
	}
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	if in.SubPool != "" {
		return nil, fmt.Errorf("--ip-range is not supported by the rackwire IPAM: addresses come from this host's [ipam] cidrs; omit it")
	}
	var p netip.Prefix
	var err error
	if in.Pool != "" {
		want, perr := netip.ParsePrefix(in.Pool)
		if perr != nil {
			return nil, fmt.Errorf("subnet %q: %w", in.Pool, perr)
		}
		for _, c := range append(d.eps.Prefixes(), anyV4) {
			if c == want.Masked() {
				p = c
			}
		}
		if !p.IsValid() {
			return nil, fmt.Errorf("subnet %s is not one of this host's [ipam] cidrs %v; the rackwire IPAM hands out those only: omit --subnet", in.Pool, d.eps.Prefixes())
		}
		in.V6 = p.Addr().Is6()
	} else if p, err = d.family(in.V6); err != nil {
		return nil, err
	} else if !in.V6 {
		// dockerd checks a pool it did not ask for against the host's
		// IPv4 routes and asks again, forever, on an overlap; the host
		// routes its own endpoints' /32s, so the host CIDR always
		// overlaps. 0.0.0.0/0 is the one pool it does not check; the
		// addresses still come from the host's CIDRs (RequestAddress).
		p = anyV4
	}
	id := poolV4
	if in.V6 {
		id = poolV6
	}
	return map[string]any{"PoolID": id, "Pool": p.String(), "Data": map[string]string{gatewayOption: gatewayOf(in.V6).String()}}, nil
}

// anyV4 is the IPv4 pool answered to dockerd (see requestPool).
var anyV4 = netip.MustParsePrefix("0.0.0.0/0")

func poolFamily(id string) (v6 bool, err error) {
	switch id {
	case poolV4:
		return false, nil
	case poolV6:
		return true, nil
	}
	return false, fmt.Errorf("unknown pool %q; the rackwire IPAM has %s and %s (was the network created with --ipam-driver rackwire?)", id, poolV4, poolV6)
}

func (d *Driver) requestAddress(body []byte) (any, error) {
	var in struct {
		PoolID  string
		Address string
		Options map[string]string
	}
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	v6, err := poolFamily(in.PoolID)
	if err != nil {
		return nil, err
	}
	gw := gatewayOf(v6)
	if in.Options[requestTypeOption] == gatewayOption {
		// The gateway lives on no interface; it takes no address.
		if in.Address != "" && in.Address != gw.Addr().String() {
			return nil, fmt.Errorf("gateway %s: rackwire networks route through %s; omit --gateway", in.Address, gw.Addr())
		}
		return map[string]any{"Address": gw.String(), "Data": map[string]string{}}, nil
	}
	var want netip.Addr
	if in.Address != "" {
		if want, err = netip.ParseAddr(in.Address); err != nil {
			return nil, fmt.Errorf("address %q: %w", in.Address, err)
		}
	}
	a, err := d.eps.Reserve(!v6, want, reserveTTL)
	if err != nil {
		return nil, err
	}
	return map[string]any{"Address": netip.PrefixFrom(a, a.BitLen()).String(), "Data": map[string]string{}}, nil
}

func (d *Driver) releaseAddress(body []byte) (any, error) {
	var in struct {
		PoolID  string
		Address string
	}
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	a, err := netip.ParseAddr(in.Address)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", in.Address, err)
	}
	// An endpoint's address is freed by its deletion; this drops the
	// reservation that outlived it, if any.
	d.eps.Unreserve(a)
	return struct{}{}, nil
}

// ---- network driver ----

// ipamData is one element of CreateNetwork's IPv4Data/IPv6Data.
type ipamData struct {
	AddressSpace string
	Pool         string
	Gateway      string
}

func (d *Driver) createNetwork(body []byte) (any, error) {
	var in struct {
		NetworkID          string
		IPv4Data, IPv6Data []ipamData
	}
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	if !dockerID(in.NetworkID) {
		return nil, fmt.Errorf("network id %q is not 64 hex digits", in.NetworkID)
	}
	ours := map[string]bool{anyV4.String(): true}
	for _, p := range d.eps.Prefixes() {
		ours[p.String()] = true
	}
	for _, data := range append(in.IPv4Data, in.IPv6Data...) {
		if !ours[data.Pool] {
			return nil, fmt.Errorf("pool %s is not one of this host's [ipam] cidrs; create the network with --ipam-driver %s", data.Pool, d.Name())
		}
	}
	if len(in.IPv4Data)+len(in.IPv6Data) == 0 {
		return nil, fmt.Errorf("the network has no address pool; create it with --ipam-driver %s", d.Name())
	}
	d.log.Info("docker network created", "network_id", in.NetworkID)
	return struct{}{}, nil
}

func dockerID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// endpointName is the rackwire name of a Docker endpoint.
func endpointName(eid string) string { return "docker-" + eid[:12] }

func (d *Driver) createEndpoint(body []byte) (any, error) {
	var in struct {
		NetworkID  string
		EndpointID string
		Interface  *struct {
			Address     string
			AddressIPv6 string
			MacAddress  string
		}
	}
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	if !dockerID(in.NetworkID) || !dockerID(in.EndpointID) {
		return nil, fmt.Errorf("network id %q or endpoint id %q is not 64 hex digits", in.NetworkID, in.EndpointID)
	}
	if in.Interface == nil || in.Interface.Address == "" && in.Interface.AddressIPv6 == "" {
		return nil, fmt.Errorf("no address for the endpoint; create the network with --ipam-driver %s", d.Name())
	}
	req := endpoint.Request{Name: endpointName(in.EndpointID), Detach: true, Reserved: true, Pending: PendingReason,
		Docker: &endpoint.DockerAttachment{NetworkID: in.NetworkID, EndpointID: in.EndpointID}}
	for _, s := range []string{in.Interface.Address, in.Interface.AddressIPv6} {
		if s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("address %q: %w", s, err)
		}
		if p.Addr().Is4() {
			req.IP = p.Addr()
		} else {
			req.IPv6 = p.Addr()
		}
	}
	if in.Interface.MacAddress != "" {
		mac, err := net.ParseMAC(in.Interface.MacAddress)
		if err != nil {
			return nil, fmt.Errorf("MAC address %q: %w", in.Interface.MacAddress, err)
		}
		req.MAC = mac
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ep, err := d.eps.Add(ctx, req)
	if err != nil {
		return nil, err
	}
	d.log.Info("docker endpoint created, closed until its labels are known", "endpoint_id", ep.ID, "endpoint", ep.Name,
		"docker_endpoint", in.EndpointID, "ipv4", ep.IPv4, "ipv6", ep.IPv6)
	if req.MAC != nil {
		// Docker chose the MAC: the answer must not repeat it.
		return map[string]any{}, nil
	}
	return map[string]any{"Interface": map[string]string{"MacAddress": ep.MAC}}, nil
}

type endpointKey struct {
	NetworkID  string
	EndpointID string
}

func (d *Driver) deleteEndpoint(body []byte) (any, error) {
	var in endpointKey
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	ep, ok := d.eps.FindDocker(in.EndpointID)
	if !ok {
		return struct{}{}, nil // Docker repeats deletes after its own crashes
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := d.eps.Delete(ctx, ep.Name); err != nil && !errors.Is(err, endpoint.ErrNotFound) {
		return nil, err
	}
	// Docker releases the addresses next (ReleaseAddress): until then they
	// are still its allocation.
	for _, a := range ep.IPs() {
		_, _ = d.eps.Reserve(a.Is4(), a, reserveTTL)
	}
	d.forget(in.EndpointID)
	d.log.Info("docker endpoint deleted", "endpoint_id", ep.ID, "endpoint", ep.Name, "container_id", ep.ContainerID)
	return struct{}{}, nil
}

func (d *Driver) endpointOperInfo(body []byte) (any, error) {
	var in endpointKey
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	ep, ok := d.eps.FindDocker(in.EndpointID)
	if !ok {
		return map[string]any{"Value": map[string]any{}}, nil
	}
	v := map[string]any{"rackwire.endpoint": ep.Name, "rackwire.id": ep.ID, "rackwire.state": string(ep.State),
		"rackwire.identity": uint32(ep.Identity), "rackwire.host_ifname": ep.HostIfName}
	if ep.Pending != "" {
		v["rackwire.pending"] = ep.Pending
	}
	return map[string]any{"Value": v}, nil
}

func (d *Driver) join(body []byte) (any, error) {
	var in struct {
		NetworkID  string
		EndpointID string
		SandboxKey string
	}
	if err := decode(body, &in); err != nil {
		return nil, err
	}
	ep, ok := d.eps.FindDocker(in.EndpointID)
	if !ok {
		return nil, fmt.Errorf("unknown endpoint %.12s; remove the container and start it again", in.EndpointID)
	}
	if in.SandboxKey != "" {
		if _, err := d.eps.SetSandbox(ep.Name, in.SandboxKey); err != nil {
			return nil, err
		}
	}
	// Usually the container can be found already (see lookup): its policy
	// is then in force before Join returns, so before it runs. If not, it
	// stays closed and the resolver goes on after Join.
	jctx, cancel := context.WithTimeout(context.Background(), joinLookup)
	resolved := d.resolveLabels(jctx, ep)
	cancel()
	out := map[string]any{"InterfaceName": map[string]string{"SrcName": d.eps.DetachedPeerName(ep.ID), "DstPrefix": "eth"}}
	var routes []map[string]any
	if ep.IPv4.IsValid() {
		out["Gateway"] = endpoint.GatewayIPv4.String()
		routes = append(routes, map[string]any{"Destination": gatewayOf(false).String(), "RouteType": 1})
	}
	if ep.IPv6.IsValid() {
		out["GatewayIPv6"] = endpoint.GatewayIPv6.String()
		routes = append(routes, map[string]any{"Destination": gatewayOf(true).String(), "RouteType": 1})
	}
	out["StaticRoutes"] = routes
	d.log.Info("docker endpoint joined its sandbox", "endpoint_id", ep.ID, "endpoint", ep.Name, "sandbox", in.SandboxKey, "labels_known", resolved)
	d.Kick()
	return out, nil
}
