package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"

	"github.com/cilium/ebpf"
)

// IPCacheEntry is one address or prefix with its identity.
type IPCacheEntry struct {
	Prefix   netip.Prefix `json:"prefix"`
	Identity uint32       `json:"identity"`
	HostIP   netip.Addr   `json:"host_ip,omitzero"`
}

func ipcacheVal(identity uint32, host netip.Addr) ipcacheValue {
	v := ipcacheValue{Identity: identity}
	if host.IsValid() {
		k := newIPKey(host)
		v.HostFamily, v.HostIP = k.Family, k.Addr
	}
	return v
}

func lpmKey(p netip.Prefix) ipcacheLPMKey {
	k := newIPKey(p.Addr())
	return ipcacheLPMKey{Prefixlen: lpmFamilyBits + uint32(p.Bits()), Family: k.Family, Addr: k.Addr}
}

func fullLength(p netip.Prefix) bool { return p.Bits() == p.Addr().BitLen() }

func normalize(p netip.Prefix) (netip.Prefix, error) {
	if !p.IsValid() {
		return p, fmt.Errorf("prefix %v: %w", p, ErrInvalidEntry)
	}
	a := p.Addr()
	bitsLen := p.Bits()
	if a.Is4In6() {
		a = a.Unmap()
		bitsLen -= 96
		if bitsLen < 0 {
			return p, fmt.Errorf("prefix %v: %w", p, ErrInvalidEntry)
		}
	}
	return netip.PrefixFrom(a, bitsLen).Masked(), nil
}

// UpsertIPCache maps prefix to identity: a host address (/32, /128) goes to
// the rw_ipcache hash, a shorter prefix to the rw_ipcache_lpm trie. The
// policy revision is bumped, so that established flows are checked again
// with the new identity.
func (d *Datapath) UpsertIPCache(prefix netip.Prefix, identity uint32, hostIP netip.Addr) error {
	if err := d.UpsertIPCacheQuiet(prefix, identity, hostIP); err != nil {
		return err
	}
	return d.bumpRev()
}

// DeleteIPCache removes prefix (a missing prefix is not an error) and
// bumps the policy revision.
func (d *Datapath) DeleteIPCache(prefix netip.Prefix) error {
	if err := d.DeleteIPCacheQuiet(prefix); err != nil {
		return err
	}
	return d.bumpRev()
}

// Settle bumps the policy revision after quiet ipcache writes
// (ipcache.QuietWriter): established flows are checked again.
func (d *Datapath) Settle() error { return d.bumpRev() }

// UpsertIPCacheQuiet is UpsertIPCache without the revision bump: new flows
// see the entry at once, established flows at the next Settle.
func (d *Datapath) UpsertIPCacheQuiet(prefix netip.Prefix, identity uint32, hostIP netip.Addr) error {
	p, err := normalize(prefix)
	if err != nil {
		return fmt.Errorf("upsert ipcache: %w", err)
	}
	v := ipcacheVal(identity, hostIP)
	if fullLength(p) {
		err = d.maps["rw_ipcache"].Put(newIPKey(p.Addr()), v)
	} else {
		err = d.maps["rw_ipcache_lpm"].Put(lpmKey(p), v)
	}
	if err != nil {
		return fmt.Errorf("upsert ipcache %v: %w", p, err)
	}
	return nil
}

// UpsertIPCacheBatchQuiet writes host entries (ipcache.BatchWriter) to
// the rw_ipcache hash in one BPF_MAP_UPDATE_BATCH, without the revision
// bump; it returns how many of them, in order, it wrote. A kernel without
// batch operations on hash maps gets them one by one.
func (d *Datapath) UpsertIPCacheBatchQuiet(hosts []netip.Addr, identities []uint32, hostIPs []netip.Addr) (int, error) {
	if len(identities) != len(hosts) || len(hostIPs) != len(hosts) {
		return 0, fmt.Errorf("upsert ipcache batch: %d hosts, %d identities, %d host IPs: %w", len(hosts), len(identities), len(hostIPs), ErrInvalidEntry)
	}
	keys := make([]ipKey, 0, len(hosts))
	vals := make([]ipcacheValue, 0, len(hosts))
	var bad error
	for i, a := range hosts {
		if !a.IsValid() {
			// What comes before it is written; the caller learns where
			// the batch stopped.
			bad = fmt.Errorf("upsert ipcache batch: entry %d: %w", i, ErrInvalidEntry)
			break
		}
		keys, vals = append(keys, newIPKey(a)), append(vals, ipcacheVal(identities[i], hostIPs[i]))
	}
	if len(keys) == 0 {
		return 0, bad
	}
	n, err := d.batchUpsertIPCache(keys, vals, hosts)
	if err == nil {
		err = bad
	}
	return n, err
}

