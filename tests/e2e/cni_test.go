package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/rackwire/rackwire/daemon/api"
)

// cniVersions are the spec versions rackwire-cni answers for.
var cniVersions = []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// cniNet is one rackwire network config driven through libcni, the
// library runtimes use, against the real plugin binary.
type cniNet struct {
	t    *testing.T
	a    *agent
	cn   *libcni.CNIConfig
	list *libcni.NetworkConfigList
}

// cniNetwork builds a conflist for network name at spec version ver;
// plugin holds extra keys of the rackwire plugin config (labels, args).
func (a *agent) cniNetwork(t *testing.T, name, ver string, plugin map[string]any) *cniNet {
	t.Helper()
	p := map[string]any{"type": "rackwire-cni", "socket": a.sock}
	for k, v := range plugin {
		p[k] = v
	}
	b, err := json.Marshal(map[string]any{"cniVersion": ver, "name": name, "plugins": []any{p}})
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatalf("conflist %s: %v", b, err)
	}
	return &cniNet{t: t, a: a, list: list, cn: libcni.NewCNIConfigWithCacheDir([]string{binDir}, t.TempDir(), nil)}
}

func cniRT(cid, ns string, args ...[2]string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: cid, NetNS: "/run/netns/" + ns, IfName: "eth0", Args: args}
}

func cniCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 60*time.Second)
}

func (n *cniNet) add(rt *libcni.RuntimeConf) (*types100.Result, error) {
	ctx, cancel := cniCtx()
	defer cancel()
	res, err := n.cn.AddNetworkList(ctx, n.list, rt)
	if err != nil {
		return nil, err
	}
	if res.Version() != n.list.CNIVersion {
		n.t.Errorf("ADD result version %s, want %s", res.Version(), n.list.CNIVersion)
	}
	return types100.NewResultFromResult(res)
}

func (n *cniNet) mustAdd(rt *libcni.RuntimeConf) *types100.Result {
	n.t.Helper()
	res, err := n.add(rt)
	if err != nil {
		n.t.Fatalf("ADD %s in %s: %v", rt.ContainerID, rt.NetNS, err)
	}
	return res
}

func (n *cniNet) del(rt *libcni.RuntimeConf) error {
	ctx, cancel := cniCtx()
	defer cancel()
	return n.cn.DelNetworkList(ctx, n.list, rt)
}

func (n *cniNet) check(rt *libcni.RuntimeConf) error {
	ctx, cancel := cniCtx()
	defer cancel()
	return n.cn.CheckNetworkList(ctx, n.list, rt)
}

func (n *cniNet) status() error {
	ctx, cancel := cniCtx()
	defer cancel()
	return n.cn.GetStatusNetworkList(ctx, n.list)
}

// cniCode returns the CNI error code of err (0 if it is no CNI error).
func cniCode(err error) uint {
	var e *types.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// wantCode fails unless err is a CNI error with code and a message that
// names what to do (the hint goes to Details).
func wantCode(t *testing.T, what string, err error, code uint) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded, want CNI error %d", what, code)
		return
	}
	if got := cniCode(err); got != code {
		t.Errorf("%s: %v (code %d), want code %d", what, err, got, code)
	}
}

// endpoints lists the agent's endpoints.
func (a *agent) endpoints(t *testing.T) []api.Endpoint {
	t.Helper()
	var eps []api.Endpoint
	a.rwJSON(&eps, "endpoint", "list")
	return eps
}

func (a *agent) endpointByCID(t *testing.T, cid string) (api.Endpoint, bool) {
	t.Helper()
	for _, ep := range a.endpoints(t) {
		if ep.ContainerID == cid {
			return ep, true
		}
	}
	return api.Endpoint{}, false
}

