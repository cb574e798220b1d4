package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/rackwire/rackwire/bpf"
	"github.com/rackwire/rackwire/daemon/config"
)

// Errors callers test with errors.Is.
var (
	// ErrNoBPFFS: the pin directory is not on a bpf filesystem and mounting one failed.
	ErrNoBPFFS = errors.New("pin directory is not on bpffs")
	// ErrIncompatibleMap: a pinned map has another type or key/value size than
	// this build expects; it is never re-created behind the operator's back.
	ErrIncompatibleMap = errors.New("pinned map is incompatible (run cleanup to re-create)")
	// ErrUnknownEndpoint: no policy map exists for the endpoint id.
	ErrUnknownEndpoint = errors.New("unknown endpoint")
	// ErrInvalidEntry: a policy entry that cannot be encoded.
	ErrInvalidEntry = errors.New("invalid policy entry")
	// ErrPolicyTooLarge: a policy needs more keys (with the two meta
	// entries) than the endpoint's map holds; the policy in force stays.
	ErrPolicyTooLarge = errors.New("policy does not fit the policy map")
)

// Attach modes.
const (
	AttachAuto = "auto"
	AttachTCX  = "tcx"
	AttachTC   = "tc"
)

// Event transports ([datapath] events).
const (
	EventsAuto    = "auto"
	EventsRingBuf = "ringbuf"
	EventsPerf    = "perf"
)

// Event limiter defaults ([datapath] events_rate, events_burst).
const (
	DefaultEventRate  = 100
	DefaultEventBurst = 1000
)

// Options configure Open. Zero sizes take the defaults in docs/datapath.md "Maps".
type Options struct {
	PinDir      string // default /sys/fs/bpf/rackwire
	Attach      string // "auto" (tcx when the kernel has it), "tcx" or "tc"
	Audit       bool   // forward what policy would drop, and report it
	TraceSample uint32 // report 1 in N new flows as trace events; 0 = none
	// NoRedirectPeer keeps local endpoint-to-endpoint traffic on the host
	// stack even where the kernel has bpf_redirect_peer (Features().RedirectPeer);
	// by default such traffic is decided for both endpoints in the sender's
	// program and redirected straight into the receiver's namespace.
	NoRedirectPeer bool
	// HostRouting is "auto" (default: "bpf" where the kernel has the
	// helpers), "bpf" (refused where it lacks them) or "legacy": whether
	// traffic to and from other hosts takes the BPF fast path (hostrt.go).
	HostRouting string
	// Idle time after which a CT entry no longer counts and policy decides
	// again; zero takes the default: established TCP 6h, TCP that saw only
	// SYNs 60s, TCP after a FIN both ways or an RST 10s, other 60s.
	CTTimeoutTCP, CTTimeoutTCPSYN, CTTimeoutClose, CTTimeoutOther time.Duration
	CTMaxEntries                                                  int // each TCP CT map (rw_ct4_tcp, rw_ct6_tcp)
	CTOtherMaxEntries                                             int // each non-TCP CT map (rw_ct4_other, rw_ct6_other)
	PolicyMaxEntries                                              int
	IPCacheMaxEntries                                             int
	// FragMaxEntries sizes rw_frag, the first fragments whose later
	// fragments may still come (default 8192).
	FragMaxEntries int
	// Events is the event transport: "auto" (ring buffer where the kernel
	// has it, else perf event array), "ringbuf" or "perf".
	Events string
	// EventRate and EventBurst are each endpoint's event budget: events
	// per second and bucket size; zero takes the defaults.
	EventRate, EventBurst uint32
	// ServiceCgroup is the cgroup-v2 directory the socket load balancer
	// (service VIPs, service.go) attaches to; "" attaches nothing (the
	// service maps still exist and SyncServices programs them).
	ServiceCgroup string
	// ServiceMaxEntries sizes rw_services and rw_svc_maglev (frontends),
	// ServiceBackendMaxEntries rw_svc_backends (distinct backends).
	ServiceMaxEntries, ServiceBackendMaxEntries int
}

