package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/internal/testenv"
)

// debRoot returns the cached Debian root (tests/systemd/debroot.sh builds
// it once, about a minute): containers run from it, so no image is pulled.
// Runtimes only ever get it as a lower layer (podman --rootfs ROOT:O,
// docker import), never to write to.
func debRoot(t *testing.T) string {
	t.Helper()
	testenv.RequireCommand(t, "debootstrap")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join("..", "systemd", "debroot.sh")).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("tests/systemd/debroot.sh: %v\n%s", err, stderr)
	}
	return strings.TrimSpace(string(out))
}

// podman is a private podman: its own storage, run dir, CNI config dir and
// plugin dir (the rackwire-cni just built), CNI backend, runc.
type podman struct {
	t    *testing.T
	dir  string
	root string // the Debian root, as an overlay lower layer
}

func newPodman(t *testing.T) *podman {
	t.Helper()
	testenv.RequireCommand(t, "podman")
	testenv.RequireCommand(t, "runc")
	dir, err := os.MkdirTemp("", "rwcn-podman-")
	if err != nil {
		t.Fatal(err)
	}
	p := &podman{t: t, dir: dir, root: debRoot(t)}
	for _, d := range []string{"cni", "storage", "run", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(dir, "containers.conf"), fmt.Sprintf("[network]\ncni_plugin_dirs = [%q]\nnetwork_backend = \"cni\"\n", binDir))
	t.Cleanup(func() {
		out, _ := p.run("ps", "-aq")
		for _, id := range strings.Fields(out) {
			if _, err := p.run("rm", "-f", "-t", "0", id); err != nil {
				t.Errorf("podman rm %s in cleanup: %v", id, err)
			}
		}
		_, _ = p.run("system", "reset", "-f")
		_ = exec.Command("umount", "-R", filepath.Join(dir, "storage")).Run()
		_ = os.RemoveAll(dir)
	})
	return p
}

// network writes a conflist for name whose rackwire plugin has extra keys.
func (p *podman) network(name string, a *agent, plugin string) {
	writeFile(p.t, filepath.Join(p.dir, "cni", name+".conflist"), fmt.Sprintf(
		`{"cniVersion": "1.0.0", "name": %q, "plugins": [{"type": "rackwire-cni", "socket": %q%s}]}`, name, a.sock, plugin))
}

func (p *podman) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	full := append([]string{"--root", filepath.Join(p.dir, "storage"), "--runroot", filepath.Join(p.dir, "run"),
		"--tmpdir", filepath.Join(p.dir, "tmp"), "--runtime", "runc", "--cgroup-manager", "cgroupfs",
		"--network-backend", "cni", "--cni-config-dir", filepath.Join(p.dir, "cni")}, args...)
	cmd := exec.CommandContext(ctx, "podman", full...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+filepath.Join(p.dir, "containers.conf"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("podman %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

func (p *podman) must(args ...string) string {
	p.t.Helper()
	out, err := p.run(args...)
	if err != nil {
		p.t.Fatal(err)
	}
	return out
}

// start runs a detached container (sleep) named name on network.
func (p *podman) start(name, network string) (id, netnsName string) {
	p.t.Helper()
	p.must("run", "-d", "--name", name, "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=20000:20000",
		"--network", network, "--rootfs", p.root+":O", "sleep", "600")
	id = p.must("inspect", "-f", "{{.Id}}", name)
	sandbox := p.must("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name)
	if !strings.HasPrefix(sandbox, "/run/netns/") {
		p.t.Fatalf("container %s sandbox %q, want /run/netns/...", name, sandbox)
	}
	return id, filepath.Base(sandbox)
}

// bashConnect connects from inside a container with bash's /dev/tcp and
// reads the echo of one line.
func (p *podman) bashConnect(name, ip string, port int) error {
	_, err := p.run("exec", name, "timeout", "2", "bash", "-c",
		fmt.Sprintf("exec 3<>/dev/tcp/%s/%d && echo hi >&3 && read -r line <&3 && [ \"$line\" = hi ]", ip, port))
	return err
}

// TestPodman: podman with the CNI backend plugs two containers (and a third)
// into rackwire; labels come from the network config and args.cni.labels;
// a policy on them allows and denies traffic from the containers' own
// processes; `podman rm` removes the endpoint.
func TestPodman(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "cnpod", cidrs: []string{"10.217.65.0/24"}})
	p := newPodman(t)
	p.network("rwcn-pweb", a, `, "labels": {"app": "web", "runtime": "podman"}`)
	p.network("rwcn-pcli", a, `, "labels": {"runtime": "podman"}, "args": {"cni": {"labels": ["app=client"]}}`)
	p.network("rwcn-poth", a, `, "args": {"cni": {"labels": ["app=other"]}}`)

	webID, webNS := p.start("rwcn-web", "rwcn-pweb")
	cliID, _ := p.start("rwcn-cli", "rwcn-pcli")
	othID, _ := p.start("rwcn-oth", "rwcn-poth")
	want := map[string]string{webID: "app=web,runtime=podman", cliID: "app=client,runtime=podman", othID: "app=other"}
	for id, labels := range want {
		ep, ok := a.endpointByCID(t, id)
		if !ok {
			t.Fatalf("no endpoint for container %s; endpoints: %+v", id, a.endpoints(t))
		}
		if ep.Labels != labels || ep.State != "ready" {
			t.Errorf("container %s: endpoint %s labels %q state %s, want %q ready", id[:12], ep.Name, ep.Labels, ep.State, labels)
		}
	}
	web, _ := a.endpointByCID(t, webID)
	servers(t, webNS, web.IPv4, 8080)
	if err := p.bashConnect("rwcn-oth", web.IPv4, 8080); err != nil {
		t.Fatalf("no policy: other -> web: %v", err)
	}

	a.importPolicy(t, "rwcn-pod", cnp("rwcn-pod", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
            runtime: podman
`))
	if err := eventually(5*time.Second, func() error {
		if p.bashConnect("rwcn-oth", web.IPv4, 8080) == nil {
			return fmt.Errorf("other -> web still passes")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := p.bashConnect("rwcn-cli", web.IPv4, 8080); err != nil {
		t.Errorf("client -> web under the policy: %v", err)
	}

	p.must("rm", "-f", "-t", "0", "rwcn-web")
	if _, ok := a.endpointByCID(t, webID); ok {
		t.Errorf("endpoint of container %s still listed after podman rm", webID[:12])
	}
	for _, l := range hostLinks(t) {
		if l == web.HostIfName {
			t.Errorf("host veth %s left after podman rm", l)
		}
	}
}
