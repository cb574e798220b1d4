package datapath

// North-south service balancing (bpf/northsouth.h, bpf/northsouth_lb.h):
// traffic that arrives on an uplink for a service VIP:port is balanced by
// rw_from_uplink to the service's active backends on this host and
// translated to the chosen one; the backend's replies get the VIP back as
// their source in its rw_from_endpoint. Data owned here: rw_svc_nat (the
// programs write it, one entry per direction of a flow, LRU) and, through
// SyncServices, each frontend's table of local backends (svc_value.local).
// Attachment: SetUplinks / SetNorthSouth (hostrt.go).

// svcNATKey mirrors struct svc_nat_key.
type svcNATKey struct {
	Saddr  [16]byte
	Daddr  [16]byte
	Sport  be16
	Dport  be16
	Proto  uint8
	Family uint8
	Dir    uint8
	Pad    uint8
}

// svcNATValue mirrors struct svc_nat_value.
type svcNATValue struct {
	Addr   [16]byte
	Port   be16
	Family uint8
	Pad    uint8
}
