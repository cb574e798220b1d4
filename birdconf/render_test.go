package birdconf

import (
	"context"
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/rackwire/rackwire/internal/testenv"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func tor(name, a string, asn uint32, bfd bool) Peer {
	return Peer{Name: name, Address: addr(a), ASN: asn, BFD: bfd,
		BFDMinRx: 100 * time.Millisecond, BFDMinTx: 100 * time.Millisecond, BFDMultiplier: 3}
}

func goldenCases() []struct {
	name string
	cfg  Config
} {
	base := func() Config {
		return Config{
			Version:  "v0.0.0-test",
			RouterID: addr("10.1.1.10"),
			LocalASN: 65101,
			CIDRs:    []Route{{Prefix: pfx("10.250.1.0/24")}},
			Import:   []netip.Prefix{pfx("0.0.0.0/0"), pfx("::/0")},
		}
	}
	onePeer := base()
	onePeer.Peers = []Peer{{Name: "tor_a", Address: addr("10.1.1.1"), ASN: 65001}}

	twoToR := base()
	twoToR.Peers = []Peer{tor("tor_a", "10.1.1.1", 65001, true), tor("tor_b", "10.1.2.1", 65002, true)}
	twoToR.Peers[0].SourceAddress = addr("10.1.1.10")
	twoToR.Peers[0].GracefulRestart = true
	twoToR.Peers[0].HoldTime, twoToR.Peers[0].KeepaliveTime = 9, 3
	twoToR.Peers[0].Password = "s3cret"
	twoToR.Peers[1].BFDMinRx, twoToR.Peers[1].BFDMultiplier = 50*time.Millisecond, 5
	twoToR.Peers[1].LocalPref = 200

	ipv6 := base()
	ipv6.CIDRs = append(ipv6.CIDRs, Route{Prefix: pfx("fd00:250:1::/64")})
	ipv6.VIPs = []VIP{{Route: Route{Prefix: pfx("fd00:96::10/128")}, Active: true}}
	ipv6.Import = append(ipv6.Import, pfx("fd00:ff::/48"))
	ipv6.Peers = []Peer{tor("tor_a", "10.1.1.1", 65001, true), tor("tor_a6", "fd00:1:1::1", 65001, true)}
	ipv6.Peers[1].Multihop = 2
	ipv6.Peers[1].SourceAddress = addr("fd00:1:2::10")

	vips := base()
	vips.Communities = []string{"65101:1"}
	vips.VIPs = []VIP{
		{Route: Route{Prefix: pfx("10.96.100.10/32"), Communities: []string{"65000:100", "4200000000:1:2"}, LocalPref: 300}, Active: true},
		{Route: Route{Prefix: pfx("10.96.100.11/32")}, Active: false},
	}
	vips.Peers = []Peer{tor("tor_a", "10.1.1.1", 65001, true), tor("tor_b", "10.1.2.1", 65002, true)}
	vips.Peers[1].Communities = []string{"65002:666"}

	drain := vips
	drain.Peers = slicesClone(vips.Peers)
	drain.Drained = true
	drain.DrainKeep = []netip.Prefix{pfx("10.250.0.0/16")}

	return []struct {
		name string
		cfg  Config
	}{
		{"one_peer", onePeer},
		{"two_tor_bfd_ecmp", twoToR},
		{"ipv6", ipv6},
		{"vips_communities", vips},
		{"drain", drain},
	}
}

func slicesClone[T any](s []T) []T { return append([]T(nil), s...) }

func TestRenderGolden(t *testing.T) {
	bird := testenv.RequireCommand(t, "bird")
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Render(tc.cfg)
			if err != nil {
				t.Fatalf("Render() error: %v", err)
			}
			golden := filepath.Join("testdata", tc.name+".conf")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("read golden (run go test ./birdconf -update): %v", err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("Render() differs from %s (-want +got):\n%s", golden, diff)
			}
			// Every golden file must be a config the real BIRD accepts.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := ParseCheck(ctx, bird, golden); err != nil {
				t.Errorf("bird -p -c %s: %v", golden, err)
			}
		})
	}
}

