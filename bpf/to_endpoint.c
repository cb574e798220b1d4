// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * rw_to_endpoint: tc/tcx egress of an endpoint's host-side veth, i.e. what
 * is delivered to the endpoint (its ingress policy).
 */
#include "datapath.h"

SEC("tc")
int rw_to_endpoint(struct __sk_buff *skb)
{
	return rw_handle(skb, RW_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
