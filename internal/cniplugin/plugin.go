package cniplugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/endpoint"
	rwversion "github.com/rackwire/rackwire/internal/version"
)

// Versions are the CNI spec versions the plugin answers for.
var Versions = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Timeout bounds one API call; an ADD includes the policy write.
const Timeout = 60 * time.Second

// Main runs one CNI command from the environment and stdin, prints the
// result or the error object, and returns the exit code.
func Main() int {
	err := skel.PluginMainFuncsWithError(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, GC: cmdGC, Status: cmdStatus},
		Versions, "rackwire-cni "+rwversion.Version+": plugs containers into rackwired (CNI spec 0.3.1, 0.4.0, 1.0.0, 1.1.0)")
	if err != nil {
		if perr := err.Print(); perr != nil {
			fmt.Fprintln(os.Stderr, "rackwire-cni: write error:", perr)
		}
		return 1
	}
	return 0
}

// EndpointName names the endpoint of an attachment after the network and
// the container id (and the interface, when it is not eth0), within the
// 63 characters an endpoint name may have. CNI network names and container
// ids use the characters endpoint names allow.
func EndpointName(network, containerID, ifName string) string {
	n := network[:min(len(network), 30)] + "-" + containerID[:min(len(containerID), 16)]
	if ifName != "" && ifName != endpoint.PeerIfName {
		n += "-" + ifName
	}
	return n
}

func client(conf *NetConf) *api.Client { return api.NewClient(conf.Socket) }

// agentErr turns an API failure into a CNI error. down is the code for
// "rackwired does not answer": 11 (try again later), or 50 for STATUS.
func agentErr(err error, conf *NetConf, what string, down uint) error {
	if errors.Is(err, api.ErrAgentDown) || errors.Is(err, context.DeadlineExceeded) {
		return types.NewError(down, fmt.Sprintf("%s: rackwired does not answer on %s", what, conf.Socket),
			"start it (systemctl start rackwired) and retry; if it runs, check the network config's \"socket\"")
	}
	var ae *api.Error
	if !errors.As(err, &ae) {
		return types.NewError(types.ErrInternal, fmt.Sprintf("%s: %v", what, err), "see rackwired's log (journalctl -u rackwired)")
	}
	code := types.ErrInternal
	switch {
	case ae.Code == http.StatusServiceUnavailable:
		code = down
	case ae.Code == http.StatusBadRequest && strings.Contains(ae.ErrorBody.Error, endpoint.NetnsMsg):
		code = types.ErrInvalidNetNS
	case ae.Code == http.StatusBadRequest:
		code = types.ErrInvalidNetworkConfig
	case ae.Code == http.StatusNotFound:
		code = types.ErrUnknownContainer
	}
	hint := ae.Hint
	if hint == "" {
		hint = "see `rackwire endpoint list` and rackwired's log"
	}
	return types.NewError(code, fmt.Sprintf("%s: %s", what, ae.ErrorBody.Error), hint)
}

func ctxTimeout() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), Timeout)
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	a, err := ParseArgs(args.Args)
	if err != nil {
		return err
	}
	labels, err := conf.MergeLabels(a)
	if err != nil {
		return err
	}
	if _, err := os.Stat(args.Netns); err != nil {
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("CNI_NETNS %q: %v", trunc(args.Netns), err), "the runtime must create the namespace before ADD")
	}
	ctx, cancel := ctxTimeout()
	defer cancel()
	var ep api.Endpoint
	in := api.EndpointAdd{Name: EndpointName(conf.Name, args.ContainerID, args.IfName), Netns: args.Netns, Labels: labels.CLI(),
		IfName: args.IfName, ContainerID: args.ContainerID, Network: conf.Name}
	if err := client(conf).Do(ctx, http.MethodPost, "/v1/endpoints", in, &ep); err != nil {
		return agentErr(err, conf, "add container "+args.ContainerID+" to network "+conf.Name, types.ErrTryAgainLater)
	}
	res, err := result(ep, args.Netns, conf.DNS)
	if err != nil {
		return err
	}
	return types.PrintResult(res, conf.CNIVersion)
}

// result is the CNI result of an endpoint: the host-side veth and the
// interface in the sandbox, one /32 or /128 address per family with the
// gateway, and a default route through each gateway.
func result(ep api.Endpoint, sandbox string, dns types.DNS) (*types100.Result, error) {
	res := &types100.Result{CNIVersion: types100.ImplementedSpecVersion, DNS: dns,
		Interfaces: []*types100.Interface{
			{Name: ep.HostIfName, Mac: ep.HostMAC},
			{Name: ep.IfName, Mac: ep.MAC, Sandbox: sandbox},
		}}
	one := 1
	for _, a := range []struct{ ip, gw string }{{ep.IPv4, ep.GatewayIPv4}, {ep.IPv6, ep.GatewayIPv6}} {
		if a.ip == "" {
			continue
		}
		ip, err1 := netip.ParseAddr(a.ip)
		gw, err2 := netip.ParseAddr(a.gw)
		if err1 != nil || err2 != nil {
			return nil, types.NewError(types.ErrInternal, fmt.Sprintf("agent answered a bad address %q or gateway %q", a.ip, a.gw), "")
		}
		res.IPs = append(res.IPs, &types100.IPConfig{Interface: &one, Gateway: gw.AsSlice(),
			Address: net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())}})
	}
	for _, r := range ep.Routes {
		_, dst, err1 := net.ParseCIDR(r.Dst)
		gw := net.ParseIP(r.Via)
		if err1 != nil || gw == nil {
			return nil, types.NewError(types.ErrInternal, fmt.Sprintf("agent answered a bad route %q via %q", r.Dst, r.Via), "")
		}
		res.Routes = append(res.Routes, &types.Route{Dst: *dst, GW: gw})
	}
	return res, nil
}

