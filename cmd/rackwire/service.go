package main

import (
	"flag"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	var spec api.ServiceSpec
	var backends string
	register(&command{name: "service", summary: "load-balanced services (VIPs): list, get, add, delete", subs: []*command{
		{
			name: "list", summary: "every VIP with its source and how many backends are active",
			run: func(e *env, fs *flag.FlagSet) error {
				var l api.ServiceList
				if err := e.get("/v1/services", &l); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, l)
				}
				rows := [][]string{{"FRONTEND", "NAME", "SOURCE", "BACKENDS"}}
				for _, s := range l.Services {
					rows = append(rows, []string{s.Frontend, s.Name, s.Source, fmt.Sprintf("%d/%d active", s.Active, s.Total)})
				}
				table(e.stdout, rows)
				if !l.Programmed {
					fmt.Fprintf(e.stderr, "warning: the datapath has not taken this table (%s); the previous one stays in force\n", orNone(l.Error))
				}
				if len(l.Problems) > 0 {
					fmt.Fprintf(e.stderr, "%d service problem(s) left data out; see `rackwire service list --json` (problems) or the agent's log\n", len(l.Problems))
				}
				return nil
			},
		},
		{
			name: "get", summary: "one service with each backend's node, locality, state and source", usage: "NAME",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one service name")
				}
				var s api.Service
				if err := e.get("/v1/services/"+url.PathEscape(fs.Arg(0)), &s); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, s)
				}
				fmt.Fprintf(e.stdout, "%s  %s  source %s  %d/%d active\n", s.Name, s.Frontend, s.Source, s.Active, s.Total)
				rows := [][]string{{"BACKEND", "NODE", "LOCAL", "STATE", "SOURCE"}}
				for _, b := range s.Backends {
					rows = append(rows, []string{b.Address, orNone(b.Node), strconv.FormatBool(b.Local), b.State, b.Source})
				}
				table(e.stdout, rows)
				return nil
			},
		},
		{
			name: "add", summary: "store a service for the whole cluster (admin)", usage: "NAME --vip IP --port N [--protocol tcp|udp] --backends IP:PORT,...",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&spec.VIP, "vip", "", "the VIP clients connect to")
				fs.IntVar(&spec.Port, "port", 0, "the VIP's port")
				fs.StringVar(&spec.Protocol, "protocol", "tcp", "tcp or udp")
				fs.StringVar(&backends, "backends", "", "comma-separated ip:port of the backends")
			},
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one service name")
				}
				if spec.VIP == "" || spec.Port == 0 {
					return usagef("--vip and --port are required")
				}
				spec.Name = fs.Arg(0)
				spec.Backends = []string{}
				for _, b := range strings.Split(backends, ",") {
					if b = strings.TrimSpace(b); b != "" {
						spec.Backends = append(spec.Backends, b)
					}
				}
				var s api.Service
				if err := e.call("POST", "/v1/services", spec, &s); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, s)
				}
				fmt.Fprintf(e.stdout, "stored service %s (%s, %d backends); every agent of the cluster picks it up\n", s.Name, s.Frontend, s.Total)
				return nil
			},
		},
		{
			name: "delete", summary: "remove a stored service (admin)", usage: "NAME",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one service name")
				}
				var d api.Deleted
				if err := e.call("DELETE", "/v1/services/"+url.PathEscape(fs.Arg(0)), nil, &d); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, d)
				}
				fmt.Fprintf(e.stdout, "deleted service %s\n", d.Deleted)
				return nil
			},
		},
	}})
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
