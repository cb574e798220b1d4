package endpoint

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rackwire/rackwire/daemon/identity"
)

// TestDetachedPending walks a Docker endpoint through the manager: an
// address reserved first, a detached veth plugged without labels (closed:
// no identity, nothing admitted), moved into a sandbox as Docker does, the
// gateway neighbours set there, a restart that keeps it closed, then its
// labels, after which it is an ordinary endpoint.
func TestDetachedPending(t *testing.T) {
	h := newTestHost(t, "10.77.0.0/29")
	ctx := context.Background()

	a, err := h.m.Reserve(true, netip.Addr{}, time.Minute)
	if err != nil || a != netip.MustParseAddr("10.77.0.1") {
		t.Fatalf("Reserve() = %v, %v; want 10.77.0.1", a, err)
	}
	if _, err := h.m.Reserve(true, a, time.Minute); !errors.Is(err, ErrIPInUse) {
		t.Errorf("Reserve(%s) twice = %v, want ErrIPInUse", a, err)
	}
	other := h.add(t, "plain", Request{})
	if other.IPv4 == a {
		t.Fatalf("Add took reserved address %s", a)
	}

	dk := &DockerAttachment{NetworkID: strings.Repeat("a", 64), EndpointID: strings.Repeat("b", 64)}
	req := Request{Name: "docker-bbbb", Detach: true, Reserved: true, IP: a, Pending: "waiting", Docker: dk}
	ep, err := h.m.Add(ctx, req)
	if err != nil {
		t.Fatalf("Add(detached) = %v", err)
	}
	if ep.State != StatePending || ep.Identity != identity.Init || ep.IPv4 != a || ep.Pending != "waiting" {
		t.Errorf("detached endpoint %+v; want labels-pending, identity init, %s", ep, a)
	}
	if _, cache := h.dp.counts(); cache != 1 {
		t.Errorf("ipcache holds %d entries, want 1 (the pending endpoint is not admitted)", cache)
	}
	if n := h.ids.total(); n != 1 {
		t.Errorf("identity references %d, want 1 (none for the pending endpoint)", n)
	}
	if again, err := h.m.Add(ctx, req); err != nil || again.ID != ep.ID {
		t.Errorf("Add of the same Docker endpoint = %+v, %v; want endpoint %d again", again, err, ep.ID)
	}
	peer := h.m.DetachedPeerName(ep.ID)
	run(t, "ip", "-n", h.ns, "link", "show", peer)

	// Docker moves the peer into the sandbox and brings it up.
	sbName, sbPath := newNetns(t, "s")
	run(t, "ip", "-n", h.ns, "link", "set", peer, "netns", sbName)
	if done, err := h.m.EnsureSandboxNeighbours(ep.Name); done || err != nil {
		t.Errorf("EnsureSandboxNeighbours before the sandbox is known = %v, %v; want false, nil", done, err)
	}
	if _, err := h.m.SetSandbox(ep.Name, sbPath); err != nil {
		t.Fatal(err)
	}
	if done, _ := h.m.EnsureSandboxNeighbours(ep.Name); done {
		t.Errorf("EnsureSandboxNeighbours with the peer down = true, want false")
	}
	run(t, "ip", "-n", sbName, "link", "set", peer, "name", "eth0", "up")
	if done, err := h.m.EnsureSandboxNeighbours(ep.Name); !done || err != nil {
		t.Fatalf("EnsureSandboxNeighbours = %v, %v; want true", done, err)
	}
	if out := run(t, "ip", "-n", sbName, "neigh", "show", "169.254.1.1"); !strings.Contains(out, ep.HostMAC) || !strings.Contains(out, "PERMANENT") {
		t.Errorf("sandbox neighbour of the gateway: %q, want PERMANENT %s", out, ep.HostMAC)
	}

	// A restart keeps it closed: no identity taken, nothing readopted.
	h.reopen(t)
	rep, err := h.m.Restore(ctx)
	if err != nil || len(rep.Restored) != 2 {
		t.Fatalf("Restore() = %+v, %v", rep, err)
	}
	if got, _ := h.m.Get(ep.Name); got.State != StatePending || got.Netns != sbPath || got.Docker.SandboxKey != sbPath {
		t.Errorf("restored %+v; want labels-pending in sandbox %s", got, sbPath)
	}
	// The Enforcer outlives reopen (h.opts); its ipcache is the agent's.
	enf := h.opts.Enforcer.(*fakeDatapath)
	if _, cache := enf.counts(); cache != 1 {
		t.Errorf("after restore the ipcache holds %d entries, want 1", cache)
	}

	if _, err := h.m.SetLabels(ctx, ep.Name, strings.Repeat("c", 64), "rwd-net", nil); !errors.Is(err, ErrBadLabels) {
		t.Errorf("SetLabels(no labels) = %v, want ErrBadLabels", err)
	}
	if _, err := h.m.SetPending(ep.Name, "no labels"); err != nil {
		t.Fatal(err)
	}
	got, err := h.m.SetLabels(ctx, ep.Name, strings.Repeat("c", 64), "rwd-net", identity.MustLabels("app", "web"))
	if err != nil {
		t.Fatalf("SetLabels = %v", err)
	}
	if got.State != StateReady || got.Identity == identity.Init || got.Pending != "" || got.ContainerID != strings.Repeat("c", 64) {
		t.Errorf("after SetLabels: %+v; want ready with an identity", got)
	}
	if spec := h.dp.eps[ep.ID]; spec.Identity != got.Identity {
		t.Errorf("datapath has identity %d, want %d", spec.Identity, got.Identity)
	}
	if _, cache := enf.counts(); cache != 2 {
		t.Errorf("after SetLabels the ipcache holds %d entries, want 2 (admitted)", cache)
	}
	if _, err := h.m.SetLabels(ctx, ep.Name, strings.Repeat("c", 64), "rwd-net", identity.MustLabels("app", "db")); !errors.Is(err, ErrNotPending) {
		t.Errorf("SetLabels of other labels on a ready endpoint = %v, want ErrNotPending", err)
	}
	h.reopen(t)
	if _, err := h.m.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := h.m.Get(ep.Name); r.State != StateReady || r.Identity != got.Identity || r.Labels.CLI() != "app=web" {
		t.Errorf("restored after SetLabels: %+v", r)
	}
	if err := h.m.Delete(ctx, ep.Name); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.m.FindDocker(dk.EndpointID); ok {
		t.Errorf("FindDocker after Delete found the endpoint")
	}
}
