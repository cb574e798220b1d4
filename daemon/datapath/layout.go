package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Map layout versions (DESIGN.md invariant 6). The version of a pin
// directory is recorded in rw_layout (an array with one u32), written
// after the maps of that version are all in place:
//
//	1  the first release (commit c484b0a): no rw_layout; rw_ct4 / rw_ct6
//	   shared by all protocols, 40-byte ct_entry without a policy revision
//	2  rw_ct{4,6}_{tcp,other} with the 48-byte ct_entry, rw_verdict_rev,
//	   rw_layout (commit 8ed9d80 and before)
//	3  this release: the 64-byte ct_entry, which keeps the next hop of a
//	   flow forwarded by host routing "bpf" (nh_*; zero in entries carried
//	   from version 2: the flow's next packet asks the FIB)
//
// A pin directory without rw_layout but with rackwire maps is version 1;
// an empty one gets the current version. A newer version than this build
// knows is refused (ErrLayoutTooNew): its maps would be misread.
//
// Migration from an older version (Open, before the agent attaches any
// endpoint; forwarding continues throughout):
//  1. every map this release uses is opened: adopted when compatible,
//     created when new (maps added by any change are simply created), or
//     re-created unpinned when its pinned spec differs but its contents
//     can be carried (same key/value layout, e.g. rw_metrics grown by a new
//     drop reason; a CT map whose values grew at their end, grownValue; or
//     a ring buffer, which holds nothing);
//  2. contents are copied into re-created maps (grown values zero at
//     their end), and the retired CT maps' entries are converted into the
//     split CT maps with revision 0, so the next non-reply packet of each
//     flow is decided by policy again;
//  3. the programs are loaded on the new maps and replace the old ones on
//     every endpoint in rw_endpoints, atomically per hook (tcx link update,
//     tc filter replace), so every packet is decided by old or new, never
//     by neither;
//  4. CT entries the old programs created in the window between 2 and 3
//     are converted or copied too (without overwriting what the new
//     programs wrote), and counters the old programs added are carried;
//     once rw_from_uplink is loaded, it replaces the old one on every
//     uplink a previous agent attached it to, and the CT entries are
//     carried once more (migrateUplinks);
//  5. the pins of re-created maps are moved to the new maps (rename over
//     the old pin), the retired maps are unpinned, and rw_layout is written.
//
// Every step can run again: an agent that dies halfway leaves the old
// version recorded, and the next start repeats what is missing.
const layoutVersion = 3

// ErrLayoutTooNew: the pin directory holds maps of a newer release.
var ErrLayoutTooNew = errors.New("pinned maps have a newer layout than this release knows")

const layoutMap = "rw_layout"

// retiredMaps are maps of older layouts this release no longer uses, with
// how their entries move into the current maps.
var retiredMaps = map[string]func(d *Datapath, old *ebpf.Map, overwrite bool) (int, error){
	"rw_ct4": func(d *Datapath, old *ebpf.Map, overwrite bool) (int, error) {
		return convertCTV1[ct4Key](d, old, "rw_ct4_tcp", "rw_ct4_other", func(k ct4Key) uint8 { return k.Proto }, overwrite)
	},
	"rw_ct6": func(d *Datapath, old *ebpf.Map, overwrite bool) (int, error) {
		return convertCTV1[ct6Key](d, old, "rw_ct6_tcp", "rw_ct6_other", func(k ct6Key) uint8 { return k.Proto }, overwrite)
	},
}

type recreatedMap struct {
	name     string
	old, new *ebpf.Map
}

type retiredMap struct {
	name string
	m    *ebpf.Map
}

// migration is what Open found to carry over.
type migration struct {
	from      int // layout version of the pin directory
	recreated []recreatedMap
	retired   []retiredMap
}

func (mg *migration) needed() bool {
	return mg.from < layoutVersion || len(mg.recreated) > 0 || len(mg.retired) > 0
}

func (mg *migration) close() {
	for _, r := range mg.recreated {
		r.old.Close()
	}
	for _, r := range mg.retired {
		r.m.Close()
	}
	mg.recreated, mg.retired = nil, nil
}

func layoutSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: layoutMap, Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
}

// ReadLayout returns the layout version of the maps pinned under pinDir:
// rw_layout's, 1 for rackwire maps without it, 0 for none.
func ReadLayout(pinDir string) (int, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, layoutMap), nil)
	if err == nil {
		defer m.Close()
		var v uint32
		if err := m.Lookup(uint32(0), &v); err != nil {
			return 0, fmt.Errorf("read %s: %w", layoutMap, err)
		}
		return int(v), nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("load pinned %s: %w", layoutMap, err)
	}
	ents, err := os.ReadDir(pinDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("read pin directory: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() && strings.HasPrefix(e.Name(), "rw_") {
			return 1, nil
		}
	}
	return 0, nil
}

