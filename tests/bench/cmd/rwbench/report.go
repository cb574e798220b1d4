package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// test is one load of the traffic benchmark and its goal for c/a.
type test struct {
	kind     string
	label    string
	unit     string  // of the printed rate
	scale    float64 // rate / scale is printed
	cpuUnit  string  // of the printed CPU cost
	cpuScale float64 // ns per op (per byte for a stream) / cpuScale is printed
	goal     float64 // c/a must be at least this
}

var tests = []test{
	{kindRR, "request/response (1 B, 1 conn)", "trans/s", 1, "us/trans", 1e3, 0.97},
	{kindCRR, "connect/request/close", "conn/s", 1, "us/conn", 1e3, 0.95},
	{kindStream, "TCP stream", "Gbit/s", 1e9, "ms/GB", 1e-3, 0.98},
}

var modeLabels = map[mode]string{
	modeNone: "a: none", modeRedirect: "b: redirect", modeHost: "c: host", modeOpen: "d: allow-all", modeNFT: "n: nftables",
	modeFast: "f: bpf-route",
}

// fastGoals are issue 16's goals for f/a (eBPF host routing against no
// program, cross-host) by test kind.
var fastGoals = map[string]float64{kindRR: 0.97, kindCRR: 0.95, kindStream: 1.00}

// quantile q (0..1) of xs, interpolating between neighbours; 0 for none.
func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	pos := q * float64(len(s)-1)
	i := int(pos)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}

// median of xs (the mean of the middle two for an even count); 0 for none.
func median(xs []float64) float64 { return quantile(xs, 0.5) }

// series are the rates of one test in one configuration and the CPU time
// per operation; index i is round i.
type series struct {
	rate, cpu []float64
}

// results: pair name -> test kind -> mode.
type results map[string]map[string]map[mode]*series

func (r results) add(pair, kind string, m mode, rate, cpu float64) {
	if r[pair] == nil {
		r[pair] = map[string]map[mode]*series{}
	}
	if r[pair][kind] == nil {
		r[pair][kind] = map[mode]*series{}
	}
	s := r[pair][kind][m]
	if s == nil {
		s = &series{}
		r[pair][kind][m] = s
	}
	s.rate = append(s.rate, rate)
	s.cpu = append(s.cpu, cpu)
}

// ratio compares two series of one test: x over y.
type ratio struct{ x, y *series }

// median is median(x)/median(y); 0 when either is missing.
func (r ratio) median() float64 {
	if r.x == nil || r.y == nil || median(r.y.rate) == 0 {
		return 0
	}
	return median(r.x.rate) / median(r.y.rate)
}

// perRound are the ratios x[i]/y[i] of the rounds.
func (r ratio) perRound() []float64 {
	if r.x == nil || r.y == nil {
		return nil
	}
	var rs []float64
	for i := range min(len(r.x.rate), len(r.y.rate)) {
		if r.y.rate[i] > 0 {
			rs = append(rs, r.x.rate[i]/r.y.rate[i])
		}
	}
	return rs
}

// paired is the median of the per-round ratios: less sensitive to a
// machine that gets slower or faster during the run.
func (r ratio) paired() float64 { return median(r.perRound()) }

// cpu is the median CPU cost of y over that of x: what x/y of the rate
// would be if the load were bound by its own CPU time alone.
func (r ratio) cpu() float64 {
	if r.x == nil || r.y == nil || median(r.x.cpu) == 0 {
		return 0
	}
	return median(r.y.cpu) / median(r.x.cpu)
}

// group is a pair and the modes measured on it.
type group struct {
	pair  *pair
	modes []mode
}

func (g group) has(m mode) bool { return slices.Contains(g.modes, m) }

// the ratios printed, where both modes were measured
var ratioNames = [][2]mode{
	{modeRedirect, modeNone}, {modeHost, modeNone}, {modeOpen, modeNone}, {modeHost, modeOpen}, {modeHost, modeNFT},
	{modeFast, modeNone}, {modeFast, modeHost},
}

func fmtRate(r, scale float64) string {
	if scale != 1 {
		return fmt.Sprintf("%.2f", r/scale)
	}
	return fmt.Sprintf("%.0f", r)
}

// verdict says whether ratio meets an "at least goal" goal.
func verdict(ratio, goal float64) string {
	if ratio >= goal {
		return "met"
	}
	return "NOT MET"
}

