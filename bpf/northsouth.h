/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south service load balancing: the address translation of flows
 * that clients outside the cluster send to a service VIP:port, which the
 * top-of-rack router delivers to a host that announces the VIP ([bgp]
 * announce_service_vips).
 *
 * rw_from_uplink (northsouth_lb.h) picks one of the service's backends on
 * this host, rewrites the packet's destination to it (DNAT) and records
 * both directions of the flow in rw_svc_nat: client -> VIP gives the
 * backend (every later packet of the flow keeps it, whatever the Maglev
 * table becomes), backend -> client gives the VIP. The packet then goes on
 * as any packet for that local endpoint: its ingress policy against the
 * client's identity (world for the Internet), connection tracking on the
 * translated tuple, delivery. The client's address is never touched, so
 * the backend sees it.
 *
 * The backend's reply passes its egress program (rw_handle) as a reply of
 * the translated flow; only then does rw_ns_revnat give it the VIP:port
 * back as its source, so the client sees the address it connected to.
 * rw_ns_revnat runs only for packets connection tracking passed as
 * replies: the lookup costs every other packet nothing.
 *
 * Not translated: fragments (a frontend's fragments are dropped on the
 * uplink, later ones carry no ports), IPv6 packets with extension headers,
 * ICMP errors about a translated flow (they pass untranslated).
 */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "datapath_types.h"
#include "datapath_maps.h"
#include "hostrt.h"

/* rw_svc_nat: both directions of every north-south flow (svc_nat_key.dir). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct svc_nat_key);
	__type(value, struct svc_nat_value);
} rw_svc_nat SEC(".maps");

/*
 * ns_l4_off returns the offset of the L4 header of an IPv4 packet, or of an
 * IPv6 packet whose next header is proto (no extension headers); 0 when
 * there is none to translate.
 */
static __always_inline __u32 ns_l4_off(struct __sk_buff *skb, __u8 family, __u8 proto)
{
	__u8 b[8];

	if (bpf_skb_load_bytes(skb, ETH_HLEN, b, 8) < 0)
		return 0;
	if (family == 4)
		return (b[0] & 0x0f) >= 5 ? ETH_HLEN + (b[0] & 0x0f) * 4 : 0;
	return b[6] == proto ? ETH_HLEN + 40 : 0;
}

/*
 * ns_rewrite replaces the source (src set) or destination address and port
 * of a TCP or UDP packet whose L4 header is at l4off with addr (4 or 16
 * bytes, by family) and port, keeping the IPv4 header checksum and the L4
 * checksum (its pseudo header included) right. tmp is 32 bytes of the
 * caller's (IPv6: the old and new address). Returns < 0 if the skb could
 * not be written.
 */
static __always_inline int ns_rewrite(struct __sk_buff *skb, __u8 family, __u8 proto, __u32 l4off,
				      int src, const __u8 *addr, __be16 port, __u8 *tmp)
{
	__u32 csum_off = l4off + (proto == IPPROTO_TCP ? 16 : 6);
	__u32 port_off = l4off + (src ? 0 : 2);
	/* A UDP/IPv4 checksum of 0 means "none": it stays 0. */
	__u64 l4f = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 oldport;

	if (family == 4) {
		__u32 off = ETH_HLEN + (src ? 12 : 16);
		__be32 old, new;

		__builtin_memcpy(&new, addr, 4);
		if (bpf_skb_load_bytes(skb, off, &old, 4) < 0 ||
		    bpf_l4_csum_replace(skb, csum_off, old, new, l4f | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, old, new, 4) < 0 ||
		    bpf_skb_store_bytes(skb, off, &new, 4, 0) < 0)
			return -1;
	} else {
		__u32 off = ETH_HLEN + (src ? 8 : 24);
		__u8 *old = tmp, *new = tmp + 16;
		__s64 diff;

		__builtin_memcpy(new, addr, 16);
		if (bpf_skb_load_bytes(skb, off, old, 16) < 0)
			return -1;
		diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new, 16, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, l4f | BPF_F_PSEUDO_HDR) < 0 ||
		    bpf_skb_store_bytes(skb, off, new, 16, 0) < 0)
			return -1;
	}
	if (bpf_skb_load_bytes(skb, port_off, &oldport, 2) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, oldport, port, l4f | 2) < 0 ||
	    bpf_skb_store_bytes(skb, port_off, &port, 2, 0) < 0)
		return -1;
	return 0;
}

/*
 * rw_ns_revnat gives a reply of a north-south flow its VIP:port back as
 * the source. meta packs the family (bits 0-7) and the protocol (8-15),
 * ports the reply's source (bits 16-31) and destination port (0-15),
 * network order each. Returns 1 if it rewrote the packet, 0 if the packet
 * is no such reply, < 0 if the skb could not be written (half rewritten:
 * the caller drops it).
 *
 * A global function: verified once, with its own stack frame (the key and
 * the addresses), which costs rw_from_endpoint's frame nothing.
 */
__attribute__((noinline)) int rw_ns_revnat(struct __sk_buff *skb, __u32 meta, __u32 ports)
{
	struct svc_nat_key k = {};
	struct svc_nat_value *vip;
	__u8 family = meta & 0xff, proto = (meta >> 8) & 0xff;
	__u8 tmp[32];
	__u32 l4off;

	if (!skb || (family != 4 && family != 6))
		return 0;
	k.sport = ports >> 16;
	k.dport = ports & 0xffff;
	k.proto = proto;
	k.family = family;
	k.dir = RW_NAT_REV;
	if (family == 4) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 12, k.saddr, 4) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 16, k.daddr, 4) < 0)
			return 0;
	} else {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, k.saddr, 16) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 24, k.daddr, 16) < 0)
			return 0;
	}
	vip = bpf_map_lookup_elem(&rw_svc_nat, &k);
	if (!vip || vip->family != family)
		return 0;
	l4off = ns_l4_off(skb, family, proto);
	if (!l4off)
		return 0;
	if (ns_rewrite(skb, family, proto, l4off, 1, vip->addr, vip->port, tmp) < 0)
		return -1;
	hostrt_count(RW_HR_SVC_REPLY, skb->len);
	return 1;
}
