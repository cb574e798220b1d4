package main

import (
	"flag"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

func init() {
	register(&command{
		name:    "status",
		summary: "agent, store, datapath, BIRD, endpoints, identities, kernel features",
		run:     runStatus,
	})
}

func runStatus(e *env, fs *flag.FlagSet) error {
	if fs.NArg() > 0 {
		return usagef("status takes no arguments")
	}
	var st api.Status
	if err := e.get("/v1/status", &st); err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, st)
	}
	a := st.Agent
	rows := [][]string{
		{"Agent:", fmt.Sprintf("rackwired %s, pid %d, up %s", a.Version, a.PID, a.Uptime)},
		{"Node:", fmt.Sprintf("%s (cluster %s, id %d)", a.Node, a.Cluster, a.ClusterID)},
		{"Config:", a.ConfigFile},
	}
	if a.Reloads > 0 {
		r := fmt.Sprintf("%d reloads, last %s", a.Reloads, a.LastReload)
		if a.ReloadError != "" {
			r += ", last refused: " + strings.ReplaceAll(a.ReloadError, "\n", " | ")
		}
		rows = append(rows, []string{"Reloads:", r})
	}
	for _, c := range []struct {
		name string
		c    api.Component
	}{
		{"Store:", st.Store}, {"Datapath:", st.Datapath}, {"BGP:", st.BGP},
		{"Endpoints:", st.Endpoints}, {"Identities:", st.Identities}, {"Policy:", st.Policy},
	} {
		rows = append(rows, []string{c.name, componentLine(c.c)})
	}
	table(e.stdout, rows)
	if len(st.Kernel) > 0 {
		fmt.Fprintln(e.stdout, "Kernel features:")
		var kr [][]string
		for _, f := range st.Kernel {
			state := "yes"
			if !f.Available {
				state = "no"
			}
			kr = append(kr, []string{"  " + f.Name, state, f.Fallback})
		}
		table(e.stdout, kr)
	}
	return nil
}

func componentLine(c api.Component) string {
	s := c.State
	if c.Since != nil {
		s += fmt.Sprintf(" since %s (%s)", c.Since.Format(time.RFC3339), time.Since(*c.Since).Truncate(time.Second))
	}
	if c.Message != "" {
		s += ": " + c.Message
	}
	if len(c.Detail) > 0 {
		keys := make([]string, 0, len(c.Detail))
		for k := range c.Detail {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = k + "=" + c.Detail[k]
		}
		s += " [" + strings.Join(parts, " ") + "]"
	}
	return s
}