// OptionsFromConfig maps the [datapath] config section to Options.
func OptionsFromConfig(c config.Datapath) Options {
	return Options{
		PinDir:            c.PinDir,
		Attach:            c.Attach,
		Audit:             c.PolicyAuditMode,
		CTMaxEntries:      c.CTMaxEntries,
		CTOtherMaxEntries: c.CTOtherMaxEntries,
		CTTimeoutTCP:      c.CTTimeoutTCP.Duration,
		CTTimeoutTCPSYN:   c.CTTimeoutTCPSYN.Duration,
		CTTimeoutClose:    c.CTTimeoutTCPClose.Duration,
		CTTimeoutOther:    c.CTTimeoutOther.Duration,
		PolicyMaxEntries:  c.PolicyMaxEntries,
		IPCacheMaxEntries: c.IPCacheMaxEntries,
		FragMaxEntries:    c.FragMaxEntries,
		Events:            c.Events,
		EventRate:         c.EventsRate,
		EventBurst:        c.EventsBurst,
		HostRouting:       c.HostRouting,

		ServiceCgroup:            c.ServiceCgroup,
		ServiceMaxEntries:        c.ServiceMaxEntries,
		ServiceBackendMaxEntries: c.ServiceBackendMaxEntries,
	}
}

func (o *Options) defaults() error {
	if o.PinDir == "" {
		o.PinDir = "/sys/fs/bpf/rackwire"
	}
	if o.Attach == "" {
		o.Attach = AttachAuto
	}
	switch o.Attach {
	case AttachAuto, AttachTCX, AttachTC:
	default:
		return fmt.Errorf("attach mode %q: want auto, tcx or tc", o.Attach)
	}
	if o.HostRouting == "" {
		o.HostRouting = HostRoutingAuto // chooseHostRouting refuses unknown modes
	}
	if o.Events == "" {
		o.Events = EventsAuto // chooseEvents refuses unknown modes
	}
	if o.EventRate == 0 {
		o.EventRate = DefaultEventRate
	}
	if o.EventBurst == 0 {
		o.EventBurst = DefaultEventBurst
	}
	if o.CTMaxEntries <= 0 {
		o.CTMaxEntries = 524288
	}
	if o.CTOtherMaxEntries <= 0 {
		o.CTOtherMaxEntries = 262144
	}
	if o.PolicyMaxEntries <= 0 {
		o.PolicyMaxEntries = 16384
	}
	if o.IPCacheMaxEntries <= 0 {
		o.IPCacheMaxEntries = 524288
	}
	if o.FragMaxEntries <= 0 {
		o.FragMaxEntries = 8192
	}
	if o.ServiceMaxEntries <= 0 {
		o.ServiceMaxEntries = DefaultServiceMaxEntries
	}
	if o.ServiceBackendMaxEntries <= 0 {
		o.ServiceBackendMaxEntries = DefaultServiceBackendMaxEntries
	}
	return nil
}

