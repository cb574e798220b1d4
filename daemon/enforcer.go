package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"

	"github.com/rackwire/rackwire/daemon/endpoint"
	"github.com/rackwire/rackwire/daemon/identity"
	"github.com/rackwire/rackwire/daemon/ipcache"
	"github.com/rackwire/rackwire/daemon/iplog"
	"github.com/rackwire/rackwire/daemon/policysync"
	"github.com/rackwire/rackwire/daemon/store"
	"github.com/rackwire/rackwire/internal/version"
)

// The agent is the endpoint manager's Enforcer: it puts a new endpoint's
// addresses in the ipcache and its policy in its map before the manager
// brings the veth up, and publishes the addresses to the store afterwards,
// in the background.

// Admit implements endpoint.Enforcer.
func (a *agent) Admit(ctx context.Context, ep endpoint.Endpoint) error {
	for _, ip := range ep.IPs() {
		if err := a.ipc.Upsert(ipcache.LocalEndpoint, netip.PrefixFrom(ip, ip.BitLen()), ipcache.Entry{Identity: uint32(ep.Identity), HostIP: a.hostIP}); err != nil {
			return fmt.Errorf("write ipcache entry %s: %w (if the ipcache is full, raise [datapath] ipcache_max_entries)", ip, err)
		}
	}
	if err := a.sync.Admit(a.syncEndpoint(ep)); err != nil {
		return err
	}
	a.publishEndpoint(ep)
	return nil
}

// Readopt implements endpoint.Enforcer.
func (a *agent) Readopt(ep endpoint.Endpoint) {
	for _, ip := range ep.IPs() {
		// A failed write is kept by the ipcache owner and retried.
		if err := a.ipc.Upsert(ipcache.LocalEndpoint, netip.PrefixFrom(ip, ip.BitLen()), ipcache.Entry{Identity: uint32(ep.Identity), HostIP: a.hostIP}); err != nil {
			a.log.Warn("cannot write a restored endpoint's ipcache entry yet; retrying", "endpoint", ep.Name, "ip", ip, "err", err)
		}
	}
	a.sync.Readopt(a.syncEndpoint(ep))
	a.publishEndpoint(ep)
}

// Gone implements endpoint.Enforcer.
func (a *agent) Gone(ep endpoint.Endpoint) {
	for _, ip := range ep.IPs() {
		if err := a.ipc.Delete(ipcache.LocalEndpoint, netip.PrefixFrom(ip, ip.BitLen())); err != nil {
			a.log.Warn("cannot delete a gone endpoint's ipcache entry yet; retrying", "endpoint", ep.Name, "ip", ip, "err", err)
		}
	}
	a.sync.Delete(ep.ID)
	a.audit.forget(ep.Name)
	a.pub.Set(publishGroup(ep.ID), nil)
}

func (a *agent) syncEndpoint(ep endpoint.Endpoint) policysync.Endpoint {
	return policysync.Endpoint{ID: ep.ID, Name: ep.Name, Identity: ep.Identity, Labels: ep.IdentityLabels, Audit: a.audit.on(ep.Name)}
}

func publishGroup(id uint16) string { return "endpoint/" + strconv.Itoa(int(id)) }

// publishEndpoint hands an endpoint's ipcache records to the publisher.
func (a *agent) publishEndpoint(ep endpoint.Endpoint) {
	kvs := map[string][]byte{}
	hostIP := ""
	if a.hostIP.IsValid() {
		hostIP = a.hostIP.String()
	}
	for _, ip := range ep.IPs() {
		b, err := json.Marshal(store.IPEntry{
			IP: ip.String(), Identity: uint32(ep.Identity), HostIP: hostIP,
			Node: a.cfg.Node.Name, Endpoint: uint32(ep.ID), LabelsHash: ep.IdentityLabels.String(),
		})
		if err != nil {
			continue
		}
		kvs[store.IPKey(a.cfg.Node.Cluster, ip)] = b
	}
	a.pub.Set(publishGroup(ep.ID), kvs)
}

