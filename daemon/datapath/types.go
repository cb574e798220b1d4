package datapath

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Direction is the direction of traffic relative to an endpoint.
type Direction uint8

const (
	// Ingress is what is delivered to the endpoint.
	Ingress Direction = 0
	// Egress is what the endpoint sends.
	Egress Direction = 1
)

func (d Direction) String() string {
	switch d {
	case Ingress:
		return "ingress"
	case Egress:
		return "egress"
	}
	return fmt.Sprintf("direction(%d)", uint8(d))
}

// Bits of the policy key's direction byte and of the value's flags; they
// mirror the RW_KEY_* and RW_POLICY_F_* macros of bpf/datapath_types.h.
const (
	keyDirMask     = 0x01
	keyBlockShift  = 1
	keyBlockMask   = 0x1e
	keyMeta        = 0x80
	flagDeny       = 0x01
	flagMetaDeny   = 0x02 // meta entry: the direction has deny entries
	flagMetaOpen   = 0x04 // meta entry: emergency allow-all is on
	flagEmergency  = 0x04 // entry added by AllowAll
	epFlagAudit    = 0x01
	identityWorld  = 2
	allBlockSizes  = 0xfffe
	policyKeySize  = 8
	policyValSize  = 24
	lpmFamilyBits  = 32
	verdictForward = 0
	verdictDrop    = 1
	verdictAudit   = 2
)

// Reason is why the datapath forwarded or dropped a packet: 0 or one of the
// negative codes of enum rw_reason in bpf/datapath_types.h.
type Reason int32

// The reasons; a test checks them against the enum in the compiled object.
const (
	ReasonForwarded    Reason = 0
	DropPolicyDenied   Reason = -1  // no policy entry allows the packet
	DropPolicyDenyRule Reason = -2  // a deny entry matched
	DropNoIdentity     Reason = -3  // the local address is no known endpoint
	DropCTInvalid      Reason = -4  // impossible TCP flags on a new flow
	DropUnsupportedL3  Reason = -5  // neither IPv4, IPv6 nor ARP
	DropUnsupportedL4  Reason = -6  // IPv6 extension header chain too long
	AuditWouldDeny     Reason = -7  // audit mode forwarded what policy drops
	DropNoPolicyMap    Reason = -8  // the endpoint has no policy map
	DropSpoofedSource  Reason = -9  // source address not owned by the veth
	DropInvalidPacket  Reason = -10 // truncated or malformed headers
	DropFragment       Reason = -11 // fragment that could change the L4 header it was decided on
	DropFragNoHead     Reason = -12 // later fragment whose first fragment did not pass
	DropNoSvcBackend   Reason = -13 // connect/sendmsg to a service VIP without an active backend
	reasonCount               = 14
)

var reasonNames = map[Reason]string{
	ReasonForwarded:    "forwarded",
	DropPolicyDenied:   "policy denied",
	DropPolicyDenyRule: "policy deny rule",
	DropNoIdentity:     "no identity",
	DropCTInvalid:      "ct invalid",
	DropUnsupportedL3:  "unsupported l3",
	DropUnsupportedL4:  "unsupported l4",
	AuditWouldDeny:     "audit would deny",
	DropNoPolicyMap:    "no policy map",
	DropSpoofedSource:  "spoofed source",
	DropInvalidPacket:  "invalid packet",
	DropFragment:       "fragment",
	DropFragNoHead:     "fragment without head",
	DropNoSvcBackend:   "no service backend",
}

func (r Reason) String() string {
	if s, ok := reasonNames[r]; ok {
		return s
	}
	return fmt.Sprintf("reason(%d)", int32(r))
}

// Verdict is what the datapath did with a reported packet.
type Verdict uint8

const (
	Forwarded Verdict = verdictForward
	Dropped   Verdict = verdictDrop
	Audited   Verdict = verdictAudit // would be dropped, forwarded by audit mode
)

func (v Verdict) String() string {
	switch v {
	case Forwarded:
		return "forwarded"
	case Dropped:
		return "dropped"
	case Audited:
		return "audit"
	}
	return fmt.Sprintf("verdict(%d)", uint8(v))
}

// be16 is a 16-bit field kept in network byte order.
type be16 [2]byte

func toBE16(v uint16) be16    { var b be16; binary.BigEndian.PutUint16(b[:], v); return b }
func (b be16) uint16() uint16 { return binary.BigEndian.Uint16(b[:]) }

// ipKey mirrors struct ip_key.
type ipKey struct {
	Addr   [16]byte
	Family uint8
	Pad    [3]uint8
}

// ipcacheLPMKey mirrors struct ipcache_lpm_key.
type ipcacheLPMKey struct {
	Prefixlen uint32
	Family    uint8
	Pad       [3]uint8
	Addr      [16]byte
}

// ipcacheValue mirrors struct ipcache_value.
type ipcacheValue struct {
	Identity   uint32
	Flags      uint8
	HostFamily uint8
	Pad        uint16
	HostIP     [16]byte
}