// Datapath owns the pinned maps and the loaded programs.
type Datapath struct {
	opts     Options
	log      *slog.Logger
	features Features
	mode     string // attach mode in use: tcx or tc
	// events is the event transport in force (EventsRingBuf or EventsPerf)
	// and eventsWhy the reason it was chosen.
	events, eventsWhy string
	// hostRouting is the host routing mode in force (HostRoutingBPF or
	// HostRoutingLegacy) and hostRoutingWhy the reason it was chosen.
	hostRouting, hostRoutingWhy string

	maps     map[string]*ebpf.Map // rw_* maps by name, pinned
	from, to *ebpf.Program
	uplink   *ebpf.Program // rw_from_uplink; nil when it failed to load (uplinkErr)
	// uplinkErr is why rw_from_uplink is not loaded (host routing "legacy" only).
	uplinkErr error
	inner     *ebpf.MapSpec // template of rw_policy_NNNNN
	// mig is a migration of the pin directory's layout (layout.go), kept
	// from load until the uplinks carry this release's rw_from_uplink
	// (migrateUplinks); nil when there was none or it is done.
	mig *migration

	// mu guards policy, the open per-endpoint policy maps, and serialises
	// read-modify-write of their meta entries.
	mu     sync.Mutex
	policy map[uint16]*ebpf.Map

	// northSouth: rw_from_uplink goes on the uplinks for north-south
	// balancing even with host routing "legacy" (SetNorthSouth); guarded by mu.
	northSouth bool

	// revMu serialises bumps of rw_verdict_rev (see bumpRev).
	revMu sync.Mutex

	// svc is the socket load balancer and what SyncServices programmed.
	svc svcState
}

// Open mounts bpffs if needed, creates or re-uses the pinned maps under
// opts.PinDir and loads both programs. It never re-creates a pinned map:
// a restarted agent keeps the map ids, and so the forwarding state.
func Open(opts Options, log *slog.Logger) (*Datapath, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if err := ensureBPFFS(opts.PinDir); err != nil {
		return nil, err
	}
	var err error
	d := &Datapath{opts: opts, log: log, maps: map[string]*ebpf.Map{}, policy: map[uint16]*ebpf.Map{}}
	d.features = probeFeatures()
	d.mode = opts.Attach
	if d.mode == AttachAuto {
		d.mode = AttachTC
		if d.features.TCX {
			d.mode = AttachTCX
		}
	}
	if d.events, d.eventsWhy, err = chooseEvents(opts.Events, d.features.RingBuf); err != nil {
		return nil, err
	}
	if d.hostRouting, d.hostRoutingWhy, err = chooseHostRouting(opts.HostRouting, d.features); err != nil {
		return nil, err
	}
	if err := d.load(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.openServices(); err != nil {
		d.Close()
		return nil, err
	}
	// After the service maps: north-south balancing reads them. Loaded in
	// both host routing modes; SetUplinks decides where it is attached.
	// With "legacy" a kernel that refuses it costs north-south balancing
	// only (NorthSouth says so), not the agent.
	if d.uplink, err = d.loadUplink(); err != nil {
		if d.hostRouting == HostRoutingBPF {
			d.Close()
			return nil, err
		}
		d.uplinkErr = err
		log.Warn("rw_from_uplink does not load; north-south service balancing is off", "err", err)
	}
	if err := d.migrateUplinks(); err != nil {
		d.Close()
		return nil, err
	}
	log.Info("datapath ready", "pin_dir", opts.PinDir, "attach", d.mode, "events", d.events, "events_why", d.eventsWhy,
		"host_routing", d.hostRouting, "host_routing_why", d.hostRoutingWhy)
	return d, nil
}

func ensureBPFFS(pinDir string) error {
	isBPF := func(p string) bool {
		var st unix.Statfs_t
		return unix.Statfs(p, &st) == nil && st.Type == unix.BPF_FS_MAGIC
	}
	root := "/sys/fs/bpf"
	if strings.HasPrefix(filepath.Clean(pinDir)+"/", root+"/") && !isBPF(root) {
		if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mount bpffs on %s: %w (%w)", root, err, ErrNoBPFFS)
		}
	}
	if err := os.MkdirAll(filepath.Join(pinDir, "links"), 0o700); err != nil {
		return fmt.Errorf("create pin directory: %w", err)
	}
	if !isBPF(pinDir) {
		return fmt.Errorf("%s: %w", pinDir, ErrNoBPFFS)
	}
	return nil
}

