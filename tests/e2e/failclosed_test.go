package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/api"
)

// TestNeverOpenAfterAdd: under a default-deny policy that already exists,
// a denied peer that connects the moment `endpoint add` returns is dropped,
// every time, while the allowed peer gets through: the policy is in the
// map before the endpoint can carry traffic.
func TestNeverOpenAfterAdd(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "fc", cidrs: []string{"10.217.70.0/24"}})
	good := a.addEndpoint("good", "app=good")
	bad := a.addEndpoint("bad", "app=bad")
	a.importPolicy(t, "rwg-srv", cnp("rwg-srv", "srv", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: good
`))
	const tries = 20
	passed, dropped := 0, 0
	for i := range tries {
		ns := newNetns(t, fmt.Sprintf("rwg-fc-srv%d", i))
		ip := fmt.Sprintf("10.217.70.%d", 100+i)
		// The server listens before the endpoint exists, on any address.
		servers(t, ns, "0.0.0.0", 8080)
		// The denied peer keeps connecting while the add runs: no
		// connection may get through at any instant.
		stop := make(chan struct{})
		got := make(chan int, 1)
		go func() {
			n := 0
			for {
				select {
				case <-stop:
					got <- n
					return
				default:
				}
				if tcpReq(bad.ns, ip+":8080", 50*time.Millisecond) == nil {
					n++
				}
			}
		}()
		var ep api.Endpoint
		a.rwJSON(&ep, "endpoint", "add", "--name", fmt.Sprintf("srv%d", i), "--netns", "/run/netns/"+ns, "--labels", "app=srv", "--ip", ip)
		close(stop)
		if n := <-got; n > 0 {
			t.Errorf("try %d: bad -> srv got through %d times while endpoint add ran", i, n)
		}
		// Right after add returns: the denied peer first.
		if err := tcpReq(bad.ns, ip+":8080", 300*time.Millisecond); err == nil {
			t.Errorf("try %d: bad -> srv passed right after endpoint add returned", i)
		} else {
			dropped++
		}
		if err := tcpReq(good.ns, ip+":8080", okTimeout); err != nil {
			t.Errorf("try %d: good -> srv: %v", i, err)
		} else {
			passed++
		}
		if ep.State != "ready" {
			t.Errorf("try %d: endpoint state %q (%s), want ready", i, ep.State, ep.PolicyReason)
		}
		a.rw("endpoint", "delete", ep.Name)
	}
	t.Logf("%d tries: denied peer dropped %d times, allowed peer passed %d times", tries, dropped, passed)
}

// TestIPCacheOwner: a /32 CIDR rule that names an endpoint's address does
// not change that endpoint's identity (label rules that allow it keep
// matching), and when the rule goes, the endpoint's and the host's entries
// are still there.
func TestIPCacheOwner(t *testing.T) {
	require(t)
	a := newAgent(t, agentOpts{tag: "ic", cidrs: []string{"10.217.71.0/24"}})
	web := a.addEndpoint("web", "app=web")
	client := a.addEndpoint("client", "app=client")
	servers(t, web.ns, web.IPv4, 8080)
	a.importPolicy(t, "rwg-web", cnp("rwg-web", "web", `  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
`))
	mustPass(t, "client->web before the /32 rule", tcpReq(client.ns, addr(web, 8080), okTimeout))

	// A host address (identity 1) to name in a rule as well.
	var ipc []api.IPCacheEntry
	a.rwJSON(&ipc, "bpf", "ipcache", "list")
	hostAddr := ""
	for _, e := range ipc {
		if e.Identity == 1 && len(e.Prefix) > 3 && e.Prefix[len(e.Prefix)-3:] == "/32" && e.Prefix[:4] != "127." {
			hostAddr = e.Prefix
			break
		}
	}
	rule := fmt.Sprintf(`  egress:
    - toCIDR:
        - %s/32
`, client.IPv4)
	if hostAddr != "" {
		rule += "        - " + hostAddr + "\n"
	}
	a.importPolicy(t, "rwg-cidr", cnp("rwg-cidr", "web", rule))
	check := func(when string) {
		t.Helper()
		var e api.IPCacheEntry
		a.rwJSON(&e, "bpf", "ipcache", "get", client.IPv4)
		if e.Identity != client.Identity {
			t.Errorf("%s: ipcache %s = identity %d (%s), want the endpoint's %d", when, client.IPv4, e.Identity, e.Labels, client.Identity)
		}
		if hostAddr != "" {
			a.rwJSON(&e, "bpf", "ipcache", "get", hostAddr[:len(hostAddr)-3])
			if e.Identity != 1 {
				t.Errorf("%s: ipcache %s = identity %d, want 1 (host)", when, hostAddr, e.Identity)
			}
		}
	}
	check("with the /32 rule")
	mustPass(t, "client->web with a /32 rule naming client", tcpReq(client.ns, addr(web, 8080), okTimeout))
	a.rw("policy", "delete", "rwg-cidr")
	check("after the /32 rule went")
	mustPass(t, "client->web after the /32 rule went", tcpReq(client.ns, addr(web, 8080), okTimeout))
}