// checkLayout refuses a newer layout and returns the directory's version
// (the current one for an empty directory).
func (d *Datapath) checkLayout() (int, error) {
	v, err := ReadLayout(d.opts.PinDir)
	if err != nil {
		return 0, err
	}
	if v > layoutVersion {
		return 0, fmt.Errorf("%s holds map layout version %d, this rackwired knows only up to version %d: run the release that wrote it (or a newer one); to start over with this one, stop it and run `rackwired cleanup` (removes every pin; endpoints lose enforcement until re-attached): %w",
			d.opts.PinDir, v, layoutVersion, ErrLayoutTooNew)
	}
	if v == 0 {
		v = layoutVersion
	}
	return v, nil
}

// writeLayout records the current version, creating rw_layout if needed.
func (d *Datapath) writeLayout() error {
	path := filepath.Join(d.opts.PinDir, layoutMap)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		m, err = ebpf.NewMap(layoutSpec())
		if err == nil {
			if perr := m.Pin(path); perr != nil {
				m.Close()
				return fmt.Errorf("pin %s: %w", path, perr)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), uint32(layoutVersion)); err != nil {
		return fmt.Errorf("write %s: %w", layoutMap, err)
	}
	return nil
}

// openRetired opens the retired maps still pinned.
func (d *Datapath) openRetired(mg *migration) error {
	for name := range retiredMaps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.opts.PinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("load retired map %s: %w", name, err)
		}
		mg.retired = append(mg.retired, retiredMap{name, m})
	}
	if len(mg.retired) > 0 && mg.from >= layoutVersion {
		// A directory of this version never has them: someone put them back.
		d.log.Warn("retired maps pinned under a current layout; converting them", "pin_dir", d.opts.PinDir)
	}
	return nil
}

// migrateBefore copies what can be copied before the programs change.
func (d *Datapath) migrateBefore(mg *migration) error {
	if !mg.needed() {
		return nil
	}
	d.log.Warn("migrating pinned maps", "pin_dir", d.opts.PinDir, "from_layout", mg.from, "to_layout", layoutVersion)
	for _, r := range mg.recreated {
		if isCounterMap(r.new) {
			continue // summed after the swap
		}
		n, err := copyMap(r.old, r.new, ebpf.UpdateAny)
		if err != nil {
			return fmt.Errorf("copy %s into its re-created map: %w", r.name, err)
		}
		d.log.Info("copied entries into a re-created map", "map", r.name, "entries", n)
	}
	for _, r := range mg.retired {
		n, err := retiredMaps[r.name](d, r.m, true)
		if err != nil {
			return err
		}
		d.log.Info("converted entries of a retired map", "map", r.name, "entries", n)
	}
	return nil
}

