// Package salt runs the rackwire Salt formula (salt/rackwire) with the real
// salt-call: rendering checks on this machine, and state.apply inside a
// booted systemd root (tests/systemd) where the formula installs the local
// .deb, writes a config the agent accepts and leaves rackwired running; a
// bad pillar value fails the config state and changes nothing.
package salt

import (
	"encoding/json"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/containernetworking/cni/libcni"
	"github.com/rackwire/rackwire/daemon/config"

	"github.com/rackwire/rackwire/internal/cniplugin"
	"github.com/rackwire/rackwire/internal/testenv"
	"github.com/rackwire/rackwire/tests/systemd"
)

// saltEnv is a salt-call --local setup: a config dir whose minion file
// points file_roots at the formula and pillar_roots at pillar.
type saltEnv struct {
	call    string
	confDir string
	pillar  string
}

func newSaltEnv(t *testing.T, formula string) *saltEnv {
	t.Helper()
	call := testenv.RequireCached(t, "salt-call")
	d := t.TempDir()
	e := &saltEnv{call: call, confDir: filepath.Join(d, "conf"), pillar: filepath.Join(d, "pillar")}
	for _, p := range []string{e.confDir, e.pillar} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	minion := "file_client: local\nroot_dir: " + d + "/root\ncachedir: " + d + "/cache\n" +
		"file_roots: {base: [" + formula + "]}\npillar_roots: {base: [" + e.pillar + "]}\n" +
		"log_file: " + d + "/minion.log\n"
	write(t, filepath.Join(e.confDir, "minion"), minion)
	write(t, filepath.Join(e.pillar, "top.sls"), "base:\n  '*':\n    - rackwire\n")
	return e
}

