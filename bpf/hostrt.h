/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Host routing in BPF: the fast path to other hosts.
 *
 * rw_fib_forward runs in rw_from_endpoint after the sender's egress policy
 * let a packet through whose destination is no local endpoint. It asks the
 * kernel's FIB (bpf_fib_lookup, the same routes, rules and neighbours the
 * stack would use) and, when the answer is "forward to this next hop whose
 * MAC is known", does what the router would (TTL / hop limit, IPv4
 * checksum, MACs) and sends the packet out of the next hop's device with
 * bpf_redirect: the host's routing, netfilter (FORWARD, conntrack) and
 * qdisc-less forwarding path never see it. Anything it does not handle
 * passes untouched to the host stack, which then does exactly what it did
 * without the fast path: TTL about to expire (time exceeded), larger than
 * the next device's MTU (fragmentation needed / packet too big), no
 * neighbour entry yet (the stack resolves it; later packets take the fast
 * path), a route that is not "forward" (local, broadcast, unreachable,
 * blackhole, prohibit, forwarding disabled on the device), a frame not
 * addressed to the host. Every outcome is counted in rw_hostrt.
 *
 * The other direction, from an uplink into a local endpoint, is
 * rw_from_uplink (from_uplink.c).
 */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "datapath_types.h"
#include "datapath_maps.h"
#include "events.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/*
 * rw_fib_scratch: the bpf_fib_lookup parameters, one per CPU; on the stack
 * they would cost 64 of rw_from_endpoint's 512 bytes.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpf_fib_lookup);
} rw_fib_scratch SEC(".maps");

/* Per-load setting: 1 when [datapath] host_routing is in force as "bpf". */
volatile const __u8 rw_host_routing = 0;

/* hostrt_count adds one packet of len bytes to slot of rw_hostrt. */
static __always_inline void hostrt_count(__u32 slot, __u32 len)
{
	struct metrics_value *m = bpf_map_lookup_elem(&rw_hostrt, &slot);

	if (!m)
		return;
	m->packets++;
	m->bytes += len;
}

/*
 * __hop_decrement lowers the TTL (family 4) or hop limit of the packet. hb
 * holds the bytes read at hop_off: for IPv4 the four at ETH_HLEN + 8 (TTL,
 * protocol, header checksum), for IPv6 the hop limit. The IPv4 checksum is
 * updated incrementally in place (RFC 1624, as the kernel's own
 * ip_decrease_ttl does), so one store writes TTL and checksum together and
 * the 16-bit sum over the header, which CHECKSUM_COMPLETE covers, stays the
 * same. Returns < 0 if the skb could not be written.
 */
static __always_inline int __hop_decrement(struct __sk_buff *skb, __u32 family, __u32 hop_off,
					   __u8 *hb)
{
	if (family == 4) {
		__u16 csum;
		__u32 c;

		__builtin_memcpy(&csum, &hb[2], 2);
		c = (__u32)csum + bpf_htons(0x0100);
		csum = (__u16)(c + (c >= 0xffff));
		__builtin_memcpy(&hb[2], &csum, 2);
		hb[0]--;
		return bpf_skb_store_bytes(skb, hop_off, hb, 4, 0);
	}
	hb[0]--;
	return bpf_skb_store_bytes(skb, hop_off, hb, 1, 0);
}

/*
 * How long a flow keeps the next hop the FIB gave it, in units of 2^20 ns
 * of connection tracking's clock (ct_entry.last_seen_ns, which the packet
 * just set): 16 = 16.8 ms (plus a clock tick). A route, neighbour or MTU
 * change reaches the packets of established flows at most that late; new
 * flows always ask the FIB. The next hop is written field by field, the
 * device last: a packet of the same flow on another CPU at that instant
 * may read a mix of the old and the new answer (and be lost if the MAC
 * changed), as a packet in flight during a route change may be.
 */
#define RW_NH_RECHECK 16

/*
 * rw_fib_forward forwards an allowed packet of family (4 or 6) to its next
 * hop, or leaves it to the stack (returns TC_ACT_UNSPEC). ports packs the
 * L4 source (bits 16-31) and destination port (0-15), network order each,
 * for the multipath hash. e is the flow's CT entry (NULL for a flow's
 * first packet, whose entry is being created): the next hop the FIB gave
 * the flow within RW_NH_RECHECK is used again without asking, and a fresh
 * answer is kept there. Per flow, so multipath routes keep spreading flows
 * exactly as the FIB's hash does. Returns the bpf_redirect verdict,
 * TC_ACT_UNSPEC, or TC_ACT_SHOT when the packet was half rewritten (no
 * memory).
 *
 * A global function: verified once, with its own stack frame, so the fast
 * path costs rw_from_endpoint's frame nothing. Global functions need 5.6;
 * bpf_check_mtu (5.12) is only reached with rw_host_routing set, which the
 * agent sets only where the kernel has it (the verifier prunes the rest).
 */
__attribute__((noinline)) int rw_fib_forward(struct __sk_buff *skb, __u32 family, __u32 ports,
					     struct ct_entry *e)
{
	struct bpf_fib_lookup *p;
	__u32 zero = 0, hop_off, ifindex, mtu_len = 0, slot = RW_HR_STACK_OTHER, now;
	/* The IPv4 header, or the first 8 bytes of the IPv6 header. */
	__u8 h[20], l2[12], *hb;
	int rc;