func TestRenderProperties(t *testing.T) {
	cases := goldenCases()
	byName := map[string]Config{}
	for _, c := range cases {
		byName[c.name] = c.cfg
	}
	tests := []struct {
		name        string
		cfg         Config
		contains    []string
		notContains []string
	}{
		{"bfd is plain on, never graceful", byName["two_tor_bfd_ecmp"],
			[]string{"bfd on;", "protocol bfd rw_bfd", "min rx interval 50 ms", "multiplier 3"}, []string{"bfd graceful"}},
		{"kernel merges paths and exports only BGP", byName["one_peer"],
			[]string{"merge paths on;", "if source = RTS_BGP then accept;", "import none;"}, []string{"protocol bfd"}},
		{"export only own static routes", byName["one_peer"],
			[]string{"if source != RTS_STATIC then reject;", "route 10.250.1.0/24 blackhole;"}, nil},
		{"inactive VIP not announced but refused on import", byName["vips_communities"],
			[]string{"10.96.100.11/32+", "route 10.96.100.10/32 blackhole;", "bgp_large_community.add((4200000000, 1, 2));", "bgp_local_pref = 300;"},
			[]string{"route 10.96.100.11/32 blackhole;"}},
		{"drain keeps only drain_keep", byName["drain"],
			[]string{"route 10.250.1.0/24 blackhole;"}, []string{"route 10.96.100.10/32 blackhole;"}},
		{"default route import is exact", byName["one_peer"],
			[]string{"net ~ [ 0.0.0.0/0 ]", "net ~ [ ::/0 ]"}, []string{"0.0.0.0/0+"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Render(tc.cfg)
			if err != nil {
				t.Fatalf("Render() error: %v", err)
			}
			for _, s := range tc.contains {
				if !strings.Contains(got, s) {
					t.Errorf("Render() lacks %q", s)
				}
			}
			for _, s := range tc.notContains {
				if strings.Contains(got, s) {
					t.Errorf("Render() contains %q", s)
				}
			}
		})
	}
}

func TestRenderBadInput(t *testing.T) {
	good := goldenCases()[0].cfg
	tests := []struct {
		name string
		mod  func(c *Config)
	}{
		{"no router id", func(c *Config) { c.RouterID = netip.Addr{} }},
		{"ipv6 router id", func(c *Config) { c.RouterID = addr("fd00::1") }},
		{"asn 0", func(c *Config) { c.LocalASN = 0 }},
		{"peer asn 0", func(c *Config) { c.Peers[0].ASN = 0 }},
		{"peer without address", func(c *Config) { c.Peers[0].Address = netip.Addr{} }},
		{"bad peer name", func(c *Config) { c.Peers[0].Name = "tor-a" }},
		{"reserved peer name", func(c *Config) { c.Peers[0].Name = "rw_static4" }},
		{"password with quote", func(c *Config) { c.Peers[0].Password = `a"b` }},
		{"bad community", func(c *Config) { c.Communities = []string{"70000:1"} }},
		{"host bits", func(c *Config) { c.CIDRs = []Route{{Prefix: pfx("10.250.1.1/24")}} }},
		{"multihop bfd without source", func(c *Config) { c.Peers[0].Multihop, c.Peers[0].BFD = 2, true }},
		{"source family", func(c *Config) { c.Peers[0].SourceAddress = addr("fd00::1") }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := good
			c.Peers = slicesClone(good.Peers)
			tc.mod(&c)
			if _, err := Render(c); !errors.Is(err, ErrBadConfig) {
				t.Errorf("Render() error = %v, want ErrBadConfig", err)
			}
		})
	}
}

// TestRenderRedacted: the display text has no password, the text for
// BIRD has it, and both are the same otherwise.
func TestRenderRedacted(t *testing.T) {
	var c Config
	for _, tc := range goldenCases() {
		if tc.name == "two_tor_bfd_ecmp" {
			c = tc.cfg
		}
	}
	const pw = "s3cret"
	if c.Peers[0].Password != pw {
		t.Fatalf("test setup: peer password %q", c.Peers[0].Password)
	}
	file, err := Render(c)
	if err != nil {
		t.Fatal(err)
	}
	shown, err := RenderRedacted(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(file, `password "`+pw+`";`) {
		t.Errorf("Render() lacks the password BIRD needs:\n%s", file)
	}
	if strings.Contains(shown, pw) || !strings.Contains(shown, `password "<redacted>";`) {
		t.Errorf("RenderRedacted() shows the password or lacks the placeholder:\n%s", shown)
	}
	if c.Peers[0].Password != pw {
		t.Errorf("RenderRedacted() changed its input's password to %q", c.Peers[0].Password)
	}
	if got := strings.Replace(shown, Redacted, pw, 1); got != file {
		t.Errorf("RenderRedacted() differs from Render() beyond the password:\n%s", cmp.Diff(file, got))
	}
	bad := c
	bad.Peers = slicesClone(c.Peers)
	bad.Peers[0].Password = `a"b`
	if _, err := RenderRedacted(bad); !errors.Is(err, ErrBadConfig) {
		t.Errorf("RenderRedacted() with a password BIRD cannot take = %v, want ErrBadConfig", err)
	}
}
