/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Metrics and events: every verdict counts in rw_metrics; drops, audit
 * verdicts and a sample of new flows go to the rw_events ring buffer. A full
 * ring buffer loses the event, never the packet.
 */
#pragma once

#include <bpf/bpf_helpers.h>

#include "datapath_maps.h"
#include "parse.h"

/* metrics_count adds one packet of len bytes to the reason's counter. */
static __always_inline void metrics_count(int reason, __u8 dir, __u32 len)
{
	__u32 key = (__u32)(-reason) * 2 + (dir & 1);
	struct metrics_value *m;

	if (reason > 0 || -reason >= RW_REASON_COUNT)
		return;
	m = bpf_map_lookup_elem(&rw_metrics, &key);
	if (!m)
		return;
	m->packets++;
	m->bytes += len;
}

/*
 * event_emit reports one packet to rw_events; ifindex is the host-side veth
 * of endpoint ep (the receiver's when the sender's program decided for it).
 */
static __always_inline void event_emit(struct __sk_buff *skb, struct flow *f, __u8 dir,
				       __u16 ep, __u32 src_id, __u32 dst_id,
				       __u8 verdict, int reason, __u32 ifindex)
{
	struct event *e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);

	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	__builtin_memcpy(e->saddr, f->saddr, 16);
	__builtin_memcpy(e->daddr, f->daddr, 16);
	e->sport = f->sport;
	e->dport = f->proto == IPPROTO_ICMP || f->proto == IPPROTO_ICMPV6 ?
		f->policy_port : f->dport;
	e->endpoint = ep;
	e->family = f->family;
	e->proto = f->proto;
	e->direction = dir;
	e->verdict = verdict;
	e->pad = 0;
	e->reason = reason;
	e->ifindex = ifindex;
	e->len = skb->len;
	bpf_ringbuf_submit(e, 0);
}