	if (!skb || !rw_host_routing)
		return TC_ACT_UNSPEC;
	/* Only what the stack would route: a unicast frame to the host's MAC. */
	if (skb->pkt_type != PACKET_HOST)
		goto stack;
	/* One load per header (parse_packet checked the lengths before). */
	if (family == 4) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, h, 20) < 0)
			goto stack;
		hop_off = ETH_HLEN + 8;
	} else {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, h, 8) < 0)
			goto stack;
		hop_off = ETH_HLEN + 7;
	}
	/* The TTL / hop limit, then (IPv4) protocol and header checksum. */
	hb = family == 4 ? &h[8] : &h[7];
	if (hb[0] <= 1) {
		slot = RW_HR_STACK_TTL;
		goto stack;
	}

	/*
	 * The packet's own time: connection tracking just wrote it (one clock
	 * read per packet instead of two).
	 */
	now = e ? (__u32)(e->last_seen_ns >> 20) : 0;
	if (e && e->nh_ifindex && now - e->nh_checked < RW_NH_RECHECK) {
		/* As below: too big for the next device goes to the stack. */
		if (skb->len > (__u32)e->nh_mtu + ETH_HLEN && !skb->gso_size) {
			slot = RW_HR_STACK_MTU;
			goto stack;
		}
		ifindex = e->nh_ifindex;
		__builtin_memcpy(&l2[0], e->nh_dmac, 6);
		__builtin_memcpy(&l2[6], e->nh_smac, 6);
		hostrt_count(RW_HR_EGRESS_CACHED, skb->len);
		goto xmit;
	}

	p = bpf_map_lookup_elem(&rw_fib_scratch, &zero);
	if (!p)
		goto stack;
	__builtin_memset(p, 0, sizeof(*p));
	if (family == 4) {
		p->family = AF_INET;
		p->tos = h[1];
		p->l4_protocol = h[9];
		__builtin_memcpy(&p->ipv4_src, &h[12], 4);
		__builtin_memcpy(&p->ipv4_dst, &h[16], 4);
	} else {
		__be32 fi;

		/* Source and destination lie back to back. */
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, p->ipv6_src, 32) < 0)
			goto stack;
		p->family = AF_INET6;
		p->l4_protocol = h[6];
		__builtin_memcpy(&fi, h, 4);
		p->flowinfo = fi & bpf_htonl(0x0fffffff);
	}
	p->sport = ports >> 16;
	p->dport = ports & 0xffff;
	p->ifindex = skb->ingress_ifindex;

	rc = bpf_fib_lookup(skb, p, sizeof(*p), 0);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		slot = RW_HR_STACK_NO_NEIGH;
		goto stack;
	}
	/* The skb variant checks the next device's MTU itself. */
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		slot = RW_HR_STACK_MTU;
		goto stack;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || p->ifindex == skb->ingress_ifindex) {
		slot = RW_HR_STACK_FIB;
		goto stack;
	}
	/*
	 * Too big for the next device: the stack sends "fragmentation needed".
	 * The lookup above checked skb->len against that device's MTU with 4
	 * bytes of slack (a VLAN tag) and left the MTU in mtu_result, so only
	 * a frame longer than MTU + Ethernet header that is not GSO (the stack
	 * segments those, as bpf_check_mtu lets them pass) is left to the
	 * stack: the same answer as bpf_check_mtu for an Ethernet device,
	 * without a second helper call and device lookup. A kernel that left
	 * mtu_result at 0 gets bpf_check_mtu, and the flow keeps no next hop.
	 */
	if (!p->mtu_result) {
		if (bpf_check_mtu(skb, p->ifindex, &mtu_len, 0, 0) != 0) {
			slot = RW_HR_STACK_MTU;
			goto stack;
		}
	} else if (skb->len > (__u32)p->mtu_result + ETH_HLEN && !skb->gso_size) {
		slot = RW_HR_STACK_MTU;
		goto stack;
	} else if (e) {
		e->nh_mtu = p->mtu_result;
		e->nh_checked = now;
		__builtin_memcpy(e->nh_dmac, p->dmac, 6);
		__builtin_memcpy(e->nh_smac, p->smac, 6);
		e->nh_ifindex = p->ifindex;
	}
	ifindex = p->ifindex;
	__builtin_memcpy(&l2[0], p->dmac, 6);
	__builtin_memcpy(&l2[6], p->smac, 6);
xmit:
	/* The TTL / hop limit (and IPv4 checksum), then both MACs in one store. */
	if (__hop_decrement(skb, family, hop_off, hb) < 0 ||
	    bpf_skb_store_bytes(skb, 0, l2, 12, 0) < 0)
		goto fail;
	hostrt_count(RW_HR_EGRESS_FWD, skb->len);
	return bpf_redirect(ifindex, 0);
fail:
	metrics_count(RW_DROP_INVALID_PACKET, RW_DIR_EGRESS, skb->len);
	return TC_ACT_SHOT;
stack:
	hostrt_count(slot, skb->len);
	return TC_ACT_UNSPEC;
}
