/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Structs and codes shared between the datapath programs and the Go control
 * plane (daemon/datapath). Every struct here has a Go mirror that names it;
 * a test compares sizes and offsets against the BTF of the compiled object,
 * so change both sides together and regenerate (make generate).
 */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h> /* struct bpf_spin_lock */

/* Direction relative to the endpoint: what is delivered to it is ingress. */
#define RW_DIR_INGRESS 0
#define RW_DIR_EGRESS  1

/*
 * policy_key.direction: bit 0 is the direction; bits 1-4 hold log2 of the
 * size of an aligned block of ports the entry covers (0 = one port); bit 7
 * marks the per-direction meta entry written by the agent.
 */
#define RW_KEY_DIR_MASK    0x01
#define RW_KEY_BLOCK_SHIFT 1
#define RW_KEY_BLOCK_MASK  0x1e
#define RW_KEY_META        0x80

/* policy_value.flags */
#define RW_POLICY_F_DENY          0x01 /* the entry denies */
#define RW_POLICY_F_META_HAS_DENY 0x02 /* meta entry: the direction has deny entries */
#define RW_POLICY_F_META_OPEN     0x04 /* meta entry: emergency allow-all is on */
#define RW_POLICY_F_EMERGENCY     0x04 /* entry written by the emergency allow-all */

/* endpoint_info.flags */
#define RW_EP_F_AUDIT 0x01 /* forward what policy would drop, and report it */

/* event.verdict */
#define RW_VERDICT_FORWARDED 0
#define RW_VERDICT_DROPPED   1
#define RW_VERDICT_AUDIT     2

/* Reasons: 0 forwarded, negative codes for drops; the Go side names them. */
enum rw_reason {
	RW_REASON_FORWARDED      = 0,
	RW_DROP_POLICY_DENIED    = -1,  /* no policy entry allows the packet */
	RW_DROP_POLICY_DENY_RULE = -2,  /* a deny entry matched */
	RW_DROP_NO_IDENTITY      = -3,  /* the local address is no known endpoint */
	RW_DROP_CT_INVALID       = -4,  /* impossible TCP flags on a new flow */
	RW_DROP_UNSUPPORTED_L3   = -5,  /* neither IPv4, IPv6 nor ARP */
	RW_DROP_UNSUPPORTED_L4   = -6,  /* IPv6 extension header chain too long */
	RW_AUDIT_WOULD_DENY      = -7,  /* audit mode forwarded a packet policy drops */
	RW_DROP_NO_POLICY_MAP    = -8,  /* endpoint has no policy map */
	RW_DROP_SPOOFED_SOURCE   = -9,  /* source address not owned by this veth */
	RW_DROP_INVALID_PACKET   = -10, /* truncated or malformed headers */
	RW_DROP_FRAGMENT         = -11, /* fragment that could change the L4 header it was decided on */
	RW_DROP_FRAG_NO_HEAD     = -12, /* later fragment whose first fragment was not seen or passed */
	RW_DROP_NO_SVC_BACKEND   = -13, /* to a service VIP with no active backend (sock_lb.c), or from an uplink with no local one (northsouth.h) */
	RW_REASON_COUNT          = 14,  /* metrics slots: -reason */
};

/*
 * rw_hostrt slots: what host routing (the fast path to and from other
 * hosts, hostrt.h) did with a packet, counted per CPU in a metrics_value.
 * The STACK_* slots are packets it left to the host stack, by why.
 */
