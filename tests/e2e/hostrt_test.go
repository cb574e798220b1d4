package e2e

import (
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/api"
)

// TestStatusHostRouting: `rackwire status` and `status --json` say which
// host routing is in force and why, and where rw_from_uplink is attached;
// "legacy" attaches it nowhere.
func TestStatusHostRouting(t *testing.T) {
	require(t)
	for _, c := range []struct {
		mode, want, uplinks string
	}{{"auto", "", "lo"}, {"legacy", "legacy", ""}} {
		t.Run(c.mode, func(t *testing.T) {
			a := newAgent(t, agentOpts{tag: "hr" + c.mode[:1], cidrs: []string{"10.217.90.0/24"}, hostRouting: c.mode})
			var st api.Status
			a.rwJSON(&st, "status", "--json")
			want := c.want
			if want == "" {
				want = "legacy"
				for _, f := range st.Kernel {
					if f.Name == "host_routing" && f.Available {
						want = "bpf"
					}
				}
			}
			if want == "legacy" {
				c.uplinks = ""
			}
			d := st.Datapath.Detail
			if d["host_routing"] != want || d["host_routing_why"] == "" || d["uplinks"] != c.uplinks {
				t.Errorf("status --json datapath detail: host_routing %q (%q), uplinks %q; want %q with a reason, uplinks %q",
					d["host_routing"], d["host_routing_why"], d["uplinks"], want, c.uplinks)
			}
			if c.mode == "auto" && !strings.HasPrefix(d["host_routing_why"], "auto:") {
				t.Errorf("host_routing_why %q, want it to start with auto:", d["host_routing_why"])
			}
			text := a.rw("status")
			if !strings.Contains(text, "host_routing="+want) {
				t.Errorf("rackwire status does not say host_routing=%s:\n%s", want, text)
			}
		})
	}
}
