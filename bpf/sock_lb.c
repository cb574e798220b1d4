// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Socket load balancing: cgroup-v2 socket address hooks that translate a
 * service VIP:port into one of its active backends when a socket connects
 * (TCP, connected UDP) or sends a datagram with an address (unconnected
 * UDP), and translate the backend back into the VIP where the application
 * reads its peer's address (UDP recvmsg, getpeername). The packets the
 * kernel then builds carry the backend's address from their first byte, so
 * the endpoint programs (rw_from_endpoint, rw_to_endpoint) decide policy
 * against the backend's identity and need no per-packet translation, and
 * the backend sees the client's own address.
 *
 * Backend choice: the service's Maglev table (rw_svc_maglev, built by the
 * agent) at a slot derived from the socket cookie, so every datagram of one
 * socket goes to one backend while the table is unchanged, and sockets
 * spread evenly. A connected socket keeps its backend for its lifetime: the
 * choice is made once, so backends coming and going never move it.
 *
 * No active backend: connect()/sendmsg() fail at once with ECONNREFUSED
 * (EPERM on kernels without bpf_set_retval, before 5.18), counted and
 * reported as RW_DROP_NO_SVC_BACKEND; never a hang.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "datapath_types.h"
#include "datapath_maps.h"
#include "events.h"
#include "ipcache.h"
#include "service.h"

#define SOCK_STREAM 1
#define SOCK_DGRAM  2
#define RW_ECONNREFUSED 111

/* Load-time: the kernel has bpf_set_retval for these hooks (5.18+). */
volatile const __u8 rw_have_set_retval = 0;

/* Egress is the only direction of a socket translation. */
#define RW_SVC_DIR RW_DIR_EGRESS

static __always_inline void svc_emit(void *ctx, const struct svc_key *k, const struct svc_addr *be,
				     __u32 svc, __u32 bid, __u8 verdict, int reason)
{
	struct event_limit *l = event_budget(0);
	struct svc_event e = {};

	if (!l)
		return;
	e.ev.ts_ns = bpf_ktime_get_ns();
	e.ev.family = k->family;
	e.ev.proto = k->proto;
	e.ev.direction = RW_SVC_DIR;
	e.ev.verdict = verdict;
	e.ev.reason = reason;
	if (be) {
		__builtin_memcpy(e.ev.daddr, be->addr, 16);
		e.ev.dport = be->port;
		e.ev.dst_identity = ipcache_lookup(be->addr, be->family);
	} else {
		__builtin_memcpy(e.ev.daddr, k->addr, 16);
		e.ev.dport = k->port;
	}
	__builtin_memcpy(e.vip, k->addr, 16);
	e.vip_port = k->port;
	e.service = svc;
	e.backend = bid;
	event_send(ctx, l, &e, sizeof(e));
}

/* svc_refuse fails the call: ECONNREFUSED where the kernel lets us say so. */
static __always_inline int svc_refuse(void *ctx, const struct svc_key *k, __u32 svc)
{
	metrics_count(RW_DROP_NO_SVC_BACKEND, RW_SVC_DIR, 0);
	svc_emit(ctx, k, NULL, svc, 0, RW_VERDICT_DROPPED, RW_DROP_NO_SVC_BACKEND);
	if (rw_have_set_retval)
		bpf_set_retval(-RW_ECONNREFUSED);
	return 0;
}

