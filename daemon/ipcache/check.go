package ipcache

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/store"
)

// Store data is checked, not trusted: any host (or anyone with write access
// to the store) can write any key, so every record is bounded and checked
// against what its publisher may claim before it reaches the datapath.

// Bounds of store records.
const (
	// MaxNodeValue bounds a node record (a record with 64 addresses and 64
	// CIDRs is about 5 KiB).
	MaxNodeValue = 16 << 10
	// MaxNodeIPs and MaxNodeCIDRs bound the lists of a node record.
	MaxNodeIPs   = 64
	MaxNodeCIDRs = 64
	// MaxIPValue bounds an ipcache record (about 200 bytes in practice).
	MaxIPValue = 4 << 10
	// MinCIDRBits4 and MinCIDRBits6 are the shortest workload CIDRs a node
	// may claim: a node claiming 0.0.0.0/0 could otherwise publish any
	// address of the internet with a workload identity.
	MinCIDRBits4 = 8
	MinCIDRBits6 = 32
	// MaxNodeFeatures bounds a node record's feature list.
	MaxNodeFeatures = 16
)

// Reasons for refusing a store record: short, stable strings for logs and
// metric labels.
const (
	ReasonTooLarge      = "too large"
	ReasonMalformed     = "malformed"
	ReasonBadName       = "invalid node name"
	ReasonNameNotKey    = "name is not its key"
	ReasonOtherCluster  = "other cluster"
	ReasonTooManyIPs    = "too many addresses"
	ReasonTooManyCIDRs  = "too many CIDRs"
	ReasonWideCIDR      = "CIDR too wide"
	ReasonBadAddress    = "unusable address"
	ReasonKeyNotAddress = "key is not its address"
	ReasonReserved      = "reserved identity"
	ReasonHostLocal     = "host-local identity"
	ReasonUnknownNode   = "unknown node"
	ReasonOutsideCIDRs  = "outside the publisher's CIDRs"
	ReasonThisHost      = "this host's address"
	ReasonThisHostCIDR  = "inside this host's CIDRs"
	ReasonHostIP        = "host ip is not the publisher's"
)

// reNodeName is config's rule for node names.
var reNodeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Self is what the checks need to know of this host.
type Self struct {
	Node      string
	Cluster   string
	ClusterID uint8
	// Addrs are this host's addresses.
	Addrs []netip.Addr
	// CIDRs are this host's workload CIDRs.
	CIDRs []netip.Prefix
}

// Node is a checked node record of another host.
type Node struct {
	Name  string
	IPs   []netip.Addr
	CIDRs []netip.Prefix
	// HostID is the random id of the host that wrote the record ("" from
	// agents that do not publish one).
	HostID string
	// Features are the record's "features" (store.NodeEntry).
	Features []string
}

// Rejected is a store record that was refused, and why (one of the Reason
// constants).
type Rejected struct {
	Key    string
	Reason string
}

// nodeRecord is a node record as stored. host_id is read here so that the
// checks do not depend on store.NodeEntry having the field; once it does,
// this outer field still wins (it is shallower).
type nodeRecord struct {
	store.NodeEntry
	HostID string `json:"host_id"`
}

// Nodes checks the node records of self's cluster (the list of
// store.NodePrefix + cluster + "/") and returns the other hosts' nodes by
// name. This host's own record is skipped (see Duplicate). A record is
// refused whole when it is too large, does not decode, has an invalid name
// or a name that is not its key's last element, belongs to another
// cluster, lists too many addresses or CIDRs, or an address or CIDR that
// does not parse, is not usable (loopback, multicast, unspecified,
// link-local, zoned) or is too wide.
func Nodes(kvs []store.KV, self Self) (nodes map[string]Node, rejected []Rejected) {
	nodes = make(map[string]Node, len(kvs))
	for _, kv := range kvs {
		n, reason := parseNode(kv, self)
		if reason != "" {
			rejected = append(rejected, Rejected{Key: kv.Key, Reason: reason})
			continue
		}
		if n.Name == self.Node {
			continue
		}
		nodes[n.Name] = n
	}
	return nodes, rejected
}

