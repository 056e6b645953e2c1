// SPDX-License-Identifier: Apache-2.0
//! Receive filtering as the driver configures it through the control queue
//! (VIRTIO_NET_F_CTRL_RX, CTRL_RX_EXTRA, CTRL_VLAN): which frames from the host reach the
//! guest, decided on the destination MAC and the VLAN tag, the way QEMU's virtio-net does.
//!
//! After reset the device is promiscuous (a driver that never configures filtering gets
//! every frame); Linux turns promiscuity off and sends its address lists when the interface
//! comes up. With CTRL_VLAN negotiated, tagged frames pass only for VLAN ids the driver
//! added.

/// Addresses a MAC table may hold per kind; a driver that sends more gets every address of
/// that kind (the table "overflows"), as in QEMU.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// Number of VLAN ids.
pub const VLAN_IDS: usize = 4096;

/// Bytes of a frame (after the vnet header) the filter looks at: destination MAC, source
/// MAC, and the 802.1Q tag if any.
pub const FILTER_HEAD_LEN: usize = 16;

const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];

/// A MAC table sent with VIRTIO_NET_CTRL_MAC_TABLE_SET.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacTable {
    /// Unicast addresses accepted besides the device's own.
    pub unicast: Vec<[u8; 6]>,
    /// The driver sent more unicast addresses than the table holds: accept all unicast.
    pub unicast_overflow: bool,
    /// Multicast addresses accepted.
    pub multicast: Vec<[u8; 6]>,
    /// The driver sent more multicast addresses than the table holds: accept all.
    pub multicast_overflow: bool,
}

/// VIRTIO_NET_CTRL_RX commands: one receive-mode switch each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// Every frame.
    Promisc,
    /// Every multicast frame.
    AllMulti,
    /// Every unicast frame (CTRL_RX_EXTRA).
    AllUni,
    /// No multicast frame (CTRL_RX_EXTRA).
    NoMulti,
    /// No unicast frame (CTRL_RX_EXTRA).
    NoUni,
    /// No broadcast frame (CTRL_RX_EXTRA).
    NoBcast,
}

/// The receive filter in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    promisc: bool,
    allmulti: bool,
    alluni: bool,
    nomulti: bool,
    nouni: bool,
    nobcast: bool,
    mac: [u8; 6],
    table: MacTable,
    /// Whether tagged frames are filtered by `vlans` (CTRL_VLAN negotiated).
    vlan_filtering: bool,
    vlans: Vec<u64>,
}

impl RxFilter {
    /// The filter after reset: promiscuous, `mac` as the device's address, VLAN filtering
    /// on (nothing tagged passes until the driver adds ids) iff `vlan_filtering`.
    pub fn new(mac: [u8; 6], vlan_filtering: bool) -> Self {
        RxFilter {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            mac,
            table: MacTable::default(),
            vlan_filtering,
            vlans: vec![0; VLAN_IDS / 64],
        }
    }

    /// Switches one receive mode on or off.
    pub fn set_mode(&mut self, mode: RxMode, on: bool) {
        let flag = match mode {
            RxMode::Promisc => &mut self.promisc,
            RxMode::AllMulti => &mut self.allmulti,
            RxMode::AllUni => &mut self.alluni,
            RxMode::NoMulti => &mut self.nomulti,
            RxMode::NoUni => &mut self.nouni,
            RxMode::NoBcast => &mut self.nobcast,
        };
        *flag = on;
    }