// checkResult checks an ADD result against the endpoint the agent made
// and the interface in the namespace.
func checkResult(t *testing.T, a *agent, res *types100.Result, cid, ns string, dual bool) api.Endpoint {
	t.Helper()
	ep, ok := a.endpointByCID(t, cid)
	if !ok {
		t.Fatalf("no endpoint with container id %s after ADD", cid)
	}
	if ep.State != "ready" || ep.IfName != "eth0" {
		t.Errorf("endpoint %+v: want ready with ifname eth0", ep)
	}
	if len(res.Interfaces) != 2 || res.Interfaces[1].Sandbox != "/run/netns/"+ns || res.Interfaces[1].Name != "eth0" ||
		res.Interfaces[0].Name != ep.HostIfName || res.Interfaces[1].Mac != ep.MAC {
		t.Errorf("result interfaces %+v, want host %s and eth0 (%s) in %s", res.Interfaces, ep.HostIfName, ep.MAC, ns)
	}
	want := []string{ep.IPv4 + "/32 via 169.254.1.1"}
	if dual {
		want = append(want, ep.IPv6+"/128 via fe80::1")
	}
	var got []string
	for _, ip := range res.IPs {
		got = append(got, fmt.Sprintf("%s via %s", ip.Address.String(), ip.Gateway))
	}
	if !slices.Equal(got, want) {
		t.Errorf("result ips %v, want %v", got, want)
	}
	var routes []string
	for _, r := range res.Routes {
		routes = append(routes, r.Dst.String()+" via "+r.GW.String())
	}
	wantRoutes := []string{"0.0.0.0/0 via 169.254.1.1"}
	if dual {
		wantRoutes = append(wantRoutes, "::/0 via fe80::1")
	}
	if !slices.Equal(routes, wantRoutes) {
		t.Errorf("result routes %v, want %v", routes, wantRoutes)
	}
	out := sh(t, "ip", "-n", ns, "-br", "addr", "show", "dev", "eth0")
	if !strings.Contains(out, ep.IPv4+"/32") || !strings.Contains(out, "UP") {
		t.Errorf("eth0 in %s: %q, want up with %s", ns, out, ep.IPv4)
	}
	return ep
}