// report writes, per pair, the medians of every configuration side by
// side, the CPU cost per operation, the ratios, and one line per goal.
func report(w io.Writer, res results, groups []group) {
	for _, g := range groups {
		byKind := res[g.pair.name]
		fmt.Fprintf(w, "%s (medians)\n%-31s", g.pair.name, "test")
		for _, m := range g.modes {
			fmt.Fprintf(w, " %13s", modeLabels[m])
		}
		fmt.Fprintln(w, "  unit")
		for _, t := range tests {
			fmt.Fprintf(w, "%-31s", t.label)
			for _, m := range g.modes {
				fmt.Fprintf(w, " %13s", fmtRate(median(byKind[t.kind][m].rateOrNil()), t.scale))
			}
			fmt.Fprintf(w, "  %s\n%-31s", t.unit, "  CPU per op, client+server")
			for _, m := range g.modes {
				fmt.Fprintf(w, " %13.2f", median(byKind[t.kind][m].cpuOrNil())/t.cpuScale)
			}
			fmt.Fprintf(w, "  %s\n", t.cpuUnit)
		}
		fmt.Fprintf(w, "%-31s", "ratios: median/median (paired)")
		var names [][2]mode
		for _, n := range ratioNames {
			if g.has(n[0]) && g.has(n[1]) {
				names = append(names, n)
				fmt.Fprintf(w, " %15s", fmt.Sprintf("%s/%s", n[0], n[1]))
			}
		}
		fmt.Fprintln(w)
		for _, t := range tests {
			fmt.Fprintf(w, "%-31s", t.label)
			for _, n := range names {
				r := ratio{byKind[t.kind][n[0]], byKind[t.kind][n[1]]}
				fmt.Fprintf(w, " %15s", fmt.Sprintf("%.3f (%.3f)", r.median(), r.paired()))
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}
	for _, g := range groups {
		byKind := res[g.pair.name]
		for _, t := range tests {
			r := ratio{byKind[t.kind][modeHost], byKind[t.kind][modeNone]}
			pr := r.perRound()
			v := r.median()
			fmt.Fprintf(w, "goal %-10s %-31s c/a >= %.2f: %-7s (%.3f; paired %.3f, IQR %.2f-%.2f; CPU cost a/c %.3f)\n",
				g.pair.name, t.label, t.goal, verdict(v, t.goal), v, r.paired(), quantile(pr, 0.25), quantile(pr, 0.75), r.cpu())
			fmt.Fprintf(w, "     c/a per round: %s\n", perRoundLine(r))
			if v < t.goal && g.has(modeOpen) {
				// c/a = c/d (the policy lookup) x d/a (the programs without policy).
				cd := ratio{byKind[t.kind][modeHost], byKind[t.kind][modeOpen]}.median()
				da := ratio{byKind[t.kind][modeOpen], byKind[t.kind][modeNone]}.median()
				fmt.Fprintf(w, "     where it goes: c/d %.3f (policy lookup, 10,000 entries) x d/a %.3f (programs, CT, no policy)\n", cd, da)
			}
		}
		if g.has(modeFast) {
			for _, t := range tests {
				r := ratio{byKind[t.kind][modeFast], byKind[t.kind][modeNone]}
				pr := r.perRound()
				v := r.median()
				fmt.Fprintf(w, "goal %-10s %-31s f/a >= %.2f: %-7s (%.3f; paired %.3f, IQR %.2f-%.2f; CPU cost a/f %.3f)\n",
					g.pair.name, t.label, fastGoals[t.kind], verdict(v, fastGoals[t.kind]), v, r.paired(), quantile(pr, 0.25), quantile(pr, 0.75), r.cpu())
				fmt.Fprintf(w, "     f/a per round: %s\n", perRoundLine(r))
			}
		}
		if g.has(modeNFT) {
			t := tests[1]
			r := ratio{byKind[t.kind][modeHost], byKind[t.kind][modeNFT]}
			v := r.median()
			fmt.Fprintf(w, "goal %-10s %-31s c/n >  1.00: %-7s (%.3f; paired %.3f): rackwire ahead of nftables sets\n",
				g.pair.name, t.label, verdict(v, 1.0000001), v, r.paired())
		}
	}
}

func (s *series) rateOrNil() []float64 {
	if s == nil {
		return nil
	}
	return s.rate
}

func (s *series) cpuOrNil() []float64 {
	if s == nil {
		return nil
	}
	return s.cpu
}

// perRoundLine is the per-round ratios x/y of one test, for -v.
func perRoundLine(r ratio) string {
	var rs []string
	for _, v := range r.perRound() {
		rs = append(rs, fmt.Sprintf("%.2f", v))
	}
	return strings.Join(rs, " ")
}
