package ipcache

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/store"
)

// Fuzz targets for the store records other hosts write: node records
// (Nodes) and ipcache records (Remote). Any host, or anyone with write
// access to the store, can write any bytes under these keys, so the
// checks must never panic, must refuse what they do not take with a
// reason, and what they take must satisfy every documented invariant and
// survive an encode/decode round trip unchanged.

var knownReasons = map[string]bool{
	ReasonTooLarge: true, ReasonMalformed: true, ReasonBadName: true, ReasonNameNotKey: true,
	ReasonOtherCluster: true, ReasonTooManyIPs: true, ReasonTooManyCIDRs: true, ReasonWideCIDR: true,
	ReasonBadAddress: true, ReasonKeyNotAddress: true, ReasonReserved: true, ReasonHostLocal: true,
	ReasonUnknownNode: true, ReasonOutsideCIDRs: true, ReasonThisHost: true, ReasonThisHostCIDR: true,
	ReasonHostIP: true,
}

// nodeEntryOf encodes a checked node the way the agent publishes its own.
func nodeEntryOf(n Node, cluster string) store.NodeEntry {
	e := store.NodeEntry{Name: n.Name, Cluster: cluster, Version: "fuzz", HostID: n.HostID}
	for _, ip := range n.IPs {
		e.IPs = append(e.IPs, ip.String())
	}
	for _, p := range n.CIDRs {
		e.CIDRs = append(e.CIDRs, p.String())
	}
	return e
}

func checkNode(t *testing.T, key string, n Node, self Self) {
	t.Helper()
	prefix := store.NodePrefix + self.Cluster + "/"
	if !reNodeName.MatchString(n.Name) || key != prefix+n.Name {
		t.Fatalf("accepted node %q under key %q", n.Name, key)
	}
	if n.Name == self.Node {
		t.Fatalf("this host's own record %q returned as another host's", n.Name)
	}
	if len(n.IPs) > MaxNodeIPs || len(n.CIDRs) > MaxNodeCIDRs {
		t.Fatalf("node %s: %d addresses, %d CIDRs accepted", n.Name, len(n.IPs), len(n.CIDRs))
	}
	for _, ip := range n.IPs {
		if !usable(ip) || ip.Is4In6() {
			t.Fatalf("node %s: unusable address %v accepted", n.Name, ip)
		}
	}
	for _, p := range n.CIDRs {
		if !p.IsValid() || p.Masked() != p || p.Addr().Is4In6() || p.Addr().Zone() != "" {
			t.Fatalf("node %s: CIDR %v is not a canonical prefix", n.Name, p)
		}
		if (p.Addr().Is4() && p.Bits() < MinCIDRBits4) || (p.Addr().Is6() && p.Bits() < MinCIDRBits6) {
			t.Fatalf("node %s: CIDR %v too wide", n.Name, p)
		}
	}
}

