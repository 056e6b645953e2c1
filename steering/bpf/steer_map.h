/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The value of mqvmm's steering map, shared by the eBPF program (steer.c), which reads it for
 * every frame the host sends into the tap, and mqvmm, which maps it and publishes the guest's
 * RSS configuration into it. Mirrored by tap::steering::{SlotLayout, MapLayout}, whose unit test
 * checks the offsets below; change both together.
 */
#ifndef MQVMM_STEER_MAP_H
#define MQVMM_STEER_MAP_H

#include <linux/types.h>

#define MQ_STEER_KEY_LEN 40
#define MQ_STEER_TABLE_LEN 128

/* virtio's VIRTIO_NET_RSS_HASH_TYPE_* bits. */
#define MQ_HASH_IPV4 (1u << 0)
#define MQ_HASH_TCPV4 (1u << 1)
#define MQ_HASH_UDPV4 (1u << 2)
#define MQ_HASH_IPV6 (1u << 3)
#define MQ_HASH_TCPV6 (1u << 4)
#define MQ_HASH_UDPV6 (1u << 5)

/* One configuration. 308 bytes. */
struct mq_steer_slot {
	__u32 hash_types;                   /* offset 0: enabled MQ_HASH_* bits */
	__u32 table_mask;                   /* offset 4: table length - 1 (a power of two - 1) */
	__u16 unclassified;                 /* offset 8: queue of frames no enabled type covers */
	__u16 reserved;                     /* offset 10 */
	__u8 key[MQ_STEER_KEY_LEN];         /* offset 12: Toeplitz key, zero-padded */
	__u16 table[MQ_STEER_TABLE_LEN];    /* offset 52: tun queue indices */
};

/* The map's one value. 624 bytes; all zero (nothing published) steers everything to queue 0. */
struct mq_steer_map {
	__u32 active;                       /* offset 0: the live slot, 0 or 1 */
	__u32 seq;                          /* offset 4: bumped by every publish */
	struct mq_steer_slot slot[2];       /* offset 8 */
};

_Static_assert(sizeof(struct mq_steer_slot) == 308, "mq_steer_slot layout");
_Static_assert(sizeof(struct mq_steer_map) == 624, "mq_steer_map layout");

#endif
