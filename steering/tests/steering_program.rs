//! The steering program as the kernel runs it (BPF_PROG_TEST_RUN), against a reference model
//! built from `tap::steering::toeplitz` and the published table: every frame kind the program
//! tells apart, with each hash type disabled in turn. The configuration goes in through
//! `tap::steering::SteeringMap::from_fd` on the program's real map, as mqvmm publishes it.
//! Needs root (CAP_BPF); skips with one line otherwise.

use std::net::{Ipv4Addr, Ipv6Addr};

use mqvmm_tests::skip;
use tap::steering::{
    toeplitz, SteerConfig, SteeringMap, HASH_IPV4, HASH_IPV6, HASH_TCPV4, HASH_TCPV6, HASH_UDPV4,
    HASH_UDPV6, KEY_LEN, SUPPORTED_HASH_TYPES,
};

const MS_KEY: [u8; KEY_LEN] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

#[derive(Clone, Copy, Debug)]
enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// A test frame: what the reference model hashes, and how the frame is built.
#[derive(Clone, Debug)]
struct Frame {
    name: String,
    addrs: Option<Addrs>,
    proto: u8,
    ports: (u16, u16),
    /// IPv4 flags+offset field (MF = 0x2000).
    frag: u16,
    ihl: u8,
    vlan: Option<u16>,
    /// IPv6: a hop-by-hop options header before `proto`.
    ext_header: bool,
}

impl Frame {
    fn v4(name: &str, src: [u8; 4], dst: [u8; 4], proto: u8, ports: (u16, u16)) -> Frame {
        Frame {
            name: name.to_owned(),
            addrs: Some(Addrs::V4(src.into(), dst.into())),
            proto,
            ports,
            frag: 0,
            ihl: 5,
            vlan: None,
            ext_header: false,
        }
    }