static __always_inline int svc_key_proto(struct bpf_sock_addr *ctx, struct svc_key *k)
{
	if (ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		k->proto = IPPROTO_TCP;
	else if (ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP)
		k->proto = IPPROTO_UDP;
	else
		return -1;
	return 0;
}

/*
 * sock_addr_get copies the call's destination address into out (16 bytes,
 * IPv4 in the first 4); sock_addr_set writes in back. The context's
 * address fields are read and written 4 bytes at a time, as the verifier
 * requires.
 */
static __always_inline void sock_addr_get(struct bpf_sock_addr *ctx, __u8 family, __u8 *out)
{
	__u32 a[4];

	if (family == 4) {
		a[0] = ctx->user_ip4;
		__builtin_memcpy(out, a, 4);
		return;
	}
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	__builtin_memcpy(out, a, 16);
}

static __always_inline void sock_addr_set(struct bpf_sock_addr *ctx, __u8 family, const __u8 *in)
{
	__u32 a[4];

	if (family == 4) {
		__builtin_memcpy(a, in, 4);
		ctx->user_ip4 = a[0];
		return;
	}
	__builtin_memcpy(a, in, 16);
	ctx->user_ip6[0] = a[0];
	ctx->user_ip6[1] = a[1];
	ctx->user_ip6[2] = a[2];
	ctx->user_ip6[3] = a[3];
}

/*
 * svc_xlate looks the destination up in rw_services and rewrites it to a
 * backend. Returns 1 (let the call go on, translated or not) or 0 (refuse).
 */
static __always_inline int svc_xlate(struct bpf_sock_addr *ctx, __u8 family)
{
	struct svc_revnat_key rk = {};
	struct svc_key k = {};
	struct svc_addr vip = {};
	struct svc_value *sv;
	struct svc_addr *be;
	__u32 slot, *bid;
	void *table;
	__u64 cookie;

	if (svc_key_proto(ctx, &k))
		return 1;
	k.family = family;
	sock_addr_get(ctx, family, k.addr);
	k.port = (__be16)ctx->user_port;
	sv = bpf_map_lookup_elem(&rw_services, &k);
	if (!sv)
		return 1;
	if (!sv->count)
		return svc_refuse(ctx, &k, sv->id);
	table = bpf_map_lookup_elem(&rw_svc_maglev, &sv->id);
	if (!table)
		return svc_refuse(ctx, &k, sv->id);
	cookie = bpf_get_socket_cookie(ctx);
	slot = rw_mix(cookie) % RW_MAGLEV_M;
	bid = bpf_map_lookup_elem(table, &slot);
	if (!bid || !*bid)
		return svc_refuse(ctx, &k, sv->id);
	be = bpf_map_lookup_elem(&rw_svc_backends, bid);
	if (!be || be->family != family)
		return svc_refuse(ctx, &k, sv->id);

	sock_addr_set(ctx, family, be->addr);
	ctx->user_port = (__u32)be->port;

	rk.cookie = cookie;
	__builtin_memcpy(rk.addr, be->addr, 16);
	rk.port = be->port;
	rk.family = family;
	__builtin_memcpy(vip.addr, k.addr, 16);
	vip.port = k.port;
	vip.family = family;
	bpf_map_update_elem(&rw_svc_revnat, &rk, &vip, BPF_ANY);

	svc_emit(ctx, &k, be, sv->id, *bid, RW_VERDICT_FORWARDED, RW_REASON_FORWARDED);
	return 1;
}

/* svc_revnat shows the VIP where the socket's peer is the backend it chose. */
static __always_inline int svc_revnat(struct bpf_sock_addr *ctx, __u8 family)
{
	struct svc_revnat_key rk = {};
	struct svc_addr *vip;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.family = family;
	sock_addr_get(ctx, family, rk.addr);
	rk.port = (__be16)ctx->user_port;
	vip = bpf_map_lookup_elem(&rw_svc_revnat, &rk);
	if (!vip)
		return 1;
	sock_addr_set(ctx, family, vip->addr);
	ctx->user_port = (__u32)vip->port;
	return 1;
}

SEC("cgroup/connect4")
int rw_sock_connect4(struct bpf_sock_addr *ctx) { return svc_xlate(ctx, 4); }

SEC("cgroup/connect6")
int rw_sock_connect6(struct bpf_sock_addr *ctx) { return svc_xlate(ctx, 6); }

SEC("cgroup/sendmsg4")
int rw_sock_sendmsg4(struct bpf_sock_addr *ctx) { return svc_xlate(ctx, 4); }

SEC("cgroup/sendmsg6")
int rw_sock_sendmsg6(struct bpf_sock_addr *ctx) { return svc_xlate(ctx, 6); }

SEC("cgroup/recvmsg4")
int rw_sock_recvmsg4(struct bpf_sock_addr *ctx) { return svc_revnat(ctx, 4); }

SEC("cgroup/recvmsg6")
int rw_sock_recvmsg6(struct bpf_sock_addr *ctx) { return svc_revnat(ctx, 6); }

SEC("cgroup/getpeername4")
int rw_sock_getpeername4(struct bpf_sock_addr *ctx) { return svc_revnat(ctx, 4); }

SEC("cgroup/getpeername6")
int rw_sock_getpeername6(struct bpf_sock_addr *ctx) { return svc_revnat(ctx, 6); }

char LICENSE[] SEC("license") = "Dual BSD/GPL";
