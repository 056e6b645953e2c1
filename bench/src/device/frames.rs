// SPDX-License-Identifier: Apache-2.0
//! The frames the device-path benchmark moves: Ethernet + IPv4 + TCP of a given total length,
//! with the virtio-net header a Linux guest (or the packet-socket source) puts in front.
//!
//! Frames up to [`MTU_FRAME`] bytes carry only a partial-checksum request
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), as a Linux guest sends TCP with CSUM negotiated; larger
//! frames are TSO frames (`gso_type` TCPV4, `gso_size` 1448, checksum offsets of the TCP
//! header), i.e. what a guest hands down with HOST_TSO4 and the tap hands up with TUN_F_TSO4.
//!
//! The "64 KiB" frame is 65535 bytes: the kernel segments a GSO packet of 65536 bytes or more
//! (`gso_max_size`) before the tap sees it, so that is the largest TSO frame a tap delivers.

/// Largest frame without segmentation offload: a 1500-byte IP packet plus the Ethernet header.
pub const MTU_FRAME: usize = 1514;
/// Ethernet + IPv4 + TCP headers (no options).
pub const HEADERS: usize = 14 + 20 + 20;
/// Smallest frame the benchmark builds (a 64-byte Ethernet frame, 10 bytes of payload).
pub const MIN_FRAME: usize = 64;
/// Largest frame: IPv4's total length is 16 bits.
pub const MAX_FRAME: usize = 14 + 65535;
/// Segment size of TSO frames (1500 MTU minus IPv4 and TCP headers and 12 bytes of options).
pub const GSO_SIZE: u16 = 1448;

/// `virtio_net_hdr.flags`: the checksum at `csum_start + csum_offset` must be completed.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type`: TCP over IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;

/// Addresses and ports of one TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: [u8; 4],
    /// Destination IPv4 address.
    pub dst_ip: [u8; 4],
    /// TCP source port.
    pub sport: u16,
    /// TCP destination port.
    pub dport: u16,
}

/// Whether a frame of `len` bytes is sent as a TSO frame.
pub fn is_gso(len: usize) -> bool {
    len > MTU_FRAME
}

fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An Ethernet/IPv4/TCP frame of exactly `len` bytes (clamped to [`MIN_FRAME`],
/// [`MAX_FRAME`]) for `flow`; the payload bytes are a counter pattern. The IPv4 checksum is
/// complete; the TCP checksum field holds the pseudo-header sum, as a sender using checksum
/// offload leaves it.
pub fn tcp_frame(len: usize, flow: &Flow) -> Vec<u8> {
    let len = len.clamp(MIN_FRAME, MAX_FRAME);
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&flow.dst_mac);
    f[6..12].copy_from_slice(&flow.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = 6; // TCP
        ip[12..16].copy_from_slice(&flow.src_ip);
        ip[16..20].copy_from_slice(&flow.dst_ip);
        let sum = !csum_fold(csum_add(0, ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let tcp_len = ip_len - 20;
    {
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&flow.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&flow.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH, ACK
        tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    }
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&flow.src_ip);
    pseudo[4..8].copy_from_slice(&flow.dst_ip);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&tcp_len.to_be_bytes());
    let partial = csum_fold(csum_add(0, &pseudo));
    f[50..52].copy_from_slice(&partial.to_be_bytes());
    for (i, b) in f[HEADERS..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// The 10-byte `virtio_net_hdr` for a TCP frame of `len` bytes: partial checksum always, TSO
/// when the frame is larger than [`MTU_FRAME`]. The 12-byte v1 header is this plus
/// `num_buffers` (0 from a driver; the device fills it on receive).
pub fn vnet_hdr(len: usize) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = HDR_F_NEEDS_CSUM;
    if is_gso(len) {
        h[1] = GSO_TCPV4;
        h[2..4].copy_from_slice(&(HEADERS as u16).to_le_bytes());
        h[4..6].copy_from_slice(&GSO_SIZE.to_le_bytes());
    }
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: tcphdr.check
    h
}

/// A short label for a frame size: `64 B`, `1514 B`, `64 KiB TSO`.
pub fn label(len: usize) -> String {
    if is_gso(len) && (len + 1).is_multiple_of(1024) {
        format!("{} KiB TSO", (len + 1) / 1024)
    } else if is_gso(len) && len.is_multiple_of(1024) {
        format!("{} KiB TSO", len / 1024)
    } else if is_gso(len) {
        format!("{len} B TSO")
    } else {
        format!("{len} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOW: Flow = Flow {
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_mac: [2, 0, 0, 0, 0, 1],
        src_ip: [10, 9, 0, 1],
        dst_ip: [10, 9, 0, 2],
        sport: 1234,
        dport: 5201,
    };

    #[test]
    fn frame_has_requested_length_and_valid_ip_checksum() {
        for len in [MIN_FRAME, MTU_FRAME, 65536] {
            let f = tcp_frame(len, &FLOW);
            assert_eq!(f.len(), len);
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, len - 14);
            // A correct IPv4 header sums to 0xffff.
            assert_eq!(csum_fold(csum_add(0, &f[14..34])), 0xffff);
            assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1234);
        }
        assert_eq!(tcp_frame(1, &FLOW).len(), MIN_FRAME);
        assert_eq!(tcp_frame(1 << 20, &FLOW).len(), MAX_FRAME);
    }

    #[test]
    fn header_requests_tso_only_for_big_frames() {
        let small = vnet_hdr(MTU_FRAME);
        assert_eq!((small[0], small[1]), (HDR_F_NEEDS_CSUM, 0));
        let big = vnet_hdr(65536);
        assert_eq!(big[1], GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([big[2], big[3]]), 54);
        assert_eq!(u16::from_le_bytes([big[4], big[5]]), GSO_SIZE);
        assert_eq!(u16::from_le_bytes([big[6], big[7]]), 34);
        assert_eq!(u16::from_le_bytes([big[8], big[9]]), 16);
    }

    #[test]
    fn labels() {
        assert_eq!(label(64), "64 B");
        assert_eq!(label(1514), "1514 B");
        assert_eq!(label(65536), "64 KiB TSO");
        assert_eq!(label(65535), "64 KiB TSO");
        assert_eq!(label(9000), "9000 B TSO");
    }
}
