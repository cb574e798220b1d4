package datapath

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/internal/testenv"
)

// xlated returns the program as the kernel kept it after verification
// (bpftool names the helpers each call resolves to).
func xlated(t *testing.T, p *ebpf.Program) string {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("program has no id")
	}
	out, err := exec.Command("bpftool", "prog", "dump", "xlated", "id", fmt.Sprint(id)).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool prog dump xlated: %v\n%s", err, out)
	}
	return string(out)
}

// closedEndpointEvents sets up the test endpoint with nothing allowed and
// reads its events until the test ends.
func closedEndpointEvents(t *testing.T, d *Datapath) <-chan Event {
	t.Helper()
	setupEndpoint(t, d, false)
	if err := d.SetPolicy(epID, nil); err != nil {
		t.Fatal(err)
	}
	events, err := d.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return events
}

// TestEventTransports: in both transports the same drop decodes to the
// same event, Features reports the transport and why, and the program the
// kernel kept calls only its own transport's helper: in perf mode the
// verifier removed the ring buffer branch, so a kernel without ring
// buffers (before 5.8) never resolves bpf_ringbuf_output.
func TestEventTransports(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "bpftool")
	got := map[string]Event{}
	for _, mode := range []string{EventsRingBuf, EventsPerf} {
		t.Run(mode, func(t *testing.T) {
			d := openTest(t, Options{Events: mode})
			f := d.Features()
			if f.Events != mode || !strings.Contains(f.EventsWhy, `events = "`+mode+`"`) {
				t.Errorf("Features() events = %q (%q), want %s forced by the config", f.Events, f.EventsWhy, mode)
			}
			for _, p := range []*ebpf.Program{d.from, d.to} {
				x := xlated(t, p)
				ring := strings.Contains(x, "bpf_ringbuf_")
				perf := strings.Contains(x, "event_output")
				if mode == EventsPerf && (ring || !perf) {
					t.Errorf("perf mode: program calls ring buffer helpers %v, perf output %v; want only perf", ring, perf)
				}
				if mode == EventsRingBuf && (!ring || perf) {
					t.Errorf("ringbuf mode: program calls ring buffer helpers %v, perf output %v; want only ring buffer", ring, perf)
				}
			}
			info, err := d.maps["rw_events"].Info()
			if err != nil {
				t.Fatal(err)
			}
			wantType := map[string]ebpf.MapType{EventsRingBuf: ebpf.RingBuf, EventsPerf: ebpf.PerfEventArray}[mode]
			if info.Type != wantType {
				t.Errorf("rw_events is a %v, want %v", info.Type, wantType)
			}
			events := closedEndpointEvents(t, d)
			for _, p := range []pkt{in(peerV6, protoUDP, 53), out(netV4, protoTCP, 443)} {
				prog := d.to
				if p.src == epV4 {
					prog = d.from
				}
				if r := run(t, prog, p); r != dropRet {
					t.Fatalf("run = %#x, want drop", r)
				}
				select {
				case ev := <-events:
					ev.Time = time.Time{}
					got[fmt.Sprintf("%s %v", p.dst, p.dport)+" "+mode] = ev
				case <-time.After(3 * time.Second):
					t.Fatalf("%s: no event for %v", mode, p)
				}
			}
		})
	}
	for _, k := range []string{"fd77::1 53", "10.78.1.1 443"} {
		r, p := got[k+" "+EventsRingBuf], got[k+" "+EventsPerf]
		if r != p || r.Endpoint != epID || r.Verdict != Dropped {
			t.Errorf("%s: ringbuf event %+v, perf event %+v; want the same drop of endpoint %d", k, r, p, epID)
		}
	}
}

// TestEventTransportSwitch: one pin directory opened in one transport and
// then the other never meets a pinned map of the wrong type, and only the
// transport in force stays pinned.
func TestEventTransportSwitch(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testPinDir(t)
	for _, mode := range []string{EventsRingBuf, EventsPerf, EventsRingBuf} {
		d := openTest(t, Options{PinDir: dir, Events: mode})
		other := perfPinName
		if mode == EventsPerf {
			other = "rw_events"
		}
		if _, err := ebpf.LoadPinnedMap(dir+"/"+other, nil); err == nil {
			t.Errorf("%s: the other transport's map %s is still pinned", mode, other)
		}
		if _, err := ebpf.LoadPinnedMap(dir+"/"+d.pinName("rw_events"), nil); err != nil {
			t.Errorf("%s: the event map is not pinned: %v", mode, err)
		}
		d.Close()
	}
}