// batchUpsertIPCache writes keys and vals to rw_ipcache in one batch.
func (d *Datapath) batchUpsertIPCache(keys []ipKey, vals []ipcacheValue, hosts []netip.Addr) (int, error) {
	m := d.maps["rw_ipcache"]
	n, err := m.BatchUpdate(keys, vals, nil)
	if errors.Is(err, ebpf.ErrNotSupported) {
		for i := range keys {
			if err := m.Put(keys[i], vals[i]); err != nil {
				return i, fmt.Errorf("upsert ipcache %v: %w", hosts[i], err)
			}
		}
		return len(keys), nil
	}
	if err != nil {
		return n, fmt.Errorf("upsert ipcache batch of %d (%d written): %w", len(keys), n, err)
	}
	return n, nil
}

// DeleteIPCacheQuiet is DeleteIPCache without the revision bump.
func (d *Datapath) DeleteIPCacheQuiet(prefix netip.Prefix) error {
	p, err := normalize(prefix)
	if err != nil {
		return fmt.Errorf("delete ipcache: %w", err)
	}
	if fullLength(p) {
		err = d.maps["rw_ipcache"].Delete(newIPKey(p.Addr()))
	} else {
		err = d.maps["rw_ipcache_lpm"].Delete(lpmKey(p))
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ipcache %v: %w", p, err)
	}
	return nil
}

func (v ipcacheValue) entry(p netip.Prefix) IPCacheEntry {
	e := IPCacheEntry{Prefix: p, Identity: v.Identity}
	if v.HostFamily != 0 {
		e.HostIP = addrFrom(v.HostFamily, v.HostIP)
	}
	return e
}

// IPCache lists both maps as one, sorted by prefix.
func (d *Datapath) IPCache() ([]IPCacheEntry, error) {
	var (
		out []IPCacheEntry
		k   ipKey
		lk  ipcacheLPMKey
		v   ipcacheValue
	)
	it := d.maps["rw_ipcache"].Iterate()
	for it.Next(&k, &v) {
		a := addrFrom(k.Family, k.Addr)
		out = append(out, v.entry(netip.PrefixFrom(a, a.BitLen())))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list rw_ipcache: %w", err)
	}
	it = d.maps["rw_ipcache_lpm"].Iterate()
	for it.Next(&lk, &v) {
		out = append(out, v.entry(netip.PrefixFrom(addrFrom(lk.Family, lk.Addr), int(lk.Prefixlen-lpmFamilyBits))))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list rw_ipcache_lpm: %w", err)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Prefix.Addr().Compare(out[j].Prefix.Addr()); c != 0 {
			return c < 0
		}
		return out[i].Prefix.Bits() < out[j].Prefix.Bits()
	})
	return out, nil
}

// LookupIPCache resolves ip as the datapath does: exact address first, then
// the longest prefix, else world (identity 2, with ok false).
func (d *Datapath) LookupIPCache(ip netip.Addr) (e IPCacheEntry, ok bool, err error) {
	ip = ip.Unmap()
	var v ipcacheValue
	err = d.maps["rw_ipcache"].Lookup(newIPKey(ip), &v)
	if err == nil {
		return v.entry(netip.PrefixFrom(ip, ip.BitLen())), true, nil
	}
	if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return e, false, fmt.Errorf("lookup ipcache %v: %w", ip, err)
	}
	lk := lpmKey(netip.PrefixFrom(ip, ip.BitLen()))
	err = d.maps["rw_ipcache_lpm"].Lookup(lk, &v)
	if err == nil {
		// The trie answers with the value only; the prefix is found by a
		// scan, which is fine for an operator's lookup.
		return v.entry(d.matchedPrefix(ip)), true, nil
	}
	if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return e, false, fmt.Errorf("lookup ipcache %v: %w", ip, err)
	}
	return IPCacheEntry{Prefix: netip.PrefixFrom(ip, ip.BitLen()), Identity: identityWorld}, false, nil
}

// matchedPrefix finds the longest stored prefix that contains ip.
func (d *Datapath) matchedPrefix(ip netip.Addr) netip.Prefix {
	best := netip.PrefixFrom(ip, ip.BitLen())
	bestBits := -1
	var (
		lk ipcacheLPMKey
		sv ipcacheValue
	)
	it := d.maps["rw_ipcache_lpm"].Iterate()
	for it.Next(&lk, &sv) {
		p := netip.PrefixFrom(addrFrom(lk.Family, lk.Addr), int(lk.Prefixlen-lpmFamilyBits))
		if p.Contains(ip) && p.Bits() > bestBits {
			best, bestBits = p, p.Bits()
		}
	}
	return best
}
