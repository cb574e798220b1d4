package datapath

import (
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/bpf"
	"github.com/rackwire/rackwire/daemon/service"
)

// Service map defaults ([datapath] service_max_entries,
// service_backend_max_entries).
const (
	DefaultServiceMaxEntries        = 65536
	DefaultServiceBackendMaxEntries = 65536
)

// DefaultServiceCgroup is [datapath] service_cgroup's default: the
// cgroup-v2 root, so every process of the host is balanced. On a hybrid
// cgroup host (v1 controllers on /sys/fs/cgroup) the v2 hierarchy is at
// /sys/fs/cgroup/unified, which resolveServiceCgroup uses instead.
const DefaultServiceCgroup = "/sys/fs/cgroup"

// sockHooks are the socket load balancer's programs and their attach points.
var sockHooks = []struct {
	prog   string
	attach ebpf.AttachType
}{
	{"rw_sock_connect4", ebpf.AttachCGroupInet4Connect},
	{"rw_sock_connect6", ebpf.AttachCGroupInet6Connect},
	{"rw_sock_sendmsg4", ebpf.AttachCGroupUDP4Sendmsg},
	{"rw_sock_sendmsg6", ebpf.AttachCGroupUDP6Sendmsg},
	{"rw_sock_recvmsg4", ebpf.AttachCGroupUDP4Recvmsg},
	{"rw_sock_recvmsg6", ebpf.AttachCGroupUDP6Recvmsg},
	{"rw_sock_getpeername4", ebpf.AttachCgroupInet4GetPeername},
	{"rw_sock_getpeername6", ebpf.AttachCgroupInet6GetPeername},
}

// svcMaps are the maps of bpf/service.h, owned by this file.
var svcMaps = []string{"rw_services", "rw_svc_backends", "rw_svc_maglev", "rw_svc_revnat"}

// svcKey mirrors struct svc_key.
type svcKey struct {
	Addr   [16]byte
	Port   be16
	Proto  uint8
	Family uint8
}

// svcValue mirrors struct svc_value.
type svcValue struct {
	ID    uint32
	Count uint32
	Hash  uint32
	Local uint32 // table of the local active backends + 1; 0 none (north-south)
}

// svcAddr mirrors struct svc_addr.
type svcAddr struct {
	Addr   [16]byte
	Port   be16
	Family uint8
	Pad    uint8
}

// svcRevNATKey mirrors struct svc_revnat_key.
type svcRevNATKey struct {
	Cookie uint64
	Addr   [16]byte
	Port   be16
	Family uint8
	Pad    uint8
	Pad2   uint32
}

// rawSvcEvent mirrors struct svc_event.
type rawSvcEvent struct {
	Ev      rawEvent
	VIP     [16]byte
	VIPPort be16
	Pad     uint16
	Service uint32
	Backend uint32
	Pad2    uint32
}

func newSvcAddr(ap netip.AddrPort) svcAddr {
	k := newIPKey(ap.Addr())
	return svcAddr{Addr: k.Addr, Port: toBE16(ap.Port()), Family: k.Family}
}

func (a svcAddr) addrPort() netip.AddrPort {
	return netip.AddrPortFrom(addrFrom(a.Family, a.Addr), a.Port.uint16())
}

func newSvcKey(f service.Frontend) svcKey {
	k := newIPKey(f.VIP)
	return svcKey{Addr: k.Addr, Port: toBE16(f.Port), Proto: uint8(f.Proto), Family: k.Family}
}

func (k svcKey) frontend() service.Frontend {
	return service.Frontend{VIP: addrFrom(k.Family, k.Addr), Port: k.Port.uint16(), Proto: service.Proto(k.Proto)}
}

// svcState is what SyncServices programmed, as the agent knows it.
type svcState struct {
	mu       sync.Mutex
	adopted  bool                // services and backends read from the pinned maps
	inner    *ebpf.MapSpec       // template of one Maglev table
	empty    *ebpf.Map           // the table of every unused slot: no backend
	services map[svcKey]svcValue // rw_services as programmed
	backends map[svcAddr]uint32  // rw_svc_backends, by address
	skipped  []string            // what the last SyncServices left out, and why
	cursor   struct{ svc, be uint32 }
	progs    []*ebpf.Program
	links    []link.Link
	cgroup   string // the cgroup the hooks are attached to; "" none
}

