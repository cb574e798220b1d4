package multihost

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	rwapi "github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/consultest"
)

// consulRequests returns the number of HTTP requests Consul has answered
// since it started (its telemetry, kept for Prometheus).
func consulRequests(addr string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/v1/agent/metrics?format=prometheus", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return 0, fmt.Errorf("consul metrics: %s: %s", resp.Status, b)
	}
	var n float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "consul_api_http_count") {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			n += v
		}
	}
	return n, sc.Err()
}

// requestRate samples Consul's request counter every step for d and
// returns the rate of each interval (requests per second), minus the
// sampler's own request.
func requestRate(t testing.TB, addr string, step, d time.Duration) []float64 {
	t.Helper()
	var rates []float64
	prev, err := consulRequests(addr)
	if err != nil {
		t.Logf("consul request counter: %v", err)
		return nil
	}
	for end := time.Now().Add(d); time.Now().Before(end); {
		time.Sleep(step)
		n, err := consulRequests(addr)
		if err != nil {
			t.Logf("consul request counter: %v", err)
			continue
		}
		rates = append(rates, (n-prev-1)/step.Seconds())
		prev = n
	}
	return rates
}

func fmtRates(rs []float64) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = strconv.FormatFloat(r, 'f', 1, 64)
	}
	return strings.Join(s, " ")
}

func maxOf(rs []float64) float64 {
	m := 0.0
	for _, r := range rs {
		m = max(m, r)
	}
	return m
}

// TestOutage stops Consul for 60 s while a cross-host flow runs: no
// request of the flow is lost, the agents stay up and report the store
// degraded, and after Consul returns a new endpoint on host B becomes
// reachable from host A as the policy allows.
func TestOutage(t *testing.T) {
	const outage = 60 * time.Second
	f := newFabric(t, fabricOptions{hosts: 2, persistent: true})
	a, b := f.hosts[0], f.hosts[1]
	a.start(t)
	b.start(t)
	client := a.addEndpoint(t, "client", "app=client")
	web := b.addEndpoint(t, "web", "app=web")
	web.serve(t)
	importPolicy(t, f, a)
	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Fatalf("client -> web not allowed after %s", d)
	}

	steady := requestRate(t, f.consul.HTTPAddr, 5*time.Second, 15*time.Second)
	t.Logf("steady state: Consul HTTP requests/s from 2 agents (5 s intervals): %s", fmtRates(steady))

	wait := client.startFlow(t, web, 20*time.Millisecond, outage+25*time.Second)
	time.Sleep(5 * time.Second)
	f.consul.Kill()
	down := time.Now()
	t.Logf("consul killed at %s", down.Format(time.TimeOnly))

	for _, h := range f.hosts {
		var st rwapi.Status
		waitFor(t, 45*time.Second, h.name+" reports the store degraded", func() bool {
			s, err := h.status()
			st = s
			return err == nil && s.Store.State == rwapi.StateDegraded && s.Store.Since != nil
		})
		t.Logf("%s: store %s since %s (noticed %s after the kill): %s", h.name, st.Store.State,
			st.Store.Since.Format(time.RFC3339), time.Since(down).Truncate(100*time.Millisecond), st.Store.Message)
	}
	// A new endpoint whose label set is known locally gets its identity
	// without Consul.
	webOut := b.addEndpoint(t, "webout", "app=web")
	var epOut struct {
		Identity uint32 `json:"identity"`
	}
	b.cliJSON(t, &epOut, "endpoint", "get", "webout")
	t.Logf("endpoint added on %s during the outage: identity %d", b.name, epOut.Identity)

	time.Sleep(time.Until(down.Add(outage)))
	for _, h := range f.hosts {
		if !h.running() {
			t.Fatalf("rackwired on %s exited during the Consul outage", h.name)
		}
	}
	f.consul.Restart()
	consultest.WaitLeader(t, f.consul.Client(t), 60*time.Second)
	back := time.Now()
	t.Logf("consul back at %s (down %s)", back.Format(time.TimeOnly), back.Sub(down).Truncate(100*time.Millisecond))

	var rates []float64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rates = requestRate(t, f.consul.HTTPAddr, 5*time.Second, 90*time.Second)
	}()

	web2 := b.addEndpoint(t, "web2", "app=web")
	web2.serve(t)

	d, ok := client.waitProbe(web2, true, 150*time.Second)
	if !ok {
		t.Errorf("new endpoint web2 on %s not reachable from client on %s %s after Consul returned", b.name, a.name, time.Since(back))
	} else {
		t.Logf("RECOVERY: new endpoint on %s reachable from %s %s after it was added, %s after Consul returned",
			b.name, a.name, d.Truncate(10*time.Millisecond), time.Since(back).Truncate(10*time.Millisecond))
	}
	webOut.serve(t)
	if d, ok := client.waitProbe(webOut, true, 60*time.Second); !ok {
		t.Errorf("endpoint added during the outage not reachable after it: %s", d)
	}
	other := a.addEndpoint(t, "other", "app=other")
	if other.probe(web2, 2*time.Second) {
		t.Errorf("other -> web2 connected, want dropped")
	}

	res := wait()
	t.Logf("flow client -> web every 20 ms across the outage: %d answered, %d lost %v", res.OK, res.Fail, res.FailAt)
	if res.Fail != 0 || res.OK < 1000 {
		t.Errorf("flow across the outage: %d answered, %d lost (at %v s), want none lost", res.OK, res.Fail, res.FailAt)
	}
	for _, h := range f.hosts {
		if !h.running() {
			t.Fatalf("rackwired on %s exited after the outage", h.name)
		}
		waitFor(t, 90*time.Second, h.name+" store ok again", func() bool {
			s, err := h.status()
			return err == nil && s.Store.State == rwapi.StateOK
		})
	}
	wg.Wait()
	t.Logf("RECOVERY: Consul HTTP requests/s from 2 agents after it returned (5 s intervals): %s (max %.1f; steady max %.1f)",
		fmtRates(rates), maxOf(rates), maxOf(steady))
}