func cmdDel(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := ctxTimeout()
	defer cancel()
	name := EndpointName(conf.Name, args.ContainerID, args.IfName)
	path := "/v1/endpoints/" + url.PathEscape(name) + "?container_id=" + url.QueryEscape(args.ContainerID)
	err = client(conf).Do(ctx, http.MethodDelete, path, nil, nil)
	var ae *api.Error
	if errors.As(err, &ae) && ae.Code == http.StatusNotFound {
		return nil // never added, or deleted already: DEL is idempotent
	}
	if err != nil {
		return agentErr(err, conf, "delete container "+args.ContainerID+" from network "+conf.Name, types.ErrTryAgainLater)
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if _, err := ParseArgs(args.Args); err != nil {
		return err
	}
	what := "check container " + args.ContainerID + " in network " + conf.Name
	ctx, cancel := ctxTimeout()
	defer cancel()
	var ep api.Endpoint
	name := EndpointName(conf.Name, args.ContainerID, args.IfName)
	if err := client(conf).Do(ctx, http.MethodGet, "/v1/endpoints/"+url.PathEscape(name), nil, &ep); err != nil {
		return agentErr(err, conf, what, types.ErrTryAgainLater)
	}
	fail := func(code uint, format string, a ...any) error {
		return types.NewError(code, what+": "+fmt.Sprintf(format, a...), "delete and add the container again (CNI DEL, ADD); see `rackwire endpoint get "+ep.Name+"`")
	}
	if ep.ContainerID != args.ContainerID || ep.Network != conf.Name {
		return fail(types.ErrUnknownContainer, "endpoint %s belongs to container %q of network %q", ep.Name, ep.ContainerID, ep.Network)
	}
	if ep.Netns != args.Netns {
		return fail(types.ErrInternal, "endpoint is in netns %s, the runtime says %s", ep.Netns, args.Netns)
	}
	if ep.State != string(endpoint.StateReady) {
		return fail(types.ErrInternal, "endpoint state is %s %s", ep.State, ep.PolicyReason)
	}
	want := []string{}
	for _, ip := range []string{ep.IPv4, ep.IPv6} {
		if ip != "" {
			want = append(want, ip)
		}
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
			return types.NewError(types.ErrDecodingFailure, what+": prevResult: "+err.Error(), "")
		}
		prev, err := types100.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return types.NewError(types.ErrDecodingFailure, what+": prevResult: "+err.Error(), "")
		}
		var got []string
		for _, ipc := range prev.IPs {
			got = append(got, ipc.Address.IP.String())
		}
		slices.Sort(got)
		w := slices.Sorted(slices.Values(want))
		if !slices.Equal(got, w) {
			return fail(types.ErrInternal, "prevResult has addresses %v, the endpoint %v", got, w)
		}
	}
	return checkSandbox(args.Netns, args.IfName, want, fail)
}

// checkSandbox looks at the interface in the namespace: up, with the
// endpoint's addresses.
func checkSandbox(path, ifName string, want []string, fail func(uint, string, ...any) error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open netns %s: %v", path, err), "")
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("netlink in netns %s: %v", path, err), "")
	}
	defer h.Close()
	l, err := h.LinkByName(ifName)
	if err != nil {
		return fail(types.ErrInternal, "no interface %s in netns %s", ifName, path)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		return fail(types.ErrInternal, "interface %s is down", ifName)
	}
	addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return fail(types.ErrInternal, "list addresses of %s: %v", ifName, err)
	}
	have := map[string]bool{}
	for _, ad := range addrs {
		have[ad.IP.String()] = true
	}
	for _, w := range want {
		if !have[w] {
			return fail(types.ErrInternal, "interface %s lacks address %s", ifName, w)
		}
	}
	return nil
}

func cmdGC(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	in := api.AttachmentGC{Network: conf.Name, Keep: []api.Attachment{}}
	for _, a := range conf.ValidAttachments {
		in.Keep = append(in.Keep, api.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	ctx, cancel := ctxTimeout()
	defer cancel()
	var out api.AttachmentGCResult
	if err := client(conf).Do(ctx, http.MethodPost, "/v1/attachments/gc", in, &out); err != nil {
		return agentErr(err, conf, "gc network "+conf.Name, types.ErrTryAgainLater)
	}
	if len(out.Failed) > 0 {
		return types.NewError(types.ErrInternal, fmt.Sprintf("gc network %s: %d endpoints not deleted: %s", conf.Name, len(out.Failed), strings.Join(out.Failed, "; ")),
			"run GC again; see rackwired's log")
	}
	return nil
}

func cmdStatus(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var rd api.Ready
	if err := client(conf).Do(ctx, http.MethodGet, "/v1/ready", nil, &rd); err != nil {
		return agentErr(err, conf, "status", types.ErrPluginNotAvailable)
	}
	if !rd.Ready {
		return types.NewError(types.ErrPluginNotAvailable, "status: "+rd.Reason, "wait until `rackwire status` shows the agent ready")
	}
	return nil
}
