package birdconf

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// TestBirdWordsRefused checks the reserved-word list against the installed
// bird: common keywords and a spread of the list are refused as protocol
// names by `bird -p`, and the same names in upper case are taken.
func TestBirdWordsRefused(t *testing.T) {
	bird := testenv.RequireCommand(t, "bird")
	parse := func(name string) error {
		f := filepath.Join(t.TempDir(), "bird.conf")
		conf := fmt.Sprintf("router id 10.0.0.1;\nprotocol bgp %s { local as 65000; neighbor 10.0.0.2 as 65001; ipv4 { import none; export none; }; }\nfilter rw_export_%s { accept; }\n", name, name)
		if err := os.WriteFile(f, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return ParseCheck(ctx, bird, f)
	}
	sample := []string{"rr", "bgp", "route", "filter", "internal", "gateway", "as", "if"}
	for i := 0; i < len(birdWordList); i += 25 {
		sample = append(sample, birdWordList[i])
	}
	for _, w := range sample {
		if !IsBirdWord(w) {
			t.Errorf("IsBirdWord(%q) = false, want true", w)
		}
		if err := parse(w); err == nil {
			t.Errorf("bird -p took %q as a protocol name; it is listed as reserved", w)
		}
	}
	for _, w := range []string{"tor_a", "RR", "Bgp", "peer1"} {
		if IsBirdWord(w) {
			t.Errorf("IsBirdWord(%q) = true, want false", w)
		}
		if err := parse(w); err != nil {
			t.Errorf("bird -p refused %q: %v", w, err)
		}
	}
}
