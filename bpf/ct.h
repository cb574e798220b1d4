/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking in rw_ct{4,6}_tcp (TCP) and rw_ct{4,6}_other (UDP,
 * ICMP, everything else). An entry is keyed by the tuple of a flow's first
 * packet plus the local endpoint and the direction it was seen in, so the
 * two endpoints of a local connection keep separate entries and each
 * enforces its own policy. A packet whose tuple matches is established; one
 * whose reversed tuple (opposite direction) matches is a reply. Replies pass
 * without policy; established packets pass without policy only while the
 * entry's rev equals rw_verdict_rev (see rw_enforce).
 *
 * Lifetimes (idle time since the last packet), as Cilium's:
 *   TCP that saw only SYNs (no packet without SYN)   rw_ct_timeout_tcp_syn, 60 s
 *   TCP after a FIN in both directions or an RST     rw_ct_timeout_close, 10 s
 *   other TCP (established, half-closed)             rw_ct_timeout_tcp, 6 h
 *   everything else                                  rw_ct_timeout_other, 60 s
 * A SYN without ACK that meets a closing TCP entry (either direction) ends
 * it: the packet is a new connection, decided by policy from scratch.
 */
#pragma once

#include <bpf/bpf_helpers.h>

#include "datapath_maps.h"
#include "parse.h"

/* Idle timeouts, set by the agent (datapath.Options); 0 keeps the default. */
volatile const __u64 rw_ct_timeout_tcp = 0;     /* established TCP, default 6h */
volatile const __u64 rw_ct_timeout_tcp_syn = 0; /* TCP that saw only SYNs, default 60s */
volatile const __u64 rw_ct_timeout_close = 0;   /* TCP after FIN both ways or RST, default 10s */
volatile const __u64 rw_ct_timeout_other = 0;   /* UDP, ICMP, others, default 60s */

/*
 * Per-load setting: 1 where the kernel has bpf_ktime_get_coarse_ns (5.11).
 * Lifetimes are seconds long, so connection tracking reads the coarse
 * CLOCK_MONOTONIC (a tick behind at most: 1-10 ms): the same clock as
 * bpf_ktime_get_ns and the agent's, without reading the TSC on every
 * packet. Without the helper the verifier never reaches its call (the
 * setting is a constant it knows).
 */
volatile const __u8 rw_coarse_clock = 0;

#define RW_NSEC 1000000000ULL

/* ct_now is connection tracking's clock: CLOCK_MONOTONIC in ns, coarse where it can. */
static __always_inline __u64 ct_now(void)
{
	if (rw_coarse_clock)
		return bpf_ktime_get_coarse_ns();
	return bpf_ktime_get_ns();
}

#define RW_CT_NEW         0
#define RW_CT_ESTABLISHED 1
#define RW_CT_REPLY       2

#define TCP_FLAG_ACK 0x10

#define RW_CT_F_FIN_BOTH (RW_CT_F_FIN_FWD | RW_CT_F_FIN_REV)

/* ct_key: the forward key of the packet's flow, for an update or delete. */
union ct_key {
	struct ct4_key k4;
	struct ct6_key k6;
};

/* verdict_rev returns the current policy revision (rw_verdict_rev slot 0). */
static __always_inline __u32 verdict_rev(void)
{
	__u32 k = 0;
	__u32 *v = bpf_map_lookup_elem(&rw_verdict_rev, &k);

	return v ? *v : 0;
}

static __always_inline int __ct_closing(struct ct_entry *e)
{
	return (e->flags & RW_CT_F_RST) || (e->flags & RW_CT_F_FIN_BOTH) == RW_CT_F_FIN_BOTH;
}

/* __ct_tcp_flags returns the RW_CT_F_* a TCP packet adds (reply: other direction). */
static __always_inline __u8 __ct_tcp_flags(__u8 tcp, int reply)
{
	__u8 fl = 0;

	if (!(tcp & TCP_FLAG_SYN))
		fl |= RW_CT_F_SEEN_NON_SYN;
	if (tcp & TCP_FLAG_FIN)
		fl |= reply ? RW_CT_F_FIN_REV : RW_CT_F_FIN_FWD;
	if (tcp & TCP_FLAG_RST)
		fl |= RW_CT_F_RST;
	return fl;
}