func parseNode(kv store.KV, self Self) (Node, string) {
	prefix := store.NodePrefix + self.Cluster + "/"
	if !strings.HasPrefix(kv.Key, prefix) {
		if strings.HasPrefix(kv.Key, store.NodePrefix) {
			return Node{}, ReasonOtherCluster
		}
		return Node{}, ReasonMalformed
	}
	if len(kv.Value) > MaxNodeValue {
		return Node{}, ReasonTooLarge
	}
	var r nodeRecord
	if err := json.Unmarshal(kv.Value, &r); err != nil {
		return Node{}, ReasonMalformed
	}
	switch {
	case !reNodeName.MatchString(r.Name):
		return Node{}, ReasonBadName
	case r.Name != kv.Key[len(prefix):]:
		return Node{}, ReasonNameNotKey
	case r.Cluster != self.Cluster:
		return Node{}, ReasonOtherCluster
	case len(r.IPs) > MaxNodeIPs:
		return Node{}, ReasonTooManyIPs
	case len(r.CIDRs) > MaxNodeCIDRs:
		return Node{}, ReasonTooManyCIDRs
	}
	if len(r.Features) > MaxNodeFeatures {
		return Node{}, ReasonMalformed
	}
	n := Node{Name: r.Name, HostID: r.HostID, Features: r.Features, IPs: make([]netip.Addr, 0, len(r.IPs)), CIDRs: make([]netip.Prefix, 0, len(r.CIDRs))}
	for _, s := range r.IPs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return Node{}, ReasonMalformed
		}
		if ip = ip.Unmap(); !usable(ip) {
			return Node{}, ReasonBadAddress
		}
		n.IPs = append(n.IPs, ip)
	}
	for _, s := range r.CIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return Node{}, ReasonMalformed
		}
		if np, err := normalize(p); err != nil || np != p {
			return Node{}, ReasonMalformed // host bits set, or IPv4-mapped
		}
		if !usable(p.Addr()) && !p.Addr().IsUnspecified() {
			return Node{}, ReasonBadAddress
		}
		if (p.Addr().Is4() && p.Bits() < MinCIDRBits4) || (p.Addr().Is6() && p.Bits() < MinCIDRBits6) {
			return Node{}, ReasonWideCIDR
		}
		n.CIDRs = append(n.CIDRs, p)
	}
	return n, ""
}

