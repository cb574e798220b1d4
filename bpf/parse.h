/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet parsing: Ethernet, IPv4/IPv6 (with a bounded walk over IPv6
 * extension headers), and the L4 fields policy and connection tracking need.
 * Headers are copied with bpf_skb_load_bytes so non-linear skbs parse too.
 *
 * Fragments: a first fragment parses like a whole packet and is marked
 * RW_FRAG_HEAD; a later one carries no L4 header, is marked RW_FRAG_TAIL
 * and gets its ports from rw_frag (frag.h). Either way f->frag_id and
 * f->frag_proto name the datagram.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "datapath_types.h"

#define RW_PARSE_ARP 1 /* parse_packet result: ARP, passed untouched */

#define IP_OFFSET_MASK 0x1fff
#define IP_MF_FLAG     0x2000
#define IPV6_EXT_MAX 4

/* flow: the parsed packet. */
struct flow {
	__u8 saddr[16];      /* network order; IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__be16 sport;        /* connection tracking ports, network order */
	__be16 dport;
	__be16 policy_port;  /* dport, or the ICMP type, network order */
	__u8 proto;
	__u8 family;         /* 4 or 6 */
	__u8 tcp_flags;
	__u8 ndisc;          /* ICMPv6 neighbour discovery / MLD: always passed */
	__u32 inner_off;     /* ICMP error: offset of the quoted packet; else 0 */
	__u32 frag_id;       /* fragment: IPv4 identification or IPv6 fragment id */
	__u8 frag;           /* RW_FRAG_* */
	__u8 frag_proto;     /* fragment: rw_frag key proto (IPv6: fragment header's next header) */
	__u8 reply;          /* set by rw_enforce: connection tracking passed it as a reply */
};

#define RW_FRAG_NONE 0 /* not a fragment */
#define RW_FRAG_HEAD 1 /* first fragment: offset 0, more to come */
#define RW_FRAG_TAIL 2 /* later fragment: no L4 header */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

/*
 * __parse_l4 reads the L4 fields at off. quoted is set for the packet an
 * ICMP error quotes: then only the 8 bytes RFC 792 guarantees are read
 * (ports, ICMP type and echo id all lie within them; TCP flags do not).
 */
static __always_inline int __parse_l4(struct __sk_buff *skb, __u32 off, struct flow *f,
				      const int quoted)
{
	__u8 buf[14];

	switch (f->proto) {
	case IPPROTO_TCP:
		if (quoted) {
			if (bpf_skb_load_bytes(skb, off, buf, 8) < 0)
				return RW_DROP_INVALID_PACKET;
		} else {
			if (bpf_skb_load_bytes(skb, off, buf, 14) < 0)
				return RW_DROP_INVALID_PACKET;
			f->tcp_flags = buf[13];
		}
		__builtin_memcpy(&f->sport, &buf[0], 2);
		__builtin_memcpy(&f->dport, &buf[2], 2);
		f->policy_port = f->dport;
		break;
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (bpf_skb_load_bytes(skb, off, buf, 4) < 0)
			return RW_DROP_INVALID_PACKET;
		__builtin_memcpy(&f->sport, &buf[0], 2);
		__builtin_memcpy(&f->dport, &buf[2], 2);
		f->policy_port = f->dport;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		__u8 req = f->proto == IPPROTO_ICMP ? 8 : 128;
		__u8 rep = f->proto == IPPROTO_ICMP ? 0 : 129;
		__be16 id;

		if (bpf_skb_load_bytes(skb, off, buf, 8) < 0)
			return RW_DROP_INVALID_PACKET;
		__builtin_memcpy(&id, &buf[4], 2);
		f->policy_port = bpf_htons(buf[0]);
		/* Echo request and reply track as one flow keyed by the echo id. */
		if (buf[0] == req)
			f->sport = id;
		else if (buf[0] == rep)
			f->dport = id;
		if (quoted)
			break;
		if (f->proto == IPPROTO_ICMPV6 &&
		    ((buf[0] >= 130 && buf[0] <= 137) || buf[0] == 143))
			f->ndisc = 1;
		/* Errors quote the packet that caused them: see parse_inner. */
		if ((f->proto == IPPROTO_ICMP && (buf[0] == 3 || buf[0] == 11 || buf[0] == 12)) ||
		    (f->proto == IPPROTO_ICMPV6 && buf[0] >= 1 && buf[0] <= 4))
			f->inner_off = off + 8;
		break;
	}
	default:
		/* Other protocols: no ports; only any-port entries match. */
		break;
	}
	return 0;
}

