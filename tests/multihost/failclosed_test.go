package multihost

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/hashicorp/consul/api"

	rwapi "github.com/rackwire/rackwire/daemon/api"
	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/consultest"
)

// epID returns the id of a host's endpoint.
func (h *host) epID(t testing.TB, name string) uint16 {
	t.Helper()
	var ep rwapi.Endpoint
	h.cliJSON(t, &ep, "endpoint", "get", name)
	return ep.ID
}

// policyKeys reads the keys of the pinned policy map of endpoint id (the
// map in force: a policy change pins the new map under the same name).
func (h *host) policyKeys(id uint16) (map[string]bool, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(h.pinDir, fmt.Sprintf("rw_policy_%05d", id)), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	keys := map[string]bool{}
	k := make([]byte, m.KeySize())
	v := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys[string(k)] = true
	}
	return keys, it.Err()
}

// watchPolicyMap checks the policy map of endpoint id every 10 ms until
// stop is closed: every key must be one of allowed, and the all-zero key
// (allow all ingress) must never appear. It returns the violations seen
// and the number of reads.
func (h *host) watchPolicyMap(id uint16, allowed map[string]bool, stop <-chan struct{}) (wait func() ([]string, int)) {
	var (
		wg    sync.WaitGroup
		bad   []string
		reads int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		open := string(make([]byte, 8))
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			keys, err := h.policyKeys(id)
			if err != nil {
				continue // between unpin and pin, or the agent restarting
			}
			reads++
			for k := range keys {
				if k == open || !allowed[k] {
					bad = append(bad, fmt.Sprintf("%s: key %x", time.Now().Format("15:04:05.000"), k))
				}
			}
		}
	}()
	return func() ([]string, int) { wg.Wait(); return bad, reads }
}

// clientWeb plugs client and other into ch and web (serving) into wh,
// imports the test policies and checks their verdicts: client -> web
// allowed, other -> web dropped.
func clientWeb(t *testing.T, f *fabric, ch, wh *host) (client, other, web *endpoint) {
	t.Helper()
	client = ch.addEndpoint(t, "client", "app=client")
	other = ch.addEndpoint(t, "other", "app=other")
	web = wh.addEndpoint(t, "web", "app=web")
	web.serve(t)
	importPolicy(t, f, ch)
	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Fatalf("client -> web not allowed after %s", d)
	}
	if other.probe(web, 2*time.Second) {
		t.Fatalf("other -> web allowed with the policy in force")
	}
	return client, other, web
}

// watchWeb starts watchPolicyMap on h's endpoint web with the keys its map
// holds now; close stop, then wait for the violations and the read count.
func (h *host) watchWeb(t *testing.T, stop <-chan struct{}) (wait func() ([]string, int)) {
	t.Helper()
	id := h.epID(t, "web")
	before, err := h.policyKeys(id)
	if err != nil {
		t.Fatal(err)
	}
	return h.watchPolicyMap(id, before, stop)
}

