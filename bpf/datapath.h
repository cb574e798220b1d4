/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The per-packet decision shared by both attach points of an endpoint's
 * host-side veth: parse, find the local endpoint and the remote identity,
 * let connection tracking pass replies, ask the endpoint's policy map about
 * every other packet (cached per CT entry by policy revision), count and
 * report the verdict.
 *
 * With rw_redirect_peer set, a packet an endpoint sends to another local
 * endpoint is also decided for the receiver (its ingress, exactly as
 * rw_to_endpoint would) in the sender's program, then redirected straight
 * into the receiver's namespace: the host stack and the receiver's veth
 * egress hook never see it. See rw_local_deliver.
 *
 * With rw_host_routing set, a packet for any other destination leaves
 * through rw_fib_forward (hostrt.h), and rw_from_uplink delivers packets
 * from other hosts with rw_peer_deliver.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "datapath_types.h"
#include "datapath_maps.h"
#include "parse.h"
#include "ipcache.h"
#include "policy.h"
#include "ct.h"
#include "frag.h"
#include "events.h"
#include "hostrt.h"
#include "northsouth.h"

/*
 * rw_flow_scratch: one struct flow per CPU for the packet an ICMP error
 * quotes; on the stack it would cost 56 of the 512 bytes, twice (rw_enforce
 * is inlined in both paths).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow);
} rw_flow_scratch SEC(".maps");

/*
 * rw_pkt_flow: the flow of the packet a program decides (rw_handle,
 * rw_from_uplink), one per CPU, zeroed for each packet. In a map value
 * rather than on the stack for the verifier, which does not follow what is
 * stored in a map value: the parser's paths (family, protocol, fragment,
 * ICMP error, ...) meet before the decision instead of each being checked
 * through it, and after the sender's decision before the receiver's. With
 * it on the stack, rw_from_endpoint made the verifier process 188,093
 * instructions (local delivery and host routing on), most of an agent's
 * start-up CPU; now 46,506, rw_to_endpoint 24,125 instead of 48,581, and
 * rw_from_uplink 28,597 instead of 58,502.
 * A program runs to its end on its CPU before another can use the slot
 * (the redirects act after it returns).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow);
} rw_pkt_flow SEC(".maps");

/* Per-load settings, written by the agent before the programs load. */
volatile const __u8 rw_audit_mode = 0;    /* forward what policy would drop */
volatile const __u32 rw_trace_sample = 0; /* report 1 in N new flows; 0 = none */
volatile const __u8 rw_redirect_peer = 0; /* local delivery with bpf_redirect_peer */

/*
 * Pass lets later programs and the stack decide (TCX_NEXT / TC_ACT_UNSPEC):
 * rackwire only ever vetoes.
 */
#define RW_PASS TC_ACT_UNSPEC
#define RW_DROP TC_ACT_SHOT

static __always_inline int __rw_drop(struct __sk_buff *skb, struct flow *f, __u8 dir,
				     __u16 ep, __u32 src_id, __u32 dst_id, int reason,
				     __u32 ifindex)
{
	metrics_count(reason, dir, skb->len);
	event_emit(skb, f, dir, ep, src_id, dst_id, RW_VERDICT_DROPPED, reason, ifindex);
	return RW_DROP;
}

/*
 * rw_policy_verdict asks endpoint ep's policy map about a packet from or to
 * remote_id; pkt packs the policy port (host order, bits 0-15), the
 * protocol (16-23) and the direction (24-31). Returns 0 (allow), a policy
 * drop reason, or RW_DROP_NO_POLICY_MAP.
 *
 * A global function: the verifier checks it once, not once per path that
 * reaches it (both rw_enforce calls of rw_from_endpoint, established and
 * new flows), which keeps the programs far below its complexity limit.
 * Global functions need kernel 5.6 (below the ring buffer's 5.8).
 */
__attribute__((noinline)) int rw_policy_verdict(struct __sk_buff *skb, __u32 ep, __u32 remote_id,
						__u32 pkt)
{
	__u32 epid = ep & 0xffff;
	void *pmap;

	if (!skb)
		return RW_DROP_INVALID_PACKET;
	pmap = bpf_map_lookup_elem(&rw_policy_maps, &epid);
	if (!pmap)
		return RW_DROP_NO_POLICY_MAP;
	return policy_lookup(pmap, remote_id, bpf_htons(pkt & 0xffff), (pkt >> 16) & 0xff,
			     (pkt >> 24) & 1, skb->len);
}

