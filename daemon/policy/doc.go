// Package policy is rackwire's policy engine: it loads network policies
// written in the CiliumNetworkPolicy vocabulary (L3/L4 only) and computes,
// for every local endpoint, the entries its per-endpoint policy map must
// hold.
//
// Who changes it: the daemon feeds the Engine from three places — policy
// sources (files in /etc/rackwire/policies.d and the store keys under
// rackwire/policies/v1/, each file or key a named source), identities (the
// store's identity table plus the host-local CIDR identities the daemon
// allocates for the prefixes CIDRPrefixes reports) and local endpoints. The
// datapath package reads Desired (full state, after a restart) and Changes
// (the difference since the last call) and turns entries into BPF map keys;
// this package never imports BPF or netlink code (a test walks the import
// graph).
//
// Semantics follow Cilium: a direction of an endpoint that no rule selects
// is open (the map holds the all-wildcard allow entry of that direction);
// once a rule selects it in a direction, that direction is default-deny and
// only what some rule allows passes; a matching deny beats any allow; rules
// combine as a union.
//
// On restart the engine starts empty; the daemon replays sources,
// identities and endpoints, then reconciles each map against Desired.
//
// On bad input: Load and LoadDir refuse a whole file whose documents do not
// all validate, with an error (*LoadError) naming the file, the document and
// the field; L7 rules, toFQDNs, toServices, toGroups and every unknown field
// are refused, never ignored. The engine only accepts validated policies, so
// the policies already in force stay in force when a new file is bad.
package policy