func write(t *testing.T, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// run runs salt-call with --out=json and returns the "local" value.
func (e *saltEnv) run(t *testing.T, args ...string) (json.RawMessage, error) {
	t.Helper()
	a := append([]string{"--config-dir=" + e.confDir, "--local", "--out=json", "--retcode-passthrough"}, args...)
	out, err := exec.Command(e.call, a...).Output()
	var m map[string]json.RawMessage
	if jerr := json.Unmarshal(out, &m); jerr != nil {
		return nil, &saltErr{err: err, out: string(out)}
	}
	return m["local"], err
}

type saltErr struct {
	err error
	out string
}

func (e *saltErr) Error() string { return "salt-call: " + e.out }

func pillarExample(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join(systemd.RepoRoot(t), "salt", "pillar.example"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func formulaDir(t *testing.T) string { return filepath.Join(systemd.RepoRoot(t), "salt") }

// showExample renders sls with the example pillar and returns the state
// tree by state id.
func showExample(t *testing.T, sls string) map[string]map[string]any {
	t.Helper()
	e := newSaltEnv(t, formulaDir(t))
	write(t, filepath.Join(e.pillar, "rackwire.sls"), pillarExample(t))
	raw, err := e.run(t, "state.show_sls", sls)
	if err != nil {
		t.Fatalf("state.show_sls %s: %v", sls, err)
	}
	var states map[string]map[string]any
	if err := json.Unmarshal(raw, &states); err != nil {
		t.Fatalf("state.show_sls output is not the state tree: %v\n%s", err, raw)
	}
	return states
}

// TestShowSLS renders the whole formula with the example pillar.
func TestShowSLS(t *testing.T) {
	states := showExample(t, "rackwire")
	for _, id := range []string{"rackwire-package", "rackwire-repo", "rackwire-config", "rackwire-policy-dir",
		"rackwire-policy-web-from-lb", "rackwire-cni-rackwire", "rackwire-bird-package", "rackwire-bird-service", "rackwire-service"} {
		if _, ok := states[id]; !ok {
			t.Errorf("state %s missing; have %v", id, keys(states))
		}
	}
	svc, _ := json.Marshal(states["rackwire-service"])
	for _, want := range []string{`"reload":true`, `"watch"`, `{"file":"rackwire-config"}`} {
		if !strings.Contains(string(svc), want) {
			t.Errorf("rackwire-service lacks %s: %s", want, svc)
		}
	}
	cfg, _ := json.Marshal(states["rackwire-config"])
	if !strings.Contains(string(cfg), `"check_cmd":"/usr/sbin/rackwired check-config --config"`) {
		t.Errorf("rackwire-config is not validated by check_cmd: %s", cfg)
	}
}

// TestCNIConflist renders the CNI network of the example pillar and hands
// the file's contents to libcni and to the plugin's own config parser.
func TestCNIConflist(t *testing.T) {
	states := showExample(t, "rackwire.cni")
	args := map[string]any{}
	file, _ := states["rackwire-cni-rackwire"]["file"].([]any)
	for _, a := range file {
		if m, ok := a.(map[string]any); ok {
			maps.Copy(args, m)
		}
	}
	if args["name"] != "/etc/cni/net.d/50-rackwire.conflist" || args["mode"] != "0644" {
		t.Errorf("conflist state name %v mode %v, want /etc/cni/net.d/50-rackwire.conflist 0644", args["name"], args["mode"])
	}
	contents, _ := args["contents"].(string)
	list, err := libcni.ConfListFromBytes([]byte(contents))
	if err != nil || list.Name != "rackwire" || len(list.Plugins) != 1 {
		t.Fatalf("rendered conflist %q: %v", contents, err)
	}
	conf, err := cniplugin.ParseConfig(list.Plugins[0].Bytes)
	if err != nil {
		t.Fatalf("the plugin refuses the rendered conflist %s: %v", contents, err)
	}
	if ls, err := conf.MergeLabels(nil); err != nil || ls.CLI() != "net=rackwire" || conf.Socket != "/run/rackwire/rackwire.sock" {
		t.Errorf("rendered conflist: labels %v (%v) socket %s, want net=rackwire and the default socket", ls, err, conf.Socket)
	}
}

func keys[M ~map[string]V, V any](m M) []string {
	var k []string
	for x := range m {
		k = append(k, x)
	}
	sort.Strings(k)
	return k
}

// TestPillarExampleCoversConfig checks the pillar reference against the
// agent's config: every section and key the agent reads appears in
// pillar.example, so docs/salt.md's "every key" stays true.
func TestPillarExampleCoversConfig(t *testing.T) {
	var p struct {
		Rackwire struct {
			Config map[string]any `json:"config"`
		} `json:"rackwire"`
	}
	if err := yaml.Unmarshal([]byte(pillarExample(t)), &p); err != nil {
		t.Fatalf("parse pillar.example: %v", err)
	}
	var missing []string
	walkTOML(reflect.TypeOf(config.Config{}), "", func(key string) {
		if !hasKey(p.Rackwire.Config, strings.Split(key, ".")) {
			missing = append(missing, key)
		}
	})
	if len(missing) > 0 {
		t.Errorf("pillar.example rackwire:config lacks %v", missing)
	}
}

// walkTOML calls fn with every dotted TOML key of t (slices of structs are
// walked through their element type).
func walkTOML(t reflect.Type, prefix string, fn func(string)) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("toml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		key := prefix + tag
		ft := f.Type
		if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft != reflect.TypeOf(config.Duration{}) {
			walkTOML(ft, key+".", fn)
			continue
		}
		if key == "version" {
			continue // the template always writes version = 1
		}
		fn(key)
	}
}

func hasKey(m map[string]any, path []string) bool {
	v, ok := m[path[0]]
	if !ok {
		return false
	}
	if len(path) == 1 {
		return true
	}
	switch x := v.(type) {
	case map[string]any:
		return hasKey(x, path[1:])
	case []any:
		for _, it := range x {
			if mm, ok := it.(map[string]any); ok && hasKey(mm, path[1:]) {
				return true
			}
		}
	}
	return false
}

// TestTemplateRendersValidConfig renders the TOML template from
// pillar.example's config and runs the real check-config on the result.
func TestTemplateRendersValidConfig(t *testing.T) {
	e := newSaltEnv(t, formulaDir(t))
	var p struct {
		Rackwire struct {
			Config map[string]any `json:"config"`
		} `json:"rackwire"`
	}
	if err := yaml.Unmarshal([]byte(pillarExample(t)), &p); err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(p.Rackwire.Config)
	raw, err := e.run(t, "slsutil.renderer", "salt://rackwire/files/rackwire.toml.jinja", "default_renderer=jinja", "config="+string(cfg))
	if err != nil {
		t.Fatalf("render template: %v", err)
	}
	var toml string
	if err := json.Unmarshal(raw, &toml); err != nil {
		t.Fatalf("renderer output: %v\n%s", err, raw)
	}
	f := filepath.Join(t.TempDir(), "rackwire.toml")
	write(t, f, toml)
	bin := buildDaemon(t)
	if out, err := exec.Command(bin, "check-config", "--config", f).CombinedOutput(); err != nil {
		t.Fatalf("rackwired check-config on the rendered pillar.example: %v\n%s\n--- rendered:\n%s", err, out, toml)
	}
	for _, want := range []string{"version = 1\n", "[[bgp.peers]]\n", "[[bgp.vip_health]]\n", "[store]\n", `cidrs = ["10.250.1.0/24"]`} {
		if !strings.Contains(toml, want) {
			t.Errorf("rendered config lacks %q:\n%s", want, toml)
		}
	}
}

func buildDaemon(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "rackwired")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/rackwired")
	cmd.Dir = systemd.RepoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build rackwired: %v\n%s", err, out)
	}
	return bin
}

