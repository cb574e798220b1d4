// Package ipcache owns the datapath's ipcache: the BPF maps rw_ipcache and
// rw_ipcache_lpm that map an address or prefix to a security identity (and
// the host IP of the node that owns it). Nothing else writes those maps.
//
// # Who changes it
//
// Five sources tell the Cache what they want, each for its own prefixes:
//
//	LocalEndpoint   this host's endpoints (the endpoint manager)
//	Host            this host's own addresses, as the host identity
//	RemoteEndpoint  other hosts' endpoints, from the store (checked by Remote)
//	RemoteNode      other hosts' addresses, from the store (NodeEntries)
//	PolicyCIDR      the CIDR identity of a prefix a policy names
//
// They are ranked in that order. For every prefix the Cache keeps each
// source's wish; the map holds the wish of the highest-ranked source. A
// lower source never overwrites a higher one (a /32 toCIDR rule naming an
// endpoint's address leaves the endpoint's identity in force), and when the
// highest source withdraws, the next one's entry is written again, or the
// map entry is deleted if no source wants the prefix any more. Prefixes are
// normalised (masked, IPv4-mapped IPv6 unmapped), so 10.0.0.1/24 and
// 10.0.0.0/24, ::ffff:10.0.0.1/128 and 10.0.0.1/32 are one prefix.
//
// Upsert and Delete serve sources that change one prefix at a time;
// Replace serves watches that receive whole lists: it makes the source's
// wishes equal to the set and writes only the prefixes whose entry in force
// changed, in O(len(set)), so a store list of 300,000 addresses in which
// nothing changed writes nothing.
//
// # Failures
//
// A map write that fails (the map is full, the kernel refused) never loses
// the wish: the prefix is remembered as failing, Failing counts them and
// Retry writes them again until the map converges. The agent calls Retry
// from a periodic loop. Upsert, Delete and Replace return the error of the
// writes they made themselves; a prefix that is already failing and whose
// wish did not change is left to Retry.
//
// # Restart
//
// The maps are pinned and survive a restart of the agent: forwarding goes on
// with the last state while the agent is down. A new Cache does not know
// what the maps hold, so the agent reads them once at start and passes their
// content to Adopt. An adopted entry stays in the map, untouched, until a
// source claims its prefix (the claim writes only if the source wants
// something different) or Prune deletes it.
//
// Prune deletes the adopted entries that no source claimed, and only once
// every source has reported at least once: Replace counts as a report (it
// is given complete lists: a store watch's first successful list), and a
// source that speaks through Upsert and Delete calls MarkReported once its
// view is complete (the endpoint manager after its restore, the policy
// sync after a pass with every policy source loaded). Until then Prune
// deletes nothing and says which sources it waits for (Waiting). So a restart never deletes a live entry before its
// source has spoken: a store that is down at start keeps the other hosts'
// entries in the map as they were, indefinitely, rather than dropping them.
// Prune is safe only once every writer of the maps goes through the Cache.
//
// # Bad input
//
// An invalid prefix, an unknown source or identity 0 is refused with an
// error and changes nothing. Data from the store is checked, not trusted:
// Nodes, Remote and NodeEntries (check.go) bound sizes and refuse entries
// that claim a reserved, host-local or other cluster's identity, an address
// that is not their key, an address outside their publisher's CIDRs, or one
// of this host's addresses, each with a short stable reason (Rejected) for
// logs and metrics. Duplicate detects two hosts configured with the same
// node name. docs/ipcache.md describes the design.
//
// The package is pure Go: it writes through the Writer interface and never
// imports BPF or netlink packages (a test walks the import graph).
package ipcache