// resolveServiceCgroup returns the cgroup-v2 directory to attach to, or
// an error that says what to configure.
func resolveServiceCgroup(path string) (string, error) {
	isV2 := func(p string) bool {
		var st unix.Statfs_t
		return unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
	}
	if isV2(path) {
		return path, nil
	}
	if filepath.Clean(path) == DefaultServiceCgroup && isV2(DefaultServiceCgroup+"/unified") {
		return DefaultServiceCgroup + "/unified", nil
	}
	return "", fmt.Errorf(`[datapath] service_cgroup = %q is not a cgroup-v2 directory: set it to the cgroup2 mount (see "grep cgroup2 /proc/mounts") or a cgroup below it, or to "" to turn service load balancing off`, path)
}

// openServices creates or adopts the service maps and, when
// Options.ServiceCgroup is set, loads the socket load balancer and
// attaches it to that cgroup through pinned links (links/rw_sock_*), so
// it keeps balancing while the agent is down. A pinned link of another
// cgroup (the config changed) is replaced.
func (d *Datapath) openServices() error {
	spec, err := bpf.LoadSockLB()
	if err != nil {
		return fmt.Errorf("parse sock_lb object: %w", err)
	}
	haveRetval := features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval) == nil
	for name, v := range map[string]any{
		"rw_events_perf":     boolByte(d.events == EventsPerf),
		"rw_event_rate":      uint64(d.opts.EventRate),
		"rw_event_burst":     uint64(d.opts.EventBurst),
		"rw_have_set_retval": boolByte(haveRetval),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	if d.events == EventsPerf {
		perfEvents(spec.Maps["rw_events"])
	}
	sizes := map[string]int{
		"rw_services":     d.opts.ServiceMaxEntries,
		"rw_svc_maglev":   4 * d.opts.ServiceMaxEntries, // old and new tables (all and local backends) of every service during a sync
		"rw_svc_backends": d.opts.ServiceBackendMaxEntries,
	}
	for name, ms := range spec.Maps {
		if m, ok := d.maps[name]; ok {
			ms.MaxEntries, ms.Flags = m.MaxEntries(), m.Flags()
			continue
		}
		if !slices.Contains(svcMaps, name) {
			continue
		}
		n, configured := sizes[name]
		if configured {
			ms.MaxEntries = uint32(n)
		}
		m, old, err := d.openPinned(name, ms, configured)
		if err != nil {
			return err
		}
		if old != nil {
			// A service map of another layout: its contents are the
			// agent's to re-write (SyncServices), so it starts empty.
			old.Close()
			path := filepath.Join(d.opts.PinDir, name)
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				m.Close()
				return fmt.Errorf("unpin %s: %w", path, err)
			}
			if err := m.Pin(path); err != nil {
				m.Close()
				return fmt.Errorf("pin %s: %w", path, err)
			}
		}
		d.maps[name] = m
		ms.MaxEntries, ms.Flags = m.MaxEntries(), m.Flags()
	}
	d.svc.inner = spec.Maps["rw_svc_maglev"].InnerMap.Copy()
	empty := d.svc.inner.Copy()
	empty.Name = "rw_svc_maglev_0"
	if d.svc.empty, err = ebpf.NewMap(empty); err != nil {
		return fmt.Errorf("create the empty Maglev table: %w", err)
	}
	if d.opts.ServiceCgroup == "" {
		return nil
	}
	cg, err := resolveServiceCgroup(d.opts.ServiceCgroup)
	if err != nil {
		return err
	}
	repl := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		if m, ok := d.maps[name]; ok {
			repl[name] = m
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load sock_lb: %+v", ve)
		}
		return fmt.Errorf("load sock_lb: %w", err)
	}
	defer coll.Close()
	cgID, err := cgroupID(cg)
	if err != nil {
		return err
	}
	for _, h := range sockHooks {
		p := coll.DetachProgram(h.prog)
		if p == nil {
			return fmt.Errorf("load sock_lb: program %s missing from object", h.prog)
		}
		d.svc.progs = append(d.svc.progs, p)
		l, err := d.attachSockHook(cg, cgID, h.prog, h.attach, p)
		if err != nil {
			return err
		}
		d.svc.links = append(d.svc.links, l)
	}
	d.svc.cgroup = cg
	d.log.Info("socket load balancing attached", "cgroup", cg, "connect_refused", haveRetval)
	return nil
}

