package systemd

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/testenv"
)

// exposureMax is the overall exposure `systemd-analyze security` gives the
// shipped unit (systemd 252), as docs/packaging.md records it; the suite
// fails if a change makes it worse.
const exposureMax = 3.4

// bgpConfig is testConfig with the BIRD integration on and the given attach
// mode ("tc" is what kernels before 6.6, e.g. 5.10, get) and store section.
func bgpConfig(attach, store string) string {
	c := strings.Replace(testConfig, "[datapath]\n", "[datapath]\nattach = \""+attach+"\"\n", 1)
	return c + store + `[bgp]
enabled = true
router_id = "192.0.2.10"
local_asn = 65101
`
}

// bootWithBIRD boots a root, gives it the address BIRD takes its router id
// from, starts BIRD, writes config and installs the package.
func bootWithBIRD(t *testing.T, config string) *Root {
	t.Helper()
	dist := t.TempDir()
	deb, _ := BuildPackages(t, "1.0.0", dist)
	t.Cleanup(func() { _ = os.RemoveAll(pinDir) })
	r := Boot(t)
	r.Must("ip", "link", "add", "rwf-sd0", "type", "veth", "peer", "name", "rwf-sd1")
	r.Must("ip", "addr", "add", "192.0.2.10/24", "dev", "rwf-sd0")
	r.Must("ip", "link", "set", "rwf-sd0", "up")
	r.Must("ip", "link", "set", "rwf-sd1", "up")
	r.Must("systemctl", "start", "bird")
	r.WriteFile("/etc/rackwire/rackwire.toml", []byte(config), 0o644)
	r.CopyIn(deb, "/tmp/rackwire.deb")
	r.Must("dpkg", "-i", "/tmp/rackwire.deb")
	return r
}

// startAgent (re)starts rackwired past the restart gate with the drop-in
// zz-test.conf set to dropin ("" removes it) and reports whether it became
// active; the journal of a failed start comes back as the error.
func startAgent(r *Root, dropin string) error {
	const p = "/etc/systemd/system/rackwired.service.d/zz-test.conf"
	r.Exec("systemctl", "stop", "rackwired")
	r.Exec("rm", "-f", p)
	if dropin != "" {
		r.WriteFile(p, []byte("[Service]\n"+dropin+"\n"), 0o644)
	}
	r.Must("systemctl", "daemon-reload")
	// Every variant starts once; systemd's start limit is not under test.
	r.Exec("systemctl", "reset-failed", "rackwired")
	r.WriteFile("/var/lib/rackwire/start-now", nil, 0o644)
	mark := len(r.Journal("rackwired"))
	if _, err := r.Exec("systemctl", "start", "rackwired"); err != nil || r.Show("rackwired", "ActiveState") != "active" {
		return fmt.Errorf("start failed: %s", firstError(r.Journal("rackwired")[mark:]))
	}
	return nil
}

// firstError returns the first error the agent logged in journal, cut
// short (a verifier log runs to megabytes), or its last lines.
func firstError(journal string) string {
	for _, l := range strings.Split(journal, "\n") {
		if strings.Contains(l, `"level":"ERROR"`) {
			if len(l) > 400 {
				l = l[:400] + " ..."
			}
			return l
		}
	}
	return lastLines(journal, 4)
}

func status(r *Root) (api.Status, error) {
	var st api.Status
	out, err := r.Exec("rackwire", "status", "--json")
	if err != nil {
		return st, fmt.Errorf("rackwire status: %v: %s", err, out)
	}
	return st, json.Unmarshal([]byte(out), &st)
}

// bgpApplied waits for the first apply of bird.conf after a start.
func bgpApplied(r *Root) api.BGPStatus {
	var bs api.BGPStatus
	WaitFor(20*time.Second, func() bool {
		out, err := r.Exec("rackwire", "bgp", "status", "--json")
		return err == nil && json.Unmarshal([]byte(out), &bs) == nil && !bs.LastApply.Time.IsZero()
	})
	return bs
}