/*
 * rw_enforce decides a parsed packet for the local endpoint epi in dir:
 * connection tracking, ICMP errors, identity, policy, audit, CT entry,
 * counters and events. ifindex is epi's host-side veth, for the events.
 * Returns RW_PASS or RW_DROP; *entry gets the flow's CT entry when the
 * packet passed as established or as a reply (else it is left alone).
 *
 * Replies and related ICMP errors pass on connection tracking alone. Every
 * other packet is decided by the current policy: an established packet
 * whose CT entry was checked at the current rw_verdict_rev passes at the
 * cost of one array lookup; otherwise identity and policy are looked up
 * again. If policy now refuses the flow, the packet is dropped and the
 * entry deleted, so the replies stop too (audit mode forwards, reports and
 * keeps the entry).
 */
static __always_inline int rw_enforce(struct __sk_buff *skb, struct flow *f, __u8 dir,
				      struct endpoint_info *epi, __u32 ifindex,
				      struct ct_entry **entry)
{
	__u32 remote_id, src_id, dst_id, rev;
	__u16 ep = epi->endpoint;
	struct ct_entry *e = 0;
	union ct_key key = {};
	__u8 audit;
	int ret;

	ret = ct_lookup(f, dir, ep, skb->len, &key, &e);
	if (ret == RW_CT_REPLY) {
		f->reply = 1;
		metrics_count(RW_REASON_FORWARDED, dir, skb->len);
		*entry = e;
		return RW_PASS;
	}
	/* Read before the policy lookup: a change after it bumps it again. */
	rev = verdict_rev();
	if (ret == RW_CT_ESTABLISHED) {
		if (e && e->rev == rev) {
			metrics_count(RW_REASON_FORWARDED, dir, skb->len);
			*entry = e;
			return RW_PASS;
		}
	} else if (f->inner_off) {
		/*
		 * An ICMP error about a tracked flow (packet too big,
		 * unreachable, time exceeded) is related: it passes like a
		 * reply, whatever the policy, so path MTU discovery works
		 * under default-deny. The quoted packet went the other way;
		 * only the 8 L4 bytes RFC 792 guarantees are read.
		 */
		__u32 zero = 0;
		struct flow *inner = bpf_map_lookup_elem(&rw_flow_scratch, &zero);

		if (inner)
			__builtin_memset(inner, 0, sizeof(*inner));
		if (inner && parse_inner(skb, f, inner) == 0 && inner->family == f->family &&
		    ct_related(inner, dir ^ 1, ep)) {
			metrics_count(RW_REASON_FORWARDED, dir, skb->len);
			return RW_PASS;
		}
	}

	/*
	 * A new flow, or an established one checked at an older revision:
	 * the same decision for both (one path keeps the verifier's work
	 * small); ct_allow tells them apart again by the entry.
	 */
	remote_id = ipcache_lookup(dir == RW_DIR_EGRESS ? f->daddr : f->saddr, f->family);
	src_id = dir == RW_DIR_EGRESS ? epi->identity : remote_id;
	dst_id = dir == RW_DIR_EGRESS ? remote_id : epi->identity;
	if (f->proto == IPPROTO_TCP && (f->tcp_flags & TCP_FLAG_SYN) &&
	    (f->tcp_flags & (TCP_FLAG_RST | TCP_FLAG_FIN)))
		return __rw_drop(skb, f, dir, ep, src_id, dst_id, RW_DROP_CT_INVALID, ifindex);

	ret = rw_policy_verdict(skb, ep, remote_id,
				bpf_ntohs(f->policy_port) | (__u32)f->proto << 16 | (__u32)dir << 24);
	audit = rw_audit_mode || (epi->flags & RW_EP_F_AUDIT);
	if (ret < 0 && (!audit || ret == RW_DROP_NO_POLICY_MAP)) {
		/* Revoked (or never allowed): the flow stops in both directions. */
		ct_delete(f, &key);
		return __rw_drop(skb, f, dir, ep, src_id, dst_id, ret, ifindex);
	}
	if (ret < 0) {
		metrics_count(RW_AUDIT_WOULD_DENY, dir, skb->len);
		event_emit(skb, f, dir, ep, src_id, dst_id, RW_VERDICT_AUDIT, ret, ifindex);
		ct_allow(f, &key, skb->len, remote_id, 1, rev);
		return RW_PASS;
	}

	metrics_count(RW_REASON_FORWARDED, dir, skb->len);
	if (ct_allow(f, &key, skb->len, remote_id, 0, rev) && rw_trace_sample &&
	    bpf_get_prandom_u32() % rw_trace_sample == 0)
		event_emit(skb, f, dir, ep, src_id, dst_id,
			   RW_VERDICT_FORWARDED, RW_REASON_FORWARDED, ifindex);
	return RW_PASS;
}

