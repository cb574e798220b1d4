/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The per-packet decision shared by both attach points of an endpoint's
 * host-side veth: parse, find the local endpoint and the remote identity,
 * let connection tracking pass established flows and replies, ask the
 * endpoint's policy map about new flows, count and report the verdict.
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
#include "events.h"

/* Per-load settings, written by the agent before the programs load. */
volatile const __u8 rw_audit_mode = 0;    /* forward what policy would drop */
volatile const __u32 rw_trace_sample = 0; /* report 1 in N new flows; 0 = none */

/*
 * Pass lets later programs and the stack decide (TCX_NEXT / TC_ACT_UNSPEC):
 * rackwire only ever vetoes.
 */
#define RW_PASS TC_ACT_UNSPEC
#define RW_DROP TC_ACT_SHOT

static __always_inline int __rw_drop(struct __sk_buff *skb, struct flow *f, __u8 dir,
				     __u16 ep, __u32 src_id, __u32 dst_id, int reason)
{
	metrics_count(reason, dir, skb->len);
	event_emit(skb, f, dir, ep, src_id, dst_id, RW_VERDICT_DROPPED, reason);
	return RW_DROP;
}

/* rw_handle enforces dir (RW_DIR_EGRESS: sent by the endpoint) on skb. */
static __always_inline int rw_handle(struct __sk_buff *skb, __u8 dir)
{
	struct endpoint_info *epi;
	struct flow f = {};
	struct ip_key lk = {};
	__u32 remote_id, src_id, dst_id, epid;
	__u8 audit;
	void *pmap;
	int ret;

	ret = parse_packet(skb, &f);
	if (ret == RW_PARSE_ARP)
		return RW_PASS;
	if (ret < 0)
		return __rw_drop(skb, &f, dir, 0, 0, 0, ret);
	if (f.ndisc) {
		metrics_count(RW_REASON_FORWARDED, dir, skb->len);
		return RW_PASS;
	}

	__builtin_memcpy(lk.addr, dir == RW_DIR_EGRESS ? f.saddr : f.daddr, 16);
	lk.family = f.family;
	epi = bpf_map_lookup_elem(&rw_endpoints, &lk);
	if (!epi)
		return __rw_drop(skb, &f, dir, 0, 0, 0,
				 dir == RW_DIR_EGRESS ? RW_DROP_SPOOFED_SOURCE : RW_DROP_NO_IDENTITY);
	if (dir == RW_DIR_EGRESS && epi->ifindex && epi->ifindex != skb->ifindex)
		return __rw_drop(skb, &f, dir, epi->endpoint, 0, 0, RW_DROP_SPOOFED_SOURCE);

	/* Established flows and replies need neither identity nor policy. */
	if (ct_lookup(&f, dir, epi->endpoint, skb->len) != RW_CT_NEW) {
		metrics_count(RW_REASON_FORWARDED, dir, skb->len);
		return RW_PASS;
	}

	/*
	 * An ICMP error about a tracked flow (packet too big, unreachable,
	 * time exceeded) is related: it passes like a reply. The quoted
	 * packet went the other way.
	 */
	if (f.inner_off) {
		struct flow inner = {};

		if (parse_inner(skb, &f, &inner) == 0 && inner.family == f.family &&
		    ct_related(&inner, dir ^ 1, epi->endpoint)) {
			metrics_count(RW_REASON_FORWARDED, dir, skb->len);
			return RW_PASS;
		}
	}

	remote_id = ipcache_lookup(dir == RW_DIR_EGRESS ? f.daddr : f.saddr, f.family);
	src_id = dir == RW_DIR_EGRESS ? epi->identity : remote_id;
	dst_id = dir == RW_DIR_EGRESS ? remote_id : epi->identity;
	if (f.proto == IPPROTO_TCP && (f.tcp_flags & TCP_FLAG_SYN) &&
	    (f.tcp_flags & (TCP_FLAG_RST | TCP_FLAG_FIN)))
		return __rw_drop(skb, &f, dir, epi->endpoint, src_id, dst_id, RW_DROP_CT_INVALID);

	epid = epi->endpoint;
	pmap = bpf_map_lookup_elem(&rw_policy_maps, &epid);
	if (!pmap)
		return __rw_drop(skb, &f, dir, epi->endpoint, src_id, dst_id, RW_DROP_NO_POLICY_MAP);

	audit = rw_audit_mode || (epi->flags & RW_EP_F_AUDIT);
	ret = policy_lookup(pmap, remote_id, f.policy_port, f.proto, dir, skb->len);
	if (ret < 0) {
		if (!audit)
			return __rw_drop(skb, &f, dir, epi->endpoint, src_id, dst_id, ret);
		metrics_count(RW_AUDIT_WOULD_DENY, dir, skb->len);
		event_emit(skb, &f, dir, epi->endpoint, src_id, dst_id, RW_VERDICT_AUDIT, ret);
		ct_create(&f, dir, epi->endpoint, skb->len, remote_id, 1);
		return RW_PASS;
	}

	ct_create(&f, dir, epi->endpoint, skb->len, remote_id, 0);
	metrics_count(RW_REASON_FORWARDED, dir, skb->len);
	if (rw_trace_sample && bpf_get_prandom_u32() % rw_trace_sample == 0)
		event_emit(skb, &f, dir, epi->endpoint, src_id, dst_id,
			   RW_VERDICT_FORWARDED, RW_REASON_FORWARDED);
	return RW_PASS;
}
