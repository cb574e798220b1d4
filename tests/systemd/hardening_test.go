package systemd

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// hardenConfig is testConfig with the BIRD integration on and the given
// attach mode ("tc" is what 5.10 kernels use).
func hardenConfig(attach string) string {
	c := strings.Replace(testConfig, "[datapath]\n", "[datapath]\nattach = \""+attach+"\"\n", 1)
	return c + `[bgp]
enabled = true
router_id = "192.0.2.10"
local_asn = 65101
`
}

// probeResult is what one start of the agent under a given unit could do.
type probeResult struct {
	active    bool
	datapath  string // state and message of the datapath component
	features  string // kernel features that are missing
	runNetns  string // endpoint add --netns /run/netns/X: "ok" or the error
	procRoot  string // --netns /proc/PID/ns/net of a root process with all capabilities
	procNoCap string // ... of a root process without capabilities
	procUser  string // ... of a process of another user
	forward   string // net.ipv4.ip_forward after the endpoint add (was 0)
	socket    string // owner of the API socket
	bgp       string // last apply of bird.conf: "ok" or the error
}

// bootHardened boots a root with the package installed, BIRD running on a
// host address, and returns it.
func bootHardened(t *testing.T, config string) *Root {
	t.Helper()
	dist := t.TempDir()
	deb, _ := BuildPackages(t, "1.0.0", dist)
	t.Cleanup(func() { _ = os.RemoveAll(pinDir) })
	r := Boot(t)
	r.WriteFile("/etc/rackwire/rackwire.toml", []byte(config), 0o644)
	r.CopyIn(deb, "/tmp/rackwire.deb")
	r.Must("dpkg", "-i", "/tmp/rackwire.deb")
	// BIRD needs an IPv4 address for its router id.
	r.Must("ip", "link", "add", "rwf-sd0", "type", "veth", "peer", "name", "rwf-sd1")
	r.Must("ip", "addr", "add", "192.0.2.10/24", "dev", "rwf-sd0")
	r.Must("ip", "link", "set", "rwf-sd0", "up")
	r.Must("ip", "link", "set", "rwf-sd1", "up")
	r.Must("systemctl", "start", "bird")
	return r
}

var probeSeq int

