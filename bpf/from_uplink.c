// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * rw_from_uplink: tc/tcx ingress of the host's uplinks ([datapath]
 * uplinks), attached with host_routing "bpf" and wherever north-south
 * balancing is on ([bgp] announce_service_vips).
 *
 * A packet for a service VIP:port (a frontend in rw_services; only a
 * destination that is no local endpoint can be one) is balanced to one of
 * the service's backends on this host and translated to it (rw_ns_balance,
 * northsouth_lb.h); from there on it is a packet for that local endpoint.
 * A frontend without an active local backend drops.
 *
 * With host routing "bpf", a packet from another host (or a translated
 * one) for a local endpoint is decided by that endpoint's ingress policy
 * (the source's identity from the ipcache, connection tracking, events and
 * metrics exactly as rw_to_endpoint) and delivered straight into the
 * endpoint's namespace (rw_peer_deliver, bpf_redirect_peer). With
 * "legacy", it goes to the stack, which routes it to the endpoint, where
 * rw_to_endpoint decides.
 *
 * Everything else — the host's own traffic (BGP, BFD, SSH), ARP and
 * neighbour discovery, fragments, what does not parse, destinations that
 * are no local endpoint — passes untouched (TC_ACT_UNSPEC: the next tcx
 * program or tc filter, then the stack), and so does what rw_peer_deliver
 * leaves to the stack. rackwire drops on an uplink only by an endpoint's
 * policy or for a VIP it cannot balance.
 */
#include "datapath.h"
#include "northsouth_lb.h"

SEC("tc")
int rw_from_uplink(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct ip_key k = {};
	__u32 zero = 0;
	struct flow *f;
	int ret;

	if (skb->pkt_type != PACKET_HOST)
		return RW_PASS;
	/* Never missing: a per-CPU array of one (datapath.h). */
	f = bpf_map_lookup_elem(&rw_pkt_flow, &zero);
	if (!f)
		return RW_PASS;
	__builtin_memset(f, 0, sizeof(*f));
	ret = parse_packet(skb, f);
	if (ret != 0 || f->ndisc)
		return RW_PASS;
	/*
	 * A local endpoint's address is never a frontend (a VIP inside the
	 * workload CIDRs, where every endpoint's address lies, is refused:
	 * service/spec.go), so a packet for one is delivered without asking
	 * rw_services: most packets on an uplink of a host with host routing
	 * "bpf" skip the balancer's scratch, loads and lookup.
	 */
	__builtin_memcpy(k.addr, f->daddr, 16);
	k.family = f->family;
	dst = bpf_map_lookup_elem(&rw_endpoints, &k);
	if (!dst) {
		ret = rw_ns_balance(skb, f->family | (__u32)f->proto << 8 |
						 (__u32)f->tcp_flags << 16 | (__u32)f->frag << 24,
				    (__u32)f->sport << 16 | f->dport);
		if (ret)
			rw_ns_report(skb);
		if (ret < 0)
			return RW_DROP;
		if (ret == 0) {
			if (rw_host_routing)
				hostrt_count(RW_HR_STACK_NOT_LOCAL, skb->len);
			return RW_PASS;
		}
		/* Translated: the packet is now for the backend. */
		__builtin_memset(f, 0, sizeof(*f));
		if (parse_packet(skb, f) != 0)
			return RW_DROP;
		if (!rw_host_routing)
			return RW_PASS;
		__builtin_memcpy(k.addr, f->daddr, 16);
		k.family = f->family;
		dst = bpf_map_lookup_elem(&rw_endpoints, &k);
		if (!dst) {
			hostrt_count(RW_HR_STACK_NOT_LOCAL, skb->len);
			return RW_PASS;
		}
	}
	if (!rw_host_routing)
		return RW_PASS;
	/* Fragments go the stack's way, where rw_to_endpoint reassembles the decision. */
	if (f->frag != RW_FRAG_NONE) {
		hostrt_count(RW_HR_STACK_OTHER, skb->len);
		return RW_PASS;
	}
	return rw_peer_deliver(skb, f, dst, RW_HR_INGRESS_FWD);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
