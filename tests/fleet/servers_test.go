//go:build rackwire_fleet

package fleet

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/daemon/store/consul"
	"github.com/rackwire/rackwire/internal/consultest"
)

// TestFleetServerDeathTakesItsSessions shows why 40 agents lacked the
// records of 33 hosts in the 99,900-entry step of an earlier 100-agent run
// (docs/scale.md): the kernel's OOM killer took the Consul server those
// hosts talked to, autopilot reaped it, and Consul invalidated every
// session bound to its node, deleting the hosts' records. A rackwire store
// whose address is a server (as in this harness, which has no client
// agents) is bound to that server; it says so in its health.
func TestFleetServerDeathTakesItsSessions(t *testing.T) {
	srv := consultest.StartClusterHCL(t, 3, `performance { raft_multiplier = 5 }`)
	lead := consultest.Leader(t, srv)
	var victim *consultest.Agent
	for _, s := range srv {
		if s != lead && s.Pid() != 0 {
			victim = s
			break
		}
	}
	if lead == nil || victim == nil {
		t.Fatalf("no leader or no follower among %d servers", len(srv))
	}
	st, err := consul.New(consul.Options{Address: victim.HTTPAddr, Prefix: "rwf/", Node: "host-x", CallTimeout: 3 * time.Second}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Stop() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	key := "state/ip/v1/default/10.218.2.1"
	if err := st.Put(ctx, key, []byte(`{}`), store.PutOptions{Owned: true}); err != nil {
		t.Fatal(err)
	}
	if d := st.Health().Detail; d["session_node"] != victim.Name || d["session_node_role"] != "server" {
		t.Fatalf("session bound to %q (%s), want the server %q", d["session_node"], d["session_node_role"], victim.Name)
	}
	kv := lead.Client(t).KV()
	if p, _, err := kv.Get("rwf/"+key, nil); err != nil || p == nil {
		t.Fatalf("owned key not in the store: %v %v", p, err)
	}
	victim.Kill()
	start := time.Now()
	for {
		p, _, err := kv.Get("rwf/"+key, nil)
		if err == nil && p == nil {
			break
		}
		if time.Since(start) > 90*time.Second {
			t.Fatalf("the owned key outlived its session's server by 90s: %v %v", p, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("BENCH the owned key of a host whose session was bound to a killed Consul server was deleted %s after the kill (autopilot reaps the server, its sessions go with its node)",
		time.Since(start).Round(100*time.Millisecond))
}
