package endpoint

import (
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/identity"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func addrs(ss ...string) map[netip.Addr]string {
	m := map[netip.Addr]string{}
	for _, s := range ss {
		m[netip.MustParseAddr(s)] = "other"
	}
	return m
}

func TestAllocate(t *testing.T) {
	tests := []struct {
		name    string
		cidrs   []netip.Prefix
		v4      bool
		used    map[netip.Addr]string
		want    string
		wantErr error
	}{
		{"first usable v4", pfx("10.0.0.0/24"), true, nil, "10.0.0.1", nil},
		{"skips used", pfx("10.0.0.0/24"), true, addrs("10.0.0.1", "10.0.0.2"), "10.0.0.3", nil},
		{"slash30 last usable", pfx("10.0.0.0/30"), true, addrs("10.0.0.1"), "10.0.0.2", nil},
		{"slash30 exhausted", pfx("10.0.0.0/30"), true, addrs("10.0.0.1", "10.0.0.2"), "", ErrCIDRExhausted},
		{"slash31 uses both", pfx("10.0.0.0/31"), true, addrs("10.0.0.0"), "10.0.0.1", nil},
		{"slash32", pfx("10.0.0.7/32"), true, nil, "10.0.0.7", nil},
		{"second cidr", pfx("10.0.0.0/30", "10.1.0.0/29"), true, addrs("10.0.0.1", "10.0.0.2"), "10.1.0.1", nil},
		{"v6 skips anycast", pfx("10.0.0.0/24", "fd00::/64"), false, nil, "fd00::1", nil},
		{"v6 slash127", pfx("fd00::/127"), false, nil, "fd00::", nil},
		{"v6 exhausted", pfx("fd00::/126"), false, addrs("fd00::1", "fd00::2", "fd00::3"), "", ErrCIDRExhausted},
		{"no family", pfx("fd00::/64"), true, nil, "", ErrCIDRExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := allocate(tt.cidrs, tt.v4, tt.used)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("allocate() error = %v, want %v", err, tt.wantErr)
			}
			if err == nil && got.String() != tt.want {
				t.Errorf("allocate() = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestCheckRequested(t *testing.T) {
	cidrs := pfx("10.0.0.0/29", "fd00::/120")
	tests := []struct {
		ip      string
		used    map[netip.Addr]string
		wantErr error
	}{
		{"10.0.0.3", nil, nil},
		{"10.0.0.0", nil, ErrIPOutsideCIDR},
		{"10.0.0.7", nil, ErrIPOutsideCIDR},
		{"10.0.0.8", nil, ErrIPOutsideCIDR},
		{"192.0.2.1", nil, ErrIPOutsideCIDR},
		{"10.0.0.3", addrs("10.0.0.3"), ErrIPInUse},
		{"fd00::5", nil, nil},
		{"fd00::", nil, ErrIPOutsideCIDR},
		{"fd00::1:5", nil, ErrIPOutsideCIDR},
	}
	for _, tt := range tests {
		err := checkRequested(cidrs, netip.MustParseAddr(tt.ip), tt.used)
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("checkRequested(%s) = %v, want %v", tt.ip, err, tt.wantErr)
		}
	}
	if err := checkRequested(pfx("fd00::/64"), netip.MustParseAddr("10.0.0.1"), nil); !errors.Is(err, ErrIPOutsideCIDR) ||
		!strings.Contains(err.Error(), "no IPv4 CIDR") {
		t.Errorf("checkRequested(v4 without v4 cidr) = %v, want ErrIPOutsideCIDR saying no IPv4 CIDR", err)
	}
}

func TestCheckName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"web-1", true}, {"a", true}, {"db_2.x", true}, {strings.Repeat("a", 63), true},
		{"", false}, {"-x", false}, {"a b", false}, {"a/b", false}, {"123", false},
		{strings.Repeat("a", 64), false}, {"é", false},
	}
	for _, tt := range tests {
		err := checkName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("checkName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrBadName) {
			t.Errorf("checkName(%q) = %v, want ErrBadName", tt.name, err)
		}
	}
}