enum rw_hostrt_slot {
	RW_HR_EGRESS_FWD      = 0, /* sent to the next hop (bpf_fib_lookup + bpf_redirect) */
	RW_HR_INGRESS_FWD     = 1, /* from an uplink into a local endpoint (bpf_redirect_peer) */
	RW_HR_STACK_TTL       = 2, /* TTL / hop limit <= 1: the stack sends time exceeded */
	RW_HR_STACK_MTU       = 3, /* larger than the next device's MTU: the stack reports it */
	RW_HR_STACK_NO_NEIGH  = 4, /* next hop's neighbour entry unknown: the stack resolves it */
	RW_HR_STACK_FIB       = 5, /* route lookup did not say "forward" (local, unreachable, ...) */
	RW_HR_STACK_OTHER     = 6, /* not for the host's MAC, no MACs known, fragment, ... */
	RW_HR_STACK_NOT_LOCAL = 7, /* uplink: no local endpoint has the destination */
	RW_HR_SVC_NEW_FLOW    = 8, /* uplink: a flow to a service VIP got a local backend (north-south) */
	RW_HR_SVC_TRANSLATED  = 9, /* uplink: a packet to a service VIP sent to its flow's local backend */
	RW_HR_SVC_REPLY       = 10, /* endpoint: a backend's reply given the VIP back as its source */
	RW_HR_EGRESS_CACHED   = 11, /* of RW_HR_EGRESS_FWD: sent to the flow's next hop kept in its CT entry */
	RW_HR_SLOTS           = 12,
};

/* IP address as a map key (rw_endpoints, rw_ipcache): IPv4 in the first 4 bytes. */
struct ip_key {
	__u8 addr[16]; /* network order */
	__u8 family;   /* 4 or 6 */
	__u8 pad[3];
};

/* rw_ipcache_lpm key: prefixlen counts 32 bits of family+pad plus the prefix. */
struct ipcache_lpm_key {
	__u32 prefixlen;
	__u8 family;   /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16]; /* network order */
};

/* rw_ipcache / rw_ipcache_lpm value. */
struct ipcache_value {
	__u32 identity;   /* security identity, host order */
	__u8 flags;
	__u8 host_family; /* 0 when no host IP is known */
	__u16 pad;
	__u8 host_ip[16]; /* node that owns the address, network order */
};

/* rw_endpoints value: a local endpoint. */
struct endpoint_info {
	__u32 ifindex;     /* host-side veth; 0 skips the anti-spoofing check */
	__u32 identity;    /* host order */
	__u16 endpoint;    /* endpoint id */
	__u8 flags;        /* RW_EP_F_* */
	__u8 pad;
	__u8 mac[6];       /* endpoint-side MAC */
	__u8 node_mac[6];  /* host-side MAC */
};

/* rw_policy_NNNNN key: exactly 8 bytes (docs/datapath.md "Policy map: key and value"). */
struct policy_key {
	__u32 identity;  /* remote identity, host order; 0 = any */
	__be16 dport;    /* network order; ICMP/ICMPv6 type; 0 = any */
	__u8 proto;      /* IP protocol; 0 = any */
	__u8 direction;  /* RW_DIR_* | block size << 1 | RW_KEY_META */
};

/* rw_policy_NNNNN value: 24 bytes. */
struct policy_value {
	__u16 proxy_port;  /* reserved for an L7 proxy, host order */
	__u8 flags;        /* RW_POLICY_F_* */
	__u8 pad1;
	__u16 meta_blocks; /* meta entry: bit n set = some entry covers 2^n ports; else 0 */
	__u16 pad2;
	__u64 packets;
	__u64 bytes;
};

/* rw_ct4_tcp / rw_ct4_other key: the tuple of the first packet of a flow, per endpoint and direction. */
struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;   /* network order; ICMP echo: id */
	__be16 dport;   /* network order */
	__u8 proto;
	__u8 direction; /* RW_DIR_* of the first packet */
	__u16 endpoint;
};

/* rw_ct6_tcp / rw_ct6_other key: as ct4_key for IPv6. */
struct ct6_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 direction;
	__u16 endpoint;
};

/* ct_entry.flags */
#define RW_CT_F_AUDIT        0x01 /* forwarded by audit mode: policy would drop it */
#define RW_CT_F_SEEN_NON_SYN 0x02 /* TCP: a packet without SYN was seen (established) */
#define RW_CT_F_FIN_FWD      0x04 /* TCP: FIN seen in the first packet's direction */
#define RW_CT_F_FIN_REV      0x08 /* TCP: FIN seen in the reply direction */
#define RW_CT_F_RST          0x10 /* TCP: RST seen */

