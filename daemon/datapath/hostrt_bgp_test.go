package datapath

import (
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/rackwire/rackwire/birdconf/birdtest"
	"github.com/rackwire/rackwire/internal/testenv"
)

// rwhBird is one side of a BGP session with BFD (100 ms x 3: a gap of
// 300 ms in the hellos brings it down, and the BGP session with it).
const rwhBird = `router id %[1]s;
log stderr all;
protocol device { scan time 1; }
protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }
protocol bgp peer {
	local %[1]s as %[2]d;
	neighbor %[3]s as %[4]d;
	bfd on;
	hold time 9;
	keepalive time 3;
	connect delay time 1;
	connect retry time 2;
	ipv4 { import all; export none; };
}
`

// birdState returns the BGP protocol "peer" line's state and since-time and
// whether the BFD session to peer is Up, from birdc.
func birdState(t *testing.T, b *birdtest.Bird, peer string) (bgp string, bfdUp bool) {
	t.Helper()
	out := birdtest.Run(t, "birdc", "-s", b.Socket, "show", "protocols", "peer")
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 6 && f[0] == "peer" {
			bgp = f[3] + " " + f[4] + " " + f[5]
		}
	}
	bfd := birdtest.Run(t, "birdc", "-s", b.Socket, "show", "bfd", "sessions")
	bfdUp = regexp.MustCompile(regexp.QuoteMeta(peer) + `\s+\S+\s+Up`).MatchString(bfd)
	return bgp, bfdUp
}

// sameSince reports whether two birdState answers ("up 08:22:21.510
// Established") name the same state since the same instant. BIRD keeps
// the instant on its monotonic clock and prints it as wall time, so two
// readings of one unchanged session can differ by a millisecond; a flap
// moves it by seconds (a BGP session is re-established no sooner than
// BIRD's connect delay, 5 s).
func sameSince(a, b string) bool {
	fa, fb := strings.Fields(a), strings.Fields(b)
	if len(fa) != 3 || len(fb) != 3 || fa[0] != fb[0] || fa[2] != fb[2] {
		return false
	}
	ta, errA := time.Parse("15:04:05.000", fa[1])
	tb, errB := time.Parse("15:04:05.000", fb[1])
	if errA != nil || errB != nil {
		return fa[1] == fb[1]
	}
	d := ta.Sub(tb)
	return d > -100*time.Millisecond && d < 100*time.Millisecond
}

