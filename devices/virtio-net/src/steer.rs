// SPDX-License-Identifier: Apache-2.0
//! Receive steering through the tap's eBPF program (TUNSETSTEERINGEBPF).
//!
//! The launcher, while privileged, attaches a steering program to the tap and hands mqvmm
//! the program's configuration map (a `BPF_F_MMAPABLE` array), which mqvmm maps; mqvmm makes
//! no `bpf()` call. The program picks a tap queue per frame from a Toeplitz hash and an
//! indirection table. The device writes that table ([`Steering::publish`]) in two cases:
//!
//! - automatic steering (after VQ_PAIRS_SET, and after a reset): flows spread evenly over the
//!   enabled pairs, with a key of the device's own;
//! - RSS (VIRTIO_NET_CTRL_MQ_RSS_CONFIG, offered only with steering): the driver's hash
//!   types, key and indirection table.
//!
//! Because the device decides where frames go, it can disable a pair without losing what was
//! on its way to it: it first steers every flow away from the pairs being disabled, lets
//! frames already past the program land, hands what reached those tap queues to their receive
//! queues (the guest still polls them until the command completes), and only then detaches
//! them (TUNSETQUEUE purges a detached queue). See `state.rs` for the sequence.
//!
//! The program's queue numbers are the tap's own: Linux numbers attached queues in attach
//! order and, when one is detached, moves the last into its place. [`TunOrder`] follows that.

use std::io;

use tap::steering::{SteerConfig, KEY_LEN, TABLE_LEN};

pub use tap::steering::SUPPORTED_HASH_TYPES;

/// Largest key the device takes (the config space's `rss_max_key_size`).
pub const RSS_MAX_KEY_SIZE: u8 = KEY_LEN as u8;
/// Largest indirection table (`rss_max_indirection_table_length`).
pub const RSS_MAX_TABLE_LEN: u16 = TABLE_LEN as u16;

/// Where the device writes the steering configuration the tap's program applies.
pub trait Steering: Send + Sync {
    /// Makes `cfg` the live configuration.
    fn publish(&self, cfg: &SteerConfig) -> io::Result<()>;
}

impl Steering for tap::steering::SteeringMap {
    fn publish(&self, cfg: &SteerConfig) -> io::Result<()> {
        tap::steering::SteeringMap::publish(self, cfg)
    }
}

/// Receive steering in virtio's terms: receive queues are numbered by pair (0 = receiveq1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RssConfig {
    /// VIRTIO_NET_RSS_HASH_TYPE_* bits in force.
    pub hash_types: u32,
    /// Indirection table: a receive queue per entry; its length is a power of two.
    pub table: Vec<u16>,
    /// Receive queue of frames no enabled hash type covers.
    pub unclassified: u16,
    /// Transmit queues the driver may use.
    pub max_tx_vq: u16,
    /// Toeplitz key (at most [`RSS_MAX_KEY_SIZE`] bytes).
    pub key: Vec<u8>,
}

impl RssConfig {
    /// Automatic steering over pairs `0..pairs`: every IP flow hashed, spread evenly.
    pub fn spread(pairs: u16, key: &[u8]) -> Self {
        let pairs = pairs.max(1);
        RssConfig {
            hash_types: SUPPORTED_HASH_TYPES,
            table: (0..RSS_MAX_TABLE_LEN).map(|i| i % pairs).collect(),
            unclassified: 0,
            max_tx_vq: pairs,
            key: key.to_vec(),
        }
    }

    /// Pairs that must be enabled: every transmit queue below `max_tx_vq` and every receive
    /// queue the table or `unclassified` names.
    pub fn pairs_needed(&self) -> u16 {
        let rx = self
            .table
            .iter()
            .chain(std::iter::once(&self.unclassified))
            .max()
            .map_or(1, |&q| q.saturating_add(1));
        rx.max(self.max_tx_vq).max(1)
    }