// TestStoreDownAtStart restarts host B's agent while Consul is down, with
// B's endpoint selected only by a policy that lives in Consul: at no instant
// (read every 10 ms, from before the restart until well after Consul is
// back) does the endpoint's map hold anything it did not hold before, and
// the denied peer stays denied.
func TestStoreDownAtStart(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 2, persistent: true})
	a, b := f.hosts[0], f.hosts[1]
	a.start(t)
	b.start(t)
	client, other, web := clientWeb(t, f, a, b)
	stop := make(chan struct{})
	wait := b.watchWeb(t, stop)

	b.stop()
	f.consul.Kill()
	t.Logf("consul killed; restarting %s's agent without a store", b.name)
	b.start(t)
	st, err := b.status()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s with the store down: policy %s: %s", b.name, st.Policy.State, st.Policy.Message)
	if st.Policy.State == rwapi.StateOK {
		t.Errorf("policy status ok while the store's policies were never listed; want it to say what it waits for")
	}
	if other.probe(web, 2*time.Second) {
		t.Errorf("other -> web allowed while the store is down after a restart")
	}
	time.Sleep(5 * time.Second)

	f.consul.Restart()
	consultest.WaitLeader(t, f.consul.Client(t), 60*time.Second)
	back := time.Now()
	waitFor(t, 90*time.Second, b.name+" policy loaded again", func() bool {
		s, err := b.status()
		return err == nil && s.Policy.State == rwapi.StateOK
	})
	t.Logf("%s loaded the store's policies and identities %s after Consul returned", b.name, time.Since(back).Truncate(100*time.Millisecond))
	// Watch a while longer: the watches' first lists arrive in any order.
	time.Sleep(10 * time.Second)
	close(stop)
	bad, reads := wait()
	t.Logf("web's policy map read %d times across the restart and the outage", reads)
	if reads < 100 {
		t.Errorf("only %d reads of the policy map; the check saw too little", reads)
	}
	if len(bad) > 0 {
		t.Errorf("web's policy map held %d keys it did not hold before the restart (first: %v)", len(bad), bad[:min(5, len(bad))])
	}
	if other.probe(web, 2*time.Second) {
		t.Errorf("other -> web allowed after the store returned")
	}
	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Errorf("client -> web not allowed %s after the store returned", d)
	}
}

// ipEntryJSON is an ipcache record as a (hostile) publisher writes it.
func ipEntryJSON(ip string, id uint32, hostIP, node string) []byte {
	b, _ := json.Marshal(map[string]any{"ip": ip, "identity": id, "host_ip": hostIP, "node": node})
	return b
}

