//go:build rackwire_bench

package e2e

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

// TestBenchCNILatency measures CNI ADD and DEL through libcni (plugin exec
// to result: the runtime's view), with 1 and with 200 endpoints already on
// the host, every new endpoint selected by a policy so ADD includes the
// policy write. The baseline, measured in the same run, is the same
// add/delete straight over the API (what `rackwire endpoint add` costs);
// the ratio is what the plugin adds. `make bench-cni`; goal ADD p99 ≤ 100 ms.
func TestBenchCNILatency(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnbench", cidrs: []string{"10.217.0.0/20", "fd00:217::/64"}, policyMax: 16384})
	a.importPolicy(t, "rwcn-bench", cnp("rwcn-bench", "bench", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: filler
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
  egress:
    - toEndpoints:
        - matchLabels:
            app: filler
`))
	n := a.cniNetwork(t, "rwcn-bench", "1.1.0", map[string]any{"labels": map[string]string{"app": "bench"}})
	fill := a.cniNetwork(t, "rwcn-fill", "1.1.0", map[string]any{"labels": map[string]string{"app": "filler"}})
	ns := newNetns(t, "rwcn-bench")
	cl := api.NewClient(a.sock)
	const rounds = 100

	measure := func(present int) (cniAdd, cniDel, apiAdd, apiDel []time.Duration) {
		for i := range rounds {
			// Alternate the two ways so drift on the shared machine hits both.
			rt := cniRT(fmt.Sprintf("bench%d-%03d", present, i), ns)
			t0 := time.Now()
			n.mustAdd(rt)
			t1 := time.Now()
			if err := n.del(rt); err != nil {
				t.Fatal(err)
			}
			t2 := time.Now()
			cniAdd, cniDel = append(cniAdd, t1.Sub(t0)), append(cniDel, t2.Sub(t1))

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			name := fmt.Sprintf("api%d-%03d", present, i)
			t0 = time.Now()
			if err := cl.Do(ctx, http.MethodPost, "/v1/endpoints", api.EndpointAdd{Name: name, Netns: "/run/netns/" + ns, Labels: "app=bench"}, nil); err != nil {
				t.Fatal(err)
			}
			t1 = time.Now()
			if err := cl.Do(ctx, http.MethodDelete, "/v1/endpoints/"+name, nil, nil); err != nil {
				t.Fatal(err)
			}
			t2 = time.Now()
			cancel()
			apiAdd, apiDel = append(apiAdd, t1.Sub(t0)), append(apiDel, t2.Sub(t1))
		}
		return
	}
	var fillers []string
	addFillers := func(upto int) {
		for len(fillers) < upto {
			i := len(fillers)
			fns := newNetns(t, fmt.Sprintf("rwcn-f%d", i))
			fill.mustAdd(cniRT(fmt.Sprintf("fill%03d", i), fns))
			fillers = append(fillers, fns)
		}
	}
	var report []string
	for _, present := range []int{1, 200} {
		addFillers(present)
		if got := len(a.endpoints(t)); got != present {
			t.Fatalf("%d endpoints present, want %d", got, present)
		}
		cniAdd, cniDel, apiAdd, apiDel := measure(present)
		for _, r := range []struct {
			what     string
			cni, api []time.Duration
		}{{"ADD", cniAdd, apiAdd}, {"DEL", cniDel, apiDel}} {
			c50, c99 := pct(r.cni, 50), pct(r.cni, 99)
			a50, a99 := pct(r.api, 50), pct(r.api, 99)
			report = append(report, fmt.Sprintf("%-4s %4d present  CNI p50 %6.1f ms  p99 %6.1f ms   API p50 %6.1f ms  p99 %6.1f ms   CNI/API p50 %.2f",
				r.what, present, ms(c50), ms(c99), ms(a50), ms(a99), float64(c50)/float64(a50)))
			if r.what == "ADD" {
				verdict := "met"
				if c99 > 100*time.Millisecond {
					verdict = "NOT met"
				}
				report = append(report, fmt.Sprintf("     goal CNI ADD p99 <= 100 ms with %d present: %s", present, verdict))
			}
		}
	}
	fmt.Printf("\nCNI latency, %d rounds each (plugin exec to result via libcni; API = POST/DELETE /v1/endpoints):\n%s\n\n", rounds, strings.Join(report, "\n"))
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[min(max(i-1, 0), len(s)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
