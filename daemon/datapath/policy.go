package datapath

import (
	"errors"
	"fmt"
	"math/bits"
	"sort"

	"github.com/cilium/ebpf"
)

// Entry is one policy rule of an endpoint as the policy engine targets it.
// Zero Identity, Port or Proto is a wildcard. For ICMP (1) and ICMPv6 (58)
// Port is the ICMP type. EndPort > Port makes a port range; the datapath
// stores it as aligned power-of-two blocks (see the package doc).
type Entry struct {
	Identity  uint32    `json:"identity"`
	Direction Direction `json:"direction"`
	Proto     uint8     `json:"proto"`
	Port      uint16    `json:"port"`
	EndPort   uint16    `json:"end_port,omitempty"`
	Deny      bool      `json:"deny"`
	ProxyPort uint16    `json:"proxy_port,omitempty"`

	// Read back only.
	Emergency bool   `json:"emergency,omitempty"` // written by AllowAll
	Packets   uint64 `json:"packets"`
	Bytes     uint64 `json:"bytes"`
}

func (e Entry) String() string {
	verdict := "allow"
	if e.Deny {
		verdict = "deny"
	}
	port := fmt.Sprint(e.Port)
	if e.EndPort > e.Port {
		port = fmt.Sprintf("%d-%d", e.Port, e.EndPort)
	}
	return fmt.Sprintf("%s %s identity=%d proto=%d port=%s", verdict, e.Direction, e.Identity, e.Proto, port)
}

// block is one aligned run of 2^size ports starting at start.
type block struct {
	start uint16
	size  uint8 // log2 of the number of ports
}

// portBlocks splits [lo, hi] into the fewest aligned power-of-two blocks.
// The whole range 0-65535 is the any-port wildcard.
func portBlocks(lo, hi uint16) []block {
	if lo == 0 && hi == 0xffff {
		return []block{{0, 0}}
	}
	var out []block
	for l, h := uint32(lo), uint32(hi); l <= h; {
		size := uint8(15)
		if l != 0 {
			size = min(uint8(bits.TrailingZeros32(l)), 15)
		}
		for l+(1<<size)-1 > h {
			size--
		}
		out = append(out, block{uint16(l), size})
		l += 1 << size
	}
	return out
}

// keys encodes an entry as map keys and the value to write under each.
func (e Entry) keys() ([]policyKey, policyValue, error) {
	if e.Direction > Egress {
		return nil, policyValue{}, fmt.Errorf("direction %d: %w", e.Direction, ErrInvalidEntry)
	}
	v := policyValue{ProxyPort: e.ProxyPort}
	if e.Deny {
		v.Flags |= flagDeny
	}
	if e.Port == 0 || e.Proto == 0 {
		if e.Port != 0 || e.EndPort != 0 {
			return nil, v, fmt.Errorf("port without protocol in %v: %w", e, ErrInvalidEntry)
		}
		return []policyKey{{Identity: e.Identity, Proto: e.Proto, Direction: uint8(e.Direction)}}, v, nil
	}
	end := e.EndPort
	if end == 0 {
		end = e.Port
	}
	if end < e.Port {
		return nil, v, fmt.Errorf("end port %d below port %d: %w", end, e.Port, ErrInvalidEntry)
	}
	var ks []policyKey
	for _, b := range portBlocks(e.Port, end) {
		ks = append(ks, policyKey{
			Identity:  e.Identity,
			DPort:     toBE16(b.start),
			Proto:     e.Proto,
			Direction: uint8(e.Direction) | b.size<<keyBlockShift,
		})
	}
	return ks, v, nil
}

// entryOf decodes one map key and value.
func entryOf(k policyKey, v policyValue) Entry {
	e := Entry{
		Identity:  k.Identity,
		Direction: Direction(k.Direction & keyDirMask),
		Proto:     k.Proto,
		Port:      k.DPort.uint16(),
		Deny:      v.Flags&flagDeny != 0,
		Emergency: v.Flags&flagEmergency != 0,
		ProxyPort: v.ProxyPort,
		Packets:   v.Packets,
		Bytes:     v.Bytes,
	}
	if size := (k.Direction & keyBlockMask) >> keyBlockShift; size > 0 {
		e.EndPort = e.Port + (1<<size - 1)
	}
	return e
}

func isMeta(k policyKey) bool { return k.Direction&keyMeta != 0 }

func metaKey(dir Direction) policyKey { return policyKey{Direction: keyMeta | uint8(dir)} }