    /// The device's own unicast address (VIRTIO_NET_CTRL_MAC_ADDR_SET).
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = mac;
    }

    /// Replaces the MAC table.
    pub fn set_table(&mut self, table: MacTable) {
        self.table = table;
    }

    /// Lets frames tagged with `vid` pass (`true`) or not.
    pub fn set_vlan(&mut self, vid: u16, allowed: bool) {
        let vid = usize::from(vid) % VLAN_IDS;
        let (word, bit) = (vid / 64, vid % 64);
        if allowed {
            self.vlans[word] |= 1 << bit;
        } else {
            self.vlans[word] &= !(1 << bit);
        }
    }

    /// Whether every frame passes anyway, so the data path need not look at any.
    pub fn passes_all(&self) -> bool {
        self.promisc && !self.vlan_filtering
    }

    /// Whether a frame whose first bytes (after the vnet header) are `head` reaches the
    /// guest. `head` may be shorter than [`FILTER_HEAD_LEN`] for a runt frame, which then
    /// passes as far as the bytes present decide.
    pub fn accepts(&self, head: &[u8]) -> bool {
        if self.vlan_filtering && head.get(12..14) == Some(&ETH_P_8021Q[..]) {
            let Some(tci) = head.get(14..16) else {
                return false;
            };
            let vid = usize::from(u16::from_be_bytes([tci[0], tci[1]]) & 0x0fff);
            if self.vlans[vid / 64] & (1 << (vid % 64)) == 0 {
                return false;
            }
        }
        if self.promisc {
            return true;
        }
        let Some(dest) = head.get(..6) else {
            return true;
        };
        if dest == [0xff; 6] {
            return !self.nobcast;
        }
        if dest[0] & 1 != 0 {
            if self.nomulti {
                return false;
            }
            return self.allmulti
                || self.table.multicast_overflow
                || self.table.multicast.iter().any(|m| m == dest);
        }
        if self.nouni {
            return false;
        }
        self.alluni
            || self.table.unicast_overflow
            || dest == self.mac
            || self.table.unicast.iter().any(|m| m == dest)
    }
}

