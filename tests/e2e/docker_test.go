package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/internal/testenv"
)

// dockerd is a private Docker daemon: its own data root, exec root (so its
// own containerd and sandbox namespaces), API socket and containerd
// namespace; no iptables, no bridge. Only the plugin directory
// (/run/docker/plugins) is the host's: dockerd has no flag for it, so the
// rackwire driver gets a name of its own there (rwd-<pid>).
type dockerd struct {
	t    *testing.T
	dir  string
	sock string

	mu  sync.Mutex
	cmd *exec.Cmd
}

func newDockerd(t *testing.T) *dockerd {
	t.Helper()
	testenv.RequireCommand(t, "dockerd")
	testenv.RequireCommand(t, "docker")
	dir, err := os.MkdirTemp("", "rwd-docker-")
	if err != nil {
		t.Fatal(err)
	}
	d := &dockerd{t: t, dir: dir, sock: filepath.Join(dir, "docker.sock")}
	t.Cleanup(func() {
		out, _ := d.run("ps", "-aq")
		for _, id := range strings.Fields(out) {
			_, _ = d.run("rm", "-f", id)
		}
		d.stop()
		d.killShims()
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(dir, "dockerd.log")); err == nil {
				t.Logf("dockerd log (tail):\n%s", tail(string(b), 40))
			}
		}
		time.Sleep(500 * time.Millisecond)
		if ms, err := filepath.Glob(filepath.Join(dir, "exec", "netns", "*")); err == nil {
			for _, m := range ms {
				_ = exec.Command("umount", m).Run()
			}
		}
		_ = exec.Command("umount", "-R", filepath.Join(dir, "exec")).Run()
		_ = exec.Command("umount", "-R", filepath.Join(dir, "data")).Run()
		_ = os.RemoveAll(dir)
	})
	d.start()
	return d
}

// killShims kills what is left of this dockerd's containers after a
// failed run: the containerd shims started for its containerd namespace
// (found by that unique name on their command line) and their children.
func (d *dockerd) killShims() {
	ns := "-namespace " + filepath.Base(d.dir) + " "
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), ns) {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err != nil {
			continue
		}
		if kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); err == nil {
			for _, k := range strings.Fields(string(kids)) {
				if kp, err := strconv.Atoi(k); err == nil && kp > 1 {
					_ = syscall.Kill(kp, syscall.SIGKILL)
				}
			}
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// start runs dockerd and waits until it answers.
func (d *dockerd) start() {
	d.t.Helper()
	f, err := os.OpenFile(filepath.Join(d.dir, "dockerd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	ns := filepath.Base(d.dir)
	cmd := exec.Command("dockerd", "--data-root", filepath.Join(d.dir, "data"), "--exec-root", filepath.Join(d.dir, "exec"),
		"--pidfile", filepath.Join(d.dir, "docker.pid"), "-H", "unix://"+d.sock, "--iptables=false", "--ip6tables=false",
		"--bridge=none", "--ip-forward=false", "--ip-masq=false", "--containerd-namespace", ns, "--containerd-plugins-namespace", ns+"-p",
		"--log-level", "debug")
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		d.t.Fatalf("start dockerd: %v", err)
	}
	go func() { _ = cmd.Wait(); f.Close() }()
	d.mu.Lock()
	d.cmd = cmd
	d.mu.Unlock()
	if err := eventually(60*time.Second, func() error { _, err := d.run("version"); return err }); err != nil {
		d.t.Fatalf("dockerd did not answer: %v", err)
	}
}

// stop kills dockerd and the containerd it started (SIGKILL: a crash,
// nothing cleaned up) and waits for both. The containers' shims survive,
// as they do when the Docker service crashes.
func (d *dockerd) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return
	}
	pids := []int{d.cmd.Process.Pid}
	if b, err := os.ReadFile(filepath.Join(d.dir, "exec", "containerd", "containerd.pid")); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 400 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(25 * time.Millisecond)
		}
	}
	d.cmd = nil
}

func (d *dockerd) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", append([]string{"-H", "unix://" + d.sock}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

func (d *dockerd) must(args ...string) string {
	d.t.Helper()
	out, err := d.run(args...)
	if err != nil {
		d.t.Fatal(err)
	}
	return out
}

// importRoot makes image name from the cached Debian root.
func (d *dockerd) importRoot(name string) {
	d.t.Helper()
	root := debRoot(d.t)
	cmd := exec.Command("sh", "-c", fmt.Sprintf("tar -C %q -c . | docker -H unix://%s import - %s", root, d.sock, name))
	if out, err := cmd.CombinedOutput(); err != nil {
		d.t.Fatalf("docker import: %v\n%s", err, out)
	}
}