/* The smallest MTU of a device that carries the family (see rw_peer_deliver). */
#define RW_MIN_MTU4 68
#define RW_MIN_MTU6 1280

static __always_inline int __mac_zero(const __u8 *m)
{
	return !(m[0] | m[1] | m[2] | m[3] | m[4] | m[5]);
}

static __always_inline int __mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/*
 * rw_peer_deliver decides a packet for the local endpoint dst (its
 * ingress, rw_enforce, exactly as rw_to_endpoint would) and, if that
 * passes, does what the router would (MACs, TTL / hop limit, IPv4
 * checksum) and redirects it into dst's namespace with bpf_redirect_peer.
 * Anything it does not handle (no MACs known, dst's veth is the device the
 * packet came from, TTL about to expire, larger than dst's MTU) passes
 * untouched to the host stack, where rw_to_endpoint decides as before: the
 * eligibility checks run before any ingress decision, so no packet is
 * decided twice. slot is the rw_hostrt counter of a delivery (RW_HR_SLOTS:
 * none).
 */
static __always_inline int rw_peer_deliver(struct __sk_buff *skb, struct flow *f,
					   struct endpoint_info *dst, __u32 slot)
{
	__u8 l2[12], hb[4];
	__u32 ifindex, hop_off, mtu_len = 0;
	struct ct_entry *e = 0;
	int ret;

	ifindex = dst->ifindex;
	if (!ifindex || ifindex == skb->ifindex || __mac_zero(dst->mac) || __mac_zero(dst->node_mac)) {
		if (slot < RW_HR_SLOTS)
			hostrt_count(RW_HR_STACK_OTHER, skb->len);
		return RW_PASS;
	}
	/*
	 * TTL 1: the stack answers with time exceeded. For IPv4 the protocol
	 * and header checksum come along, for __hop_decrement.
	 */
	hop_off = f->family == 4 ? ETH_HLEN + 8 : ETH_HLEN + 7;
	if (bpf_skb_load_bytes(skb, hop_off, hb, 4) < 0 || hb[0] <= 1) {
		if (slot < RW_HR_SLOTS)
			hostrt_count(RW_HR_STACK_TTL, skb->len);
		return RW_PASS;
	}
	/*
	 * Too big for the receiver's veth: the redirect would drop it silently,
	 * the stack sends "fragmentation needed" / "packet too big". A frame
	 * within the smallest MTU the family can have on the veth fits
	 * whatever its MTU, without the helper's device lookup: 68 for IPv4
	 * (a veth's minimum), 1280 for IPv6 (below it the kernel takes IPv6
	 * off the device, and the endpoint could receive none anyway). Every
	 * packet of request/response traffic is such a frame.
	 */
	if (skb->len > ETH_HLEN + (f->family == 4 ? RW_MIN_MTU4 : RW_MIN_MTU6) &&
	    bpf_check_mtu(skb, ifindex, &mtu_len, 0, 0) != 0) {
		if (slot < RW_HR_SLOTS)
			hostrt_count(RW_HR_STACK_MTU, skb->len);
		return RW_PASS;
	}

	ret = rw_enforce(skb, f, RW_DIR_INGRESS, dst, ifindex, &e);
	if (ret != RW_PASS)
		return ret;

	__builtin_memcpy(&l2[0], dst->mac, 6);
	__builtin_memcpy(&l2[6], dst->node_mac, 6);
	if (__hop_decrement(skb, f->family, hop_off, hb) < 0 ||
	    bpf_skb_store_bytes(skb, 0, l2, 12, 0) < 0)
		goto fail;
	if (slot < RW_HR_SLOTS)
		hostrt_count(slot, skb->len);
	return bpf_redirect_peer(ifindex, 0);
fail:
	/* Decided but not deliverable (no memory to unshare the skb). */
	return __rw_drop(skb, f, RW_DIR_INGRESS, dst->endpoint, 0, 0, RW_DROP_INVALID_PACKET,
			 ifindex);
}

/*
 * rw_local_deliver runs in the sender's program after its egress policy let
 * the packet through to the local endpoint dst. Only what the host would
 * route goes the fast path (rw_peer_deliver): a frame sent to the sender's
 * gateway MAC, with both endpoints' MACs known; anything else passes to the
 * host stack.
 */
static __always_inline int rw_local_deliver(struct __sk_buff *skb, struct flow *f,
					    struct endpoint_info *src, struct endpoint_info *dst)
{
	__u8 l2[6];

