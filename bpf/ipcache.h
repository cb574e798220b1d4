/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * IP -> identity: the exact-address hash first (cheap at any size), then the
 * prefix trie; an address in neither is "world".
 */
#pragma once

#include "datapath_maps.h"

#define RW_IDENTITY_WORLD 2

/* ipcache_lookup returns the identity of addr (family 4 or 6). */
static __always_inline __u32 ipcache_lookup(const __u8 *addr, __u8 family)
{
	struct ipcache_lpm_key lk = {};
	struct ipcache_value *v;
	struct ip_key k = {};

	__builtin_memcpy(k.addr, addr, 16);
	k.family = family;
	v = bpf_map_lookup_elem(&rw_ipcache, &k);
	if (v)
		return v->identity;

	lk.prefixlen = 32 + (family == 4 ? 32 : 128);
	lk.family = family;
	__builtin_memcpy(lk.addr, addr, 16);
	v = bpf_map_lookup_elem(&rw_ipcache_lpm, &lk);
	if (v)
		return v->identity;
	return RW_IDENTITY_WORLD;
}
