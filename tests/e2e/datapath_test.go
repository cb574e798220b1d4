package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

// attachModes are the two ways the programs are attached; every real
// traffic suite of the datapath runs in both.
var attachModes = []struct {
	mode string
	net  int // third octet of the test's CIDR
}{
	{"tcx", 11},
	{"tc", 12},
}

func addr(ep endpoint, port int) string { return net.JoinHostPort(ep.IPv4, strconv.Itoa(port)) }

func addr6(ep endpoint, port int) string { return net.JoinHostPort(ep.IPv6, strconv.Itoa(port)) }

// TestDatapathRawEntries is issue 3's real-traffic test: raw entries written
// through `rackwire bpf policy`, the emergency allow-all and the bpftool
// all-zero key, with TCP, UDP and ICMP between three endpoints.
func TestDatapathRawEntries(t *testing.T) {
	require(t)
	for _, m := range attachModes {
		t.Run(m.mode, func(t *testing.T) {
			rawEntriesSuite(t, m.mode, fmt.Sprintf("10.217.%d.0/24", m.net), fmt.Sprintf("fd00:217:%d::/64", m.net))
		})
	}
}

func rawEntriesSuite(t *testing.T, mode, cidr, cidr6 string) {
	a := newAgent(t, agentOpts{tag: "d" + mode, cidrs: []string{cidr, cidr6}, attach: mode})
	var st api.Status
	a.rwJSON(&st, "status")
	if got := st.Datapath.Detail["attach"]; got != mode {
		t.Fatalf("status datapath attach = %q, want %q (detail %v)", got, mode, st.Datapath.Detail)
	}
	web := a.addEndpoint("web", "app=web")
	client := a.addEndpoint("client", "app=client")
	other := a.addEndpoint("other", "app=other")
	for _, ep := range []endpoint{web, client, other} {
		if ep.IPv6 == "" {
			t.Fatalf("endpoint %s has no IPv6 address from %s", ep.Name, cidr6)
		}
	}
	// The programs really hang where the mode says: pinned tcx links, or
	// tc filters on the clsact qdisc.
	for _, dir := range []string{"from", "to"} {
		pin := fmt.Sprintf("%s/links/rw_ep_%05d_%s", a.pinDir, web.ID, dir)
		out, err := exec.Command("bpftool", "-j", "link", "show", "pinned", pin).CombinedOutput()
		switch {
		// Older bpftool prints the link type as a number: 11 is tcx.
		case mode == "tcx" && (err != nil || !strings.Contains(string(out), `"tcx"`) && !strings.Contains(string(out), `"type":11,`)):
			t.Errorf("tcx mode: link %s: %v %s", pin, err, out)
		case mode == "tc" && err == nil:
			t.Errorf("tc mode: a tcx link is pinned at %s: %s", pin, out)
		}
	}
	if mode == "tc" {
		out := sh(t, "bpftool", "-j", "net", "show", "dev", web.HostIfName)
		if !strings.Contains(out, "rw_to_endpoint") || !strings.Contains(out, "rw_from_endpoint") {
			t.Errorf("tc mode: bpftool net show dev %s: %s; want both programs as tc filters", web.HostIfName, out)
		}
	}
	servers(t, web.ns, web.IPv4, 8080, 9090)
	servers(t, web.ns, web.IPv6, 8080, 9090)
	servers(t, client.ns, client.IPv4, 7070)

	// Subscribed well before the first drop.
	mon := a.startMonitor("")

	// A new endpoint is open.
	mustPass(t, "open: client->web tcp/9090", tcpReq(client.ns, addr(web, 9090), okTimeout))
	mustPass(t, "open: web->client tcp/7070", tcpReq(web.ns, addr(client, 7070), okTimeout))

	// Close web's ingress and egress and client's ingress: from now on only
	// the raw entries below, and CT for replies, let anything through.
	a.rw("bpf", "policy", "delete", "web", "--direction", "ingress")
	a.rw("bpf", "policy", "delete", "web", "--direction", "egress")
	a.rw("bpf", "policy", "delete", "client", "--direction", "ingress")
	cid := strconv.FormatUint(uint64(client.Identity), 10)
	a.rw("bpf", "policy", "add", "web", "--identity", cid, "--proto", "tcp", "--port", "8080")
	a.rw("bpf", "policy", "add", "web", "--identity", cid, "--proto", "udp", "--port", "9090")
	a.rw("bpf", "policy", "add", "web", "--proto", "icmp", "--port", "8")
	a.rw("bpf", "policy", "add", "web", "--proto", "icmpv6", "--port", "128")
	var es []api.PolicyEntry
	a.rwJSON(&es, "bpf", "policy", "get", "web")
	if len(es) != 4 {
		t.Fatalf("web's map after the raw changes: %+v, want the 4 raw entries", es)
	}

	// Allowed: the replies pass although neither web's egress nor
	// client's ingress has any entry.
	mustPass(t, "client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))
	mustPass(t, "client->web udp/9090", udpReq(client.ns, addr(web, 9090), okTimeout))
	mustPass(t, "client->web icmp echo", ping(client.ns, web.IPv4))
	mustPass(t, "other->web icmp echo (any identity)", ping(other.ns, web.IPv4))
	// Not allowed.
	mustFail(t, "other->web tcp/8080 (wrong identity)", tcpReq(other.ns, addr(web, 8080), dropTimeout))
	mustFail(t, "client->web tcp/9090 (wrong port)", tcpReq(client.ns, addr(web, 9090), dropTimeout))
	mustFail(t, "client->web udp/8080 (wrong proto)", udpReq(client.ns, addr(web, 8080), dropTimeout))
	mustFail(t, "web->client tcp/7070 (web egress closed)", tcpReq(web.ns, addr(client, 7070), dropTimeout))
	mustFail(t, "web->client icmp (web egress closed)", ping(web.ns, client.IPv4))
	// The same over IPv6.
	mustPass(t, "v6 client->web tcp/8080", tcpReq(client.ns, addr6(web, 8080), okTimeout))
	mustPass(t, "v6 client->web udp/9090", udpReq(client.ns, addr6(web, 9090), okTimeout))
	mustPass(t, "v6 other->web icmpv6 echo", ping(other.ns, web.IPv6))
	mustFail(t, "v6 other->web tcp/8080", tcpReq(other.ns, addr6(web, 8080), dropTimeout))
	mustFail(t, "v6 client->web tcp/9090", tcpReq(client.ns, addr6(web, 9090), dropTimeout))

	dropOf := func(src endpoint, dstEP, dir string, dst string, proto string) func(api.Event) bool {
		return func(ev api.Event) bool {
			return ev.Type == "drop" && ev.Reason == "policy denied" && ev.EndpointName == dstEP && ev.Direction == dir &&
				ev.Proto == proto && strings.HasPrefix(ev.Src, src.IPv4+":") && ev.Dst == dst
		}
	}
	ev := mon.wait(t, "drop other->web tcp/8080", 3*time.Second, dropOf(other, "web", "ingress", addr(web, 8080), "tcp"))
	if ev.SrcIdentity != other.Identity || ev.SrcLabels != "app=other" {
		t.Errorf("drop event identities: %+v, want src identity %d app=other", ev, other.Identity)
	}
	mon.wait(t, "drop client->web udp/8080", 3*time.Second, dropOf(client, "web", "ingress", addr(web, 8080), "udp"))
	mon.wait(t, "drop web->client tcp/7070 at web's egress", 3*time.Second, dropOf(web, "web", "egress", addr(client, 7070), "tcp"))
	mon.wait(t, "drop v6 other->web tcp/8080", 3*time.Second, func(ev api.Event) bool {
		return ev.Type == "drop" && ev.Reason == "policy denied" && ev.EndpointName == "web" && ev.Dst == addr6(web, 8080) &&
			strings.HasPrefix(ev.Src, "["+other.IPv6+"]:")
	})

	// The deciding entries counted the allowed flows; CT knows them.
	a.rwJSON(&es, "bpf", "policy", "get", "web")
	for _, e := range es {
		if e.Proto == "tcp" && e.Port == 8080 && e.Packets == 0 {
			t.Errorf("entry tcp/8080 counted no packet: %+v", e)
		}
	}
	var ct []map[string]any
	a.rwJSON(&ct, "bpf", "ct", "list")
	if len(ct) == 0 {
		t.Error("bpf ct list is empty after allowed flows")
	}

	// The emergency open, and its revert.
	a.rw("bpf", "policy", "allow-all", "web")
	mustPass(t, "allow-all: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), okTimeout))
	mustPass(t, "allow-all: web->client tcp/7070 is still closed at client", func() error {
		if tcpReq(web.ns, addr(client, 7070), dropTimeout) == nil {
			return fmt.Errorf("passed, client's ingress is closed")
		}
		return nil
	}())
	a.rw("bpf", "policy", "allow-all", "web", "--revert")
	mustFail(t, "reverted: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))
	mustPass(t, "reverted: client->web tcp/8080", tcpReq(client.ns, addr(web, 8080), okTimeout))

	// bpftool alone: the all-zero key opens web's ingress.
	pin := fmt.Sprintf("%s/rw_policy_%05d", a.pinDir, web.ID)
	dump := sh(t, "bpftool", "map", "dump", "pinned", pin)
	if !strings.Contains(dump, "key") {
		t.Errorf("bpftool map dump %s: %s", pin, dump)
	}
	mustFail(t, "before bpftool: other->web udp/8080", udpReq(other.ns, addr(web, 8080), dropTimeout))
	args := []string{"bpftool", "map", "update", "pinned", pin, "key", "hex"}
	args = append(args, strings.Fields(strings.Repeat("00 ", 8))...)
	args = append(args, "value", "hex")
	args = append(args, strings.Fields(strings.Repeat("00 ", 24))...)
	sh(t, append(args, "noexist")...)
	mustPass(t, "bpftool open: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), okTimeout))
	mustPass(t, "bpftool open: other->web udp/8080", udpReq(other.ns, addr(web, 8080), okTimeout))
	mustPass(t, "bpftool open: client->web tcp/9090", tcpReq(client.ns, addr(web, 9090), okTimeout))
	// Egress is another key: web's egress stays closed.
	mustFail(t, "bpftool ingress only: web->client icmp", ping(web.ns, client.IPv4))
}

// linkIDs returns the ids of an endpoint's pinned tcx links (zero in tc
// mode, where there are none).
func (a *agent) linkIDs(t *testing.T, epID uint16) [2]int {
	t.Helper()
	var ids [2]int
	for i, dir := range []string{"from", "to"} {
		out, err := exec.Command("bpftool", "-j", "link", "show", "pinned", fmt.Sprintf("%s/links/rw_ep_%05d_%s", a.pinDir, epID, dir)).Output()
		if err != nil {
			continue
		}
		var l struct {
			ID int `json:"id"`
		}
		if err := json.Unmarshal(out, &l); err != nil {
			t.Fatalf("bpftool link show: %v\n%s", err, out)
		}
		ids[i] = l.ID
	}
	return ids
}

// flow is a request/response loop that runs until stopped and counts
// failures. kind: "udp" (one socket, one datagram per request), "tcp" (one
// connection, one line per request) or "tcp-new" (a new connection per
// request).
type flow struct {
	kind     string
	ok, fail atomic.Int64
	firstErr atomic.Value
	stop     chan struct{}
	done     sync.WaitGroup
}

func startFlow(t *testing.T, kind, ns, to string) *flow {
	t.Helper()
	f := &flow{kind: kind, stop: make(chan struct{})}
	var conn net.Conn
	if kind != "tcp-new" {
		network := map[string]string{"udp": "udp4", "tcp": "tcp4"}[kind]
		if err := inNetns(ns, func() error {
			var err error
			conn, err = net.DialTimeout(network, to, okTimeout)
			return err
		}); err != nil {
			t.Fatalf("flow %s: %v", kind, err)
		}
	}
	f.done.Add(1)
	go func() {
		defer f.done.Done()
		if conn != nil {
			defer conn.Close()
		}
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		// Bounded: at most two minutes whatever the test does.
		limit := time.After(2 * time.Minute)
		for {
			select {
			case <-f.stop:
				return
			case <-limit:
				return
			case <-tick.C:
			}
			var err error
			if conn != nil {
				err = echo(conn, time.Second)
			} else {
				err = tcpReq(ns, to, time.Second)
			}
			if err != nil {
				f.fail.Add(1)
				f.firstErr.CompareAndSwap(nil, fmt.Sprintf("%v at %s", err, time.Now().Format("15:04:05.000")))
				if conn != nil && kind == "tcp" {
					return // a broken connection stays broken
				}
				continue
			}
			f.ok.Add(1)
		}
	}()
	return f
}

// finish stops the flow and asserts no request was lost.
func (f *flow) finish(t *testing.T, minOK int64) {
	t.Helper()
	close(f.stop)
	f.done.Wait()
	t.Logf("flow %s: %d requests answered, %d lost", f.kind, f.ok.Load(), f.fail.Load())
	if n := f.fail.Load(); n != 0 {
		t.Errorf("flow %s lost %d requests (first: %v)", f.kind, n, f.firstErr.Load())
	}
	if f.ok.Load() < minOK {
		t.Errorf("flow %s answered only %d requests, want at least %d", f.kind, f.ok.Load(), minOK)
	}
}

const restartPolicy = `apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rwg-restart-web
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
      toPorts:
        - ports:
            - {port: "8080", protocol: TCP}
            - {port: "8080", protocol: UDP}
`

// TestRestart is issue 3's restart test: traffic between two endpoints never
// stops while the agent is killed with SIGKILL and started again, the
// endpoints come back and the policy maps are the same kernel objects; a
// SIGTERM stop leaves the datapath in place.
func TestRestart(t *testing.T) {
	require(t)
	for _, m := range attachModes {
		t.Run(m.mode, func(t *testing.T) {
			a := newAgent(t, agentOpts{tag: "r" + m.mode, cidrs: []string{fmt.Sprintf("10.217.%d.0/24", m.net+10)}, attach: m.mode})
			web := a.addEndpoint("web", "app=web")
			client := a.addEndpoint("client", "app=client")
			other := a.addEndpoint("other", "app=other")
			servers(t, web.ns, web.IPv4, 8080)
			writeFile(t, a.dir+"/restart.yaml", restartPolicy)
			a.rw("policy", "import", a.dir+"/restart.yaml")
			mustFail(t, "policy: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))

			var before []api.Endpoint
			a.rwJSON(&before, "endpoint", "list")
			idWeb, idClient := a.policyMapID(t, web.ID), a.policyMapID(t, client.ID)
			links := a.linkIDs(t, web.ID)
			if (links[0] != 0 && links[1] != 0) != (m.mode == "tcx") {
				t.Errorf("mode %s: pinned tcx link ids %v", m.mode, links)
			}

			flows := []*flow{
				startFlow(t, "udp", client.ns, addr(web, 8080)),
				startFlow(t, "tcp", client.ns, addr(web, 8080)),
				startFlow(t, "tcp-new", client.ns, addr(web, 8080)),
			}
			time.Sleep(500 * time.Millisecond)
			a.kill(syscall.SIGKILL)
			time.Sleep(300 * time.Millisecond) // traffic with no agent at all
			a.start()
			time.Sleep(700 * time.Millisecond) // traffic after the restore

			var after []api.Endpoint
			a.rwJSON(&after, "endpoint", "list")
			if len(after) != len(before) {
				t.Errorf("endpoints after restart: %+v, before: %+v", after, before)
			}
			for i := range after {
				if i < len(before) && (after[i].ID != before[i].ID || after[i].IPv4 != before[i].IPv4 ||
					after[i].Identity != before[i].Identity || after[i].State != "ready" || after[i].HostIfIndex != before[i].HostIfIndex) {
					t.Errorf("endpoint after restart: %+v, before: %+v", after[i], before[i])
				}
			}
			if got := a.policyMapID(t, web.ID); got != idWeb {
				t.Errorf("web's policy map id %d after restart, was %d: the map was re-created", got, idWeb)
			}
			if got := a.policyMapID(t, client.ID); got != idClient {
				t.Errorf("client's policy map id %d after restart, was %d: the map was re-created", got, idClient)
			}
			if got := a.linkIDs(t, web.ID); got != links {
				t.Errorf("web's tcx link ids %v after restart, were %v: the links were re-created", got, links)
			}
			mustFail(t, "after restart: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))

			// SIGTERM: the agent goes, the datapath stays.
			a.kill(syscall.SIGTERM)
			time.Sleep(500 * time.Millisecond)
			mustFail(t, "agent stopped: other->web tcp/8080", tcpReq(other.ns, addr(web, 8080), dropTimeout))
			for _, f := range flows {
				f.finish(t, 100)
			}
			if got := a.policyMapID(t, web.ID); got != idWeb {
				t.Errorf("web's policy map id %d after SIGTERM, was %d", got, idWeb)
			}
		})
	}
}
