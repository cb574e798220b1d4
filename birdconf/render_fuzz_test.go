package birdconf

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// shape reads the numbers of a Config from fuzz bytes; past the end it
// reads zeros.
type shape struct{ b []byte }

func (s *shape) u8() uint8 {
	if len(s.b) == 0 {
		return 0
	}
	v := s.b[0]
	s.b = s.b[1:]
	return v
}

func (s *shape) u16() uint16 { return uint16(s.u8())<<8 | uint16(s.u8()) }
func (s *shape) u32() uint32 { return uint32(s.u16())<<16 | uint32(s.u16()) }
func (s *shape) bool() bool  { return s.u8()&1 == 1 }

// addr is an IPv4 address, an IPv6 one or an IPv4-mapped IPv6 one.
func (s *shape) addr() netip.Addr {
	switch s.u8() % 4 {
	case 0, 1:
		return netip.AddrFrom4([4]byte{s.u8(), s.u8(), s.u8(), s.u8()})
	case 2:
		var b [16]byte
		for i := range b {
			b[i] = s.u8()
		}
		return netip.AddrFrom16(b)
	default:
		return netip.AddrFrom16(netip.AddrFrom4([4]byte{s.u8(), s.u8(), s.u8(), s.u8()}).As16())
	}
}

func (s *shape) prefix() netip.Prefix {
	a := s.addr()
	p, _ := a.Prefix(int(s.u8()) % (a.BitLen() + 1))
	if s.u8()%8 == 7 {
		// Now and then a prefix with host bits set.
		return netip.PrefixFrom(a, p.Bits())
	}
	return p
}

// duration is one of the durations a config can hold: small ones in
// milliseconds, now and then a huge one.
func (s *shape) duration() time.Duration {
	v := time.Duration(s.u16()) * time.Millisecond
	if s.u8()%16 == 15 {
		v = time.Duration(s.u32()) * time.Second
	}
	return v
}

func (s *shape) int() int { return int(int16(s.u16())) }

func (s *shape) communities(extra string) []string {
	var out []string
	for range s.u8() % 3 {
		switch s.u8() % 3 {
		case 0:
			out = append(out, extra)
		case 1:
			out = append(out, itoa(uint64(s.u16()))+":"+itoa(uint64(s.u16())))
		default:
			out = append(out, itoa(uint64(s.u32()))+":"+itoa(uint64(s.u32()))+":"+itoa(uint64(s.u32())))
		}
	}
	return out
}

func itoa(v uint64) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for ; v > 0; v /= 10 {
		b = append([]byte{byte('0' + v%10)}, b...)
	}
	return string(b)
}

func (s *shape) route(community string) Route {
	r := Route{Prefix: s.prefix(), Communities: s.communities(community)}
	if s.bool() {
		r.LocalPref = s.u32()
	}
	return r
}

// fuzzConfig builds a Config from fuzz input: the numbers from sh, the
// free-form strings (a peer's name, password, interface, the version, a
// community) as given.
func fuzzConfig(sh []byte, name, password, iface, version, community string) Config {
	s := &shape{b: sh}
	c := Config{Version: version, RouterID: s.addr(), LocalASN: s.u32()}
	for range s.u8() % 3 {
		c.CIDRs = append(c.CIDRs, s.route(community))
	}
	for range s.u8() % 3 {
		c.VIPs = append(c.VIPs, VIP{Route: s.route(community), Active: s.bool()})
	}
	for range s.u8() % 3 {
		c.Import = append(c.Import, s.prefix())
	}
	c.Communities = s.communities(community)
	c.Drained = s.bool()
	for range s.u8() % 2 {
		c.DrainKeep = append(c.DrainKeep, s.prefix())
	}
	if s.bool() {
		c.ScanTime = s.duration()
	}
	for i := range int(s.u8() % 4) {
		p := Peer{Name: "peer" + itoa(uint64(i)), Address: s.addr(), ASN: s.u32()}
		if i == 0 {
			p.Name, p.Password, p.Interface = name, password, iface
		}
		if s.bool() {
			p.SourceAddress = s.addr()
		}
		if s.u8()%4 == 3 && p.Address.Is6() {
			p.Address = p.Address.WithZone(iface)
		}
		if s.bool() {
			p.Multihop = s.int()
		}
		p.BFD = s.bool()
		if p.BFD {
			p.BFDMinRx, p.BFDMinTx, p.BFDMultiplier = s.duration(), s.duration(), s.int()
		}
		p.GracefulRestart = s.bool()
		if s.bool() {
			p.HoldTime, p.KeepaliveTime = s.int(), s.int()
		}
		if s.bool() {
			p.ErrorWait = s.duration()
		}
		p.Communities = s.communities(community)
		if s.bool() {
			p.LocalPref = s.u32()
		}
		c.Peers = append(c.Peers, p)
	}
	return c
}

