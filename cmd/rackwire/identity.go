package main

import (
	"flag"
	"net/url"
	"strconv"
	"strings"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	register(&command{name: "identity", summary: "security identities: list, get", subs: []*command{
		{
			name: "list", summary: "reserved, cluster and CIDR identities this agent knows",
			run: func(e *env, fs *flag.FlagSet) error {
				var ids []api.Identity
				if err := e.get("/v1/identities", &ids); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ids)
				}
				identityTable(e, ids)
				return nil
			},
		},
		{
			name: "get", summary: "one identity", usage: "ID|NAME",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one identity (a number or a reserved name such as world)")
				}
				var id api.Identity
				if err := e.get("/v1/identities/"+url.PathEscape(fs.Arg(0)), &id); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, id)
				}
				identityTable(e, []api.Identity{id})
				return nil
			},
		},
	}})
	register(&command{name: "node", summary: "hosts of the cluster: list", subs: []*command{
		{
			name: "list", summary: "every node registered in the store",
			run: func(e *env, fs *flag.FlagSet) error {
				var ns []api.Node
				if err := e.get("/v1/nodes", &ns); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ns)
				}
				rows := [][]string{{"NAME", "CLUSTER", "IPS", "CIDRS", "ASN", "VERSION"}}
				for _, n := range ns {
					rows = append(rows, []string{n.Name, n.Cluster, strings.Join(n.IPs, ","), strings.Join(n.CIDRs, ","), strconv.FormatInt(n.BGPASN, 10), n.Version})
				}
				table(e.stdout, rows)
				return nil
			},
		},
	}})
}

func identityTable(e *env, ids []api.Identity) {
	rows := [][]string{{"ID", "SCOPE", "USERS", "LABELS"}}
	for _, i := range ids {
		rows = append(rows, []string{strconv.FormatUint(uint64(i.ID), 10), i.Scope, strconv.Itoa(i.Users), i.Labels})
	}
	table(e.stdout, rows)
}