// TestHostileStoreData writes well-formed but hostile records to Consul, as
// a compromised or buggy host could: reserved and host-local identities,
// a key that is not its address, another host's endpoint address, an
// address outside the publisher's CIDRs, a node record with 100,000
// addresses, and a record under host A's own node name from another host.
// No host's ipcache changes, verdicts do not change, identities in use
// stay, and the refusals are visible.
func TestHostileStoreData(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 2})
	a, b := f.hosts[0], f.hosts[1]
	a.start(t)
	b.start(t)
	client, other, web := clientWeb(t, f, a, b)
	var webEP rwapi.Endpoint
	b.cliJSON(t, &webEP, "endpoint", "get", "web")
	ipcacheOf := map[string]string{}
	idsOf := map[string]string{}
	for _, h := range f.hosts {
		ipcacheOf[h.name] = h.mustCLI(t, "bpf", "ipcache", "list", "--json")
		idsOf[h.name] = clusterIDs(t, h)
	}

	bHost := b.uplink
	kv := f.consul.Client(t).KV()
	ipKeyOf := func(ip string) string { return "rackwire/state/ip/v1/default/" + ip }
	var many []string
	for i := range 100000 {
		many = append(many, fmt.Sprintf("10.%d.%d.%d", 100+i>>16, (i>>8)&255, i&255))
	}
	bigNode, _ := json.Marshal(map[string]any{"name": "hX", "cluster": "default", "ips": many, "cidrs": []string{"10.99.0.0/16"}})
	ownA, _, err := kv.Get("rackwire/state/nodes/v1/default/"+a.name, nil)
	if err != nil || ownA == nil {
		t.Fatalf("read %s's node record: %v", a.name, err)
	}
	var dupA map[string]any
	if err := json.Unmarshal(ownA.Value, &dupA); err != nil {
		t.Fatal(err)
	}
	dupA["host_id"] = "0123456789abcdef0123456789abcdef"
	dupA["ips"] = []string{"10.213.254.222"}
	dupValue, _ := json.Marshal(dupA)
	hostile := map[string][]byte{
		ipKeyOf("10.213.2.50"):               ipEntryJSON("10.213.2.50", 1, bHost, b.name),                         // reserved: host
		ipKeyOf("10.213.2.51"):               ipEntryJSON("10.213.2.51", 0x105, bHost, b.name),                     // host-local identity
		ipKeyOf("10.213.2.52"):               ipEntryJSON(client.ip, webEP.Identity, bHost, b.name),                // key is not its address
		ipKeyOf(client.ip + "x"):             ipEntryJSON(client.ip, webEP.Identity, bHost, b.name),                // a key that parses to nothing
		ipKeyOf("10.213.9.9"):                ipEntryJSON("10.213.9.9", webEP.Identity, bHost, b.name),             // outside the publisher's CIDRs
		ipKeyOf("10.213.2.54"):               ipEntryJSON("10.213.2.54", webEP.Identity|0x7f000000, bHost, b.name), // another cluster's identity
		ipKeyOf(a.uplink):                    ipEntryJSON(a.uplink, webEP.Identity, bHost, b.name),                 // the checking host's own address
		"rackwire/state/nodes/v1/default/hX": bigNode,
	}
	// Another host's endpoint address, published by B with web's identity:
	// the key is client's own, so it replaces A's record for a moment.
	clientRec, _, err := kv.Get(ipKeyOf(client.ip), nil)
	if err != nil || clientRec == nil {
		t.Fatalf("read client's record: %v", err)
	}
	for k, v := range hostile {
		if _, err := kv.Put(&api.KVPair{Key: k, Value: v}, nil); err != nil {
			t.Fatalf("put %s: %v", k, err)
		}
	}
	if _, err := kv.Put(&api.KVPair{Key: ipKeyOf(client.ip), Value: ipEntryJSON(client.ip, webEP.Identity, bHost, b.name)}, nil); err != nil {
		t.Fatal(err)
	}
	// Whoever can write the ipcache keys can write the change log too:
	// one entry carries every hostile ipcache write, so that agents that
	// follow the log ([store] ipcache_sync = "log", the default) meet
	// them as agents that list do.
	var ops []iplog.Op
	for k, v := range hostile {
		if rel, ok := strings.CutPrefix(k, "rackwire/"); ok && strings.HasPrefix(rel, store.IPPrefix) {
			ops = append(ops, iplog.Op{Key: rel, Value: v})
		}
	}
	ops = append(ops, iplog.Op{Key: strings.TrimPrefix(ipKeyOf(client.ip), "rackwire/"), Value: ipEntryJSON(client.ip, webEP.Identity, bHost, b.name)})
	now := time.Now()
	entry, err := iplog.Encode(now, ops)
	if err != nil {
		t.Fatal(err)
	}
	logKey := "rackwire/" + iplog.EntryKey("default", "hX", now, 1)
	if _, err := kv.Put(&api.KVPair{Key: logKey, Value: entry}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for k := range hostile {
			_, _ = kv.Delete(k, nil)
		}
		_, _ = kv.Delete(logKey, nil)
	})
	time.Sleep(5 * time.Second)

	for _, h := range f.hosts {
		if !h.running() {
			t.Fatalf("rackwired on %s exited after hostile data", h.name)
		}
		after := h.mustCLI(t, "bpf", "ipcache", "list", "--json")
		if after != ipcacheOf[h.name] {
			t.Errorf("%s: rw_ipcache changed after hostile data:\nbefore %s\nafter  %s", h.name, ipcacheOf[h.name], after)
		}
		if ids := clusterIDs(t, h); ids != idsOf[h.name] {
			t.Errorf("%s: cluster identities changed: before %s, after %s", h.name, idsOf[h.name], ids)
		}
		st, err := h.status()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s refused records: %s", h.name, st.Store.Detail["refused_records"])
		if m := st.Store.Detail["ipcache_sync"]; m != "log" {
			t.Errorf("%s follows the ipcache in mode %q; the default is the change log (\"log\")", h.name, m)
		}
	}
	// The records claim to come from B: A checks them (B skips records
	// of its own name as its own).
	log, _ := os.ReadFile(a.logf)
	for _, reason := range []string{"reserved identity", "host-local identity", "key is not its address", "outside the publisher's CIDRs",
		"other cluster", "this host's address", "inside this host's CIDRs", "too large"} {
		if !bytes.Contains(log, []byte(reason)) {
			t.Errorf("%s: the log does not name the refusal %q", a.name, reason)
		}
	}
	// A wrote client's record again over the hostile one.
	if cur, _, err := kv.Get(ipKeyOf(client.ip), nil); err != nil || cur == nil || !bytes.Equal(cur.Value, clientRec.Value) {
		t.Errorf("client's record was not restored by its owner: %v", err)
	}
	if !client.probe(web, 2*time.Second) {
		t.Errorf("client -> web no longer allowed after hostile data")
	}
	if other.probe(web, 2*time.Second) {
		t.Errorf("other -> web allowed after hostile data")
	}

	// Another host writes a record under A's node name: A reports it.
	if _, err := kv.Put(&api.KVPair{Key: "rackwire/state/nodes/v1/default/" + a.name, Value: dupValue}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, a.name+" reports the duplicate node name", func() bool {
		s, err := a.status()
		return err == nil && s.Store.State == rwapi.StateDegraded && strings.Contains(s.Store.Message, "node name")
	})
	if ids := clusterIDs(t, a); ids != idsOf[a.name] {
		t.Errorf("%s: cluster identities changed with a duplicate node: before %s, after %s", a.name, idsOf[a.name], ids)
	}
	if _, err := kv.Put(&api.KVPair{Key: ownA.Key, Value: ownA.Value}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, a.name+" clears the duplicate", func() bool {
		s, err := a.status()
		return err == nil && !strings.Contains(s.Store.Message, "node name")
	})
	if d, ok := client.waitProbe(web, true, 30*time.Second); !ok {
		t.Errorf("client -> web not allowed %s after A's node record was restored", d)
	}
}

