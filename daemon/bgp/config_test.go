package bgp

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/birdconf"
	"github.com/rackwire/rackwire/daemon/config"
)

const baseTOML = `version = 1
[node]
name = "h1"
addresses = [%s]
[ipam]
cidrs = ["10.250.1.0/24"]
[bgp]
enabled = true
%s
vip_ranges = ["10.96.0.0/16"]
vips = ["10.96.100.10/32"]
[[bgp.peers]]
name = "tor_a"
%s
`

// TestBadInputRefusedAtValidation checks that what the BIRD integration
// cannot use is refused by package config with file:line, before the
// Manager ever sees it.
func TestBadInputRefusedAtValidation(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pw, []byte("secret\n"), 0o600)
	unreadable := filepath.Join(t.TempDir(), "absent")
	good := `address = "10.1.1.1"` + "\nasn = 65001"
	tests := []struct {
		name    string
		addrs   string
		bgp     string
		peer    string
		wantKey string
	}{
		{"peer address not an IP", `"10.1.1.10"`, `local_asn = 65101`, `address = "tor-a.example"` + "\nasn = 65001", "bgp.peers[0].address"},
		{"ASN 0", `"10.1.1.10"`, `local_asn = 0`, good, "bgp.local_asn"},
		{"peer ASN too big", `"10.1.1.10"`, `local_asn = 65101`, `address = "10.1.1.1"` + "\nasn = 4294967296", "bgp.peers[0].asn"},
		{"VIP outside vip_ranges", `"10.1.1.10"`, "local_asn = 65101\nvip_ranges = [\"10.97.0.0/16\"]", good, "bgp.vips[0]"},
		{"unreadable password file", `"10.1.1.10"`, `local_asn = 65101`, good + "\npassword_file = \"" + unreadable + "\"", "bgp.peers[0].password_file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			text := fmt.Sprintf(baseTOML, tc.addrs, tc.bgp, tc.peer)
			if strings.Count(text, "vip_ranges") > 1 {
				// The case brings its own range: drop the base one.
				text = strings.Replace(text, "vip_ranges = [\"10.96.0.0/16\"]\n", "", 1)
			}
			_, err := config.Parse("/etc/rackwire/rackwire.toml", []byte(text))
			var cerr *config.Error
			if !errors.As(err, &cerr) {
				t.Fatalf("Parse() error = %v, want *config.Error", err)
			}
			found := false
			for _, p := range cerr.Problems {
				if p.Key == tc.wantKey && p.File != "" && p.Line > 0 {
					found = true
				}
			}
			if !found {
				t.Errorf("Parse() problems = %v, want one for %s with file:line", cerr.Problems, tc.wantKey)
			}
		})
	}
	t.Run("router id missing with no IPv4 on the host", func(t *testing.T) {
		text := fmt.Sprintf(baseTOML, `"fd00::10"`, `local_asn = 65101`, good)
		cfg, err := config.Parse("/etc/rackwire/rackwire.toml", []byte(text))
		if err != nil {
			t.Fatalf("Parse() error: %v", err)
		}
		if err := cfg.Resolve(); err == nil || !strings.Contains(err.Error(), "bgp.router_id") {
			t.Errorf("Resolve() error = %v, want one about bgp.router_id", err)
		}
	})
	t.Run("valid config renders", func(t *testing.T) {
		text := fmt.Sprintf(baseTOML, `"10.1.1.10"`, `local_asn = 65101`, good+"\nbfd = true\npassword_file = \""+pw+"\"")
		cfg, err := config.Parse("/etc/rackwire/rackwire.toml", []byte(text))
		if err != nil {
			t.Fatalf("Parse() error: %v", err)
		}
		if err := cfg.Resolve(); err != nil {
			t.Fatalf("Resolve() error: %v", err)
		}
		m := New(cfg.BGP, cfg.Prefixes(), "test", nil)
		out, _, err := m.renderFile()
		if err != nil {
			t.Fatalf("renderFile() error: %v", err)
		}
		for _, want := range []string{"router id 10.1.1.10;", `password "secret";`, "route 10.250.1.0/24 blackhole;", "route 10.96.100.10/32 blackhole;", "bfd on;"} {
			if !strings.Contains(out, want) {
				t.Errorf("renderFile() lacks %q", want)
			}
		}
		shown, err := m.Render()
		if err != nil {
			t.Fatalf("Render() error: %v", err)
		}
		if strings.Contains(shown, "secret") || !strings.Contains(shown, `password "<redacted>";`) {
			t.Errorf("Render() shows the password or lacks the placeholder:\n%s", shown)
		}
	})
}

func TestBuildInput(t *testing.T) {
	cfg := config.BGP{
		Enabled: true, RouterID: "10.1.1.10", LocalASN: 65101,
		VIPs:      []string{"10.96.100.10/32", "10.96.100.11/32"},
		Import:    []string{"0.0.0.0/0"},
		DrainKeep: []string{"10.250.1.0/24"},
		VIPHealth: []config.VIPHealth{{VIP: "10.96.100.10/32", Type: "tcp", Target: "127.0.0.1:1", Communities: []string{"65000:1"}, LocalPref: 200}},
		Peers:     []config.Peer{{Name: "tor_a", Address: "10.1.1.1", ASN: 65001}},
	}
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.250.1.0/24")}
	announced := func(in birdconf.Config) []string {
		var out []string
		for _, r := range in.Announced() {
			out = append(out, r.Prefix.String())
		}
		return out
	}
	tests := []struct {
		name          string
		drained, keep bool
		healthy       bool
		wantAnnounced string
	}{
		{"unchecked VIP always, checked VIP unhealthy", false, false, false, "[10.250.1.0/24 10.96.100.11/32]"},
		{"healthy VIP announced", false, false, true, "[10.250.1.0/24 10.96.100.10/32 10.96.100.11/32]"},
		{"drain keeps drain_keep", true, true, true, "[10.250.1.0/24]"},
		{"drain all", true, false, true, "[]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in, err := buildInput(cfg, cidrs, "test", tc.drained, tc.keep,
				map[netip.Prefix]bool{netip.MustParsePrefix("10.96.100.10/32"): tc.healthy})
			if err != nil {
				t.Fatalf("buildInput() error: %v", err)
			}
			if got := fmt.Sprint(announced(in)); got != tc.wantAnnounced {
				t.Errorf("announced = %s, want %s", got, tc.wantAnnounced)
			}
			if in.VIPs[0].LocalPref != 200 || len(in.VIPs[0].Communities) != 1 {
				t.Errorf("VIP attributes = %+v, want local pref 200 and one community", in.VIPs[0])
			}
		})
	}
	t.Run("password file vanished", func(t *testing.T) {
		c := cfg
		c.Peers = []config.Peer{{Name: "tor_a", Address: "10.1.1.1", ASN: 65001, PasswordFile: "/nonexistent/rackwire-pw"}}
		if _, err := buildInput(c, cidrs, "test", false, false, nil); err == nil {
			t.Error("buildInput() with an unreadable password file: no error")
		}
	})
}
