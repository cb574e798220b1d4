package main

import (
	"flag"
	"fmt"
	"net/url"
	"strconv"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	var add struct{ name, netns, labels, ip, ipv6 string }
	register(&command{name: "endpoint", summary: "workloads on this host: add, list, get, delete", subs: []*command{
		{
			name: "add", summary: "plug a network namespace in as a workload", usage: "--name N --netns PATH --labels k=v,... [--ip IP] [--ipv6 IP]",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&add.name, "name", "", "endpoint name, unique on this host")
				fs.StringVar(&add.netns, "netns", "", "network namespace path, e.g. /run/netns/web or /proc/PID/ns/net")
				fs.StringVar(&add.labels, "labels", "", "labels k1=v1,k2=v2 (the identity-relevant ones define its identity)")
				fs.StringVar(&add.ip, "ip", "", "IPv4 address from [ipam] cidrs (default: the next free one)")
				fs.StringVar(&add.ipv6, "ipv6", "", "IPv6 address from [ipam] cidrs (default: the next free one, when an IPv6 CIDR is configured)")
			},
			run: func(e *env, fs *flag.FlagSet) error {
				if add.name == "" || add.netns == "" {
					return usagef("--name and --netns are required")
				}
				if fs.NArg() > 0 {
					return usagef("unexpected argument %q", fs.Arg(0))
				}
				var ep api.Endpoint
				if err := e.call("POST", "/v1/endpoints", api.EndpointAdd{Name: add.name, Netns: add.netns, Labels: add.labels, IP: add.ip, IPv6: add.ipv6}, &ep); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ep)
				}
				endpointTable(e, []api.Endpoint{ep})
				return nil
			},
		},
		{
			name: "list", summary: "list the endpoints of this host",
			run: func(e *env, fs *flag.FlagSet) error {
				var eps []api.Endpoint
				if err := e.get("/v1/endpoints", &eps); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, eps)
				}
				endpointTable(e, eps)
				return nil
			},
		},
		{
			name: "get", summary: "one endpoint", usage: "NAME|ID",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one endpoint name or id")
				}
				var ep api.Endpoint
				if err := e.get("/v1/endpoints/"+url.PathEscape(fs.Arg(0)), &ep); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ep)
				}
				table(e.stdout, [][]string{
					{"ID:", strconv.Itoa(int(ep.ID))}, {"Name:", ep.Name}, {"State:", ep.State},
					{"Netns:", ep.Netns}, {"IPv4:", ep.IPv4}, {"IPv6:", ep.IPv6},
					{"Labels:", ep.Labels}, {"Identity:", fmt.Sprintf("%d (%s)", ep.Identity, ep.IdentityLabels)},
					{"Host veth:", fmt.Sprintf("%s (ifindex %d)", ep.HostIfName, ep.HostIfIndex)}, {"MAC:", ep.MAC},
					{"Created:", ep.Created.Format("2006-01-02 15:04:05")},
				})
				return nil
			},
		},
		{
			name: "audit", summary: "audit mode for one endpoint: forward what policy would drop, and report it", usage: "NAME|ID on|off",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 2 || (fs.Arg(1) != "on" && fs.Arg(1) != "off") {
					return usagef("give an endpoint and on or off")
				}
				var ep api.Endpoint
				if err := e.call("POST", "/v1/endpoints/"+url.PathEscape(fs.Arg(0))+"/audit", api.EndpointAudit{Enabled: fs.Arg(1) == "on"}, &ep); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ep)
				}
				if ep.Audit {
					fmt.Fprintf(e.stdout, "endpoint %s is in audit mode: drops are forwarded and reported (`rackwire monitor --type audit`)\n", ep.Name)
				} else {
					fmt.Fprintf(e.stdout, "endpoint %s enforces its policy\n", ep.Name)
				}
				return nil
			},
		},
		{
			name: "delete", summary: "unplug a workload (its namespace stays)", usage: "NAME|ID",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one endpoint name or id")
				}
				var out api.Deleted
				if err := e.call("DELETE", "/v1/endpoints/"+url.PathEscape(fs.Arg(0)), nil, &out); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, out)
				}
				fmt.Fprintf(e.stdout, "endpoint %s deleted\n", out.Deleted)
				return nil
			},
		},
	}})
}

func endpointTable(e *env, eps []api.Endpoint) {
	rows := [][]string{{"ID", "NAME", "STATE", "IPV4", "IPV6", "IDENTITY", "AUDIT", "CONTAINER", "LABELS"}}
	for _, ep := range eps {
		audit := "-"
		if ep.Audit {
			audit = "yes"
		}
		rows = append(rows, []string{strconv.Itoa(int(ep.ID)), ep.Name, ep.State, dash(ep.IPv4), dash(ep.IPv6),
			strconv.FormatUint(uint64(ep.Identity), 10), audit, shortID(ep.ContainerID), ep.Labels})
	}
	table(e.stdout, rows)
}

// shortID shows a container id as runtimes do (12 characters); --json has
// it whole.
func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return dash(id)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
