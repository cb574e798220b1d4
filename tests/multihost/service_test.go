package multihost

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/rackwire/rackwire/daemon/api"
)

const (
	svcVIP     = "10.96.0.100"
	svcPort    = "80"
	svcUDPPort = "53"
)

// pyLB is the traffic helper of the service test, run in namespaces:
//
//	serve IP PORT            TCP and UDP servers on IP:PORT that answer every request with IP
//	count VIP PORT N         N TCP connections, one request each; JSON {"by": {backend: n}, "fail": n}
//	udp VIP PORT N           N UDP requests on fresh sockets; same JSON
//	hold VIP PORT SECS       one connection: prints the backend, then a request every 100 ms for SECS; JSON {"ok": n, "fail": n}
const pyLB = `
import json, socket, sys, threading, time
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    def tcp():
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind((ip, port)); l.listen(512)
        def handle(c):
            try:
                c.settimeout(60)
                while True:
                    d = c.recv(64)
                    if not d: break
                    c.sendall(ip.encode())
            except OSError:
                pass
            finally:
                c.close()
        while True:
            c, _ = l.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=tcp, daemon=True).start()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, port))
    while True:
        d, a = u.recvfrom(64); u.sendto(ip.encode(), a)
by = {}; fail = 0
if mode == "count":
    for i in range(int(sys.argv[4])):
        try:
            s = socket.create_connection((ip, port), timeout=2); s.sendall(b"x")
            r = s.recv(64).decode(); by[r] = by.get(r, 0) + 1; s.close()
        except OSError:
            fail += 1
    print(json.dumps({"by": by, "fail": fail}))
elif mode == "udp":
    for i in range(int(sys.argv[4])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        try:
            s.sendto(b"x", (ip, port)); r = s.recv(64).decode(); by[r] = by.get(r, 0) + 1
        except OSError:
            fail += 1
        s.close()
    print(json.dumps({"by": by, "fail": fail}))
elif mode == "hold":
    s = socket.create_connection((ip, port), timeout=2); s.sendall(b"x")
    print(s.recv(64).decode(), flush=True)
    ok = bad = 0; t0 = time.monotonic()
    while time.monotonic() - t0 < float(sys.argv[4]):
        try:
            s.sendall(b"x"); s.recv(64); ok += 1
        except OSError:
            bad += 1
        time.sleep(0.1)
    print(json.dumps({"ok": ok, "fail": bad}), flush=True)
`

type lbCounts struct {
	By   map[string]int `json:"by"`
	Fail int            `json:"fail"`
}

func (f *fabric) bg(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", cmd.Args, err)
	}
	f.mu.Lock()
	f.procs = append(f.procs, cmd)
	f.mu.Unlock()
}

func lbRun(t *testing.T, ns string, args ...string) lbCounts {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "python3", "-c", pyLB}, args...)...).Output()
	var c lbCounts
	if err != nil || json.Unmarshal(out, &c) != nil {
		t.Fatalf("%s in %s: %v: %s", args[0], ns, err, out)
	}
	return c
}

