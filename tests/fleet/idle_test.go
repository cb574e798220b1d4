//go:build rackwire_fleet

package fleet

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// TestFleetIdle measures what an idle agent costs: after cold convergence
// on RACKWIRE_FLEET_COLD entries, each agent's CPU over
// RACKWIRE_FLEET_IDLE (default 60s) as a share of one core, and its RSS.
// With a profiling build (GOFLAGS=-tags=rackwire_pprof) and
// RACKWIRE_FLEET_PPROF=dir it also saves the first agent's CPU profile
// over that time and its heap profile after it.
func TestFleetIdle(t *testing.T) {
	idle := time.Minute
	if s := os.Getenv("RACKWIRE_FLEET_IDLE"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 10*time.Second {
			t.Fatalf("RACKWIRE_FLEET_IDLE=%q: write a duration of at least 10s", s)
		}
		idle = d
	}
	f := newFleet(t, agentCount(t))
	f.seed(t)
	var boot sync.WaitGroup
	if dir := os.Getenv("RACKWIRE_FLEET_PPROF"); dir != "" {
		// The first agent's start: its CPU profile over its first 30 s.
		boot.Add(1)
		go func() {
			defer boot.Done()
			sock := filepath.Join(f.dir, f.agents[0].name, "pprof.sock") // writeConfig's a.dir
			for i := 0; i < 300; i++ {
				if _, err := os.Stat(sock); err == nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			pprofGet(t, sock, f.agents[0].name, "profile?seconds=30", filepath.Join(dir, "boot-cpu.pprof"))
		}()
	}
	f.boot(t, false)
	eps := f.allEndpoints()
	f.waitAll(t, 5*time.Minute, "cold convergence", f.converged(eps))
	f.resources(t, "after cold convergence")
	time.Sleep(10 * time.Second)
	boot.Wait()
	uptime(t, "idle start")

	var wg sync.WaitGroup
	if dir := os.Getenv("RACKWIRE_FLEET_PPROF"); dir != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pprofGet(t, filepath.Join(f.agents[0].dir, "pprof.sock"), f.agents[0].name, fmt.Sprintf("profile?seconds=%d", int(idle.Seconds())), filepath.Join(dir, "cpu.pprof"))
		}()
	}
	before := map[*agent]float64{}
	for _, a := range f.agents {
		_, _, c := procStat(a.pid())
		before[a] = c
	}
	start := time.Now()
	time.Sleep(idle)
	el := time.Since(start).Seconds()
	var pct, rss []float64
	for _, a := range f.agents {
		r, _, c := procStat(a.pid())
		pct = append(pct, (c-before[a])/el*100)
		rss = append(rss, float64(r)/1024)
	}
	wg.Wait()
	if dir := os.Getenv("RACKWIRE_FLEET_PPROF"); dir != "" {
		pprofGet(t, filepath.Join(f.agents[0].dir, "pprof.sock"), f.agents[0].name, "heap", filepath.Join(dir, "heap.pprof"))
	}
	slices.Sort(pct)
	slices.Sort(rss)
	sum := 0.0
	for _, p := range pct {
		sum += p
	}
	t.Logf("BENCH idle: %d agents, %d entries, over %s: CPU per agent median %.2f%% of a core, max %.2f%%, all agents %.1f%%; RSS median %.1f MB, max %.1f MB",
		len(f.agents), len(eps)+f.sim, idle, pct[len(pct)/2], pct[len(pct)-1], sum, rss[len(rss)/2], rss[len(rss)-1])
	uptime(t, "idle end")
	f.noExits(t)
}

// pprofGet saves one profile of a profiling build's agent to path.
func pprofGet(t *testing.T, sock, name, what, path string) {
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	resp, err := c.Get("http://rackwired/debug/pprof/" + what)
	if err != nil {
		t.Errorf("pprof %s of %s (is it a -tags rackwire_pprof build?): %v", what, name, err)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("pprof %s of %s: %s", what, name, resp.Status)
		return
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Error(err)
	}
	t.Logf("pprof %s of %s saved to %s (%s bytes)", what, name, path, strconv.Itoa(len(b)))
}
