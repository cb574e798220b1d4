package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"strconv"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	var tr struct{ src, srcIP, srcEP, dst, dstIP, dstEP, dport string }
	register(&command{name: "policy", summary: "network policies: import, list, get, delete, trace", subs: []*command{
		{
			name: "import", summary: "validate a policy file and store it cluster-wide", usage: "FILE",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one policy file (YAML or JSON)")
				}
				data, err := os.ReadFile(fs.Arg(0))
				if err != nil {
					return fmt.Errorf("read %s: %w", fs.Arg(0), err)
				}
				var out []api.PolicySummary
				if err := e.call("POST", "/v1/policies", api.PolicyImport{File: fs.Arg(0), Data: string(data)}, &out); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, out)
				}
				for _, p := range out {
					fmt.Fprintf(e.stdout, "imported %s (%d rules)\n", p.Name, p.Rules)
				}
				return nil
			},
		},
		{
			name: "list", summary: "the policies in force and where they come from",
			run: func(e *env, fs *flag.FlagSet) error {
				var ps []api.PolicySummary
				if err := e.get("/v1/policies", &ps); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ps)
				}
				rows := [][]string{{"NAME", "RULES", "SOURCE"}}
				for _, p := range ps {
					rows = append(rows, []string{p.Name, strconv.Itoa(p.Rules), p.Source})
				}
				table(e.stdout, rows)
				return nil
			},
		},
		{
			name: "get", summary: "one policy document as loaded", usage: "NAME",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one policy name")
				}
				var docs []api.PolicyDocument
				if err := e.get("/v1/policies/"+url.PathEscape(fs.Arg(0)), &docs); err != nil {
					return err
				}
				return printJSON(e.stdout, docs)
			},
		},
		{
			name: "delete", summary: "remove a store policy", usage: "NAME",
			run: func(e *env, fs *flag.FlagSet) error {
				if fs.NArg() != 1 {
					return usagef("give one policy name")
				}
				var out api.Deleted
				if err := e.call("DELETE", "/v1/policies/"+url.PathEscape(fs.Arg(0)), nil, &out); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "policy %s deleted\n", out.Deleted)
				return nil
			},
		},
		{
			name: "trace", summary: "would a connection pass, and which rule decides",
			usage: "(--src k=v,... | --src-ip IP | --src-endpoint N) (--dst k=v,... | --dst-ip IP | --dst-endpoint N) --dport 80/tcp",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&tr.src, "src", "", "source labels k=v,...")
				fs.StringVar(&tr.srcIP, "src-ip", "", "source address")
				fs.StringVar(&tr.srcEP, "src-endpoint", "", "source endpoint name or id")
				fs.StringVar(&tr.dst, "dst", "", "destination labels k=v,...")
				fs.StringVar(&tr.dstIP, "dst-ip", "", "destination address")
				fs.StringVar(&tr.dstEP, "dst-endpoint", "", "destination endpoint name or id")
				fs.StringVar(&tr.dport, "dport", "", "destination port/protocol, e.g. 80/tcp, 53/udp, 8/icmp")
			},
			run: func(e *env, fs *flag.FlagSet) error {
				if tr.dport == "" {
					return usagef("--dport is required, e.g. --dport 80/tcp")
				}
				req := api.TraceRequest{
					Src:   api.TraceSubject{Labels: tr.src, IP: tr.srcIP, Endpoint: tr.srcEP},
					Dst:   api.TraceSubject{Labels: tr.dst, IP: tr.dstIP, Endpoint: tr.dstEP},
					DPort: tr.dport,
				}
				var res api.TraceResult
				if err := e.call("POST", "/v1/policy/trace", req, &res); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, res)
				}
				fmt.Fprintf(e.stdout, "%s -> %s on %s: %s\n", res.Src.Labels, res.Dst.Labels, tr.dport, upper(res.Verdict))
				table(e.stdout, [][]string{
					{"  egress of source:", traceLine(res.Egress)},
					{"  ingress of destination:", traceLine(res.Ingress)},
				})
				return nil
			},
		},
	}})
}

// traceLine says one side of a trace in words.
func traceLine(s api.TraceSide) string {
	out := s.Verdict
	if s.Policy != "" {
		out += fmt.Sprintf(" by %s %s", s.Policy, s.Rule)
	}
	if s.Source != "" {
		out += " (" + s.Source + ")"
	}
	if s.Reason != "" {
		out += ": " + s.Reason
	}
	if s.Audit {
		out += " [audit mode: reported, not dropped]"
	}
	return out
}

func upper(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'a' && c <= 'z' {
			b[i] = c - 32
		}
	}
	return string(b)
}