/*
 * __parse_head parses the L4 header of a packet that has one. A first
 * fragment too short for the fields policy reads is refused as a fragment:
 * a later fragment could supply them after the decision (RFC 1858).
 */
static __always_inline int __parse_head(struct __sk_buff *skb, __u32 off, struct flow *f)
{
	int ret = __parse_l4(skb, off, f, 0);

	if (ret == RW_DROP_INVALID_PACKET && f->frag == RW_FRAG_HEAD)
		return RW_DROP_FRAGMENT;
	return ret;
}

static __always_inline int __parse_ipv4(struct __sk_buff *skb, struct flow *f)
{
	struct iphdr ip;
	__u32 hlen;
	__u16 fo;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return RW_DROP_INVALID_PACKET;
	hlen = ip.ihl * 4;
	if (ip.version != 4 || hlen < sizeof(ip))
		return RW_DROP_INVALID_PACKET;
	f->family = 4;
	f->proto = ip.protocol;
	__builtin_memcpy(f->saddr, &ip.saddr, 4);
	__builtin_memcpy(f->daddr, &ip.daddr, 4);
	fo = bpf_ntohs(ip.frag_off);
	if (fo & (IP_OFFSET_MASK | IP_MF_FLAG)) {
		f->frag_id = bpf_ntohs(ip.id);
		f->frag_proto = ip.protocol;
		f->frag = RW_FRAG_HEAD;
		if (fo & IP_OFFSET_MASK) {
			f->frag = RW_FRAG_TAIL;
			/* Offset 8 bytes could rewrite the TCP flags (RFC 1858). */
			if ((fo & IP_OFFSET_MASK) == 1 && ip.protocol == IPPROTO_TCP)
				return RW_DROP_FRAGMENT;
			return 0;
		}
	}
	return __parse_head(skb, ETH_HLEN + hlen, f);
}

/*
 * __ipv6_skip steps over the extension header at *off if it is one that
 * carries neither ports nor a fragment: returns 1 if it did, 0 if *nexthdr
 * is no such header, or a negative drop reason.
 */
static __always_inline int __ipv6_skip(struct __sk_buff *skb, __u32 *off, __u8 *nexthdr)
{
	__u8 ext[2];

	switch (*nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
		if (bpf_skb_load_bytes(skb, *off, ext, 2) < 0)
			return RW_DROP_INVALID_PACKET;
		*nexthdr = ext[0];
		*off += (ext[1] + 1) * 8;
		return 1;
	case IPPROTO_AH:
		if (bpf_skb_load_bytes(skb, *off, ext, 2) < 0)
			return RW_DROP_INVALID_PACKET;
		*nexthdr = ext[0];
		*off += (ext[1] + 2) * 4;
		return 1;
	}
	return 0;
}