// FuzzRenderBird: whatever Render accepts, the real BIRD accepts
// (`bird -p -c FILE`), and the same Config renders the same text. Every
// input starts a bird process: run it with a short -fuzztime.
func FuzzRenderBird(f *testing.F) {
	bird := testenv.RequireCommand(f, "bird")
	// shape bytes: router id (kind + 4), local ASN (4), #CIDRs, ...
	base := []byte{0, 10, 1, 1, 10, 0, 0, 0xfe, 0x4d, 1, 0, 10, 250, 1, 0, 24, 0, 0, 0, 0}
	f.Add(base, "tor_a", "", "", "v1.0.0", "65000:100")
	f.Add(append(append([]byte{}, base...), 0, 0, 0, 0, 0, 1, 0, 10, 1, 1, 1, 0, 0, 0xfd, 0xe9, 1, 0, 10, 1, 1, 10, 1, 0, 2, 1, 0, 100, 0, 0, 200, 0, 3, 1, 1, 0, 9, 0, 3), "tor_a", "s3cret", "eth0", "v1.0.0", "4200000000:1:2")
	f.Add(append(append([]byte{}, base...), 0, 0, 0, 0, 0, 3, 2, 0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0xfd, 0xe9), "x", "pass word", "eth1", "", "1:1")
	// IPv4 and IPv6 CIDRs, a VIP with a large community, imports, two
	// peers with BFD (one multihop IPv6 with a source address).
	v6 := func(b ...byte) []byte { a := make([]byte, 16); copy(a[16-len(b):], b); return a }
	var full []byte
	full = append(full, 0, 10, 1, 1, 10, 0, 0, 0xfe, 0x4d, 2)
	full = append(full, 0, 10, 250, 1, 0, 24, 0, 1, 0, 0)
	full = append(append(append(full, 2, 0xfd, 0, 2, 0x50, 0, 1), make([]byte, 10)...), 64, 0, 0, 1, 0, 0, 1, 44)
	full = append(full, 1, 0, 10, 96, 100, 10, 32, 0, 1, 2, 0xfa, 0x56, 0xea, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 1)
	full = append(append(append(full, 2, 0, 0, 0, 0, 0, 0, 0, 2), v6()...), 0, 0)
	full = append(full, 1, 1, 0xfe, 0x4d, 0, 1, 0, 0, 0, 2)
	full = append(full, 0, 10, 1, 1, 1, 0, 0, 0xfd, 0xe9, 0, 0, 0, 1, 0, 100, 0, 0, 100, 0, 0, 3, 1, 1, 0, 9, 0, 3, 0, 0, 0)
	full = append(append(full, 2, 0xfd, 0, 0, 1, 0, 1), v6(1)[6:]...)
	full = append(append(append(full, 0, 0, 0xfd, 0xe9, 1, 2, 0xfd, 0, 0, 1, 0, 2), v6(0x10)[6:]...), 0, 1, 0, 2, 1, 0, 50, 0, 0, 50, 0, 0, 5, 0, 0, 0, 1, 1, 0xfd, 0xea, 0x02, 0x9a, 1, 0, 0, 0, 200)
	f.Add(full, "tor_a", "s3cret", "", "v1.0.0", "65000:100")
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0}, "", "", "", "", "")
	f.Add(base, "rw_peer", "a\"b", "e*", "v\n1", "65536:1")
	// The known gaps, each reachable from a valid rackwire.toml: a peer
	// named rr, a link-local peer on a VLAN interface, keepalive_time 300
	// without hold_time, bfd_min_rx = "2000h".
	peer := func(b ...byte) []byte { return append(append(append([]byte{}, base...), 0, 0, 0, 0, 0, 1), b...) }
	v4peer := []byte{0, 10, 1, 1, 1, 0, 0, 0xfd, 0xe9, 0, 0, 0}
	f.Add(peer(append(v4peer, 0, 0, 0, 0, 0, 0, 0)...), "rr", "", "", "v1", "1:1")
	f.Add(peer(append(append([]byte{2, 0xfe, 0x80}, v6(1)[2:]...), 0, 0, 0xfd, 0xe9, 0, 3, 0, 0, 0, 0, 0, 0, 0)...), "tor_a", "", "eth0.100", "v1", "1:1")
	f.Add(peer(append(v4peer, 0, 0, 1, 0, 0, 1, 44, 0, 0, 0)...), "tor_a", "", "", "v1", "1:1")
	f.Add(peer(append(v4peer, 1, 0, 0, 15, 0, 0x6d, 0xdd, 0, 0, 100, 0, 0, 3, 0, 0, 0, 0, 0)...), "tor_a", "", "", "v1", "1:1")
	f.Fuzz(func(t *testing.T, sh []byte, name, password, iface, version, community string) {
		c := fuzzConfig(sh, name, password, iface, version, community)
		text, err := Render(c)
		if err != nil {
			return
		}
		again, err := Render(c)
		if err != nil || again != text {
			t.Fatalf("Render is not deterministic: %v", err)
		}
		if red, err := RenderRedacted(c); err != nil {
			t.Fatalf("RenderRedacted fails where Render does not: %v", err)
		} else {
			for _, p := range c.Peers {
				if p.Password != "" && p.Password != Redacted && strings.Contains(red, `password "`+p.Password+`"`) {
					t.Fatalf("RenderRedacted shows the password of %s", p.Name)
				}
			}
		}
		file := filepath.Join(fuzzDir(t), "bird.conf")
		if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		if err := ParseCheck(ctx, bird, file); err != nil {
			t.Fatalf("Render accepted a config BIRD refuses: %v\nconfig: %+v\n--- text:\n%s", err, c, text)
		}
	})
}

// fuzzDir is a fresh directory for one fuzz input: on tmpfs when there is
// one, so that the fsyncs of the code under test cost nothing. A fuzz
// worker stopped at the end of -fuzztime skips its cleanups: directories
// of earlier runs older than ten minutes are removed on the first call.
func fuzzDir(t *testing.T) string {
	sweepOnce.Do(func() {
		old, _ := filepath.Glob("/dev/shm/rackwire-fuzz-*")
		for _, d := range old {
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > 10*time.Minute {
				os.RemoveAll(d)
			}
		}
	})
	if d, err := os.MkdirTemp("/dev/shm", "rackwire-fuzz-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	return t.TempDir()
}

var sweepOnce sync.Once