    /// Parses the data of VIRTIO_NET_CTRL_MQ_RSS_CONFIG (`struct virtio_net_rss_config`):
    /// `data` is what was read of it, `data_len` how long the driver made it. Refused (`None`)
    /// unless the table length is a power of two up to [`RSS_MAX_TABLE_LEN`], every queue
    /// named (table, unclassified) is below `max_pairs`, `max_tx_vq` is 1 to `max_pairs`,
    /// the key is at most [`RSS_MAX_KEY_SIZE`] bytes, only supported hash types are set, and
    /// the data holds all of it.
    pub fn parse(data: &[u8], data_len: usize, max_pairs: u16) -> Option<Self> {
        let data = data.get(..data_len.min(data.len()))?;
        let u16_at = |at: usize| -> Option<u16> {
            let b = data.get(at..at + 2)?;
            Some(u16::from_le_bytes([b[0], b[1]]))
        };
        let b = data.get(..4)?;
        let hash_types = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mask = u16_at(4)?;
        let unclassified = u16_at(6)?;
        let len = usize::from(mask) + 1;
        if !len.is_power_of_two() || len > usize::from(RSS_MAX_TABLE_LEN) {
            log::debug!("virtio-net: RSS_CONFIG table length {len} refused");
            return None;
        }
        if hash_types & !SUPPORTED_HASH_TYPES != 0 {
            log::debug!("virtio-net: RSS_CONFIG hash types {hash_types:#x} not supported");
            return None;
        }
        let table = (0..len)
            .map(|i| u16_at(8 + 2 * i))
            .collect::<Option<Vec<u16>>>()?;
        let after = 8 + 2 * len;
        let max_tx_vq = u16_at(after)?;
        let key_len = usize::from(*data.get(after + 2)?);
        if key_len > usize::from(RSS_MAX_KEY_SIZE) {
            log::debug!("virtio-net: RSS_CONFIG key of {key_len} bytes refused");
            return None;
        }
        let key = data.get(after + 3..after + 3 + key_len)?.to_vec();
        if max_tx_vq == 0 || max_tx_vq > max_pairs {
            log::debug!("virtio-net: RSS_CONFIG max_tx_vq {max_tx_vq} outside 1..={max_pairs}");
            return None;
        }
        if table
            .iter()
            .chain(std::iter::once(&unclassified))
            .any(|&q| q >= max_pairs)
        {
            log::debug!("virtio-net: RSS_CONFIG names a receive queue beyond {max_pairs}");
            return None;
        }
        Some(RssConfig {
            hash_types,
            table,
            unclassified,
            max_tx_vq,
            key,
        })
    }

    /// The program's configuration: receive queues translated to the tap's queue numbers.
    pub fn to_tun(&self, order: &TunOrder) -> SteerConfig {
        let mut key = [0u8; KEY_LEN];
        let n = self.key.len().min(KEY_LEN);
        key[..n].copy_from_slice(&self.key[..n]);
        SteerConfig {
            hash_types: self.hash_types,
            key,
            table: self.table.iter().map(|&q| order.tun_index(q)).collect(),
            unclassified: order.tun_index(self.unclassified),
        }
    }
}

/// The tap's numbering of its attached queues: entry `i` is the pair whose tap queue Linux
/// calls `i`. `None` while unknown (before the backends were first put into a known state,
/// or after a backend operation whose outcome is unclear): then everything goes to tap
/// queue 0, which is always an attached queue, so nothing is steered to a detached one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunOrder(Option<Vec<usize>>);

impl TunOrder {
    /// Only `pair` is attached.
    pub fn only(pair: usize) -> Self {
        TunOrder(Some(vec![pair]))
    }

    /// The order is not known.
    pub fn unknown() -> Self {
        TunOrder(None)
    }

    /// `pair`'s queue was attached: Linux gives it the next number.
    pub fn attached(&mut self, pair: usize) {
        if let Some(order) = &mut self.0 {
            if !order.contains(&pair) {
                order.push(pair);
            }
        }
    }

    /// `pair`'s queue was detached: Linux moves its last queue into the freed number.
    pub fn detached(&mut self, pair: usize) {
        if let Some(order) = &mut self.0 {
            if let Some(at) = order.iter().position(|&p| p == pair) {
                order.swap_remove(at);
            }
        }
    }

    /// The tap's number for `pair`'s queue (0 when unknown or not attached).
    pub fn tun_index(&self, pair: u16) -> u16 {
        self.0
            .as_ref()
            .and_then(|o| o.iter().position(|&p| p == usize::from(pair)))
            .map_or(0, |i| i as u16)
    }
}