func TestCheckLabels(t *testing.T) {
	tests := []struct {
		ls identity.Labels
		ok bool
	}{
		{identity.MustLabels("app", "web"), true},
		{identity.Labels{}, true},
		{identity.Labels{{Key: "bad key", Value: "x"}}, false},
		{identity.Labels{{Key: "a", Value: "x"}, {Key: "a", Value: "y"}}, false},
		{identity.Labels{{Key: "", Value: "x"}}, false},
		{identity.Labels{{Key: "reserved:host", Value: ""}}, false},
		// Unsorted input is accepted and comes back sorted.
		{identity.Labels{{Key: "b", Value: "1"}, {Key: "a", Value: "2"}}, true},
	}
	for _, tt := range tests {
		got, err := checkLabels(tt.ls)
		if (err == nil) != tt.ok {
			t.Errorf("checkLabels(%v) = %v, want ok=%v", tt.ls, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrBadLabels) {
			t.Errorf("checkLabels(%v) = %v, want ErrBadLabels", tt.ls, err)
		}
		if err == nil && got.String() != identity.Labels(got).String() {
			t.Errorf("checkLabels(%v) not canonical", tt.ls)
		}
	}
}

// TestLoadCorrupt feeds New a state directory with broken files: they are
// moved aside, the good one is loaded, nothing crashes.
func TestLoadCorrupt(t *testing.T) {
	dir := t.TempDir()
	sd := filepath.Join(dir, "endpoints")
	if err := os.MkdirAll(sd, 0o700); err != nil {
		t.Fatal(err)
	}
	good := Endpoint{ID: 4, Name: "good", Netns: "/run/netns/x", State: StateReady, Labels: identity.MustLabels("app", "a"),
		IPv4: netip.MustParseAddr("10.0.0.4"), HostIfName: "rwb00004", HostIfIndex: 9, HostMAC: "02:00:00:00:00:01", MAC: "02:00:00:00:00:02"}
	if err := writeState(sd, good); err != nil {
		t.Fatal(err)
	}
	dupName := good
	dupName.ID, dupName.HostIfName, dupName.IPv4 = 5, "rwb00005", netip.MustParseAddr("10.0.0.5")
	if err := writeState(sd, dupName); err != nil {
		t.Fatal(err)
	}
	bad := map[string]string{
		"00001.json":         "{not json",
		"00002.json":         `{"version":1,"endpoint":{"id":7,"name":"x","state":"ready","ipv4":"10.0.0.9","host_ifname":"rwb00007"}}`,
		"00003.json":         `{"version":9,"endpoint":{}}`,
		"00006.json":         `{"version":1,"endpoint":{"id":6,"name":"bad name","state":"ready","ipv4":"10.0.0.6","host_ifname":"rwb00006"}}`,
		"00008.json":         "",
		"00009.json.123.tmp": "partial",
	}
	for n, c := range bad {
		if err := os.WriteFile(filepath.Join(sd, n), []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m, err := New(Options{StateDir: dir, CIDRs: pfx("10.0.0.0/24"), LinkPrefix: "rwb"}, newFakeDatapath(), newFakeIdentities(), quietLog())
	if err != nil {
		t.Fatalf("New() = %v, want it to skip corrupt files", err)
	}
	defer m.Close()
	eps := m.List()
	if len(eps) != 1 || eps[0].Name != "good" || eps[0].ID != 4 {
		t.Fatalf("List() = %+v, want only endpoint 4 good", eps)
	}
	left, _ := filepath.Glob(filepath.Join(sd, "*.json"))
	if len(left) != 1 || filepath.Base(left[0]) != "00004.json" {
		t.Errorf("state files left = %v, want only 00004.json", left)
	}
	aside, _ := filepath.Glob(filepath.Join(sd, "*.corrupt-*"))
	if len(aside) != 6 {
		t.Errorf("files moved aside = %v, want 6", aside)
	}
	if tmp, _ := filepath.Glob(filepath.Join(sd, "*.tmp")); len(tmp) != 0 {
		t.Errorf("temp files left = %v, want none", tmp)
	}
}

func TestGetByIDOrName(t *testing.T) {
	m := &Manager{byID: map[uint16]*Endpoint{3: {ID: 3, Name: "web"}}, held: map[uint16]bool{}}
	for _, q := range []string{"3", "web"} {
		if ep, err := m.Get(q); err != nil || ep.ID != 3 {
			t.Errorf("Get(%q) = %v, %v, want endpoint 3", q, ep.ID, err)
		}
	}
	if _, err := m.Get("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(nope) = %v, want ErrNotFound", err)
	}
}

func TestCheckAttachment(t *testing.T) {
	long := strings.Repeat("a", 257)
	for _, tt := range []struct {
		ifName, cid, network string
		ok                   bool
	}{
		{"", "", "", true}, {"eth0", "", "", true}, {"net1", "abc", "podman", true},
		{"abcdefghijklmno", strings.Repeat("f", 64), "n.e_t-1", true},
		{"abcdefghijklmnop", "", "", false}, {".", "", "", false}, {"..", "", "", false}, {"a/b", "", "", false},
		{"a b", "", "", false}, {"eth0", "", "podman", false}, {"eth0", "-x", "podman", false},
		{"eth0", "abc", "", false}, {"eth0", long, "podman", false}, {"eth0", "abc", "a;b", false},
	} {
		err := CheckAttachment(tt.ifName, tt.cid, tt.network)
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrBadName)) {
			t.Errorf("CheckAttachment(%q, %q, %q) = %v, want ok=%v", tt.ifName, tt.cid, tt.network, err, tt.ok)
		}
	}
}

func TestFindAttachment(t *testing.T) {
	m := &Manager{byID: map[uint16]*Endpoint{
		3: {ID: 3, Name: "n-c1", ContainerID: "c1", Network: "n"},
		4: {ID: 4, Name: "n-c1-net1", ContainerID: "c1", Network: "n", IfName: "net1"},
		5: {ID: 5, Name: "manual"},
	}, held: map[uint16]bool{}}
	for _, tt := range []struct {
		network, cid, ifName string
		want                 uint16
	}{
		{"n", "c1", "", 3}, {"n", "c1", "eth0", 3}, {"n", "c1", "net1", 4},
		{"m", "c1", "eth0", 0}, {"n", "c2", "eth0", 0}, {"", "", "eth0", 0},
	} {
		ep, ok := m.FindAttachment(tt.network, tt.cid, tt.ifName)
		if ok != (tt.want != 0) || ep.ID != tt.want {
			t.Errorf("FindAttachment(%q, %q, %q) = %d, %v, want %d", tt.network, tt.cid, tt.ifName, ep.ID, ok, tt.want)
		}
	}
}
