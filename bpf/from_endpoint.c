// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * rw_from_endpoint: tc/tcx ingress of an endpoint's host-side veth, i.e. what
 * the endpoint sends (its egress policy).
 */
#include "datapath.h"

SEC("tc")
int rw_from_endpoint(struct __sk_buff *skb)
{
	return rw_handle(skb, RW_DIR_EGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