func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("service cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// attachSockHook replaces the program of the pinned link links/<prog>
// when it is attached to cgroup cgID, and otherwise attaches a new link
// and pins it there.
func (d *Datapath) attachSockHook(cg string, cgID uint64, prog string, attach ebpf.AttachType, p *ebpf.Program) (link.Link, error) {
	pin := filepath.Join(d.opts.PinDir, "links", prog)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if c := info.Cgroup(); ierr == nil && c != nil && c.CgroupId == cgID {
			if err := l.Update(p); err != nil {
				l.Close()
				return nil, fmt.Errorf("replace program of %s: %w", pin, err)
			}
			return l, nil
		}
		// Another cgroup (service_cgroup changed): detach that one.
		l.Unpin()
		l.Close()
		d.log.Info("socket load balancing moves to another cgroup", "hook", prog, "cgroup", cg)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: attach, Program: p})
	if errors.Is(err, unix.E2BIG) {
		return nil, fmt.Errorf("attach %s to cgroup %s: the cgroup has the kernel's maximum of 64 programs on this hook already (other agents, or other rackwired instances on one machine, attach there too): give this rackwired a cgroup of its own with [datapath] service_cgroup, or set it to \"\" to turn service load balancing off: %w", prog, cg, err)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s to cgroup %s: %w", prog, cg, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin %s: %w (cgroup links need kernel 5.7+)", pin, err)
	}
	return l, nil
}