static __always_inline void __ct_touch(struct ct_entry *e, struct flow *f, __u32 len, __u64 now,
				       int reply)
{
	e->last_seen_ns = now;
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	if (f->proto == IPPROTO_TCP) {
		__u8 fl = e->flags | __ct_tcp_flags(f->tcp_flags, reply);

		if (fl != e->flags)
			e->flags = fl;
		if ((e->tcp_flags | f->tcp_flags) != e->tcp_flags)
			e->tcp_flags |= f->tcp_flags;
	}
}

/*
 * __ct_expired reports whether an entry has been idle longer than its
 * lifetime: the flow then counts as new and policy decides again.
 */
static __always_inline int __ct_expired(struct ct_entry *e, __u8 proto, __u64 now)
{
	/*
	 * A time ahead of now (written from the fine clock: an entry of an
	 * older build, or by another CPU a tick ago) is no idle time at all.
	 */
	__u64 timeout, idle = now > e->last_seen_ns ? now - e->last_seen_ns : 0;

	if (proto != IPPROTO_TCP)
		timeout = rw_ct_timeout_other ? rw_ct_timeout_other : 60 * RW_NSEC;
	else if (__ct_closing(e))
		timeout = rw_ct_timeout_close ? rw_ct_timeout_close : 10 * RW_NSEC;
	else if (!(e->flags & RW_CT_F_SEEN_NON_SYN))
		timeout = rw_ct_timeout_tcp_syn ? rw_ct_timeout_tcp_syn : 60 * RW_NSEC;
	else
		timeout = rw_ct_timeout_tcp ? rw_ct_timeout_tcp : 21600 * RW_NSEC;
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

/*
 * __ct_hit judges an entry found for the packet (reply: under the reversed
 * key). It returns RW_CT_NEW when the entry does not count: expired, or a
 * SYN without ACK meeting a closing TCP entry, which is then deleted so the
 * packet starts a new connection.
 */
static __always_inline int __ct_hit(void *map, void *key, struct ct_entry *e, struct flow *f,
				    __u32 len, __u64 now, int reply)
{
	if (__ct_expired(e, f->proto, now))
		return RW_CT_NEW;
	if (f->proto == IPPROTO_TCP &&
	    (f->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN && __ct_closing(e)) {
		bpf_map_delete_elem(map, key);
		return RW_CT_NEW;
	}
	__ct_touch(e, f, len, now, reply);
	return reply ? RW_CT_REPLY : RW_CT_ESTABLISHED;
}

/*
 * __ct_lookup_in looks the packet up in one map: fwd and rev are its forward
 * and reversed keys. On RW_CT_ESTABLISHED and RW_CT_REPLY *ep points at
 * the entry.
 */
static __always_inline int __ct_lookup_in(void *map, void *fwd, void *rev, struct flow *f,
					  __u32 len, __u64 now, struct ct_entry **ep)
{
	struct ct_entry *e = bpf_map_lookup_elem(map, fwd);
	int ret;

	if (e) {
		ret = __ct_hit(map, fwd, e, f, len, now, 0);
		if (ret == RW_CT_ESTABLISHED) {
			*ep = e;
			return ret;
		}
	}
	e = bpf_map_lookup_elem(map, rev);
	if (!e)
		return RW_CT_NEW;
	ret = __ct_hit(map, rev, e, f, len, now, 1);
	if (ret == RW_CT_REPLY)
		*ep = e;
	return ret;
}

/*
 * ct_lookup returns RW_CT_NEW, RW_CT_ESTABLISHED or RW_CT_REPLY; key gets
 * the packet's forward key, and on RW_CT_ESTABLISHED and RW_CT_REPLY *ep
 * the entry.
 */
static __always_inline int ct_lookup(struct flow *f, __u8 dir, __u16 ep, __u32 len,
				     union ct_key *key, struct ct_entry **entry)
{
	__u64 now = ct_now();

	if (f->family == 4) {
		struct ct4_key r = {};

		__ct_fill4(&key->k4, f, 0, dir, ep);
		__ct_fill4(&r, f, 1, dir ^ 1, ep);
		if (f->proto == IPPROTO_TCP)
			return __ct_lookup_in(&rw_ct4_tcp, &key->k4, &r, f, len, now, entry);
		return __ct_lookup_in(&rw_ct4_other, &key->k4, &r, f, len, now, entry);
	} else {
		struct ct6_key r = {};

		__ct_fill6(&key->k6, f, 0, dir, ep);
		__ct_fill6(&r, f, 1, dir ^ 1, ep);
		if (f->proto == IPPROTO_TCP)
			return __ct_lookup_in(&rw_ct6_tcp, &key->k6, &r, f, len, now, entry);
		return __ct_lookup_in(&rw_ct6_other, &key->k6, &r, f, len, now, entry);
	}
}

/* ct_delete removes the entry under the packet's forward key. */
static __always_inline void ct_delete(struct flow *f, union ct_key *key)
{
	if (f->family == 4) {
		if (f->proto == IPPROTO_TCP)
			bpf_map_delete_elem(&rw_ct4_tcp, &key->k4);
		else
			bpf_map_delete_elem(&rw_ct4_other, &key->k4);
	} else {
		if (f->proto == IPPROTO_TCP)
			bpf_map_delete_elem(&rw_ct6_tcp, &key->k6);
		else
			bpf_map_delete_elem(&rw_ct6_other, &key->k6);
	}
}

static __always_inline int __ct_exists(void *map, void *fwd, void *rev)
{
	return bpf_map_lookup_elem(map, fwd) || bpf_map_lookup_elem(map, rev);
}

/*
 * ct_related reports whether the packet an ICMP error quotes (in, sent by
 * the endpoint in direction dir) belongs to a tracked flow, either way round.
 */
static __always_inline int ct_related(struct flow *in, __u8 dir, __u16 ep)
{
	if (in->family == 4) {
		struct ct4_key k = {}, r = {};

		__ct_fill4(&k, in, 0, dir, ep);
		__ct_fill4(&r, in, 1, dir ^ 1, ep);
		if (in->proto == IPPROTO_TCP)
			return __ct_exists(&rw_ct4_tcp, &k, &r);
		return __ct_exists(&rw_ct4_other, &k, &r);
	} else {
		struct ct6_key k = {}, r = {};

		__ct_fill6(&k, in, 0, dir, ep);
		__ct_fill6(&r, in, 1, dir ^ 1, ep);
		if (in->proto == IPPROTO_TCP)
			return __ct_exists(&rw_ct6_tcp, &k, &r);
		return __ct_exists(&rw_ct6_other, &k, &r);
	}
}

static __always_inline void __ct_new(struct ct_entry *e, struct flow *f, __u32 len,
				     __u32 remote_identity, __u8 audit, __u32 rev, __u64 now)
{
	e->created_ns = now;
	e->last_seen_ns = now;
	e->packets = 1;
	e->bytes = len;
	e->remote_identity = remote_identity;
	e->rev = rev;
	e->flags = audit ? RW_CT_F_AUDIT : 0;
	if (f->proto == IPPROTO_TCP) {
		e->tcp_flags = f->tcp_flags;
		e->flags |= __ct_tcp_flags(f->tcp_flags, 0);
	}
}

/*
 * __ct_allow_in records a verdict in one map: a live entry under key (an
 * established flow checked again) takes the revision, the remote identity
 * and the audit flag; otherwise a new entry is created. Returns 1 when it
 * created one.
 */
static __always_inline int __ct_allow_in(void *map, void *key, struct flow *f, __u32 len,
					 __u32 remote_identity, __u8 audit, __u32 rev)
{
	__u64 now = ct_now();
	struct ct_entry *e = bpf_map_lookup_elem(map, key);
	struct ct_entry n = {};

	if (e && !__ct_expired(e, f->proto, now)) {
		e->rev = rev;
		e->remote_identity = remote_identity;
		if (audit)
			e->flags |= RW_CT_F_AUDIT;
		else if (e->flags & RW_CT_F_AUDIT)
			e->flags &= ~RW_CT_F_AUDIT;
		return 0;
	}
	__ct_new(&n, f, len, remote_identity, audit, rev, now);
	bpf_map_update_elem(map, key, &n, BPF_ANY);
	return 1;
}

/*
 * ct_allow records that policy allowed (or audit mode forwarded) the
 * packet at revision rev, under its forward key: the entry of an
 * established flow is updated, a new flow gets one. Returns 1 for a new.
 */
static __always_inline int ct_allow(struct flow *f, union ct_key *key, __u32 len,
				    __u32 remote_identity, __u8 audit, __u32 rev)
{
	if (f->family == 4) {
		if (f->proto == IPPROTO_TCP)
			return __ct_allow_in(&rw_ct4_tcp, &key->k4, f, len, remote_identity, audit, rev);
		return __ct_allow_in(&rw_ct4_other, &key->k4, f, len, remote_identity, audit, rev);
	}
	if (f->proto == IPPROTO_TCP)
		return __ct_allow_in(&rw_ct6_tcp, &key->k6, f, len, remote_identity, audit, rev);
	return __ct_allow_in(&rw_ct6_other, &key->k6, f, len, remote_identity, audit, rev);
}
