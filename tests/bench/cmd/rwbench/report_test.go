package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{10, 10, 1, 10, 1000}, 10},
	} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestQuantile(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3}
	for _, tc := range []struct {
		q, want float64
	}{{0, 1}, {0.25, 2}, {0.5, 3}, {0.75, 4}, {1, 5}, {0.125, 1.5}} {
		if got := quantile(xs, tc.q); got != tc.want {
			t.Errorf("quantile(%v, %v) = %v, want %v", xs, tc.q, got, tc.want)
		}
	}
}

func TestCPURatio(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    ratio
		want float64
	}{
		{"x costs more", ratio{x: &series{cpu: []float64{50, 50, 49}}, y: &series{cpu: []float64{40, 40, 41}}}, 0.8},
		{"no x", ratio{y: &series{cpu: []float64{40}}}, 0},
	} {
		if got := tc.r.cpu(); got != tc.want {
			t.Errorf("%s: cpu() = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestMedianKeepsInput(t *testing.T) {
	in := []float64{3, 1, 2}
	median(in)
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Errorf("median reordered its input: %v", in)
	}
}

func TestRatios(t *testing.T) {
	for _, tc := range []struct {
		name          string
		x, y          []float64
		ratio, paired float64
	}{
		{"equal", []float64{100, 100, 100}, []float64{100, 100, 100}, 1, 1},
		{"x slower", []float64{90, 180, 90}, []float64{100, 200, 100}, 0.9, 0.9},
		{"drift", []float64{50, 25, 12.5}, []float64{100, 50, 25}, 0.5, 0.5},
		{"no y", []float64{1}, nil, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := ratio{x: &series{rate: tc.x}, y: &series{rate: tc.y}}
			if got := r.median(); got != tc.ratio {
				t.Errorf("median(%v / %v) = %v, want %v", tc.x, tc.y, got, tc.ratio)
			}
			if got := r.paired(); got != tc.paired {
				t.Errorf("paired(%v / %v) = %v, want %v", tc.x, tc.y, got, tc.paired)
			}
		})
	}
}

func TestVerdict(t *testing.T) {
	for _, tc := range []struct {
		ratio, goal float64
		want        string
	}{
		{0.97, 0.97, "met"},
		{0.969, 0.97, "NOT MET"},
		{1.2, 0.98, "met"},
	} {
		if got := verdict(tc.ratio, tc.goal); got != tc.want {
			t.Errorf("verdict(%v, %v) = %q, want %q", tc.ratio, tc.goal, got, tc.want)
		}
	}
}

// The report has one goal line per test and pair (c/a), one for
// connect/request/close against nftables, and says where a missed goal
// goes (c/d x d/a).
func TestReportGoals(t *testing.T) {
	res := results{}
	add := func(pair, kind string, m mode, rates ...float64) {
		for _, r := range rates {
			res.add(pair, kind, m, r, 1)
		}
	}
	same := func(v float64) []float64 { return []float64{v, v, v} }
	localModes := []mode{modeNone, modeHost, modeOpen, modeNFT}
	for kind, rates := range map[string][4][]float64{
		kindRR:     {same(100), {99, 98, 97}, same(100), same(90)},
		kindCRR:    {same(10), same(9), same(10), same(8)},
		kindStream: {same(1e10), same(1e10), same(1e10), same(1e10)},
	} {
		for i, m := range localModes {
			add("local", kind, m, rates[i]...)
		}
	}
	for _, k := range []string{kindRR, kindCRR, kindStream} {
		add("cross-host", k, modeNone, 10, 10, 10)
		add("cross-host", k, modeHost, 10, 10, 10)
	}
	groups := []group{
		{pair: &pair{name: "local"}, modes: localModes},
		{pair: &pair{name: "cross-host"}, modes: []mode{modeNone, modeHost}},
	}
	var buf bytes.Buffer
	report(&buf, res, groups)
	var goals []string
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.HasPrefix(l, "goal ") {
			goals = append(goals, l)
		}
	}
	want := []string{"met", "NOT MET", "met", "met", "met", "met", "met"}
	if len(goals) != len(want) {
		t.Fatalf("report has %d goal lines, want %d:\n%s", len(goals), len(want), buf.String())
	}
	for i, l := range goals {
		if !strings.Contains(l, ": "+want[i]+" ") {
			t.Errorf("goal line %q, want verdict %q", l, want[i])
		}
	}
	if !strings.Contains(buf.String(), "where it goes: c/d 0.900") {
		t.Errorf("the missed connect/request/close goal is not broken down into c/d x d/a:\n%s", buf.String())
	}
}

func TestRunRejectsBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-rounds", "2"},
		{"-dur", "1ms"},
		{"-nonsense"},
	} {
		err := cmdRun(context.Background(), args, io.Discard, io.Discard)
		if !errors.Is(err, errUsage) {
			t.Errorf("cmdRun(%q) = %v, want a usage error", args, err)
		}
	}
}