func FuzzNodes(f *testing.F) {
	seed := func(name string, v any) {
		b, _ := json.Marshal(v)
		f.Add(name, b)
	}
	seed("h2", nodeRec("h2", []string{"10.1.1.11", "2001:db8::11"}, []string{"10.250.2.0/24", "fd00:250:2::/112"}))
	seed("h2", map[string]any{"name": "h2", "cluster": "prod", "ips": []string{"::ffff:10.1.1.11"}, "cidrs": []string{"10.250.2.0/24"}, "host_id": "abc", "bgp_asn": 65001})
	seed("h1", nodeRec("h1", []string{"10.1.1.10"}, nil))
	seed("n", nodeRec("n", manyAddrs(65), nil))
	seed("n", nodeRec("n", nil, []string{"0.0.0.0/0", "::/0"}))
	seed("n", nodeRec("n", []string{"fe80::1%eth0"}, []string{"10.250.2.1/24"}))
	seed("n1", nodeRec("n2", nil, nil))
	seed("n", map[string]any{"name": "n", "cluster": "dev"})
	f.Add("n", []byte(`{"name":"n","cluster":"prod","ips":"10.0.0.1"}`))
	f.Add("n", []byte(`{"name":"n","name":"m","cluster":"prod","ips":null,"cidrs":[]}`))
	f.Add("", []byte(`{`))
	f.Fuzz(func(t *testing.T, name string, value []byte) {
		self := testSelf
		key := store.NodeKey(self.Cluster, name)
		kvs := []store.KV{
			{Key: key, Value: value},
			nodeKV("h2", []string{"10.1.1.11"}, []string{"10.250.2.0/24"}),
		}
		if key == kvs[1].Key {
			kvs = kvs[:1]
		}
		nodes, rejected := Nodes(kvs, self)
		// Every record is accounted for exactly once: taken, refused
		// with a known reason, or this host's own (skipped).
		skipped := 0
		for _, kv := range kvs {
			if name == self.Node && kv.Key == key {
				skipped++
			}
		}
		if len(nodes)+len(rejected) != len(kvs) && len(nodes)+len(rejected)+skipped != len(kvs) {
			t.Fatalf("%d records: %d nodes, %d rejected", len(kvs), len(nodes), len(rejected))
		}
		for _, r := range rejected {
			if !knownReasons[r.Reason] {
				t.Fatalf("rejected %q with unknown reason %q", r.Key, r.Reason)
			}
		}
		for nm, n := range nodes {
			if nm != n.Name {
				t.Fatalf("node %q stored under %q", n.Name, nm)
			}
			checkNode(t, store.NodeKey(self.Cluster, nm), n, self)
			// Round trip: the node, encoded as a record, decodes to itself.
			b, err := json.Marshal(nodeEntryOf(n, self.Cluster))
			if err != nil {
				t.Fatal(err)
			}
			again, rej := Nodes([]store.KV{{Key: store.NodeKey(self.Cluster, n.Name), Value: b}}, self)
			if len(rej) != 0 || !reflect.DeepEqual(again[n.Name], n) {
				t.Fatalf("round trip of %+v: got %+v, rejected %v", n, again[n.Name], rej)
			}
		}
		// Duplicate reads the same records and must not panic either.
		selfKV := store.KV{Key: store.NodeKey(self.Cluster, self.Node), Value: value}
		if other, ok := Duplicate([]store.KV{selfKV}, self, "self-host-id"); ok {
			if other == nil || other.HostID == "" || other.HostID == "self-host-id" || len(other.IPs) > MaxNodeIPs {
				t.Fatalf("Duplicate reported %+v", other)
			}
		}
	})
}

