package docker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
)

const (
	// fastFor is how long after its creation an incomplete endpoint is
	// polled fast (fastPoll); after that every slowPoll.
	fastFor, fastPoll, slowPoll = time.Minute, 100 * time.Millisecond, 3 * time.Second
	// reconcileEvery is the period of the stale-endpoint check; staleGrace
	// is how old an endpoint must be before the Engine API's silence about
	// it counts (Docker lists an endpoint only once its container joined).
	reconcileEvery, staleGrace = 10 * time.Second, 30 * time.Second
)

// Kick asks the resolver for a pass now.
func (d *Driver) Kick() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

func (d *Driver) forget(eid string) {
	d.mu.Lock()
	delete(d.neigh, eid)
	d.mu.Unlock()
}

// Run resolves pending endpoints and removes stale ones until ctx ends.
func (d *Driver) Run(ctx context.Context) {
	var lastReconcile time.Time
	for {
		fast := d.resolvePass(ctx)
		if time.Since(lastReconcile) >= reconcileEvery {
			d.reconcile(ctx)
			lastReconcile = time.Now()
		}
		wait := slowPoll
		if fast {
			wait = fastPoll
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-d.kick:
		case <-t.C:
		}
		t.Stop()
	}
}

// resolvePass completes what it can of every Docker endpoint (gateway
// neighbours in the sandbox, labels) and reports whether a young one is
// still incomplete.
func (d *Driver) resolvePass(ctx context.Context) (fast bool) {
	for _, ep := range d.eps.List() {
		if ep.Docker == nil || ep.State == endpoint.StateLost || ep.State == endpoint.StateCreating {
			continue
		}
		young := time.Since(ep.Created) < fastFor
		d.mu.Lock()
		done := d.neigh[ep.Docker.EndpointID]
		d.mu.Unlock()
		if !done && ep.Netns != "" {
			ok, err := d.eps.EnsureSandboxNeighbours(ep.Name)
			if err != nil {
				d.log.Debug("gateway neighbours not set in the sandbox yet", "endpoint", ep.Name, "err", err)
			}
			if ok {
				d.mu.Lock()
				d.neigh[ep.Docker.EndpointID] = true
				d.mu.Unlock()
				done = true
			}
		}
		if ep.State == endpoint.StatePending && !d.resolveLabels(ctx, ep) || !done {
			fast = fast || young
		}
	}
	return fast
}

// resolveLabels finds the endpoint's container through the Engine API
// and gives the endpoint its labels; it reports whether it did.
func (d *Driver) resolveLabels(ctx context.Context, ep endpoint.Endpoint) bool {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, netName, err := d.lookup(ctx, ep)
	switch {
	case errors.Is(err, errNotYet):
		return false
	case err != nil:
		d.setPending(ep, fmt.Sprintf("cannot read the container's labels (%v); closed until the Docker Engine API answers ([docker] engine_socket)", err))
		return false
	}
	labels, err := identity.NewLabels(c.Labels)
	if err != nil {
		d.setPending(ep, fmt.Sprintf("container %.12s: %v; closed: fix its labels (docker run --label KEY=VALUE)", c.ID, err))
		return false
	}
	if _, err := d.eps.SetLabels(ctx, ep.Name, c.ID, netName, labels); err != nil {
		if errors.Is(err, endpoint.ErrNotPending) {
			return true
		}
		d.setPending(ep, fmt.Sprintf("container %.12s: %v; closed until then", c.ID, err))
		return false
	}
	d.log.Info("docker endpoint has its labels", "endpoint", ep.Name, "container_id", c.ID, "network", netName, "labels", labels.CLI())
	return true
}

// errNotYet: the network does not list the endpoint yet.
var errNotYet = errors.New("endpoint not listed yet")

// lookup finds the container of a Docker endpoint: the network's list
// names it (by id once joined; by name under "ep-<endpoint id>" while it
// joins), and the container list, which dockerd serves without the
// container's lock, gives its id and labels. Both answer during Join.
func (d *Driver) lookup(ctx context.Context, ep endpoint.Endpoint) (ContainerSummary, string, error) {
	n, err := d.engine.Network(ctx, ep.Docker.NetworkID)
	if err != nil {
		return ContainerSummary{}, "", err
	}
	for key, m := range n.Containers {
		if m.EndpointID != ep.Docker.EndpointID || m.Name == "" {
			continue
		}
		c, err := d.engine.ContainerByName(ctx, m.Name)
		if err != nil {
			return ContainerSummary{}, "", err
		}
		if dockerID(key) && key != c.ID {
			return ContainerSummary{}, "", fmt.Errorf("network %s lists container %.12s as %s, the container list says %.12s", n.Name, key, m.Name, c.ID)
		}
		return c, n.Name, nil
	}
	return ContainerSummary{}, "", errNotYet
}

// setPending records a pending endpoint's reason, logging it once.
func (d *Driver) setPending(ep endpoint.Endpoint, reason string) {
	if ep.Pending == reason {
		return
	}
	if _, err := d.eps.SetPending(ep.Name, reason); err != nil {
		d.log.Debug("cannot record the pending reason", "endpoint", ep.Name, "err", err)
		return
	}
	d.log.Warn("docker endpoint stays closed: no labels yet", "endpoint", ep.Name, "reason", reason)
}

// reconcile deletes the Docker endpoints that Docker no longer has: their
// network is gone, or the network no longer lists them (their container
// died while dockerd was down, without DeleteEndpoint). An Engine API
// that does not answer deletes nothing.
func (d *Driver) reconcile(ctx context.Context) {
	nets := map[string]*NetworkInfo{}
	for _, ep := range d.eps.List() {
		if ep.Docker == nil || time.Since(ep.Created) < staleGrace {
			continue
		}
		nid := ep.Docker.NetworkID
		n, seen := nets[nid]
		if !seen {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			info, err := d.engine.Network(cctx, nid)
			cancel()
			switch {
			case errors.Is(err, ErrGone):
				n = nil
			case err != nil:
				d.log.Debug("docker reconcile skipped: the Engine API does not answer", "err", err)
				return
			default:
				n = &info
			}
			nets[nid] = n
		}
		why := "its Docker network is gone"
		if n != nil {
			found := false
			for _, c := range n.Containers {
				found = found || c.EndpointID == ep.Docker.EndpointID
			}
			if found {
				continue
			}
			why = "Docker no longer lists it in network " + n.Name + " (its container is gone)"
		}
		dctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := d.eps.Delete(dctx, ep.Name)
		cancel()
		if err != nil && !errors.Is(err, endpoint.ErrNotFound) {
			d.log.Warn("cannot delete a stale docker endpoint; retrying", "endpoint", ep.Name, "err", err)
			continue
		}
		d.forget(ep.Docker.EndpointID)
		d.log.Info("stale docker endpoint deleted", "endpoint", ep.Name, "container_id", ep.ContainerID, "reason", why)
	}
}
