package datapath

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestPortBlocks(t *testing.T) {
	tests := []struct {
		lo, hi uint16
		want   []block
	}{
		{80, 80, []block{{80, 0}}},
		{8000, 8099, []block{{8000, 6}, {8064, 5}, {8096, 2}}},
		{1024, 2047, []block{{1024, 10}}},
		{0, 65535, []block{{0, 0}}},
		{1, 3, []block{{1, 0}, {2, 1}}},
		{65534, 65535, []block{{65534, 1}}},
		{32768, 65535, []block{{32768, 15}}},
	}
	for _, tt := range tests {
		got := portBlocks(tt.lo, tt.hi)
		if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(block{})); diff != "" {
			t.Errorf("portBlocks(%d, %d) mismatch (-want +got):\n%s", tt.lo, tt.hi, diff)
		}
	}
	// Every range covers exactly its ports, with few blocks.
	for _, r := range [][2]uint16{{1, 65535}, {1000, 1999}, {5, 5}, {4000, 60001}, {65535, 65535}} {
		blocks := portBlocks(r[0], r[1])
		next := uint32(r[0])
		for _, b := range blocks {
			if uint32(b.start) != next || b.start&(1<<b.size-1) != 0 {
				t.Fatalf("portBlocks(%d, %d) = %v: block %v not aligned or not contiguous", r[0], r[1], blocks, b)
			}
			next += 1 << b.size
		}
		if next != uint32(r[1])+1 {
			t.Errorf("portBlocks(%d, %d) = %v ends at %d", r[0], r[1], blocks, next-1)
		}
		if len(blocks) > 32 {
			t.Errorf("portBlocks(%d, %d) = %d blocks, want at most 32", r[0], r[1], len(blocks))
		}
	}
}

func TestEntryKeys(t *testing.T) {
	tests := []struct {
		name    string
		e       Entry
		want    []policyKey
		wantErr error
	}{
		{"all zero", Entry{}, []policyKey{{}}, nil},
		{"egress wildcard", Entry{Direction: Egress}, []policyKey{{Direction: 1}}, nil},
		{"exact", Entry{Identity: 5, Proto: 6, Port: 80}, []policyKey{{Identity: 5, DPort: be16{0, 80}, Proto: 6}}, nil},
		{"icmp type", Entry{Proto: 1, Port: 8, Direction: Egress}, []policyKey{{DPort: be16{0, 8}, Proto: 1, Direction: 1}}, nil},
		{"range", Entry{Proto: 17, Port: 1024, EndPort: 2047}, []policyKey{{DPort: be16{4, 0}, Proto: 17, Direction: 10 << 1}}, nil},
		{"port without proto", Entry{Port: 80}, nil, ErrInvalidEntry},
		{"end below port", Entry{Proto: 6, Port: 80, EndPort: 79}, nil, ErrInvalidEntry},
		{"bad direction", Entry{Direction: 2}, nil, ErrInvalidEntry},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := tt.e.keys()
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("keys(%v) error = %v, want %v", tt.e, err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("keys(%v) mismatch (-want +got):\n%s", tt.e, diff)
			}
			for _, k := range got {
				back := entryOf(k, policyValue{})
				if back.Identity != tt.e.Identity || back.Proto != tt.e.Proto || back.Direction != tt.e.Direction {
					t.Errorf("entryOf(%v) = %v, want back %v", k, back, tt.e)
				}
			}
		})
	}
}
