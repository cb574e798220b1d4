// Package packaging checks the built rackwire packages with the package
// managers' own tools: dpkg-deb for the .deb, rpm for the .rpm. It builds
// both with packaging/build.sh (the same script as `make package`) and
// asserts their contents, modes, dependencies and maintainer scripts. The
// install/upgrade/purge behaviour under a real systemd is in tests/systemd.
package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/rackwire/rackwire/internal/cniplugin"
	"github.com/rackwire/rackwire/internal/testenv"
	"github.com/rackwire/rackwire/tests/systemd"
)

const version = "2.3.4"

var (
	buildOnce          sync.Once
	debPath, rpmPath   string
	buildDir, buildErr string
)

// build builds both packages once per test binary.
func build(t *testing.T) (deb, rpm string) {
	t.Helper()
	buildOnce.Do(func() {
		d, err := os.MkdirTemp("", "rwf-pkg-")
		if err != nil {
			buildErr = err.Error()
			return
		}
		buildDir = d
		debPath, rpmPath = systemd.BuildPackages(t, version, d)
	})
	if buildErr != "" || debPath == "" {
		t.Fatalf("build packages: %s", buildErr)
	}
	return debPath, rpmPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// want is one file every package must hold: its path and mode string as
// `ls -l` prints it.
type want struct {
	path, mode string
}

var files = []want{
	{"/usr/sbin/rackwired", "-rwxr-xr-x"},
	{"/usr/bin/rackwire", "-rwxr-xr-x"},
	// The CNI plugin where runtimes look, and an example network.
	{"/opt/cni/bin/rackwire-cni", "-rwxr-xr-x"},
	{"/usr/libexec/cni/rackwire-cni", "l"},
	{"/usr/lib/cni/rackwire-cni", "l"},
	{"/usr/share/rackwire/cni/rackwire.conflist", "-rw-r--r--"},
	{"/usr/lib/systemd/system/rackwired.service", "-rw-r--r--"},
	// The BGP drop-in, inactive until linked (docs/packaging.md).
	{"/usr/share/rackwire/systemd/rackwired-bgp.conf", "-rw-r--r--"},
	{"/usr/lib/tmpfiles.d/rackwire.conf", "-rw-r--r--"},
	{"/usr/lib/sysusers.d/rackwire.conf", "-rw-r--r--"},
	{"/usr/share/doc/rackwire/rackwire.toml.example", "-rw-r--r--"},
	{"/usr/share/bash-completion/completions/rackwire", "-rw-r--r--"},
	{"/usr/share/man/man8/rackwired.8.gz", "-rw-r--r--"},
	{"/usr/share/man/man1/rackwire.1.gz", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/rackwire/init.sls", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/rackwire/map.jinja", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/rackwire/defaults.yaml", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/rackwire/config.sls", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/rackwire/files/rackwire.toml.jinja", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/rackwire/orch/rollout.sls", "-rw-r--r--"},
	{"/usr/share/rackwire/salt/pillar.example", "-rw-r--r--"},
	{"/etc/rackwire", "drwxr-xr-x"},
	{"/etc/rackwire/policies.d", "drwxr-xr-x"},
}

// notShipped are paths the package must never own: the live config belongs
// to the operator or Salt, so no upgrade can replace it.
var notShipped = []string{"/etc/rackwire/rackwire.toml"}

// listing parses `dpkg-deb -c` / `rpm -qplv` lines into path -> mode.
func listing(out string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 6 {
			continue
		}
		p := ""
		for _, x := range f {
			if strings.HasPrefix(x, "/") || strings.HasPrefix(x, "./") {
				p = x
				break
			}
		}
		if p == "" {
			continue
		}
		p = strings.TrimSuffix(strings.TrimPrefix(p, "."), "/")
		if p == "" {
			continue
		}
		m[p] = f[0]
	}
	return m
}

func checkFiles(t *testing.T, kind string, m map[string]string) {
	t.Helper()
	for _, w := range files {
		got, ok := m[w.path]
		if !ok {
			t.Errorf("%s: %s missing", kind, w.path)
			continue
		}
		// A symlink's permission bits mean nothing on Linux (rpm lists
		// nfpm's as l---------, and installs them as lrwxrwxrwx): only the
		// type counts.
		if got != w.mode && !(strings.HasPrefix(w.mode, "l") && strings.HasPrefix(got, "l")) {
			t.Errorf("%s: %s mode %s, want %s", kind, w.path, got, w.mode)
		}
	}
	for _, p := range notShipped {
		if _, ok := m[p]; ok {
			t.Errorf("%s ships %s; it must not own the live config", kind, p)
		}
	}
	for p, mode := range m {
		if strings.HasPrefix(mode, "d") && mode != "drwxr-xr-x" {
			t.Errorf("%s: directory %s has mode %s, want drwxr-xr-x", kind, p, mode)
		}
	}
}

