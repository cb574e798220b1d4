/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Policy lookup in an endpoint's rw_policy_NNNNN map.
 *
 * Order (the first allow that matches is the one whose counters move):
 *   1 (identity, port, proto)        then the port blocks in use, smallest first
 *   2 (identity, any port, proto)
 *   3 (any identity, port, proto)    then the port blocks in use
 *   4 (any identity, any port, proto)
 *   5 (identity, any proto)
 *   6 (any identity, any port, any proto)
 * A matching deny wins over any allow, so when the direction has deny entries
 * every step is looked up. The per-direction meta entry (direction byte
 * RW_KEY_META | dir, rest zero) tells which port block sizes and whether deny
 * entries exist; without it every block size is tried and deny is assumed.
 * A meta entry with RW_POLICY_F_META_OPEN (the emergency allow-all) allows
 * everything in its direction, deny entries included.
 */
#pragma once

#include "datapath_maps.h"

#define RW_POLICY_ALL_BLOCKS 0xfffe /* sizes 2^1 .. 2^15 */

struct policy_state {
	struct policy_value *allow; /* first allow that matched */
	struct policy_value *deny;  /* first deny that matched */
	__u8 check_deny;
};

/* __policy_try looks up one key; it returns 1 when the search may stop. */
static __always_inline int __policy_try(void *map, struct policy_key *k, struct policy_state *st)
{
	struct policy_value *v = bpf_map_lookup_elem(map, k);

	if (!v)
		return 0;
	if (v->flags & RW_POLICY_F_DENY) {
		st->deny = v;
		return 1;
	}
	if (!st->allow)
		st->allow = v;
	return !st->check_deny;
}

/* __policy_try_port tries the exact port, then every aligned block in use. */
static __always_inline int __policy_try_port(void *map, __u32 identity, __u16 port,
					     __u8 proto, __u8 dir, __u16 blocks,
					     struct policy_state *st)
{
	struct policy_key k = {
		.identity = identity,
		.dport = bpf_htons(port),
		.proto = proto,
		.direction = dir,
	};
	__u32 n;

	if (__policy_try(map, &k, st))
		return 1;
	if (!blocks)
		return 0;
	for (n = 1; n < 16; n++) {
		if (!(blocks & (1 << n)))
			continue;
		k.dport = bpf_htons(port & ~((1 << n) - 1));
		k.direction = dir | (n << RW_KEY_BLOCK_SHIFT);
		if (__policy_try(map, &k, st))
			return 1;
	}
	return 0;
}

/*
 * policy_lookup decides a new flow: 0 allow, RW_DROP_POLICY_DENY_RULE or
 * RW_DROP_POLICY_DENIED. The deciding entry's counters are updated.
 */
static __always_inline int policy_lookup(void *map, __u32 identity, __be16 dport,
					 __u8 proto, __u8 dir, __u32 len)
{
	struct policy_key k = { .direction = RW_KEY_META | dir };
	struct policy_state st = { .check_deny = 1 };
	__u16 port = bpf_ntohs(dport);
	__u16 blocks = RW_POLICY_ALL_BLOCKS;
	struct policy_value *v;

	v = bpf_map_lookup_elem(map, &k);
	if (v && (v->flags & RW_POLICY_F_META_OPEN)) {
		__sync_fetch_and_add(&v->packets, 1);
		__sync_fetch_and_add(&v->bytes, len);
		return 0;
	}
	if (v) {
		blocks = v->meta_blocks;
		st.check_deny = !!(v->flags & RW_POLICY_F_META_HAS_DENY);
	}

	if (__policy_try_port(map, identity, port, proto, dir, blocks, &st))
		goto out;
	k = (struct policy_key){ .identity = identity, .proto = proto, .direction = dir };
	if (__policy_try(map, &k, &st))
		goto out;
	if (__policy_try_port(map, 0, port, proto, dir, blocks, &st))
		goto out;
	k = (struct policy_key){ .proto = proto, .direction = dir };
	if (__policy_try(map, &k, &st))
		goto out;
	k = (struct policy_key){ .identity = identity, .direction = dir };
	if (__policy_try(map, &k, &st))
		goto out;
	k = (struct policy_key){ .direction = dir };
	__policy_try(map, &k, &st);
out:
	v = st.deny ? st.deny : st.allow;
	if (v) {
		__sync_fetch_and_add(&v->packets, 1);
		__sync_fetch_and_add(&v->bytes, len);
	}
	if (st.deny)
		return RW_DROP_POLICY_DENY_RULE;
	if (st.allow)
		return 0;
	return RW_DROP_POLICY_DENIED;
}