// probe restarts the agent with dropin (none if "") and tries every
// feature once.
func probe(t *testing.T, r *Root, dropin string) probeResult {
	t.Helper()
	var p probeResult
	r.Exec("systemctl", "stop", "rackwired")
	r.Exec("rm", "-f", "/etc/systemd/system/rackwired.service.d/zz-probe.conf")
	if dropin != "" {
		r.WriteFile("/etc/systemd/system/rackwired.service.d/zz-probe.conf", []byte("[Service]\n"+dropin+"\n"), 0o644)
	}
	r.Must("systemctl", "daemon-reload")
	r.Exec("systemctl", "reset-failed", "rackwired")
	r.WriteFile("/var/lib/rackwire/start-now", nil, 0o644)
	mark := len(r.Journal("rackwired"))
	if out, err := r.Exec("systemctl", "start", "rackwired"); err != nil {
		p.datapath = "start failed: " + lastLines(r.Journal("rackwired")[mark:], 12)
		_ = out
		return p
	}
	p.active = r.Show("rackwired", "ActiveState") == "active"
	var st struct {
		Datapath struct{ State, Message string } `json:"datapath"`
		Kernel   []struct {
			Name      string `json:"name"`
			Available bool   `json:"available"`
		} `json:"kernel_features"`
	}
	if out, err := r.Exec("rackwire", "status", "--json"); err == nil {
		_ = json.Unmarshal([]byte(out), &st)
	}
	p.datapath = strings.TrimSpace(st.Datapath.State + " " + st.Datapath.Message)
	var missing []string
	for _, k := range st.Kernel {
		if !k.Available {
			missing = append(missing, k.Name)
		}
	}
	p.features = strings.Join(missing, ",")

	probeSeq++
	n := probeSeq
	r.Must("sysctl", "-qw", "net.ipv4.ip_forward=0")
	add := func(name, netns string) string {
		out, err := r.Exec("rackwire", "endpoint", "add", "--name", name, "--netns", netns, "--labels", "app=web")
		if err != nil {
			return "FAIL: " + lastLines(out, 1)
		}
		return "ok"
	}
	ns := fmt.Sprintf("rwf-p%d", n)
	r.Must("ip", "netns", "add", ns)
	p.runNetns = add(ns, "/run/netns/"+ns)
	p.forward = strings.TrimSpace(r.Must("sysctl", "-n", "net.ipv4.ip_forward"))

	// Workload processes in network namespaces of their own.
	wl := func(unit string, cmd ...string) string {
		args := append([]string{"systemd-run", "--unit", unit, "--quiet"}, cmd...)
		r.Must(args...)
		pid := ""
		WaitFor(10*time.Second, func() bool { pid = r.Show(unit, "MainPID"); return pid != "" && pid != "0" })
		return "/proc/" + pid + "/ns/net"
	}
	p.procRoot = add(fmt.Sprintf("rwf-p%d-root", n), wl(fmt.Sprintf("rwf-wl%d-root", n), "unshare", "--net", "sleep", "infinity"))
	r.Must("ip", "netns", "add", ns+"-nc")
	p.procNoCap = add(fmt.Sprintf("rwf-p%d-nocap", n), wl(fmt.Sprintf("rwf-wl%d-nocap", n), "ip", "netns", "exec", ns+"-nc",
		"setpriv", "--bounding-set=-all", "--inh-caps=-all", "sleep", "infinity"))
	r.Must("ip", "netns", "add", ns+"-u")
	p.procUser = add(fmt.Sprintf("rwf-p%d-user", n), wl(fmt.Sprintf("rwf-wl%d-user", n), "ip", "netns", "exec", ns+"-u",
		"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "infinity"))

	p.socket = strings.TrimSpace(r.Must("stat", "-c", "%a %U:%G", "/run/rackwire/rackwire.sock"))
	WaitFor(15*time.Second, func() bool {
		out, _ := r.Exec("rackwire", "bgp", "status", "--json")
		return strings.Contains(out, `"time"`) && !strings.Contains(out, `"time": "0001`)
	})
	var bs struct {
		LastApply struct {
			OK    bool   `json:"ok"`
			Error string `json:"error"`
		} `json:"last_apply"`
	}
	out, _ := r.Exec("rackwire", "bgp", "status", "--json")
	_ = json.Unmarshal([]byte(out), &bs)
	if bs.LastApply.OK {
		p.bgp = "ok"
	} else {
		p.bgp = "FAIL: " + bs.LastApply.Error
	}
	return p
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, " | ")
}

func TestUnitCapabilities(t *testing.T) {
	testenv.RequireRoot(t)
	r := bootHardened(t, hardenConfig("auto"))
	out, _ := r.Exec("sh", "-c", "stat -c '%n %a %U:%G' /run/bird /run/bird/bird.ctl /etc/bird /etc/bird/bird.conf")
	t.Logf("BIRD's files:\n%s", out)
	t.Logf("bird: %s\n%s", r.Show("bird", "ActiveState"), r.Journal("bird"))
	full := "CAP_NET_ADMIN CAP_SYS_ADMIN CAP_CHOWN CAP_BPF CAP_PERFMON"
	without := func(c string) string {
		var keep []string
		for _, x := range strings.Fields(full) {
			if x != c {
				keep = append(keep, x)
			}
		}
		return "CapabilityBoundingSet=\nCapabilityBoundingSet=" + strings.Join(keep, " ")
	}
	variants := []struct{ name, dropin string }{
		{"as shipped", ""},
		{"-CAP_NET_ADMIN", without("CAP_NET_ADMIN")},
		{"-CAP_SYS_ADMIN", without("CAP_SYS_ADMIN")},
		{"-CAP_CHOWN", without("CAP_CHOWN")},
		{"-CAP_BPF", without("CAP_BPF")},
		{"-CAP_PERFMON", without("CAP_PERFMON")},
		{"-CAP_BPF -CAP_PERFMON", "CapabilityBoundingSet=\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN CAP_CHOWN"},
		{"-CAP_SYS_ADMIN (bpf caps only)", "CapabilityBoundingSet=\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_CHOWN CAP_BPF CAP_PERFMON"},
		{"+CAP_DAC_OVERRIDE", "CapabilityBoundingSet=CAP_DAC_OVERRIDE\nReadWritePaths=/etc/bird"},
		{"+ReadWritePaths=/etc/bird only", "ReadWritePaths=/etc/bird"},
		{"+CAP_SYS_PTRACE", "CapabilityBoundingSet=CAP_SYS_PTRACE"},
	}
	for _, v := range variants {
		p := probe(t, r, v.dropin)
		t.Logf("%-32s active=%v datapath=%q missing=%q\n  /run/netns=%s forward=%s\n  /proc root=%s\n  /proc nocap=%s\n  /proc user=%s\n  socket=%s\n  bgp=%s",
			v.name, p.active, p.datapath, p.features, p.runNetns, p.forward, p.procRoot, p.procNoCap, p.procUser, p.socket, p.bgp)
		if os.Getenv("RWF_FIRST") != "" {
			break
		}
	}
}