// TestRolloutOrchestration renders the gray-release orchestration: the
// canary first, then batches of batch_percent, each requiring the previous
// step, so the first failure stops the rollout.
func TestRolloutOrchestration(t *testing.T) {
	e := newSaltEnv(t, formulaDir(t))
	write(t, filepath.Join(e.pillar, "rackwire.sls"),
		"rackwire:\n  rollout:\n    minions: [h1, h2, h3, h4, h5, h6, h7]\n    canary: h4\n    batch_percent: 34\n")
	raw, err := e.run(t, "state.show_sls", "rackwire.orch.rollout")
	if err != nil {
		t.Fatalf("show_sls rackwire.orch.rollout: %v", err)
	}
	var states map[string]struct {
		Salt []json.RawMessage `json:"salt"`
	}
	if err := json.Unmarshal(raw, &states); err != nil {
		t.Fatalf("%v\n%s", err, raw)
	}
	type step struct {
		tgt     any
		require string
	}
	got := map[string]step{}
	for id, s := range states {
		var st step
		for _, r := range s.Salt {
			var m map[string]json.RawMessage
			if json.Unmarshal(r, &m) != nil {
				continue
			}
			if v, ok := m["tgt"]; ok {
				_ = json.Unmarshal(v, &st.tgt)
			}
			if v, ok := m["require"]; ok {
				var req []map[string]string
				_ = json.Unmarshal(v, &req)
				if len(req) > 0 {
					st.require = req[0]["salt"]
				}
			}
		}
		got[id] = st
	}
	// 6 hosts after the canary, 34% -> batches of 3.
	want := []struct {
		id, tgt, require string
	}{
		{"rackwire-rollout-canary", `"h4"`, ""},
		{"rackwire-rollout-canary-check", `"h4"`, "rackwire-rollout-canary"},
		{"rackwire-rollout-batch-1", `["h1","h2","h3"]`, "rackwire-rollout-canary-check"},
		{"rackwire-rollout-batch-1-check", `["h1","h2","h3"]`, "rackwire-rollout-batch-1"},
		{"rackwire-rollout-batch-2", `["h5","h6","h7"]`, "rackwire-rollout-batch-1-check"},
		{"rackwire-rollout-batch-2-check", `["h5","h6","h7"]`, "rackwire-rollout-batch-2"},
	}
	if len(got) != len(want) {
		t.Errorf("orchestration has %d steps %v, want %d", len(got), keys(got), len(want))
	}
	for _, w := range want {
		g, ok := got[w.id]
		if !ok {
			t.Errorf("step %s missing", w.id)
			continue
		}
		tgt, _ := json.Marshal(g.tgt)
		if string(tgt) != w.tgt || g.require != w.require {
			t.Errorf("step %s: tgt %s require %q, want tgt %s require %q", w.id, tgt, g.require, w.tgt, w.require)
		}
	}
}

