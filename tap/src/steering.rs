// SPDX-License-Identifier: Apache-2.0
//! PLACEHOLDER (types only) until the steering map lands from its branch.

/// Largest Toeplitz key.
pub const KEY_LEN: usize = 40;
/// Largest indirection table.
pub const TABLE_LEN: usize = 128;
/// VIRTIO_NET_RSS_HASH_TYPE_IPv4.
pub const HASH_IPV4: u32 = 1 << 0;
/// VIRTIO_NET_RSS_HASH_TYPE_TCPv4.
pub const HASH_TCPV4: u32 = 1 << 1;
/// VIRTIO_NET_RSS_HASH_TYPE_UDPv4.
pub const HASH_UDPV4: u32 = 1 << 2;
/// VIRTIO_NET_RSS_HASH_TYPE_IPv6.
pub const HASH_IPV6: u32 = 1 << 3;
/// VIRTIO_NET_RSS_HASH_TYPE_TCPv6.
pub const HASH_TCPV6: u32 = 1 << 4;
/// VIRTIO_NET_RSS_HASH_TYPE_UDPv6.
pub const HASH_UDPV6: u32 = 1 << 5;
/// Every hash type the program computes.
pub const SUPPORTED_HASH_TYPES: u32 =
    HASH_IPV4 | HASH_TCPV4 | HASH_UDPV4 | HASH_IPV6 | HASH_TCPV6 | HASH_UDPV6;

/// A steering configuration in tun queue indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteerConfig {
    /// Hash types in force.
    pub hash_types: u32,
    /// Toeplitz key, zero-padded.
    pub key: [u8; KEY_LEN],
    /// Indirection table of tun queue indices.
    pub table: Vec<u16>,
    /// Tun queue of unclassified frames.
    pub unclassified: u16,
}

/// PLACEHOLDER.
pub struct SteeringMap;

impl SteeringMap {
    /// PLACEHOLDER.
    pub fn from_fd(_fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// PLACEHOLDER.
    pub fn publish(&self, _cfg: &SteerConfig) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}
