package ipcache

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/store"
)

var testSelf = Self{
	Node: "h1", Cluster: "prod", ClusterID: 3,
	Addrs: []netip.Addr{addr("10.1.1.10"), addr("2001:db8::10")},
	CIDRs: []netip.Prefix{pfx("10.250.1.0/24")},
}

func jsonKV(key string, v any) store.KV {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return store.KV{Key: key, Value: b}
}

func nodeRec(name string, ips, cidrs []string) map[string]any {
	return map[string]any{"name": name, "cluster": "prod", "ips": ips, "cidrs": cidrs, "version": "1.0"}
}

func nodeKV(name string, ips, cidrs []string) store.KV {
	return jsonKV(store.NodeKey("prod", name), nodeRec(name, ips, cidrs))
}

func manyAddrs(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}).String()
	}
	return out
}

func manyCIDRs(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 3, byte(i), 0}), 24).String()
	}
	return out
}

// testNodes is the node list the ipcache checks run against.
func testNodes(t *testing.T) map[string]Node {
	t.Helper()
	nodes, rej := Nodes([]store.KV{
		nodeKV("h1", []string{"10.1.1.10"}, []string{"10.250.1.0/24"}),
		nodeKV("h2", []string{"10.1.1.11"}, []string{"10.250.2.0/24", "fd00:250:2::/112"}),
		// h3 claims a CIDR around this host's address.
		nodeKV("h3", []string{"10.1.1.12"}, []string{"10.1.1.0/24", "10.250.3.0/24"}),
	}, testSelf)
	if len(rej) != 0 {
		t.Fatalf("valid nodes rejected: %v", rej)
	}
	return nodes
}

func TestNodes(t *testing.T) {
	big := nodeRec("big", manyAddrs(100_000), nil)
	cases := []struct {
		name string
		kv   store.KV
		want string // reason; "" accepted; "skip" skipped silently
	}{
		{"valid", nodeKV("h2", []string{"10.1.1.11", "2001:db8::11"}, []string{"10.250.2.0/24"}), ""},
		{"this host's own record", nodeKV("h1", []string{"10.1.1.10"}, nil), "skip"},
		{"100,000 addresses", jsonKV(store.NodeKey("prod", "big"), big), ReasonTooLarge},
		{"65 addresses", nodeKV("n", manyAddrs(65), nil), ReasonTooManyIPs},
		{"65 CIDRs", nodeKV("n", nil, manyCIDRs(65)), ReasonTooManyCIDRs},
		{"invalid name", jsonKV(store.NodeKey("prod", "-n"), nodeRec("-n", nil, nil)), ReasonBadName},
		{"name is not the key", jsonKV(store.NodeKey("prod", "n1"), nodeRec("n2", nil, nil)), ReasonNameNotKey},
		{"key of another cluster", jsonKV(store.NodeKey("dev", "n"), nodeRec("n", nil, nil)), ReasonOtherCluster},
		{"record of another cluster", jsonKV(store.NodeKey("prod", "n"), map[string]any{"name": "n", "cluster": "dev"}), ReasonOtherCluster},
		{"key outside the node prefix", jsonKV("state/other/prod/n", nodeRec("n", nil, nil)), ReasonMalformed},
		{"not JSON", store.KV{Key: store.NodeKey("prod", "n"), Value: []byte("{")}, ReasonMalformed},
		{"ips not a list", jsonKV(store.NodeKey("prod", "n"), map[string]any{"name": "n", "cluster": "prod", "ips": "10.0.0.1"}), ReasonMalformed},
		{"bad address", nodeKV("n", []string{"10.1.1.300"}, nil), ReasonMalformed},
		{"loopback address", nodeKV("n", []string{"127.0.0.1"}, nil), ReasonBadAddress},
		{"zoned address", nodeKV("n", []string{"fe80::1%eth0"}, nil), ReasonBadAddress},
		{"CIDR with host bits", nodeKV("n", nil, []string{"10.250.2.1/24"}), ReasonMalformed},
		{"CIDR of everything", nodeKV("n", nil, []string{"0.0.0.0/0"}), ReasonWideCIDR},
		{"IPv6 CIDR too wide", nodeKV("n", nil, []string{"fd00::/8"}), ReasonWideCIDR},
		{"multicast CIDR", nodeKV("n", nil, []string{"224.0.0.0/8"}), ReasonBadAddress},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nodes, rej := Nodes([]store.KV{tc.kv}, testSelf)
			switch tc.want {
			case "":
				if len(rej) != 0 || len(nodes) != 1 {
					t.Fatalf("rejected %v, nodes %v", rej, nodes)
				}
			case "skip":
				if len(rej) != 0 || len(nodes) != 0 {
					t.Fatalf("rejected %v, nodes %v", rej, nodes)
				}
			default:
				if len(nodes) != 0 || len(rej) != 1 || rej[0] != (Rejected{Key: tc.kv.Key, Reason: tc.want}) {
					t.Fatalf("nodes %v, rejected %v, want %q", nodes, rej, tc.want)
				}
			}
		})
	}
	if n := len(mustJSON(big)); n < MaxNodeValue {
		t.Fatalf("the 100,000-address record is only %d bytes", n)
	}
	nodes := testNodes(t)
	if h2 := nodes["h2"]; fmt.Sprint(h2.IPs, h2.CIDRs) != "[10.1.1.11] [10.250.2.0/24 fd00:250:2::/112]" {
		t.Fatalf("h2 parsed as %+v", h2)
	}
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func ipRec(ip string, id uint32, hostIP, node string) store.IPEntry {
	return store.IPEntry{IP: ip, Identity: id, HostIP: hostIP, Node: node, Endpoint: 7, LabelsHash: "app=web"}
}