/// Fills `key` from the kernel's random source; a device whose key an outsider cannot
/// guess cannot have all its flows aimed at one queue from the network.
pub fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    let mut filled = 0;
    while filled < KEY_LEN {
        // SAFETY: the pointer and length describe the unfilled tail of `key`, which is
        // writable for the call.
        let n = unsafe { libc::getrandom(key[filled..].as_mut_ptr().cast(), KEY_LEN - filled, 0) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // No randomness: a fixed key still spreads flows; it only loses the
            // protection against chosen-flow collisions.
            log::warn!("virtio-net: getrandom failed; the steering key is fixed");
            return [0x6d; KEY_LEN];
        }
        filled += n as usize;
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use tap::steering::{HASH_IPV4, HASH_TCPV4};

    /// `struct virtio_net_rss_config` with `table`, `max_tx_vq` and `key`.
    fn rss_bytes(
        hash_types: u32,
        table: &[u16],
        unclassified: u16,
        max_tx_vq: u16,
        key: &[u8],
    ) -> Vec<u8> {
        let mut b = hash_types.to_le_bytes().to_vec();
        b.extend(((table.len() as u16).wrapping_sub(1)).to_le_bytes());
        b.extend(unclassified.to_le_bytes());
        for q in table {
            b.extend(q.to_le_bytes());
        }
        b.extend(max_tx_vq.to_le_bytes());
        b.push(key.len() as u8);
        b.extend(key);
        b
    }

    #[test]
    fn a_well_formed_rss_config_parses_into_what_the_driver_sent() {
        let key = [7u8; 40];
        let b = rss_bytes(HASH_IPV4 | HASH_TCPV4, &[0, 2, 0, 2], 1, 4, &key);
        let cfg = RssConfig::parse(&b, b.len(), 4).unwrap();
        assert_eq!(cfg.hash_types, HASH_IPV4 | HASH_TCPV4);
        assert_eq!(cfg.table, vec![0, 2, 0, 2]);
        assert_eq!(cfg.unclassified, 1);
        assert_eq!(cfg.max_tx_vq, 4);
        assert_eq!(cfg.key, key.to_vec());
        assert_eq!(cfg.pairs_needed(), 4);
    }

    #[test]
    fn rss_config_is_refused_for_every_rule_the_spec_sets() {
        let key = [1u8; 40];
        let ok = |b: Vec<u8>| RssConfig::parse(&b, b.len(), 4);
        // Table length not a power of two (3), and larger than the maximum (256).
        assert!(ok(rss_bytes(HASH_IPV4, &[0, 1, 2], 0, 1, &key)).is_none());
        assert!(ok(rss_bytes(HASH_IPV4, &[0; 256], 0, 1, &key)).is_none());
        // A queue beyond the device's pairs, in the table or as unclassified.
        assert!(ok(rss_bytes(HASH_IPV4, &[0, 4], 0, 1, &key)).is_none());
        assert!(ok(rss_bytes(HASH_IPV4, &[0, 1], 4, 1, &key)).is_none());
        // max_tx_vq 0 or beyond the pairs.
        assert!(ok(rss_bytes(HASH_IPV4, &[0, 1], 0, 0, &key)).is_none());
        assert!(ok(rss_bytes(HASH_IPV4, &[0, 1], 0, 5, &key)).is_none());
        // Key longer than rss_max_key_size.
        assert!(ok(rss_bytes(HASH_IPV4, &[0, 1], 0, 1, &[0; 41])).is_none());
        // Hash types not offered (the _EX types, unknown bits).
        assert!(ok(rss_bytes(1 << 6, &[0, 1], 0, 1, &key)).is_none());
        assert!(ok(rss_bytes(1 << 31, &[0, 1], 0, 1, &key)).is_none());
        // Truncated anywhere: the data holds less than its own lengths say.
        let b = rss_bytes(HASH_IPV4, &[0, 1, 2, 3], 0, 4, &key);
        for cut in 0..b.len() {
            assert!(
                RssConfig::parse(&b[..cut], cut, 4).is_none(),
                "cut at {cut}"
            );
            assert!(RssConfig::parse(&b, cut, 4).is_none(), "data_len {cut}");
        }
        assert!(RssConfig::parse(&b, b.len(), 4).is_some());
        // A table of one entry and an empty key are valid.
        assert!(ok(rss_bytes(0, &[3], 3, 1, &[])).is_some());
    }

    #[test]
    fn pairs_needed_covers_transmit_queues_and_every_receive_queue_named() {
        let cfg = |table: &[u16], unclassified, max_tx_vq| RssConfig {
            hash_types: 0,
            table: table.to_vec(),
            unclassified,
            max_tx_vq,
            key: vec![],
        };
        assert_eq!(cfg(&[0, 0], 0, 1).pairs_needed(), 1);
        assert_eq!(cfg(&[0, 3], 0, 1).pairs_needed(), 4);
        assert_eq!(cfg(&[0, 1], 2, 1).pairs_needed(), 3);
        assert_eq!(cfg(&[0, 1], 0, 4).pairs_needed(), 4);
    }

    #[test]
    fn spread_covers_every_pair_evenly() {
        let cfg = RssConfig::spread(3, &[0; 40]);
        assert_eq!(cfg.table.len(), usize::from(RSS_MAX_TABLE_LEN));
        for q in 0..3 {
            let n = cfg.table.iter().filter(|&&t| t == q).count();
            assert!((42..=43).contains(&n), "queue {q}: {n} entries");
        }
        assert_eq!(cfg.pairs_needed(), 3);
    }

    #[test]
    fn tun_order_follows_linux_attach_and_detach_numbering() {
        let mut o = TunOrder::only(0);
        for p in 1..4 {
            o.attached(p);
        }
        assert_eq!(
            (0..4).map(|p| o.tun_index(p)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // Detaching pair 1 moves the last queue (pair 3) into number 1.
        o.detached(1);
        assert_eq!(o.tun_index(3), 1);
        assert_eq!(o.tun_index(2), 2);
        // Re-attached, pair 1 comes last.
        o.attached(1);
        assert_eq!(o.tun_index(1), 3);
        let cfg = RssConfig {
            hash_types: 0,
            table: vec![0, 1, 2, 3],
            unclassified: 3,
            max_tx_vq: 4,
            key: vec![1; 4],
        };
        let t = cfg.to_tun(&o);
        assert_eq!(t.table, vec![0, 3, 2, 1]);
        assert_eq!(t.unclassified, 1);
        assert_eq!(&t.key[..5], &[1, 1, 1, 1, 0]);
        // Unknown order: everything to tap queue 0.
        assert_eq!(cfg.to_tun(&TunOrder::unknown()).table, vec![0; 4]);
    }
}
