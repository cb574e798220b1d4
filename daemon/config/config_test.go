package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rackwire.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestExampleValidates(t *testing.T) {
	cfg, err := Load("../../packaging/rackwire.toml.example")
	if err != nil {
		t.Fatalf("Load(example) = %v, want no error", err)
	}
	if got, want := len(cfg.BGP.Peers), 2; got != want {
		t.Errorf("peers = %d, want %d", got, want)
	}
	if cfg.BGP.Peers[1].BFDMultiplier != 3 {
		t.Errorf("peer defaults not filled: %+v", cfg.BGP.Peers[1])
	}
}

func TestMinimalGetsDefaults(t *testing.T) {
	cfg, err := Load(writeFile(t, "version = 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.File = cfg.File
	if diff := cmp.Diff(want, cfg); diff != "" {
		t.Errorf("defaults differ (-want +got):\n%s", diff)
	}
	if cfg.Store.SessionTTL.Duration != 24*time.Hour {
		t.Errorf("session_ttl = %v", cfg.Store.SessionTTL)
	}
}

func TestOverridesReplaceSlices(t *testing.T) {
	cfg, err := Load(writeFile(t, "version = 1\n[ipam]\ncidrs = [\"10.9.0.0/24\", \"fd00:9::/112\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"10.9.0.0/24", "fd00:9::/112"}, cfg.IPAM.CIDRs); diff != "" {
		t.Errorf("cidrs (-want +got):\n%s", diff)
	}
}

func TestProblems(t *testing.T) {
	tests := []struct {
		name string
		body string
		want []string // substrings, each must appear
	}{
		{"unknown key", "version = 1\n[store]\nadress = \"x\"\n", []string{":3: store.adress: unknown key", `did you mean "store.address"`}},
		{"unknown section", "version = 1\n[stor]\nbackend = \"local\"\n", []string{":3:", "stor.backend: unknown key"}},
		{"wrong type", "version = 1\n[node]\ncluster_id = \"one\"\n", []string{":3:", "cluster_id"}},
		{"bad version", "version = 2\n", []string{":1: version: version 2 is not supported"}},
		{"bad cidr", "version = 1\n[ipam]\ncidrs = [\"10.0.0.0/33\"]\n", []string{":3: ipam.cidrs[0]", "not a CIDR"}},
		{"host bits", "version = 1\n[ipam]\ncidrs = [\"10.0.0.1/24\"]\n", []string{`did you mean "10.0.0.0/24"`}},
		{"overlap", "version = 1\n[ipam]\ncidrs = [\"10.0.0.0/16\", \"10.0.1.0/24\"]\n", []string{"overlaps"}},
		{"cluster id", "version = 1\n[node]\ncluster_id = 0\n", []string{":3: node.cluster_id", "1..255"}},
		{"bad address", "version = 1\n[node]\naddresses = [\"x\"]\n", []string{"node.addresses[0]", "not an IP"}},
		{"backend", "version = 1\n[store]\nbackend = \"etcd\"\n", []string{"store.backend", `"local"`}},
		{"consul address", "version = 1\n[store]\nbackend = \"consul\"\naddress = \"nohost\"\n", []string{":4: store.address"}},
		{"ttl", "version = 1\n[store]\nsession_ttl = \"48h\"\n", []string{"store.session_ttl", "24h"}},
		{"duration", "version = 1\n[store]\nsession_ttl = \"soon\"\n", []string{":3:", "not a duration"}},
		{"attach", "version = 1\n[datapath]\nattach = \"xdp\"\n", []string{"datapath.attach"}},
		{"frag map too small", "version = 1\n[datapath]\nfrag_max_entries = 10\n", []string{":3: datapath.frag_max_entries", "256..1048576"}},
		{"events", "version = 1\n[datapath]\nevents = \"ring\"\n", []string{":3: datapath.events", `"perf"`}},
		{"events rate zero", "version = 1\n[datapath]\nevents_rate = 0\n", []string{":3: datapath.events_rate", "1..1000000"}},
		{"events burst big", "version = 1\n[datapath]\nevents_burst = 2000000\n", []string{":3: datapath.events_burst", "1..1000000"}},
		{"events rate negative", "version = 1\n[datapath]\nevents_rate = -5\n", []string{":3:", "events_rate"}},
		{"ct timeout range", "version = 1\n[datapath]\nct_timeout_tcp_syn = \"0s\"\n", []string{":3: datapath.ct_timeout_tcp_syn", "out of range", "1s to 1h0m0s"}},
		{"ct timeout not a duration", "version = 1\n[datapath]\nct_timeout_other = \"60\"\n", []string{":3:", "not a duration"}},
		{"ct close above established", "version = 1\n[datapath]\nct_timeout_tcp = \"10m\"\nct_timeout_tcp_close = \"20m\"\n", []string{"datapath.ct_timeout_tcp_close", "longer than datapath.ct_timeout_tcp"}},
		{"ct other size", "version = 1\n[datapath]\nct_other_max_entries = 10\n", []string{"datapath.ct_other_max_entries", "1024.."}},
		{"relative path", "version = 1\n[agent]\nstate_dir = \"var/lib\"\n", []string{"agent.state_dir", "absolute"}},
		{"admin group", "version = 1\n[agent]\nadmin_group = \"rw-no-such-group\"\n", []string{":3: agent.admin_group", "does not exist", "groupadd rw-no-such-group"}},
		{"asn zero", "version = 1\n[bgp]\nlocal_asn = 0\n", []string{":3: bgp.local_asn", "not an ASN"}},
		{"asn big", "version = 1\n[bgp]\nlocal_asn = 4294967296\n", []string{"bgp.local_asn", "not an ASN"}},
		{"peer address", "version = 1\n[[bgp.peers]]\nname = \"a\"\naddress = \"tor\"\nasn = 65001\n", []string{":4: bgp.peers[0].address", "not an IP"}},
		{"second peer asn", "version = 1\n[[bgp.peers]]\naddress = \"10.0.0.1\"\nasn = 1\n[[bgp.peers]]\naddress = \"10.0.0.2\"\nasn = 0\n", []string{":7: bgp.peers[1].asn"}},
		{"peer name a BIRD keyword", "version = 1\n[[bgp.peers]]\nname = \"rr\"\naddress = \"10.0.0.1\"\nasn = 65001\n", []string{":3: bgp.peers[0].name", "BIRD reserves"}},
		{"peer zone", "version = 1\n[[bgp.peers]]\nname = \"a\"\naddress = \"fe80::1%eth0.100\"\nasn = 65001\n", []string{":4: bgp.peers[0].address", "zone"}},
		{"keepalive above default hold", "version = 1\n[[bgp.peers]]\nname = \"a\"\naddress = \"10.0.0.1\"\nasn = 65001\nkeepalive_time = 300\n", []string{"bgp.peers[0].keepalive_time", "240"}},
		{"dup peer", "version = 1\n[[bgp.peers]]\nname=\"a\"\naddress = \"10.0.0.1\"\nasn = 1\n[[bgp.peers]]\nname=\"a\"\naddress = \"10.0.0.2\"\nasn = 1\n", []string{"must be unique"}},
		{"password file", "version = 1\n[[bgp.peers]]\naddress = \"10.0.0.1\"\nasn = 1\npassword_file = \"/nonexistent/pw\"\n", []string{":5: bgp.peers[0].password_file", "cannot read"}},
		{"vip outside range", "version = 1\n[bgp]\nvips = [\"10.97.0.1/32\"]\nvip_ranges = [\"10.96.0.0/16\"]\n", []string{"bgp.vips[0]", "outside every"}},
		{"vip address", "version = 1\n[bgp]\nvips = [\"10.96.0.1\"]\n", []string{`did you mean "10.96.0.1/32"`}},
		{"router id", "version = 1\n[bgp]\nrouter_id = \"::1\"\n", []string{"bgp.router_id"}},
		{"health of unknown vip", "version = 1\n[[bgp.vip_health]]\nvip = \"10.1.1.1/32\"\ntarget = \"127.0.0.1:80\"\n", []string{"bgp.vip_health[0].vip"}},
		{"community", "version = 1\n[bgp]\ncommunities = [\"65000:70000\"]\n", []string{"bgp.communities[0]"}},
		{"backoff", "version = 1\n[restart]\nbackoff_min = \"1m\"\nbackoff_max = \"10s\"\n", []string{"restart.backoff_max"}},
		{"metrics", "version = 1\n[metrics]\nlisten = \"9962\"\n", []string{"metrics.listen"}},
		{"log level", "version = 1\n[log]\nlevel = \"loud\"\n", []string{"log.level"}},
		{"docker socket name", "version = 1\n[docker]\nenabled = true\nsocket = \"/run/docker/plugins/Rack wire\"\n", []string{":4: docker.socket", "NAME.sock"}},
		{"docker engine socket", "version = 1\n[docker]\nenabled = true\nengine_socket = \"docker.sock\"\n", []string{":4: docker.engine_socket", "absolute"}},
		{"docker unknown key", "version = 1\n[docker]\nsockets = \"/x.sock\"\n", []string{"docker.sockets", `did you mean "docker.socket"`}},
		{"duplicate table", "version = 1\n[store]\nbackend = \"local\"\n[store]\nprefix = \"x/\"\n", []string{":4:"}},
		{"duplicate key", "version = 1\nversion = 1\n", []string{":2:"}},
		{"garbage", "\x01\x02 not toml ][", []string{"rackwire.toml"}},
		{"empty", "", []string{":1:", "empty"}},
		{"whitespace", "  \n\n", []string{"empty"}},
		{"two problems", "version = 1\n[node]\ncluster_id = 0\n[log]\nlevel = \"x\"\n", []string{":3: node.cluster_id", ":5: log.level"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, tt.body)
			_, err := Load(p)
			if err == nil {
				t.Fatalf("Load(%q) = nil error, want one", tt.body)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, p) {
				t.Errorf("error %q does not start with the file name", msg)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("Load(%q) error = %q, want it to contain %q", tt.body, msg, w)
				}
			}
		})
	}
}

func TestUnreadable(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("Load(dir) = %v, want 'is a directory'", err)
	}
	if _, err := Load(filepath.Join(dir, "missing.toml")); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("Load(missing) = %v", err)
	}
	big := filepath.Join(dir, "big.toml")
	if err := os.WriteFile(big, []byte("version = 1\n"+strings.Repeat("# padding padding padding\n", 10<<20/26)), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(big)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("Load(10MB) = %v, want too large", err)
	}
	if os.Geteuid() != 0 {
		noread := filepath.Join(dir, "noread.toml")
		_ = os.WriteFile(noread, []byte("version = 1\n"), 0o000)
		if _, err := Load(noread); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("Load(noread) = %v", err)
		}
	}
}