// usable reports whether a may be a workload's or a node's address.
func usable(a netip.Addr) bool {
	return a.IsValid() && a.Zone() == "" && !a.IsUnspecified() && !a.IsLoopback() &&
		!a.IsMulticast() && !a.IsLinkLocalUnicast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// Remote checks the ipcache records of self's cluster (the list of
// store.IPPrefix + cluster + "/") against the checked nodes and returns the
// entries to put in force as RemoteEndpoint, keyed by /32 or /128. A record
// is taken only if: it is at most MaxIPValue bytes and decodes; its key is
// store.IPKey(self.Cluster, its address); its identity is a cluster
// identity of this cluster (not reserved, not host-local, cluster byte
// equal to self.ClusterID); its address is not one of this host's and not
// inside this host's workload CIDRs; its node is known and its address lies
// inside that node's CIDRs; its host IP is empty or one of that node's
// addresses. Records of this host's node are skipped silently: the agent
// writes its own endpoints (LocalEndpoint).
//
// The result depends on nodes as much as on kvs: call Remote again when
// either list changes, and never before the node list has been read once
// (with no nodes every record is an "unknown node" and Replace would
// withdraw them all).
func Remote(kvs []store.KV, nodes map[string]Node, self Self) (set map[netip.Prefix]Entry, rejected []Rejected) {
	set = make(map[netip.Prefix]Entry, len(kvs))
	prefix := store.IPPrefix + self.Cluster + "/"
	var buf []byte
	for _, kv := range kvs {
		var r checkResult
		r, buf = checkIP(kv, nodes, self, prefix, buf)
		switch {
		case r.reason == skipSelf:
		case r.reason != "":
			rejected = append(rejected, Rejected{Key: kv.Key, Reason: r.reason})
		default:
			set[netip.PrefixFrom(r.ip, r.ip.BitLen())] = r.e
		}
	}
	return set, rejected
}

// RemoteMemo is Remote with a memory of its checks, for an agent that
// follows the fleet's records change by change (the ipcache change log)
// and must not pay for the fleet's size on every change: at 30,000
// records a whole check costs ≈ 65 ms of CPU, and with 100 agents on one
// machine and hundreds of changes a second that was the machine's CPU
// (docs/scale.md).
//
// It owns the node view the records are checked against (SetNodes) and
// each record's last result. A record is checked again only when its
// value changes (Update) or when the record of the node it names changes
// in what a check reads: the node's addresses and CIDRs, or its existence.
// A node record rewritten with the same addresses (every start of that
// host) re-checks nothing. Update and SetNodes return the change of the
// checked set as a Delta for the ipcache; Whole returns the whole set
// (for Cache.Replace after a list). Not safe for concurrent use.
type RemoteMemo struct {
	memo  map[string]memoIP
	nodes map[string]Node
	// checks counts checkIP calls, for the tests.
	checks int
}

type memoIP struct {
	val []byte
	checkResult
}

// Delta is a change of the checked set: entries to write, prefixes to
// withdraw, and the keys whose refusal changed (reason "" when a key is
// no longer refused, or is gone).
type Delta struct {
	Upsert  map[netip.Prefix]Entry
	Delete  []netip.Prefix
	Refused map[string]string
}

// Empty reports whether d changes nothing.
func (d Delta) Empty() bool { return len(d.Upsert) == 0 && len(d.Delete) == 0 && len(d.Refused) == 0 }

// Value returns the value of a record as the memo last saw it: the memo
// holds every record of the last list and the changes since, so it is
// the agent's one copy of the fleet's ipcache records.
func (m *RemoteMemo) Value(key string) ([]byte, bool) {
	r, ok := m.memo[key]
	return r.val, ok
}

// Whole checks kvs, the whole list of ipcache records, against the node
// view, reusing every result whose record and node are the same, and
// forgets records kvs does not hold. It is Remote's answer.
func (m *RemoteMemo) Whole(kvs []store.KV, self Self) (set map[netip.Prefix]Entry, rejected []Rejected) {
	set = make(map[netip.Prefix]Entry, len(kvs))
	next := make(map[string]memoIP, len(kvs))
	prefix := store.IPPrefix + self.Cluster + "/"
	var buf []byte
	for _, kv := range kvs {
		r, ok := m.memo[kv.Key]
		if !ok || !bytes.Equal(r.val, kv.Value) {
			r.val = kv.Value
			r.checkResult, buf = checkIP(kv, m.nodes, self, prefix, buf)
			m.checks++
		}
		next[kv.Key] = r
		switch {
		case r.reason == skipSelf:
		case r.reason != "":
			rejected = append(rejected, Rejected{Key: kv.Key, Reason: r.reason})
		default:
			set[netip.PrefixFrom(r.ip, r.ip.BitLen())] = r.e
		}
	}
	m.memo = next
	return set, rejected
}

// SetNodes makes nodes the node view and checks again the records of the
// nodes whose addresses or CIDRs changed, appeared or went away.
func (m *RemoteMemo) SetNodes(nodes map[string]Node, self Self) Delta {
	moved := map[string]bool{}
	for name, o := range m.nodes {
		if n, ok := nodes[name]; !ok || !sameChecks(o, n) {
			moved[name] = true
		}
	}
	for name := range nodes {
		if _, ok := m.nodes[name]; !ok {
			moved[name] = true
		}
	}
	m.nodes = nodes
	d := newDelta()
	if len(moved) == 0 {
		return d
	}
	prefix := store.IPPrefix + self.Cluster + "/"
	var buf []byte
	for k, r := range m.memo {
		if r.node != "" && moved[r.node] {
			buf = m.recheck(&d, store.KV{Key: k, Value: r.val}, self, prefix, buf)
		}
	}
	return d
}

// Update checks the records written (changed) and withdraws those deleted
// (removed) since the last call.
func (m *RemoteMemo) Update(changed []store.KV, removed []string, self Self) Delta {
	d := newDelta()
	if m.memo == nil {
		m.memo = make(map[string]memoIP, len(changed))
	}
	prefix := store.IPPrefix + self.Cluster + "/"
	var buf []byte
	for _, kv := range changed {
		if r, ok := m.memo[kv.Key]; ok && bytes.Equal(r.val, kv.Value) {
			continue
		}
		buf = m.recheck(&d, kv, self, prefix, buf)
	}
	for _, k := range removed {
		r, ok := m.memo[k]
		if !ok {
			continue
		}
		delete(m.memo, k)
		if r.accepted() {
			d.Delete = append(d.Delete, netip.PrefixFrom(r.ip, r.ip.BitLen()))
		}
		if r.reason != "" && r.reason != skipSelf {
			d.Refused[k] = ""
		}
	}
	return d
}

func newDelta() Delta {
	return Delta{Upsert: map[netip.Prefix]Entry{}, Refused: map[string]string{}}
}

// recheck checks kv and records in d how its result differs from the
// last one.
func (m *RemoteMemo) recheck(d *Delta, kv store.KV, self Self, prefix string, buf []byte) []byte {
	old, had := m.memo[kv.Key]
	r := memoIP{val: kv.Value}
	r.checkResult, buf = checkIP(kv, m.nodes, self, prefix, buf)
	m.checks++
	m.memo[kv.Key] = r
	if had && old.accepted() && (!r.accepted() || old.ip != r.ip) {
		d.Delete = append(d.Delete, netip.PrefixFrom(old.ip, old.ip.BitLen()))
	}
	if r.accepted() && (!had || !old.accepted() || old.ip != r.ip || old.e != r.e) {
		d.Upsert[netip.PrefixFrom(r.ip, r.ip.BitLen())] = r.e
	}
	was, now := "", r.reason
	if had && old.reason != skipSelf {
		was = old.reason
	}
	if now == skipSelf {
		now = ""
	}
	if was != now {
		d.Refused[kv.Key] = now
	}
	return buf
}

// sameChecks reports whether a check of a record reads the same of a and b.
func sameChecks(a, b Node) bool {
	return slices.Equal(a.IPs, b.IPs) && slices.Equal(a.CIDRs, b.CIDRs)
}

// checkResult is what checkIP decided of one record: the node it names
// ("" when it was refused before that was read), and either the entry or
// the reason for refusing it.
type checkResult struct {
	node   string
	ip     netip.Addr
	e      Entry
	reason string
}

func (r checkResult) accepted() bool { return r.reason == "" }

const skipSelf = "\x00self"

func checkIP(kv store.KV, nodes map[string]Node, self Self, prefix string, buf []byte) (checkResult, []byte) {
	if !strings.HasPrefix(kv.Key, prefix) {
		if strings.HasPrefix(kv.Key, store.IPPrefix) {
			return checkResult{reason: ReasonOtherCluster}, buf
		}
		return checkResult{reason: ReasonMalformed}, buf
	}
	if len(kv.Value) > MaxIPValue {
		return checkResult{reason: ReasonTooLarge}, buf
	}
	r, ok := decodeIPRecord(kv.Value)
	if !ok {
		r = store.IPEntry{} // what the one pass read before it gave up
		if err := json.Unmarshal(kv.Value, &r); err != nil {
			return checkResult{reason: ReasonMalformed}, buf
		}
	}
	node := r.Node
	ip, err := netip.ParseAddr(r.IP)
	if err != nil {
		return checkResult{node: node, reason: ReasonMalformed}, buf
	}
	if ip = ip.Unmap(); !usable(ip) {
		return checkResult{node: node, reason: ReasonBadAddress}, buf
	}
	// The key must be store.IPKey(cluster, ip): compared without building
	// the key string.
	buf = ip.AppendTo(buf[:0])
	if kv.Key[len(prefix):] != string(buf) {
		return checkResult{node: node, reason: ReasonKeyNotAddress}, buf
	}
	if r.Node == self.Node {
		return checkResult{node: node, reason: skipSelf}, buf
	}
	switch id := identity.ID(r.Identity); {
	case id.IsReserved():
		return checkResult{node: node, reason: ReasonReserved}, buf
	case id.Cluster() == 0:
		return checkResult{node: node, reason: ReasonHostLocal}, buf
	case id.Cluster() != self.ClusterID:
		return checkResult{node: node, reason: ReasonOtherCluster}, buf
	case !id.IsCluster():
		// This cluster's byte over a local number below 256: that range
		// mirrors the reserved one and is never allocated.
		return checkResult{node: node, reason: ReasonReserved}, buf
	}
	for _, a := range self.Addrs {
		if a.Unmap() == ip {
			return checkResult{node: node, reason: ReasonThisHost}, buf
		}
	}
	for _, p := range self.CIDRs {
		if p.Contains(ip) {
			return checkResult{node: node, reason: ReasonThisHostCIDR}, buf
		}
	}
	n, ok := nodes[r.Node]
	if !ok {
		return checkResult{node: node, reason: ReasonUnknownNode}, buf
	}
	inside := false
	for _, p := range n.CIDRs {
		if p.Contains(ip) {
			inside = true
			break
		}
	}
	if !inside {
		return checkResult{node: node, reason: ReasonOutsideCIDRs}, buf
	}
	e := Entry{Identity: r.Identity}
	if r.HostIP != "" {
		h, err := netip.ParseAddr(r.HostIP)
		if err != nil {
			return checkResult{node: node, reason: ReasonMalformed}, buf
		}
		h = h.Unmap()
		known := false
		for _, a := range n.IPs {
			if a == h {
				known = true
				break
			}
		}
		if !known {
			return checkResult{node: node, reason: ReasonHostIP}, buf
		}
		e.HostIP = h
	}
	return checkResult{node: node, ip: ip, e: e}, buf
}

// NodeEntries returns the other hosts' addresses as RemoteNode entries:
// identity remote-node, the address itself as host IP. This host's
// addresses, and addresses inside its workload CIDRs, are left out.
func NodeEntries(nodes map[string]Node, self Self) map[netip.Prefix]Entry {
	set := map[netip.Prefix]Entry{}
	for _, n := range nodes {
		for _, ip := range n.IPs {
			if ip = ip.Unmap(); !self.owns(ip) {
				set[netip.PrefixFrom(ip, ip.BitLen())] = Entry{Identity: uint32(identity.RemoteNode), HostIP: ip}
			}
		}
	}
	return set
}

// owns reports whether ip is one of this host's addresses or lies inside
// its workload CIDRs.
func (s Self) owns(ip netip.Addr) bool {
	for _, a := range s.Addrs {
		if a.Unmap() == ip {
			return true
		}
	}
	for _, p := range s.CIDRs {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// Duplicate reports whether the record under this host's own node name
// (in the node list kvs) was written by another host: it carries a host_id
// that is not selfHostID. Two hosts configured with the same node name
// overwrite each other's record, each skips the other's endpoints as its
// own, and other hosts check the endpoints of one against the CIDRs of the
// other; see docs/ipcache.md for what the agent does about it. A record
// without a host_id (an older agent), an unreadable record or an empty
// selfHostID prove nothing and report false.
func Duplicate(kvs []store.KV, self Self, selfHostID string) (other *Node, ok bool) {
	if selfHostID == "" {
		return nil, false
	}
	key := store.NodeKey(self.Cluster, self.Node)
	for _, kv := range kvs {
		if kv.Key != key {
			continue
		}
		var r nodeRecord
		if len(kv.Value) > MaxNodeValue || json.Unmarshal(kv.Value, &r) != nil || r.HostID == "" || r.HostID == selfHostID {
			return nil, false
		}
		n, reason := parseNode(kv, self)
		if reason != "" {
			// The other host's record is refused as a node, but it
			// still says who wrote it: report what can be read.
			n = Node{Name: r.Name, HostID: r.HostID}
			for _, s := range r.IPs[:min(len(r.IPs), MaxNodeIPs)] {
				if ip, err := netip.ParseAddr(s); err == nil {
					n.IPs = append(n.IPs, ip.Unmap())
				}
			}
		}
		return &n, true
	}
	return nil, false
}