// endpointInfo mirrors struct endpoint_info.
type endpointInfo struct {
	Ifindex  uint32
	Identity uint32
	Endpoint uint16
	Flags    uint8
	Pad      uint8
	MAC      [6]byte
	NodeMAC  [6]byte
}

// policyKey mirrors struct policy_key (8 bytes).
type policyKey struct {
	Identity  uint32
	DPort     be16
	Proto     uint8
	Direction uint8
}

// policyValue mirrors struct policy_value (24 bytes).
type policyValue struct {
	ProxyPort  uint16
	Flags      uint8
	Pad1       uint8
	MetaBlocks uint16
	Pad2       uint16
	Packets    uint64
	Bytes      uint64
}

// ct4Key mirrors struct ct4_key.
type ct4Key struct {
	SAddr     [4]byte
	DAddr     [4]byte
	SPort     be16
	DPort     be16
	Proto     uint8
	Direction uint8
	Endpoint  uint16
}

// ct6Key mirrors struct ct6_key.
type ct6Key struct {
	SAddr     [16]byte
	DAddr     [16]byte
	SPort     be16
	DPort     be16
	Proto     uint8
	Direction uint8
	Endpoint  uint16
}

// ctEntry mirrors struct ct_entry (layout version 3).
type ctEntry struct {
	CreatedNS      uint64
	LastSeenNS     uint64
	Packets        uint64
	Bytes          uint64
	RemoteIdentity uint32
	Rev            uint32
	TCPFlags       uint8
	Flags          uint8
	NhMTU          uint16
	NhChecked      uint32
	NhIfindex      uint32
	NhDMAC         [6]byte
	NhSMAC         [6]byte
}

// ctEntryV2Size is the size of struct ct_entry in layout version 2: the
// current one without nh_ifindex, nh_dmac and nh_smac (nh_mtu and
// nh_checked were its padding, zero), so a migrated entry has no next hop.
const ctEntryV2Size = 48

// ctEntryV1 is struct ct_entry of layout version 1 (rw_ct4 / rw_ct6), read
// only by the migration.
type ctEntryV1 struct {
	CreatedNS      uint64
	LastSeenNS     uint64
	Packets        uint64
	Bytes          uint64
	RemoteIdentity uint32
	TCPFlags       uint8
	Flags          uint8 // 1 = created in audit mode
	Pad            uint16
}

// ct_entry.flags, mirroring RW_CT_F_*.
const (
	ctFlagAudit      = 0x01
	ctFlagSeenNonSYN = 0x02
	ctFlagFINFwd     = 0x04
	ctFlagFINRev     = 0x08
	ctFlagRST        = 0x10
)

// TCP header flags.
const (
	tcpFlagFIN = 0x01
	tcpFlagRST = 0x04
	tcpFlagACK = 0x10
)

// fragKey mirrors struct frag_key.
type fragKey struct {
	SAddr  [16]byte
	DAddr  [16]byte
	ID     uint32
	Proto  uint8
	Family uint8
	Pad    uint16
}

// fragValue mirrors struct frag_value.
type fragValue struct {
	CreatedNS  uint64
	SPort      be16
	DPort      be16
	PolicyPort be16
	Proto      uint8
	Pad        uint8
}

// metricsValue mirrors struct metrics_value.
type metricsValue struct {
	Packets uint64
	Bytes   uint64
}

// eventLimit mirrors struct event_limit (Lock is struct bpf_spin_lock).
type eventLimit struct {
	Lock       uint32
	Pad        uint32
	Tokens     uint64
	LastNS     uint64
	Allowed    uint64
	Suppressed uint64
	Lost       uint64
}

// rawEvent mirrors struct event.
type rawEvent struct {
	TsNS        uint64
	SrcIdentity uint32
	DstIdentity uint32
	SAddr       [16]byte
	DAddr       [16]byte
	SPort       be16
	DPort       be16
	Endpoint    uint16
	Family      uint8
	Proto       uint8
	Direction   uint8
	Verdict     uint8
	Pad         uint16
	Reason      int32
	Ifindex     uint32
	Len         uint32
}

func newIPKey(a netip.Addr) ipKey {
	a = a.Unmap()
	k := ipKey{Family: 6}
	if a.Is4() {
		k.Family = 4
		b := a.As4()
		copy(k.Addr[:], b[:])
	} else {
		k.Addr = a.As16()
	}
	return k
}

func addrFrom(family uint8, b [16]byte) netip.Addr {
	if family == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

// MarshalText writes the direction's name, so JSON shows "ingress"/"egress".
func (d Direction) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText reads "ingress" or "egress".
func (d *Direction) UnmarshalText(b []byte) error {
	switch string(b) {
	case "ingress":
		*d = Ingress
	case "egress":
		*d = Egress
	default:
		return fmt.Errorf("direction %q: want ingress or egress", b)
	}
	return nil
}

// MarshalText writes the reason's name ("policy denied").
func (r Reason) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// MarshalText writes the verdict's name.
func (v Verdict) MarshalText() ([]byte, error) { return []byte(v.String()), nil }