	if (__mac_zero(src->node_mac))
		return RW_PASS;
	/* Only what the stack would route: sent to the sender's gateway MAC. */
	if (bpf_skb_load_bytes(skb, 0, l2, 6) < 0 || !__mac_eq(l2, src->node_mac))
		return RW_PASS;
	return rw_peer_deliver(skb, f, dst, RW_HR_SLOTS);
}

/*
 * rw_forward sends a packet the sender's egress policy let through on a
 * fast path: to a local endpoint (rw_local_deliver, with rw_redirect_peer)
 * or to any other destination (rw_fib_forward, with rw_host_routing, which
 * keeps the next hop in the flow's CT entry e when there is one).
 */
static __always_inline int rw_forward(struct __sk_buff *skb, struct flow *f,
				      struct endpoint_info *src, struct ct_entry *e)
{
	struct endpoint_info *dst;
	struct ip_key k = {};

	__builtin_memcpy(k.addr, f->daddr, 16);
	k.family = f->family;
	dst = bpf_map_lookup_elem(&rw_endpoints, &k);
	if (dst) {
		if (rw_redirect_peer)
			return rw_local_deliver(skb, f, src, dst);
		return RW_PASS;
	}
	if (rw_host_routing)
		return rw_fib_forward(skb, f->family,
				      (__u32)f->sport << 16 | f->dport, e);
	return RW_PASS;
}

/* rw_handle enforces dir (RW_DIR_EGRESS: sent by the endpoint) on skb. */
static __always_inline int rw_handle(struct __sk_buff *skb, __u8 dir)
{
	struct endpoint_info *epi;
	struct ct_entry *e = 0;
	struct ip_key lk = {};
	__u32 zero = 0;
	struct flow *f;
	int ret;

	/* Never missing: a per-CPU array of one. */
	f = bpf_map_lookup_elem(&rw_pkt_flow, &zero);
	if (!f)
		return RW_DROP;
	__builtin_memset(f, 0, sizeof(*f));
	ret = parse_packet(skb, f);
	if (ret == RW_PARSE_ARP)
		return RW_PASS;
	if (ret < 0)
		return __rw_drop(skb, f, dir, 0, 0, 0, ret, skb->ifindex);
	if (f->ndisc) {
		metrics_count(RW_REASON_FORWARDED, dir, skb->len);
		return RW_PASS;
	}

	__builtin_memcpy(lk.addr, dir == RW_DIR_EGRESS ? f->saddr : f->daddr, 16);
	lk.family = f->family;
	epi = bpf_map_lookup_elem(&rw_endpoints, &lk);
	if (!epi)
		return __rw_drop(skb, f, dir, 0, 0, 0,
				 dir == RW_DIR_EGRESS ? RW_DROP_SPOOFED_SOURCE : RW_DROP_NO_IDENTITY,
				 skb->ifindex);
	if (dir == RW_DIR_EGRESS && epi->ifindex && epi->ifindex != skb->ifindex)
		return __rw_drop(skb, f, dir, epi->endpoint, 0, 0, RW_DROP_SPOOFED_SOURCE,
				 skb->ifindex);
	/* A later fragment is decided on its first fragment's ports (frag.h). */
	if (f->frag == RW_FRAG_TAIL && frag_resolve(f) < 0)
		return __rw_drop(skb, f, dir, epi->endpoint, 0, 0, RW_DROP_FRAG_NO_HEAD,
				 skb->ifindex);

	ret = rw_enforce(skb, f, dir, epi, skb->ifindex, &e);
	if (ret == RW_PASS)
		frag_remember(skb, f);
	/*
	 * A backend's reply to a client that came in on an uplink for a VIP
	 * (north-south, northsouth.h) leaves with the VIP as its source: after
	 * connection tracking and policy, which saw the flow as the backend
	 * did, before it is forwarded.
	 */
	if (dir == RW_DIR_EGRESS && ret == RW_PASS && f->reply && f->frag == RW_FRAG_NONE &&
	    (f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP) &&
	    rw_ns_revnat(skb, f->family | (__u32)f->proto << 8, (__u32)f->sport << 16 | f->dport) < 0)
		return __rw_drop(skb, f, dir, epi->endpoint, 0, 0, RW_DROP_INVALID_PACKET,
				 skb->ifindex);
	if (dir == RW_DIR_EGRESS && (rw_redirect_peer || rw_host_routing) && ret == RW_PASS)
		return rw_forward(skb, f, epi, e);
	return ret;
}
