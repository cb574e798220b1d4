package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// policyContent is what one rw_policy_NNNNN holds or is to hold: the rule
// entries and the two meta entries.
type policyContent struct {
	entries map[policyKey]policyValue
	meta    [2]policyValue
	hasMeta [2]bool
}

// noCounters is v without its packet and byte counters: what SetPolicy
// compares to decide whether a map already holds the desired set.
func noCounters(v policyValue) policyValue {
	v.Packets, v.Bytes = 0, 0
	return v
}

// readBatch is the most entries one BPF_MAP_LOOKUP_BATCH call asks for.
const readBatch = 16384

// dumpPolicyMap reads every key and value of a policy map, meta entries
// included: with batch lookups where the kernel has them (5.6+; a 10,000
// entry map in about 2 ms), else one key at a time (ten times slower).
func dumpPolicyMap(m *ebpf.Map) ([]policyKey, []policyValue, error) {
	var (
		cursor ebpf.MapBatchCursor
		chunk  = min(readBatch, max(int(m.MaxEntries()), 1))
		keys   []policyKey
		values []policyValue
	)
	for {
		off := len(keys)
		keys = append(keys, make([]policyKey, chunk)...)
		values = append(values, make([]policyValue, chunk)...)
		n, err := m.BatchLookup(&cursor, keys[off:], values[off:], nil)
		keys, values = keys[:off+n], values[:off+n]
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return keys, values, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
			break
		}
		if err != nil {
			return nil, nil, fmt.Errorf("read policy map: %w", err)
		}
	}
	keys, values = keys[:0], values[:0]
	var (
		k policyKey
		v policyValue
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
		values = append(values, v)
	}
	if err := it.Err(); err != nil {
		return nil, nil, fmt.Errorf("read policy map: %w", err)
	}
	return keys, values, nil
}

// metaFor computes both meta entries of a set of entries: which block sizes
// are in use and whether deny entries exist, with the emergency-open flag
// given per direction.
func metaFor(entries map[policyKey]policyValue, open [2]bool) [2]policyValue {
	var meta [2]policyValue
	for k, v := range entries {
		dir := k.Direction & keyDirMask
		if size := (k.Direction & keyBlockMask) >> keyBlockShift; size > 0 {
			meta[dir].MetaBlocks |= 1 << size
		}
		if v.Flags&flagDeny != 0 {
			meta[dir].Flags |= flagMetaDeny
		}
	}
	for dir := range 2 {
		if open[dir] {
			meta[dir].Flags |= flagMetaOpen
		}
	}
	return meta
}

// nextPolicy computes what SetPolicy writes from want (the desired keys,
// which it takes over and changes) and the content of the map in force:
// the desired entries, the entries AllowAll added whose keys the policy
// does not use, the emergency-open flags, fresh meta entries, and the
// counters of every entry (meta entries included) that stays. same
// reports that the map in force already holds exactly that, counters
// aside.
func nextPolicy(want map[policyKey]policyValue, keys []policyKey, vals []policyValue) (next policyContent, same bool) {
	var (
		have    [2]policyValue
		hasMeta [2]bool
		entries int
	)
	same = true
	for i, k := range keys {
		v := vals[i]
		if isMeta(k) {
			if dir := k.Direction & keyDirMask; k == metaKey(Direction(dir)) {
				have[dir], hasMeta[dir] = v, true
			} else {
				same = false // not the programs': left out
			}
			continue
		}
		entries++
		w, ok := want[k]
		switch {
		case ok:
			if noCounters(w) != noCounters(v) {
				same = false
			}
			w.Packets, w.Bytes = v.Packets, v.Bytes
			want[k] = w
		case v.Flags&flagEmergency != 0:
			want[k] = v
		default:
			same = false
		}
	}
	// Every entry of the map is in want now, or same is false: equal
	// sizes make the sets equal.
	same = same && entries == len(want)
	var open [2]bool
	for dir := range 2 {
		open[dir] = hasMeta[dir] && have[dir].Flags&flagMetaOpen != 0
	}
	next = policyContent{entries: want, meta: metaFor(want, open), hasMeta: [2]bool{true, true}}
	for dir := range 2 {
		same = same && hasMeta[dir] && noCounters(have[dir]) == next.meta[dir]
		next.meta[dir].Packets, next.meta[dir].Bytes = have[dir].Packets, have[dir].Bytes
	}
	return next, same
}

// writePolicyMap fills an empty map with c: entries in batches where the
// kernel has them, else one by one; the meta entries last.
func writePolicyMap(m *ebpf.Map, c policyContent) error {
	keys := make([]policyKey, 0, len(c.entries))
	vals := make([]policyValue, 0, len(c.entries))
	for k, v := range c.entries {
		keys = append(keys, k)
		vals = append(vals, v)
	}
	for dir := range 2 {
		if c.hasMeta[dir] {
			keys = append(keys, metaKey(Direction(dir)))
			vals = append(vals, c.meta[dir])
		}
	}
	if len(keys) == 0 {
		return nil
	}
	_, err := m.BatchUpdate(keys, vals, nil)
	if err == nil {
		return nil
	}
	if !errors.Is(err, ebpf.ErrNotSupported) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("write policy map: %w", err)
	}
	for i := range keys {
		if err := m.Update(keys[i], vals[i], ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write %v: %w", entryOf(keys[i], vals[i]), err)
		}
	}
	return nil
}