func ipKV(ip string, e store.IPEntry) store.KV {
	return jsonKV(store.IPPrefix+"prod/"+ip, e)
}

func TestRemote(t *testing.T) {
	nodes := testNodes(t)
	id := uint32(identity.Make(3, 300))
	huge := ipRec("10.250.2.7", id, "10.1.1.11", "h2")
	huge.LabelsHash = strings.Repeat("x", MaxIPValue)
	cases := []struct {
		name string
		kv   store.KV
		want string // reason; "" accepted; "skip" skipped silently
	}{
		{"valid", ipKV("10.250.2.7", ipRec("10.250.2.7", id, "10.1.1.11", "h2")), ""},
		{"valid IPv6 without host ip", ipKV("fd00:250:2::7", ipRec("fd00:250:2::7", id, "", "h2")), ""},
		{"this host's own entry", ipKV("10.250.1.7", ipRec("10.250.1.7", id, "10.1.1.10", "h1")), "skip"},
		{"identity 1 (host)", ipKV("10.250.2.8", ipRec("10.250.2.8", uint32(identity.Host), "10.1.1.11", "h2")), ReasonReserved},
		{"identity 0", ipKV("10.250.2.8", ipRec("10.250.2.8", 0, "10.1.1.11", "h2")), ReasonReserved},
		{"host-local identity", ipKV("10.250.2.8", ipRec("10.250.2.8", uint32(identity.LocalMin), "10.1.1.11", "h2")), ReasonHostLocal},
		{"another cluster's identity", ipKV("10.250.2.8", ipRec("10.250.2.8", uint32(identity.Make(4, 300)), "10.1.1.11", "h2")), ReasonOtherCluster},
		{"this cluster's byte over a reserved number", ipKV("10.250.2.8", ipRec("10.250.2.8", uint32(identity.Make(3, 2)), "10.1.1.11", "h2")), ReasonReserved},
		{"key is not its address", ipKV("10.250.2.8", ipRec("10.250.2.9", id, "10.1.1.11", "h2")), ReasonKeyNotAddress},
		{"key spelled IPv4-mapped", ipKV("::ffff:10.250.2.8", ipRec("::ffff:10.250.2.8", id, "10.1.1.11", "h2")), ReasonKeyNotAddress},
		{"key of another cluster", jsonKV(store.IPKey("dev", addr("10.250.2.8")), ipRec("10.250.2.8", id, "10.1.1.11", "h2")), ReasonOtherCluster},
		{"another host claims this host's address", ipKV("10.1.1.10", ipRec("10.1.1.10", id, "10.1.1.12", "h3")), ReasonThisHost},
		{"another host claims an address of this host's CIDRs", ipKV("10.250.1.9", ipRec("10.250.1.9", id, "10.1.1.11", "h2")), ReasonThisHostCIDR},
		{"outside the publisher's CIDRs", ipKV("10.250.3.9", ipRec("10.250.3.9", id, "10.1.1.11", "h2")), ReasonOutsideCIDRs},
		{"unknown node", ipKV("10.250.2.8", ipRec("10.250.2.8", id, "10.1.1.11", "h9")), ReasonUnknownNode},
		{"host ip of another node", ipKV("10.250.2.8", ipRec("10.250.2.8", id, "10.1.1.12", "h2")), ReasonHostIP},
		{"host ip does not parse", ipKV("10.250.2.8", ipRec("10.250.2.8", id, "eleven", "h2")), ReasonMalformed},
		{"address does not parse", ipKV("10.250.2.300", ipRec("10.250.2.300", id, "10.1.1.11", "h2")), ReasonMalformed},
		{"multicast address", ipKV("224.0.0.1", ipRec("224.0.0.1", id, "10.1.1.11", "h2")), ReasonBadAddress},
		{"not JSON", store.KV{Key: store.IPPrefix + "prod/10.250.2.8", Value: []byte("[1,2]")}, ReasonMalformed},
		{"too large", ipKV("10.250.2.7", huge), ReasonTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			set, rej := Remote([]store.KV{tc.kv}, nodes, testSelf)
			switch tc.want {
			case "":
				if len(rej) != 0 || len(set) != 1 {
					t.Fatalf("rejected %v, set %v", rej, set)
				}
				var r store.IPEntry
				_ = json.Unmarshal(tc.kv.Value, &r)
				ip := addr(r.IP)
				var host netip.Addr
				if r.HostIP != "" {
					host = addr(r.HostIP)
				}
				if e, ok := set[netip.PrefixFrom(ip, ip.BitLen())]; !ok || e != (Entry{Identity: id, HostIP: host}) {
					t.Fatalf("set %v", set)
				}
			case "skip":
				if len(rej) != 0 || len(set) != 0 {
					t.Fatalf("rejected %v, set %v", rej, set)
				}
			default:
				if len(set) != 0 || len(rej) != 1 || rej[0] != (Rejected{Key: tc.kv.Key, Reason: tc.want}) {
					t.Fatalf("set %v, rejected %v, want %q", set, rej, tc.want)
				}
			}
		})
	}

	// Without the node list every entry is an unknown node's: the agent
	// must not call Remote before it has the nodes (see Remote).
	_, rej := Remote([]store.KV{cases[0].kv}, nil, testSelf)
	if len(rej) != 1 || rej[0].Reason != ReasonUnknownNode {
		t.Fatalf("without nodes: %v", rej)
	}
}

