/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Metrics and events: every verdict counts in rw_metrics; drops, audit
 * verdicts and a sample of new flows are reported on rw_events. A full
 * transport loses the event, never the packet.
 *
 * Events are rate-limited per endpoint: a token bucket in rw_event_limit,
 * keyed by the endpoint the event is about (0 for packets of no known
 * endpoint), refilled at rw_event_rate tokens per second up to
 * rw_event_burst. Every kind of event (drop, audit, trace) takes a token:
 * the budget protects the transport and the agent's reader, and an audit
 * flood costs exactly what a drop flood costs. An event without a token is
 * counted as suppressed, one that the transport refused (full, or in perf
 * mode no reader) as lost. The limiter only decides whether to report: the
 * packet's verdict is made before and never changes.
 *
 * The transport is chosen at load time (rw_events_perf): the BPF ring buffer
 * (5.8+) or, on older kernels or when forced, a perf event array. The agent
 * swaps the type of rw_events before loading; the branch of the other
 * transport is dead code for the verifier, which removes it before the
 * helpers are resolved, so an old kernel never sees bpf_ringbuf_output.
 */
#pragma once

#include <bpf/bpf_helpers.h>

#include "datapath_maps.h"
#include "parse.h"

/* Per-load settings of the event transport and limiter (see above). */
volatile const __u8 rw_events_perf = 0;         /* 1: perf event array, else ring buffer */
volatile const __u64 rw_event_rate = 100;       /* tokens per second */
volatile const __u64 rw_event_burst = 1000;     /* bucket size, in events */

#define RW_EVENT_TOKEN 1000000000ULL /* one event, in token units (rate * ns) */

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
 * event_budget takes a token of endpoint ep's bucket. Returns its limiter
 * entry when the event may be reported, NULL when it is suppressed (or the
 * entry could not be made, which reports nothing rather than unlimited).
 */
static __always_inline struct event_limit *event_budget(__u16 ep)
{
	__u64 now = bpf_ktime_get_ns(), cap = rw_event_burst * RW_EVENT_TOKEN;
	__u64 elapsed, fill;
	struct event_limit *l, init = {};
	__u32 key = ep;
	int ok = 0;

	l = bpf_map_lookup_elem(&rw_event_limit, &key);
	if (!l) {
		init.tokens = cap;
		init.last_ns = now;
		bpf_map_update_elem(&rw_event_limit, &key, &init, BPF_NOEXIST);
		l = bpf_map_lookup_elem(&rw_event_limit, &key);
		if (!l)
			return NULL;
	}
	/* Time to fill an empty bucket: bounds elapsed * rate below 2^64. */
	fill = rw_event_rate ? cap / rw_event_rate : 0;

	bpf_spin_lock(&l->lock);
	/* Another CPU may have refilled with a later clock reading. */
	elapsed = now > l->last_ns ? now - l->last_ns : 0;
	if (elapsed > fill)
		elapsed = fill;
	if (elapsed) {
		l->tokens += elapsed * rw_event_rate;
		if (l->tokens > cap)
			l->tokens = cap;
		l->last_ns = now;
	}
	if (l->tokens >= RW_EVENT_TOKEN) {
		l->tokens -= RW_EVENT_TOKEN;
		l->allowed++;
		ok = 1;
	} else {
		l->suppressed++;
	}
	bpf_spin_unlock(&l->lock);
	return ok ? l : NULL;
}

/*
 * event_send hands the record rec of size bytes to the transport, counting
 * it as lost in l when the transport refuses it. ctx is the program's
 * context (perf transport).
 */
static __always_inline void event_send(void *ctx, struct event_limit *l, void *rec, __u64 size)
{
	long err;

	if (rw_events_perf)
		err = bpf_perf_event_output(ctx, &rw_events, BPF_F_CURRENT_CPU, rec, size);
	else
		err = bpf_ringbuf_output(&rw_events, rec, size, 0);
	if (err)
		__sync_fetch_and_add(&l->lost, 1);
}

/*
 * event_emit reports one packet to rw_events, within ep's budget; ifindex
 * is the host-side veth of endpoint ep (the receiver's when the sender's
 * program decided for it).
 */
static __always_inline void event_emit(struct __sk_buff *skb, struct flow *f, __u8 dir,
				       __u16 ep, __u32 src_id, __u32 dst_id,
				       __u8 verdict, int reason, __u32 ifindex)
{
	struct event_limit *l = event_budget(ep);
	__u32 zero = 0;
	struct event *e;

	if (!l)
		return;
	e = bpf_map_lookup_elem(&rw_event_scratch, &zero);
	if (!e) {
		__sync_fetch_and_add(&l->lost, 1);
		return;
	}
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
	event_send(skb, l, e, sizeof(*e));
}
