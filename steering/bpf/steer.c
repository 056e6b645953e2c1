// SPDX-License-Identifier: Apache-2.0
/*
 * mqvmm's steering program: attached to a multiqueue tap with TUNSETSTEERINGEBPF, it runs for
 * every frame the host sends into the tap and returns the tun queue the frame goes to (the
 * kernel takes it modulo the number of attached queues). The queue is the guest's RSS choice:
 * the Toeplitz hash of the frame's addresses (and ports) under the guest's key, looked up in
 * the guest's indirection table, both published by mqvmm into the map (steer_map.h).
 *
 * Which fields are hashed follows virtio-net's RSS rules: TCP with HASH_TCPVx enabled -> source
 * address, destination address, source port, destination port; else UDP with HASH_UDPVx -> the
 * same; else HASH_IPVx -> the two addresses; else (and for non-IP frames) the slot's
 * `unclassified` queue. IPv4 fragments are hashed by address only (a later fragment has no
 * ports); IPv6 frames with an extension header likewise (the program does not walk the chain).
 * One 802.1Q or 802.1ad tag in the frame's data is skipped.
 *
 * The frame starts with its Ethernet header: the program runs from the tap's transmit path
 * (ndo_select_queue), before any header is pulled.
 */
#include <linux/bpf.h>
#include <linux/types.h>

#include "steer_map.h"

#define SEC(name) __attribute__((section(name), used))
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))
/* BTF map definitions, spelled the way loaders read them. */
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
	(void *)BPF_FUNC_skb_load_bytes;

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPV4_MF_AND_OFFSET 0x3fff

/* The longest hash input: two IPv6 addresses and two ports. */
#define INPUT_MAX 36

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mq_steer_map);
	__uint(map_flags, BPF_F_MMAPABLE);
} mq_steer SEC(".maps");

/* Big-endian 16-bit value at `p`. */
static __always_inline __u16 be16(const __u8 *p)
{
	return (__u16)((p[0] << 8) | p[1]);
}

/*
 * Fills `input` with the hash input of the frame for the enabled hash `types`; returns its
 * length, or 0 when no enabled type covers the frame.
 */
static __always_inline __u32 hash_input(struct __sk_buff *skb, __u32 types, __u8 *input)
{
	__u8 eth[4];
	__u32 l3 = ETH_HLEN;

	if (bpf_skb_load_bytes(skb, 12, eth, 2))
		return 0;
	__u16 proto = be16(eth);
	if (proto == ETH_P_8021Q || proto == ETH_P_8021AD) {
		if (bpf_skb_load_bytes(skb, 16, eth, 2))
			return 0;
		proto = be16(eth);
		l3 += 4;
	}

	if (proto == ETH_P_IP) {
		__u8 ip[10];
		if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)))
			return 0;
		__u32 ihl = ip[0] & 0x0f;
		if ((ip[0] >> 4) != 4 || ihl < 5)
			return 0;
		if (bpf_skb_load_bytes(skb, l3 + 12, input, 8))
			return 0;
		int fragment = (be16(&ip[6]) & IPV4_MF_AND_OFFSET) != 0;
		__u8 l4 = ip[9];
		if (!fragment && ((l4 == IPPROTO_TCP && (types & MQ_HASH_TCPV4)) ||
				  (l4 == IPPROTO_UDP && (types & MQ_HASH_UDPV4))) &&
		    bpf_skb_load_bytes(skb, l3 + ihl * 4, input + 8, 4) == 0)
			return 12;
		return (types & MQ_HASH_IPV4) ? 8 : 0;
	}

	if (proto == ETH_P_IPV6) {
		__u8 ip[8];
		if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)))
			return 0;
		if ((ip[0] >> 4) != 6)
			return 0;
		if (bpf_skb_load_bytes(skb, l3 + 8, input, 32))
			return 0;
		__u8 next = ip[6];
		if (((next == IPPROTO_TCP && (types & MQ_HASH_TCPV6)) ||
		     (next == IPPROTO_UDP && (types & MQ_HASH_UDPV6))) &&
		    bpf_skb_load_bytes(skb, l3 + 40, input + 32, 4) == 0)
			return 36;
		return (types & MQ_HASH_IPV6) ? 32 : 0;
	}

	return 0;
}

/*
 * Toeplitz hash of input[0..len) under `key`: for every set input bit i (most significant bit
 * of byte 0 first), XOR in the 32 key bits starting at bit i.
 */
static __always_inline __u32 toeplitz(const __u8 *key, const __u8 *input, __u32 len)
{
	__u32 window = ((__u32)key[0] << 24) | ((__u32)key[1] << 16) | ((__u32)key[2] << 8) | key[3];
	__u32 hash = 0;

	for (__u32 i = 0; i < INPUT_MAX; i++) {
		if (i >= len)
			break;
		__u32 byte = input[i];
		__u32 next = key[i + 4];
#pragma unroll
		for (int bit = 7; bit >= 0; bit--) {
			hash ^= window & -((byte >> bit) & 1);
			window = (window << 1) | ((next >> bit) & 1);
		}
	}
	return hash;
}

SEC("socket")
int mq_steer_prog(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct mq_steer_map *map = bpf_map_lookup_elem(&mq_steer, &zero);
	if (!map)
		return 0;
	const struct mq_steer_slot *slot = &map->slot[*(volatile __u32 *)&map->active & 1];
	__u32 types = slot->hash_types;

	__u8 input[INPUT_MAX];
	__builtin_memset(input, 0, sizeof(input));
	__u32 len = hash_input(skb, types, input);
	if (len == 0)
		return slot->unclassified;
	__u32 hash = toeplitz(slot->key, input, len);
	return slot->table[hash & slot->table_mask & (MQ_STEER_TABLE_LEN - 1)];
}

/* Uses no GPL-only helper. */
char _license[] SEC("license") = "Apache-2.0";
