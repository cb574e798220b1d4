/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Fragments. Only the first fragment of a datagram carries the L4 header, so
 * only it can be decided like a whole packet. When it passes, its ports are
 * kept in rw_frag under (src, dst, id, proto, family); a later fragment takes
 * them from there and is then decided exactly like the first (connection
 * tracking, policy, counters). A later fragment without an entry (its first
 * was dropped, never seen, or passed more than RW_FRAG_TIMEOUT ago) is
 * dropped: RW_DROP_FRAG_NO_HEAD.
 *
 * A first fragment that repeats a key: the newest one that passes replaces
 * the entry; one that is dropped leaves it alone. Either way the later
 * fragments are decided on the ports of a first fragment that passed this
 * program, and the receiving kernel discards datagrams whose fragments
 * overlap (RFC 5722; Linux does the same for IPv4), so a dropped first
 * fragment cannot be replaced behind policy's back. parse.h refuses the
 * rest of RFC 1858: a first fragment too short for the L4 fields, a later
 * TCP fragment at offset 8.
 *
 * frag_remember runs after the decision: it reads the parser's mark in
 * struct flow, which lives in a map value (rw_pkt_flow), so the verifier
 * does not carry it through the policy lookup as a state of its own, and
 * reads the first fragment's id and protocol from the packet again.
 */
#pragma once

#include <bpf/bpf_helpers.h>

#include "datapath_maps.h"
#include "parse.h"

/* Entries older than the kernel's default reassembly timeout (ipfrag_time) no longer count. */
#define RW_FRAG_TIMEOUT (30 * 1000000000ULL)

static __always_inline void __frag_key(struct frag_key *k, struct flow *f, __u32 id, __u8 proto)
{
	__builtin_memcpy(k->saddr, f->saddr, 16);
	__builtin_memcpy(k->daddr, f->daddr, 16);
	k->id = id;
	k->proto = proto;
	k->family = f->family;
}

/*
 * __frag_head reports whether skb is a first fragment (offset 0, more to
 * come) and then sets its id and rw_frag key proto.
 */
static __always_inline int __frag_head(struct __sk_buff *skb, __u8 family, __u32 *id, __u8 *proto)
{
	__u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
	__u8 b[8], nexthdr;
	int i, ret;

	if (family == 4) {
		/* id, frag_off, ttl, protocol */
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 4, b, 6) < 0 ||
		    (((b[2] << 8) | b[3]) & (IP_OFFSET_MASK | IP_MF_FLAG)) != IP_MF_FLAG)
			return 0;
		*id = (b[0] << 8) | b[1];
		*proto = b[5];
		return 1;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &nexthdr, 1) < 0)
		return 0;
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		ret = __ipv6_skip(skb, &off, &nexthdr);
		if (ret < 0)
			return 0;
		if (ret)
			continue;
		if (nexthdr != IPPROTO_FRAGMENT || bpf_skb_load_bytes(skb, off, b, 8) < 0 ||
		    (((b[2] << 8) | b[3]) & 0xfff9) != 1)
			return 0;
		*id = ((__u32)b[4] << 24) | ((__u32)b[5] << 16) | ((__u32)b[6] << 8) | b[7];
		*proto = b[0];
		return 1;
	}
	return 0;
}

/* frag_remember records the ports of skb, decided as f, if it is a first fragment. */
static __always_inline void frag_remember(struct __sk_buff *skb, struct flow *f)
{
	struct frag_key k = {};
	struct frag_value v = {};
	__u32 id;
	__u8 proto;

	/*
	 * The parser's mark first: it saves the load of every packet that is
	 * no first fragment (f is a map value, so the mark costs the verifier
	 * no extra states); the packet is read again for id and protocol.
	 */
	if (f->frag != RW_FRAG_HEAD || !__frag_head(skb, f->family, &id, &proto))
		return;
	__frag_key(&k, f, id, proto);
	v.created_ns = bpf_ktime_get_ns();
	v.sport = f->sport;
	v.dport = f->dport;
	v.policy_port = f->policy_port;
	v.proto = f->proto;
	bpf_map_update_elem(&rw_frag, &k, &v, BPF_ANY);
}

/*
 * frag_resolve gives a later fragment (f->frag == RW_FRAG_TAIL) the ports and
 * protocol of its first. Returns 0, or RW_DROP_FRAG_NO_HEAD when no first
 * fragment passed.
 */
static __always_inline int frag_resolve(struct flow *f)
{
	struct frag_key k = {};
	struct frag_value *v;

	__frag_key(&k, f, f->frag_id, f->frag_proto);
	v = bpf_map_lookup_elem(&rw_frag, &k);
	if (!v || bpf_ktime_get_ns() - v->created_ns > RW_FRAG_TIMEOUT)
		return RW_DROP_FRAG_NO_HEAD;
	f->sport = v->sport;
	f->dport = v->dport;
	f->policy_port = v->policy_port;
	f->proto = v->proto;
	return 0;
}
