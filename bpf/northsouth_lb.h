/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south balancing on the uplink: rw_ns_balance, the DNAT half of
 * northsouth.h, and rw_ns_report, its event; for rw_from_uplink only (they
 * read the service maps of service.h, which the endpoint programs do not
 * have).
 *
 * Backend choice: the frontend's table of its active backends on this host
 * (svc_value.local, a Maglev table in rw_svc_maglev built by the agent
 * from the merged service table's Local flags) at a slot derived from the
 * flow's 5-tuple. The choice is remembered in rw_svc_nat (client -> VIP),
 * so a flow keeps its backend while the table changes; a remembered
 * backend that is no longer an endpoint of this host is chosen again.
 *
 * A frontend without an active local backend drops the packet
 * (RW_DROP_NO_SVC_BACKEND, counted and reported with the VIP): this host
 * announces a VIP only while it has one, so such a packet arrives only
 * while a withdrawal converges, and passing it to the stack would route it
 * back out towards the router. Closed, never a loop.
 */
#pragma once

#include "datapath.h"
#include "service.h"

/*
 * rw_ns_scratch: rw_ns_balance's working set and rw_ns_report's event, one
 * per CPU (not pinned: nothing in it outlives one packet).
 */
struct ns_scratch {
	struct flow f;
	struct svc_key k;
	struct svc_nat_key nk;
	struct svc_nat_value be;
	struct svc_nat_value vip;
	struct ip_key ek;
	__u8 tmp[32];  /* ns_rewrite's */
	__u32 svc;     /* the event rw_ns_report sends: table id of the service, */
	__u32 bid;     /* the backend id chosen (0: none), */
	__s32 reason;  /* RW_REASON_FORWARDED or the drop reason, */
	__u8 report;   /* 1: there is one */
	__u8 pad[3];
	struct svc_event e;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ns_scratch);
} rw_ns_scratch SEC(".maps");

/* ns_hash mixes the 5-tuple of f into a Maglev slot seed. */
static __always_inline __u32 ns_hash(const struct flow *f)
{
	__u32 a[4], h;

	__builtin_memcpy(a, f->saddr, 16);
	h = a[0] ^ a[1] ^ a[2] ^ a[3];
	__builtin_memcpy(a, f->daddr, 16);
	return rw_mix((__u64)(h ^ a[0] ^ a[1] ^ a[2] ^ a[3]) << 32 |
		      (((__u32)f->sport << 16 | f->dport) ^ ((__u32)f->proto << 8)));
}

/*
 * rw_ns_report sends the event rw_ns_balance left in this CPU's scratch, if
 * any: a new north-south flow (with the backend) or a refusal, as a service
 * event (struct svc_event: the VIP, the service's table id, the backend
 * id), within the host's event budget (endpoint 0), as the socket load
 * balancer does. A global function of its own, called after rw_ns_balance
 * returned, so neither frame stacks on the other.
 */
__attribute__((noinline)) int rw_ns_report(struct __sk_buff *skb)
{
	struct event_limit *l;
	struct ns_scratch *s;
	struct svc_event *e;
	__u32 zero = 0;

	if (!skb)
		return 0;
	s = bpf_map_lookup_elem(&rw_ns_scratch, &zero);
	if (!s || !s->report)
		return 0;
	s->report = 0;
	l = event_budget(0);
	if (!l)
		return 0;
	e = &s->e;
	__builtin_memset(e, 0, sizeof(*e));
	e->ev.ts_ns = bpf_ktime_get_ns();
	e->ev.family = s->f.family;
	e->ev.proto = s->f.proto;
	e->ev.direction = RW_DIR_INGRESS;
	e->ev.verdict = s->reason ? RW_VERDICT_DROPPED : RW_VERDICT_FORWARDED;
	e->ev.reason = s->reason;
	e->ev.ifindex = skb->ifindex;
	e->ev.len = skb->len;
	__builtin_memcpy(e->ev.saddr, s->f.saddr, 16);
	e->ev.sport = s->f.sport;
	e->ev.src_identity = ipcache_lookup(s->f.saddr, s->f.family);
	if (!s->reason) {
		__builtin_memcpy(e->ev.daddr, s->be.addr, 16);
		e->ev.dport = s->be.port;
		e->ev.dst_identity = ipcache_lookup(s->be.addr, s->be.family);
	} else {
		__builtin_memcpy(e->ev.daddr, s->k.addr, 16);
		e->ev.dport = s->k.port;
	}
	__builtin_memcpy(e->vip, s->k.addr, 16);
	e->vip_port = s->k.port;
	e->service = s->svc;
	e->backend = s->bid;
	event_send(skb, l, e, sizeof(*e));
	return 0;
}

/*
 * rw_ns_balance translates a packet from an uplink whose destination is a
 * service frontend to a local backend. meta packs the parsed family (bits
 * 0-7), protocol (8-15), TCP flags (16-23) and RW_FRAG_* (24-31); ports
 * the source (bits 16-31) and destination port (0-15), network order each;
 * the addresses are read from the packet. Returns 0 (no frontend:
 * untouched), 1 (translated: the caller parses the packet again), or a
 * negative drop reason, already counted. Either of the last two may leave
 * an event for rw_ns_report.
 *
 * A global function working in rw_ns_scratch: the verifier counts its
 * frame on top of rw_from_uplink's, which holds the inlined
 * rw_peer_deliver, and both must fit in 512 bytes.
 */