func TestResolveFillsNodeName(t *testing.T) {
	cfg := Default()
	if err := cfg.Resolve(); err != nil {
		t.Fatal(err)
	}
	if cfg.Node.Name == "" {
		t.Error("Resolve left node.name empty")
	}
}

func TestResolveRouterIDNeedsIPv4(t *testing.T) {
	cfg := Default()
	cfg.Node.Name = "h"
	cfg.Node.Addresses = []string{"2001:db8::1"}
	cfg.BGP.Enabled = true
	err := cfg.Resolve()
	if err == nil || !strings.Contains(err.Error(), "router_id") {
		t.Errorf("Resolve() = %v, want router_id error", err)
	}
}

func FuzzParse(f *testing.F) {
	ex, _ := os.ReadFile("../../packaging/rackwire.toml.example")
	f.Add(ex)
	f.Add([]byte("version = 1\n[store]\nadress = \"x\"\n"))
	f.Add([]byte("[[bgp.peers]]\n[[bgp.peers]]\nasn = -1\n"))
	f.Add([]byte("version = 1\n[bgp]\nvips = [\"1.2.3.4/32\"]\n[[bgp.vip_health]]\nvip=\"1.2.3.4/32\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("fuzz.toml", data)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.toml") {
				t.Fatalf("error without file name: %v", err)
			}
			return
		}
		if cfg.Version != 1 {
			t.Fatalf("accepted version %d", cfg.Version)
		}
	})
}

