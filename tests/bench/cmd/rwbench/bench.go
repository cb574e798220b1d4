package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/daemon/datapath"
)

// Bounds of one client run besides its duration.
const (
	maxRR  = 5_000_000
	maxCRR = 200_000
)

// config is one measured configuration: a pair in a mode.
type config struct {
	pair *pair
	mode mode
}

func (c config) key() string { return c.pair.name + "/" + string(c.mode) }

// probeWant is what a connect to the denied port must do in mode m:
// dropped (timeout) where something enforces, refused by the server's
// stack where nothing does.
func probeWant(m mode) string {
	switch m {
	case modeRedirect, modeHost, modeNFT, modeFast:
		return "timeout"
	}
	return "refused"
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	rounds := fs.Int("rounds", 11, "rounds (medians over these); at least 3")
	dur := fs.Duration("dur", time.Second, "duration of each measurement")
	quick := fs.Bool("quick", false, "a short run while developing: 3 rounds of 200ms (overrides -rounds and -dur)")
	attach := fs.String("attach", datapath.AttachAuto, "attach mode: auto, tcx or tc")
	verbose := fs.Bool("v", false, "log the datapath and endpoint steps")
	profile := fs.String("profile", "", "after the rounds, record `perf record -a -g` of cross-host request/response and connect/request/close in each cross-host mode into this directory")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if *quick {
		*rounds, *dur = 3, 200*time.Millisecond
	}
	if *rounds < 3 || *dur < 100*time.Millisecond || *dur > time.Minute {
		return fmt.Errorf("%w: want -rounds >= 3 and 100ms <= -dur <= 1m", errUsage)
	}
	if os.Geteuid() != 0 {
		return errors.New("the benchmark creates namespaces and loads BPF programs: run it as root")
	}
	log := newLogger(stderr, *verbose)

	start := time.Now()
	t, err := newTopo(ctx, log, *attach)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := t.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	local := []mode{modeNone, modeRedirect, modeHost, modeOpen, modeNFT}
	if !t.redirect {
		local = []mode{modeNone, modeHost, modeOpen, modeNFT}
	}
	cross := []mode{modeNone, modeFast, modeHost}
	if !t.fast {
		cross = []mode{modeNone, modeHost}
	}
	groups := []group{
		{pair: t.local, modes: local},
		{pair: t.cross, modes: cross},
	}
	fmt.Fprintf(stdout, "rackwire datapath benchmark: %d rounds, %v per measurement; per test and round every configuration back to back, the order rotating\n", *rounds, *dur)
	fmt.Fprintf(stdout, "local: client %s -> server %s:%d through one host namespace (%s attach)\n",
		t.local.client.ep.IPv4, t.local.server.ep.IPv4, benchPort, t.dps[0].Features().AttachMode)
	fmt.Fprintf(stdout, "  a: no program, veth + routing\n")
	if t.redirect {
		fmt.Fprintf(stdout, "  b: rackwire with policy, local delivery by bpf_redirect_peer (host stack skipped)\n")
	} else {
		fmt.Fprintf(stdout, "  b: not measured: the kernel has no bpf_redirect_peer\n")
	}
	fmt.Fprintf(stdout, "  c: rackwire with policy, delivery through the host stack (NoRedirectPeer)\n")
	fmt.Fprintf(stdout, "  d: rackwire, no policy (both endpoints open), host stack\n")
	fmt.Fprintf(stdout, "  n: no program; nftables in the host: ct established accept, then a set of %d (address . port) elements\n", fillers*fillerPorts+1)
	fmt.Fprintf(stdout, "  policy (b, c): %d entries on the server (%d identities x %d ports, the client's entry, egress open); %d extra identities in the ipcache\n",
		len(t.local.policy), fillers, fillerPorts, fillers)
	fmt.Fprintf(stdout, "cross-host: client %s on host A -> router namespace -> server %s on host B, one datapath per host\n",
		t.cross.client.ep.IPv4, t.cross.server.ep.IPv4)
	fmt.Fprintf(stdout, "  a: no program; c: rackwire with the same policy, host stack (host_routing = legacy)\n")
	if t.fast {
		fmt.Fprintf(stdout, "  f: rackwire with the same policy, eBPF host routing (bpf_fib_lookup, kept per flow, + bpf_redirect out; rw_from_uplink + bpf_redirect_peer in)\n\n")
	} else {
		fmt.Fprintf(stdout, "  f: not measured: the kernel lacks eBPF host routing (5.12+)\n\n")
	}

	// The figures are only worth something if what should enforce does.
	for _, g := range groups {
		for _, m := range g.modes {
			if err := g.pair.setMode(m); err != nil {
				return err
			}
			r, err := g.pair.load(ctx, kindProbe, deniedPort, 300*time.Millisecond, 1)
			if err != nil {
				return err
			}
			if want := probeWant(m); r.Probe != want {
				return fmt.Errorf("%s, mode %s: a connect to port %d (no entry allows it): %s, want %s", g.pair.name, m, deniedPort, r.Probe, want)
			}
		}
	}

	// Warm-up (discarded): CT and neighbour entries, the load processes' heaps.
	for _, g := range groups {
		for _, m := range g.modes {
			if err := g.pair.setMode(m); err != nil {
				return err
			}
			for _, tc := range tests {
				if _, err := g.pair.load(ctx, tc.kind, benchPort, *dur/5, maxCRR); err != nil {
					return err
				}
			}
		}
	}

	res := results{}
	flows := map[string][2]uint64{} // config key: new flows, connections (crr)
	for round := range *rounds {
		for i, tc := range tests {
			for _, g := range groups {
				for j := range g.modes {
					m := g.modes[(j+round+i)%len(g.modes)]
					if err := g.pair.setMode(m); err != nil {
						return err
					}
					r, cpu, newFlows, counted, err := g.pair.measure(ctx, tc.kind, *dur)
					if err != nil {
						return err
					}
					res.add(g.pair.name, tc.kind, m, r.rate(), cpu)
					if tc.kind == kindCRR && counted {
						k := config{g.pair, m}.key()
						f := flows[k]
						flows[k] = [2]uint64{f[0] + newFlows, f[1] + uint64(r.Ops+r.Errors)}
					}
				}
			}
		}
		fmt.Fprintf(stderr, "round %d/%d done\n", round+1, *rounds)
	}
	report(stdout, res, groups)
	fmt.Fprintln(stdout)
	if t.fast {
		for _, s := range []*side{&t.cross.client, &t.cross.server} {
			cs, err := s.dps[modeFast].HostRoutingCounters()
			if err != nil {
				return err
			}
			var parts []string
			for _, c := range cs {
				if c.Packets > 0 {
					parts = append(parts, fmt.Sprintf("%s %d", c.Name, c.Packets))
				}
			}
			fmt.Fprintf(stdout, "cross-host f, host of %s: rw_hostrt packets: %s\n", s.ep.Name, strings.Join(parts, ", "))
		}
	}
	if *profile != "" {
		if err := profileCross(ctx, t, groups[1].modes, *profile, stdout); err != nil {
			return err
		}
	}
	for _, g := range groups {
		for _, m := range g.modes {
			k := config{g.pair, m}.key()
			if f := flows[k]; f[1] > 0 {
				fmt.Fprintf(stdout, "connect/request/close, %s: %d of %d connections (%.1f%%) were new flows decided by the policy lookup; the others reused a client port whose closed CT entry had not aged out (CT hits)\n",
					k, f[0], f[1], 100*float64(f[0])/float64(f[1]))
			}
		}
	}
	fmt.Fprintf(stdout, "traffic benchmark took %v\n", time.Since(start).Round(time.Second))
	return nil
}

