/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map definitions of the datapath. Both programs include this file; the
 * agent creates each map once, pins it under the pin directory and hands the
 * same map to both objects, so the sizes here are only defaults the agent
 * overrides from the config.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "datapath_types.h"

/* rw_ipcache: exact host addresses (/32, /128) -> identity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ip_key);
	__type(value, struct ipcache_value);
} rw_ipcache SEC(".maps");

/* rw_ipcache_lpm: prefixes -> identity, looked up after rw_ipcache. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_lpm_key);
	__type(value, struct ipcache_value);
} rw_ipcache_lpm SEC(".maps");

/* rw_endpoints: local endpoint address -> endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ip_key);
	__type(value, struct endpoint_info);
} rw_endpoints SEC(".maps");

/* Template of rw_policy_NNNNN, one per endpoint. */
struct rw_policy_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
};

/* rw_policy_maps: endpoint id (u32) -> that endpoint's rw_policy_NNNNN. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__array(values, struct rw_policy_map);
} rw_policy_maps SEC(".maps");

/*
 * Connection tracking: TCP and everything else in separate LRU maps per
 * family, so churn of short UDP/ICMP flows never evicts TCP connections.
 */
struct rw_ct4_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct4_key);
	__type(value, struct ct_entry);
};

struct rw_ct6_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct6_key);
	__type(value, struct ct_entry);
};

struct rw_ct4_map rw_ct4_tcp SEC(".maps");
struct rw_ct4_map rw_ct4_other SEC(".maps");
struct rw_ct6_map rw_ct6_tcp SEC(".maps");
struct rw_ct6_map rw_ct6_other SEC(".maps");

/*
 * rw_verdict_rev: slot 0 holds the policy revision. The agent bumps it after
 * every change that can alter a verdict (policy maps, allow-all, audit flag,
 * ipcache, endpoints); a CT entry remembers the revision its flow was last
 * allowed at, and a non-reply packet of an entry with an older one is
 * decided by policy again.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} rw_verdict_rev SEC(".maps");

/* rw_frag: first fragments that passed, so the later ones get their ports. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
} rw_frag SEC(".maps");

/*
 * rw_events: drop, audit and sampled trace events. A ring buffer; the agent
 * turns it into a perf event array (one ring per CPU, max_entries = CPUs)
 * before loading when the kernel has no ring buffer or the config says
 * events = "perf" (events.h).
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} rw_events SEC(".maps");

/* rw_event_limit: endpoint id (u32) -> its event budget and counters. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct event_limit);
} rw_event_limit SEC(".maps");

/*
 * rw_event_scratch: one struct event per CPU, where event_emit builds the
 * record. On the stack it would cost the programs 80 of their 512 bytes.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct event);
} rw_event_scratch SEC(".maps");

/* rw_metrics: per-CPU packet and byte counters by reason and direction. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_REASON_COUNT * 2);
	__type(key, __u32);
	__type(value, struct metrics_value);
} rw_metrics SEC(".maps");

/* rw_hostrt: per-CPU host routing counters by enum rw_hostrt_slot (hostrt.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_HR_SLOTS);
	__type(key, __u32);
	__type(value, struct metrics_value);
} rw_hostrt SEC(".maps");

/*
 * rw_btf_types keeps every struct shared with Go in the object's BTF (clang
 * leaves out structs only reached through the inner-map template or sizeof),
 * so the Go layout test can check them. Never loaded: an unused section.
 */
struct rw_btf_types {
	struct ip_key ip_key;
	struct ipcache_lpm_key ipcache_lpm_key;
	struct ipcache_value ipcache_value;
	struct endpoint_info endpoint_info;
	struct policy_key policy_key;
	struct policy_value policy_value;
	struct ct4_key ct4_key;
	struct ct6_key ct6_key;
	struct ct_entry ct_entry;
	struct frag_key frag_key;
	struct frag_value frag_value;
	struct metrics_value metrics_value;
	struct event event;
	struct event_limit event_limit;
	enum rw_reason reason;
	enum rw_hostrt_slot hostrt_slot;
	struct svc_nat_key svc_nat_key;
	struct svc_nat_value svc_nat_value;
};
struct rw_btf_types rw_btf_types SEC(".rw_btf") __attribute__((used));
