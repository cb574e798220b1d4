package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

// scrape reads every sample of the agent's /metrics, keyed by series
// (name and labels as printed).
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		if strings.HasPrefix(line, "#") || i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read metrics: %v", err)
	}
	return out
}

// cpuTicks is the CPU time (user + system, clock ticks) process pid used.
func cpuTicks(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command (in parentheses): state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

// checkEventsTransport: `status --json` names the transport the agent's
// config asked for, and why.
func checkEventsTransport(t *testing.T, a *agent) string {
	t.Helper()
	var st api.Status
	a.rwJSON(&st, "status", "--json")
	want := eventsMode(t, a.opts)
	if want == "auto" {
		want = "perf"
		for _, f := range st.Kernel {
			if f.Name == "ringbuf" && f.Available {
				want = "ringbuf"
			}
		}
	}
	if got := st.Datapath.Detail["events"]; got != want || st.Datapath.Detail["events_why"] == "" {
		t.Errorf("status: events %q (%q), want %q with a reason", got, st.Datapath.Detail["events_why"], want)
	}
	return want
}

// TestEventFlood: one endpoint floods denied UDP (bounded: 3 s or 300,000
// datagrams). Its events stop at its rate limit (rate * duration + burst),
// another endpoint's drops during the flood are all still reported, the
// monitor says how many of the flooder's events were suppressed, and the
// accounting closes: events reported + suppressed + lost of the two
// endpoints = the egress policy drops the datapath counted. Every packet
// stays dropped. Runs in whichever transport the agent uses
// ($RACKWIRE_TEST_EVENTS=perf: the perf event array).
func TestEventFlood(t *testing.T) {
	require(t)
	const rate, burst = 50, 100
	a := newAgent(t, agentOpts{tag: "ev", cidrs: []string{"10.217.70.0/24"}, eventRate: rate, eventBurst: burst})
	transport := checkEventsTransport(t, a)
	maddr := a.enableMetrics(t)
	web := a.addEndpoint("web", "app=web")
	flood := a.addEndpoint("flood", "app=flood")
	quiet := a.addEndpoint("quiet", "app=quiet")
	servers(t, web.ns, web.IPv4, 8080)
	for _, app := range []string{"flood", "quiet"} {
		a.importPolicy(t, "rwg-ev-"+app, cnp("rwg-ev-"+app, app, `  egress:
    - toEndpoints: [{matchLabels: {app: web}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
`))
	}
	a.waitPolicies(t, "rwg-ev-flood", "rwg-ev-quiet")
	mustPass(t, "flood->web tcp/8080 (allowed)", tcpReq(flood.ns, addr(web, 8080), okTimeout))
	mustFail(t, "flood->web udp/8080 (denied)", udpReq(flood.ns, addr(web, 8080), dropTimeout))
	mon := a.startMonitor("")
	time.Sleep(1500 * time.Millisecond) // one notice interval: the baseline is read
	before := scrape(t, maddr)

	var conn net.Conn
	if err := inNetns(flood.ns, func() error {
		var err error
		conn, err = net.Dial("udp", addr(web, 9999))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	a.mu.Lock()
	pid := a.cmd.Process.Pid
	a.mu.Unlock()
	cpu0 := cpuTicks(t, pid)

	// The quiet endpoint's ten drops, in the middle of the flood; each is
	// sent again (up to 20 times) until its event is seen, since a flooded
	// CPU's backlog may drop a datagram before the program sees it.
	quietSeen := map[string]bool{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(500 * time.Millisecond)
		for port := 9001; port <= 9010; port++ {
			dst := addr(web, port)
			for try := 0; try < 20 && !mon.has(func(ev api.Event) bool {
				return ev.Type == "drop" && ev.EndpointName == "quiet" && ev.Dst == dst
			}); try++ {
				_ = udpSend(quiet.ns, dst)
				time.Sleep(50 * time.Millisecond)
			}
		}
	}()
	start := time.Now()
	payload := []byte("rwg-flood")
	sent := 0
	for sent < 300000 && time.Since(start) < 3*time.Second {
		if _, err := conn.Write(payload); err == nil {
			sent++
		}
	}
	dur := time.Since(start)
	cpu := float64(cpuTicks(t, pid)-cpu0) / 100 // USER_HZ
	wg.Wait()
	time.Sleep(2500 * time.Millisecond) // the monitor catches up; two notice intervals

	after := scrape(t, maddr)
	delta := func(series string) float64 { return after[series] - before[series] }
	epSeries := func(name string, id uint16) string {
		return fmt.Sprintf("rackwire_events_%s_total{endpoint=\"%d\"}", name, id)
	}
	var floodEvents, quietEvents int
	var noticed uint64
	mon.mu.Lock()
	for _, ev := range mon.events {
		switch {
		case ev.Type == "drop" && ev.EndpointName == "flood":
			floodEvents++
		case ev.Type == "drop" && ev.EndpointName == "quiet":
			quietEvents++
			quietSeen[ev.Dst] = true
		case ev.Type == api.EventSuppressed && ev.EndpointName == "flood":
			noticed += ev.Suppressed
		}
	}
	mon.mu.Unlock()
	drops := delta(`rackwire_datapath_packets_total{direction="egress",reason="policy denied"}`)
	supp := delta(epSeries("suppressed", flood.ID))
	rep := delta(epSeries("reported", flood.ID))
	lost := delta(epSeries("lost", flood.ID))
	accounted := rep + supp + lost + delta(epSeries("reported", quiet.ID)) + delta(epSeries("suppressed", quiet.ID)) + delta(epSeries("lost", quiet.ID))
	t.Logf("%s: %d datagrams sent in %s; %.0f egress policy drops; flood: %d events seen, reported %.0f, suppressed %.0f, lost %.0f, monitor noticed %d suppressed; quiet: %d events; rackwired CPU %.2fs (%.0f%% of one core)",
		transport, sent, dur.Round(time.Millisecond), drops, floodEvents, rep, supp, lost, noticed, quietEvents, cpu, 100*cpu/dur.Seconds())

	if bound := rate*dur.Seconds() + burst + 1; float64(floodEvents) > bound {
		t.Errorf("%d events of the flooding endpoint in %s; want at most rate*duration+burst = %.0f", floodEvents, dur, bound)
	}
	if floodEvents < burst {
		t.Errorf("%d events of the flooding endpoint, want at least its burst (%d): the limit must not silence it", floodEvents, burst)
	}
	for port := 9001; port <= 9010; port++ {
		if !quietSeen[addr(web, port)] {
			t.Errorf("the other endpoint's drop to %s during the flood was not reported", addr(web, port))
		}
	}
	if supp < float64(sent)/2 {
		t.Errorf("suppressed counter of the flooding endpoint grew by %.0f for %d datagrams; want most of them", supp, sent)
	}
	if uint64(supp) != noticed {
		t.Errorf("monitor noticed %d suppressed events of the flooding endpoint, the counter says %.0f", noticed, supp)
	}
	if float64(floodEvents) != rep || lost != 0 {
		t.Errorf("monitor saw %d events of the flooding endpoint, counters: reported %.0f, lost %.0f; want every reported one seen, none lost", floodEvents, rep, lost)
	}
	if accounted != drops || drops < float64(sent)/2 {
		t.Errorf("events reported + suppressed + lost of both endpoints = %.0f, egress policy drops %.0f (sent %d); want equal", accounted, drops, sent)
	}
	mustFail(t, "flood->web udp/9999 after the flood (still denied)", udpReq(flood.ns, addr(web, 9999), dropTimeout))
}

// has reports whether the monitor has seen an event matching ok.
func (m *monitor) has(ok func(api.Event) bool) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ev := range m.events {
		if ok(ev) {
			return true
		}
	}
	return false
}

// udpSend sends one datagram from ns to dst without waiting for an answer.
func udpSend(ns, dst string) error {
	var c net.Conn
	if err := inNetns(ns, func() error {
		var err error
		c, err = net.Dial("udp", dst)
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	_, err := c.Write([]byte("rwg-quiet"))
	return err
}
