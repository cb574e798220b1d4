package ipcache

import (
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net/netip"
	"strings"
	"sync"
)

// Source is who wants an ipcache entry. Sources are ranked: a lower value
// ranks higher, and the map holds the wish of the highest-ranked source.
type Source uint8

// The sources, highest-ranked first.
const (
	// LocalEndpoint: an endpoint of this host (the endpoint manager).
	LocalEndpoint Source = iota + 1
	// Host: one of this host's own addresses, as the host identity.
	Host
	// RemoteEndpoint: another host's endpoint, from the store.
	RemoteEndpoint
	// RemoteNode: another host's address, from the store's node records.
	RemoteNode
	// PolicyCIDR: the CIDR identity of a prefix that a policy names.
	PolicyCIDR
)

// Unclaimed is not a source: Lookup and Stats use it for an entry found in
// the map at start (Adopt) that no source has claimed yet.
const Unclaimed Source = 0

const numSources = int(PolicyCIDR)

var sourceNames = [...]string{
	Unclaimed: "unclaimed", LocalEndpoint: "local-endpoint", Host: "host",
	RemoteEndpoint: "remote-endpoint", RemoteNode: "remote-node", PolicyCIDR: "policy-cidr",
}

// Sources lists the sources, highest-ranked first.
func Sources() []Source {
	return []Source{LocalEndpoint, Host, RemoteEndpoint, RemoteNode, PolicyCIDR}
}

// String names the source as logs and metrics show it ("remote-endpoint").
func (s Source) String() string {
	if int(s) < len(sourceNames) {
		return sourceNames[s]
	}
	return fmt.Sprintf("source(%d)", uint8(s))
}

func (s Source) valid() bool { return s >= LocalEndpoint && s <= PolicyCIDR }

// Entry is what an ipcache key maps to.
type Entry struct {
	Identity uint32
	// HostIP is the address of the node that owns the prefix; the zero
	// Addr when there is none (CIDR identities).
	HostIP netip.Addr
}

// Writer writes the datapath's ipcache maps (datapath.Datapath implements
// it). DeleteIPCache of a missing prefix is not an error. A Writer must not
// call back into the Cache.
type Writer interface {
	UpsertIPCache(p netip.Prefix, identity uint32, hostIP netip.Addr) error
	DeleteIPCache(p netip.Prefix) error
}

// QuietWriter is a Writer whose every write also makes the change take
// effect for established flows: datapath.Datapath bumps its policy
// revision, two more syscalls per write. The Cache's bulk operations
// (Replace, Apply, Prune, Retry) write their entries quietly and call
// Settle once at the end, even when some writes failed: a quiet write is
// seen by new flows at once, and established flows are checked again
// against all of the operation's entries together (a 30,000-entry list
// made 90,000 syscalls, now 30,002). A Settle that fails is tried again at
// the end of the next bulk operation and by Retry.
type QuietWriter interface {
	Writer
	UpsertIPCacheQuiet(p netip.Prefix, identity uint32, hostIP netip.Addr) error
	DeleteIPCacheQuiet(p netip.Prefix) error
	Settle() error
}

// BatchWriter is a QuietWriter that also writes many host entries (full
// length prefixes: /32, /128) in one call (datapath.Datapath: one
// BPF_MAP_UPDATE_BATCH per call, where a write is a syscall each). It
// returns how many of them, in order, it wrote before an error. The Cache
// queues the host upserts of a bulk operation and writes them in batches
// of batchSize, before any other write of the operation (a deletion or
// a shorter prefix: writes for one prefix reach the map in order) and at
// its end; what a failed batch did not write is written one by one, so
// that each failure is the prefix's own (BenchmarkIPCacheBulkWrite).
type BatchWriter interface {
	QuietWriter
	UpsertIPCacheBatchQuiet(hosts []netip.Addr, identities []uint32, hostIPs []netip.Addr) (int, error)
}

// batchSize bounds one batch write (and the Cache's queue).
const batchSize = 1024

// ErrNotReported is returned by Prune while a source has not reported yet.
var ErrNotReported = errors.New("not every ipcache source has reported yet")

