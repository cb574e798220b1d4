package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/url"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	var typ string
	register(&command{
		name: "monitor", summary: "stream datapath events: drops, audit, sampled traces", usage: "[--type drop|trace|audit] [--json]",
		flags: func(fs *flag.FlagSet) {
			fs.StringVar(&typ, "type", "", "only events of this type: drop, trace or audit")
		},
		run: func(e *env, fs *flag.FlagSet) error {
			if fs.NArg() > 0 {
				return usagef("monitor takes no arguments")
			}
			path := "/v1/monitor"
			if typ != "" {
				path += "?type=" + url.QueryEscape(typ)
			}
			if !e.json {
				fmt.Fprintln(e.stderr, "listening for datapath events; Ctrl-C to stop")
			}
			return e.client.Stream(e.ctx, path, func(raw json.RawMessage) error {
				if e.json {
					_, err := fmt.Fprintln(e.stdout, string(raw))
					return err
				}
				var ev api.Event
				if err := json.Unmarshal(raw, &ev); err != nil {
					return err
				}
				ep := ev.EndpointName
				if ep == "" {
					ep = fmt.Sprint(ev.Endpoint)
				}
				if ev.Type == api.EventSuppressed {
					lost := ""
					if ev.Lost > 0 {
						lost = fmt.Sprintf("; %d lost (transport full)", ev.Lost)
					}
					_, err := fmt.Fprintf(e.stdout, "%s %d events of endpoint %s suppressed (rate limit %s)%s\n",
						ev.Time.Format("15:04:05.000"), ev.Suppressed, ep, ev.Limit, lost)
					return err
				}
				reason := ""
				if ev.Reason != "" {
					reason = " (" + ev.Reason + ")"
				}
				dst := ev.Dst
				if ev.VIP != "" {
					dst = ev.VIP + " => " + ev.Dst // service: VIP => backend
				}
				_, err := fmt.Fprintf(e.stdout, "%s %-5s ep=%s %s %s %s -> %s id %d [%s] -> %d [%s] %s%s\n",
					ev.Time.Format("15:04:05.000"), ev.Type, ep, ev.Direction, ev.Proto, ev.Src, dst,
					ev.SrcIdentity, ev.SrcLabels, ev.DstIdentity, ev.DstLabels, ev.Verdict, reason)
				return err
			})
		},
	})
}