// TestSessionLoss destroys host B's session in Consul: its node and
// ipcache keys go with it (behavior = delete) and come back under a new
// session; host A's view of B's endpoint follows.
func TestSessionLoss(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 2})
	a, b := f.hosts[0], f.hosts[1]
	a.start(t)
	b.start(t)
	client := a.addEndpoint(t, "client", "app=client")
	web := b.addEndpoint(t, "web", "app=web")
	web.serve(t)
	importPolicy(t, f, a)
	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Fatalf("client -> web not allowed after %s", d)
	}

	st, err := b.status()
	if err != nil {
		t.Fatal(err)
	}
	old := st.Store.Detail["session"]
	if old == "" {
		t.Fatalf("%s has no session: %v", b.name, st.Store.Detail)
	}
	c := f.consul.Client(t)
	keys := []string{"rackwire/state/nodes/v1/default/" + b.name, "rackwire/state/ip/v1/default/" + web.ip}
	for _, k := range keys {
		p, _, err := c.KV().Get(k, nil)
		if err != nil || p == nil || p.Session != old {
			t.Fatalf("key %s before: %+v %v, want held by session %s", k, p, err, old)
		}
	}
	m := a.ipcacheMap(t)
	webIP := netip.MustParseAddr(web.ip)

	if _, err := c.Session().Destroy(old, nil); err != nil {
		t.Fatalf("destroy session: %v", err)
	}
	destroyed := time.Now()
	// Poll A's map every 10 ms and Consul every 100 ms.
	var goneOnA, backOnA, back time.Duration
	keysBack := func() bool {
		for _, k := range keys {
			p, _, err := c.KV().Get(k, nil)
			if err != nil || p == nil || p.Session == "" || p.Session == old {
				return false
			}
		}
		return true
	}
	for i := 0; back == 0 || (goneOnA != 0 && backOnA == 0); i++ {
		el := time.Since(destroyed)
		if el > 150*time.Second {
			t.Fatalf("%s's keys not back (%v) or its endpoint not back in %s's rw_ipcache (left at %s) 150 s after the session was destroyed",
				b.name, back != 0, a.name, goneOnA)
		}
		in := hasIP(m, webIP)
		if goneOnA == 0 && !in {
			goneOnA = max(el, time.Millisecond)
		}
		if goneOnA != 0 && backOnA == 0 && in {
			backOnA = el
		}
		if back == 0 && i%10 == 0 && keysBack() {
			back = time.Since(destroyed)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("SESSION LOSS: %s's keys back under a new session %s after the destroy", b.name, back.Truncate(10*time.Millisecond))
	if goneOnA != 0 {
		t.Logf("SESSION LOSS: %s's endpoint left %s's rw_ipcache %s after the destroy and came back at %s",
			b.name, a.name, goneOnA.Truncate(10*time.Millisecond), backOnA.Truncate(10*time.Millisecond))
	}
	if !b.running() || !a.running() {
		t.Fatal("an agent exited after the session loss")
	}
	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Fatalf("client -> web not allowed %s after the session came back", d)
	}
}