// TestUplinkKeepsBGPAndBFD runs real BIRD BGP sessions with BFD between a
// host and its ToR over the host's uplink and attaches and detaches
// rw_from_uplink there again and again (tcx and legacy tc): the sessions
// never flap (BGP stays Established since the same instant, BFD stays Up),
// while rw_from_uplink demonstrably saw their packets.
func TestUplinkKeepsBGPAndBFD(t *testing.T) {
	testenv.RequireCommand(t, "bird")
	testenv.RequireCommand(t, "birdc")
	for _, mode := range []string{AttachTCX, AttachTC} {
		t.Run(mode, func(t *testing.T) {
			id := fmt.Sprintf("%d_%d", os.Getpid()%100000, pinSeq.Add(1))
			tor, h := birdtest.NetNS(t, "rwh_tor_"+id), birdtest.NetNS(t, "rwh_hb_"+id)
			birdtest.Veth(t, tor, "rwhtor", "10.212.0.1/24", h, "rwhup", "10.212.0.2/24")
			torBird := birdtest.Start(t, tor, t.TempDir(), fmt.Sprintf(rwhBird, "10.212.0.1", 65001, "10.212.0.2", 65101))
			hBird := birdtest.Start(t, h, t.TempDir(), fmt.Sprintf(rwhBird, "10.212.0.2", 65101, "10.212.0.1", 65001))
			var since string
			deadline := time.Now().Add(60 * time.Second)
			for {
				s, up := birdState(t, hBird, "10.212.0.1")
				if strings.Contains(s, "Established") && up {
					since = s
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("BGP/BFD between host and ToR not up after 60s: %q bfd up %v", s, up)
				}
				time.Sleep(200 * time.Millisecond)
			}
			torSince, _ := birdState(t, torBird, "10.212.0.2")

			d := openTest(t, Options{PinDir: rwhPinDir(t), Attach: mode, HostRouting: HostRoutingBPF})
			// Another program on the uplink before ours (as the services
			// datapath's may be): it must stay attached throughout.
			foreign := foreignProgram(t)
			var foreignLink link.Link
			inNS(t, h, func() {
				ifc, err := net.InterfaceByName("rwhup")
				if err != nil {
					t.Fatal(err)
				}
				if mode == AttachTCX {
					foreignLink, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: foreign, Attach: ebpf.AttachTCXIngress})
					if err != nil {
						t.Fatalf("attach the other tcx program: %v", err)
					}
					t.Cleanup(func() { foreignLink.Close() })
					return
				}
				if err := attachTC(ifc.Index, Egress, foreign); err != nil { // clsact ingress, rackwire's endpoint priority
					t.Fatalf("attach the other tc filter: %v", err)
				}
			})
			t.Cleanup(func() { inNS(t, h, func() { d.SetUplinks(nil) }) })
			const cycles = 4
			for i := range cycles {
				inNS(t, h, func() {
					if err := d.SetUplinks([]string{"rwhup"}); err != nil {
						t.Fatalf("attach cycle %d: %v", i, err)
					}
				})
				if got := d.Uplinks(); len(got) != 1 || got[0] != "rwhup" {
					t.Fatalf("Uplinks() after attach = %v", got)
				}
				time.Sleep(1500 * time.Millisecond)
				inNS(t, h, func() {
					if err := d.SetUplinks(nil); err != nil {
						t.Fatalf("detach cycle %d: %v", i, err)
					}
				})
				if got := d.Uplinks(); len(got) != 0 {
					t.Fatalf("Uplinks() after detach = %v", got)
				}
				time.Sleep(500 * time.Millisecond)
			}
			// Attached at the end, as an agent leaves it.
			inNS(t, h, func() {
				if err := d.SetUplinks([]string{"rwhup"}); err != nil {
					t.Fatal(err)
				}
			})
			time.Sleep(1500 * time.Millisecond)
			s, up := birdState(t, hBird, "10.212.0.1")
			if !sameSince(s, since) || !up {
				t.Errorf("host's session after %d attach/detach cycles: %q, BFD up %v; want %q and up (no flap)", cycles, s, up, since)
			}
			if s2, up2 := birdState(t, torBird, "10.212.0.2"); !sameSince(s2, torSince) || !up2 {
				t.Errorf("ToR's session: %q, BFD up %v; want %q and up", s2, up2, torSince)
			}
			inNS(t, h, func() {
				ifc, _ := net.InterfaceByName("rwhup")
				if mode == AttachTCX {
					res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: ebpf.AttachTCXIngress})
					if err != nil || len(res.Programs) != 2 {
						t.Errorf("tcx ingress of the uplink: %+v, %v; want the other program and rw_from_uplink", res, err)
					}
					return
				}
				fs, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifc.Index}}, netlink.HANDLE_MIN_INGRESS)
				if err != nil || len(fs) != 2 {
					t.Errorf("tc ingress filters of the uplink: %d, %v; want the other filter and rw_from_uplink", len(fs), err)
				}
			})
			cs, err := d.HostRoutingCounters()
			if err != nil {
				t.Fatal(err)
			}
			seen := cs[HRStackNotLocal].Packets
			if seen < 20 {
				t.Errorf("rw_from_uplink passed %d packets to the stack, want the BFD and BGP packets of ~7 s (>= 20)", seen)
			}
			t.Logf("%s: BGP %q, BFD up; rw_from_uplink passed %d of the host's own packets untouched", mode, s, seen)
		})
	}
}

// foreignProgram is a tc program that passes everything on (TC_ACT_UNSPEC:
// TCX_NEXT), standing for another datapath's program on the same device.
func foreignProgram(t *testing.T) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "rwh_other", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestSameSince(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"up 08:22:21.511 Established", "up 08:22:21.510 Established", true},
		{"up 08:22:21.510 Established", "up 08:22:21.510 Established", true},
		{"up 08:22:27.600 Established", "up 08:22:21.510 Established", false}, // re-established: a flap
		{"start 08:22:21.510 Connect", "up 08:22:21.510 Established", false},
		{"", "up 08:22:21.510 Established", false},
	} {
		if got := sameSince(c.a, c.b); got != c.want {
			t.Errorf("sameSince(%q, %q) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}