// clusterIDs lists a host's cluster identities with their labels, sorted.
func clusterIDs(t *testing.T, h *host) string {
	var ids []rwapi.Identity
	h.cliJSON(t, &ids, "identity", "list")
	var out []string
	for _, id := range ids {
		if id.Scope == "cluster" {
			out = append(out, fmt.Sprintf("%d=%s", id.ID, id.Labels))
		}
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

// TestDuplicateNodeName: a second host configured with a node name that a
// live host already uses refuses to start, naming the other host.
func TestDuplicateNodeName(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 2})
	a, b := f.hosts[0], f.hosts[1]
	a.start(t)
	b.nodeName = a.name
	rackwired, _ := bins(t)
	b.config = "" // written by start
	out, err := b.tryStart(t, rackwired)
	if err == nil {
		t.Fatalf("a second host named %s started; want it refused", a.name)
	}
	if !strings.Contains(out, "node name") || !strings.Contains(out, a.uplink) {
		t.Errorf("refusal does not name the other host (%s):\n%s", a.uplink, tail(out, 10))
	}
	if !a.running() {
		t.Errorf("the first host's agent stopped")
	}
}

// TestStalledStoreAPI pauses Consul (SIGSTOP: connections hang rather than
// fail) and checks that the read API, the emergency allow-all and an
// endpoint add for a label set already used on the host still answer. The
// latencies are printed; the test asserts only that each call answers.
func TestStalledStoreAPI(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 1})
	a := f.hosts[0]
	a.start(t)
	a.addEndpoint(t, "web", "app=web")
	importPolicy(t, f, a)
	f.consul.Pause()
	paused := true
	t.Cleanup(func() {
		if paused {
			f.consul.Continue()
		}
	})
	time.Sleep(2 * time.Second)
	ns := prefix + a.name + "-web2"
	run(t, "ip", "netns", "add", ns)
	f.eps = append(f.eps, ns)
	calls := []struct {
		name string
		args []string
	}{
		{"status", []string{"status", "--json"}},
		{"endpoint list", []string{"endpoint", "list", "--json"}},
		{"identity list", []string{"identity", "list", "--json"}},
		{"policy list", []string{"policy", "list", "--json"}},
		{"bpf ipcache list", []string{"bpf", "ipcache", "list", "--json"}},
		{"bpf policy get", []string{"bpf", "policy", "get", "web", "--json"}},
		{"bpf policy allow-all", []string{"bpf", "policy", "allow-all", "web"}},
		{"bpf policy allow-all --revert", []string{"bpf", "policy", "allow-all", "web", "--revert"}},
		{"endpoint add (known labels)", []string{"endpoint", "add", "--name", "web2", "--netns", "/run/netns/" + ns, "--labels", "app=web", "--json"}},
		{"endpoint get", []string{"endpoint", "get", "web2", "--json"}},
	}
	for _, c := range calls {
		start := time.Now()
		_, err := a.cli(c.args...)
		d := time.Since(start)
		t.Logf("LATENCY with Consul stalled: %-30s %8.1f ms", c.name, float64(d.Microseconds())/1000)
		if err != nil {
			t.Errorf("%s with Consul stalled: %v", c.name, err)
		}
	}
	f.consul.Continue()
	paused = false
}

