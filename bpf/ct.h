/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking in rw_ct4/rw_ct6. An entry is keyed by the tuple of a
 * flow's first packet plus the local endpoint and the direction it was seen
 * in, so the two endpoints of a local connection keep separate entries and
 * each enforces its own policy. A packet whose tuple matches is established;
 * one whose reversed tuple (opposite direction) matches is a reply. Neither
 * needs a policy lookup, which is why flows survive a policy change.
 */
#pragma once

#include <bpf/bpf_helpers.h>

#include "datapath_maps.h"
#include "parse.h"

/* Idle timeouts, set by the agent (datapath.Options); 0 keeps the default. */
volatile const __u64 rw_ct_timeout_tcp = 0;   /* established TCP, default 6h */
volatile const __u64 rw_ct_timeout_close = 0; /* TCP after FIN or RST, default 10s */
volatile const __u64 rw_ct_timeout_other = 0; /* UDP, ICMP, others, default 60s */

#define RW_NSEC 1000000000ULL

#define RW_CT_NEW         0
#define RW_CT_ESTABLISHED 1
#define RW_CT_REPLY       2

static __always_inline void __ct_touch(struct ct_entry *e, struct flow *f, __u32 len, __u64 now)
{
	e->last_seen_ns = now;
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	if (f->tcp_flags && (e->tcp_flags | f->tcp_flags) != e->tcp_flags)
		e->tcp_flags |= f->tcp_flags;
}

/*
 * __ct_expired reports whether an entry has been idle too long: the flow
 * then counts as new and policy decides again, so a policy change takes
 * effect on flows that were closed or went quiet.
 */
static __always_inline int __ct_expired(struct ct_entry *e, __u8 proto, __u64 now)
{
	__u64 timeout, idle = now - e->last_seen_ns;

	if (proto == IPPROTO_TCP && (e->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		timeout = rw_ct_timeout_close ? rw_ct_timeout_close : 10 * RW_NSEC;
	else if (proto == IPPROTO_TCP)
		timeout = rw_ct_timeout_tcp ? rw_ct_timeout_tcp : 21600 * RW_NSEC;
	else
		timeout = rw_ct_timeout_other ? rw_ct_timeout_other : 60 * RW_NSEC;
	return idle > timeout;
}

static __always_inline void __ct_fill4(struct ct4_key *k, struct flow *f, int reverse,
				       __u8 dir, __u16 ep)
{
	if (reverse) {
		__builtin_memcpy(&k->saddr, f->daddr, 4);
		__builtin_memcpy(&k->daddr, f->saddr, 4);
		k->sport = f->dport;
		k->dport = f->sport;
	} else {
		__builtin_memcpy(&k->saddr, f->saddr, 4);
		__builtin_memcpy(&k->daddr, f->daddr, 4);
		k->sport = f->sport;
		k->dport = f->dport;
	}
	k->proto = f->proto;
	k->direction = dir;
	k->endpoint = ep;
}

static __always_inline void __ct_fill6(struct ct6_key *k, struct flow *f, int reverse,
				       __u8 dir, __u16 ep)
{
	if (reverse) {
		__builtin_memcpy(k->saddr, f->daddr, 16);
		__builtin_memcpy(k->daddr, f->saddr, 16);
		k->sport = f->dport;
		k->dport = f->sport;
	} else {
		__builtin_memcpy(k->saddr, f->saddr, 16);
		__builtin_memcpy(k->daddr, f->daddr, 16);
		k->sport = f->sport;
		k->dport = f->dport;
	}
	k->proto = f->proto;
	k->direction = dir;
	k->endpoint = ep;
}

/* ct_lookup returns RW_CT_NEW, RW_CT_ESTABLISHED or RW_CT_REPLY. */
static __always_inline int ct_lookup(struct flow *f, __u8 dir, __u16 ep, __u32 len)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry *e;

	if (f->family == 4) {
		struct ct4_key k = {};

		__ct_fill4(&k, f, 0, dir, ep);
		e = bpf_map_lookup_elem(&rw_ct4, &k);
		if (e && !__ct_expired(e, f->proto, now)) {
			__ct_touch(e, f, len, now);
			return RW_CT_ESTABLISHED;
		}
		__ct_fill4(&k, f, 1, dir ^ 1, ep);
		e = bpf_map_lookup_elem(&rw_ct4, &k);
	} else {
		struct ct6_key k = {};

		__ct_fill6(&k, f, 0, dir, ep);
		e = bpf_map_lookup_elem(&rw_ct6, &k);
		if (e && !__ct_expired(e, f->proto, now)) {
			__ct_touch(e, f, len, now);
			return RW_CT_ESTABLISHED;
		}
		__ct_fill6(&k, f, 1, dir ^ 1, ep);
		e = bpf_map_lookup_elem(&rw_ct6, &k);
	}
	if (e && !__ct_expired(e, f->proto, now)) {
		__ct_touch(e, f, len, now);
		return RW_CT_REPLY;
	}
	return RW_CT_NEW;
}

/*
 * ct_related reports whether the packet an ICMP error quotes (in, sent by
 * the endpoint in direction dir) belongs to a tracked flow, either way round.
 */
static __always_inline int ct_related(struct flow *in, __u8 dir, __u16 ep)
{
	if (in->family == 4) {
		struct ct4_key k = {};

		__ct_fill4(&k, in, 0, dir, ep);
		if (bpf_map_lookup_elem(&rw_ct4, &k))
			return 1;
		__ct_fill4(&k, in, 1, dir ^ 1, ep);
		return bpf_map_lookup_elem(&rw_ct4, &k) != 0;
	}
	{
		struct ct6_key k = {};

		__ct_fill6(&k, in, 0, dir, ep);
		if (bpf_map_lookup_elem(&rw_ct6, &k))
			return 1;
		__ct_fill6(&k, in, 1, dir ^ 1, ep);
		return bpf_map_lookup_elem(&rw_ct6, &k) != 0;
	}
}

/* ct_create records a new flow the policy let through. */
static __always_inline void ct_create(struct flow *f, __u8 dir, __u16 ep, __u32 len,
				      __u32 remote_identity, __u8 audit)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry e = {
		.created_ns = now,
		.last_seen_ns = now,
		.packets = 1,
		.bytes = len,
		.remote_identity = remote_identity,
		.tcp_flags = f->tcp_flags,
		.flags = audit,
	};

	if (f->family == 4) {
		struct ct4_key k = {};

		__ct_fill4(&k, f, 0, dir, ep);
		bpf_map_update_elem(&rw_ct4, &k, &e, BPF_ANY);
	} else {
		struct ct6_key k = {};

		__ct_fill6(&k, f, 0, dir, ep);
		bpf_map_update_elem(&rw_ct6, &k, &e, BPF_ANY);
	}
}