func TestChooseEvents(t *testing.T) {
	for _, c := range []struct {
		mode     string
		ringbuf  bool
		want     string
		wantFail bool
	}{
		{EventsAuto, true, EventsRingBuf, false},
		{EventsAuto, false, EventsPerf, false},
		{EventsRingBuf, true, EventsRingBuf, false},
		{EventsRingBuf, false, "", true},
		{EventsPerf, true, EventsPerf, false},
		{EventsPerf, false, EventsPerf, false},
		{"ring", true, "", true},
	} {
		got, why, err := chooseEvents(c.mode, c.ringbuf)
		if (err != nil) != c.wantFail || got != c.want {
			t.Errorf("chooseEvents(%q, %v) = %q, %v; want %q, failure %v", c.mode, c.ringbuf, got, err, c.want, c.wantFail)
		}
		if err == nil && why == "" {
			t.Errorf("chooseEvents(%q, %v) gives no reason", c.mode, c.ringbuf)
		}
	}
}

// TestEventRateLimit runs a burst of denied packets through the program:
// one endpoint's events stop at its bucket, the rest are counted as
// suppressed, the packets are all dropped exactly as without a limit, and
// a second endpoint keeps its own budget.
func TestEventRateLimit(t *testing.T) {
	testenv.RequireRoot(t)
	for _, mode := range []string{EventsRingBuf, EventsPerf} {
		t.Run(mode, func(t *testing.T) {
			const rate, burst, n = 10, 20, 2000
			d := openTest(t, Options{Events: mode, EventRate: rate, EventBurst: burst})
			events := closedEndpointEvents(t, d)
			start := time.Now()
			p := out(peerV4, protoUDP, 53)
			for i := range n {
				p.sport = uint16(1000 + i)
				if r := run(t, d.from, p); r != dropRet {
					t.Fatalf("packet %d = %#x, want drop: the limiter must not change verdicts", i, r)
				}
			}
			elapsed := time.Since(start)
			// An unknown source on the same veth: endpoint 0's own bucket.
			spoof := pkt{src: netip.MustParseAddr("10.99.0.9"), dst: peerV4, proto: protoUDP, sport: 1, dport: 53}
			if r := run(t, d.from, spoof); r != dropRet {
				t.Fatalf("spoofed packet = %#x, want drop", r)
			}
			seen := map[uint16]int{}
			timeout := time.After(2 * time.Second)
		read:
			for {
				select {
				case ev := <-events:
					seen[ev.Endpoint]++
				case <-timeout:
					break read
				}
			}
			bound := burst + int(rate*elapsed.Seconds()) + 1
			if seen[epID] > bound || seen[epID] < burst {
				t.Errorf("%d events of endpoint %d for %d drops in %s; want %d..%d (burst %d, %d/s)",
					seen[epID], epID, n, elapsed, burst, bound, burst, rate)
			}
			if seen[0] != 1 {
				t.Errorf("%d events of endpoint 0 (no endpoint), want 1: its budget is its own", seen[0])
			}
			counts, err := d.EventCounts()
			if err != nil {
				t.Fatal(err)
			}
			byEP := map[uint16]EventCount{}
			for _, c := range counts {
				byEP[c.Endpoint] = c
			}
			c := byEP[epID]
			if c.Reported != uint64(seen[epID]) || c.Reported+c.Suppressed+c.Lost != n || c.Lost != 0 {
				t.Errorf("counts of endpoint %d = %+v, seen %d; want reported = seen, reported+suppressed = %d, none lost",
					epID, c, seen[epID], n)
			}
			t.Logf("%s: %d drops in %s: %d events, %d suppressed", mode, n, elapsed, c.Reported, c.Suppressed)
		})
	}
}