// measure runs one load against the bench port and returns it with the
// CPU time client and server used per operation (per byte for a stream);
// where a policy is in force it also returns how many packets the policy
// lookup decided meanwhile (the bench entry's counter: new flows).
func (p *pair) measure(ctx context.Context, kind string, dur time.Duration) (r result, cpuPerOp float64, newFlows uint64, counted bool, err error) {
	maxOps := int64(maxRR)
	if kind == kindCRR {
		maxOps = maxCRR
	}
	before, counted, err := p.allowedPackets()
	if err != nil {
		return r, 0, 0, false, err
	}
	cpu0, err := p.cpuTime()
	if err != nil {
		return r, 0, 0, false, err
	}
	if r, err = p.load(ctx, kind, benchPort, dur, maxOps); err != nil {
		return r, 0, 0, false, err
	}
	cpu1, err := p.cpuTime()
	if err != nil {
		return r, 0, 0, false, err
	}
	n := float64(r.Ops)
	if kind == kindStream {
		n = float64(r.Bytes)
	}
	if n > 0 {
		cpuPerOp = (cpu1 - cpu0) / n
	}
	if counted {
		after, _, err := p.allowedPackets()
		if err != nil {
			return r, 0, 0, false, err
		}
		newFlows = after - before
	}
	return r, cpuPerOp, newFlows, counted, nil
}

