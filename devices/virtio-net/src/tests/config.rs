// SPDX-License-Identifier: Apache-2.0
//! Options, offered features, feature masking, offload mapping, config space reads.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::*;
use crate::config::{ConfigError, ConfigSpace, Duplex, NetConfig, MAX_QUEUE_PAIRS};
use crate::features::{bit, offered_features, tun_offload_flags, Negotiated};
use crate::Net;

#[test]
fn offered_features_follow_the_options() {
    let always = [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_SPEED_DUPLEX,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ];
    let ctrl = [
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_RX_EXTRA,
        VIRTIO_NET_F_CTRL_VLAN,
        VIRTIO_NET_F_NOTF_COAL,
        VIRTIO_NET_F_VQ_NOTF_COAL,
    ];
    let never = [VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_HASH_REPORT];
    let uso_bits = [
        VIRTIO_NET_F_HOST_USO,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
    ];
    for (mtu, mq, uso, rss) in [
        (false, false, false, true),
        (false, true, true, false),
        (true, false, true, false),
        (true, true, false, true),
    ] {
        let f = offered_features(mtu, mq, uso, rss);
        assert_eq!(
            f & bit(VIRTIO_NET_F_RSS) != 0,
            mq && rss,
            "RSS offered iff steering is in place and the control queue is"
        );
        for b in uso_bits {
            assert_eq!(f & bit(b) != 0, uso, "bit {b} offered iff the tap does USO");
        }
        for b in always {
            assert_ne!(f & bit(b), 0, "bit {b} always offered");
        }
        for b in ctrl {
            assert_eq!(f & bit(b) != 0, mq, "bit {b} offered iff mq");
        }
        for b in never {
            assert_eq!(f & bit(b), 0, "bit {b} never offered");
        }
        assert_eq!(f & bit(VIRTIO_NET_F_MTU) != 0, mtu);
    }
}