/// Parses the data of VIRTIO_NET_CTRL_MAC_TABLE_SET: two tables, each a little-endian u32
/// count followed by that many 6-byte addresses, unicast first. `data` holds at most the
/// bytes the device read; `full_len` is how many the driver sent. `None` when the counts do
/// not fit the length (the command is refused). A table of more than
/// [`MAC_TABLE_ENTRIES`] addresses overflows (accept all of that kind) and its addresses
/// are not read; a multicast count the device did not read overflows the same way.
pub fn parse_mac_table(data: &[u8], full_len: usize) -> Option<MacTable> {
    let count = |at: usize| -> Option<usize> {
        let b = data.get(at..at + 4)?;
        usize::try_from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok()
    };
    let addresses = |at: usize, n: usize| -> Option<Vec<[u8; 6]>> {
        let bytes = data.get(at..at.checked_add(n.checked_mul(6)?)?)?;
        Some(
            bytes
                .chunks_exact(6)
                .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
                .collect(),
        )
    };
    let mut table = MacTable::default();
    let uni = count(0)?;
    let multi_at = uni.checked_mul(6)?.checked_add(4)?;
    if multi_at.checked_add(4)? > full_len {
        return None;
    }
    if uni > MAC_TABLE_ENTRIES {
        table.unicast_overflow = true;
    } else {
        table.unicast = addresses(4, uni)?;
    }
    match count(multi_at) {
        Some(multi) => {
            let end = multi_at
                .checked_add(4)?
                .checked_add(multi.checked_mul(6)?)?;
            if end > full_len {
                return None;
            }
            if multi > MAC_TABLE_ENTRIES {
                table.multicast_overflow = true;
            } else {
                table.multicast = addresses(multi_at + 4, multi)?;
            }
        }
        // Past what was read: only a unicast table that overflowed puts it there.
        None => table.multicast_overflow = true,
    }
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const OTHER: [u8; 6] = [0x52, 0x54, 0, 0x99, 0x99, 0x99];
    const MCAST: [u8; 6] = [0x01, 0x00, 0x5e, 0, 0, 0xfb];
    const BCAST: [u8; 6] = [0xff; 6];

    fn frame(dest: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
        let mut f = dest.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        match vlan {
            Some(vid) => {
                f.extend_from_slice(&ETH_P_8021Q);
                f.extend_from_slice(&vid.to_be_bytes());
            }
            None => f.extend_from_slice(&[0x08, 0x00, 0x45, 0]),
        }
        f
    }

    fn table(unicast: &[[u8; 6]], multicast: &[[u8; 6]]) -> Vec<u8> {
        let mut d = (unicast.len() as u32).to_le_bytes().to_vec();
        unicast.iter().for_each(|m| d.extend_from_slice(m));
        d.extend_from_slice(&(multicast.len() as u32).to_le_bytes());
        multicast.iter().for_each(|m| d.extend_from_slice(m));
        d
    }

    #[test]
    fn after_reset_everything_passes() {
        let f = RxFilter::new(OWN, false);
        assert!(f.passes_all());
        for dest in [OWN, OTHER, MCAST, BCAST] {
            assert!(f.accepts(&frame(dest, None)));
        }
    }

    #[test]
    fn without_promisc_only_own_listed_broadcast_and_listed_multicast_pass() {
        let mut f = RxFilter::new(OWN, false);
        f.set_mode(RxMode::Promisc, false);
        assert!(!f.passes_all());
        assert!(f.accepts(&frame(OWN, None)));
        assert!(f.accepts(&frame(BCAST, None)));
        assert!(!f.accepts(&frame(OTHER, None)));
        assert!(!f.accepts(&frame(MCAST, None)));
        f.set_table(parse_mac_table(&table(&[OTHER], &[MCAST]), 20).unwrap());
        assert!(f.accepts(&frame(OTHER, None)));
        assert!(f.accepts(&frame(MCAST, None)));
        f.set_table(MacTable::default());
        f.set_mode(RxMode::AllMulti, true);
        assert!(f.accepts(&frame(MCAST, None)));
        f.set_mode(RxMode::NoMulti, true);
        assert!(
            !f.accepts(&frame(MCAST, None)),
            "NOMULTI wins over ALLMULTI"
        );
        f.set_mode(RxMode::NoBcast, true);
        assert!(!f.accepts(&frame(BCAST, None)));
        f.set_mode(RxMode::AllUni, true);
        assert!(f.accepts(&frame(OTHER, None)));
        f.set_mode(RxMode::NoUni, true);
        assert!(!f.accepts(&frame(OWN, None)), "NOUNI wins");
        // A runt frame is let through as far as its bytes decide nothing.
        assert!(f.accepts(&[1, 2]));
    }

    #[test]
    fn the_own_address_follows_mac_addr_set() {
        let mut f = RxFilter::new(OWN, false);
        f.set_mode(RxMode::Promisc, false);
        f.set_mac(OTHER);
        assert!(f.accepts(&frame(OTHER, None)));
        assert!(!f.accepts(&frame(OWN, None)));
    }

    #[test]
    fn with_vlan_filtering_only_added_ids_pass_even_when_promiscuous() {
        let mut f = RxFilter::new(OWN, true);
        assert!(!f.passes_all());
        assert!(
            f.accepts(&frame(OWN, None)),
            "untagged frames are not VLAN-filtered"
        );
        assert!(!f.accepts(&frame(OWN, Some(5))));
        f.set_vlan(5, true);
        assert!(f.accepts(&frame(OWN, Some(5))));
        // Priority bits do not matter, only the id.
        assert!(f.accepts(&frame(OWN, Some(0xe005))));
        assert!(!f.accepts(&frame(OWN, Some(6))));
        f.set_vlan(5, false);
        assert!(!f.accepts(&frame(OWN, Some(5))));
        f.set_vlan(5, true);
        assert!(
            !f.accepts(&frame(OWN, Some(5))[..15]),
            "a cut tag does not pass"
        );
    }

    #[test]
    fn mac_tables_are_checked_against_the_length_sent() {
        let d = table(&[OTHER, OWN], &[MCAST]);
        let t = parse_mac_table(&d, d.len()).unwrap();
        assert_eq!(t.unicast, [OTHER, OWN]);
        assert_eq!(t.multicast, [MCAST]);
        assert!(!t.unicast_overflow && !t.multicast_overflow);
        // Too short for the counts it claims.
        assert_eq!(parse_mac_table(&d[..d.len() - 1], d.len() - 1), None);
        assert_eq!(parse_mac_table(&d[..4], 4), None);
        assert_eq!(parse_mac_table(&[], 0), None);
        // Huge counts: refused, no overflow in the arithmetic.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert_eq!(parse_mac_table(&huge, huge.len()), None);
        // More than the table holds: overflow, accept all of that kind.
        let many: Vec<[u8; 6]> = (0..=MAC_TABLE_ENTRIES as u8)
            .map(|i| [2, 0, 0, 0, 0, i])
            .collect();
        let d = table(&many, &many);
        let t = parse_mac_table(&d, d.len()).unwrap();
        assert!(t.unicast_overflow && t.multicast_overflow);
        assert!(t.unicast.is_empty() && t.multicast.is_empty());
        // The multicast count beyond what the device read: overflow rather than guess.
        let t = parse_mac_table(&d[..100], d.len()).unwrap();
        assert!(t.unicast_overflow && t.multicast_overflow);
    }
}