// pinDir is this suite's datapath pins on the host's bpffs.
const pinDir = "/sys/fs/bpf/rwf-salt"

func applyPillar(level, attach string) string {
	return `rackwire:
  pkg:
    source: /tmp/rackwire.deb
  policies:
    allow-web:
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-web}
      spec:
        endpointSelector: {matchLabels: {app: web}}
        ingress:
          - fromEndpoints: [{matchLabels: {app: lb}}]
  cni:
    networks:
      rackwire:
        labels: {net: rackwire}
  config:
    node:
      name: rwf-salt
      addresses: [192.0.2.20]
    ipam:
      cidrs: [10.250.8.0/24]
    datapath:
      pin_dir: ` + pinDir + `
      attach: ` + attach + `
    metrics:
      listen: ''
    log:
      level: ` + level + `
`
}

// TestApplyInSystemdRoot applies the formula for real inside a booted
// systemd root.
func TestApplyInSystemdRoot(t *testing.T) {
	testenv.RequireRoot(t)
	call := testenv.RequireCached(t, "salt-call")
	venv := filepath.Dir(filepath.Dir(call))
	if real, err := filepath.EvalSymlinks(call); err == nil {
		venv = filepath.Dir(filepath.Dir(real))
	}
	py, err := filepath.EvalSymlinks(filepath.Join(venv, "bin", "python3"))
	if err != nil {
		t.Fatalf("salt venv python: %v", err)
	}
	pyPrefix := filepath.Dir(filepath.Dir(py))

	dist := t.TempDir()
	deb, _ := systemd.BuildPackages(t, "1.0.0", dist)
	t.Cleanup(func() { _ = os.RemoveAll(pinDir) })

	r := systemd.Boot(t)
	r.CopyIn(deb, "/tmp/rackwire.deb")
	// The host's address: BIRD needs an IPv4 address for its router id.
	r.Must("ip", "link", "add", "rwf-salt0", "type", "veth", "peer", "name", "rwf-salt1")
	r.Must("ip", "addr", "add", "192.0.2.20/24", "dev", "rwf-salt0")
	r.Must("ip", "link", "set", "rwf-salt0", "up")
	r.Must("ip", "link", "set", "rwf-salt1", "up")
	// Salt itself comes from the host: its venv and the Python it was made
	// with, read-only at the same paths.
	r.BindIn(venv, venv, true)
	if !strings.HasPrefix(venv, pyPrefix+"/") {
		r.BindIn(pyPrefix, pyPrefix, true)
	}
	r.BindIn(formulaDir(t), "/srv/formula", true)
	r.WriteFile("/etc/salt/minion", []byte("file_client: local\nfile_roots: {base: [/srv/formula]}\npillar_roots: {base: [/srv/pillar]}\n"), 0o644)
	r.WriteFile("/srv/pillar/top.sls", []byte("base:\n  '*':\n    - rackwire\n"), 0o644)
	saltCall := filepath.Join(venv, "bin", "salt-call")
	apply := func() (string, error) {
		return r.ExecTimeout(5*time.Minute, saltCall, "--local", "--retcode-passthrough", "--out=json", "state.apply", "rackwire")
	}

	// First apply: package, config, policies, BIRD, agent.
	r.WriteFile("/srv/pillar/rackwire.sls", []byte(applyPillar("info", "auto")), 0o644)
	if out, err := apply(); err != nil {
		t.Fatalf("state.apply rackwire: %v\n%s", err, out)
	}
	if got := r.Show("rackwired", "ActiveState"); got != "active" {
		t.Fatalf("rackwired %s after state.apply, want active\n%s", got, r.Journal("rackwired"))
	}
	if got := r.Show("bird", "ActiveState"); got != "active" {
		t.Errorf("bird %s after state.apply, want active\n%s", got, r.Journal("bird"))
	}
	if got := r.Show("bird", "UnitFileState"); got != "enabled" {
		t.Errorf("bird %s after state.apply, want enabled", got)
	}
	r.Must("rackwired", "check-config", "--config", "/etc/rackwire/rackwire.toml")
	r.Must("test", "-f", "/etc/rackwire/policies.d/allow-web.yaml")
	// The CNI network is laid down, and the packaged plugin, run as a
	// runtime runs it, finds the packaged agent ready (CNI STATUS).
	if conf := r.Must("cat", "/etc/cni/net.d/50-rackwire.conflist"); !strings.Contains(conf, `"type": "rackwire-cni"`) && !strings.Contains(conf, `"type":"rackwire-cni"`) {
		t.Errorf("/etc/cni/net.d/50-rackwire.conflist: %s", conf)
	}
	r.WriteFile("/tmp/cni-status.json", []byte(`{"cniVersion": "1.1.0", "name": "rackwire", "type": "rackwire-cni"}`), 0o644)
	if out, err := r.Exec("sh", "-c", "CNI_COMMAND=STATUS CNI_PATH=/opt/cni/bin /opt/cni/bin/rackwire-cni </tmp/cni-status.json"); err != nil {
		t.Errorf("CNI STATUS of the packaged plugin against the packaged agent: %v\n%s", err, out)
	}
	good := r.Must("cat", "/etc/rackwire/rackwire.toml")
	if !strings.Contains(good, `name = "rwf-salt"`) {
		t.Errorf("config not from pillar:\n%s", good)
	}

	// A config change reloads, it does not restart.
	pid := r.Show("rackwired", "MainPID")
	mark := len(r.Journal("rackwired"))
	r.WriteFile("/srv/pillar/rackwire.sls", []byte(applyPillar("debug", "auto")), 0o644)
	if out, err := apply(); err != nil {
		t.Fatalf("state.apply with a changed pillar: %v\n%s", err, out)
	}
	if got := r.Show("rackwired", "MainPID"); got != pid {
		t.Errorf("config change restarted rackwired (MainPID %s -> %s); want a reload", pid, got)
	}
	if !systemd.WaitFor(10*time.Second, func() bool { return strings.Contains(r.Journal("rackwired")[mark:], "Reloaded") }) {
		t.Errorf("config change did not reload rackwired:\n%s", r.Journal("rackwired")[mark:])
	}
	good = r.Must("cat", "/etc/rackwire/rackwire.toml")
	if !strings.Contains(good, `level = "debug"`) {
		t.Errorf("changed pillar not written:\n%s", good)
	}

	// A bad value: the config state fails, the old file and the running
	// agent stay.
	mark = len(r.Journal("rackwired"))
	r.WriteFile("/srv/pillar/rackwire.sls", []byte(applyPillar("debug", "bogus-attach")), 0o644)
	out, err := apply()
	if err == nil {
		t.Errorf("state.apply with a bad pillar succeeded; want the config state to fail\n%s", out)
	}
	var res map[string]map[string]any
	if jerr := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &struct {
		Local *map[string]map[string]any `json:"local"`
	}{&res}); jerr != nil {
		t.Fatalf("state.apply output: %v\n%s", jerr, out)
	}
	found := false
	for id, s := range res {
		if strings.Contains(id, "_|-rackwire-config_|-") {
			found = true
			t.Logf("config state with a bad pillar: %v", s["comment"])
			if s["result"] != false {
				t.Errorf("config state result %v, want false: %v", s["result"], s["comment"])
			} else if !strings.Contains(toString(s["comment"]), "attach") {
				t.Errorf("config state comment does not name the bad key: %v", s["comment"])
			}
		}
	}
	if !found {
		t.Errorf("no rackwire-config state in the result: %v", keys(res))
	}
	if got := r.Must("cat", "/etc/rackwire/rackwire.toml"); got != good {
		t.Errorf("a bad pillar changed the config:\n%s", got)
	}
	if got := r.Show("rackwired", "MainPID"); got != pid || r.Show("rackwired", "ActiveState") != "active" {
		t.Errorf("a bad pillar disturbed the agent: MainPID %s -> %s, %s", pid, got, r.Show("rackwired", "ActiveState"))
	}
	if strings.Contains(r.Journal("rackwired")[mark:], "Reloading") {
		t.Errorf("a bad pillar reloaded the agent")
	}
}

func toString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