// sharedSpecs returns the specs of both objects with the per-load settings.
func (d *Datapath) sharedSpecs() (from, to *ebpf.CollectionSpec, err error) {
	from, err = bpf.LoadFromEndpoint()
	if err != nil {
		return nil, nil, fmt.Errorf("parse from_endpoint object: %w", err)
	}
	to, err = bpf.LoadToEndpoint()
	if err != nil {
		return nil, nil, fmt.Errorf("parse to_endpoint object: %w", err)
	}
	for _, s := range []*ebpf.CollectionSpec{from, to} {
		if err := d.setVariables(s); err != nil {
			return nil, nil, err
		}
	}
	return from, to, nil
}

// setVariables writes the per-load settings into an object's spec.
func (d *Datapath) setVariables(s *ebpf.CollectionSpec) error {
	if err := s.Variables["rw_audit_mode"].Set(boolByte(d.opts.Audit)); err != nil {
		return fmt.Errorf("set audit mode: %w", err)
	}
	if err := s.Variables["rw_trace_sample"].Set(d.opts.TraceSample); err != nil {
		return fmt.Errorf("set trace sample: %w", err)
	}
	for name, v := range map[string]any{
		"rw_events_perf": boolByte(d.events == EventsPerf),
		"rw_event_rate":  uint64(d.opts.EventRate),
		"rw_event_burst": uint64(d.opts.EventBurst),
	} {
		if err := s.Variables[name].Set(v); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	if d.events == EventsPerf {
		perfEvents(s.Maps["rw_events"])
	}
	// Only rw_from_endpoint redirects; the other object may not have it.
	if v, ok := s.Variables["rw_redirect_peer"]; ok {
		if err := v.Set(boolByte(d.localRedirect())); err != nil {
			return fmt.Errorf("set redirect peer: %w", err)
		}
	}
	if v, ok := s.Variables["rw_host_routing"]; ok {
		if err := v.Set(boolByte(d.hostRouting == HostRoutingBPF)); err != nil {
			return fmt.Errorf("set host routing: %w", err)
		}
	}
	if err := s.Variables["rw_coarse_clock"].Set(boolByte(d.features.coarseClock)); err != nil {
		return fmt.Errorf("set coarse clock: %w", err)
	}
	for name, v := range map[string]time.Duration{
		"rw_ct_timeout_tcp":     d.opts.CTTimeoutTCP,
		"rw_ct_timeout_tcp_syn": d.opts.CTTimeoutTCPSYN,
		"rw_ct_timeout_close":   d.opts.CTTimeoutClose,
		"rw_ct_timeout_other":   d.opts.CTTimeoutOther,
	} {
		if err := s.Variables[name].Set(uint64(max(v, 0))); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	return nil
}

// localRedirect reports whether local delivery uses bpf_redirect_peer.
func (d *Datapath) localRedirect() bool {
	return d.features.RedirectPeer && !d.opts.NoRedirectPeer
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// configuredSizes are the maps whose size the config sets; a pinned map of
// another size is kept (cleanup re-creates it). Every other map has the
// size the object gives it, and a pinned one that differs is re-created
// (layout.go).
func (d *Datapath) configuredSizes() map[string]int {
	return map[string]int{
		"rw_ct4_tcp":     d.opts.CTMaxEntries,
		"rw_ct6_tcp":     d.opts.CTMaxEntries,
		"rw_ct4_other":   d.opts.CTOtherMaxEntries,
		"rw_ct6_other":   d.opts.CTOtherMaxEntries,
		"rw_ipcache":     d.opts.IPCacheMaxEntries,
		"rw_ipcache_lpm": max(d.opts.IPCacheMaxEntries/8, 1024),
		"rw_frag":        d.opts.FragMaxEntries,
		// A north-south flow holds one NAT entry and one TCP CT entry per
		// direction; the default (524,288 / 2) is the size it always had.
		"rw_svc_nat": max(d.opts.CTMaxEntries/2, 1024),
	}
}

// load checks the layout version of the pin directory, opens (adopting,
// creating or re-creating) every map, loads both programs, migrates an
// older layout (layout.go) and bumps the policy revision.
func (d *Datapath) load() error {
	from, to, err := d.sharedSpecs()
	if err != nil {
		return err
	}
	ver, err := d.checkLayout()
	if err != nil {
		return err
	}
	sizes := d.configuredSizes()
	outer := from.Maps["rw_policy_maps"]
	outer.InnerMap.MaxEntries = uint32(d.opts.PolicyMaxEntries)
	d.inner = outer.InnerMap.Copy()

	mig := &migration{from: ver}
	for name, ms := range from.Maps {
		if !strings.HasPrefix(name, "rw_") {
			continue
		}
		_, configured := sizes[name]
		if configured {
			ms.MaxEntries = uint32(sizes[name])
		}
		pin := d.pinName(name)
		m, old, err := d.openPinned(pin, ms, configured)
		if err != nil {
			mig.close()
			return err
		}
		d.maps[name] = m
		if old != nil {
			mig.recreated = append(mig.recreated, recreatedMap{name: pin, old: old, new: m})
		}
		// Both objects must accept the map as it is, even if its size
		// differs from the config (the pinned map wins).
		for _, s := range []*ebpf.CollectionSpec{from, to} {
			s.Maps[name].MaxEntries = m.MaxEntries()
			s.Maps[name].Flags = m.Flags()
		}
	}
	defer func() {
		if d.mig != mig {
			mig.close()
		}
	}()
	if err := d.openRetired(mig); err != nil {
		return err
	}
	// Never 0 once programs of this release run: converted CT entries
	// carry 0 and must be checked again.
	if err := d.bumpRev(); err != nil {
		return err
	}
	if err := d.migrateBefore(mig); err != nil {
		return err
	}
	d.from, err = loadProgram(from, d.maps, "rw_from_endpoint")
	if err != nil {
		return err
	}
	d.to, err = loadProgram(to, d.maps, "rw_to_endpoint")
	if err != nil {
		return err
	}
	if err := d.migrateAfter(mig); err != nil {
		return err
	}
	if err := d.writeLayout(); err != nil {
		return err
	}
	if mig.needed() {
		d.mig = mig // the uplinks' part: migrateUplinks
	}
	// Programs loaded now may decide otherwise (audit mode, a new
	// release): every flow is checked again on its next packet.
	d.unpinOtherEvents()
	return d.bumpRev()
}

// openPinned re-uses the map pinned under name or creates and pins it. A
// pinned map this build cannot use as it is but whose contents it can
// carry over (same type and key/value sizes, another fixed size; values
// grown at their end, grownValue; or a ring buffer, which holds nothing to
// keep) is re-created: the new map is
// returned unpinned, with the pinned one as old, and layout.go copies the
// contents and moves the pin once the programs use the new map. Anything
// else incompatible is refused with ErrIncompatibleMap.
func (d *Datapath) openPinned(name string, ms *ebpf.MapSpec, configuredSize bool) (m, old *ebpf.Map, err error) {
	path := filepath.Join(d.opts.PinDir, name)
	pinned, err := ebpf.LoadPinnedMap(path, nil)
	switch {
	case err == nil:
		sameLayout := pinned.Type() == ms.Type && pinned.KeySize() == ms.KeySize && pinned.ValueSize() == ms.ValueSize
		sameSize := pinned.MaxEntries() == ms.MaxEntries || configuredSize || ms.Type == ebpf.RingBuf || ms.Type == ebpf.PerfEventArray
		if sameLayout && sameSize {
			if pinned.MaxEntries() != ms.MaxEntries && ms.Type != ebpf.RingBuf && ms.Type != ebpf.PerfEventArray {
				d.log.Warn("pinned map keeps its size; cleanup re-creates it with the configured one",
					"map", name, "pinned", pinned.MaxEntries(), "configured", ms.MaxEntries)
			}
			return pinned, nil, nil
		}
		contentless := ms.Type == ebpf.RingBuf || ms.Type == ebpf.PerfEventArray
		grown := pinned.Type() == ms.Type && pinned.KeySize() == ms.KeySize && grownValue(name, pinned.ValueSize(), ms.ValueSize)
		if !(sameLayout && ms.Type != ebpf.HashOfMaps && ms.Type != ebpf.ArrayOfMaps) && !contentless && !grown {
			pinned.Close()
			return nil, nil, fmt.Errorf("map %s: %v %d/%d pinned, %v %d/%d wanted: %w", path,
				pinned.Type(), pinned.KeySize(), pinned.ValueSize(), ms.Type, ms.KeySize, ms.ValueSize, ErrIncompatibleMap)
		}
		spec := ms.Copy()
		spec.Pinning = ebpf.PinNone
		m, err = ebpf.NewMap(spec)
		if err != nil {
			pinned.Close()
			return nil, nil, fmt.Errorf("re-create map %s: %w", name, err)
		}
		d.log.Info("re-creating map with this release's spec", "map", name,
			"pinned_max_entries", pinned.MaxEntries(), "max_entries", m.MaxEntries())
		return m, pinned, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, nil, fmt.Errorf("load pinned map %s: %w", path, err)
	}
	spec := ms.Copy()
	spec.Pinning = ebpf.PinNone
	m, err = ebpf.NewMap(spec)
	if err != nil {
		return nil, nil, fmt.Errorf("create map %s: %w", name, err)
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, nil, fmt.Errorf("pin map %s: %w", path, err)
	}
	d.log.Info("created map", "map", name, "max_entries", m.MaxEntries())
	return m, nil, nil
}

func loadProgram(spec *ebpf.CollectionSpec, maps map[string]*ebpf.Map, prog string) (*ebpf.Program, error) {
	repl := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		if m, ok := maps[name]; ok {
			repl[name] = m
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load %s: %+v", prog, ve)
		}
		return nil, fmt.Errorf("load %s: %w", prog, err)
	}
	p := coll.DetachProgram(prog)
	coll.Close()
	if p == nil {
		return nil, fmt.Errorf("load %s: program missing from object", prog)
	}
	return p, nil
}

// Features reports what the kernel offers and what the datapath chose.
func (d *Datapath) Features() Features {
	f := d.features
	f.AttachMode = d.mode
	f.LocalRedirect = d.localRedirect()
	f.Events, f.EventsWhy = d.events, d.eventsWhy
	f.HostRoutingMode, f.HostRoutingWhy = d.hostRouting, d.hostRoutingWhy
	return f
}

// PinDir is where the maps and links are pinned.
func (d *Datapath) PinDir() string { return d.opts.PinDir }

// Close releases the agent's file descriptors. Pinned maps, pinned links
// and tc filters stay, so forwarding continues without the agent.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mig != nil {
		d.mig.close()
		d.mig = nil
	}
	for _, m := range d.policy {
		m.Close()
	}
	d.policy = map[uint16]*ebpf.Map{}
	for _, m := range d.maps {
		m.Close()
	}
	d.maps = map[string]*ebpf.Map{}
	d.closeServices()
	if d.from != nil {
		d.from.Close()
	}
	if d.to != nil {
		d.to.Close()
	}
	if d.uplink != nil {
		d.uplink.Close()
	}
	return nil
}

// Cleanup removes everything rackwire pinned under pinDir: links (which
// detaches tcx programs) and maps, and the legacy tc filters of
// rw_from_uplink recorded there. Endpoints' legacy tc filters are removed
// by DetachEndpoint, or go away with their veth.
func Cleanup(pinDir string) error {
	if pinDir == "" {
		pinDir = "/sys/fs/bpf/rackwire"
	}
	cleanupUplinkFilters(pinDir)
	if err := os.RemoveAll(pinDir); err != nil {
		return fmt.Errorf("remove pins under %s: %w", pinDir, err)
	}
	return nil
}