// TestExampleIsComplete keeps the annotated example the full reference.
func TestExampleIsComplete(t *testing.T) {
	data, err := os.ReadFile("../../packaging/rackwire.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	idx := indexLines(data)
	for _, k := range known() {
		if idx.find(k) == 0 || (idx[k] == 0 && idx[unindex(k)] == 0) {
			t.Errorf("key %s is not in packaging/rackwire.toml.example", k)
		}
	}
}

// TestKnownMatchesStruct keeps the "did you mean" list equal to the keys the
// decoder accepts.
func TestKnownMatchesStruct(t *testing.T) {
	var walk func(prefix string, typ reflect.Type) []string
	walk = func(prefix string, typ reflect.Type) []string {
		var out []string
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			name := f.Tag.Get("toml")
			if name == "" || name == "-" {
				continue
			}
			ft := f.Type
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct && ft != reflect.TypeOf(Duration{}) {
				out = append(out, walk(prefix+name+".", ft)...)
				continue
			}
			out = append(out, prefix+name)
		}
		return out
	}
	got := walk("", reflect.TypeOf(Config{}))
	sort.Strings(got)
	want := known()
	sort.Strings(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("known() differs from the Config struct (-known +struct):\n%s", diff)
	}
}

func TestPeerChecks(t *testing.T) {
	dir := t.TempDir()
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte("se\"cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	body := "version = 1\n[[bgp.peers]]\naddress = \"10.0.0.1\"\nasn = 1\npassword_file = \"" + pw + "\"\n" +
		"[[bgp.peers]]\naddress = \"10.0.0.2\"\nasn = 1\nmultihop = 2\nbfd = true\n"
	_, err := Load(writeFile(t, body))
	if err == nil {
		t.Fatal("Load = nil, want errors")
	}
	for _, want := range []string{"bgp.peers[0].password_file", "quote", "bgp.peers[1].source_address"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// writeSecret writes a secret file with exactly mode perm.
func writeSecret(t *testing.T, name, secret string, perm os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, perm); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestConsulTransport: the ACL token never crosses the network in clear
// text unless allow_insecure says so, TLS files need https, and the token
// file is private.
func TestConsulTransport(t *testing.T) {
	tok := writeSecret(t, "consul.token", "s3cr3t-token", 0o600)
	open := writeSecret(t, "open.token", "s3cr3t-token", 0o644)
	group := writeSecret(t, "group.token", "s3cr3t-token", 0o640)
	store := func(lines ...string) string {
		return "version = 1\n[store]\nbackend = \"consul\"\n" + strings.Join(lines, "\n") + "\n"
	}
	tests := []struct {
		name string
		body string
		want []string // nil: valid
	}{
		{"token over http to 10.1.2.3", store(`address = "10.1.2.3:8500"`, `token_file = "`+tok+`"`),
			[]string{":5: store.token_file:", "clear text", "10.1.2.3:8500", `set scheme = "https"`, "allow_insecure = true"}},
		{"token over http to a name", store(`address = "consul.example:8500"`, `scheme = "http"`, `token_file = "`+tok+`"`),
			[]string{":6: store.token_file:", "allow_insecure = true"}},
		{"token over http to 127.0.0.1", store(`address = "127.0.0.1:8500"`, `token_file = "`+tok+`"`), nil},
		{"token over http to ::1", store(`address = "[::1]:8500"`, `token_file = "`+tok+`"`), nil},
		{"token over http to localhost", store(`address = "localhost:8500"`, `token_file = "`+tok+`"`), nil},
		{"token over http to the default address", store(`token_file = "` + tok + `"`), nil},
		{"allow_insecure", store(`address = "10.1.2.3:8500"`, `token_file = "`+tok+`"`, `allow_insecure = true`), nil},
		{"token over https", store(`address = "10.1.2.3:8500"`, `scheme = "https"`, `tls_ca_file = "/etc/rackwire/consul-ca.pem"`, `token_file = "`+tok+`"`), nil},
		{"no token over http", store(`address = "10.1.2.3:8500"`), nil},
		{"TLS with http", store(`address = "10.1.2.3:8500"`, `scheme = "http"`, `tls_ca_file = "/etc/rackwire/consul-ca.pem"`),
			[]string{":6: store.tls_ca_file:", `set scheme = "https"`}},
		{"TLS with the default scheme", store(`tls_cert_file = "/etc/rackwire/c.pem"`, `tls_key_file = "/etc/rackwire/k.pem"`),
			[]string{":4: store.tls_cert_file:", `set scheme = "https"`}},
		{"token file 0644", store(`token_file = "` + open + `"`),
			[]string{":4: store.token_file:", "mode 0644", "run `chmod 600 " + open + "`"}},
		{"token file 0640", store(`token_file = "` + group + `"`),
			[]string{":4: store.token_file:", "run `chmod 600 " + group + "`"}},
		{"token file missing", store(`token_file = "/nonexistent/consul.token"`),
			[]string{":4: store.token_file:", "cannot read /nonexistent/consul.token"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, tt.body)
			cfg, err := Load(p)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Load(%q) = %v, want no error", tt.body, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Load(%q) = %+v, want an error", tt.body, cfg.Store)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), p+w) && !strings.Contains(err.Error(), w) {
					t.Errorf("Load error = %q, want it to contain %q", err, w)
				}
			}
			if !strings.HasPrefix(err.Error(), p+":") {
				t.Errorf("error %q does not start with FILE:", err)
			}
			if strings.Contains(err.Error(), "s3cr3t-token") {
				t.Errorf("error shows the token: %q", err)
			}
		})
	}
}

func TestLoopbackAddress(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8500": true, "127.1.2.3:1": true, "[::1]:8500": true, "localhost:8500": true,
		"[::ffff:127.0.0.1]:8500": true, "10.1.2.3:8500": false, "0.0.0.0:8500": false,
		"consul:8500": false, "127.0.0.1": false, "": false,
	} {
		if got := LoopbackAddress(addr); got != want {
			t.Errorf("LoopbackAddress(%q) = %v, want %v", addr, got, want)
		}
	}
}