// writeMeta recomputes both meta entries from the map's content: which
// block sizes are in use and whether deny entries exist. It keeps the
// emergency-open flag and the counters as they are.
func writeMeta(m *ebpf.Map) error {
	var (
		blocks  [2]uint16
		deny    [2]bool
		hasMeta [2]policyValue
	)
	keys, vals, err := dumpPolicyMap(m)
	if err != nil {
		return err
	}
	for i, k := range keys {
		v := vals[i]
		dir := k.Direction & keyDirMask
		if isMeta(k) {
			hasMeta[dir] = v
			continue
		}
		if size := (k.Direction & keyBlockMask) >> keyBlockShift; size > 0 {
			blocks[dir] |= 1 << size
		}
		if v.Flags&flagDeny != 0 {
			deny[dir] = true
		}
	}
	for dir := range 2 {
		mv := policyValue{MetaBlocks: blocks[dir], Flags: hasMeta[dir].Flags & flagMetaOpen,
			Packets: hasMeta[dir].Packets, Bytes: hasMeta[dir].Bytes}
		if deny[dir] {
			mv.Flags |= flagMetaDeny
		}
		if err := m.Put(metaKey(Direction(dir)), mv); err != nil {
			return fmt.Errorf("write policy meta entry: %w", err)
		}
	}
	return nil
}

// widenMeta adds block sizes and deny flags before new entries land, so
// the datapath never skips a lookup an entry needs.
func widenMeta(m *ebpf.Map, add map[policyKey]policyValue) error {
	for dir := range 2 {
		var mv policyValue
		if err := m.Lookup(metaKey(Direction(dir)), &mv); err != nil {
			if !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("read policy meta entry: %w", err)
			}
			mv = policyValue{MetaBlocks: allBlockSizes, Flags: flagMetaDeny}
		}
		before := mv
		for k, v := range add {
			if int(k.Direction&keyDirMask) != dir {
				continue
			}
			if size := (k.Direction & keyBlockMask) >> keyBlockShift; size > 0 {
				mv.MetaBlocks |= 1 << size
			}
			if v.Flags&flagDeny != 0 {
				mv.Flags |= flagMetaDeny
			}
		}
		if mv != before {
			if err := m.Put(metaKey(Direction(dir)), mv); err != nil {
				return fmt.Errorf("write policy meta entry: %w", err)
			}
		}
	}
	return nil
}

func (d *Datapath) policyMap(id uint16) (*ebpf.Map, error) {
	return d.policyMapLocked(id, false)
}

// policyKeys encodes entries as map keys and values; deny wins when two
// entries share a key.
func policyKeys(desired []Entry) (map[policyKey]policyValue, error) {
	want := make(map[policyKey]policyValue, len(desired))
	for _, e := range desired {
		ks, v, err := e.keys()
		if err != nil {
			return nil, err
		}
		for _, k := range ks {
			if old, ok := want[k]; ok {
				v.Flags |= old.Flags
			}
			want[k] = v
		}
	}
	return want, nil
}