// migrateAfter swaps the programs and finishes the migration.
func (d *Datapath) migrateAfter(mg *migration) error {
	if !mg.needed() {
		return nil
	}
	n, err := d.replacePrograms()
	if err != nil {
		return err
	}
	d.log.Info("programs replaced on attached endpoints", "hooks", n)
	if err := d.carryWindow(mg); err != nil {
		return err
	}
	for _, r := range mg.recreated {
		if isCounterMap(r.new) {
			if err := addCounters(r.old, r.new); err != nil {
				return fmt.Errorf("carry counters of %s: %w", r.name, err)
			}
		}
		if err := d.movePin(r.name, r.new); err != nil {
			return err
		}
	}
	for _, r := range mg.retired {
		if err := os.Remove(filepath.Join(d.opts.PinDir, r.name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("unpin retired map %s: %w", r.name, err)
		}
	}
	d.log.Warn("pinned maps migrated", "pin_dir", d.opts.PinDir, "from_layout", mg.from, "to_layout", layoutVersion,
		"recreated", len(mg.recreated), "retired", len(mg.retired))
	return nil
}

// carryWindow carries the CT entries old programs created while this
// release's were being put in place: converted from a retired map, or
// copied from a CT map re-created with longer entries; what the new
// programs wrote stays. It runs after the endpoints' programs are swapped
// (migrateAfter) and again after the uplinks' (migrateUplinks): a flow the
// old programs started misses its entry only until the next pass, and the
// second pass writes only what the first had not seen.
func (d *Datapath) carryWindow(mg *migration) error {
	for _, r := range mg.retired {
		n, err := retiredMaps[r.name](d, r.m, false)
		if err != nil {
			return err
		}
		d.log.Info("converted entries created during the swap", "map", r.name, "entries", n)
	}
	for _, r := range mg.recreated {
		if r.old.ValueSize() >= r.new.ValueSize() {
			continue
		}
		n, err := copyMap(r.old, r.new, ebpf.UpdateNoExist)
		if err != nil {
			return fmt.Errorf("copy entries created during the swap into %s: %w", r.name, err)
		}
		d.log.Info("copied entries created during the swap", "map", r.name, "entries", n)
	}
	return nil
}

// migrateUplinks finishes a migration on the uplinks: this release's
// rw_from_uplink replaces the old one wherever a previous agent attached
// it (the pins under links/), at once rather than when the agent next sets
// its uplinks, seconds later (after the store and the endpoints). Until
// then the old program decides with the old CT maps, where the replies to
// flows the new endpoint programs start find no entry. Then the entries
// the old program created meanwhile are carried (carryWindow).
func (d *Datapath) migrateUplinks() error {
	mg := d.mig
	d.mig = nil
	if mg == nil {
		return nil
	}
	defer mg.close()
	if d.uplink != nil {
		d.mu.Lock()
		for _, name := range d.attachedUplinks() {
			if err := d.attachUplinkLocked(name); err != nil {
				d.log.Warn("cannot put this release's rw_from_uplink on an uplink yet; it is replaced when the agent sets its uplinks",
					"uplink", name, "err", err)
			}
		}
		d.mu.Unlock()
	}
	return d.carryWindow(mg)
}

// movePin makes the pin name point at m: pinned under name_new, renamed over.
func (d *Datapath) movePin(name string, m *ebpf.Map) error {
	path := filepath.Join(d.opts.PinDir, name)
	tmp := path + "_new"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove leftover %s: %w", tmp, err)
	}
	if err := pinAs(m, tmp); err != nil {
		return fmt.Errorf("pin re-created %s: %w", name, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s over %s: %w", tmp, path, err)
	}
	return nil
}

func isCounterMap(m *ebpf.Map) bool { return m.Type() == ebpf.PerCPUArray }

// grownValue reports whether a map pinned with values of old bytes may be
// re-created with values of want bytes, its entries carried with the new
// bytes zero: the CT maps from layout 2 (48-byte ct_entry) to 3 (the next
// hop appended, zero = none).
func grownValue(name string, old, want uint32) bool {
	return strings.HasPrefix(name, "rw_ct") && old == ctEntryV2Size && want == uint32(binary.Size(ctEntry{}))
}

// copyMap copies every entry of old into m (sizes permitting; a value
// shorter than m's is zero-extended) with flag; with UpdateNoExist an
// entry m holds already stays. It returns how many it wrote.
func copyMap(old, m *ebpf.Map, flag ebpf.MapUpdateFlags) (int, error) {
	if old.Type() == ebpf.RingBuf || old.Type() == ebpf.PerfEventArray {
		return 0, nil
	}
	pad := int(m.ValueSize()) - int(old.ValueSize())
	var k, v []byte
	n := 0
	it := old.Iterate()
	for it.Next(&k, &v) {
		if pad > 0 {
			v = append(v, make([]byte, pad)...)
		}
		err := m.Update(k, v, flag)
		if errors.Is(err, ebpf.ErrKeyExist) {
			continue
		}
		if err != nil {
			return n, err
		}
		n++
	}
	return n, it.Err()
}

// addCounters adds old's per-CPU counters (struct metrics_value) to m's.
func addCounters(old, m *ebpf.Map) error {
	if old.ValueSize() != 16 || m.ValueSize() != 16 {
		return fmt.Errorf("counter values of %d/%d bytes, want 16: %w", old.ValueSize(), m.ValueSize(), ErrIncompatibleMap)
	}
	for k := range min(old.MaxEntries(), m.MaxEntries()) {
		var ov, nv []metricsValue
		if err := old.Lookup(k, &ov); err != nil {
			return err
		}
		if err := m.Lookup(k, &nv); err != nil {
			return err
		}
		for cpu := range min(len(ov), len(nv)) {
			nv[cpu].Packets += ov[cpu].Packets
			nv[cpu].Bytes += ov[cpu].Bytes
		}
		if err := m.Put(k, nv); err != nil {
			return err
		}
	}
	return nil
}

// convertV1 turns a version-1 CT entry into the current one, at revision
// 0 (decided again on its next non-reply packet). Version 1 kept only the
// union of TCP flags: an ACK means established; a FIN's direction is
// unknown, so the entry stays established (it closes on the next FINs or
// RST, or after the established lifetime) rather than cut a half-closed
// connection.
func convertV1(v ctEntryV1, tcp bool) ctEntry {
	e := ctEntry{
		CreatedNS: v.CreatedNS, LastSeenNS: v.LastSeenNS, Packets: v.Packets, Bytes: v.Bytes,
		RemoteIdentity: v.RemoteIdentity, TCPFlags: v.TCPFlags,
	}
	if v.Flags != 0 {
		e.Flags |= ctFlagAudit
	}
	if tcp {
		if v.TCPFlags&tcpFlagACK != 0 {
			e.Flags |= ctFlagSeenNonSYN
		}
		if v.TCPFlags&tcpFlagRST != 0 {
			e.Flags |= ctFlagRST
		}
	}
	return e
}

// convertCTV1 converts the entries of a version-1 CT map into the TCP and
// other maps; without overwrite, entries the new maps hold already stay.
func convertCTV1[K any](d *Datapath, old *ebpf.Map, tcpMap, otherMap string, proto func(K) uint8, overwrite bool) (int, error) {
	if old.ValueSize() != 40 {
		return 0, fmt.Errorf("retired CT map has %d-byte values, want 40 (layout 1): %w", old.ValueSize(), ErrIncompatibleMap)
	}
	flag := ebpf.UpdateAny
	if !overwrite {
		flag = ebpf.UpdateNoExist
	}
	var (
		k K
		v ctEntryV1
		n int
	)
	it := old.Iterate()
	for it.Next(&k, &v) {
		tcp := proto(k) == unix.IPPROTO_TCP
		name := otherMap
		if tcp {
			name = tcpMap
		}
		err := d.maps[name].Update(k, convertV1(v, tcp), flag)
		if errors.Is(err, ebpf.ErrKeyExist) {
			continue
		}
		if err != nil {
			return n, fmt.Errorf("convert CT entry into %s: %w", name, err)
		}
		n++
	}
	if err := it.Err(); err != nil {
		return n, fmt.Errorf("read retired CT map: %w", err)
	}
	return n, nil
}

// replacePrograms puts the loaded programs on every hook rackwire has on
// the endpoints of rw_endpoints: a pinned tcx link is updated in place, a
// tc filter of rackwire's is replaced. Both are atomic per hook. It
// returns how many hooks it replaced.
func (d *Datapath) replacePrograms() (int, error) {
	eps := map[uint16]int{}
	var (
		k ipKey
		v endpointInfo
	)
	it := d.maps["rw_endpoints"].Iterate()
	for it.Next(&k, &v) {
		if v.Ifindex != 0 {
			eps[v.Endpoint] = int(v.Ifindex)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("list rw_endpoints: %w", err)
	}
	n := 0
	for id, ifindex := range eps {
		for _, a := range []struct {
			dir  Direction
			prog *ebpf.Program
		}{{Egress, d.from}, {Ingress, d.to}} {
			l, err := link.LoadPinnedLink(d.linkPin(id, a.dir), nil)
			if err == nil {
				err = l.Update(a.prog)
				l.Close()
				if err != nil {
					return n, fmt.Errorf("replace program of endpoint %d %s: %w", id, a.dir, err)
				}
				n++
				continue
			}
			if !errors.Is(err, os.ErrNotExist) {
				return n, fmt.Errorf("load link of endpoint %d %s: %w", id, a.dir, err)
			}
			has, err := hasTCFilter(ifindex, a.dir)
			if err != nil {
				d.log.Warn("endpoint veth not found; its programs are replaced when it is attached again",
					"endpoint_id", id, "ifindex", ifindex, "err", err)
				continue
			}
			if !has {
				continue
			}
			if err := attachTC(ifindex, a.dir, a.prog); err != nil {
				return n, fmt.Errorf("replace program of endpoint %d %s: %w", id, a.dir, err)
			}
			n++
		}
	}
	return n, nil
}

// hasTCFilter reports whether rackwire's tc filter is on the hook.
func hasTCFilter(ifindex int, dir Direction) (bool, error) {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, err
	}
	fs, err := netlink.FilterList(l, tcParent(dir))
	if err != nil {
		return false, err
	}
	for _, f := range fs {
		a := f.Attrs()
		if a.Handle == tcHandle && a.Priority == tcPriority {
			return true, nil
		}
	}
	return false, nil
}

// bumpRev increments rw_verdict_rev (never to 0, the revision migrated CT
// entries carry): every CT entry checked at an older revision is decided
// by policy again on its next non-reply packet. Called after every change
// that can alter a verdict; on error, established flows keep the verdict
// they had until the next successful bump.
func (d *Datapath) bumpRev() error {
	d.revMu.Lock()
	defer d.revMu.Unlock()
	m := d.maps["rw_verdict_rev"]
	var v uint32
	if err := m.Lookup(uint32(0), &v); err != nil {
		return fmt.Errorf("read rw_verdict_rev: %w", err)
	}
	v++
	if v == 0 {
		v = 1
	}
	if err := m.Put(uint32(0), v); err != nil {
		return fmt.Errorf("bump rw_verdict_rev (established flows keep their verdicts until the next change): %w", err)
	}
	return nil
}

// Revision returns the current policy revision (rw_verdict_rev).
func (d *Datapath) Revision() (uint32, error) {
	var v uint32
	if err := d.maps["rw_verdict_rev"].Lookup(uint32(0), &v); err != nil {
		return 0, fmt.Errorf("read rw_verdict_rev: %w", err)
	}
	return v, nil
}