/*
 * rw_ct{4,6}_{tcp,other} value, 64 bytes (layout version 3; version 2 had
 * 48 bytes without the next hop, version 1 40 bytes without rev in the
 * single maps rw_ct4 / rw_ct6).
 *
 * nh_*: the next hop of the flow's packets that the endpoint sends to
 * another host (host routing "bpf", hostrt.h), as bpf_fib_lookup last
 * answered for them; nh_ifindex 0 = none yet.
 */
struct ct_entry {
	__u64 created_ns;   /* CLOCK_MONOTONIC */
	__u64 last_seen_ns; /* CLOCK_MONOTONIC */
	__u64 packets;      /* both directions */
	__u64 bytes;
	__u32 remote_identity;
	__u32 rev;          /* rw_verdict_rev when policy last allowed (or audited) the flow */
	__u8 tcp_flags;     /* union of flags seen */
	__u8 flags;         /* RW_CT_F_* */
	__u16 nh_mtu;       /* the next hop device's MTU */
	__u32 nh_checked;   /* when the FIB answered: connection tracking's clock >> 20 (~1 ms) */
	__u32 nh_ifindex;   /* the next hop's device; 0 = none */
	__u8 nh_dmac[6];    /* the next hop's MAC */
	__u8 nh_smac[6];    /* the device's MAC */
};

/* rw_frag key: one fragmented datagram. */
struct frag_key {
	__u8 saddr[16]; /* network order; IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u32 id;       /* IPv4 identification (16 bits) or IPv6 fragment id, host order */
	__u8 proto;     /* IPv4 protocol; IPv6: the fragment header's next header */
	__u8 family;    /* 4 or 6 */
	__u16 pad;
};

/* rw_frag value: what the first fragment was decided on. */
struct frag_value {
	__u64 created_ns;    /* CLOCK_MONOTONIC, when the first fragment passed */
	__be16 sport;        /* network order; ICMP echo: id */
	__be16 dport;        /* network order */
	__be16 policy_port;  /* dport or ICMP type, network order */
	__u8 proto;          /* L4 protocol */
	__u8 pad;
};

/* svc_nat_key.dir */
#define RW_NAT_FWD 0 /* client -> VIP, as it arrived on the uplink; value: the backend */
#define RW_NAT_REV 1 /* backend -> client, the reply; value: the VIP */

/* rw_svc_nat key: one direction of a north-south flow (northsouth.h). */
struct svc_nat_key {
	__u8 saddr[16]; /* network order; IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__be16 sport;   /* network order */
	__be16 dport;   /* network order */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;    /* 4 or 6 */
	__u8 dir;       /* RW_NAT_* */
	__u8 pad;
};

/* rw_svc_nat value: the address a packet of that direction is rewritten to. */
struct svc_nat_value {
	__u8 addr[16];  /* network order */
	__be16 port;    /* network order */
	__u8 family;    /* 4 or 6 */
	__u8 pad;
};

/* rw_metrics value, per CPU; key = -reason * 2 + direction. */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* rw_events record. */
struct event {
	__u64 ts_ns;        /* CLOCK_MONOTONIC */
	__u32 src_identity;
	__u32 dst_identity;
	__u8 saddr[16];     /* network order */
	__u8 daddr[16];     /* network order */
	__be16 sport;
	__be16 dport;       /* ICMP: type */
	__u16 endpoint;
	__u8 family;
	__u8 proto;
	__u8 direction;
	__u8 verdict;       /* RW_VERDICT_* */
	__u16 pad;
	__s32 reason;       /* enum rw_reason */
	__u32 ifindex;
	__u32 len;          /* packet length */
};

/*
 * rw_event_limit value: one endpoint's event token bucket (events.h) and
 * what became of its events. allowed counts events that got a token, lost
 * those of them the transport refused; the agent reads it with BPF_F_LOCK.
 */
struct event_limit {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 tokens;     /* RW_EVENT_TOKEN per event */
	__u64 last_ns;    /* CLOCK_MONOTONIC of the last refill */
	__u64 allowed;
	__u64 suppressed;
	__u64 lost;
};
