package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"strconv"
)

func init() {
	var withdrawAll bool
	register(&command{name: "bgp", summary: "BIRD: status, render, drain, undrain", subs: []*command{
		{
			name: "status", summary: "BGP sessions, BFD, announcements, VIP health",
			run: func(e *env, fs *flag.FlagSet) error {
				var raw json.RawMessage
				if err := e.get("/v1/bgp/status", &raw); err != nil {
					return err
				}
				if e.json {
					var v any
					_ = json.Unmarshal(raw, &v)
					return printJSON(e.stdout, v)
				}
				var st struct {
					BirdRunning bool     `json:"bird_running"`
					BirdError   string   `json:"bird_error"`
					Drained     bool     `json:"drained"`
					Announced   []string `json:"announced"`
					Protocols   []struct {
						Name          string  `json:"name"`
						Proto         string  `json:"proto"`
						State         string  `json:"state"`
						Info          string  `json:"info"`
						UptimeSeconds float64 `json:"uptime_seconds"`
						Reason        string  `json:"reason"`
						Imported      *int    `json:"routes_imported"`
						Exported      *int    `json:"routes_exported"`
					} `json:"protocols"`
					BFDSessions []map[string]any `json:"bfd_sessions"`
					LastApply   map[string]any   `json:"last_apply"`
					VIPs        []map[string]any `json:"vips"`
				}
				if err := json.Unmarshal(raw, &st); err != nil {
					return err
				}
				bird := "running"
				if !st.BirdRunning {
					bird = "not reachable: " + st.BirdError
				}
				fmt.Fprintf(e.stdout, "BIRD: %s\nDrained: %v\nAnnounced: %v\n", bird, st.Drained, st.Announced)
				if le, ok := st.LastApply["error"]; ok && le != "" {
					fmt.Fprintf(e.stdout, "Last apply error: %v\n", le)
				}
				rows := [][]string{{"PROTOCOL", "TYPE", "STATE", "UPTIME", "IMPORTED", "EXPORTED", "INFO"}}
				for _, p := range st.Protocols {
					info := p.Info
					if p.Reason != "" {
						info = p.Reason
					}
					rows = append(rows, []string{p.Name, p.Proto, p.State, strconv.FormatFloat(p.UptimeSeconds, 'f', 0, 64) + "s", intp(p.Imported), intp(p.Exported), info})
				}
				table(e.stdout, rows)
				if len(st.BFDSessions) > 0 {
					fmt.Fprintln(e.stdout, "BFD sessions:")
					for _, b := range st.BFDSessions {
						fmt.Fprintf(e.stdout, "  %v %v %v\n", b["address"], b["interface"], b["state"])
					}
				}
				for _, v := range st.VIPs {
					fmt.Fprintf(e.stdout, "VIP %v: healthy=%v announced=%v\n", v["vip"], v["healthy"], v["announced"])
				}
				return nil
			},
		},
		{
			name: "render", summary: "print the BIRD config the agent would write",
			run: func(e *env, fs *flag.FlagSet) error {
				var out map[string]string
				if err := e.get("/v1/bgp/render", &out); err != nil {
					return err
				}
				if e.json {
					return printJSON(e.stdout, out)
				}
				fmt.Fprint(e.stdout, out["config"])
				return nil
			},
		},
		{
			name: "drain", summary: "withdraw what this host announces (except [bgp] drain_keep) before maintenance",
			flags: func(fs *flag.FlagSet) {
				fs.BoolVar(&withdrawAll, "all", false, "withdraw drain_keep prefixes too")
			},
			run: func(e *env, fs *flag.FlagSet) error {
				if err := e.call("POST", "/v1/bgp/drain?keep="+strconv.FormatBool(!withdrawAll), nil, nil); err != nil {
					return err
				}
				fmt.Fprintln(e.stdout, "drained: announcements withdrawn; `rackwire bgp undrain` restores them")
				return nil
			},
		},
		{
			name: "undrain", summary: "announce again after a drain",
			run: func(e *env, fs *flag.FlagSet) error {
				if err := e.call("POST", "/v1/bgp/undrain", nil, nil); err != nil {
					return err
				}
				fmt.Fprintln(e.stdout, "undrained: announcements restored")
				return nil
			},
		},
	}})
}

func intp(p *int) string {
	if p == nil {
		return "-"
	}
	return strconv.Itoa(*p)
}
