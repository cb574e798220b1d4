package datapath

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/rackwire/rackwire/internal/testenv"
)

// previousReleases are the commits of earlier map layouts, with what each
// pinned that this release retires.
var previousReleases = []struct {
	commit  string
	layout  int
	retired []string // maps it pinned that this release removes
	uplink  bool     // it has host routing: the helper attaches rw_from_uplink to upgradeUplink
}{
	{"c484b0a", 1, []string{"rw_ct4", "rw_ct6"}, false}, // the first release: one CT map per family
	{"8ed9d80", 2, nil, true},                           // 48-byte ct_entry, without the next hop
}

// upgradeUplink is the device of the upgrade topology (a veth, its peer
// left alone) that a release with host routing puts rw_from_uplink on.
const upgradeUplink = "rwupl"

// oldHelper is a program built from the previous release's tree that opens
// its datapath over a pin directory, attaches endpoints A and B of a topo,
// writes their identities and policies, with a fourth argument attaches
// rw_from_uplink to that device, and exits: the old agent.
const oldHelper = `package main

import (
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strconv"

	"github.com/rackwire/rackwire/daemon/datapath"
)

func main() {
	ifA, _ := strconv.Atoi(os.Args[2])
	ifB, _ := strconv.Atoi(os.Args[3])
	d, err := datapath.Open(datapath.Options{PinDir: os.Args[1], NoRedirectPeer: true, CTMaxEntries: 4096, IPCacheMaxEntries: 4096, PolicyMaxEntries: 1024HOSTROUTING}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		panic(err)
	}
	ipA, ipB := netip.MustParseAddr("10.201.1.2"), netip.MustParseAddr("10.201.2.2")
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	must(d.AttachEndpoint(datapath.EndpointSpec{ID: 401, IfIndex: ifA, IPs: []netip.Addr{ipA}, Identity: 70401}))
	must(d.AttachEndpoint(datapath.EndpointSpec{ID: 402, IfIndex: ifB, IPs: []netip.Addr{ipB}, Identity: 70402}))
	must(d.UpsertIPCache(netip.PrefixFrom(ipA, 32), 70401, netip.Addr{}))
	must(d.UpsertIPCache(netip.PrefixFrom(ipB, 32), 70402, netip.Addr{}))
	must(d.SetPolicy(401, []datapath.Entry{{Identity: 70402, Direction: datapath.Egress}}))
	must(d.SetPolicy(402, []datapath.Entry{
		{Identity: 70401, Direction: datapath.Ingress, Proto: 17, Port: 5353},
		{Identity: 70401, Direction: datapath.Ingress, Proto: 6, Port: 8080},
	}))
	UPLINKS
	d.Close()
}
`

