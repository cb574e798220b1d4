package bgp

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/birdconf/birdtest"
	"github.com/rackwire/rackwire/internal/testenv"
)

const svcVIP = "10.96.254.10"

// svcTorConf is the ToR of the service test: as torConf, on its own
// addresses, learning /32 VIPs with ECMP (merge paths).
const svcTorConf = `router id 10.254.200.1;
log stderr all;
protocol device { scan time 1; }
protocol kernel {
	scan time 1;
	merge paths on;
	ipv4 { import none; export where source = RTS_BGP; };
}
protocol static { ipv4; route 0.0.0.0/0 blackhole; }
template bgp host {
	local as 65001;
	connect delay time 1;
	connect retry time 2;
	error wait time 1, 2;
	ipv4 { import all; export where source = RTS_STATIC; };
}
protocol bgp h1 from host { local 10.254.201.1 as 65001; neighbor 10.254.201.2 as 65201; }
protocol bgp h2 from host { local 10.254.202.1 as 65001; neighbor 10.254.202.2 as 65202; }
`

// svcConfig is a host's config with announce_service_vips on and no VIP of
// its own: whatever VIP the ToR learns comes from the service table.
func (h *host) svcConfig() string {
	return fmt.Sprintf(`version = 1
[node]
name = %[1]q
addresses = [%[2]q]
[agent]
state_dir = %[3]q
socket = %[4]q
socket_group = ""
[ipam]
cidrs = [%[5]q]
[store]
backend = "local"
[datapath]
pin_dir = %[6]q
policy_dir = %[7]q
[metrics]
listen = ""
[restart]
jitter_window = "0s"
[log]
level = "info"
format = "text"
[bgp]
enabled = true
bird_config = %[8]q
bird_socket = %[9]q
router_id = %[2]q
local_asn = %[10]d
vip_ranges = ["10.96.0.0/16"]
import = ["0.0.0.0/0"]
announce_service_vips = true

[[bgp.peers]]
name = "tor"
address = %[11]q
asn = 65001
hold_time = 9
keepalive_time = 3
`, h.name, h.uplink, filepath.Join(h.dir, "state"), h.socket, h.cidr,
		"/sys/fs/bpf/"+h.name, filepath.Join(h.dir, "policies.d"), h.birdConf, h.birdSock, h.asn, torAddr(h.uplink))
}

// TestServiceVIPAnnouncedWhileLocalBackendActive: two hosts with
// [bgp] announce_service_vips each have the service "web" with an active
// backend in their own workload CIDR; the ToR (real BIRD) learns the VIP
// from both and installs both next hops. When one host's service has no
// local backend left (its backends are replaced by the other host's), that
// host renders the VIP out and the ToR keeps only the other next hop; a
// local backend again brings it back.
func TestServiceVIPAnnouncedWhileLocalBackendActive(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBPFFS(t)
	testenv.RequireCommand(t, "nsenter")
	testenv.RequireCommand(t, "bird")
	_, cli := binaries(t)

	for _, ns := range []string{"rwsc-tor", "rwsc-h1", "rwsc-h2"} {
		birdtest.NetNS(t, ns)
	}
	birdtest.Veth(t, "rwsc-tor", "rwsc-t1", "10.254.201.1/24", "rwsc-h1", "rwsc-h1u", "10.254.201.2/24")
	birdtest.Veth(t, "rwsc-tor", "rwsc-t2", "10.254.202.1/24", "rwsc-h2", "rwsc-h2u", "10.254.202.2/24")
	torDir := t.TempDir()
	birdtest.Start(t, "rwsc-tor", torDir, svcTorConf)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(torDir, "bird.log"))
			t.Logf("ToR bird log:\n%s", tail(out, 40))
		}
	})
	newHost := func(name, uplink, cidr string, asn int) *host {
		dir := t.TempDir()
		return &host{name: name, ns: name, dir: dir, uplink: uplink, asn: asn, cidr: cidr, cli: cli,
			socket: filepath.Join(dir, "rackwire.sock"), birdConf: filepath.Join(dir, "bird.conf"), birdSock: filepath.Join(dir, "bird.ctl")}
	}
	h1 := newHost("rwsc-h1", "10.254.201.2", "10.254.1.0/24", 65201)
	h2 := newHost("rwsc-h2", "10.254.202.2", "10.254.2.0/24", 65202)
	for _, h := range []*host{h1, h2} {
		h.startBird(t)
		h.runAgent(t, h.svcConfig())
	}
	route := func() string {
		return birdtest.Run(t, "ip", "-n", "rwsc-tor", "route", "show", svcVIP+"/32")
	}
	hops := func() []string {
		var out []string
		f := strings.Fields(route())
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "via" {
				out = append(out, f[i+1])
			}
		}
		return out
	}
	waitFor(t, "both host CIDRs on the ToR (sessions up)", 60*time.Second, func() bool {
		r1 := birdtest.Run(t, "ip", "-n", "rwsc-tor", "route", "show", "10.254.1.0/24")
		r2 := birdtest.Run(t, "ip", "-n", "rwsc-tor", "route", "show", "10.254.2.0/24")
		return strings.Contains(r1, "via 10.254.201.2") && strings.Contains(r2, "via 10.254.202.2")
	})
	if r := route(); strings.TrimSpace(r) != "" {
		t.Fatalf("the ToR has a route to %s before any service: %q", svcVIP, r)
	}

	// Each host: web with one backend in its own CIDR (local, active) and
	// one on the other host.
	h1.mustRW(t, "service", "add", "web", "--vip", svcVIP, "--port", "80", "--backends", "10.254.1.10:8080,10.254.2.10:8080")
	h2.mustRW(t, "service", "add", "web", "--vip", svcVIP, "--port", "80", "--backends", "10.254.1.10:8080,10.254.2.10:8080")
	d := waitFor(t, "the VIP with both hosts as next hops on the ToR", 60*time.Second, func() bool {
		h := hops()
		return len(h) == 2 && contains(h, "10.254.201.2") && contains(h, "10.254.202.2")
	})
	t.Logf("ToR route to the VIP after %v:\n%s", d.Truncate(time.Millisecond), route())

	// h2 loses its local backend: it withdraws, h1 stays.
	h2.mustRW(t, "service", "add", "web", "--vip", svcVIP, "--port", "80", "--backends", "10.254.1.10:8080")
	d = waitFor(t, "h2's announcement withdrawn, h1's kept", 30*time.Second, func() bool {
		r := route()
		return strings.Contains(r, "via 10.254.201.2") && !strings.Contains(r, "10.254.202.2")
	})
	t.Logf("withdrawn from the ToR %v after h2's last local backend left:\n%s", d.Truncate(time.Millisecond), route())
	fmt.Printf("bgp: service VIP withdrawn from the ToR %v after the host's last local backend left\n", d.Truncate(time.Millisecond))
	if out, err := os.ReadFile(h2.birdConf); err != nil || strings.Contains(string(out), svcVIP) {
		t.Errorf("h2's rendered bird.conf still names %s (err %v)", svcVIP, err)
	}

	// Back again.
	h2.mustRW(t, "service", "add", "web", "--vip", svcVIP, "--port", "80", "--backends", "10.254.1.10:8080,10.254.2.10:8080")
	waitFor(t, "h2 announces again", 30*time.Second, func() bool { return len(hops()) == 2 })
	// Deleting the service withdraws it everywhere.
	h1.mustRW(t, "service", "delete", "web")
	h2.mustRW(t, "service", "delete", "web")
	waitFor(t, "the VIP gone from the ToR", 30*time.Second, func() bool { return strings.TrimSpace(route()) == "" })
}