// start runs a detached container (sleep) on network with labels.
func (d *dockerd) startContainer(name, network, image string, labels ...string) (id, sandbox string) {
	d.t.Helper()
	args := []string{"run", "-d", "--name", name, "--network", network, "--ulimit", "nofile=20000:20000"}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	id = d.must(append(args, image, "sleep", "600")...)
	sandbox = d.must("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name)
	return id, sandbox
}

// connect connects from inside a container with bash's /dev/tcp and reads
// the echo of one line.
func (d *dockerd) connect(name, ip string, port int) error {
	_, err := d.run("exec", name, "timeout", "2", "bash", "-c",
		fmt.Sprintf("exec 3<>/dev/tcp/%s/%d && echo hi >&3 && read -r line <&3 && [ \"$line\" = hi ]", ip, port))
	return err
}

// waitEndpoint waits until the container's endpoint is ready with labels.
func (a *agent) waitEndpoint(t *testing.T, cid, labels string) api.Endpoint {
	t.Helper()
	var ep api.Endpoint
	err := eventually(15*time.Second, func() error {
		var ok bool
		if ep, ok = a.endpointByCID(t, cid); !ok {
			return fmt.Errorf("no endpoint for container %.12s; endpoints: %+v", cid, a.endpoints(t))
		}
		if ep.State != "ready" || ep.Labels != labels {
			return fmt.Errorf("container %.12s: endpoint %s state %s labels %q (%s), want ready %q", cid, ep.Name, ep.State, ep.Labels, ep.PolicyReason, labels)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ep
}

// dockerEndpoints lists the endpoints the Docker driver plugged.
func (a *agent) dockerEndpoints(t *testing.T) []api.Endpoint {
	var out []api.Endpoint
	for _, ep := range a.endpoints(t) {
		if strings.HasPrefix(ep.Name, "docker-") {
			out = append(out, ep)
		}
	}
	return out
}

// TestDocker: a private dockerd uses rackwired as its network and IPAM
// driver. Containers get host-CIDR addresses and identities from their
// --label; a policy on those labels allows and denies traffic between the
// containers' own processes; a container without labels stays closed and
// says so; rackwired restart keeps enforcement and the driver works after;
// `docker rm -f` removes the endpoint; a dockerd crash and restart, while
// rackwired is down too, leaves no stale endpoint.
func TestDocker(t *testing.T) {
	require(t)
	driver := fmt.Sprintf("rwd-%d", os.Getpid())
	plugSock := "/run/docker/plugins/" + driver + ".sock"
	_, dirErr := os.Stat("/run/docker/plugins")
	t.Cleanup(func() {
		_ = os.Remove(plugSock)
		if os.IsNotExist(dirErr) {
			// The agent made the plugin directory; leave no trace when
			// it is empty (Remove refuses a directory that is not).
			_ = os.Remove("/run/docker/plugins")
			_ = os.Remove("/run/docker")
		}
	})
	d := newDockerd(t)
	a := newAgent(t, agentOpts{tag: "dock", cidrs: []string{"10.232.66.0/24"},
		extra: fmt.Sprintf("[docker]\nenabled = true\nsocket = %q\nengine_socket = %q\n", plugSock, d.sock)})
	d.importRoot("rwd-deb")
	d.must("network", "create", "--driver", driver, "--ipam-driver", driver, "rwd-net")

	webID, webSandbox := d.startContainer("rwd-web", "rwd-net", "rwd-deb", "app=web")
	cliID, _ := d.startContainer("rwd-cli", "rwd-net", "rwd-deb", "app=client")
	othID, _ := d.startContainer("rwd-oth", "rwd-net", "rwd-deb", "app=other")
	// Join looks the labels up itself: normally each container's policy is
	// in force when `docker run` returns (the resolver covers the rest).
	atRun := 0
	for _, id := range []string{webID, cliID, othID} {
		if ep, ok := a.endpointByCID(t, id); ok && ep.State == "ready" {
			atRun++
		}
	}
	t.Logf("endpoints ready with their labels when docker run returned: %d of 3", atRun)
	// A second network while the host routes its endpoints' /32s inside
	// its CIDR: dockerd checks pools against the host's routes.
	d.must("network", "create", "--driver", driver, "--ipam-driver", driver, "rwd-net2")
	d.must("network", "rm", "rwd-net2")
	web := a.waitEndpoint(t, webID, "app=web")
	a.waitEndpoint(t, cliID, "app=client")
	a.waitEndpoint(t, othID, "app=other")
	if got := d.must("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "rwd-web"); got != web.IPv4 {
		t.Errorf("docker says rwd-web has %q, rackwire %q", got, web.IPv4)
	}
	if !strings.HasPrefix(web.IPv4, "10.232.66.") || web.Network != "rwd-net" {
		t.Errorf("web endpoint %+v: want an address of 10.232.66.0/24 and network rwd-net", web)
	}
	// Servers run in the container's namespace (its sandbox key is a
	// netns file; inNetns takes a name under /run/netns).
	servers(t, "../.."+webSandbox, web.IPv4, 8080)
	if err := eventually(5*time.Second, func() error { return d.connect("rwd-oth", web.IPv4, 8080) }); err != nil {
		t.Fatalf("no policy: other -> web: %v", err)
	}

	// A container without labels: plugged, but closed, and it says why.
	nolID, nolSandbox := d.startContainer("rwd-nol", "rwd-net", "rwd-deb")
	var nol api.Endpoint
	if err := eventually(10*time.Second, func() error {
		var ok bool
		for _, ep := range a.dockerEndpoints(t) {
			if strings.HasPrefix(ep.Netns, nolSandbox) && ep.Netns == nolSandbox {
				nol, ok = ep, true
			}
		}
		if !ok || !strings.Contains(nol.PolicyReason, "no identity-relevant label") {
			return fmt.Errorf("container %.12s without labels: endpoint %+v, want labels-pending saying it has no identity-relevant label", nolID, nol)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if nol.State != "labels-pending" {
		t.Errorf("container without labels: state %s, want labels-pending", nol.State)
	}
	servers(t, "../.."+nolSandbox, nol.IPv4, 8081)
	if err := d.connect("rwd-cli", nol.IPv4, 8081); err == nil {
		t.Errorf("client -> container without labels passed; it must be closed")
	}
	if err := d.connect("rwd-nol", web.IPv4, 8080); err == nil {
		t.Errorf("container without labels -> web passed; it must be closed")
	}

	a.importPolicy(t, "rwd-web", cnp("rwd-web", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
`))
	if err := eventually(5*time.Second, func() error {
		if d.connect("rwd-oth", web.IPv4, 8080) == nil {
			return fmt.Errorf("other -> web still passes")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := d.connect("rwd-cli", web.IPv4, 8080); err != nil {
		t.Errorf("client -> web under the policy: %v", err)
	}

	// rackwired restart: enforcement stays while it is down and after;
	// the driver serves again (a new container gets its endpoint).
	a.kill(syscall.SIGTERM)
	mustFail(t, "other -> web with the agent down", d.connect("rwd-oth", web.IPv4, 8080))
	mustPass(t, "client -> web with the agent down", d.connect("rwd-cli", web.IPv4, 8080))
	a.start()
	mustFail(t, "other -> web after the agent restart", d.connect("rwd-oth", web.IPv4, 8080))
	mustPass(t, "client -> web after the agent restart", d.connect("rwd-cli", web.IPv4, 8080))
	started := time.Now()
	cli2ID, _ := d.startContainer("rwd-cli2", "rwd-net", "rwd-deb", "app=client")
	a.waitEndpoint(t, cli2ID, "app=client")
	t.Logf("docker run to an enforced endpoint with its labels: %.2fs", time.Since(started).Seconds())
	if err := eventually(5*time.Second, func() error { return d.connect("rwd-cli2", web.IPv4, 8080) }); err != nil {
		t.Errorf("new client -> web after the agent restart: %v", err)
	}

	// docker rm -f removes the endpoint and its veth.
	d.must("rm", "-f", "rwd-web")
	if ep, ok := a.endpointByCID(t, webID); ok {
		t.Errorf("endpoint %s of container %.12s still listed after docker rm -f", ep.Name, webID)
	}
	for _, l := range hostLinks(t) {
		if l == web.HostIfName {
			t.Errorf("host veth %s left after docker rm -f", l)
		}
	}

	// dockerd crashes while rackwired is down too, and both come back:
	// dockerd's own clean-up cannot reach the driver, so the containers
	// die without DeleteEndpoint; the agent finds their endpoints stale.
	before := len(a.dockerEndpoints(t))
	a.kill(syscall.SIGTERM)
	d.stop()
	t0 := time.Now()
	d.start()
	t.Logf("dockerd restarted with the driver down in %.1fs", time.Since(t0).Seconds())
	a.start()
	t.Logf("rackwired restarted: %d of %d docker endpoints left", len(a.dockerEndpoints(t)), before)
	restarted := time.Now()
	if err := eventually(60*time.Second, func() error {
		if eps := a.dockerEndpoints(t); len(eps) > 0 {
			return fmt.Errorf("%d docker endpoints left after the dockerd restart (of %d): %+v", len(eps), before, eps)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	t.Logf("no docker endpoint left %.1fs after rackwired answered again", time.Since(restarted).Seconds())
	if b, err := os.ReadFile(filepath.Join(a.dir, "rackwired.log")); err == nil {
		t.Logf("removed by the agent as stale: %d; by dockerd's DeleteEndpoint: %d",
			strings.Count(string(b), "stale docker endpoint deleted"), strings.Count(string(b), "msg=\"docker endpoint deleted\""))
	}
	for _, l := range hostLinks(t) {
		if strings.HasPrefix(l, "rw0") {
			t.Errorf("host veth %s left after the dockerd restart", l)
		}
	}
}