// DetachServices removes the socket load balancer's links (the hooks
// detach); the service maps stay. For `service_cgroup = ""` after it was
// set, and for tests.
func (d *Datapath) DetachServices() error {
	d.svc.mu.Lock()
	defer d.svc.mu.Unlock()
	var errs []error
	for _, l := range d.svc.links {
		if err := l.Unpin(); err != nil {
			errs = append(errs, err)
		}
		l.Close()
	}
	d.svc.links = nil
	for _, h := range sockHooks {
		if err := os.Remove(filepath.Join(d.opts.PinDir, "links", h.prog)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	d.svc.cgroup = ""
	return errors.Join(errs...)
}

func (d *Datapath) closeServices() {
	if d.svc.empty != nil {
		d.svc.empty.Close()
		d.svc.empty = nil
	}
	for _, l := range d.svc.links {
		l.Close()
	}
	for _, p := range d.svc.progs {
		p.Close()
	}
	d.svc.links, d.svc.progs = nil, nil
}

// ServiceCgroup is the cgroup the socket load balancer is attached to,
// "" when it is not.
func (d *Datapath) ServiceCgroup() string {
	d.svc.mu.Lock()
	defer d.svc.mu.Unlock()
	return d.svc.cgroup
}

// desiredService is one service as SyncServices will program it.
type desiredService struct {
	name     string
	backends []svcAddr // active, valid, distinct, sorted by address
	local    []svcAddr // those of backends that run on this host (Backend.Local)
	hash     uint32    // of backends and which are local
}

// desiredServices validates t: a frontend that cannot be programmed (bad
// VIP, port 0, a protocol other than TCP and UDP, a second service of one
// frontend) is left out; so is an active backend that is invalid (bad
// address, port 0, another family than the VIP); beyond maglevMaxBackends
// active backends only the first (by address) are used. What is left out
// is listed in skipped.
func desiredServices(t service.Table) (map[svcKey]desiredService, []string) {
	out := make(map[svcKey]desiredService, len(t.Services))
	var skipped []string
	for _, s := range t.Services {
		f := s.Frontend
		vip := f.VIP.Unmap()
		switch {
		case !vip.IsValid() || vip.Zone() != "" || vip.IsUnspecified() || vip.IsMulticast():
			skipped = append(skipped, fmt.Sprintf("service %q: VIP %v is not a unicast address", s.Name, f.VIP))
			continue
		case f.Port == 0:
			skipped = append(skipped, fmt.Sprintf("service %q (%s): port 0", s.Name, f))
			continue
		case f.Proto != service.TCP && f.Proto != service.UDP:
			skipped = append(skipped, fmt.Sprintf("service %q (%s): protocol %s, want tcp or udp", s.Name, f, f.Proto))
			continue
		}
		f.VIP = vip
		k := newSvcKey(f)
		if _, dup := out[k]; dup {
			skipped = append(skipped, fmt.Sprintf("service %q (%s): a second service with this frontend", s.Name, f))
			continue
		}
		seen := map[svcAddr]bool{}
		isLocal := map[svcAddr]bool{}
		var bes []svcAddr
		for _, b := range s.Active() {
			a := b.Addr.Unmap()
			switch {
			case !a.IsValid() || a.Zone() != "" || a.IsUnspecified() || a.IsMulticast():
				skipped = append(skipped, fmt.Sprintf("service %q (%s): backend %v is not a unicast address", s.Name, f, b.Addr))
				continue
			case a.Is4() != vip.Is4():
				skipped = append(skipped, fmt.Sprintf("service %q (%s): backend %s is of another address family than the VIP", s.Name, f, b.AddrPort()))
				continue
			case b.Port == 0:
				skipped = append(skipped, fmt.Sprintf("service %q (%s): backend %s has port 0", s.Name, f, a))
				continue
			}
			sa := newSvcAddr(netip.AddrPortFrom(a, b.Port))
			if !seen[sa] {
				seen[sa] = true
				bes = append(bes, sa)
			}
			if b.Local {
				isLocal[sa] = true
			}
		}
		slices.SortFunc(bes, func(x, y svcAddr) int { return x.addrPort().Compare(y.addrPort()) })
		if len(bes) > maglevMaxBackends {
			skipped = append(skipped, fmt.Sprintf("service %q (%s): %d active backends, at most %d are used (the first by address)", s.Name, f, len(bes), maglevMaxBackends))
			bes = bes[:maglevMaxBackends]
		}
		h := fnv.New32a()
		var local []svcAddr
		for _, b := range bes {
			h.Write([]byte(b.addrPort().String()))
			if isLocal[b] {
				local = append(local, b)
				h.Write([]byte{'L'})
			}
			h.Write([]byte{0})
		}
		out[k] = desiredService{name: s.Name, backends: bes, local: local, hash: h.Sum32()}
	}
	return out, skipped
}

// svcTx undoes what a failed SyncServices changed, newest first.
type svcTx struct{ undo []func() }

func (tx *svcTx) add(f func()) { tx.undo = append(tx.undo, f) }

func (tx *svcTx) rollback() {
	for i := len(tx.undo) - 1; i >= 0; i-- {
		tx.undo[i]()
	}
}

// SyncServices programs t, the whole service table, into the service maps
// (it implements service.Sink). Each frontend's active backends receive
// new connections, chosen by the frontend's Maglev table; a frontend
// without one refuses them (ECONNREFUSED, drop reason "no service
// backend"). It diffs against what is programmed: an unchanged service
// is not touched (so calling it again with the same table changes
// nothing), a changed one gets a new Maglev table swapped in whole. It
// never touches a socket that already chose its backend.
//
// Invalid parts of t are left out, logged and listed by SkippedServices
// (see desiredServices); they never fail the call. It fails, changing
// nothing, when t needs more services or backends than the maps hold,
// and when the kernel refuses an update, in which case everything it
// changed is put back: the previous table stays in force.
func (d *Datapath) SyncServices(t service.Table) error {
	d.svc.mu.Lock()
	defer d.svc.mu.Unlock()
	svcs, bes, outer := d.maps["rw_services"], d.maps["rw_svc_backends"], d.maps["rw_svc_maglev"]
	if svcs == nil || bes == nil || outer == nil {
		return errors.New("service maps are not open")
	}
	if err := d.adoptServices(); err != nil {
		return err
	}
	want, skipped := desiredServices(t)
	for _, s := range skipped {
		d.log.Warn("service left out", "why", s)
	}
	d.svc.skipped = skipped
	nTables := 0 // Maglev tables wanted: all active backends, and the local ones
	for _, s := range want {
		nTables += min(len(s.backends), 1) + min(len(s.local), 1)
	}
	if len(want) > int(svcs.MaxEntries()) || 2*nTables > int(outer.MaxEntries()) {
		return fmt.Errorf("%d services (%d Maglev tables), the service maps hold %d (%d tables during a sync): raise [datapath] service_max_entries (and restart after cleanup)", len(want), nTables, svcs.MaxEntries(), outer.MaxEntries()/2)
	}
	used := map[svcAddr]bool{}
	for _, s := range want {
		for _, b := range s.backends {
			used[b] = true
		}
	}
	if len(used) > int(bes.MaxEntries()) {
		return fmt.Errorf("%d distinct backends, rw_svc_backends holds %d: raise [datapath] service_backend_max_entries", len(used), bes.MaxEntries())
	}

	tx := &svcTx{}
	services := maps.Clone(d.svc.services)
	backends := maps.Clone(d.svc.backends)
	fail := func(err error) error {
		tx.rollback()
		return err
	}
	// 1. New backends, before any table names them.
	beIDs := map[uint32]bool{}
	for _, id := range backends {
		beIDs[id] = true
	}
	for b := range used {
		if _, ok := backends[b]; ok {
			continue
		}
		id, ok := allocID(beIDs, &d.svc.cursor.be, 1, bes.MaxEntries())
		if !ok {
			return fail(errors.New("no free backend id"))
		}
		if err := bes.Put(id, b); err != nil {
			return fail(fmt.Errorf("write backend %s: %w", b.addrPort(), err))
		}
		backends[b] = id
		tx.add(func() { bes.Delete(id) })
	}
	// 2. A new table for every new or changed service, in a slot no
	// programmed service uses: nothing in force changes yet.
	tableIDs := map[uint32]bool{}
	for _, v := range services {
		if v.Count > 0 {
			tableIDs[v.ID] = true
		}
		if v.Local > 0 {
			tableIDs[v.Local-1] = true
		}
	}
	keys := make([]svcKey, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, compareSvcKey)
	type change struct {
		k      svcKey
		nv     svcValue
		old    svcValue
		exists bool
	}
	var changes []change
	var tables []pendingTable
	for _, k := range keys {
		w := want[k]
		old, exists := services[k]
		nv := svcValue{ID: noTable, Count: uint32(len(w.backends)), Hash: w.hash}
		if exists && old.Count == nv.Count && old.Hash == nv.Hash {
			continue
		}
		if nv.Count > 0 {
			id, ok := allocID(tableIDs, &d.svc.cursor.svc, 0, outer.MaxEntries())
			if !ok {
				return fail(errors.New("no free Maglev table slot"))
			}
			nv.ID = id
			tables = append(tables, pendingTable{id: id, backends: w.backends})
		}
		if len(w.local) > 0 {
			id, ok := allocID(tableIDs, &d.svc.cursor.svc, 0, outer.MaxEntries())
			if !ok {
				return fail(errors.New("no free Maglev table slot"))
			}
			nv.Local = id + 1
			tables = append(tables, pendingTable{id: id, backends: w.local})
		}
		changes = append(changes, change{k, nv, old, exists})
	}
	if err := d.installTables(tx, outer, tables, backends); err != nil {
		return fail(err)
	}
	// 3. Frontends: each switches to its new table in one update.
	var retired []uint32
	for _, c := range changes {
		if err := svcs.Put(c.k, c.nv); err != nil {
			return fail(fmt.Errorf("write service %s: %w", c.k.frontend(), err))
		}
		if c.exists {
			tx.add(func() { svcs.Put(c.k, c.old) })
			retired = append(retired, c.old.tables()...)
		} else {
			tx.add(func() { svcs.Delete(c.k) })
		}
		services[c.k] = c.nv
	}
	// 4. Services gone.
	for k, v := range services {
		if _, ok := want[k]; ok {
			continue
		}
		if err := svcs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fail(fmt.Errorf("delete service %s: %w", k.frontend(), err))
		}
		tx.add(func() { svcs.Put(k, v) })
		retired = append(retired, v.tables()...)
		delete(services, k)
	}
	// 5. Backends no table names any more.
	for b, id := range backends {
		if used[b] {
			continue
		}
		if err := bes.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fail(fmt.Errorf("delete backend %s: %w", b.addrPort(), err))
		}
		tx.add(func() { bes.Put(id, b) })
		delete(backends, b)
	}
	d.svc.services, d.svc.backends = services, backends
	// Committed. The retired tables are no longer named by any frontend;
	// a slot that cannot be cleared is simply reused later.
	if err := d.clearTables(outer, retired); err != nil {
		d.log.Warn("clear retired Maglev tables", "err", err, "tables", len(retired))
	}
	return nil
}