// refreshCounters copies into nm the counters old gained since next was
// computed, for the entries that stay, and an emergency open that appeared
// on old's meta entries meanwhile (only someone outside the agent can do
// that: the agent holds d.mu). Best effort: what the programs count
// between this read and the swap is lost.
func refreshCounters(old, nm *ebpf.Map, next policyContent) error {
	keys, vals, err := dumpPolicyMap(old)
	if err != nil {
		return err
	}
	for i, k := range keys {
		o := vals[i]
		var (
			v      policyValue
			ok     bool
			opened bool
		)
		if isMeta(k) {
			dir := k.Direction & keyDirMask
			v, ok = next.meta[dir], k == metaKey(Direction(dir))
			opened = o.Flags&flagMetaOpen&^v.Flags != 0
		} else {
			v, ok = next.entries[k]
		}
		if !ok || (o.Packets == v.Packets && o.Bytes == v.Bytes && !opened) {
			continue
		}
		v.Packets, v.Bytes = o.Packets, o.Bytes
		if opened {
			v.Flags |= flagMetaOpen
		}
		if err := nm.Update(k, v, ebpf.UpdateExist); err != nil {
			return fmt.Errorf("carry counters of %v: %w", entryOf(k, v), err)
		}
	}
	return nil
}

// policyTempPin is where a new policy map is pinned before it is renamed
// over rw_policy_NNNNN: rw_policy_NNNNN_new (bpffs refuses dots in names).
// A leftover (the agent died between the two steps) is removed when the
// endpoint's map is next adopted, and by DetachEndpoint and Cleanup.
func (d *Datapath) policyTempPin(id uint16) string {
	return filepath.Join(d.opts.PinDir, policyMapName(id)+"_new")
}

// pinAs pins m under path through a clone, so m's own pinned path (which
// a rename would make stale) is never used.
func pinAs(m *ebpf.Map, path string) error {
	c, err := m.Clone()
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Pin(path)
}

// removeTempPin removes a leftover temporary pin; a missing one is fine.
func (d *Datapath) removeTempPin(id uint16) error {
	if err := os.Remove(d.policyTempPin(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove temporary pin: %w", err)
	}
	return nil
}

// swapPolicyLocked builds a new map holding next, pins it under a temporary
// name, renames that over rw_policy_NNNNN, registers it in rw_policy_maps
// and closes old. Until the rename nothing the programs or an operator see
// has changed, and any error leaves old in force and pinned. d.mu must be
// held.
func (d *Datapath) swapPolicyLocked(id uint16, old *ebpf.Map, next policyContent) (err error) {
	name := policyMapName(id)
	path := filepath.Join(d.opts.PinDir, name)
	tmp := d.policyTempPin(id)

	spec := d.inner.Copy()
	spec.Name = name
	spec.Pinning = ebpf.PinNone
	// The map in force is one rw_policy_maps accepts: the new one gets its
	// size and flags, even where the configured size differs.
	spec.MaxEntries = old.MaxEntries()
	spec.Flags = old.Flags()
	nm, err := ebpf.NewMap(spec)
	if err != nil {
		return fmt.Errorf("create new %s: %w", name, err)
	}
	pinned := false
	defer func() {
		if err != nil {
			if pinned {
				os.Remove(tmp)
			}
			nm.Close()
		}
	}()
	if err := writePolicyMap(nm, next); err != nil {
		return err
	}
	if err := refreshCounters(old, nm, next); err != nil {
		return err
	}
	if err := d.removeTempPin(id); err != nil {
		return err
	}
	if err := pinAs(nm, tmp); err != nil {
		return fmt.Errorf("pin new %s: %w", name, err)
	}
	pinned = true
	// From here the pin names the new map: a crash before the next step
	// leaves the old one in force until a restart re-registers the pin.
	if err := unix.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s over %s: %w", tmp, path, err)
	}
	pinned = false
	if err := d.maps["rw_policy_maps"].Put(uint32(id), nm); err != nil {
		err = fmt.Errorf("register new %s in rw_policy_maps: %w", name, err)
		// The old map stays in force: make the pin name it again.
		if rerr := d.repin(old, id); rerr != nil {
			d.log.Error("policy map pin names a map not in force; the next policy update or a restart makes it the one in force",
				"map", name, "err", rerr)
		}
		return err
	}
	d.policy[id] = nm
	old.Close()
	return nil
}

// repin makes rw_policy_NNNNN name m again, through the temporary pin.
func (d *Datapath) repin(m *ebpf.Map, id uint16) error {
	tmp := d.policyTempPin(id)
	if err := d.removeTempPin(id); err != nil {
		return err
	}
	if err := pinAs(m, tmp); err != nil {
		return err
	}
	if err := unix.Rename(tmp, filepath.Join(d.opts.PinDir, policyMapName(id))); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// PolicyMapID returns the kernel id of the endpoint's policy map in force
// (the one rw_policy_NNNNN names and rw_policy_maps holds). It changes
// when SetPolicy replaces the map, and only then.
func (d *Datapath) PolicyMapID(id uint16) (ebpf.MapID, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.policyMap(id)
	if err != nil {
		return 0, fmt.Errorf("policy map of endpoint %d: %w", id, err)
	}
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("policy map of endpoint %d: %w", id, err)
	}
	mid, ok := info.ID()
	if !ok {
		return 0, fmt.Errorf("policy map of endpoint %d: map id: %w", id, ebpf.ErrNotSupported)
	}
	return mid, nil
}