    fn v6(name: &str, src: &str, dst: &str, proto: u8, ports: (u16, u16)) -> Frame {
        Frame {
            name: name.to_owned(),
            addrs: Some(Addrs::V6(src.parse().unwrap(), dst.parse().unwrap())),
            proto,
            ports,
            frag: 0,
            ihl: 5,
            vlan: None,
            ext_header: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1];
        if let Some(tci) = self.vlan {
            f.extend(0x8100u16.to_be_bytes());
            f.extend(tci.to_be_bytes());
        }
        let mut l4 = Vec::new();
        l4.extend(self.ports.0.to_be_bytes());
        l4.extend(self.ports.1.to_be_bytes());
        l4.extend([0u8; 16]);
        match self.addrs {
            None => {
                // ARP request.
                f.extend(0x0806u16.to_be_bytes());
                f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend([2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
            }
            Some(Addrs::V4(src, dst)) => {
                f.extend(0x0800u16.to_be_bytes());
                let options = usize::from(self.ihl - 5) * 4;
                let total = (20 + options + l4.len()) as u16;
                f.extend([0x40 | self.ihl, 0]);
                f.extend(total.to_be_bytes());
                f.extend([0, 1]);
                f.extend(self.frag.to_be_bytes());
                f.extend([64, self.proto, 0, 0]);
                f.extend(src.octets());
                f.extend(dst.octets());
                // NOP options, with bytes a wrong IHL would take for ports.
                f.extend(std::iter::repeat_n(1u8, options));
                f.extend(&l4);
            }
            Some(Addrs::V6(src, dst)) => {
                f.extend(0x86ddu16.to_be_bytes());
                let mut payload = Vec::new();
                let next = if self.ext_header {
                    payload.extend([self.proto, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop, PadN
                    0
                } else {
                    self.proto
                };
                payload.extend(&l4);
                f.extend([0x60, 0, 0, 0]);
                f.extend((payload.len() as u16).to_be_bytes());
                f.extend([next, 64]);
                f.extend(src.octets());
                f.extend(dst.octets());
                f.extend(payload);
            }
        }
        f
    }

    /// The queue virtio's RSS rules pick for this frame under `cfg`.
    fn expected_queue(&self, cfg: &SteerConfig) -> u16 {
        let types = cfg.hash_types;
        let (addrs, tcp, udp, ip) = match self.addrs {
            None => return cfg.unclassified,
            Some(Addrs::V4(s, d)) => (
                [s.octets().to_vec(), d.octets().to_vec()].concat(),
                HASH_TCPV4,
                HASH_UDPV4,
                HASH_IPV4,
            ),
            Some(Addrs::V6(s, d)) => (
                [s.octets().to_vec(), d.octets().to_vec()].concat(),
                HASH_TCPV6,
                HASH_UDPV6,
                HASH_IPV6,
            ),
        };
        let l4_visible = self.frag & 0x3fff == 0 && !self.ext_header;
        let input = if l4_visible
            && ((self.proto == TCP && types & tcp != 0) || (self.proto == UDP && types & udp != 0))
        {
            let mut input = addrs;
            input.extend(self.ports.0.to_be_bytes());
            input.extend(self.ports.1.to_be_bytes());
            input
        } else if types & ip != 0 {
            addrs
        } else {
            return cfg.unclassified;
        };
        let hash = toeplitz(&cfg.key, &input);
        cfg.table[hash as usize & (cfg.table.len() - 1)]
    }
}

fn frames() -> Vec<Frame> {
    let mut frames = vec![
        Frame::v4(
            "ipv4 tcp",
            [66, 9, 149, 187],
            [161, 142, 100, 80],
            TCP,
            (2794, 1766),
        ),
        Frame::v4(
            "ipv4 udp",
            [199, 92, 111, 2],
            [65, 69, 140, 83],
            UDP,
            (14230, 4739),
        ),
        Frame::v4(
            "ipv4 icmp",
            [24, 19, 198, 95],
            [12, 22, 207, 184],
            ICMP,
            (0, 0),
        ),
        Frame::v6(
            "ipv6 tcp",
            "3ffe:2501:200:1fff::7",
            "3ffe:2501:200:3::1",
            TCP,
            (2794, 1766),
        ),
        Frame::v6(
            "ipv6 udp",
            "3ffe:501:8::260:97ff:fe40:efab",
            "ff02::1",
            UDP,
            (14230, 4739),
        ),
        Frame::v6(
            "ipv6 icmpv6",
            "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
            "fe80::200:f8ff:fe21:67cf",
            58,
            (0x8000, 0),
        ),
        Frame {
            name: "arp".to_owned(),
            addrs: None,
            proto: 0,
            ports: (0, 0),
            frag: 0,
            ihl: 5,
            vlan: None,
            ext_header: false,
        },
    ];
    let base = frames[0].clone();
    frames.push(Frame {
        name: "ipv4 tcp first fragment (MF)".to_owned(),
        frag: 0x2000,
        ..base.clone()
    });
    frames.push(Frame {
        name: "ipv4 udp later fragment (offset)".to_owned(),
        frag: 0x00b9,
        proto: UDP,
        ..base.clone()
    });
    frames.push(Frame {
        name: "ipv4 tcp with DF only".to_owned(),
        frag: 0x4000,
        ..base.clone()
    });
    frames.push(Frame {
        name: "ipv4 tcp with options (ihl 7)".to_owned(),
        ihl: 7,
        ..base.clone()
    });
    frames.push(Frame {
        name: "vlan ipv4 tcp".to_owned(),
        vlan: Some(0x0064),
        ..base
    });
    frames.push(Frame {
        name: "vlan ipv6 udp".to_owned(),
        vlan: Some(0x2005),
        ..frames[4].clone()
    });
    frames.push(Frame {
        name: "ipv6 udp behind a hop-by-hop header".to_owned(),
        ext_header: true,
        ..frames[4].clone()
    });
    frames
}

fn load() -> Option<(steering::Loaded, SteeringMap)> {
    if !skip::require_root() {
        return None;
    }
    let loaded = steering::load().unwrap_or_else(|e| panic!("load: {}", chain(&e)));
    let map_fd = loaded.map_fd().try_clone_to_owned().unwrap();
    let map = SteeringMap::from_fd(map_fd).expect("map the program's map");
    Some((loaded, map))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        s.push_str(&format!(": {e}"));
        source = e.source();
    }
    s
}

#[test]
fn a_fresh_map_steers_every_frame_to_queue_0() {
    let Some((loaded, map)) = load() else { return };
    assert_eq!(map.seq(), 0);
    for frame in frames() {
        assert_eq!(
            loaded.test_run(&frame.bytes()).unwrap(),
            0,
            "{}",
            frame.name
        );
    }
}

#[test]
fn the_program_picks_the_queue_of_the_toeplitz_hash_for_every_frame_kind_and_hash_type() {
    let Some((loaded, map)) = load() else { return };
    let table: Vec<u16> = (0..128).map(|i| (i * 7 + 3) % 16).collect();
    let mut configs = vec![SUPPORTED_HASH_TYPES, 0];
    for bit in 0..6 {
        configs.push(SUPPORTED_HASH_TYPES & !(1 << bit));
    }
    configs.extend([HASH_IPV4 | HASH_IPV6, HASH_TCPV4 | HASH_UDPV6]);
    let mut hashed = 0;
    for hash_types in configs {
        let cfg = SteerConfig {
            hash_types,
            key: MS_KEY,
            table: table.clone(),
            unclassified: 99,
        };
        map.publish(&cfg).unwrap();
        for frame in frames() {
            let expected = frame.expected_queue(&cfg);
            let got = loaded.test_run(&frame.bytes()).unwrap();
            assert_eq!(
                got,
                u32::from(expected),
                "{} with hash types {hash_types:#x}",
                frame.name
            );
            hashed += usize::from(expected != 99);
        }
    }
    // The model is not degenerate: most cases hash, some fall through to `unclassified`.
    assert!(hashed > 60, "{hashed}");
}

#[test]
fn small_tables_and_short_keys_follow_the_model_too() {
    let Some((loaded, map)) = load() else { return };
    let mut short_key = [0u8; KEY_LEN];
    short_key[..16].copy_from_slice(&MS_KEY[..16]);
    for (len, key) in [(1, MS_KEY), (2, short_key), (4, MS_KEY), (64, short_key)] {
        let cfg = SteerConfig {
            hash_types: SUPPORTED_HASH_TYPES,
            key,
            table: (0..len).map(|i| 100 + i).collect(),
            unclassified: 7,
        };
        map.publish(&cfg).unwrap();
        for frame in frames() {
            assert_eq!(
                loaded.test_run(&frame.bytes()).unwrap(),
                u32::from(frame.expected_queue(&cfg)),
                "{} with a table of {len}",
                frame.name
            );
        }
    }
}

#[test]
fn truncated_frames_go_to_the_unclassified_queue_or_are_hashed_by_address() {
    let Some((loaded, map)) = load() else { return };
    let cfg = SteerConfig {
        hash_types: SUPPORTED_HASH_TYPES,
        key: MS_KEY,
        table: vec![5; 8],
        unclassified: 9,
    };
    map.publish(&cfg).unwrap();
    let tcp = frames()[0].bytes();
    // The Ethernet header alone; IPv4 cut inside the addresses: nothing to hash.
    assert_eq!(loaded.test_run(&tcp[..14]).unwrap(), 9);
    assert_eq!(loaded.test_run(&tcp[..14 + 18]).unwrap(), 9);
    // Addresses but no ports: the address hash (every table entry is 5).
    assert_eq!(loaded.test_run(&tcp[..14 + 20]).unwrap(), 5);
}