func TestNodeEntries(t *testing.T) {
	nodes := testNodes(t)
	// A node that lists this host's address and an address of this
	// host's CIDRs among its own.
	nodes["h4"] = Node{Name: "h4", IPs: []netip.Addr{addr("10.1.1.10"), addr("10.250.1.1"), addr("2001:db8::14")}}
	got := NodeEntries(nodes, testSelf)
	want := map[netip.Prefix]Entry{
		pfx("10.1.1.11"):    {Identity: 6, HostIP: addr("10.1.1.11")},
		pfx("10.1.1.12"):    {Identity: 6, HostIP: addr("10.1.1.12")},
		pfx("2001:db8::14"): {Identity: 6, HostIP: addr("2001:db8::14")},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("NodeEntries:\n got %v\nwant %v", got, want)
	}
}

func TestDuplicate(t *testing.T) {
	const mine, theirs = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
	rec := func(hostID string) store.KV {
		r := nodeRec("h1", []string{"10.1.1.99"}, []string{"10.250.9.0/24"})
		if hostID != "" {
			r["host_id"] = hostID
		}
		return jsonKV(store.NodeKey("prod", "h1"), r)
	}
	others := []store.KV{nodeKV("h2", []string{"10.1.1.11"}, nil)}

	other, ok := Duplicate(append(others, rec(theirs)), testSelf, mine)
	if !ok || other.HostID != theirs || fmt.Sprint(other.IPs) != "[10.1.1.99]" {
		t.Fatalf("another host's record under this name: %+v %v", other, ok)
	}
	for name, kvs := range map[string][]store.KV{
		"own record":          append(others, rec(mine)),
		"record without id":   append(others, rec("")),
		"no record":           others,
		"unreadable record":   {{Key: store.NodeKey("prod", "h1"), Value: []byte("{")}},
		"other node's record": {jsonKV(store.NodeKey("prod", "h2"), map[string]any{"name": "h2", "cluster": "prod", "host_id": theirs})},
	} {
		if other, ok := Duplicate(kvs, testSelf, mine); ok {
			t.Errorf("%s: reported a duplicate %+v", name, other)
		}
	}
	if _, ok := Duplicate([]store.KV{rec(theirs)}, testSelf, ""); ok {
		t.Error("a duplicate reported without a host id of our own")
	}
	// The other host's record is refused as a node (a loopback address)
	// but still reports who wrote it.
	bad := nodeRec("h1", []string{"127.0.0.1", "10.1.1.98"}, nil)
	bad["host_id"] = theirs
	other, ok = Duplicate([]store.KV{jsonKV(store.NodeKey("prod", "h1"), bad)}, testSelf, mine)
	if !ok || other.HostID != theirs || other.Name != "h1" {
		t.Fatalf("refused record: %+v %v", other, ok)
	}
	// Nodes reads host_id too.
	nodes, _ := Nodes([]store.KV{jsonKV(store.NodeKey("prod", "h2"), map[string]any{"name": "h2", "cluster": "prod", "host_id": theirs})}, testSelf)
	if nodes["h2"].HostID != theirs {
		t.Fatalf("Nodes lost the host id: %+v", nodes["h2"])
	}
}