func FuzzRemote(f *testing.F) {
	id := uint32(identity.Make(3, 300))
	seed := func(ip string, v any, node any) {
		b, _ := json.Marshal(v)
		nb, _ := json.Marshal(node)
		f.Add(ip, b, nb)
	}
	fz := nodeRec("fz", []string{"10.1.1.20", "2001:db8::20"}, []string{"10.250.9.0/24", "fd00:250:9::/64"})
	seed("10.250.2.7", ipRec("10.250.2.7", id, "10.1.1.11", "h2"), fz)
	seed("10.250.9.7", ipRec("10.250.9.7", id, "", "fz"), fz)
	seed("fd00:250:9::7", ipRec("fd00:250:9::7", id, "2001:db8::20", "fz"), fz)
	seed("10.250.9.7", ipRec("::ffff:10.250.9.7", id, "::ffff:10.1.1.20", "fz"), fz)
	seed("10.250.1.7", ipRec("10.250.1.7", id, "", "h1"), fz)
	seed("10.250.2.8", ipRec("10.250.2.8", 2, "", "h2"), fz)
	seed("10.250.2.9", ipRec("10.250.2.9", uint32(identity.Make(4, 300)), "", "h2"), fz)
	seed("10.250.2.9", ipRec("10.250.2.9", uint32(identity.Make(3, 20)), "", "h2"), fz)
	seed("10.250.2.10", ipRec("10.250.2.10", 0x1000, "", "h2"), fz)
	seed("10.1.1.10", ipRec("10.1.1.10", id, "", "h2"), fz)
	seed("10.9.9.9", ipRec("10.9.9.9", id, "10.1.1.11", "h2"), fz)
	seed("10.250.2.7", ipRec("10.250.2.7", id, "10.1.1.99", "h2"), fz)
	seed("10.250.2.7", ipRec("10.250.2.8", id, "", "h2"), fz)
	f.Add("10.250.2.7", []byte(`{"ip":"10.250.2.7","identity":-1}`), []byte(`null`))
	f.Add("x", []byte(`[]`), []byte(`{`))
	f.Fuzz(func(t *testing.T, keyIP string, value, nodeValue []byte) {
		self := testSelf
		// The fuzzed node record goes under the key its name asks for, so
		// that valid records are taken.
		var nn struct {
			Name string `json:"name"`
		}
		_ = json.Unmarshal(nodeValue, &nn)
		nodeKVs := []store.KV{
			nodeKV("h2", []string{"10.1.1.11"}, []string{"10.250.2.0/24", "fd00:250:2::/112"}),
			{Key: store.NodeKey(self.Cluster, nn.Name), Value: nodeValue},
		}
		nodes, _ := Nodes(nodeKVs, self)
		key := store.IPPrefix + self.Cluster + "/" + keyIP
		set, rejected := Remote([]store.KV{{Key: key, Value: value}}, nodes, self)
		if len(set)+len(rejected) > 1 {
			t.Fatalf("one record gave %d entries and %d refusals", len(set), len(rejected))
		}
		for _, r := range rejected {
			if !knownReasons[r.Reason] || r.Key != key {
				t.Fatalf("refusal %+v", r)
			}
		}
		for p, e := range set {
			// The invariants of Remote's doc comment, checked against the
			// record as a plain decode reads it.
			var r store.IPEntry
			if err := json.Unmarshal(value, &r); err != nil {
				t.Fatalf("accepted a record that does not decode: %v", err)
			}
			ip := p.Addr()
			if !p.IsSingleIP() || !usable(ip) || ip.Is4In6() || key != store.IPKey(self.Cluster, ip) {
				t.Fatalf("accepted %v under key %q", p, key)
			}
			if want, err := netip.ParseAddr(r.IP); err != nil || want.Unmap() != ip {
				t.Fatalf("entry %v from record ip %q", p, r.IP)
			}
			if e.Identity != r.Identity {
				t.Fatalf("entry identity %d from record identity %d", e.Identity, r.Identity)
			}
			if nid := identity.ID(e.Identity); !nid.IsCluster() || nid.Cluster() != self.ClusterID {
				t.Fatalf("accepted identity %v", nid)
			}
			if self.owns(ip) || r.Node == self.Node {
				t.Fatalf("accepted this host's address %v", ip)
			}
			n, ok := nodes[r.Node]
			if !ok || !slices.ContainsFunc(n.CIDRs, func(c netip.Prefix) bool { return c.Contains(ip) }) {
				t.Fatalf("accepted %v outside node %q's CIDRs", ip, r.Node)
			}
			if e.HostIP.IsValid() && !slices.Contains(n.IPs, e.HostIP) || !e.HostIP.IsValid() && r.HostIP != "" {
				t.Fatalf("host ip %v (record %q) not one of node %q's %v", e.HostIP, r.HostIP, r.Node, n.IPs)
			}
			// Round trip: the entry, encoded as the agent writes it, is taken
			// again unchanged.
			out := store.IPEntry{IP: ip.String(), Identity: e.Identity, Node: r.Node}
			if e.HostIP.IsValid() {
				out.HostIP = e.HostIP.String()
			}
			b, err := json.Marshal(out)
			if err != nil {
				t.Fatal(err)
			}
			again, rej := Remote([]store.KV{{Key: key, Value: b}}, nodes, self)
			if len(rej) != 0 || len(again) != 1 || again[p] != e {
				t.Fatalf("round trip of %v %+v: got %v, refused %v", p, e, again, rej)
			}
		}
		// The node entries derived from the checked nodes never name this
		// host's addresses.
		for p, e := range NodeEntries(nodes, self) {
			if self.owns(p.Addr()) || e.HostIP != p.Addr() {
				t.Fatalf("node entry %v %+v", p, e)
			}
		}
	})
}