__attribute__((noinline)) int rw_ns_balance(struct __sk_buff *skb, __u32 meta, __u32 ports)
{
	struct svc_nat_value *hit, *be, *vip;
	struct svc_nat_key *nk;
	struct svc_key *k;
	struct ip_key *ek;
	struct ns_scratch *s;
	struct flow *f;
	struct svc_value *sv;
	struct svc_addr *b;
	__u32 slot, tid, bid = 0, l4off, zero = 0;
	__u32 *pbid;
	void *table;
	int fresh = 0;

	if (!skb)
		return 0;
	s = bpf_map_lookup_elem(&rw_ns_scratch, &zero);
	if (!s)
		return 0;
	__builtin_memset(s, 0, offsetof(struct ns_scratch, report));
	f = &s->f;
	k = &s->k;
	nk = &s->nk;
	be = &s->be;
	vip = &s->vip;
	ek = &s->ek;
	f->family = meta & 0xff;
	f->proto = (meta >> 8) & 0xff;
	f->tcp_flags = (meta >> 16) & 0xff;
	f->frag = meta >> 24;
	f->sport = ports >> 16;
	f->dport = ports & 0xffff;
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	if (f->family == 4) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 12, f->saddr, 4) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 16, f->daddr, 4) < 0)
			return 0;
	} else if (f->family == 6) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, f->saddr, 16) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 24, f->daddr, 16) < 0)
			return 0;
	} else {
		return 0;
	}
	__builtin_memcpy(k->addr, f->daddr, 16);
	k->port = f->dport;
	k->proto = f->proto;
	k->family = f->family;
	sv = bpf_map_lookup_elem(&rw_services, k);
	if (!sv)
		return 0;
	/* A first fragment: the later ones could not follow it to the backend. */
	if (f->frag != RW_FRAG_NONE) {
		metrics_count(RW_DROP_FRAGMENT, RW_DIR_INGRESS, skb->len);
		return RW_DROP_FRAGMENT;
	}
	/* IPv6 with extension headers: not translated, so not let through either. */
	l4off = ns_l4_off(skb, f->family, f->proto);
	if (!l4off) {
		metrics_count(RW_DROP_UNSUPPORTED_L4, RW_DIR_INGRESS, skb->len);
		return RW_DROP_UNSUPPORTED_L4;
	}

	__builtin_memcpy(nk->saddr, f->saddr, 16);
	__builtin_memcpy(nk->daddr, f->daddr, 16);
	nk->sport = f->sport;
	nk->dport = f->dport;
	nk->proto = f->proto;
	nk->family = f->family;
	nk->dir = RW_NAT_FWD;
	hit = bpf_map_lookup_elem(&rw_svc_nat, nk);
	if (hit) {
		__builtin_memcpy(be, hit, sizeof(*be));
		__builtin_memcpy(ek->addr, be->addr, 16);
		ek->family = be->family;
		if (be->family == f->family && bpf_map_lookup_elem(&rw_endpoints, ek))
			goto rewrite;
	}
	if (!sv->local)
		goto refuse;
	tid = sv->local - 1;
	table = bpf_map_lookup_elem(&rw_svc_maglev, &tid);
	if (!table)
		goto refuse;
	slot = ns_hash(f) % RW_MAGLEV_M;
	pbid = bpf_map_lookup_elem(table, &slot);
	if (!pbid || !*pbid)
		goto refuse;
	bid = *pbid;
	b = bpf_map_lookup_elem(&rw_svc_backends, &bid);
	if (!b || b->family != f->family)
		goto refuse;
	__builtin_memcpy(be->addr, b->addr, 16);
	be->port = b->port;
	be->family = b->family;
	bpf_map_update_elem(&rw_svc_nat, nk, be, BPF_ANY);
	fresh = 1;
	hostrt_count(RW_HR_SVC_NEW_FLOW, skb->len);

rewrite:
	/* The reply's entry: on a new choice, and again on every SYN (LRU may have evicted it). */
	if (fresh || (f->proto == IPPROTO_TCP && (f->tcp_flags & TCP_FLAG_SYN))) {
		__builtin_memcpy(vip->addr, f->daddr, 16);
		vip->port = f->dport;
		vip->family = f->family;
		__builtin_memcpy(nk->saddr, be->addr, 16);
		__builtin_memcpy(nk->daddr, f->saddr, 16);
		nk->sport = be->port;
		nk->dport = f->sport;
		nk->dir = RW_NAT_REV;
		bpf_map_update_elem(&rw_svc_nat, nk, vip, BPF_ANY);
	}
	if (ns_rewrite(skb, f->family, f->proto, l4off, 0, be->addr, be->port, s->tmp) < 0) {
		metrics_count(RW_DROP_INVALID_PACKET, RW_DIR_INGRESS, skb->len);
		return RW_DROP_INVALID_PACKET;
	}
	hostrt_count(RW_HR_SVC_TRANSLATED, skb->len);
	if (fresh) {
		s->svc = sv->id;
		s->bid = bid;
		s->reason = RW_REASON_FORWARDED;
		s->report = 1;
	}
	return 1;

refuse:
	metrics_count(RW_DROP_NO_SVC_BACKEND, RW_DIR_INGRESS, skb->len);
	s->svc = sv->id;
	s->reason = RW_DROP_NO_SVC_BACKEND;
	s->report = 1;
	return RW_DROP_NO_SVC_BACKEND;
}
