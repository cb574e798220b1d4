package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/rackwire/rackwire/daemon/datapath"
)

// Bounds of one client run besides its duration.
const (
	maxRR  = 5_000_000
	maxCRR = 200_000
)

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	rounds := fs.Int("rounds", 15, "a/b rounds (medians over these); at least 3")
	dur := fs.Duration("dur", time.Second, "duration of each measurement")
	attach := fs.String("attach", datapath.AttachAuto, "attach mode: auto, tcx or tc")
	verbose := fs.Bool("v", false, "log the datapath and endpoint steps")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
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
	fmt.Fprintf(stdout, "rackwire datapath benchmark: %d rounds, %v per measurement, a and b back to back per test, alternating which goes first\n", *rounds, *dur)
	fmt.Fprintf(stdout, "  a: veth + routing through a host namespace, no program attached\n")
	fmt.Fprintf(stdout, "  b: rackwire (%s) on both veths, 1,000 extra identities in the ipcache, %d policy entries on the server\n",
		t.d.Features().AttachMode, t.policyEntries())
	fmt.Fprintf(stdout, "  client %s (identity %d) -> server %s:%d (identity %d)\n\n",
		t.client.IPv4, t.client.Identity, t.server.IPv4, benchPort, t.server.Identity)

	// The benchmark is only worth its figures if b enforces: a port no
	// entry allows must be dropped in b and refused by the stack in a.
	for _, on := range []bool{true, false} {
		if err := t.setAttached(on); err != nil {
			return err
		}
		r, err := t.load(ctx, kindProbe, deniedPort, 300*time.Millisecond, 1)
		if err != nil {
			return err
		}
		want := map[bool]string{true: "timeout", false: "refused"}[on]
		if r.Probe != want {
			return fmt.Errorf("probe of port %d with rackwire attached=%v: %s, want %s", deniedPort, on, r.Probe, want)
		}
	}

	// Warm-up (discarded): CT and neighbour entries, the load processes' heaps.
	for _, on := range []bool{false, true} {
		if err := t.setAttached(on); err != nil {
			return err
		}
		for _, tc := range tests {
			if _, err := t.load(ctx, tc.kind, benchPort, *dur/5, maxCRR); err != nil {
				return err
			}
		}
	}

	res := map[string]*samples{}
	for _, tc := range tests {
		res[tc.kind] = &samples{}
	}
	// Each test measures a and b back to back, in the order a b, then b a
	// in the next round: a machine that drifts during the run shifts both
	// alike.
	var flows, conns uint64
	for round := range *rounds {
		for i, tc := range tests {
			order := []bool{false, true}
			if (round+i)%2 == 1 {
				order = []bool{true, false}
			}
			for _, on := range order {
				if err := t.setAttached(on); err != nil {
					return err
				}
				r, cpu, newFlows, err := t.measure(ctx, tc.kind, *dur)
				if err != nil {
					return err
				}
				s := res[tc.kind]
				if !on {
					s.a = append(s.a, r.rate())
					s.cpuA = append(s.cpuA, cpu)
					continue
				}
				s.b = append(s.b, r.rate())
				s.cpuB = append(s.cpuB, cpu)
				if tc.kind == kindCRR {
					flows += newFlows
					conns += uint64(r.Ops + r.Errors)
				}
			}
		}
		fmt.Fprintf(stderr, "round %d/%d done\n", round+1, *rounds)
	}
	report(stdout, res)
	if conns > 0 {
		fmt.Fprintf(stdout, "\nconnect/request/close in b: %d of %d connections (%.1f%%) were new flows decided by the policy lookup\n",
			flows, conns, 100*float64(flows)/float64(conns))
		if flows < conns {
			fmt.Fprintln(stdout, "(the others reused a client port whose closed CT entry had not aged out yet: CT hits)")
		}
	}
	fmt.Fprintf(stdout, "traffic benchmark took %v\n", time.Since(start).Round(time.Second))
	return nil
}

// measure runs one load against the bench port and returns it with the
// CPU time client and server used per operation (per byte for a stream);
// with rackwire attached it also returns how many packets the policy lookup
// decided meanwhile (the bench entry's counter: new flows).
func (t *topo) measure(ctx context.Context, kind string, dur time.Duration) (r result, cpuPerOp float64, newFlows uint64, err error) {
	maxOps := int64(maxRR)
	if kind == kindCRR {
		maxOps = maxCRR
	}
	var before uint64
	if t.attached {
		if before, err = t.allowedPackets(); err != nil {
			return r, 0, 0, err
		}
	}
	cpu0, err := t.cpuTime()
	if err != nil {
		return r, 0, 0, err
	}
	if r, err = t.load(ctx, kind, benchPort, dur, maxOps); err != nil {
		return r, 0, 0, err
	}
	cpu1, err := t.cpuTime()
	if err != nil {
		return r, 0, 0, err
	}
	n := float64(r.Ops)
	if kind == kindStream {
		n = float64(r.Bytes)
	}
	if n > 0 {
		cpuPerOp = (cpu1 - cpu0) / n
	}
	if t.attached {
		after, err := t.allowedPackets()
		if err != nil {
			return r, 0, 0, err
		}
		newFlows = after - before
	}
	return r, cpuPerOp, newFlows, nil
}