func TestLoadHostID(t *testing.T) {
	path := filepath.Join(t.TempDir(), HostIDFile)
	id, err := LoadHostID(path)
	if err != nil || !validHostID(id) {
		t.Fatalf("first load: %q, %v", id, err)
	}
	again, err := LoadHostID(path)
	if err != nil || again != id {
		t.Fatalf("second load: %q, %v, want %q", again, err, id)
	}
	if NewHostID() == id {
		t.Fatal("two random ids are equal")
	}
	if err := os.WriteFile(path, []byte("garbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadHostID(path); err == nil {
		t.Fatal("a corrupt host id file was accepted")
	}
	// A missing state dir is created; a path under a file cannot be.
	if _, err := LoadHostID(filepath.Join(t.TempDir(), "new-dir", HostIDFile)); err != nil {
		t.Fatalf("host id in a state dir not created yet: %v", err)
	}
	if _, err := LoadHostID(filepath.Join(path, HostIDFile)); err == nil {
		t.Fatal("no error when the id cannot be written")
	}
}

// TestRemoteMemoSameAsRemote: the memo's whole check gives Remote's
// answer after values change, records come and go, and the node records
// change.
func TestRemoteMemoSameAsRemote(t *testing.T) {
	self := Self{Node: "me", Cluster: "default", ClusterID: 1}
	nodes := map[string]Node{"h1": {Name: "h1", IPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")},
		CIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}}}
	rec := func(ip string, id uint32, node string) store.KV {
		a := netip.MustParseAddr(ip)
		return store.KV{Key: store.IPKey("default", a),
			Value: []byte(fmt.Sprintf(`{"ip":%q,"identity":%d,"host_ip":"192.0.2.1","node":%q}`, ip, id, node))}
	}
	id := uint32(1)<<24 | 300
	var m RemoteMemo
	check := func(step string, kvs []store.KV, nodes map[string]Node) {
		t.Helper()
		ws, wr := Remote(kvs, nodes, self)
		m.SetNodes(nodes, self)
		gs, gr := m.Whole(kvs, self)
		if fmt.Sprint(ws, wr) != fmt.Sprint(gs, gr) {
			t.Fatalf("%s: memo gives %v %v, Remote %v %v", step, gs, gr, ws, wr)
		}
	}
	kvs := []store.KV{rec("10.1.0.1", id, "h1"), rec("10.1.0.2", id, "h1"), rec("10.1.0.3", 5, "h1"), rec("10.1.0.4", id, "me")}
	check("first", kvs, nodes)
	if s, r := m.Whole(kvs, self); len(s) != 2 || len(r) != 1 {
		t.Fatalf("first set %v, rejected %v: want 2 passed, 1 refused", s, r)
	}
	check("same", kvs, nodes)
	kvs[0] = rec("10.1.0.1", id+1, "h1")
	kvs = append(kvs[:1], kvs[2:]...)
	kvs = append(kvs, rec("10.1.0.9", id, "h1"))
	check("changed, removed, added", kvs, nodes)
	// h1's CIDR moves: every record of it must be checked again.
	nodes = map[string]Node{"h1": {Name: "h1", IPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")},
		CIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}}}
	check("nodes changed", kvs, nodes)
	if s, _ := m.Whole(kvs, self); len(s) != 0 {
		t.Fatalf("records outside h1's CIDR passed after the node change: %v", s)
	}
}