// TestPoliciesUnlistable restarts an agent whose Consul token may read the
// identities and the ipcache but not the policies: the identities load,
// the policy list fails every time. A failed list is not an empty one: the
// endpoint that only a store policy selects keeps its map as it was (read
// every 10 ms), the denied peer stays denied, and status says what the
// agent waits for.
func TestPoliciesUnlistable(t *testing.T) {
	const mgmt = "6c0f3e1a-5b7d-4e92-8a41-0d2f9c7b3e55"
	f := newFabric(t, fabricOptions{hosts: 1, acl: mgmt})
	a := f.hosts[0]
	c := f.consul.Client(t)
	token := func(name, rules string) string {
		t.Helper()
		pol, _, err := c.ACL().PolicyCreate(&api.ACLPolicy{Name: name, Rules: rules}, nil)
		if err != nil {
			t.Fatalf("create ACL policy %s: %v", name, err)
		}
		tok, _, err := c.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
		if err != nil {
			t.Fatalf("create token: %v", err)
		}
		return tok.SecretID
	}
	full := token("rackwire-full", `key_prefix "rackwire/" { policy = "write" }
session_prefix "" { policy = "write" }`)
	noPolicies := token("rackwire-no-policies", `key_prefix "rackwire/" { policy = "write" }
key_prefix "rackwire/policies/" { policy = "deny" }
session_prefix "" { policy = "write" }`)
	a.tokenFile = filepath.Join(f.dir, "token")
	if err := os.WriteFile(a.tokenFile, []byte(full+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.start(t)
	_, other, web := clientWeb(t, f, a, a)
	stop := make(chan struct{})
	wait := a.watchWeb(t, stop)

	a.stop()
	if err := os.WriteFile(a.tokenFile, []byte(noPolicies+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.start(t)
	// Long enough for the identity list, several policy list retries and
	// many sync passes.
	time.Sleep(15 * time.Second)
	st, err := a.status()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s without the right to list policies: policy %s: %s", a.name, st.Policy.State, st.Policy.Message)
	if st.Policy.State == rwapi.StateOK || !strings.Contains(st.Policy.Message, "policies") {
		t.Errorf("policy status %s %q; want it to say the store's policies are not loaded", st.Policy.State, st.Policy.Message)
	}
	if other.probe(web, 2*time.Second) {
		t.Errorf("other -> web allowed while the store's policies cannot be listed")
	}
	close(stop)
	bad, reads := wait()
	t.Logf("web's policy map read %d times", reads)
	if reads < 100 {
		t.Errorf("only %d reads of the policy map; the check saw too little", reads)
	}
	if len(bad) > 0 {
		t.Errorf("web's policy map held %d keys it did not hold before the restart (first: %v)", len(bad), bad[:min(5, len(bad))])
	}
}
