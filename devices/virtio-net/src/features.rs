// SPDX-License-Identifier: Apache-2.0
//! Feature bits: what the device offers and what a negotiated set implies for the data path.

use virtio_bindings::virtio_config::{VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_RSS,
    VIRTIO_NET_F_SPEED_DUPLEX, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_VQ_NOTF_COAL,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The mask of feature bit number `bit`.
pub const fn bit(bit: u32) -> u64 {
    1u64 << bit
}

/// Size of `virtio_net_hdr_v1` (always carries `num_buffers` with VERSION_1).
pub const VNET_HDR_LEN_V1: usize = 12;
/// Size of the legacy `virtio_net_hdr` (no `num_buffers`), for a driver that acks neither
/// VERSION_1 nor MRG_RXBUF.
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` inside the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Guest receive offloads that `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET` may switch.
pub const GUEST_OFFLOAD_MASK: u64 = bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6);

/// Guest receive offloads under which the host may hand over GSO frames of up to 64 KiB.
pub const GUEST_GSO_MASK: u64 = bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6);

/// UDP segmentation both ways (Linux 6.2+: the tap takes and hands over UDP_L4 GSO frames
/// only from then on), offered only when the tap accepts TUN_F_USO4 | TUN_F_USO6.
pub const USO_FEATURES: u64 =
    bit(VIRTIO_NET_F_HOST_USO) | bit(VIRTIO_NET_F_GUEST_USO4) | bit(VIRTIO_NET_F_GUEST_USO6);

/// The TUNSETOFFLOAD flags whose acceptance tells that the tap does USO.
pub const TUN_USO_PROBE: u32 = tap::TUN_F_CSUM | tap::TUN_F_USO4 | tap::TUN_F_USO6;

/// Features offered whatever the configuration.
const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_SPEED_DUPLEX)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_F_RING_RESET);

/// Features that need the control queue. The spec (5.1.3.1) forbids offering a feature
/// whose dependency is not offered, so with `mq = false` none of them is offered.
const CTRL_FEATURES: u64 = bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
    | bit(VIRTIO_NET_F_CTRL_RX)
    | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
    | bit(VIRTIO_NET_F_CTRL_VLAN)
    | bit(VIRTIO_NET_F_NOTF_COAL)
    | bit(VIRTIO_NET_F_VQ_NOTF_COAL);

/// The feature set offered for a device with these options; `uso` says whether the tap
/// does UDP segmentation, `rss` whether the device steers received frames itself (the tap's
/// steering program is in place: see `steer.rs`). RSS needs the control queue.
pub fn offered_features(mtu: bool, mq: bool, uso: bool, rss: bool) -> u64 {
    let mut features = BASE_FEATURES;
    if mtu {
        features |= bit(VIRTIO_NET_F_MTU);
    }
    if uso {
        features |= USO_FEATURES;
    }
    if mq {
        features |= CTRL_FEATURES;
        if rss {
            features |= bit(VIRTIO_NET_F_RSS);
        }
    }
    features
}

/// A negotiated (acked and masked) feature set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated(pub u64);

impl Negotiated {
    /// Whether feature bit number `feature` was negotiated.
    pub fn has(self, feature: u32) -> bool {
        self.0 & bit(feature) != 0
    }

    /// Size of the vnet header in front of every frame.
    pub fn vnet_hdr_len(self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            VNET_HDR_LEN_V1
        } else {
            VNET_HDR_LEN_LEGACY
        }
    }

    /// Whether the driver accepts frames spread over several receive chains.
    pub fn mrg_rxbuf(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Whether used-buffer and available-buffer notifications follow EVENT_IDX.
    pub fn event_idx(self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }

    /// Whether descriptors may point to indirect tables.
    pub fn indirect_desc(self) -> bool {
        self.has(VIRTIO_RING_F_INDIRECT_DESC)
    }

    /// Whether multiqueue (and so VQ_PAIRS_SET) was negotiated.
    pub fn mq(self) -> bool {
        self.has(VIRTIO_NET_F_MQ)
    }

    /// Whether the control queue exists.
    pub fn ctrl_vq(self) -> bool {
        self.has(VIRTIO_NET_F_CTRL_VQ)
    }

    /// The guest receive offloads enabled at negotiation time.
    pub fn guest_offloads(self) -> u64 {
        self.0 & GUEST_OFFLOAD_MASK
    }
}

/// Maps guest receive offloads (VIRTIO_NET_F_GUEST_* bits) to `TUN_F_*` flags for
/// TUNSETOFFLOAD.
///
/// The kernel rejects segmentation offloads without `TUN_F_CSUM` (EINVAL), and a guest that
/// cannot take partial checksums cannot take segments either, so without GUEST_CSUM the
/// result is 0.
pub fn tun_offload_flags(guest_offloads: u64) -> u32 {
    if guest_offloads & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if guest_offloads & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if guest_offloads & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    // ECN only qualifies TSO.
    if guest_offloads & bit(VIRTIO_NET_F_GUEST_ECN) != 0
        && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0
    {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if guest_offloads & bit(VIRTIO_NET_F_GUEST_UFO) != 0 {
        flags |= libc::TUN_F_UFO;
    }
    // The tap takes USO for both IP versions or for none.
    let uso = bit(VIRTIO_NET_F_GUEST_USO4) | bit(VIRTIO_NET_F_GUEST_USO6);
    if guest_offloads & uso == uso {
        flags |= tap::TUN_F_USO4 | tap::TUN_F_USO6;
    }
    flags
}