#[test]
fn acked_features_are_masked_to_the_offer() {
    let (b, _, _) = backends(2);
    let mut net = Net::new(
        NetConfig {
            mq: false,
            ..Default::default()
        },
        b,
    )
    .unwrap();
    net.set_acked_features(u64::MAX);
    assert_eq!(net.acked_features(), net.avail_features());
    assert_eq!(net.acked_features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_eq!(net.acked_features() & bit(VIRTIO_NET_F_CTRL_RX), 0);
}

#[test]
fn guest_offloads_map_to_tun_flags() {
    let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
    let tso4 = bit(VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = bit(VIRTIO_NET_F_GUEST_TSO6);
    let ufo = bit(VIRTIO_NET_F_GUEST_UFO);
    let ecn = bit(VIRTIO_NET_F_GUEST_ECN);
    let uso4 = bit(VIRTIO_NET_F_GUEST_USO4);
    let uso6 = bit(VIRTIO_NET_F_GUEST_USO6);
    let cases = [
        (0, 0),
        (csum, libc::TUN_F_CSUM),
        (csum | tso4, libc::TUN_F_CSUM | libc::TUN_F_TSO4),
        (csum | tso6, libc::TUN_F_CSUM | libc::TUN_F_TSO6),
        (csum | ufo, libc::TUN_F_CSUM | libc::TUN_F_UFO),
        (
            csum | tso4 | tso6 | ufo,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO,
        ),
        // The kernel refuses segmentation offloads without TUN_F_CSUM.
        (tso4 | tso6 | ufo, 0),
        // ECN qualifies TSO, and means nothing without it.
        (
            csum | tso4 | ecn,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN,
        ),
        (csum | ecn, libc::TUN_F_CSUM),
        // USO: both IP versions or none (the tap refuses one alone).
        (
            csum | uso4 | uso6,
            libc::TUN_F_CSUM | tap::TUN_F_USO4 | tap::TUN_F_USO6,
        ),
        (csum | uso4, libc::TUN_F_CSUM),
    ];
    for (offloads, flags) in cases {
        assert_eq!(tun_offload_flags(offloads), flags, "offloads {offloads:#x}");
    }
}

#[test]
fn vnet_header_size_follows_version_1() {
    assert_eq!(Negotiated(bit(VIRTIO_F_VERSION_1)).vnet_hdr_len(), 12);
    assert_eq!(Negotiated(bit(VIRTIO_NET_F_MRG_RXBUF)).vnet_hdr_len(), 12);
    assert_eq!(Negotiated(0).vnet_hdr_len(), 10);
}

#[test]
fn options_are_validated() {
    let ok = NetConfig::default();
    assert_eq!(ok.validate(1), Ok(()));
    assert_eq!(ok.validate(16), Ok(()));
    assert_eq!(ok.validate(MAX_QUEUE_PAIRS), Ok(()));
    assert_eq!(
        ok.validate(0),
        Err(ConfigError::QueuePairCount { count: 0 })
    );
    assert_eq!(
        ok.validate(MAX_QUEUE_PAIRS + 1),
        Err(ConfigError::QueuePairCount {
            count: MAX_QUEUE_PAIRS + 1
        })
    );
    for size in [0u16, 1, 3, 100, 65535] {
        let c = NetConfig {
            queue_size: size,
            ..Default::default()
        };
        assert_eq!(c.validate(1), Err(ConfigError::QueueSize { size }));
    }
    for mac in [[1u8, 0, 0, 0, 0, 1], [0; 6], [0xff; 6]] {
        let c = NetConfig {
            mac,
            ..Default::default()
        };
        assert_eq!(c.validate(1), Err(ConfigError::Mac { mac }));
    }
    let c = NetConfig {
        mtu: Some(60),
        ..Default::default()
    };
    assert_eq!(c.validate(1), Err(ConfigError::Mtu { mtu: 60 }));
    let msg = ok.validate(0).unwrap_err().to_string();
    assert!(msg.contains("0 queue pairs"), "{msg}");
}

#[test]
fn config_reads_at_any_offset_and_length() {
    let cs = ConfigSpace::new([2, 0x11, 0x22, 0x33, 0x44, 0x55], 4, Some(9000), true)
        .with_link(25_000, Duplex::Half);
    let read = |offset: u64, len: usize| {
        let mut d = vec![0xee; len];
        cs.read(offset, &mut d);
        d
    };
    assert_eq!(read(0, 6), [2, 0x11, 0x22, 0x33, 0x44, 0x55]);
    assert_eq!(read(6, 2), [1, 0], "status: LINK_UP");
    assert_eq!(read(8, 2), [4, 0], "max_virtqueue_pairs");
    assert_eq!(read(10, 2), 9000u16.to_le_bytes());
    assert_eq!(read(3, 1), [0x33]);
    assert_eq!(read(5, 3), [0x55, 1, 0], "straddles mac and status");
    assert_eq!(read(7, 4), [0, 4, 0, 0x28]);
    assert_eq!(read(12, 4), 25_000u32.to_le_bytes(), "speed");
    assert_eq!(read(16, 1), [0], "duplex half");
    assert_eq!(read(16, 4), [0, 0, 0, 0], "past the end reads zero");
    assert_eq!(read(4096, 8), [0; 8]);
    assert_eq!(read(u64::MAX, 8), [0; 8]);
    assert_eq!(read(u64::MAX - 2, 4), [0; 4]);
    assert!(read(0, 0).is_empty());
    assert_eq!(read(0, 40)[17..], [0; 23]);
}

#[test]
fn device_config_space_shows_mac_pairs_mtu_and_link() {
    let (b, _, _) = backends(3);
    let cfg = NetConfig {
        mac: [2, 1, 2, 3, 4, 5],
        mtu: Some(1400),
        ..Default::default()
    };
    let net = Net::new(cfg, b).unwrap();
    let mut d = [0u8; 17];
    net.read_config(0, &mut d);
    // Speed and duplex default to 10 Gbit/s full.
    assert_eq!(
        d,
        [2, 1, 2, 3, 4, 5, 1, 0, 3, 0, 0x78, 0x05, 0x10, 0x27, 0, 0, 1]
    );
    assert_ne!(net.avail_features() & bit(VIRTIO_NET_F_SPEED_DUPLEX), 0);
    net.set_link_up(false);
    net.read_config(6, &mut d[..2]);
    assert_eq!(d[..2], [0, 0]);
}

#[test]
fn speed_and_duplex_are_validated_and_shown() {
    let (b, _, _) = backends(1);
    let cfg = NetConfig {
        speed_mbps: 100,
        duplex: Duplex::Half,
        ..Default::default()
    };
    let net = Net::new(cfg, b).unwrap();
    let mut d = [0u8; 5];
    net.read_config(12, &mut d);
    assert_eq!(d, [100, 0, 0, 0, 0]);
    for speed in [0, u32::MAX] {
        let cfg = NetConfig {
            speed_mbps: speed,
            ..Default::default()
        };
        assert_eq!(cfg.validate(1), Err(ConfigError::Speed { speed }));
    }
    assert_eq!("full".parse(), Ok(Duplex::Full));
    assert_eq!("half".parse(), Ok(Duplex::Half));
    assert!("auto".parse::<Duplex>().is_err());
}

#[test]
fn uso_is_offered_only_when_the_tap_takes_it() {
    for accepts in [false, true] {
        let (b, _, _) = backends(2);
        b[0].accept_uso.store(accepts, Ordering::SeqCst);
        let net = Net::new(NetConfig::default(), b).unwrap();
        let offered = net.avail_features();
        for f in [
            VIRTIO_NET_F_HOST_USO,
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
        ] {
            assert_eq!(offered & bit(f) != 0, accepts, "feature {f}");
        }
    }
}