// noTable is svc_value.id of a frontend without active backends.
const noTable = ^uint32(0)

// tables lists the rw_svc_maglev slots v names.
func (v svcValue) tables() []uint32 {
	var out []uint32
	if v.Count > 0 {
		out = append(out, v.ID)
	}
	if v.Local > 0 {
		out = append(out, v.Local-1)
	}
	return out
}

// tableBatch is how many Maglev tables are built before they are put in
// rw_svc_maglev in one batch: every update of a map-in-map waits for an
// RCU grace period (milliseconds), so one at a time would make 10,000
// services take minutes; a batch waits once.
const tableBatch = 512

type pendingTable struct {
	id       uint32
	backends []svcAddr
}

// installTables builds each pending table in a new map and puts them in
// rw_svc_maglev, batch by batch (undo: clear those slots).
func (d *Datapath) installTables(tx *svcTx, outer *ebpf.Map, tables []pendingTable, ids map[svcAddr]uint32) error {
	for len(tables) > 0 {
		chunk := tables[:min(tableBatch, len(tables))]
		tables = tables[len(chunk):]
		var open []*ebpf.Map
		closeAll := func() {
			for _, m := range open {
				m.Close()
			}
		}
		keys := make([]uint32, 0, len(chunk))
		fds := make([]uint32, 0, len(chunk))
		for _, pt := range chunk {
			m, err := d.newMaglevMap(pt.backends, ids)
			if err != nil {
				closeAll()
				return err
			}
			open = append(open, m)
			keys = append(keys, pt.id)
			fds = append(fds, uint32(m.FD()))
		}
		tx.add(func() { d.clearTables(outer, keys) })
		if _, err := outer.BatchUpdate(keys, fds, nil); err != nil {
			for i := range keys { // kernels without batch operations (5.6+)
				if err := outer.Put(keys[i], open[i]); err != nil {
					closeAll()
					return fmt.Errorf("install Maglev table: %w", err)
				}
			}
		}
		closeAll()
	}
	return nil
}