// profileCross records a system-wide perf profile (call graphs) while the
// cross-host pair runs request/response, then connect/request/close, for
// 5 s in each mode, one file per test and mode (DIR/cross-KIND-MODE.data),
// and the CPU cost per transaction (connection) of that run, for
// `perf report --no-children --sort sym -i FILE`.
func profileCross(ctx context.Context, t *topo, modes []mode, dir string, stdout io.Writer) error {
	if _, err := exec.LookPath("perf"); err != nil {
		return fmt.Errorf("-profile needs perf (apt-get install linux-perf): %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	const d = 5 * time.Second
	// The kernel's run time of each program (BPF_ENABLE_STATS), for the
	// programs' share of the transaction in the real path.
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return fmt.Errorf("enable BPF run time statistics: %w", err)
	}
	defer stats.Close()
	for _, kind := range []string{kindRR, kindCRR} {
		for _, m := range modes {
			if err := profileOne(ctx, t, kind, m, d, dir, stdout); err != nil {
				return err
			}
		}
	}
	return nil
}

// profileOne is one profiled run of profileCross: test kind in mode m.
func profileOne(ctx context.Context, t *topo, kind string, m mode, d time.Duration, dir string, stdout io.Writer) error {
	if err := t.cross.setMode(m); err != nil {
		return err
	}
	before, err := t.cross.programStats(m)
	if err != nil {
		return err
	}
	out := filepath.Join(dir, fmt.Sprintf("cross-%s-%s.data", kind, m))
	rec := exec.CommandContext(ctx, "perf", "record", "-a", "-g", "-q", "-o", out, "--", "sleep", fmt.Sprint(d.Seconds()+1))
	if err := rec.Start(); err != nil {
		return fmt.Errorf("perf record: %w", err)
	}
	time.Sleep(500 * time.Millisecond)
	r, cpu, _, _, err := t.cross.measure(ctx, kind, d)
	if werr := rec.Wait(); werr != nil && err == nil {
		err = fmt.Errorf("perf record: %w", werr)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "profile cross-host %s %s: %.0f ops/s, %.2f us CPU per op (client+server) -> %s\n", kind, modeLabels[m], r.rate(), cpu/1e3, out)
	after, err := t.cross.programStats(m)
	if err != nil {
		return err
	}
	var total time.Duration
	for _, k := range slices.Sorted(maps.Keys(after)) {
		runs := after[k].RunCount - before[k].RunCount
		rt := after[k].Runtime - before[k].Runtime
		if runs == 0 || r.Ops == 0 {
			continue
		}
		total += rt
		fmt.Fprintf(stdout, "  %-28s %.2f runs per op, %4.0f ns per run, %.2f us per op\n",
			k, float64(runs)/float64(r.Ops), float64(rt.Nanoseconds())/float64(runs), float64(rt.Nanoseconds())/float64(r.Ops)/1e3)
	}
	if r.Ops > 0 {
		fmt.Fprintf(stdout, "  BPF programs in total: %.2f us per op\n", float64(total.Nanoseconds())/float64(r.Ops)/1e3)
	}
	return nil
}

// programStats sums the run statistics of the programs of the datapaths
// the pair's sides use in mode m, by "side/program".
func (p *pair) programStats(m mode) (map[string]ebpf.ProgramStats, error) {
	out := map[string]ebpf.ProgramStats{}
	for _, s := range []*side{&p.client, &p.server} {
		d := s.dps[m]
		if d == nil {
			continue
		}
		st, err := d.ProgramStats()
		if err != nil {
			return nil, err
		}
		for k, v := range st {
			out[s.ep.Name+"/"+k] = v
		}
	}
	return out, nil
}