// buildOldHelper extracts commit and builds oldHelper in it; with uplink
// the helper opens its datapath with host routing "bpf" and attaches
// rw_from_uplink to the device its fourth argument names.
func buildOldHelper(t *testing.T, commit string, uplink bool) string {
	t.Helper()
	testenv.RequireCommand(t, "git")
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("find the repository: %v", err)
	}
	src := t.TempDir()
	cmd := exec.Command("sh", "-c", fmt.Sprintf("git -C %s archive %s | tar -x -C %s", strings.TrimSpace(string(top)), commit, src))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("extract %s (a CI clone needs full history): %v\n%s", commit, err, out)
	}
	dir := filepath.Join(src, "cmd", "rwctold")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src2, uplinks := strings.Replace(oldHelper, "HOSTROUTING", "", 1), ""
	if uplink {
		src2 = strings.Replace(oldHelper, "HOSTROUTING", ", HostRouting: datapath.HostRoutingBPF", 1)
		uplinks = "must(d.SetUplinks(os.Args[4:]))"
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(strings.Replace(src2, "UPLINKS", uplinks, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "rwctold")
	b := exec.Command("go", "build", "-o", bin, "./cmd/rwctold")
	b.Dir = src
	if out, err := b.CombinedOutput(); err != nil {
		t.Fatalf("build the previous release's datapath: %v\n%s", err, out)
	}
	return bin
}

// TestUpgradeFromPreviousRelease: an earlier release's datapath enforces
// two endpoints with a UDP stream running; this release opens the same
// pins, migrates them (layout 1: split CT maps filled from rw_ct4; layout
// 2: CT maps re-created with the longer entry, filled from the old ones;
// programs swapped in place) without losing one packet of the stream,
// keeps enforcing the policy, removes the old maps and records the
// current layout version.
func TestUpgradeFromPreviousRelease(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	// nsenter, not "ip netns exec": that one remounts /sys, and the pins
	// would land on a private bpffs.
	testenv.RequireCommand(t, "nsenter")
	for i, rel := range previousReleases {
		t.Run(fmt.Sprintf("layout%d", rel.layout), func(t *testing.T) {
			upgradeFrom(t, buildOldHelper(t, rel.commit, rel.uplink), fmt.Sprint(i), rel.layout, rel.retired, rel.uplink)
		})
	}
}

// upgradeFrom is TestUpgradeFromPreviousRelease from the release whose
// helper is bin, layout its map layout, retired the maps it pinned that
// this release removes; tag tells the topologies apart. With uplink the
// old agent put its rw_from_uplink on a device, which must carry
// this release's as soon as the new datapath is open, before the agent
// sets its uplinks.
func upgradeFrom(t *testing.T, bin, tag string, layout int, retired []string, uplink bool) {
	tp := newTopoPrefix(t, "rwct", "u"+tag)
	dir := testPinDir(t)
	args := []string{"nsenter", "--net=/run/netns/" + tp.host, bin, dir, fmt.Sprint(tp.ifA), fmt.Sprint(tp.ifB)}
	if uplink {
		sh(t, "ip", "-n", tp.host, "link", "add", upgradeUplink, "type", "veth", "peer", "name", upgradeUplink+"p")
		sh(t, "ip", "-n", tp.host, "link", "set", upgradeUplink, "up")
		args = append(args, upgradeUplink)
	}
	sh(t, args...)
	uplinkProg := func() ebpf.ProgramID {
		return pinnedLinkInfo(t, filepath.Join(dir, "links", "rw_uplink_"+upgradeUplink)).Program
	}
	var oldUplink ebpf.ProgramID
	if uplink {
		oldUplink = uplinkProg()
	}
	if v, err := ReadLayout(dir); err != nil || v != layout {
		t.Fatalf("ReadLayout(previous release's pins) = %d, %v; want %d", v, err, layout)
	}
	for _, old := range retired {
		if _, err := os.Stat(filepath.Join(dir, old)); err != nil {
			t.Fatalf("the previous release pinned no %s: %v", old, err)
		}
	}
	echoServers(t, tp.b, tp.ipB, []int{8080}, 5353)
	if tp.ping(t, tp.a, tp.ipB) {
		t.Fatal("ping A->B passed under the previous release (B allows only UDP 5353 and TCP 8080)")
	}

	// The stream: a datagram every 5 ms with a sequence number, echoed.
	var conn net.Conn
	inNS(t, tp.a, func() {
		var err error
		conn, err = net.Dial("udp", netip.AddrPortFrom(tp.ipB, 5353).String())
		if err != nil {
			t.Fatal(err)
		}
	})
	defer conn.Close()
	var sent, got atomic.Int64
	stop := make(chan struct{})
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		buf := make([]byte, 16)
		for {
			conn.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := conn.Read(buf); err != nil {
				select {
				case <-stop:
					return
				default:
					continue
				}
			}
			got.Add(1)
		}
	}()
	sendDone := make(chan struct{})
	go func() {
		defer close(sendDone)
		for i := 0; i < 4000; i++ { // bounded: 20 s
			select {
			case <-stop:
				return
			default:
			}
			if _, err := conn.Write([]byte(fmt.Sprintf("%08d", i))); err == nil {
				sent.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(500 * time.Millisecond)
	if got.Load() == 0 {
		t.Fatal("no echo of the stream under the previous release")
	}

	var d *Datapath
	inNS(t, tp.host, func() { d = openTest(t, Options{PinDir: dir, NoRedirectPeer: true}) })
	if uplink {
		info, err := d.uplink.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		if got := uplinkProg(); got != id || got == oldUplink {
			t.Errorf("after Open, %s runs program %d (the old agent's was %d), want this release's rw_from_uplink %d", upgradeUplink, got, oldUplink, id)
		}
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-sendDone
	time.Sleep(300 * time.Millisecond) // the last echoes
	<-recvDone
	if s, g := sent.Load(), got.Load(); s != g || s < 150 {
		t.Errorf("stream across the upgrade: %d sent, %d echoed (want all, and at least 150)", s, g)
	} else {
		t.Logf("stream across the upgrade: %d sent, %d echoed, 0 lost", s, g)
	}

	if v, err := ReadLayout(dir); err != nil || v != layoutVersion {
		t.Errorf("ReadLayout after the upgrade = %d, %v; want %d", v, err, layoutVersion)
	}
	for _, old := range retired {
		if _, err := os.Stat(filepath.Join(dir, old)); err == nil {
			t.Errorf("%s still pinned after the upgrade", old)
		}
	}
	for _, name := range []string{"rw_ct4_tcp", "rw_ct4_other", "rw_ct6_tcp", "rw_ct6_other"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			t.Errorf("%s after the upgrade: %v", name, err)
			continue
		}
		if got, want := m.ValueSize(), uint32(binary.Size(ctEntry{})); got != want {
			t.Errorf("%s pinned with %d-byte values after the upgrade, want %d", name, got, want)
		}
		m.Close()
	}
	es, err := d.CT()
	if err != nil {
		t.Fatal(err)
	}
	if len(es) == 0 {
		t.Error("no CT entries after the upgrade: the stream's entries were not carried")
	}
	// Policy still enforced by the new programs, before and after the
	// new agent attaches the endpoints again.
	for _, when := range []string{"migrated", "re-attached"} {
		if tp.ping(t, tp.a, tp.ipB) {
			t.Errorf("%s: ping A->B (not allowed) passed", when)
		}
		if !udpEcho(t, tp.a, netip.AddrPortFrom(tp.ipB, 5353)) {
			t.Errorf("%s: new UDP A->B:5353 (allowed) failed", when)
		}
		if when == "migrated" {
			inNS(t, tp.host, func() {
				for _, ep := range []EndpointSpec{
					{ID: 401, IfIndex: tp.ifA, IPs: []netip.Addr{tp.ipA}, Identity: 70401},
					{ID: 402, IfIndex: tp.ifB, IPs: []netip.Addr{tp.ipB}, Identity: 70402},
				} {
					if err := d.AttachEndpoint(ep); err != nil {
						t.Fatalf("AttachEndpoint(%+v) = %v", ep, err)
					}
				}
			})
		}
	}
	t.Cleanup(func() {
		inNS(t, tp.host, func() {
			d.DetachEndpoint(401, tp.ifA)
			d.DetachEndpoint(402, tp.ifB)
		})
	})
}

// udpEcho reports whether one datagram from namespace ns to dst is echoed.
func udpEcho(t *testing.T, ns string, dst netip.AddrPort) bool {
	t.Helper()
	var (
		c   net.Conn
		err error
	)
	inNS(t, ns, func() { c, err = net.Dial("udp", dst.String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return false
	}
	buf := make([]byte, 8)
	n, err := c.Read(buf)
	return err == nil && string(buf[:n]) == "ping"
}