// clearTables points slots of rw_svc_maglev at the shared empty table
// (every slot 0: no backend), which frees the tables they held. Not a
// delete: array-of-maps has no batch delete, and one delete at a time
// waits an RCU grace period each.
func (d *Datapath) clearTables(outer *ebpf.Map, ids []uint32) error {
	if len(ids) == 0 {
		return nil
	}
	fds := make([]uint32, len(ids))
	for i := range fds {
		fds[i] = uint32(d.svc.empty.FD())
	}
	if _, err := outer.BatchUpdate(ids, fds, nil); err == nil {
		return nil
	}
	var errs []error
	for _, id := range ids {
		if err := outer.Put(id, d.svc.empty); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// newMaglevMap returns a new map holding the Maglev table of bes.
func (d *Datapath) newMaglevMap(bes []svcAddr, ids map[svcAddr]uint32) (*ebpf.Map, error) {
	names := make([]string, len(bes))
	for i, b := range bes {
		names[i] = b.addrPort().String()
	}
	table := maglevTable(names, maglevM)
	spec := d.svc.inner.Copy()
	spec.Name = "rw_svc_maglev_t"
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return nil, fmt.Errorf("create Maglev table: %w", err)
	}
	slots := make([]uint32, len(table))
	vals := make([]uint32, len(table))
	for i, j := range table {
		slots[i], vals[i] = uint32(i), ids[bes[j]]
	}
	if _, err := m.BatchUpdate(slots, vals, nil); err != nil {
		for i := range slots { // kernels without batch operations
			if err := m.Put(slots[i], vals[i]); err != nil {
				m.Close()
				return nil, fmt.Errorf("fill Maglev table: %w", err)
			}
		}
	}
	return m, nil
}

// innerMap opens the table in rw_svc_maglev[id], nil when there is none.
func innerMap(outer *ebpf.Map, id uint32) *ebpf.Map {
	var mapID uint32
	if err := outer.Lookup(id, &mapID); err != nil || mapID == 0 {
		return nil
	}
	// (the shared empty table reads as a table without backends)
	m, err := ebpf.NewMapFromID(ebpf.MapID(mapID))
	if err != nil {
		return nil
	}
	return m
}

// adoptServices reads what an earlier agent programmed, once.
func (d *Datapath) adoptServices() error {
	if d.svc.adopted {
		return nil
	}
	services := map[svcKey]svcValue{}
	var k svcKey
	var v svcValue
	it := d.maps["rw_services"].Iterate()
	for it.Next(&k, &v) {
		services[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read rw_services: %w", err)
	}
	backends := map[svcAddr]uint32{}
	var id uint32
	var a svcAddr
	it = d.maps["rw_svc_backends"].Iterate()
	for it.Next(&id, &a) {
		backends[a] = id
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read rw_svc_backends: %w", err)
	}
	d.svc.services, d.svc.backends, d.svc.adopted = services, backends, true
	return nil
}

// SkippedServices lists what the last SyncServices left out of its table
// and why (also logged at warn level).
func (d *Datapath) SkippedServices() []string {
	d.svc.mu.Lock()
	defer d.svc.mu.Unlock()
	return slices.Clone(d.svc.skipped)
}

// ProgrammedService is one frontend as the maps hold it.
type ProgrammedService struct {
	Frontend service.Frontend `json:"frontend"`
	ID       uint32           `json:"id"`
	Backends []netip.AddrPort `json:"backends"`                 // active backends, by address
	Local    []netip.AddrPort `json:"local_backends,omitempty"` // those on this host: north-south
}

// Services reads the programmed services back from the maps (rw_services,
// the Maglev tables, rw_svc_backends), sorted by frontend: what the
// kernel balances, not what the agent meant to write.
func (d *Datapath) Services() ([]ProgrammedService, error) {
	d.svc.mu.Lock()
	defer d.svc.mu.Unlock()
	addrs := map[uint32]netip.AddrPort{}
	var id uint32
	var a svcAddr
	it := d.maps["rw_svc_backends"].Iterate()
	for it.Next(&id, &a) {
		addrs[id] = a.addrPort()
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read rw_svc_backends: %w", err)
	}
	var out []ProgrammedService
	var k svcKey
	var v svcValue
	it = d.maps["rw_services"].Iterate()
	for it.Next(&k, &v) {
		ps := ProgrammedService{Frontend: k.frontend(), ID: v.ID}
		if v.Count > 0 {
			ps.Backends = tableBackends(d.maps["rw_svc_maglev"], v.ID, addrs)
		}
		if v.Local > 0 {
			ps.Local = tableBackends(d.maps["rw_svc_maglev"], v.Local-1, addrs)
		}
		out = append(out, ps)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read rw_services: %w", err)
	}
	slices.SortFunc(out, func(x, y ProgrammedService) int {
		return strings.Compare(x.Frontend.String(), y.Frontend.String())
	})
	return out, nil
}

// tableBackends reads the distinct backends of Maglev table id, sorted.
func tableBackends(outer *ebpf.Map, id uint32, addrs map[uint32]netip.AddrPort) []netip.AddrPort {
	m := innerMap(outer, id)
	if m == nil {
		return nil
	}
	defer m.Close()
	var out []netip.AddrPort
	seen := map[uint32]bool{}
	var slot, bid uint32
	mi := m.Iterate()
	for mi.Next(&slot, &bid) {
		if !seen[bid] {
			seen[bid] = true
			if ap, ok := addrs[bid]; ok {
				out = append(out, ap)
			}
		}
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return out
}

// allocID takes a free id in [lo, hi) starting at the cursor.
func allocID(used map[uint32]bool, cursor *uint32, lo, hi uint32) (uint32, bool) {
	n := hi - lo
	for range n {
		id := lo + *cursor%n
		*cursor++
		if !used[id] {
			used[id] = true
			return id, true
		}
	}
	return 0, false
}

func compareSvcKey(a, b svcKey) int {
	fa, fb := a.frontend(), b.frontend()
	if c := fa.VIP.Compare(fb.VIP); c != 0 {
		return c
	}
	if fa.Port != fb.Port {
		return int(fa.Port) - int(fb.Port)
	}
	return int(fa.Proto) - int(fb.Proto)
}