// SetPolicy makes the endpoint's policy what desired says, atomically: it
// builds a new map from the template holding exactly desired (plus what an
// emergency AllowAll added, and the meta entries), pins it under a
// temporary name, renames that over rw_policy_NNNNN and then points
// rw_policy_maps at it; the old map is closed. A packet is decided either
// by the old map or by the new one, never by a mix, so no state between the
// two ever allows more than one of them; the map never needs room for both
// policies. Entries written by PutEntry or with bpftool are replaced.
//
// Counters of entries that stay are carried over (read just before the
// swap; what is counted in the instant between is lost). AllowAll's state
// survives: its entries (unless the policy uses their key) and its open
// flag stay until AllowAll(id, true).
//
// If the map in force already holds what SetPolicy would write (counters
// aside), nothing happens: the map, and its id, stay. A direction desired
// has no entry for is closed: nothing passes in it (a new endpoint's map
// starts closed in both directions); OpenEntries opens an endpoint.
//
// A policy that needs more keys than the map holds (with the two meta
// entries) returns an error wrapping ErrPolicyTooLarge; an invalid entry
// ErrInvalidEntry. On every error the map in force stays in force and
// pinned, unchanged.
func (d *Datapath) SetPolicy(id uint16, desired []Entry) error {
	want, err := policyKeys(desired)
	if err != nil {
		return fmt.Errorf("set policy of endpoint %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.policyMap(id)
	if err != nil {
		return fmt.Errorf("set policy of endpoint %d: %w", id, err)
	}
	keys, vals, err := dumpPolicyMap(m)
	if err != nil {
		return fmt.Errorf("set policy of endpoint %d: %w", id, err)
	}
	next, same := nextPolicy(want, keys, vals)
	if same {
		return nil
	}
	if need := len(next.entries) + 2; need > int(m.MaxEntries()) {
		return fmt.Errorf("set policy of endpoint %d: it needs %d entries with the meta entries, the map holds %d ([datapath] policy_max_entries); the previous policy stays: %w",
			id, need, m.MaxEntries(), ErrPolicyTooLarge)
	}
	if err := d.swapPolicyLocked(id, m, next); err != nil {
		return fmt.Errorf("set policy of endpoint %d: %w; the previous policy stays", id, err)
	}
	if err := d.bumpRev(); err != nil {
		return fmt.Errorf("set policy of endpoint %d: %w", id, err)
	}
	return nil
}

// Policy returns the endpoint's entries with their counters, one per map
// key (a port range shows as its blocks), sorted; the meta entries are left
// out.
func (d *Datapath) Policy(id uint16) ([]Entry, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.policyMap(id)
	if err != nil {
		return nil, fmt.Errorf("read policy of endpoint %d: %w", id, err)
	}
	keys, vals, err := dumpPolicyMap(m)
	if err != nil {
		return nil, fmt.Errorf("read policy of endpoint %d: %w", id, err)
	}
	var out []Entry
	for i, k := range keys {
		if !isMeta(k) {
			out = append(out, entryOf(k, vals[i]))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Direction != b.Direction {
			return a.Direction < b.Direction
		}
		if a.Identity != b.Identity {
			return a.Identity < b.Identity
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		return a.Port < b.Port
	})
	return out, nil
}

// PutEntry adds or replaces one entry (all keys of its range).
func (d *Datapath) PutEntry(id uint16, e Entry) error {
	ks, v, err := e.keys()
	if err != nil {
		return fmt.Errorf("put entry on endpoint %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.policyMap(id)
	if err != nil {
		return fmt.Errorf("put entry on endpoint %d: %w", id, err)
	}
	add := map[policyKey]policyValue{}
	for _, k := range ks {
		add[k] = v
	}
	if err := widenMeta(m, add); err != nil {
		return fmt.Errorf("put entry on endpoint %d: %w", id, err)
	}
	// A range is several keys: if one does not fit (full map), undo the
	// ones written before it, so a refused entry leaves nothing behind.
	type prior struct {
		k   policyKey
		v   policyValue
		had bool
	}
	var done []prior
	for _, k := range ks {
		var old policyValue
		had := m.Lookup(k, &old) == nil
		if err := m.Put(k, v); err != nil {
			for _, p := range done {
				if p.had {
					_ = m.Put(p.k, p.v)
				} else {
					_ = m.Delete(p.k)
				}
			}
			_ = writeMeta(m)
			return fmt.Errorf("put entry on endpoint %d: %v: %w", id, e, err)
		}
		done = append(done, prior{k, old, had})
	}
	if err := writeMeta(m); err != nil {
		return err
	}
	return d.bumpRev()
}

// DeleteEntry removes one entry (all keys of its range); missing keys are
// not an error.
func (d *Datapath) DeleteEntry(id uint16, e Entry) error {
	ks, _, err := e.keys()
	if err != nil {
		return fmt.Errorf("delete entry on endpoint %d: %w", id, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.policyMap(id)
	if err != nil {
		return fmt.Errorf("delete entry on endpoint %d: %w", id, err)
	}
	for _, k := range ks {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete entry on endpoint %d: %v: %w", id, e, err)
		}
	}
	if err := writeMeta(m); err != nil {
		return err
	}
	return d.bumpRev()
}

// AllowAll is the emergency open: it flags both directions open (deny
// entries included) and adds the wildcard allow entries that show it.
// With revert it removes exactly what it added. SetPolicy keeps both: its
// new map carries the open flags and the entries AllowAll added (except
// where the policy itself uses the key, which then stays after a revert).
func (d *Datapath) AllowAll(id uint16, revert bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.policyMap(id)
	if err != nil {
		return fmt.Errorf("allow-all on endpoint %d: %w", id, err)
	}
	for _, dir := range []Direction{Ingress, Egress} {
		k := policyKey{Direction: uint8(dir)}
		var v policyValue
		err := m.Lookup(k, &v)
		exists := err == nil
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("allow-all on endpoint %d: %w", id, err)
		}
		switch {
		case !revert && !exists:
			err = m.Put(k, policyValue{Flags: flagEmergency})
		case revert && exists && v.Flags&flagEmergency != 0:
			err = m.Delete(k)
		default:
			// Nothing to add, or nothing of ours to remove (a policy may
			// have taken the key over and a later one dropped it): the
			// open flag below still goes.
			err = nil
		}
		if err != nil {
			return fmt.Errorf("allow-all on endpoint %d %s: %w", id, dir, err)
		}
		var mv policyValue
		if err := m.Lookup(metaKey(dir), &mv); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("allow-all on endpoint %d: %w", id, err)
		}
		if revert {
			mv.Flags &^= flagMetaOpen
		} else {
			mv.Flags |= flagMetaOpen
		}
		if err := m.Put(metaKey(dir), mv); err != nil {
			return fmt.Errorf("allow-all on endpoint %d: %w", id, err)
		}
	}
	if err := writeMeta(m); err != nil {
		return fmt.Errorf("allow-all on endpoint %d: %w", id, err)
	}
	d.log.Warn("emergency allow-all", "endpoint_id", id, "revert", revert)
	if err := d.bumpRev(); err != nil {
		return fmt.Errorf("allow-all on endpoint %d: %w", id, err)
	}
	return nil
}

// OpenEntries are the entries of an endpoint no policy selects: allow
// everything in both directions. A new endpoint's map is closed until
// SetPolicy writes these (or narrower entries).
func OpenEntries() []Entry {
	return []Entry{{Direction: Ingress}, {Direction: Egress}}
}
