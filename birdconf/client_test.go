package birdconf

import (
	"bufio"
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/birdconf/birdtest"
)

func TestReadReply(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []Line
		wantErr bool
	}{
		{"single", "0003 Reconfigured\n", []Line{{3, "Reconfigured"}}, false},
		{"continuation and spontaneous", "0002-Reading x\n+0015 spontaneous\n1002-a b\n c d\n0000 \n",
			[]Line{{2, "Reading x"}, {1002, "a b"}, {1002, "c d"}, {0, ""}}, false},
		{"stops at first final line", "8002 bad:1:1 syntax error\n0000 \n", []Line{{8002, "bad:1:1 syntax error"}}, false},
		{"malformed", "hello\n", nil, true},
		{"cut short", "1002-a\n", nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readReply(bufio.NewReader(strings.NewReader(tc.in)))
			if (err != nil) != tc.wantErr {
				t.Fatalf("readReply(%q) error = %v, wantErr %v", tc.in, err, tc.wantErr)
			}
			if !tc.wantErr && !equalLines(got, tc.want) {
				t.Errorf("readReply(%q) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func equalLines(a, b []Line) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestParseProtocolLine(t *testing.T) {
	tests := []struct {
		in   string
		want Protocol
	}{
		{"tor_a      BGP        ---        start  2026-11-23 08:56:35  Active        ",
			Protocol{Name: "tor_a", Proto: "BGP", Table: "---", State: "start", SinceText: "2026-11-23 08:56:35", Info: "Active"}},
		{"rw_static4 Static     master4    up     2026-11-23 08:56:35  ",
			Protocol{Name: "rw_static4", Proto: "Static", Table: "master4", State: "up", SinceText: "2026-11-23 08:56:35"}},
		{"tor_b      BGP        ---        start  08:56:35.123  Active        Socket: Connection refused",
			Protocol{Name: "tor_b", Proto: "BGP", Table: "---", State: "start", SinceText: "08:56:35.123", Info: "Active Socket: Connection refused"}},
	}
	for _, tc := range tests {
		got, ok := parseProtocolLine(tc.in)
		got.Since = time.Time{}
		if !ok || got != tc.want {
			t.Errorf("parseProtocolLine(%q) = %+v, %v, want %+v", tc.in, got, ok, tc.want)
		}
	}
}

// testConfig renders a config whose BGP peer never comes up (nothing
// listens at its address), so BIRD runs without touching any network.
func testConfig(t *testing.T) Config {
	return Config{
		Version:  "test",
		RouterID: addr("10.201.0.1"),
		LocalASN: 65101,
		CIDRs:    []Route{{Prefix: pfx("10.201.101.0/24")}},
		Import:   []netip.Prefix{pfx("0.0.0.0/0")},
		Peers:    []Peer{tor("tor_a", "10.201.10.1", 65001, true)},
	}
}

func startBird(t *testing.T) (*birdtest.Bird, *Client) {
	t.Helper()
	ns := birdtest.NetNS(t, "rwe-bc")
	// A veth pair makes the peer directly connected, so BGP requests its
	// BFD session; packets to it go nowhere.
	birdtest.Run(t, "ip", "-n", ns, "link", "add", "rwe-d0", "type", "veth", "peer", "name", "rwe-d1")
	birdtest.Run(t, "ip", "-n", ns, "link", "set", "rwe-d1", "up")
	birdtest.Run(t, "ip", "-n", ns, "addr", "add", "10.201.10.2/24", "dev", "rwe-d0")
	birdtest.Run(t, "ip", "-n", ns, "link", "set", "rwe-d0", "up")
	text, err := Render(testConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	b := birdtest.Start(t, ns, t.TempDir(), text)
	return b, &Client{Socket: b.Socket, Timeout: 5 * time.Second}
}

func TestClientRealBird(t *testing.T) {
	b, c := startBird(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("show protocols", func(t *testing.T) {
		ps, err := c.ShowProtocols(ctx)
		if err != nil {
			t.Fatalf("ShowProtocols() error: %v", err)
		}
		got := map[string]Protocol{}
		for _, p := range ps {
			got[p.Name] = p
		}
		for name, proto := range map[string]string{"rw_device": "Device", "rw_static4": "Static", "rw_kernel4": "Kernel", "rw_bfd": "BFD", "tor_a": "BGP"} {
			p, ok := got[name]
			if !ok || p.Proto != proto {
				t.Errorf("ShowProtocols()[%s] = %+v, want proto %s", name, p, proto)
			}
		}
		if p := got["rw_static4"]; p.State != "up" || p.Since.IsZero() || time.Since(p.Since) > time.Hour {
			t.Errorf("rw_static4 = %+v, want up with a recent since", p)
		}
		if p := got["tor_a"]; p.State != "start" || p.Info == "" {
			t.Errorf("tor_a = %+v, want start with BGP state in info", p)
		}
	})
	t.Run("show protocols all", func(t *testing.T) {
		d, err := c.ShowProtocolsAll(ctx, "rw_static4")
		if err != nil {
			t.Fatalf("ShowProtocolsAll() error: %v", err)
		}
		if d.RoutesImported != 1 || d.Channels["ipv4"] != "UP" {
			t.Errorf("ShowProtocolsAll(rw_static4) = %+v, want 1 imported, ipv4 UP", d)
		}
		d, err = c.ShowProtocolsAll(ctx, "tor_a")
		if err != nil {
			t.Fatalf("ShowProtocolsAll() error: %v", err)
		}
		if d.BGPState == "" || d.NeighborAS != 65001 || d.NeighborAddr != "10.201.10.1" {
			t.Errorf("ShowProtocolsAll(tor_a) = %+v, want BGP state, neighbor 10.201.10.1 AS 65001", d)
		}
		if _, err := c.ShowProtocolsAll(ctx, "nope"); !errors.Is(err, ErrRefused) {
			t.Errorf("ShowProtocolsAll(nope) error = %v, want ErrRefused", err)
		}
	})
	t.Run("show bfd sessions", func(t *testing.T) {
		var ss []BFDSession
		var err error
		for deadline := time.Now().Add(5 * time.Second); len(ss) == 0 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if ss, err = c.ShowBFDSessions(ctx); err != nil {
				t.Fatalf("ShowBFDSessions() error: %v", err)
			}
		}
		if len(ss) != 1 || ss[0].Address != addr("10.201.10.1") || ss[0].Protocol != "rw_bfd" {
			t.Errorf("ShowBFDSessions() = %+v, want one session to 10.201.10.1", ss)
		}
	})
	t.Run("configure", func(t *testing.T) {
		if err := c.Configure(ctx); err != nil {
			t.Errorf("Configure() error: %v", err)
		}
		if err := c.ConfigureCheck(ctx, b.Config); err != nil {
			t.Errorf("ConfigureCheck() error: %v", err)
		}
		bad := filepath.Join(t.TempDir(), "bad.conf")
		os.WriteFile(bad, []byte("router id x;\n"), 0o644)
		if err := c.ConfigureCheck(ctx, bad); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "syntax error") {
			t.Errorf("ConfigureCheck(bad) error = %v, want ErrRefused with BIRD's reason", err)
		}
	})
	t.Run("apply", func(t *testing.T) {
		a := &Applier{Path: b.Config, Client: c}
		cfg := testConfig(t)
		cfg.VIPs = []VIP{{Route: Route{Prefix: pfx("10.201.200.10/32")}, Active: true}}
		text, err := Render(cfg)
		if err != nil {
			t.Fatal(err)
		}
		// The replaced file's owner and mode are kept (BIRD may run as
		// another user and must still read it).
		os.Chmod(b.Config, 0o604)
		os.Chown(b.Config, 4242, 4343)
		res, err := a.Apply(ctx, text, false)
		if err != nil || !res.Written || !res.Reconfigured {
			t.Fatalf("Apply(new) = %+v, %v, want written and reconfigured", res, err)
		}
		if fi, err := os.Stat(b.Config); err != nil || fi.Mode().Perm() != 0o604 || fi.Sys().(*syscall.Stat_t).Uid != 4242 || fi.Sys().(*syscall.Stat_t).Gid != 4343 {
			t.Errorf("after Apply the file's mode/owner changed: %v", fi.Mode())
		}
		if d, _ := c.ShowProtocolsAll(ctx, "rw_static4"); d.RoutesImported != 2 {
			t.Errorf("after Apply rw_static4 imports %d routes, want 2", d.RoutesImported)
		}
		res, err = a.Apply(ctx, text, false)
		if err != nil || res != (Result{}) {
			t.Errorf("Apply(same) = %+v, %v, want nothing done", res, err)
		}
		// bird -p refuses: nothing is written.
		res, err = a.Apply(ctx, text+"protocol nonsense {\n", false)
		if !errors.Is(err, ErrInvalid) || res.Written {
			t.Errorf("Apply(invalid) = %+v, %v, want ErrInvalid and nothing written", res, err)
		}
		// A file that gets past the check but that BIRD refuses is rolled back.
		a.Check = func(context.Context, string) error { return nil }
		res, err = a.Apply(ctx, "router id x;\n", false)
		if !errors.Is(err, ErrRefused) || !res.RolledBack {
			t.Errorf("Apply(refused) = %+v, %v, want ErrRefused and rolled back", res, err)
		}
		if got, _ := os.ReadFile(b.Config); string(got) != text {
			t.Errorf("after rollback the file holds %q, want the previous config", got)
		}
		if err := c.Configure(ctx); err != nil {
			t.Errorf("Configure() after rollback: %v", err)
		}
		if m, _ := filepath.Glob(filepath.Join(filepath.Dir(b.Config), ".bird.conf.rackwire-*")); len(m) != 0 {
			t.Errorf("temporary files left: %v", m)
		}
	})
	t.Run("not running", func(t *testing.T) {
		b.Stop()
		_, err := c.ShowProtocols(ctx)
		if !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), b.Socket) {
			t.Errorf("ShowProtocols() with BIRD stopped: error = %v, want ErrNotRunning naming %s", err, b.Socket)
		}
		c2 := &Client{Socket: filepath.Join(t.TempDir(), "absent.ctl")}
		if err := c2.Configure(ctx); !errors.Is(err, ErrNotRunning) {
			t.Errorf("Configure() on absent socket: error = %v, want ErrNotRunning", err)
		}
	})
}
