/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service load balancing: the structs and maps of the socket load balancer
 * (sock_lb.c). Only that object includes this file, so the endpoint programs
 * and their maps are unchanged by it. Every struct has a Go mirror in
 * daemon/datapath/service.go, checked against this object's BTF.
 *
 * The agent owns every map here (SyncServices); the programs only read them,
 * except rw_svc_revnat, which the programs write at each translation.
 * rw_from_uplink includes it too: north-south balancing (northsouth_lb.h)
 * reads rw_services, the local backends' Maglev tables and rw_svc_backends.
 */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "datapath_types.h"

/* Slots of every service's Maglev table (a prime; Go: maglevM). */
#define RW_MAGLEV_M 1021

/* rw_mix spreads a socket cookie or a flow's hash over the Maglev slots. */
static __always_inline __u32 rw_mix(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return (__u32)x;
}

/* rw_services key: a frontend. */
struct svc_key {
	__u8 addr[16];  /* VIP, network order; IPv4 in the first 4 bytes */
	__be16 port;    /* network order */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;    /* 4 or 6 */
};

/* rw_services value. */
struct svc_value {
	__u32 id;       /* index of the service's Maglev table in rw_svc_maglev */
	__u32 count;    /* active backends; 0: connect fails (no service backend) */
	__u32 hash;     /* agent's digest of the backend set, for diffing after a restart */
	__u32 local;    /* rw_svc_maglev table of the active backends on this host, + 1; 0: none (north-south) */
};

/* rw_svc_backends value, and rw_svc_revnat value (the VIP). */
struct svc_addr {
	__u8 addr[16];  /* network order */
	__be16 port;    /* network order */
	__u8 family;    /* 4 or 6 */
	__u8 pad;
};

/* rw_svc_revnat key: a socket and the backend it was sent to. */
struct svc_revnat_key {
	__u64 cookie;   /* bpf_get_socket_cookie */
	__u8 addr[16];  /* backend, network order */
	__be16 port;    /* backend port, network order */
	__u8 family;
	__u8 pad;
	__u32 pad2;
};

/*
 * svc_event: struct event followed by the translation. The record is
 * longer than struct event, which is how the agent tells it apart; event
 * readers that know only struct event read its first part unchanged.
 */
struct svc_event {
	struct event ev;    /* daddr/dport: the backend chosen (the VIP when there is none) */
	__u8 vip[16];       /* network order */
	__be16 vip_port;    /* network order */
	__u16 pad;
	__u32 service;      /* rw_services id */
	__u32 backend;      /* rw_svc_backends id; 0 when none */
	__u32 pad2;
};

/* rw_services: frontend -> service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
} rw_services SEC(".maps");

/* rw_svc_backends: backend id (u32, from 1) -> address. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct svc_addr);
} rw_svc_backends SEC(".maps");

/* One service's Maglev table: slot -> backend id. */
struct rw_svc_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAGLEV_M);
	__type(key, __u32);
	__type(value, __u32);
};

/* rw_svc_maglev: service id -> its Maglev table (replaced whole by the agent). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__array(values, struct rw_svc_maglev_inner);
} rw_svc_maglev SEC(".maps");

/* rw_svc_revnat: (socket, backend) -> the VIP it stands for (UDP replies, getpeername). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_revnat_key);
	__type(value, struct svc_addr);
} rw_svc_revnat SEC(".maps");

/* Keeps the shared structs in the object's BTF for the Go layout test. */
struct rw_svc_btf_types {
	struct svc_key svc_key;
	struct svc_value svc_value;
	struct svc_addr svc_addr;
	struct svc_revnat_key svc_revnat_key;
	struct svc_event svc_event;
};
struct rw_svc_btf_types rw_svc_btf_types SEC(".rw_btf") __attribute__((used));