// Cache is the one writer of the ipcache maps; see the package doc.
//
// Memory: the prefixes live in one map keyed by a 17-byte pointer-free key
// (the garbage collector never scans it), valued by the wish in force and a
// bit set of the sources that want the prefix (12 bytes). Host IPs are
// interned (a fleet has thousands of node addresses for hundreds of
// thousands of entries). The few prefixes that more than one source wants
// keep every source's wish in a side map. Adopted entries, a start-time
// transient, are kept apart too.
type Cache struct {
	w   Writer
	log *slog.Logger
	// quiet is w when it is a QuietWriter, else nil; batch when it is a
	// BatchWriter.
	quiet QuietWriter
	batch BatchWriter

	// mu guards every field below, and is held during map writes: writes
	// for one prefix must reach the map in the order the wishes changed,
	// or an older wish could land after a newer one. Holding the lock over
	// them is acceptable because a map write is one bpf(2) syscall of a few
	// microseconds, and nothing under the lock does store or network I/O;
	// the worst case is the first Replace of a whole store list after a
	// start without Adopt (300,000 writes, well under a second), which
	// blocks Lookup that long.
	mu sync.Mutex
	// slots: every prefix some source wants. An entry exists iff have != 0.
	slots map[pkey]slot
	// multi: every source's wish, for the prefixes (in slots) that more
	// than one source wants; indexed by Source-1.
	multi map[pkey]*[numSources]wish
	// hosts interns the host IPs of the wishes.
	hosts hostTable
	// adopted: entries the map held at start (Adopt) that no source has
	// claimed yet. A claim removes the prefix; Prune empties it.
	adopted map[pkey]Entry
	// failing: prefixes whose last map write failed. For them the map may
	// hold anything; Retry writes what is in force (or deletes).
	failing map[pkey]struct{}
	// count: the number of wishes of each source.
	count [numSources + 1]int
	// reported: the sources that reported at least once (Prune).
	reported [numSources + 1]bool
	// plen: the number of prefixes in slots per family (0: IPv4, 1:
	// IPv6) and length, so that Lookup tries only lengths in use.
	plen [2][129]uint32
	// bulk: a bulk operation is running (writes are quiet); unsettled:
	// a quiet write happened that Settle has not followed yet.
	bulk, unsettled bool
	// pend: host upserts of the bulk operation not written yet (batch).
	pend []pending
}

// pending is a queued host upsert.
type pending struct {
	k pkey
	e Entry
}

// slot is the state of one prefix: the wish in force and who wants it.
type slot struct {
	top  wish  // the wish of the highest-ranked source in have
	have uint8 // bit s-1 is set when source s has a wish
}

// wish is one source's entry, with its host IP interned.
type wish struct {
	id   uint32
	host uint32 // index in Cache.hosts; 0: no host IP
}

// New returns an empty Cache that writes through w.
func New(w Writer, log *slog.Logger) *Cache {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	q, _ := w.(QuietWriter)
	b, _ := w.(BatchWriter)
	return &Cache{
		w: w, log: log, quiet: q, batch: b,
		slots:   map[pkey]slot{},
		multi:   map[pkey]*[numSources]wish{},
		hosts:   newHostTable(),
		adopted: map[pkey]Entry{},
		failing: map[pkey]struct{}{},
	}
}

// beginBulk makes the writes until endBulk quiet. c.mu is held.
func (c *Cache) beginBulk() { c.bulk = c.quiet != nil }

// endBulk settles the quiet writes of the bulk operation. c.mu is held.
func (c *Cache) endBulk() error {
	ferr := c.flush()
	c.bulk = false
	if !c.unsettled {
		return ferr
	}
	if err := c.quiet.Settle(); err != nil {
		return errors.Join(ferr, fmt.Errorf("ipcache: make the new entries take effect for established flows (retried): %w", err))
	}
	c.unsettled = false
	return ferr
}

// flush writes the queued host upserts: in one batch, and what the batch
// did not write one by one. c.mu is held.
func (c *Cache) flush() error {
	if len(c.pend) == 0 {
		return nil
	}
	hosts := make([]netip.Addr, len(c.pend))
	ids := make([]uint32, len(c.pend))
	hostIPs := make([]netip.Addr, len(c.pend))
	for i, p := range c.pend {
		hosts[i], ids[i], hostIPs[i] = p.k.prefix().Addr(), p.e.Identity, p.e.HostIP
	}
	done, err := c.batch.UpsertIPCacheBatchQuiet(hosts, ids, hostIPs)
	done = max(0, min(done, len(c.pend)))
	if done > 0 {
		c.unsettled = true
	}
	for _, p := range c.pend[:done] {
		delete(c.failing, p.k)
	}
	var errs errList
	if err != nil {
		for _, p := range c.pend[done:] {
			errs.add(c.writeNow(p.k, p.e, true))
		}
	}
	c.pend = c.pend[:0]
	return errs.err()
}

