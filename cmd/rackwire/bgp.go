package main

import (
	"flag"
	"fmt"
	"strconv"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	var withdrawAll bool
	register(&command{name: "bgp", summary: "BIRD: status, render, drain, undrain", subs: []*command{
		{
			name: "status", summary: "BGP sessions, BFD, announcements, VIP health",
			run: func(e *env, fs *flag.FlagSet) error {
				var st api.BGPStatus
				if err := e.get("/v1/bgp/status", &st); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, st)
				}
				bird := "running"
				if !st.BirdRunning {
					bird = "not reachable: " + st.BirdError
				}
				fmt.Fprintf(e.stdout, "BIRD: %s\nDrained: %v\nAnnounced: %v\n", bird, st.Drained, st.Announced)
				if st.LastApply.Error != "" {
					fmt.Fprintf(e.stdout, "Last apply error: %s\n", st.LastApply.Error)
				}
				rows := [][]string{{"PROTOCOL", "TYPE", "STATE", "UPTIME", "IMPORTED", "EXPORTED", "INFO"}}
				for _, p := range st.Protocols {
					info := p.Info
					if p.Reason != "" {
						info = p.Reason
					}
					rows = append(rows, []string{p.Name, p.Proto, p.State, strconv.FormatFloat(p.UptimeSeconds, 'f', 0, 64) + "s", strconv.Itoa(p.RoutesImported), strconv.Itoa(p.RoutesExported), info})
				}
				table(e.stdout, rows)
				if len(st.BFDSessions) > 0 {
					fmt.Fprintln(e.stdout, "BFD sessions:")
					for _, b := range st.BFDSessions {
						fmt.Fprintf(e.stdout, "  %s %s %s\n", b.Address, b.Interface, b.State)
					}
				}
				for _, v := range st.VIPs {
					fmt.Fprintf(e.stdout, "VIP %s: healthy=%v announced=%v\n", v.VIP, v.Healthy, v.Announced)
				}
				return nil
			},
		},
		{
			name: "render", summary: "print the BIRD config the agent would write",
			run: func(e *env, fs *flag.FlagSet) error {
				var out api.BGPRender
				if err := e.get("/v1/bgp/render", &out); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, out)
				}
				fmt.Fprint(e.stdout, out.Config)
				return nil
			},
		},
		{
			name: "drain", summary: "withdraw what this host announces (except [bgp] drain_keep) before maintenance",
			flags: func(fs *flag.FlagSet) {
				fs.BoolVar(&withdrawAll, "all", false, "withdraw drain_keep prefixes too")
			},
			run: func(e *env, fs *flag.FlagSet) error {
				var out api.BGPDrain
				if err := e.call("POST", "/v1/bgp/drain?keep="+strconv.FormatBool(!withdrawAll), nil, &out); err != nil {
					return err
				}
				fmt.Fprintln(e.stdout, "drained: announcements withdrawn; `rackwire bgp undrain` restores them")
				return nil
			},
		},
		{
			name: "undrain", summary: "announce again after a drain",
			run: func(e *env, fs *flag.FlagSet) error {
				var out api.BGPUndrain
				if err := e.call("POST", "/v1/bgp/undrain", nil, &out); err != nil {
					return err
				}
				fmt.Fprintln(e.stdout, "undrained: announcements restored")
				return nil
			},
		},
	}})
}