// TestCNIConformance drives the real rackwire-cni through libcni for every
// supported spec version: VERSION, ADD (result format, the interface in the
// namespace, the endpoint enforced and listed with its container id),
// CHECK (0.4.0 on), DEL twice, STATUS and GC (1.1.0).
func TestCNIConformance(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnc", cidrs: []string{"10.217.60.0/24", "fd00:217:60::/64"}})

	ctx, cancel := cniCtx()
	defer cancel()
	vi, err := libcni.NewCNIConfig([]string{binDir}, nil).GetVersionInfo(ctx, "rackwire-cni")
	if err != nil {
		t.Fatalf("VERSION: %v", err)
	}
	if got := vi.SupportedVersions(); !slices.Equal(got, cniVersions) {
		t.Errorf("VERSION: supported %v, want %v", got, cniVersions)
	}

	for i, ver := range cniVersions {
		t.Run(ver, func(t *testing.T) {
			n := a.cniNetwork(t, "rwcn-net", ver, map[string]any{"labels": map[string]string{"app": "web"}})
			ns := newNetns(t, fmt.Sprintf("rwcn-c%d", i))
			cid := fmt.Sprintf("c0ffee%02d%s", i, strings.Repeat("ab", 29))
			rt := cniRT(cid, ns)
			res := n.mustAdd(rt)
			ep := checkResult(t, a, res, cid, ns, true)
			if ep.Network != "rwcn-net" || ep.Labels != "app=web" {
				t.Errorf("endpoint network %q labels %q, want rwcn-net, app=web", ep.Network, ep.Labels)
			}
			// `endpoint list` shows the container id (12 characters).
			if out := a.rw("endpoint", "list"); !strings.Contains(out, cid[:12]) {
				t.Errorf("endpoint list does not show container id %s:\n%s", cid[:12], out)
			}
			if ver != "0.3.1" {
				if err := n.check(rt); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			if ver == "1.1.0" {
				if err := n.status(); err != nil {
					t.Errorf("STATUS: %v", err)
				}
			}
			if err := n.del(rt); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if _, ok := a.endpointByCID(t, cid); ok {
				t.Errorf("endpoint of %s still listed after DEL", cid)
			}
			if err := n.del(rt); err != nil {
				t.Errorf("second DEL: %v, want success", err)
			}
			if ver != "0.3.1" {
				wantCode(t, "CHECK after DEL", n.check(rt), types.ErrUnknownContainer)
			}
		})
	}

	t.Run("ADD twice", func(t *testing.T) {
		n := a.cniNetwork(t, "rwcn-net", "1.1.0", map[string]any{"labels": map[string]string{"app": "web"}})
		ns := newNetns(t, "rwcn-twice")
		rt := cniRT("twice0123456789", ns)
		first := n.mustAdd(rt)
		second := n.mustAdd(rt)
		if first.IPs[0].Address.String() != second.IPs[0].Address.String() {
			t.Errorf("second ADD gave %s, first %s: want the same attachment", second.IPs[0].Address, first.IPs[0].Address)
		}
		if eps := a.endpoints(t); len(eps) != 1 {
			t.Errorf("%d endpoints after ADD twice, want 1", len(eps))
		}
		// The same container id in another namespace is another sandbox:
		// refused until the first is deleted.
		ns2 := newNetns(t, "rwcn-twice2")
		_, err := n.add(cniRT("twice0123456789", ns2))
		if err == nil || !strings.Contains(err.Error(), "delete that attachment first") {
			t.Errorf("ADD of one container id in a second netns: %v, want a refusal that says to delete the first", err)
		}
		if err := n.del(rt); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("interface name", func(t *testing.T) {
		n := a.cniNetwork(t, "rwcn-net", "1.1.0", map[string]any{"labels": map[string]string{"app": "web"}})
		ns := newNetns(t, "rwcn-ifname")
		rt := cniRT("ifname01", ns)
		rt.IfName = "net1"
		res := n.mustAdd(rt)
		if len(res.Interfaces) != 2 || res.Interfaces[1].Name != "net1" {
			t.Errorf("result interfaces %+v, want net1 in the sandbox", res.Interfaces)
		}
		if out := sh(t, "ip", "-n", ns, "-br", "addr", "show", "dev", "net1"); !strings.Contains(out, res.IPs[0].Address.IP.String()) {
			t.Errorf("net1 in %s: %q, want %s", ns, out, res.IPs[0].Address.IP)
		}
		if ep, _ := a.endpointByCID(t, "ifname01"); ep.Name != "rwcn-net-ifname01-net1" || ep.IfName != "net1" {
			t.Errorf("endpoint %s ifname %s, want rwcn-net-ifname01-net1, net1", ep.Name, ep.IfName)
		}
		if err := n.check(rt); err != nil {
			t.Errorf("CHECK: %v", err)
		}
		if err := n.del(rt); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("GC", func(t *testing.T) {
		n := a.cniNetwork(t, "rwcn-gc", "1.1.0", map[string]any{"labels": map[string]string{"app": "gc"}})
		other := a.cniNetwork(t, "rwcn-other", "1.1.0", map[string]any{"labels": map[string]string{"app": "gc"}})
		var rts []*libcni.RuntimeConf
		for i := range 3 {
			rt := cniRT(fmt.Sprintf("gc%d", i), newNetns(t, fmt.Sprintf("rwcn-gc%d", i)))
			n.mustAdd(rt)
			rts = append(rts, rt)
		}
		ort := cniRT("gc9", newNetns(t, "rwcn-gc9"))
		other.mustAdd(ort)
		manual := a.addEndpoint("manual", "app=manual")
		// A runtime whose cache lost the attachments (libcni DELs the
		// stale ones it knows itself): only the plugin's GC can find them.
		fresh := a.cniNetwork(t, "rwcn-gc", "1.1.0", nil)
		ctx, cancel := cniCtx()
		defer cancel()
		if err := fresh.cn.GCNetworkList(ctx, fresh.list, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: "gc1", IfName: "eth0"}}}); err != nil {
			t.Fatalf("GC: %v", err)
		}
		var got []string
		for _, ep := range a.endpoints(t) {
			got = append(got, ep.Name)
		}
		slices.Sort(got)
		want := []string{"manual", "rwcn-gc-gc1", "rwcn-other-gc9"}
		if !slices.Equal(got, want) {
			t.Errorf("after GC keeping gc1: endpoints %v, want %v", got, want)
		}
		for _, rt := range rts {
			if err := n.del(rt); err != nil {
				t.Errorf("DEL after GC: %v", err)
			}
		}
		if err := other.del(ort); err != nil {
			t.Error(err)
		}
		a.rw("endpoint", "delete", manual.Name)
	})
}

// TestCNIRestartAndDown: DEL after the namespace is gone; CHECK and DEL
// after an agent restart; with the agent down ADD fails with code 11 and
// STATUS with 50, each saying to start rackwired.
func TestCNIRestartAndDown(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnr", cidrs: []string{"10.217.61.0/24"}})
	n := a.cniNetwork(t, "rwcn-r", "1.1.0", map[string]any{"labels": map[string]string{"app": "r"}})

	t.Run("DEL after netns gone", func(t *testing.T) {
		ns := newNetns(t, "rwcn-gone")
		rt := cniRT("gone01", ns)
		ep := checkResult(t, a, n.mustAdd(rt), "gone01", ns, false)
		sh(t, "ip", "netns", "del", ns)
		if err := n.del(rt); err != nil {
			t.Fatalf("DEL after the netns is gone: %v", err)
		}
		if _, ok := a.endpointByCID(t, "gone01"); ok {
			t.Error("endpoint still listed")
		}
		if slices.Contains(hostLinks(t), ep.HostIfName) {
			t.Errorf("host veth %s left", ep.HostIfName)
		}
	})

	t.Run("agent restart", func(t *testing.T) {
		ns := newNetns(t, "rwcn-rst")
		rt := cniRT("restart01", ns)
		n.mustAdd(rt)
		a.kill(syscall.SIGTERM)
		a.start()
		if err := n.check(rt); err != nil {
			t.Errorf("CHECK after agent restart: %v", err)
		}
		if err := n.del(rt); err != nil {
			t.Errorf("DEL after agent restart: %v", err)
		}
		if eps := a.endpoints(t); len(eps) != 0 {
			t.Errorf("endpoints after DEL: %+v", eps)
		}
	})

	t.Run("agent down", func(t *testing.T) {
		ns := newNetns(t, "rwcn-down")
		before := a.snapshot(t)
		a.kill(syscall.SIGTERM)
		_, err := n.add(cniRT("down01", ns))
		wantCode(t, "ADD with the agent down", err, types.ErrTryAgainLater)
		if err != nil && !strings.Contains(err.Error(), "systemctl start rackwired") {
			t.Errorf("ADD with the agent down: %q does not say to start rackwired", err)
		}
		wantCode(t, "STATUS with the agent down", n.status(), types.ErrPluginNotAvailable)
		a.start()
		if err := n.status(); err != nil {
			t.Errorf("STATUS with the agent up: %v", err)
		}
		if d := before.diff(a.snapshot(t)); d != "" {
			t.Errorf("a refused ADD left: %s", d)
		}
		if out := sh(t, "ip", "-n", ns, "-br", "link"); strings.Contains(out, "eth0") {
			t.Errorf("a refused ADD left eth0 in the netns: %s", out)
		}
	})
}

// TestCNIBadInput: bad network configs and CNI_ARGS are refused with the
// spec's codes and leave nothing behind.
func TestCNIBadInput(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnb", cidrs: []string{"10.217.62.0/24"}})
	ns := newNetns(t, "rwcn-bad")
	before := a.snapshot(t)
	web := map[string]string{"app": "web"}
	cases := []struct {
		name   string
		ver    string
		plugin map[string]any
		args   [][2]string
		netns  string
		code   uint
	}{
		{name: "unknown key", plugin: map[string]any{"labels": web, "lables": web}, code: types.ErrUnsupportedField},
		{name: "ipam section", plugin: map[string]any{"labels": web, "ipam": map[string]any{"type": "host-local"}}, code: types.ErrUnsupportedField},
		{name: "bad label value", plugin: map[string]any{"labels": map[string]string{"app": "we b"}}, code: types.ErrInvalidNetworkConfig},
		{name: "reserved label", plugin: map[string]any{"labels": map[string]string{"reserved:host": ""}}, code: types.ErrInvalidNetworkConfig},
		{name: "nomad label from config", plugin: map[string]any{"labels": map[string]string{"nomad.job": "x"}}, code: types.ErrInvalidNetworkConfig},
		{name: "no labels", plugin: map[string]any{}, code: types.ErrInvalidNetworkConfig},
		{name: "args.cni.labels not k=v", plugin: map[string]any{"args": map[string]any{"cni": map[string]any{"labels": []string{"app"}}}}, code: types.ErrInvalidNetworkConfig},
		{name: "labels not an object", plugin: map[string]any{"labels": []string{"app=web"}}, code: types.ErrDecodingFailure},
		{name: "socket relative", plugin: map[string]any{"labels": web, "socket": "run/x.sock"}, code: types.ErrInvalidNetworkConfig},
		{name: "unsupported version", ver: "0.2.0", plugin: map[string]any{"labels": web}, code: types.ErrIncompatibleCNIVersion},
		{name: "unknown CNI_ARGS key", plugin: map[string]any{"labels": web}, args: [][2]string{{"FOO", "bar"}}, code: types.ErrInvalidEnvironmentVariables},
		{name: "bad label in CNI_ARGS", plugin: map[string]any{"labels": web}, args: [][2]string{{"RACKWIRE_LABEL_app", "a b"}}, code: types.ErrInvalidEnvironmentVariables},
		{name: "CNI_ARGS value with =", plugin: map[string]any{"labels": web}, args: [][2]string{{"RACKWIRE_LABEL_app", "a=b"}}, code: types.ErrInvalidEnvironmentVariables},
		{name: "empty label key in CNI_ARGS", plugin: map[string]any{"labels": web}, args: [][2]string{{"RACKWIRE_LABEL_", "x"}}, code: types.ErrInvalidEnvironmentVariables},
		{name: "bad IgnoreUnknown", plugin: map[string]any{"labels": web}, args: [][2]string{{"IgnoreUnknown", "maybe"}}, code: types.ErrInvalidEnvironmentVariables},
		{name: "netns missing", plugin: map[string]any{"labels": web}, netns: "rwcn-nonexistent", code: types.ErrInvalidNetNS},
		{name: "netns not a namespace", plugin: map[string]any{"labels": web}, netns: "../../etc/hostname", code: types.ErrInvalidNetNS},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ver := c.ver
			if ver == "" {
				ver = "1.1.0"
			}
			n := a.cniNetwork(t, "rwcn-bad", ver, c.plugin)
			target := ns
			if c.netns != "" {
				target = c.netns
			}
			_, err := n.add(cniRT("bad01", target, c.args...))
			wantCode(t, "ADD", err, c.code)
			if err != nil {
				t.Logf("ADD refused: %v", err)
			}
		})
	}
	if d := before.diff(a.snapshot(t)); d != "" {
		t.Errorf("refused ADDs left: %s", d)
	}
	if out := sh(t, "ip", "-n", ns, "-br", "link"); strings.Contains(out, "eth0") {
		t.Errorf("refused ADDs left eth0 in the netns: %s", out)
	}
	// IgnoreUnknown lets a runtime's own args through.
	n := a.cniNetwork(t, "rwcn-bad", "1.1.0", map[string]any{"labels": web})
	rt := cniRT("ok01", ns, [2]string{"IgnoreUnknown", "1"}, [2]string{"K8S_POD_NAME", "x"})
	n.mustAdd(rt)
	if err := n.del(rt); err != nil {
		t.Fatal(err)
	}
}