// TestRemoteMemoDeltasSameAsRemote: the set built by applying the memo's
// deltas (records changed and removed one batch at a time, node records
// changed, appearing and going away) is, after every step, what Remote
// checks of the whole list; and a check is done again only where a value
// or the addresses of its node changed.
func TestRemoteMemoDeltasSameAsRemote(t *testing.T) {
	self := Self{Node: "me", Cluster: "default", ClusterID: 1}
	node := func(name, ip, cidr, hostID string) Node {
		return Node{Name: name, IPs: []netip.Addr{netip.MustParseAddr(ip)}, CIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}, HostID: hostID}
	}
	hosts := []string{"h1", "h2", "h3", "me", "ghost"}
	hostIP := map[string]string{"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3", "me": "192.0.2.9", "ghost": "192.0.2.8"}
	nodes := map[string]Node{"h1": node("h1", "192.0.2.1", "10.1.0.0/16", "a"), "h2": node("h2", "192.0.2.2", "10.2.0.0/16", "b")}
	rnd := rand.New(rand.NewPCG(1, 2))
	store1 := map[string][]byte{}
	var m RemoteMemo
	applied := map[netip.Prefix]Entry{}
	refused := map[string]string{}
	apply := func(d Delta) {
		for _, p := range d.Delete {
			delete(applied, p)
		}
		maps.Copy(applied, d.Upsert)
		for k, r := range d.Refused {
			if r == "" {
				delete(refused, k)
			} else {
				refused[k] = r
			}
		}
	}
	compare := func(step int, what string) {
		t.Helper()
		var kvs []store.KV
		for k, v := range store1 {
			kvs = append(kvs, store.KV{Key: k, Value: v})
		}
		ws, wr := Remote(kvs, nodes, self)
		want := map[string]string{}
		for _, r := range wr {
			want[r.Key] = r.Reason
		}
		if !maps.Equal(ws, applied) || !maps.Equal(want, refused) {
			t.Fatalf("step %d (%s): deltas give %v refusing %v; Remote gives %v refusing %v", step, what, applied, refused, ws, want)
		}
	}
	apply(m.SetNodes(nodes, self))
	for step := range 400 {
		switch op := rnd.IntN(10); {
		case op < 7: // a batch of record writes and deletions
			dirty := map[string]bool{}
			for range 1 + rnd.IntN(4) {
				a := netip.AddrFrom4([4]byte{10, byte(1 + rnd.IntN(3)), 0, byte(1 + rnd.IntN(12))})
				k := store.IPKey("default", a)
				dirty[k] = true
				if rnd.IntN(4) == 0 {
					delete(store1, k)
					continue
				}
				h := hosts[rnd.IntN(len(hosts))]
				id := uint32(1)<<24 | uint32(300+rnd.IntN(3))
				if rnd.IntN(8) == 0 {
					id = 5 // reserved
				}
				v := fmt.Sprintf(`{"ip":%q,"identity":%d,"host_ip":%q,"node":%q}`, a, id, hostIP[h], h)
				if rnd.IntN(15) == 0 {
					v = "{not json"
				}
				store1[k] = []byte(v)
			}
			var changed []store.KV
			var removed []string
			for k := range dirty {
				if v, ok := store1[k]; ok {
					changed = append(changed, store.KV{Key: k, Value: v})
				} else {
					removed = append(removed, k)
				}
			}
			apply(m.Update(changed, removed, self))
			compare(step, "records")
		case op < 8: // a node record rewritten by its host's start: nothing to check again
			next := maps.Clone(nodes)
			for name, n := range next {
				n.HostID += "x"
				next[name] = n
			}
			before := m.checks
			d := m.SetNodes(next, self)
			nodes = next
			if m.checks != before || !d.Empty() {
				t.Fatalf("step %d: a node record with the same addresses checked %d records again, delta %+v", step, m.checks-before, d)
			}
			apply(d)
			compare(step, "same addresses")
		default: // a node moves its CIDR, appears or goes away
			next := maps.Clone(nodes)
			name := []string{"h2", "h3"}[rnd.IntN(2)]
			switch _, ok := next[name]; {
			case !ok:
				next[name] = node(name, hostIP[name], "10.3.0.0/16", "c")
			case rnd.IntN(2) == 0:
				delete(next, name)
			default:
				cidr := "10.2.0.0/16"
				if next[name].CIDRs[0].String() == cidr {
					cidr = "10.3.0.0/16"
				}
				next[name] = node(name, hostIP[name], cidr, "c")
			}
			of := 0
			for _, r := range m.memo {
				if r.node == name {
					of++
				}
			}
			before := m.checks
			apply(m.SetNodes(next, self))
			nodes = next
			if got := m.checks - before; got != of {
				t.Fatalf("step %d: node %s changed: %d records checked again, want its %d", step, name, got, of)
			}
			compare(step, "node "+name)
		}
	}
	if len(applied) == 0 || len(refused) == 0 {
		t.Fatalf("the walk never reached both an accepted and a refused record: %d accepted, %d refused", len(applied), len(refused))
	}
}
