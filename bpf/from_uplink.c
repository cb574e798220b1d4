// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * rw_from_uplink: tc/tcx ingress of the host's uplinks ([datapath]
 * uplinks), attached only with host_routing "bpf". A packet from another
 * host for a local endpoint is decided by that endpoint's ingress policy
 * (the source's identity from the ipcache, connection tracking, events and
 * metrics exactly as rw_to_endpoint) and delivered straight into the
 * endpoint's namespace (rw_peer_deliver, bpf_redirect_peer). Everything
 * else — the host's own traffic (BGP, BFD, SSH), ARP and neighbour
 * discovery, fragments, what does not parse, destinations that are no local
 * endpoint — passes untouched (TC_ACT_UNSPEC: the next tcx program or tc
 * filter, then the stack), and so does what rw_peer_deliver leaves to the
 * stack. rackwire never drops on an uplink except by an endpoint's policy.
 */
#include "datapath.h"

SEC("tc")
int rw_from_uplink(struct __sk_buff *skb)
{
	struct endpoint_info *dst;
	struct ip_key k = {};
	struct flow f = {};
	int ret;

	if (skb->pkt_type != PACKET_HOST)
		return RW_PASS;
	ret = parse_packet(skb, &f);
	if (ret != 0 || f.ndisc)
		return RW_PASS;
	__builtin_memcpy(k.addr, f.daddr, 16);
	k.family = f.family;
	dst = bpf_map_lookup_elem(&rw_endpoints, &k);
	if (!dst) {
		hostrt_count(RW_HR_STACK_NOT_LOCAL, skb->len);
		return RW_PASS;
	}
	/* Fragments go the stack's way, where rw_to_endpoint reassembles the decision. */
	if (f.frag != RW_FRAG_NONE) {
		hostrt_count(RW_HR_STACK_OTHER, skb->len);
		return RW_PASS;
	}
	return rw_peer_deliver(skb, &f, dst, RW_HR_INGRESS_FWD);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