// TestCNIPolicy: labels from the network config, args.cni.labels,
// RACKWIRE_LABEL_* and Nomad's CNI_ARGS reach the endpoints, and a policy
// on them allows and denies real traffic between CNI-plugged containers.
func TestCNIPolicy(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnp", cidrs: []string{"10.217.63.0/24"}})
	plain := a.cniNetwork(t, "rwcn-p", "1.1.0", map[string]any{"labels": map[string]string{"tier": "cni"}})
	withArgs := a.cniNetwork(t, "rwcn-p", "1.1.0", map[string]any{"labels": map[string]string{"tier": "cni"},
		"args": map[string]any{"cni": map[string]any{"labels": []string{"app=other", "tier=args"}}}})

	webNS, clientNS, otherNS := newNetns(t, "rwcn-web"), newNetns(t, "rwcn-client"), newNetns(t, "rwcn-other")
	webRT := cniRT("web01", webNS, [2]string{"RACKWIRE_LABEL_app", "web"})
	clientRT := cniRT("client01", clientNS, [2]string{"IgnoreUnknown", "1"}, [2]string{"NOMAD_JOB_ID", "api"},
		[2]string{"NOMAD_GROUP_NAME", "front"}, [2]string{"NOMAD_NAMESPACE", "default"}, [2]string{"NOMAD_ALLOC_ID", "8f5f3b1e-2c4a-4d3b-9e51-0a1b2c3d4e5f"},
		[2]string{"NOMAD_REGION", "global"}, [2]string{"RACKWIRE_LABEL_app", "client"})
	otherRT := cniRT("other01", otherNS)
	web := plain.mustAdd(webRT)
	plain.mustAdd(clientRT)
	withArgs.mustAdd(otherRT)
	t.Cleanup(func() {
		_ = plain.del(webRT)
		_ = plain.del(clientRT)
		_ = withArgs.del(otherRT)
	})
	wantLabels := map[string]string{
		"web01":    "app=web,tier=cni",
		"client01": "app=client,nomad.alloc_id=8f5f3b1e-2c4a-4d3b-9e51-0a1b2c3d4e5f,nomad.group=front,nomad.job=api,nomad.namespace=default,nomad.region=global,tier=cni",
		"other01":  "app=other,tier=args",
	}
	for cid, want := range wantLabels {
		ep, _ := a.endpointByCID(t, cid)
		if ep.Labels != want {
			t.Errorf("labels of %s: %q, want %q", cid, ep.Labels, want)
		}
	}
	webIP := web.IPs[0].Address.IP.String()
	servers(t, webNS, webIP, 8080)
	to := net.JoinHostPort(webIP, "8080")
	mustPass(t, "no policy: other->web", tcpReq(otherNS, to, okTimeout))

	a.importPolicy(t, "rwcn-l3", cnp("rwcn-l3", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
            nomad.job: api
`))
	if err := eventually(5*time.Second, func() error {
		if tcpReq(otherNS, to, dropTimeout) == nil {
			return fmt.Errorf("other->web still passes")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	mustPass(t, "client (app=client, nomad.job=api) -> web", tcpReq(clientNS, to, okTimeout))
	mustFail(t, "other (app=other) -> web", tcpReq(otherNS, to, dropTimeout))

	// A container ADDed while the policy is in force is enforced when ADD
	// returns: the very first connection is decided by the policy, with no
	// waiting (the agent writes the map before the veth goes up).
	web2NS := newNetns(t, "rwcn-web2")
	web2RT := cniRT("web02", web2NS, [2]string{"RACKWIRE_LABEL_app", "web"})
	web2 := plain.mustAdd(web2RT)
	t.Cleanup(func() { _ = plain.del(web2RT) })
	web2IP := web2.IPs[0].Address.IP.String()
	servers(t, web2NS, web2IP, 8080)
	to2 := net.JoinHostPort(web2IP, "8080")
	mustFail(t, "other -> web2 right after ADD", tcpReq(otherNS, to2, dropTimeout))
	mustPass(t, "client -> web2 right after ADD", tcpReq(clientNS, to2, okTimeout))
}

// TestCNICyclesLeakNothing: 200 ADD/DEL cycles through the plugin leave
// no link, address, route, neighbour, state file, pin or ipcache entry.
func TestCNICyclesLeakNothing(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnl", cidrs: []string{"10.217.64.0/24", "fd00:217:64::/64"}})
	n := a.cniNetwork(t, "rwcn-l", "1.1.0", map[string]any{"labels": map[string]string{"app": "cycle"}})
	ns := newNetns(t, "rwcn-cycle")
	kernel := func() string {
		return strings.Join([]string{
			sh(t, "ip", "route", "show", "proto", "114"), sh(t, "ip", "-6", "route", "show", "proto", "114"),
			sh(t, "ip", "neigh", "show", "nud", "permanent"), sh(t, "ip", "-6", "neigh", "show", "nud", "permanent"),
			sh(t, "ip", "-n", ns, "-br", "addr"), sh(t, "ip", "-n", ns, "route"),
		}, "\n")
	}
	before, beforeK := a.snapshot(t), kernel()
	deadline := time.Now().Add(3 * time.Minute)
	const cycles = 200
	for i := range cycles {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d cycles in 3 minutes", i, cycles)
		}
		rt := cniRT(fmt.Sprintf("cycle%03d", i), ns)
		n.mustAdd(rt)
		if err := n.del(rt); err != nil {
			t.Fatalf("cycle %d DEL: %v", i, err)
		}
	}
	if d := before.diff(a.snapshot(t)); d != "" {
		t.Errorf("after %d cycles: %s", cycles, d)
	}
	if k := kernel(); k != beforeK {
		t.Errorf("after %d cycles the kernel state differs:\nbefore:\n%s\nafter:\n%s", cycles, beforeK, k)
	}
	if ents, _ := os.ReadDir(filepath.Join(a.dir, "state", "endpoints")); len(ents) != 0 {
		t.Errorf("state files left: %v", ents)
	}
}