// workload runs cmd as a transient unit and returns /proc/PID/ns/net of it
// once it runs in a network namespace other than PID 1's.
func workload(t *testing.T, r *Root, unit string, cmd ...string) string {
	t.Helper()
	r.Must(append([]string{"systemd-run", "--quiet", "--unit", unit}, cmd...)...)
	host := strings.TrimSpace(r.Must("readlink", "/proc/1/ns/net"))
	path := ""
	if !WaitFor(10*time.Second, func() bool {
		pid := r.Show(unit, "MainPID")
		if pid == "" || pid == "0" {
			return false
		}
		path = "/proc/" + pid + "/ns/net"
		ns, err := r.Exec("readlink", path)
		comm, _ := r.Exec("cat", "/proc/"+pid+"/comm")
		return err == nil && strings.TrimSpace(ns) != host && strings.TrimSpace(comm) == "sleep"
	}) {
		t.Fatalf("workload %s never ran in a namespace of its own", unit)
	}
	return path
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, " | ")
}

// probe is what one start of the agent under one capability set could do.
type probe struct {
	start     error
	datapath  string // datapath component: state and message
	missing   string // kernel features reported unavailable
	runNetns  string // endpoint add --netns /run/netns/X: "ok" or the error
	forward   string // net.ipv4.ip_forward after that add (set to 0 before)
	procRoot  string // --netns /proc/PID/ns/net of a root process with every capability
	procNoCap string // ... of a root process without capabilities
	procUser  string // ... of a process of another user
	socket    string // owner and mode of the API socket
	bgp       string // the last apply of bird.conf: "ok" or its error
}

func (p probe) String() string {
	if p.start != nil {
		return p.start.Error()
	}
	return fmt.Sprintf("datapath %q missing=%q | /run/netns: %s (ip_forward %s) | /proc root: %s | /proc root no caps: %s | /proc other user: %s | socket %s | bird.conf: %s",
		p.datapath, p.missing, p.runNetns, p.forward, p.procRoot, p.procNoCap, p.procUser, p.socket, p.bgp)
}

