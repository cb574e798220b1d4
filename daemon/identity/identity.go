// Package identity maps workload label sets to numeric security identities.
//
// An identity is 32 bits: the upper 8 bits are the cluster id (1..255), the
// lower 24 bits the cluster-local number, so one cluster holds 16M identities.
// Identities below 256 are reserved and cluster independent (host, world,
// ...). Host-local identities (CIDR identities) use cluster byte 0 above the
// reserved range and never leave the host.
//
// The package is pure Go: it computes and allocates through the store
// interface and never imports BPF or netlink packages (a test walks the
// import graph to keep that true).
package identity

import (
	"fmt"
	"strconv"
)

// ID is a numeric security identity as it appears in every BPF map.
type ID uint32

// Reserved identities and the number ranges (docs/identities.md).
const (
	Host       ID = 1
	World      ID = 2
	Unmanaged  ID = 3
	Health     ID = 4
	Init       ID = 5
	RemoteNode ID = 6
	Ingress    ID = 8

	// MinReserved..MaxReserved is the reserved range.
	MaxReserved ID = 255

	// LocalMin..LocalMax is the host-local range (cluster byte 0).
	LocalMin ID = 0x00000100
	LocalMax ID = 0x00FFFFFF

	// ClusterLocalMin is the first cluster-local number allocated; the
	// numbers below it mirror the reserved range and are never used, so
	// that an identity's low 24 bits never look reserved.
	ClusterLocalMin uint32 = 256
	ClusterLocalMax uint32 = 0x00FFFFFF
)

var reservedNames = map[ID]string{
	Host: "host", World: "world", Unmanaged: "unmanaged", Health: "health",
	Init: "init", RemoteNode: "remote-node", Ingress: "ingress",
}

// ReservedByName maps "host", "world", ... to their identities.
func ReservedByName(name string) (ID, bool) {
	for id, n := range reservedNames {
		if n == name {
			return id, true
		}
	}
	return 0, false
}

// Reserved returns every named reserved identity.
func Reserved() map[ID]string {
	m := make(map[ID]string, len(reservedNames))
	for k, v := range reservedNames {
		m[k] = v
	}
	return m
}

// ReservedLabels returns the label set of a reserved identity:
// {"reserved:<name>": ""}.
func ReservedLabels(id ID) Labels {
	n, ok := reservedNames[id]
	if !ok {
		return nil
	}
	return Labels{{Key: "reserved:" + n, Value: ""}}
}

// Make builds a cluster identity from a cluster id and a local number.
func Make(cluster uint8, local uint32) ID { return ID(uint32(cluster)<<24 | local&0x00FFFFFF) }

// Cluster returns the cluster byte.
func (id ID) Cluster() uint8 { return uint8(id >> 24) }

// Local returns the cluster-local 24 bits.
func (id ID) Local() uint32 { return uint32(id) & 0x00FFFFFF }

// IsReserved reports whether id is in the reserved range.
func (id ID) IsReserved() bool { return id <= MaxReserved }

// IsLocal reports whether id is a host-local (CIDR) identity.
func (id ID) IsLocal() bool { return id >= LocalMin && id <= LocalMax }

// IsCluster reports whether id is an allocatable cluster identity.
func (id ID) IsCluster() bool { return id.Cluster() != 0 && id.Local() >= ClusterLocalMin }

// String prints reserved identities by name and others in decimal.
func (id ID) String() string {
	if n, ok := reservedNames[id]; ok {
		return n
	}
	return strconv.FormatUint(uint64(id), 10)
}

// ParseID parses a decimal identity or a reserved name.
func ParseID(s string) (ID, error) {
	if id, ok := ReservedByName(s); ok {
		return id, nil
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not an identity; write a number or a reserved name (host, world, ...)", s)
	}
	return ID(v), nil
}
