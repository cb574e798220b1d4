package datapath

import (
	"regexp"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/bpf"
	"github.com/rackwire/rackwire/internal/testenv"
)

// TestVerifierWork: the verifier's work per program, with local delivery
// and host routing on (the settings that reach the most code), stays under
// a bound. Verification was most of an agent's start-up CPU: with the
// parsed flow on the stack rw_from_endpoint took 188,093 processed
// instructions (about 0.3 s of CPU here, at every start of every agent),
// rw_to_endpoint 48,581 and rw_from_uplink 58,502; with the flow in
// rw_pkt_flow 46,506, 24,125 and 28,597. The bounds leave half again for
// changes; a change that needs more says so here. rw_coarse_clock stays 0,
// so the clock of kernels before 5.11 is the one verified here; every test
// that opens a datapath on this kernel loads the coarse one.
func TestVerifierWork(t *testing.T) {
	testenv.RequireRoot(t)
	processed := regexp.MustCompile(`processed (\d+) insns`)
	for _, c := range []struct {
		prog  string
		load  func() (*ebpf.CollectionSpec, error)
		bound int
	}{
		{"rw_from_endpoint", bpf.LoadFromEndpoint, 70_000},
		{"rw_to_endpoint", bpf.LoadToEndpoint, 36_000},
		{"rw_from_uplink", bpf.LoadFromUplink, 43_000},
	} {
		t.Run(c.prog, func(t *testing.T) {
			spec, err := c.load()
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range []string{"rw_redirect_peer", "rw_host_routing"} {
				if x, ok := spec.Variables[v]; ok {
					if err := x.Set(uint8(1)); err != nil {
						t.Fatal(err)
					}
				}
			}
			for _, ms := range spec.Maps {
				if ms.MaxEntries > 4096 && ms.Type != ebpf.RingBuf {
					ms.MaxEntries = 4096 // quicker to create; the programs do not depend on it
				}
			}
			coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
				Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
			if err != nil {
				t.Fatal(err)
			}
			defer coll.Close()
			m := processed.FindStringSubmatch(coll.Programs[c.prog].VerifierLog)
			if m == nil {
				t.Fatalf("no instruction count in the verifier's statistics:\n%s", coll.Programs[c.prog].VerifierLog)
			}
			n, _ := strconv.Atoi(m[1])
			t.Logf("%s: the verifier processed %d instructions (bound %d)", c.prog, n, c.bound)
			if n > c.bound {
				t.Errorf("%s: the verifier processed %d instructions, more than %d: every agent start pays for it", c.prog, n, c.bound)
			}
		})
	}
}