func runProbe(t *testing.T, r *Root, n int, dropin string) probe {
	t.Helper()
	var p probe
	if p.start = startAgent(r, dropin); p.start != nil {
		return p
	}
	if st, err := status(r); err == nil {
		p.datapath = strings.TrimSpace(st.Datapath.State + " " + st.Datapath.Message)
		var missing []string
		for _, k := range st.Kernel {
			if !k.Available {
				missing = append(missing, k.Name)
			}
		}
		p.missing = strings.Join(missing, ",")
	} else {
		p.datapath = err.Error()
	}
	add := func(name, netns string) string {
		out, err := r.Exec("rackwire", "endpoint", "add", "--name", name, "--netns", netns, "--labels", "app=web")
		if err != nil {
			return "FAIL: " + lastLines(out, 1)
		}
		return "ok"
	}
	ns := fmt.Sprintf("rwf-c%d", n)
	r.Must("sysctl", "-qw", "net.ipv4.ip_forward=0")
	r.Must("ip", "netns", "add", ns)
	p.runNetns = add(ns, "/run/netns/"+ns)
	p.forward = strings.TrimSpace(r.Must("sysctl", "-n", "net.ipv4.ip_forward"))
	p.procRoot = add(ns+"-root", workload(t, r, ns+"-root", "unshare", "--net", "sleep", "infinity"))
	r.Must("ip", "netns", "add", ns+"-nocap")
	p.procNoCap = add(ns+"-nocap", workload(t, r, ns+"-nocap", "ip", "netns", "exec", ns+"-nocap",
		"setpriv", "--bounding-set=-all", "--inh-caps=-all", "sleep", "infinity"))
	r.Must("ip", "netns", "add", ns+"-user")
	p.procUser = add(ns+"-user", workload(t, r, ns+"-user", "ip", "netns", "exec", ns+"-user",
		"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "infinity"))
	p.socket = strings.TrimSpace(r.Must("stat", "-c", "%a %U:%G", "/run/rackwire/rackwire.sock"))
	if bs := bgpApplied(r); bs.LastApply.OK {
		p.bgp = "ok"
	} else {
		p.bgp = "FAIL: " + bs.LastApply.Error
	}
	return p
}

// TestUnitCapabilities is the measurement behind the unit's bounding set:
// the agent is started under the shipped unit, then with one capability
// taken away or added in a drop-in, and tries every privileged thing it
// does. Each capability in the set must be missed by something; what the
// unit does not grant is shown to be needed only by what the unit's
// comments say.
func TestUnitCapabilities(t *testing.T) {
	testenv.RequireRoot(t)
	r := bootWithBIRD(t, bgpConfig("auto", ""))
	// The postinst linked the BGP drop-in (the config enables BGP); this
	// test decides about capabilities itself.
	r.Must("rm", "-f", bgpDropin)
	out, _ := r.Exec("sh", "-c", "stat -c '%n %a %U:%G' /etc/bird /etc/bird/bird.conf /run/bird/bird.ctl")
	t.Logf("BIRD's files as Debian's bird2 sets them:\n%s", out)

	set := "CAP_NET_ADMIN CAP_SYS_ADMIN CAP_CHOWN CAP_BPF CAP_PERFMON"
	only := func(drop ...string) string {
		var keep []string
		for _, c := range strings.Fields(set) {
			dropped := false
			for _, d := range drop {
				dropped = dropped || c == d
			}
			if !dropped {
				keep = append(keep, c)
			}
		}
		return "CapabilityBoundingSet=\nCapabilityBoundingSet=" + strings.Join(keep, " ")
	}
	ok := func(s string) bool { return s == "ok" }
	bgpDropin, err := os.ReadFile(filepath.Join(RepoRoot(t), "packaging", "systemd", "rackwired-bgp.conf"))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, dropin string
		// want says what must hold; "" when it does.
		want func(p probe) string
	}{
		{"as shipped", "", func(p probe) string {
			switch {
			case p.start != nil || p.datapath != "ok" || p.missing != "":
				return "the datapath must load with every kernel feature"
			case !ok(p.runNetns) || p.forward != "1":
				return "a /run/netns endpoint must be plumbed and forwarding turned on"
			case !ok(p.procNoCap):
				return "/proc/PID/ns/net of a root process without capabilities must work"
			case ok(p.procRoot) || ok(p.procUser):
				return "/proc/PID/ns/net of a fully privileged or foreign process needs CAP_SYS_PTRACE, which is not granted"
			case p.socket != "660 root:rackwire":
				return "the socket must be root:rackwire 0660"
			case ok(p.bgp) || !strings.Contains(p.bgp, "permission denied"):
				return "bird.conf must be out of reach without the BGP drop-in"
			}
			return ""
		}},
		{"without CAP_NET_ADMIN", only("CAP_NET_ADMIN"), func(p probe) string {
			if p.start == nil && ok(p.runNetns) {
				return "routes and links must fail"
			}
			return ""
		}},
		{"without CAP_SYS_ADMIN", only("CAP_SYS_ADMIN"), func(p probe) string {
			switch {
			case p.start != nil || p.datapath != "ok" || p.missing != "":
				return "BPF must not need CAP_SYS_ADMIN (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN do)"
			case ok(p.runNetns) || !strings.Contains(p.runNetns, "network namespace") || !strings.Contains(p.runNetns, "not permitted"):
				return "setns into the endpoint's namespace must fail"
			}
			return ""
		}},
		{"without CAP_CHOWN", only("CAP_CHOWN"), func(p probe) string {
			if p.start == nil && p.socket == "660 root:rackwire" {
				return "the socket must stay root:root"
			}
			return ""
		}},
		{"without CAP_SYS_ADMIN, CAP_BPF", only("CAP_SYS_ADMIN", "CAP_BPF"), func(p probe) string {
			if p.start == nil {
				return "the datapath must not load"
			}
			return ""
		}},
		{"without CAP_SYS_ADMIN, CAP_PERFMON", only("CAP_SYS_ADMIN", "CAP_PERFMON"), func(p probe) string {
			if p.start == nil {
				return "the verifier must reject the datapath"
			}
			return ""
		}},
		{"without CAP_BPF, CAP_PERFMON", only("CAP_BPF", "CAP_PERFMON"), nil},
		{"with group bird and /etc/bird writable", "SupplementaryGroups=bird\nReadWritePaths=/etc/bird", func(p probe) string {
			if ok(p.bgp) {
				return "group bird alone was expected not to be enough (no write to /etc/bird)"
			}
			return ""
		}},
		{"with rackwired-bgp.conf", strings.SplitN(string(bgpDropin), "[Service]\n", 2)[1], func(p probe) string {
			if !ok(p.bgp) {
				return "bird.conf must be applied"
			}
			return ""
		}},
		{"with CAP_SYS_PTRACE", "CapabilityBoundingSet=CAP_SYS_PTRACE", func(p probe) string {
			if !ok(p.procRoot) || !ok(p.procUser) {
				return "/proc/PID/ns/net of any process must work"
			}
			return ""
		}},
	}
	var table strings.Builder
	for i, c := range cases {
		p := runProbe(t, r, i, c.dropin)
		fmt.Fprintf(&table, "%s:\n    %s\n", c.name, p)
		if c.want != nil {
			if msg := c.want(p); msg != "" {
				t.Errorf("%s: %s; got:\n    %s", c.name, msg, p)
			}
		}
	}
	t.Logf("capability measurements (kernel %s):\n%s", strings.TrimSpace(r.Must("uname", "-r")), table.String())
}

// TestHardenedUnit runs every feature under the shipped unit and its BGP
// drop-in at once: Consul as the store, BIRD reconfigured through its
// socket, endpoints attached with tcx and with legacy tc (the 5.10 path),
// forwarding sysctls; and logs the unit's exposure score.
func TestHardenedUnit(t *testing.T) {
	testenv.RequireRoot(t)
	consul := testenv.RequireCached(t, "consul")
	if real, err := filepath.EvalSymlinks(consul); err == nil {
		consul = real
	}
	store := "[store]\nbackend = \"consul\"\naddress = \"127.0.0.1:8500\"\n"
	r := bootWithBIRD(t, bgpConfig("auto", store))

	// The postinst saw [bgp] enabled and linked the drop-in.
	if got, err := r.Exec("readlink", bgpDropin); err != nil ||
		strings.TrimSpace(got) != "/usr/share/rackwire/systemd/rackwired-bgp.conf" {
		t.Errorf("postinst did not link the BGP drop-in for a config with [bgp] enabled: %v %s", err, got)
	}
	if out, err := r.Exec("systemd-analyze", "verify", "rackwired.service"); err != nil || strings.Contains(out, "rackwired") {
		t.Errorf("systemd-analyze verify of the unit with its BGP drop-in: %v\n%s", err, out)
	}
	_, line := exposure(t, r)
	t.Logf("with the BGP drop-in: %s", line)

	// A dev Consul in the root's network namespace.
	r.BindIn(consul, "/usr/local/bin/consul", true)
	r.Must("systemd-run", "--quiet", "--unit", "rwf-consul", "/usr/local/bin/consul", "agent", "-dev",
		"-bind", "127.0.0.1", "-client", "127.0.0.1")
	if !WaitFor(60*time.Second, func() bool {
		out, err := r.Exec("/usr/local/bin/consul", "operator", "raft", "list-peers")
		return err == nil && strings.Contains(out, "leader")
	}) {
		t.Fatalf("dev Consul did not come up:\n%s", r.Journal("rwf-consul"))
	}

	for _, attach := range []string{"tcx", "tc"} {
		r.WriteFile("/etc/rackwire/rackwire.toml", []byte(bgpConfig(attach, store)), 0o644)
		if err := startAgent(r, ""); err != nil {
			t.Fatalf("attach %s: %v", attach, err)
		}
		st, err := status(r)
		if err != nil {
			t.Fatal(err)
		}
		if st.Store.State != api.StateOK || st.Datapath.State != api.StateOK || st.Datapath.Detail["attach"] != attach {
			t.Errorf("attach %s: store %s %q, datapath %s %q %v", attach, st.Store.State, st.Store.Message,
				st.Datapath.State, st.Datapath.Message, st.Datapath.Detail)
		}
		for _, k := range st.Kernel {
			if !k.Available {
				t.Errorf("attach %s: kernel feature %s reported missing under the unit", attach, k.Name)
			}
		}

		name := "rwf-h-" + attach
		r.Must("ip", "netns", "add", name)
		r.Must("sysctl", "-qw", "net.ipv4.ip_forward=0")
		if out, err := r.Exec("rackwire", "endpoint", "add", "--name", name, "--netns", "/run/netns/"+name, "--labels", "app=web"); err != nil {
			t.Fatalf("attach %s: endpoint add: %v\n%s\n%s", attach, err, out, r.Journal("rackwired"))
		}
		if got := strings.TrimSpace(r.Must("sysctl", "-n", "net.ipv4.ip_forward")); got != "1" {
			t.Errorf("attach %s: ip_forward = %s after an endpoint, want 1", attach, got)
		}
		var ep api.Endpoint
		if err := json.Unmarshal([]byte(r.Must("rackwire", "endpoint", "get", name, "--json")), &ep); err != nil {
			t.Fatal(err)
		}
		if out := r.Must("ip", "-n", name, "-4", "addr", "show", "dev", "eth0"); !strings.Contains(out, ep.IPv4+"/32") {
			t.Errorf("attach %s: eth0 in the endpoint's namespace lacks %s:\n%s", attach, ep.IPv4, out)
		}
		links := listDir(filepath.Join(pinDir, "links"))
		filters := r.Must("tc", "filter", "show", "dev", ep.HostIfName, "ingress")
		switch attach {
		case "tcx":
			id := fmt.Sprintf("rw_ep_%05d_", ep.ID)
			if !strings.Contains(strings.Join(links, " "), id+"from") || !strings.Contains(strings.Join(links, " "), id+"to") {
				t.Errorf("tcx: no pinned links %s{from,to} in %v", id, links)
			}
		case "tc":
			if !strings.Contains(filters, "rw_from_endpoint") {
				t.Errorf("tc: no rw_from_endpoint filter on %s ingress:\n%s", ep.HostIfName, filters)
			}
		}
		t.Logf("attach %s: endpoint %s %s on %s, identity %d", attach, name, ep.IPv4, ep.HostIfName, ep.Identity)

		// BIRD: bird.conf rewritten (owner kept) and BIRD reconfigured
		// through bird.ctl.
		bs := bgpApplied(r)
		if !bs.LastApply.OK || !bs.BirdRunning {
			t.Errorf("attach %s: BGP under the unit: running=%v %s, last apply %+v", attach, bs.BirdRunning, bs.BirdError, bs.LastApply)
		}
		if got := strings.TrimSpace(r.Must("stat", "-c", "%a %U:%G", "/etc/bird/bird.conf")); got != "640 bird:bird" {
			t.Errorf("bird.conf is %s after the agent wrote it, want 640 bird:bird", got)
		}
		if !strings.Contains(r.Must("head", "-n", "3", "/etc/bird/bird.conf"), "rackwire") {
			t.Errorf("bird.conf was not written by the agent:\n%s", r.Must("head", "-n", "3", "/etc/bird/bird.conf"))
		}
	}

	// Consul holds this node and the endpoints' identity.
	if out, err := r.Exec("/usr/local/bin/consul", "kv", "get", "-recurse", "rackwire/"); err != nil ||
		!strings.Contains(out, "state/nodes/v1/default/rwf-systemd") {
		t.Errorf("Consul has no node record of the agent: %v\n%s", err, out)
	}

	// Reload under the hardening (it re-renders bird.conf, re-reads
	// policies) keeps the process and the store.
	pid := r.Show("rackwired", "MainPID")
	mark := len(r.Journal("rackwired"))
	r.Must("systemctl", "reload", "rackwired")
	if !WaitFor(10*time.Second, func() bool { return strings.Contains(r.Journal("rackwired")[mark:], "Reloaded") }) {
		t.Errorf("no reload:\n%s", r.Journal("rackwired")[mark:])
	}
	if got := r.Show("rackwired", "MainPID"); got != pid {
		t.Errorf("reload restarted the agent: %s -> %s", pid, got)
	}
	if st, err := status(r); err != nil || st.Store.State != api.StateOK {
		t.Errorf("after reload: %v store %+v", err, st.Store)
	}

	// The link goes with the package (its target does).
	r.Must("dpkg", "-r", "rackwire")
	if _, err := r.Exec("test", "-L", bgpDropin); err == nil {
		t.Errorf("dpkg -r left the BGP drop-in link %s", bgpDropin)
	}
}

// exposure returns the overall exposure of rackwired.service in the root.
func exposure(t *testing.T, r *Root) (float64, string) {
	t.Helper()
	out, _ := r.Exec("systemd-analyze", "security", "--no-pager", "rackwired.service")
	m := regexp.MustCompile(`(?m)^.*Overall exposure level for rackwired\.service: ([0-9.]+).*$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in systemd-analyze security rackwired.service:\n%s", out)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v, strings.TrimSpace(m[0])
}