// TestServiceLoadBalancing is the two-host end-to-end test of issue 13: a
// Consul service with three instances across two hosts, registered with
// TTL checks through the Consul agent API; clients reach it on its VIP
// through each host's agent (catalog watch → table → datapath).
func TestServiceLoadBalancing(t *testing.T) {
	f := newFabric(t, fabricOptions{hosts: 2})
	hA, hB := f.hosts[0], f.hosts[1]
	hA.start(t)
	hB.start(t)
	be1 := hA.addEndpoint(t, "be1", "app=rwsc-web")
	be2 := hB.addEndpoint(t, "be2", "app=rwsc-web")
	be3 := hB.addEndpoint(t, "be3", "app=rwsc-web")
	client := hA.addEndpoint(t, "cli", "app=rwsc-client")
	for _, e := range []*endpoint{be1, be2, be3} {
		f.bg(t, exec.Command("ip", "netns", "exec", e.ns, "python3", "-c", pyLB, "serve", e.ip, httpPort))
	}
	time.Sleep(500 * time.Millisecond)

	cc := f.consul.Client(t)
	for i, e := range []*endpoint{be1, be2, be3} {
		id := fmt.Sprintf("rwsc-web-%d", i+1)
		port, _ := strconv.Atoi(httpPort)
		for _, s := range []struct{ name, port, proto string }{{"rwsc-web", svcPort, "tcp"}, {"rwsc-dns", svcUDPPort, "udp"}} {
			sid := strings.Replace(id, "rwsc-web", s.name, 1)
			err := cc.Agent().ServiceRegister(&capi.AgentServiceRegistration{ID: sid, Name: s.name, Address: e.ip, Port: port,
				Meta:  map[string]string{"rackwire_vip": svcVIP, "rackwire_port": s.port, "rackwire_protocol": s.proto},
				Check: &capi.AgentServiceCheck{CheckID: "chk-" + sid, TTL: "10m", Status: capi.HealthPassing}})
			if err != nil {
				t.Fatalf("register %s: %v", sid, err)
			}
		}
	}
	getWeb := func(h *host) api.Service {
		var s api.Service
		out, err := h.cli("service", "get", "rwsc-web", "--json")
		if err == nil {
			_ = json.Unmarshal([]byte(out), &s)
		}
		return s
	}
	for _, h := range []*host{hA, hB} {
		waitFor(t, 30*time.Second, h.name+" has rwsc-web with 3 active backends", func() bool { return getWeb(h).Active == 3 })
	}
	web := getWeb(hA)
	for _, b := range web.Backends {
		if wantLocal := strings.HasPrefix(b.Address, be1.ip+":"); b.Local != wantLocal || b.Source != "consul" {
			t.Errorf("hA backend %+v: want local=%v source consul", b, wantLocal)
		}
	}

	t.Run("300 connections reach all three", func(t *testing.T) {
		c := lbRun(t, client.ns, "count", svcVIP, svcPort, "300")
		t.Logf("300 connections to %s:%s: %v, failed %d", svcVIP, svcPort, c.By, c.Fail)
		if c.Fail != 0 || len(c.By) != 3 || c.By[be1.ip] == 0 || c.By[be2.ip] == 0 || c.By[be3.ip] == 0 {
			t.Errorf("by backend %v, failed %d; want all 300 answered and each of %s, %s, %s used", c.By, c.Fail, be1.ip, be2.ip, be3.ip)
		}
	})

	t.Run("UDP through the VIP", func(t *testing.T) {
		c := lbRun(t, client.ns, "udp", svcVIP, svcUDPPort, "60")
		t.Logf("60 UDP requests to %s:%s: %v, failed %d", svcVIP, svcUDPPort, c.By, c.Fail)
		if c.Fail != 0 || len(c.By) < 2 {
			t.Errorf("UDP by backend %v, failed %d; want every request answered, by more than one backend", c.By, c.Fail)
		}
	})

	t.Run("host-originated traffic to the VIP", func(t *testing.T) {
		c := lbRun(t, hA.ns, "count", svcVIP, svcPort, "30")
		if c.Fail != 0 || len(c.By) == 0 {
			t.Errorf("from hA's host namespace: %v, failed %d; want all 30 answered", c.By, c.Fail)
		}
	})

	t.Run("failing a check removes the backend, a long-lived connection stays", func(t *testing.T) {
		hold := exec.Command("ip", "netns", "exec", client.ns, "python3", "-c", pyLB, "hold", svcVIP, svcPort, "8")
		stdout, err := hold.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		f.bg(t, hold)
		rd := bufio.NewReader(stdout)
		first, err := rd.ReadString('\n')
		if err != nil {
			t.Fatalf("long-lived connection: %v", err)
		}
		held := strings.TrimSpace(first)
		victim, victimID := be2, "chk-rwsc-web-2"
		if held == be2.ip {
			victim, victimID = be3, "chk-rwsc-web-3"
		}
		t.Logf("long-lived connection on %s; failing the check of %s", held, victim.ip)
		failed := time.Now()
		if err := cc.Agent().FailTTL(victimID, "rwsc test"); err != nil {
			t.Fatal(err)
		}
		took := waitFor(t, 10*time.Second, "hA sees the victim critical", func() bool {
			for _, b := range getWeb(hA).Backends {
				if strings.HasPrefix(b.Address, victim.ip+":") {
					return b.State == "critical"
				}
			}
			return false
		})
		t.Logf("check failed → hA's table shows it critical: %v (CLI polling included)", took.Round(time.Millisecond))
		fmt.Printf("multihost: Consul check fail → backend critical on the client's host: %v\n", took.Round(time.Millisecond))
		if since := time.Since(failed); since > 2*time.Second {
			t.Errorf("the backend left the table %v after its check failed, want within 2s", since)
		}
		c := lbRun(t, client.ns, "count", svcVIP, svcPort, "100")
		if c.Fail != 0 || c.By[victim.ip] != 0 {
			t.Errorf("after the failure: %v, failed %d; want none on %s and none failed", c.By, c.Fail, victim.ip)
		}
		last, _ := rd.ReadString('\n')
		_ = hold.Wait()
		var r struct{ OK, Fail int }
		if err := json.Unmarshal([]byte(last), &r); err != nil || r.Fail != 0 || r.OK < 40 {
			t.Errorf("long-lived connection to %s: %q (%v); want every request answered", held, last, err)
		}

		if err := cc.Agent().PassTTL(victimID, ""); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "hA has 3 active again", func() bool { return getWeb(hA).Active == 3 })
		c = lbRun(t, client.ns, "count", svcVIP, svcPort, "100")
		if c.By[victim.ip] == 0 || c.Fail != 0 {
			t.Errorf("after recovery: %v, failed %d; want %s back", c.By, c.Fail, victim.ip)
		}
	})

	t.Run("stored services reach every host and beat Consul on a frontend", func(t *testing.T) {
		listOf := func(h *host) api.ServiceList {
			var l api.ServiceList
			h.cliJSON(t, &l, "service", "list")
			return l
		}
		at := func(l api.ServiceList, frontend string) api.Service {
			for _, s := range l.Services {
				if s.Frontend == frontend {
					return s
				}
			}
			return api.Service{}
		}
		hA.mustCLI(t, "service", "add", "rwsc-st", "--vip", "10.96.0.101", "--port", svcPort, "--backends", be2.ip+":"+httpPort)
		waitFor(t, 10*time.Second, "hB has hA's stored service", func() bool { return at(listOf(hB), "10.96.0.101:80/tcp").Source == "store" })
		if c := lbRun(t, client.ns, "count", "10.96.0.101", svcPort, "20"); c.Fail != 0 || c.By[be2.ip] != 20 {
			t.Errorf("stored service: %v, failed %d; want all 20 on %s", c.By, c.Fail, be2.ip)
		}
		// The store beats Consul on rwsc-web's frontend.
		front := svcVIP + ":" + svcPort + "/tcp"
		hA.mustCLI(t, "service", "add", "rwsc-over", "--vip", svcVIP, "--port", svcPort, "--backends", be1.ip+":"+httpPort)
		waitFor(t, 10*time.Second, "the stored service holds rwsc-web's frontend on hA", func() bool { return at(listOf(hA), front).Name == "rwsc-over" })
		l := listOf(hA)
		if !strings.Contains(strings.Join(l.Problems, "\n"), "rwsc-web from consul claims "+front) {
			t.Errorf("problems = %q, want the Consul service's lost frontend", l.Problems)
		}
		if c := lbRun(t, client.ns, "count", svcVIP, svcPort, "20"); c.Fail != 0 || c.By[be1.ip] != 20 {
			t.Errorf("overridden frontend: %v, failed %d; want all 20 on the stored backend %s", c.By, c.Fail, be1.ip)
		}
		hA.mustCLI(t, "service", "delete", "rwsc-over")
		hA.mustCLI(t, "service", "delete", "rwsc-st")
		waitFor(t, 10*time.Second, "rwsc-web back from Consul", func() bool { return at(listOf(hA), front).Name == "rwsc-web" })
	})

	t.Run("policy is decided against the backend's identity", func(t *testing.T) {
		bad := hA.addEndpoint(t, "bad", "app=rwsc-bad")
		pol := filepath.Join(t.TempDir(), "p.yaml")
		doc := `apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rwsc-client}
spec:
  endpointSelector: {matchLabels: {app: rwsc-client}}
  egress:
  - toEndpoints: [{matchLabels: {app: rwsc-web}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rwsc-bad}
spec:
  endpointSelector: {matchLabels: {app: rwsc-bad}}
  egress:
  - toEndpoints: [{matchLabels: {app: rwsc-other}}]
`
		if err := os.WriteFile(pol, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		_, rackwire := bins(t)
		mon := exec.Command(rackwire, "monitor", "--type", "drop", "--json")
		mon.Env = append(os.Environ(), "RACKWIRE_SOCKET="+hA.socket)
		mout, err := mon.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		f.bg(t, mon)
		events := make(chan api.Event, 64)
		go func() {
			sc := bufio.NewScanner(mout)
			for sc.Scan() {
				var ev api.Event
				if json.Unmarshal(sc.Bytes(), &ev) == nil {
					events <- ev
				}
			}
		}()
		hA.mustCLI(t, "policy", "import", pol)
		time.Sleep(2 * time.Second)
		if c := lbRun(t, client.ns, "count", svcVIP, svcPort, "20"); c.Fail != 0 {
			t.Errorf("allowed client through the VIP: %v, failed %d; want all answered", c.By, c.Fail)
		}
		if c := lbRun(t, bad.ns, "count", svcVIP, svcPort, "3"); c.Fail != 3 {
			t.Errorf("client not allowed to app=rwsc-web: %v answered; want all 3 dropped", c.By)
		}
		deadline := time.After(5 * time.Second)
		for {
			select {
			case ev := <-events:
				if strings.HasPrefix(ev.Src, bad.ip) && strings.Contains(ev.DstLabels, "app=rwsc-web") && ev.DstIdentity != 0 {
					t.Logf("drop event: %+v", ev)
					return
				}
			case <-deadline:
				t.Fatalf("no drop event from %s naming the backend's identity (app=rwsc-web)", bad.ip)
			}
		}
	})
}