// nodeRecord is this host's node record.
func (a *agent) nodeRecord() []byte {
	b, _ := json.Marshal(store.NodeEntry{
		Name: a.cfg.Node.Name, Cluster: a.cfg.Node.Cluster, IPs: a.cfg.Node.Addresses,
		CIDRs: a.cfg.IPAM.CIDRs, BGPASN: a.cfg.BGP.LocalASN, Version: version.Version, HostID: a.hostID,
		Features: a.features(),
	})
	return b
}

// features are what this host announces in its node record.
func (a *agent) features() []string {
	if a.cfg.Store.Backend == "consul" {
		return []string{iplog.Feature}
	}
	return nil
}

func (a *agent) publishNode() {
	a.pub.Set("node", map[string][]byte{store.NodeKey(a.cfg.Node.Cluster, a.cfg.Node.Name): a.nodeRecord()})
}

// ErrDuplicateNode: another live host publishes under this host's node name.
var ErrDuplicateNode = errors.New("node name used by another host")

// checkNodeName refuses to start when the store holds this node name's
// record from another live host (its session still holds the key). Two
// hosts with one name would share identity claims, and one host's release
// would let the GC delete an identity the other still uses. A store that
// does not answer is not a reason to stop: the check then happens in the
// node watch, which reports a duplicate as soon as it sees one.
func (a *agent) checkNodeName(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	key := store.NodeKey(a.cfg.Node.Cluster, a.cfg.Node.Name)
	kv, err := a.st.Get(ctx, key)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		a.log.Warn("cannot check the node name against the store now; the node watch checks it later", "err", err)
		return nil
	}
	other, dup := ipcache.Duplicate([]store.KV{kv}, a.self(), a.hostID)
	if !dup || kv.Owner == "" {
		return nil
	}
	return fmt.Errorf("%w: the store's record of node %q (key %s%s) belongs to another host (host_id %s, addresses %v), still alive (session %s). "+
		"Give this host a unique [node] name; if that record is this host's own from before its state dir was wiped, delete the key and start again",
		ErrDuplicateNode, a.cfg.Node.Name, a.cfg.Store.Prefix, key, other.HostID, other.IPs, kv.Owner)
}

// cidrSink puts the CIDR identities of policy prefixes in the ipcache, at
// the lowest rank.
type cidrSink struct{ c *ipcache.Cache }

func (s cidrSink) SetCIDR(p netip.Prefix, id identity.ID) error {
	return s.c.Upsert(ipcache.PolicyCIDR, p, ipcache.Entry{Identity: uint32(id)})
}

func (s cidrSink) DeleteCIDR(p netip.Prefix) error { return s.c.Delete(ipcache.PolicyCIDR, p) }

// hostAddrLoop keeps this host's own addresses in the ipcache as the host
// identity, so that `fromEntities: [host]` matches traffic the host
// originates (its source is one of these addresses).
func (a *agent) hostAddrLoop(ctx context.Context) {
	for {
		set := map[netip.Prefix]ipcache.Entry{}
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			a.log.Warn("cannot list host addresses for the host identity", "err", err)
		}
		for _, ad := range addrs {
			pn, ok := ad.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(pn.IP)
			if !ok || ip.IsLinkLocalUnicast() {
				continue
			}
			ip = ip.Unmap()
			set[netip.PrefixFrom(ip, ip.BitLen())] = ipcache.Entry{Identity: uint32(identity.Host), HostIP: ip}
		}
		if err == nil {
			if err := a.ipc.Replace(ipcache.Host, set); err != nil {
				a.log.Warn("cannot write host addresses to the ipcache; retrying", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(30 * time.Second):
		}
	}
}

func loadHostID(stateDir string) (string, error) {
	id, err := ipcache.LoadHostID(filepath.Join(stateDir, ipcache.HostIDFile))
	if err != nil {
		return "", fmt.Errorf("host id in %s: %w", stateDir, err)
	}
	return id, nil
}