// Upsert records src's wish for p and writes it if it is now in force.
func (c *Cache) Upsert(src Source, p netip.Prefix, e Entry) error {
	if !src.valid() {
		return fmt.Errorf("ipcache upsert %s: unknown source %d", p, src)
	}
	np, err := normalize(p)
	if err != nil {
		return fmt.Errorf("ipcache upsert: %w", err)
	}
	if e.Identity == 0 {
		return fmt.Errorf("ipcache upsert %s: identity 0 is not an identity", np)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	before := len(c.failing)
	err = c.upsert(src, keyOf(np), normHost(e))
	c.noteFailing(before)
	return err
}

// Delete withdraws src's wish for p; the next source's entry, if any, is
// written in its place, else the map entry is deleted. Deleting a wish
// src does not have is a no-op.
func (c *Cache) Delete(src Source, p netip.Prefix) error {
	if !src.valid() {
		return fmt.Errorf("ipcache delete %s: unknown source %d", p, src)
	}
	np, err := normalize(p)
	if err != nil {
		return fmt.Errorf("ipcache delete: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	before := len(c.failing)
	err = c.remove(src, keyOf(np))
	c.noteFailing(before)
	return err
}

// Replace makes src's wishes equal to set, writing only the prefixes whose
// entry in force changes. It costs O(len(set)), plus one pass over all
// prefixes when src had wishes that set no longer holds. Entries of set
// that are invalid (bad prefix, identity 0) are refused with an error; the
// rest is applied. Two keys of set that normalise to one prefix are an
// error; the lower entry (identity, then host IP) is taken.
//
// Replace counts as src's report (see MarkReported and Prune): call it
// with a complete view only (a successful store list, checked against a
// node list that was read). A source whose view is incomplete at first
// (the CIDRs of policies not all loaded yet) uses Upsert and Delete and
// calls MarkReported once it is complete.
func (c *Cache) Replace(src Source, set map[netip.Prefix]Entry) error {
	if !src.valid() {
		return fmt.Errorf("ipcache replace: unknown source %d", src)
	}
	var errs errList
	norm := set
	for p := range set {
		if np, err := normalize(p); err != nil || np != p {
			norm = normalizeSet(set, &errs)
			break
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.beginBulk()
	before := len(c.failing)
	c.reported[src] = true
	kept := 0
	for p, e := range norm {
		if e.Identity == 0 {
			errs.add(fmt.Errorf("ipcache %s: identity 0 is not an identity", p))
			continue
		}
		kept++
		errs.add(c.upsert(src, keyOf(p), normHost(e)))
	}
	if c.count[src] > kept {
		// src still has wishes that set does not hold: find them. Entries
		// refused above keep their previous wish.
		bit := uint8(1) << (src - 1)
		for k, s := range c.slots {
			if s.have&bit == 0 {
				continue
			}
			if _, ok := norm[k.prefix()]; !ok {
				errs.add(c.remove(src, k))
			}
		}
	}
	errs.add(c.endBulk())
	c.noteFailing(before)
	return errs.err()
}

// Apply withdraws src's wishes for del, then records its wishes in
// upsert, as Delete and Upsert one by one would, as one bulk operation
// (see QuietWriter). Invalid entries are refused with an error; the rest
// is applied.
func (c *Cache) Apply(src Source, upsert map[netip.Prefix]Entry, del []netip.Prefix) error {
	if !src.valid() {
		return fmt.Errorf("ipcache apply: unknown source %d", src)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.beginBulk()
	before := len(c.failing)
	var errs errList
	for _, p := range del {
		np, err := normalize(p)
		if err != nil {
			errs.add(fmt.Errorf("ipcache delete: %w", err))
			continue
		}
		errs.add(c.remove(src, keyOf(np)))
	}
	for p, e := range upsert {
		np, err := normalize(p)
		if err != nil {
			errs.add(fmt.Errorf("ipcache upsert: %w", err))
			continue
		}
		if e.Identity == 0 {
			errs.add(fmt.Errorf("ipcache upsert %s: identity 0 is not an identity", np))
			continue
		}
		errs.add(c.upsert(src, keyOf(np), normHost(e)))
	}
	errs.add(c.endBulk())
	c.noteFailing(before)
	return errs.err()
}

// MarkReported records that src has told the cache everything it wants,
// so that Prune may delete what src does not claim. Replace does it by
// itself; a source that speaks through Upsert and Delete calls it once its
// view is complete, which only the agent can tell: the endpoint manager
// after its restore, the policy sync after a pass in which every policy
// source (files and store) was loaded.
func (c *Cache) MarkReported(src Source) {
	if !src.valid() {
		return
	}
	c.mu.Lock()
	c.reported[src] = true
	c.mu.Unlock()
}

// Waiting returns the sources that have not reported yet (MarkReported),
// highest-ranked first; Prune deletes nothing until it is empty.
func (c *Cache) Waiting() []Source {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.waiting()
}

func (c *Cache) waiting() []Source {
	var out []Source
	for _, s := range Sources() {
		if !c.reported[s] {
			out = append(out, s)
		}
	}
	return out
}

// Lookup returns what the map holds, as far as the cache knows, for
// packets from or to ip: the entry of ip's own /32 or /128 if any, else of
// the longest prefix that contains it, as the datapath looks them up. The
// source is Unclaimed for an adopted entry no source has claimed yet. It
// reads memory only, never the map.
func (c *Cache) Lookup(ip netip.Addr) (Entry, Source, bool) {
	if !ip.IsValid() {
		return Entry{}, 0, false
	}
	ip = ip.Unmap().WithZone("")
	c.mu.Lock()
	defer c.mu.Unlock()
	fam := 0
	if ip.Is6() {
		fam = 1
	}
	for b := ip.BitLen(); b >= 0; b-- {
		if c.plen[fam][b] == 0 && len(c.adopted) == 0 {
			continue
		}
		k := keyOf(netip.PrefixFrom(ip, b).Masked())
		if e, src, ok := c.inForce(k); ok {
			return e, src, true
		}
	}
	return Entry{}, 0, false
}

// Adopt tells the cache what the map holds, as read at start. Entries of
// prefixes no source wants yet are kept as they are (Unclaimed) until a
// source claims them or Prune deletes them. If a source already wants an
// adopted prefix and the map holds something else, the source's entry is
// written. Call it once, before the sources start.
func (c *Cache) Adopt(existing map[netip.Prefix]Entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	before := len(c.failing)
	for p, e := range existing {
		np, err := normalize(p)
		if err != nil {
			c.log.Warn("ipcache map holds an invalid prefix; ignoring it", "prefix", p, "err", err)
			continue
		}
		k, e := keyOf(np), normHost(e)
		if _, failing := c.failing[k]; failing {
			continue // Retry writes what is in force
		}
		if s, ok := c.slots[k]; ok {
			if want := c.entry(s.top); want != e {
				_ = c.write(k, want, true)
			}
			continue
		}
		c.adopted[k] = e
	}
	c.noteFailing(before)
}

// Prune deletes the adopted entries no source has claimed, once every
// source has reported at least once (Replace or MarkReported); before that
// it deletes nothing and returns an error wrapping ErrNotReported that
// names the sources it waits for. A deletion that fails is retried by
// Retry. It returns the number of entries it deleted or handed to Retry.
//
// Adopt followed by Prune, once every source has reported, also
// reconciles a running cache with the map (entries someone else wrote are
// deleted, drifted ones rewritten); a map read that races with the sources
// is harmless, as Adopt leaves claimed prefixes to their sources.
func (c *Cache) Prune() (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var waiting []string
	for _, s := range c.waiting() {
		waiting = append(waiting, s.String())
	}
	if len(waiting) > 0 {
		return 0, fmt.Errorf("%w: waiting for %s", ErrNotReported, strings.Join(waiting, ", "))
	}
	if len(c.adopted) == 0 {
		return 0, nil
	}
	before := len(c.failing)
	var errs errList
	n := len(c.adopted)
	c.beginBulk()
	for k := range c.adopted {
		delete(c.adopted, k)
		errs.add(c.write(k, Entry{}, false))
	}
	errs.add(c.endBulk())
	c.adopted = map[pkey]Entry{} // drop the start-time buckets
	c.log.Info("ipcache entries from before the restart that no source claims were deleted", "entries", n)
	c.noteFailing(before)
	return n, errs.err()
}

// Retry writes again every prefix whose last write failed: the entry in
// force, or a deletion if no source wants the prefix. It returns the
// errors of the writes that fail again, joined (at most a few, with a
// count of the others).
func (c *Cache) Retry() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	before := len(c.failing)
	var errs errList
	c.beginBulk()
	for k := range c.failing {
		e, _, ok := c.inForce(k)
		errs.add(c.write(k, e, ok))
	}
	errs.add(c.endBulk())
	c.noteFailing(before)
	return errs.err()
}

// Failing returns the number of prefixes whose last write failed and that
// await Retry.
func (c *Cache) Failing() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.failing)
}

// Stats returns the number of prefixes each source wants (whether or not
// its wish is the one in force), and under Unclaimed the number of adopted
// entries no source has claimed.
func (c *Cache) Stats() map[Source]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[Source]int, numSources+1)
	for _, s := range Sources() {
		m[s] = c.count[s]
	}
	m[Unclaimed] = len(c.adopted)
	return m
}

// For returns a Writer that records src's wishes in the cache: a component
// written against the Writer interface (the endpoint manager) is moved
// onto the cache by handing it this instead of the datapath. Identity 0 is
// refused.
func (c *Cache) For(src Source) Writer { return sourceWriter{c: c, src: src} }

type sourceWriter struct {
	c   *Cache
	src Source
}

func (s sourceWriter) UpsertIPCache(p netip.Prefix, identity uint32, hostIP netip.Addr) error {
	return s.c.Upsert(s.src, p, Entry{Identity: identity, HostIP: hostIP})
}

func (s sourceWriter) DeleteIPCache(p netip.Prefix) error { return s.c.Delete(s.src, p) }

// upsert sets src's wish at k and writes the entry in force if it
// changed. e is normalised. c.mu is held.
func (c *Cache) upsert(src Source, k pkey, e Entry) error {
	// The common case of a whole list that did not change costs one map
	// lookup.
	s, ok := c.slots[k]
	if ok && c.hasWish(k, s, src, e) {
		return nil
	}
	var old Entry
	had, adopted := ok, false
	if ok {
		old = c.entry(s.top)
	} else if len(c.adopted) > 0 {
		old, adopted = c.adopted[k]
		had = adopted
	}
	c.setWish(k, src, e)
	if adopted {
		delete(c.adopted, k) // claimed: the map now follows the sources
	}
	now := c.entry(c.slots[k].top)
	if had && old == now {
		return nil
	}
	return c.write(k, now, true)
}

// hasWish reports whether src already wants e at k (slot s). c.mu is held.
func (c *Cache) hasWish(k pkey, s slot, src Source, e Entry) bool {
	bit := uint8(1) << (src - 1)
	if s.have&bit == 0 {
		return false
	}
	cur := s.top
	if s.have != bit {
		cur = c.multi[k][src-1]
	}
	return cur.id == e.Identity && c.hosts.addrs[cur.host] == e.HostIP
}

// remove withdraws src's wish at k and writes what is then in force (or
// deletes). c.mu is held.
func (c *Cache) remove(src Source, k pkey) error {
	s, ok := c.slots[k]
	if !ok || s.have&(1<<(src-1)) == 0 {
		return nil
	}
	old := c.entry(s.top)
	c.unsetWish(k, src)
	s, ok = c.slots[k]
	if !ok {
		return c.write(k, Entry{}, false)
	}
	if now := c.entry(s.top); now != old {
		return c.write(k, now, true)
	}
	return nil
}

// write puts e at k (or deletes k when !ok) and tracks the failure. c.mu
// is held.
func (c *Cache) write(k pkey, e Entry, ok bool) error {
	if c.bulk && c.batch != nil {
		if ok && k.prefix().Bits() == k.prefix().Addr().BitLen() {
			c.pend = append(c.pend, pending{k, e})
			if len(c.pend) >= batchSize {
				return c.flush()
			}
			return nil
		}
		// Any other write of the operation goes after the queued ones.
		if err := c.flush(); err != nil {
			return errors.Join(err, c.writeNow(k, e, ok))
		}
	}
	return c.writeNow(k, e, ok)
}

// writeNow is write without the queue.
func (c *Cache) writeNow(k pkey, e Entry, ok bool) error {
	p := k.prefix()
	var err error
	switch {
	case c.bulk && ok:
		err = c.quiet.UpsertIPCacheQuiet(p, e.Identity, e.HostIP)
	case c.bulk:
		err = c.quiet.DeleteIPCacheQuiet(p)
	case ok:
		err = c.w.UpsertIPCache(p, e.Identity, e.HostIP)
	default:
		err = c.w.DeleteIPCache(p)
	}
	if c.bulk && err == nil {
		c.unsettled = true
	}
	if err != nil {
		c.failing[k] = struct{}{}
		if ok {
			return fmt.Errorf("ipcache write %s identity %d: %w", p, e.Identity, err)
		}
		return fmt.Errorf("ipcache delete %s: %w", p, err)
	}
	delete(c.failing, k)
	return nil
}

// noteFailing logs when writes start and stop failing. c.mu is held.
func (c *Cache) noteFailing(before int) {
	switch now := len(c.failing); {
	case before == 0 && now > 0:
		c.log.Warn("ipcache writes failing; the prefixes are retried until they succeed", "failing", now)
	case before > 0 && now == 0:
		c.log.Info("ipcache writes succeed again; the map is up to date")
	}
}

// inForce returns the entry the map holds at k as far as the cache knows:
// the highest source's wish, or the adopted entry. c.mu is held.
func (c *Cache) inForce(k pkey) (Entry, Source, bool) {
	if s, ok := c.slots[k]; ok {
		return c.entry(s.top), topSource(s.have), true
	}
	if len(c.adopted) > 0 {
		if e, ok := c.adopted[k]; ok {
			return e, Unclaimed, true
		}
	}
	return Entry{}, Unclaimed, false
}

func (c *Cache) entry(w wish) Entry {
	return Entry{Identity: w.id, HostIP: c.hosts.addrs[w.host]}
}

// topSource is the highest-ranked source in a non-empty bit set.
func topSource(have uint8) Source { return Source(bits.TrailingZeros8(have) + 1) }

// setWish records src's wish e at k; it reports whether anything changed.
// c.mu is held.
func (c *Cache) setWish(k pkey, src Source, e Entry) bool {
	bit := uint8(1) << (src - 1)
	s, ok := c.slots[k]
	if !ok {
		c.slots[k] = slot{top: wish{id: e.Identity, host: c.hosts.acquire(e.HostIP)}, have: bit}
		c.count[src]++
		c.plen[k.family()][k.bits]++
		return true
	}
	if c.hasWish(k, s, src, e) {
		return false
	}
	var m *[numSources]wish
	if s.have&bit != 0 && s.have != bit {
		m = c.multi[k]
	}
	w := wish{id: e.Identity, host: c.hosts.acquire(e.HostIP)}
	switch {
	case s.have == bit: // src alone: the wish is inline
		c.hosts.release(s.top.host)
		s.top = w
	case s.have&bit != 0: // src among others
		c.hosts.release(m[src-1].host)
		m[src-1] = w
		s.top = m[topSource(s.have)-1]
	default: // src joins
		if m = c.multi[k]; m == nil {
			m = new([numSources]wish)
			m[topSource(s.have)-1] = s.top
			c.multi[k] = m
		}
		m[src-1] = w
		s.have |= bit
		s.top = m[topSource(s.have)-1]
		c.count[src]++
	}
	c.slots[k] = s
	return true
}

// unsetWish removes src's wish at k, which exists. c.mu is held.
func (c *Cache) unsetWish(k pkey, src Source) {
	bit := uint8(1) << (src - 1)
	s := c.slots[k]
	c.count[src]--
	if s.have == bit {
		c.hosts.release(s.top.host)
		delete(c.slots, k)
		c.plen[k.family()][k.bits]--
		return
	}
	m := c.multi[k]
	c.hosts.release(m[src-1].host)
	m[src-1] = wish{}
	s.have &^= bit
	s.top = m[topSource(s.have)-1]
	if bits.OnesCount8(s.have) == 1 {
		delete(c.multi, k)
	}
	c.slots[k] = s
}

// pkey is a normalised prefix without pointers: the 16-byte form of the
// address (IPv4 as ::ffff:a.b.c.d; a normalised IPv6 prefix never has that
// form) and the prefix length. 17 bytes, alignment 1.
type pkey struct {
	a    [16]byte
	bits uint8
}

func keyOf(p netip.Prefix) pkey { return pkey{a: p.Addr().As16(), bits: uint8(p.Bits())} }

func (k pkey) prefix() netip.Prefix {
	a := netip.AddrFrom16(k.a)
	if a.Is4In6() {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, int(k.bits))
}

func (k pkey) family() int {
	if netip.AddrFrom16(k.a).Is4In6() {
		return 0
	}
	return 1
}

// normalize masks p and turns an IPv4-mapped IPv6 prefix into IPv4, as the
// datapath does.
func normalize(p netip.Prefix) (netip.Prefix, error) {
	if !p.IsValid() {
		return p, fmt.Errorf("prefix %v is not valid", p)
	}
	a, n := p.Addr(), p.Bits()
	if a.Is4In6() {
		a, n = a.Unmap(), n-96
		if n < 0 {
			return p, fmt.Errorf("prefix %v mixes IPv4-mapped and IPv6 addresses", p)
		}
	}
	return netip.PrefixFrom(a, n).Masked(), nil
}

func normHost(e Entry) Entry {
	if e.HostIP.IsValid() {
		e.HostIP = e.HostIP.Unmap().WithZone("")
	}
	return e
}

// normalizeSet returns set with normalised keys. Keys that do not
// normalise are left out; two keys that normalise to one prefix keep the
// lower entry. Both are reported in errs.
func normalizeSet(set map[netip.Prefix]Entry, errs *errList) map[netip.Prefix]Entry {
	out := make(map[netip.Prefix]Entry, len(set))
	for p, e := range set {
		np, err := normalize(p)
		if err != nil {
			errs.add(fmt.Errorf("ipcache: %w", err))
			continue
		}
		if o, dup := out[np]; dup {
			errs.add(fmt.Errorf("ipcache %s: given twice (as %s and another key)", np, p))
			if !entryLess(e, o) {
				continue
			}
		}
		out[np] = e
	}
	return out
}

func entryLess(a, b Entry) bool {
	if a.Identity != b.Identity {
		return a.Identity < b.Identity
	}
	return a.HostIP.Less(b.HostIP)
}

// hostTable interns host IPs with reference counts; index 0 is "none".
type hostTable struct {
	addrs []netip.Addr
	refs  []uint32
	index map[netip.Addr]uint32
	free  []uint32
}

func newHostTable() hostTable {
	return hostTable{addrs: []netip.Addr{{}}, refs: []uint32{0}, index: map[netip.Addr]uint32{}}
}

func (h *hostTable) acquire(a netip.Addr) uint32 {
	if !a.IsValid() {
		return 0
	}
	if i, ok := h.index[a]; ok {
		h.refs[i]++
		return i
	}
	var i uint32
	if n := len(h.free); n > 0 {
		i, h.free = h.free[n-1], h.free[:n-1]
		h.addrs[i], h.refs[i] = a, 1
	} else {
		i = uint32(len(h.addrs))
		h.addrs, h.refs = append(h.addrs, a), append(h.refs, 1)
	}
	h.index[a] = i
	return i
}

func (h *hostTable) release(i uint32) {
	if i == 0 {
		return
	}
	if h.refs[i]--; h.refs[i] == 0 {
		delete(h.index, h.addrs[i])
		h.addrs[i] = netip.Addr{}
		h.free = append(h.free, i)
	}
}

// errList joins errors, keeping the first few and counting the others, so
// that 300,000 failures make a readable error.
type errList struct {
	errs []error
	more int
}

const maxErrs = 8

func (l *errList) add(err error) {
	if err == nil {
		return
	}
	if len(l.errs) < maxErrs {
		l.errs = append(l.errs, err)
		return
	}
	l.more++
}

func (l *errList) err() error {
	if l.more > 0 {
		return errors.Join(append(l.errs, fmt.Errorf("and %d more ipcache errors", l.more))...)
	}
	return errors.Join(l.errs...)
}
