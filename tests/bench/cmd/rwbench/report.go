package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// test is one load of the traffic benchmark and its goal for b/a.
type test struct {
	kind     string
	label    string
	unit     string  // of the printed rate
	scale    float64 // rate / scale is printed
	cpuUnit  string  // of the printed CPU cost
	cpuScale float64 // ns per op (per byte for a stream) / cpuScale is printed
	goal     float64 // b/a must be at least this
}

var tests = []test{
	{kindRR, "request/response (1 B, 1 conn)", "trans/s", 1, "us/trans", 1e3, 0.97},
	{kindCRR, "connect/request/close", "conn/s", 1, "us/conn", 1e3, 0.95},
	{kindStream, "TCP stream", "Gbit/s", 1e9, "ms/GB", 1e-3, 0.98},
}

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

// samples are the rates of one test and the CPU time per operation:
// a[i] and b[i] were measured back to back in round i.
type samples struct {
	a, b       []float64
	cpuA, cpuB []float64
}

// ratio is median(b)/median(a); 0 when a has nothing.
func (s samples) ratio() float64 {
	ma := median(s.a)
	if ma == 0 {
		return 0
	}
	return median(s.b) / ma
}

// pairedRatio is the median of the per-round ratios b[i]/a[i]: less
// sensitive to a machine that gets slower or faster during the run.
func (s samples) pairedRatio() float64 { return median(s.perRound()) }

// perRound are the ratios b[i]/a[i].
func (s samples) perRound() []float64 {
	var rs []float64
	for i := range min(len(s.a), len(s.b)) {
		if s.a[i] > 0 {
			rs = append(rs, s.b[i]/s.a[i])
		}
	}
	return rs
}

// cpuRatio is median CPU cost of a over that of b: what b/a of the rate
// would be if the load were bound by its own CPU time alone. 0 when b has
// no cost figures.
func (s samples) cpuRatio() float64 {
	mb := median(s.cpuB)
	if mb == 0 {
		return 0
	}
	return median(s.cpuA) / mb
}

// verdict says whether ratio meets a "at least goal" goal.
func verdict(ratio, goal float64) string {
	if ratio >= goal {
		return "met"
	}
	return "not met"
}

func fmtRate(r, scale float64) string {
	if scale != 1 {
		return fmt.Sprintf("%.2f", r/scale)
	}
	return fmt.Sprintf("%.0f", r)
}

// report writes the table of medians and ratios, the per-round ratios and
// one line per goal.
func report(w io.Writer, res map[string]*samples) {
	fmt.Fprintf(w, "%-31s %13s %12s %-7s %6s %6s %-13s  %9s %9s %-8s %7s\n", "test (medians)", "a: no program", "b: rackwire",
		"unit", "b/a", "paired", "(IQR)", "CPU a", "CPU b", "unit", "CPU a/b")
	for _, t := range tests {
		s := res[t.kind]
		pr := s.perRound()
		fmt.Fprintf(w, "%-31s %13s %12s %-7s %6.3f %6.3f %-13s  %9.2f %9.2f %-8s %7.3f\n", t.label,
			fmtRate(median(s.a), t.scale), fmtRate(median(s.b), t.scale), t.unit, s.ratio(), s.pairedRatio(),
			fmt.Sprintf("(%.2f-%.2f)", quantile(pr, 0.25), quantile(pr, 0.75)),
			median(s.cpuA)/t.cpuScale, median(s.cpuB)/t.cpuScale, t.cpuUnit, s.cpuRatio())
	}
	fmt.Fprintln(w)
	for _, t := range tests {
		var rs []string
		for _, r := range res[t.kind].perRound() {
			rs = append(rs, fmt.Sprintf("%.2f", r))
		}
		fmt.Fprintf(w, "per-round b/a %-7s %s\n", t.kind+":", strings.Join(rs, " "))
	}
	fmt.Fprintln(w)
	for _, t := range tests {
		s := res[t.kind]
		r := s.ratio()
		fmt.Fprintf(w, "goal %-31s b/a >= %.2f: %-7s (%.3f; paired %.3f, CPU cost a/b %.3f)\n",
			t.label, t.goal, verdict(r, t.goal), r, s.pairedRatio(), s.cpuRatio())
	}
}
