package main

import (
	"flag"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	var raw struct {
		identity  uint
		direction string
		proto     string
		port      string
		deny      bool
	}
	rawFlags := func(fs *flag.FlagSet) {
		fs.UintVar(&raw.identity, "identity", 0, "remote identity (0 = any)")
		fs.StringVar(&raw.direction, "direction", "ingress", "ingress or egress")
		fs.StringVar(&raw.proto, "proto", "any", "any, tcp, udp, sctp, icmp, icmpv6 or a number")
		fs.StringVar(&raw.port, "port", "0", "destination port or range LO-HI (0 = any; the ICMP type for ICMP)")
		fs.BoolVar(&raw.deny, "deny", false, "a deny entry (beats any allow)")
	}
	rawEntry := func() (api.RawEntry, error) {
		r := api.RawEntry{Identity: uint32(raw.identity), Direction: raw.direction, Proto: raw.proto, Deny: raw.deny}
		lo, hi, isRange := strings.Cut(raw.port, "-")
		p, err := strconv.ParseUint(lo, 10, 16)
		if err != nil {
			return r, usagef("--port %q: write a port or LO-HI", raw.port)
		}
		r.Port = uint16(p)
		if isRange {
			q, err := strconv.ParseUint(hi, 10, 16)
			if err != nil {
				return r, usagef("--port %q: write a port or LO-HI", raw.port)
			}
			r.EndPort = uint16(q)
		}
		return r, nil
	}
	var (
		revert     bool
		ctEndpoint string
	)
	ctQuery := func() string {
		if ctEndpoint == "" {
			return ""
		}
		return "?endpoint=" + url.QueryEscape(ctEndpoint)
	}
	ctFlags := func(fs *flag.FlagSet) {
		fs.StringVar(&ctEndpoint, "endpoint", "", "only this endpoint's entries (name or id)")
	}
	epArg := func(fs *flag.FlagSet) (string, error) {
		if fs.NArg() != 1 {
			return "", usagef("give one endpoint name or id")
		}
		return url.PathEscape(fs.Arg(0)), nil
	}
	// rawCall sends one raw entry to the endpoint's map (add or delete).
	rawCall := func(method, verb string) func(e *env, fs *flag.FlagSet) error {
		return func(e *env, fs *flag.FlagSet) error {
			ep, err := epArg(fs)
			if err != nil {
				return err
			}
			r, err := rawEntry()
			if err != nil {
				return err
			}
			var out api.PolicyEntry
			if err := e.call(method, "/v1/bpf/policy/"+ep, r, &out); err != nil {
				return err
			}
			if e.json {
				return printJSON(e.stdout, out)
			}
			fmt.Fprintf(e.stdout, "%s %s %s identity=%d proto=%s port=%s\n", verb, out.Verdict, out.Direction, out.Identity, out.Proto, raw.port)
			return nil
		}
	}
	register(&command{name: "bpf", summary: "the datapath's maps: policy, ipcache, ct, metrics", subs: []*command{
		{name: "policy", summary: "an endpoint's policy map", subs: []*command{
			{
				name: "get", summary: "the entries, decoded, with counters", usage: "ENDPOINT",
				run: func(e *env, fs *flag.FlagSet) error {
					ep, err := epArg(fs)
					if err != nil {
						return err
					}
					var es []api.PolicyEntry
					if err := e.get("/v1/bpf/policy/"+ep, &es); err != nil {
						return err
					}
					if e.json {
						return printJSON(e.stdout, es)
					}
					rows := [][]string{{"DIRECTION", "IDENTITY", "LABELS", "PROTO", "PORT", "VERDICT", "PACKETS", "BYTES"}}
					for _, x := range es {
						port := "any"
						if x.Port != 0 {
							port = strconv.Itoa(int(x.Port))
						}
						if x.EndPort > x.Port {
							port += "-" + strconv.Itoa(int(x.EndPort))
						}
						v := x.Verdict
						if x.Emergency {
							v += " (emergency allow-all)"
						}
						rows = append(rows, []string{x.Direction, strconv.FormatUint(uint64(x.Identity), 10), dash(x.IdentityLabels), x.Proto, port, v,
							strconv.FormatUint(x.Packets, 10), strconv.FormatUint(x.Bytes, 10)})
					}
					table(e.stdout, rows)
					return nil
				},
			},
			{
				name: "add", summary: "write one raw entry (operator override; the next policy change rewrites the map)", usage: "ENDPOINT [--identity N] [--direction D] [--proto P] [--port P|LO-HI] [--deny]",
				flags: rawFlags,
				run:   rawCall("POST", "added"),
			},
			{
				name: "delete", summary: "remove one raw entry", usage: "ENDPOINT [--identity N] [--direction D] [--proto P] [--port P|LO-HI]",
				flags: rawFlags,
				run:   rawCall("DELETE", "deleted"),
			},
			{
				name: "allow-all", summary: "emergency: open an endpoint completely (--revert closes it again)", usage: "ENDPOINT [--revert]",
				flags: func(fs *flag.FlagSet) { fs.BoolVar(&revert, "revert", false, "remove the emergency entries") },
				run: func(e *env, fs *flag.FlagSet) error {
					ep, err := epArg(fs)
					if err != nil {
						return err
					}
					var out api.AllowAll
					if err := e.call("POST", "/v1/bpf/policy/"+ep+"/allow-all?revert="+strconv.FormatBool(revert), nil, &out); err != nil {
						return err
					}
					if e.json {
						return printJSON(e.stdout, out)
					}
					fmt.Fprintf(e.stdout, "endpoint %s %s\n", out.Endpoint, out.Result)
					return nil
				},
			},
		}},
		{name: "ipcache", summary: "address to identity map", subs: []*command{
			{
				name: "list", summary: "every entry (exact addresses and prefixes)",
				run: func(e *env, fs *flag.FlagSet) error {
					var es []api.IPCacheEntry
					if err := e.get("/v1/bpf/ipcache", &es); err != nil {
						return err
					}
					if e.json {
						return printJSON(e.stdout, es)
					}
					ipcacheTable(e, es)
					return nil
				},
			},
			{
				name: "get", summary: "what an address resolves to (unknown: world)", usage: "IP",
				run: func(e *env, fs *flag.FlagSet) error {
					if fs.NArg() != 1 {
						return usagef("give one IP address")
					}
					var x api.IPCacheEntry
					if err := e.get("/v1/bpf/ipcache/"+url.PathEscape(fs.Arg(0)), &x); err != nil {
						return err
					}
					if e.json {
						return printJSON(e.stdout, x)
					}
					ipcacheTable(e, []api.IPCacheEntry{x})
					return nil
				},
			},
		}},
		{name: "ct", summary: "connection tracking", subs: []*command{
			{
				name: "list", summary: "tracked connections: state, flags (fin-orig, fin-reply, rst, audit), lifetime left", usage: "[--endpoint ENDPOINT]",
				flags: ctFlags,
				run: func(e *env, fs *flag.FlagSet) error {
					var es []api.CTEntry
					if err := e.get("/v1/bpf/ct"+ctQuery(), &es); err != nil {
						return err
					}
					if e.json {
						return printJSON(e.stdout, es)
					}
					rows := [][]string{{"ENDPOINT", "DIRECTION", "PROTO", "SRC", "DST", "REMOTE-ID", "STATE", "FLAGS", "EXPIRES-IN", "PACKETS", "BYTES", "LAST-SEEN", "NEXT-HOP"}}
					for _, x := range es {
						rows = append(rows, []string{strconv.Itoa(int(x.Endpoint)), x.Direction, api.ProtoName(x.Proto), x.Src, x.Dst,
							strconv.FormatUint(uint64(x.RemoteIdentity), 10), dash(x.State), dash(ctFlagText(x)), x.ExpiresIn.Round(time.Second).String(),
							strconv.FormatUint(x.Packets, 10), strconv.FormatUint(x.Bytes, 10), x.LastSeen.Format(time.RFC3339Nano), nextHopText(x.NextHop)})
					}
					table(e.stdout, rows)
					return nil
				},
			},
			{
				name: "flush", summary: "delete tracked connections (all, or one endpoint's); their next packets are new flows", usage: "[--endpoint ENDPOINT]",
				flags: ctFlags,
				run: func(e *env, fs *flag.FlagSet) error {
					var out api.CTFlushed
					if err := e.call("POST", "/v1/bpf/ct/flush"+ctQuery(), nil, &out); err != nil {
						return err
					}
					if e.json {
						return printJSON(e.stdout, out)
					}
					if out.Endpoint != "" {
						fmt.Fprintf(e.stdout, "deleted %d connection-tracking entries of endpoint %s\n", out.Deleted, out.Endpoint)
					} else {
						fmt.Fprintf(e.stdout, "deleted %d connection-tracking entries\n", out.Deleted)
					}
					return nil
				},
			},
		}},
		{
			name: "metrics", summary: "datapath counters by reason and direction",
			run: func(e *env, fs *flag.FlagSet) error {
				var ms []api.Metric
				if err := e.get("/v1/bpf/metrics", &ms); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, ms)
				}
				rows := [][]string{{"REASON", "DIRECTION", "PACKETS", "BYTES"}}
				for _, m := range ms {
					rows = append(rows, []string{m.Reason, m.Direction, strconv.FormatUint(m.Packets, 10), strconv.FormatUint(m.Bytes, 10)})
				}
				table(e.stdout, rows)
				return nil
			},
		},
	}})
}

func ipcacheTable(e *env, es []api.IPCacheEntry) {
	rows := [][]string{{"PREFIX", "IDENTITY", "LABELS", "HOST"}}
	for _, x := range es {
		rows = append(rows, []string{x.Prefix, strconv.FormatUint(uint64(x.Identity), 10), dash(x.Labels), dash(x.HostIP)})
	}
	table(e.stdout, rows)
}

// ctFlagText names a CT entry's flags: fin-orig, fin-reply, rst, audit.
func ctFlagText(x api.CTEntry) string {
	var fs []string
	for _, f := range []struct {
		on   bool
		name string
	}{{x.FINOrig, "fin-orig"}, {x.FINReply, "fin-reply"}, {x.RST, "rst"}, {x.Audit, "audit"}} {
		if f.on {
			fs = append(fs, f.name)
		}
	}
	return strings.Join(fs, ",")
}

// nextHopText shows a CT entry's kept next hop: "ifindex 3 via 02:00:00:21:0a:f1", or "-".
func nextHopText(nh *api.CTNextHop) string {
	if nh == nil {
		return "-"
	}
	return fmt.Sprintf("ifindex %d via %s", nh.Ifindex, nh.MAC)
}
