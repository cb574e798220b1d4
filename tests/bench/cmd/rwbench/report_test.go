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
		s    samples
		want float64
	}{
		{"b costs more", samples{cpuA: []float64{40, 40, 41}, cpuB: []float64{50, 50, 49}}, 0.8},
		{"no b", samples{cpuA: []float64{40}}, 0},
	} {
		if got := tc.s.cpuRatio(); got != tc.want {
			t.Errorf("%s: cpuRatio() = %v, want %v", tc.name, got, tc.want)
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
		s             samples
		ratio, paired float64
	}{
		{"equal", samples{a: []float64{100, 100, 100}, b: []float64{100, 100, 100}}, 1, 1},
		{"b slower", samples{a: []float64{100, 200, 100}, b: []float64{90, 180, 90}}, 0.9, 0.9},
		{"drift", samples{a: []float64{100, 50, 25}, b: []float64{50, 25, 12.5}}, 0.5, 0.5},
		{"no a", samples{b: []float64{1}}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.s.ratio(); got != tc.ratio {
				t.Errorf("ratio(%v) = %v, want %v", tc.s, got, tc.ratio)
			}
			if got := tc.s.pairedRatio(); got != tc.paired {
				t.Errorf("pairedRatio(%v) = %v, want %v", tc.s, got, tc.paired)
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
		{0.969, 0.97, "not met"},
		{1.2, 0.98, "met"},
	} {
		if got := verdict(tc.ratio, tc.goal); got != tc.want {
			t.Errorf("verdict(%v, %v) = %q, want %q", tc.ratio, tc.goal, got, tc.want)
		}
	}
}

func TestReportHasOneGoalLinePerTest(t *testing.T) {
	res := map[string]*samples{
		kindRR:     {a: []float64{100, 100, 100}, b: []float64{99, 98, 97}},
		kindCRR:    {a: []float64{10, 10, 10}, b: []float64{9, 9, 9}},
		kindStream: {a: []float64{1e10, 1e10, 1e10}, b: []float64{1e10, 1e10, 1e10}},
	}
	var buf bytes.Buffer
	report(&buf, res)
	var goals []string
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.HasPrefix(l, "goal ") {
			goals = append(goals, l)
		}
	}
	want := []string{"met", "not met", "met"}
	if len(goals) != len(want) {
		t.Fatalf("report has %d goal lines, want %d:\n%s", len(goals), len(want), buf.String())
	}
	for i, l := range goals {
		if !strings.Contains(l, ": "+want[i]+" ") {
			t.Errorf("goal line %q, want verdict %q", l, want[i])
		}
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