/* __parse_ipv6 walks up to IPV6_EXT_MAX extension headers to the L4 header. */
static __always_inline int __parse_ipv6(struct __sk_buff *skb, struct flow *f)
{
	struct ipv6hdr ip6;
	__u32 off = ETH_HLEN + sizeof(ip6);
	__u8 nexthdr;
	int i, ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return RW_DROP_INVALID_PACKET;
	if (ip6.version != 6)
		return RW_DROP_INVALID_PACKET;
	f->family = 6;
	__builtin_memcpy(f->saddr, &ip6.saddr, 16);
	__builtin_memcpy(f->daddr, &ip6.daddr, 16);
	nexthdr = ip6.nexthdr;

	for (i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 ext[8];
		__u16 fo;

		ret = __ipv6_skip(skb, &off, &nexthdr);
		if (ret < 0)
			return ret;
		if (ret)
			continue;
		if (nexthdr != IPPROTO_FRAGMENT) {
			f->proto = nexthdr;
			return __parse_head(skb, off, f);
		}
		if (bpf_skb_load_bytes(skb, off, ext, 8) < 0)
			return RW_DROP_INVALID_PACKET;
		nexthdr = ext[0];
		off += 8;
		fo = (ext[2] << 8) | ext[3];
		/* Offset 0 without M is an atomic fragment: a whole packet (RFC 6946). */
		if (!(fo & 0xfff9))
			continue;
		f->frag_id = ((__u32)ext[4] << 24) | ((__u32)ext[5] << 16) |
			     ((__u32)ext[6] << 8) | ext[7];
		f->frag_proto = nexthdr;
		f->frag = RW_FRAG_HEAD;
		if (fo & 0xfff8) {
			f->frag = RW_FRAG_TAIL;
			f->proto = nexthdr;
			/* Offset 8 bytes could rewrite the TCP flags (RFC 1858). */
			if ((fo >> 3) == 1 && nexthdr == IPPROTO_TCP)
				return RW_DROP_FRAGMENT;
			return 0;
		}
	}
	return RW_DROP_UNSUPPORTED_L4;
}

/*
 * parse_inner fills in with the packet an ICMP error quotes: its IP header
 * (IPv6: and a fragment header right after it) and the first 8 bytes of
 * its L4 header, all RFC 792 guarantees. Returns 0, or a negative drop
 * reason when the quote is short or is of a later fragment (no ports).
 */
static __always_inline int parse_inner(struct __sk_buff *skb, struct flow *f, struct flow *in)
{
	__u32 off = f->inner_off;

	if (f->family == 4) {
		struct iphdr ip;
		__u32 hlen;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return RW_DROP_INVALID_PACKET;
		hlen = ip.ihl * 4;
		if (ip.version != 4 || hlen < sizeof(ip))
			return RW_DROP_INVALID_PACKET;
		/* A later fragment quotes no ports. */
		if (bpf_ntohs(ip.frag_off) & IP_OFFSET_MASK)
			return RW_DROP_FRAGMENT;
		in->family = 4;
		in->proto = ip.protocol;
		__builtin_memcpy(in->saddr, &ip.saddr, 4);
		__builtin_memcpy(in->daddr, &ip.daddr, 4);
		off += hlen;
	} else {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return RW_DROP_INVALID_PACKET;
		in->family = 6;
		in->proto = ip6.nexthdr;
		__builtin_memcpy(in->saddr, &ip6.saddr, 16);
		__builtin_memcpy(in->daddr, &ip6.daddr, 16);
		off += sizeof(ip6);
		/*
		 * A quoted first fragment (the sender fragmented a datagram the
		 * link could not carry): the ports follow its fragment header.
		 */
		if (in->proto == IPPROTO_FRAGMENT) {
			__u8 ext[4];

			if (bpf_skb_load_bytes(skb, off, ext, 4) < 0)
				return RW_DROP_INVALID_PACKET;
			if (((ext[2] << 8) | ext[3]) & 0xfff8)
				return RW_DROP_FRAGMENT;
			in->proto = ext[0];
			off += 8;
		}
	}
	return __parse_l4(skb, off, in, 1);
}

/* parse_packet fills f; returns 0, RW_PARSE_ARP, or a negative drop reason. */
static __always_inline int parse_packet(struct __sk_buff *skb, struct flow *f)
{
	switch (skb->protocol) {
	case bpf_htons(ETH_P_IP):
		return __parse_ipv4(skb, f);
	case bpf_htons(ETH_P_IPV6):
		return __parse_ipv6(skb, f);
	case bpf_htons(ETH_P_ARP):
		return RW_PARSE_ARP;
	default:
		return RW_DROP_UNSUPPORTED_L3;
	}
}