func TestDeb(t *testing.T) {
	testenv.RequireCommand(t, "dpkg-deb")
	deb, _ := build(t)
	if filepath.Base(deb) != "rackwire_"+version+"_amd64.deb" {
		t.Errorf("deb name %s", filepath.Base(deb))
	}
	checkFiles(t, "deb", listing(run(t, "dpkg-deb", "-c", deb)))

	info := run(t, "dpkg-deb", "-I", deb)
	for _, re := range []string{
		`(?m)^ Package: rackwire$`,
		`(?m)^ Version: ` + regexp.QuoteMeta(version) + `(-1)?$`,
		`(?m)^ Architecture: amd64$`,
		`(?m)^ Depends: .*\biproute2\b`,
		`(?m)^ Recommends: .*\bbird2\b`,
	} {
		if !regexp.MustCompile(re).MatchString(info) {
			t.Errorf("dpkg-deb -I does not match %s:\n%s", re, info)
		}
	}
	if regexp.MustCompile(`(?m)^ Depends: .*bird`).MatchString(info) {
		t.Errorf("bird must be recommended, not required:\n%s", info)
	}

	ctl := t.TempDir()
	run(t, "dpkg-deb", "-e", deb, ctl)
	if b, err := os.ReadFile(filepath.Join(ctl, "conffiles")); err == nil && strings.Contains(string(b), "rackwire.toml") {
		t.Errorf("conffiles lists the live config:\n%s", b)
	}
	scripts := map[string][]string{
		// daemon-reload only where systemd runs; enable, not start, on a
		// first install; try-restart (only if running) on upgrade, not
		// waiting for the restart gate.
		"postinst": {`[ -d /run/systemd/system ]`, `systemctl daemon-reload`, `systemctl enable rackwired.service`,
			`systemctl --no-block try-restart rackwired.service`, `if [ -z "$2" ]`,
			// the BGP drop-in follows the config, linked before the reload.
			"rw_bgp_dropin\n\trw_daemon_reload"},
		// stop and disable on removal only.
		"prerm": {`remove | deconfigure) rw_stop_disable`, `systemctl stop rackwired.service`, `systemctl disable rackwired.service`},
		// purge removes state.
		"postrm": {`purge)`, `rm -rf /var/lib/rackwire`, "rw_bgp_dropin_remove\n"},
	}
	for name, needles := range scripts {
		p := filepath.Join(ctl, name)
		st, err := os.Stat(p)
		if err != nil {
			t.Errorf("deb has no %s: %v", name, err)
			continue
		}
		if st.Mode()&0o111 == 0 {
			t.Errorf("%s is not executable: %v", name, st.Mode())
		}
		run(t, "sh", "-n", p)
		b, _ := os.ReadFile(p)
		for _, n := range needles {
			if !strings.Contains(string(b), n) {
				t.Errorf("%s lacks %q", name, n)
			}
		}
		if strings.Contains(string(b), "systemctl start") {
			t.Errorf("%s starts the agent; installs must only enable it", name)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(ctl, "prerm")); strings.Contains(string(b), "upgrade) rw_stop") {
		t.Errorf("prerm stops on upgrade")
	}

	// The version is stamped into the binaries.
	x := t.TempDir()
	run(t, "dpkg-deb", "-x", deb, x)
	for _, bin := range []string{"usr/sbin/rackwired", "usr/bin/rackwire"} {
		out, _ := exec.Command(filepath.Join(x, bin), "--version").CombinedOutput()
		if !strings.Contains(string(out), version) {
			t.Errorf("%s --version = %q, want it to contain %s", bin, out, version)
		}
	}
	// The man pages render and carry the version and the commands.
	if _, err := exec.LookPath("man"); err == nil {
		for page, needle := range map[string]string{
			"usr/share/man/man8/rackwired.8.gz": "check-config",
			"usr/share/man/man1/rackwire.1.gz":  "endpoint",
		} {
			out, err := exec.Command("man", "-l", filepath.Join(x, page)).CombinedOutput()
			if err != nil || !strings.Contains(string(out), needle) || !strings.Contains(string(out), version) {
				t.Errorf("man -l %s: %v; want %q and %s in:\n%s", page, err, needle, version, out)
			}
		}
	}
	// The plugin carries the version and answers VERSION for every spec
	// version it claims; the example network is one it accepts.
	plugin := filepath.Join(x, "opt/cni/bin/rackwire-cni")
	if out, _ := exec.Command(plugin).CombinedOutput(); !strings.Contains(string(out), version) {
		t.Errorf("rackwire-cni without CNI_COMMAND = %q, want it to name %s", out, version)
	}
	vcmd := exec.Command(plugin)
	vcmd.Env = []string{"CNI_COMMAND=VERSION"}
	vcmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
	if out, err := vcmd.Output(); err != nil || !strings.Contains(string(out), `"supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]`) {
		t.Errorf("rackwire-cni VERSION: %v %s", err, out)
	}
	if l, err := os.Readlink(filepath.Join(x, "usr/libexec/cni/rackwire-cni")); err != nil || l != "/opt/cni/bin/rackwire-cni" {
		t.Errorf("/usr/libexec/cni/rackwire-cni -> %q (%v), want /opt/cni/bin/rackwire-cni", l, err)
	}
	b, err := os.ReadFile(filepath.Join(x, "usr/share/rackwire/cni/rackwire.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil || len(list.Plugins) != 1 {
		t.Fatalf("example conflist: %v (%d plugins)", err, len(list.Plugins))
	}
	if conf, err := cniplugin.ParseConfig(list.Plugins[0].Bytes); err != nil {
		t.Errorf("example conflist refused by the plugin: %v", err)
	} else if _, err := conf.MergeLabels(nil); err != nil {
		t.Errorf("example conflist labels: %v", err)
	}

	// The shipped example config is valid as shipped.
	if out, err := exec.Command(filepath.Join(x, "usr/sbin/rackwired"), "check-config", "--config",
		filepath.Join(x, "usr/share/doc/rackwire/rackwire.toml.example")).CombinedOutput(); err != nil {
		t.Errorf("shipped example does not pass check-config: %v\n%s", err, out)
	}
}

func TestRPM(t *testing.T) {
	testenv.RequireCommand(t, "rpm")
	_, rpm := build(t)
	if filepath.Base(rpm) != "rackwire-"+version+".x86_64.rpm" {
		t.Errorf("rpm name %s", filepath.Base(rpm))
	}
	checkFiles(t, "rpm", listing(run(t, "rpm", "-qplv", rpm)))

	info := run(t, "rpm", "-qpi", rpm)
	for _, re := range []string{`(?m)^Name\s*: rackwire$`, `(?m)^Version\s*: ` + regexp.QuoteMeta(version) + `$`,
		`(?m)^Architecture: x86_64$`} {
		if !regexp.MustCompile(re).MatchString(info) {
			t.Errorf("rpm -qpi does not match %s:\n%s", re, info)
		}
	}
	req := run(t, "rpm", "-qpR", rpm)
	if !regexp.MustCompile(`(?m)^iproute\s*$`).MatchString(req) {
		t.Errorf("rpm requires no iproute:\n%s", req)
	}
	if strings.Contains(req, "bird") {
		t.Errorf("rpm requires bird; it must only recommend it:\n%s", req)
	}
	if rec := run(t, "rpm", "-qp", "--recommends", rpm); !regexp.MustCompile(`(?m)^bird\s*$`).MatchString(rec) {
		t.Errorf("rpm does not recommend bird:\n%s", rec)
	}
	if cf := run(t, "rpm", "-qpc", rpm); strings.Contains(cf, "rackwire.toml") {
		t.Errorf("rpm marks the live config as a config file:\n%s", cf)
	}
	scripts := run(t, "rpm", "-qp", "--scripts", rpm)
	for _, n := range []string{
		"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet",
		`if [ "$1" -eq 1 ]`, `systemctl enable rackwired.service`, `systemctl --no-block try-restart rackwired.service`,
		`if [ "$1" -eq 0 ]`, `systemctl stop rackwired.service`,
		"rw_bgp_dropin\nrw_daemon_reload", "rw_bgp_dropin_remove\n",
	} {
		if !strings.Contains(scripts, n) {
			t.Errorf("rpm scripts lack %q", n)
		}
	}
}
