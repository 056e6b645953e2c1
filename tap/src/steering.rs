//! The unprivileged side of eBPF steering on the tap (TUNSETSTEERINGEBPF).
//!
//! The launcher loads a steering program (the `steering` crate) onto the tap and hands mqvmm the
//! fd of the program's one-entry BPF array map, created with BPF_F_MMAPABLE. mqvmm never calls
//! bpf(): [`SteeringMap::from_fd`] maps the map's value into memory, and [`SteeringMap::publish`]
//! writes the guest's RSS configuration into it, where the program reads it for every frame the
//! host sends into the tap.
//!
//! The value holds two slots and the index of the live one ([`MapLayout`], mirrored by
//! `steering/bpf/steer_map.h`). A publish fills the slot the program is not reading, then flips
//! `active`: the program sees the old configuration or the new one, not a mix, unless a second
//! publish rewrites the slot a frame is still being steered by — then that one frame lands on
//! some queue of the tap (the kernel takes the program's answer modulo the queue count), which is
//! harmless. A zeroed value (nothing published yet) steers every frame to queue 0.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::sys;

/// Most Toeplitz key bytes (virtio-net's `rss_max_key_size` at its largest).
pub const KEY_LEN: usize = 40;
/// Most indirection table entries.
pub const TABLE_LEN: usize = 128;

// virtio's VIRTIO_NET_RSS_HASH_TYPE_* bits.
/// Hash IPv4 source and destination addresses.
pub const HASH_IPV4: u32 = 1 << 0;
/// Hash IPv4 addresses and TCP ports.
pub const HASH_TCPV4: u32 = 1 << 1;
/// Hash IPv4 addresses and UDP ports.
pub const HASH_UDPV4: u32 = 1 << 2;
/// Hash IPv6 source and destination addresses.
pub const HASH_IPV6: u32 = 1 << 3;
/// Hash IPv6 addresses and TCP ports.
pub const HASH_TCPV6: u32 = 1 << 4;
/// Hash IPv6 addresses and UDP ports.
pub const HASH_UDPV6: u32 = 1 << 5;
/// Every hash type the steering program computes (no IPv6 extension-header variants).
pub const SUPPORTED_HASH_TYPES: u32 =
    HASH_IPV4 | HASH_TCPV4 | HASH_UDPV4 | HASH_IPV6 | HASH_TCPV6 | HASH_UDPV6;

/// BPF_MAP_TYPE_ARRAY in linux/bpf.h.
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// BPF_F_MMAPABLE in linux/bpf.h.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// An RSS configuration as the steering program applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteerConfig {
    /// Which of the `HASH_*` types are enabled: a subset of [`SUPPORTED_HASH_TYPES`].
    pub hash_types: u32,
    /// The Toeplitz key; a shorter guest key is zero-padded.
    pub key: [u8; KEY_LEN],
    /// Tap queue indices (tun's own queue numbering), indexed by the hash's low bits; the length
    /// is a power of two from 1 to [`TABLE_LEN`].
    pub table: Vec<u16>,
    /// Tap queue for frames no enabled hash type covers, non-IP frames among them.
    pub unclassified: u16,
}

/// One configuration in the map: `struct mq_steer_slot` of steering/bpf/steer_map.h.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlotLayout {
    pub hash_types: u32,
    /// `table.len() - 1`.
    pub table_mask: u32,
    pub unclassified: u16,
    pub reserved: u16,
    pub key: [u8; KEY_LEN],
    pub table: [u16; TABLE_LEN],
}

/// The map's one value: `struct mq_steer_map` of steering/bpf/steer_map.h.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MapLayout {
    /// The live slot, 0 or 1 (the program reads `slot[active & 1]`).
    pub active: u32,
    /// Bumped by every publish.
    pub seq: u32,
    pub slot: [SlotLayout; 2],
}

/// The steering program's map, mapped read-write into this process.
pub struct SteeringMap {
    map: NonNull<MapLayout>,
    mapped_len: usize,
    /// Serialises publishers (and readers of `live`, which must not read a slot being rewritten).
    writer: Mutex<()>,
}

// SAFETY: the mapping is owned by the SteeringMap and lives until Drop; every access goes through
// `&self` methods that hold `writer` while they touch the slots and use volatile or atomic
// accesses for memory the kernel's program reads concurrently. Nothing is tied to the creating
// thread.
unsafe impl Send for SteeringMap {}
// SAFETY: as above: shared access is serialised by `writer`.
unsafe impl Sync for SteeringMap {}

impl std::fmt::Debug for SteeringMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteeringMap")
            .field("mapped_len", &self.mapped_len)
            .finish_non_exhaustive()
    }
}

/// The page-rounded length mapped for a [`MapLayout`].
fn mapped_len() -> usize {
    let page = sys::page_size();
    std::mem::size_of::<MapLayout>().div_ceil(page) * page
}

/// What `/proc/self/fdinfo/FD` says about a BPF map.
#[derive(Debug, Default, PartialEq, Eq)]
struct MapInfo {
    map_type: Option<u32>,
    key_size: Option<u32>,
    value_size: Option<u32>,
    max_entries: Option<u32>,
    map_flags: Option<u32>,
}

fn parse_fdinfo(text: &str) -> MapInfo {
    let mut info = MapInfo::default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        };
        match name {
            "map_type" => info.map_type = parsed,
            "key_size" => info.key_size = parsed,
            "value_size" => info.value_size = parsed,
            "max_entries" => info.max_entries = parsed,
            "map_flags" => info.map_flags = parsed,
            _ => {}
        }
    }
    info
}

/// Checks that `info` describes the steering program's map; the error says what differs.
fn check_map_info(fd: i32, info: &MapInfo) -> io::Result<()> {
    let invalid = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("steering map fd {fd}: {what}"),
        )
    };
    let Some(map_type) = info.map_type else {
        return Err(invalid("not a BPF map".to_owned()));
    };
    let value_size = std::mem::size_of::<MapLayout>() as u32;
    if map_type != BPF_MAP_TYPE_ARRAY {
        return Err(invalid(format!(
            "map type {map_type}, expected {BPF_MAP_TYPE_ARRAY} (array)"
        )));
    }
    if info.key_size != Some(4) || info.max_entries != Some(1) {
        return Err(invalid(format!(
            "key size {:?} with {:?} entries, expected a 4-byte key and 1 entry",
            info.key_size, info.max_entries
        )));
    }
    if info.value_size != Some(value_size) {
        return Err(invalid(format!(
            "value size {:?} does not fit the steering layout ({value_size} bytes): launcher \
             and mqvmm are from different builds",
            info.value_size
        )));
    }
    if info.map_flags.unwrap_or(0) & BPF_F_MMAPABLE == 0 {
        return Err(invalid(
            "created without BPF_F_MMAPABLE, cannot be mapped".to_owned(),
        ));
    }
    Ok(())
}

impl SteeringMap {
    /// Maps the launcher-created BPF array map (`fd`) read-write; fails with a clear error if
    /// the map's size does not fit the layout. The size is read from `/proc/self/fdinfo` (no
    /// bpf() call); `fd` is closed once mapped.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let raw = fd.as_raw_fd();
        let text = fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("steering map fd {raw}: cannot read /proc/self/fdinfo/{raw}: {e}"),
            )
        })?;
        check_map_info(raw, &parse_fdinfo(&text))?;
        let len = mapped_len();
        let map = sys::mmap_shared(Some(raw), len).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("steering map fd {raw}: mmap of {len} bytes failed: {e}"),
            )
        })?;
        Ok(Self::from_mapping(map, len))
    }

    /// A map in anonymous shared memory that no program reads: for tests of code that
    /// publishes (the device's), and of this type. Zeroed, like a new BPF map.
    pub fn anonymous() -> io::Result<Self> {
        let len = mapped_len();
        let map = sys::mmap_shared(None, len)?;
        Ok(Self::from_mapping(map, len))
    }

    fn from_mapping(map: NonNull<u8>, mapped_len: usize) -> Self {
        SteeringMap {
            map: map.cast(),
            mapped_len,
            writer: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects no data of its own: a panicked holder leaves nothing half-done
        // that a later publish would not overwrite.
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn active_word(&self) -> &AtomicU32 {
        // SAFETY: `active` is a 4-byte aligned u32 inside the live mapping (page-aligned, at
        // least size_of::<MapLayout>() long), which outlives `&self`; the kernel's program only
        // reads it, and this process only accesses it atomically.
        unsafe { AtomicU32::from_ptr(ptr::addr_of_mut!((*self.map.as_ptr()).active)) }
    }

    fn seq_word(&self) -> &AtomicU32 {
        // SAFETY: as for `active_word`, for the `seq` field.
        unsafe { AtomicU32::from_ptr(ptr::addr_of_mut!((*self.map.as_ptr()).seq)) }
    }

    fn slot_ptr(&self, index: usize) -> *mut SlotLayout {
        // SAFETY: index is 0 or 1 (callers mask it), so the place is inside the mapping.
        unsafe { ptr::addr_of_mut!((*self.map.as_ptr()).slot[index & 1]) }
    }

    /// Makes `cfg` the live configuration atomically from the program's point of view (write
    /// the inactive slot, release fence, flip `active`). A table whose length is not a power of
    /// two from 1 to [`TABLE_LEN`], or hash types outside [`SUPPORTED_HASH_TYPES`], are
    /// refused with `InvalidInput` and nothing is written.
    pub fn publish(&self, cfg: &SteerConfig) -> io::Result<()> {
        let len = cfg.table.len();
        if len == 0 || len > TABLE_LEN || !len.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "indirection table of {len} entries: needs a power of two from 1 to \
                     {TABLE_LEN}"
                ),
            ));
        }
        if cfg.hash_types & !SUPPORTED_HASH_TYPES != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "hash types {:#x} include unsupported ones (supported: {SUPPORTED_HASH_TYPES:#x})",
                    cfg.hash_types
                ),
            ));
        }
        let mut slot = SlotLayout {
            hash_types: cfg.hash_types,
            table_mask: (len - 1) as u32,
            unclassified: cfg.unclassified,
            reserved: 0,
            key: cfg.key,
            table: [0; TABLE_LEN],
        };
        slot.table[..len].copy_from_slice(&cfg.table);

        let _guard = self.lock();
        let inactive = (self.active_word().load(Ordering::Relaxed) as usize & 1) ^ 1;
        // SAFETY: the slot is inside the mapping and no program reads it now (it reads the
        // active one); the write is volatile because the memory is shared with the kernel.
        unsafe { ptr::write_volatile(self.slot_ptr(inactive), slot) };
        fence(Ordering::Release);
        self.seq_word().fetch_add(1, Ordering::Release);
        self.active_word().store(inactive as u32, Ordering::Release);
        Ok(())
    }

    /// The live configuration (for tests and the API).
    pub fn live(&self) -> SteerConfig {
        let _guard = self.lock();
        let active = self.active_word().load(Ordering::Acquire) as usize & 1;
        // SAFETY: the slot is inside the mapping; publishers are held off by the guard, and
        // the program never writes.
        let slot = unsafe { ptr::read_volatile(self.slot_ptr(active)) };
        let len = (slot.table_mask as usize & (TABLE_LEN - 1)) + 1;
        SteerConfig {
            hash_types: slot.hash_types,
            key: slot.key,
            table: slot.table[..len].to_vec(),
            unclassified: slot.unclassified,
        }
    }

    /// How many configurations have been published into this map (by any process).
    pub fn seq(&self) -> u32 {
        self.seq_word().load(Ordering::Acquire)
    }
}

impl Drop for SteeringMap {
    fn drop(&mut self) {
        sys::munmap(self.map.cast(), self.mapped_len);
    }
}

/// Reference Toeplitz hash (Microsoft RSS definition) of `input` with `key`, zero-extended to
/// whatever length `input` needs: for every set bit `i` of `input` (most significant bit of
/// byte 0 first), the 32 key bits starting at bit `i` are XORed into the result.
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let key_bit = |i: usize| -> u32 {
        key.get(i / 8)
            .map_or(0, |byte| u32::from(byte >> (7 - i % 8)) & 1)
    };
    let mut window: u32 = (0..32).fold(0, |w, i| (w << 1) | key_bit(i));
    let mut hash = 0;
    for (n, byte) in input.iter().enumerate() {
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | key_bit(32 + n * 8 + bit);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::net::IpAddr;

    /// The key of Microsoft's RSS verification suite.
    const MS_KEY: [u8; KEY_LEN] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    fn input(src: &[u8], dst: &[u8], ports: Option<(u16, u16)>) -> Vec<u8> {
        let mut v = [src, dst].concat();
        if let Some((sport, dport)) = ports {
            v.extend(sport.to_be_bytes());
            v.extend(dport.to_be_bytes());
        }
        v
    }

    /// Checks Microsoft's RSS verification `vectors`: (source, source port, destination,
    /// destination port, hash of the addresses, hash with the ports).
    fn check_vectors(vectors: &[(&str, u16, &str, u16, u32, u32)]) {
        let octets = |a: &str| match a.parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        for &(src, sport, dst, dport, ip_only, with_ports) in vectors {
            let (s, d) = (octets(src), octets(dst));
            assert_eq!(toeplitz(&MS_KEY, &input(&s, &d, None)), ip_only, "{src}");
            let input = input(&s, &d, Some((sport, dport)));
            assert_eq!(toeplitz(&MS_KEY, &input), with_ports, "{src}");
        }
    }

    #[test]
    fn toeplitz_matches_the_microsoft_ipv4_verification_vectors() {
        // (source, source port, destination, destination port, IPv4 only, IPv4 with TCP)
        let vectors = [
            (
                "66.9.149.187",
                2794,
                "161.142.100.80",
                1766,
                0x323e8fc2,
                0x51ccc178,
            ),
            (
                "199.92.111.2",
                14230,
                "65.69.140.83",
                4739,
                0xd718262a,
                0xc626b0ea,
            ),
            (
                "24.19.198.95",
                12898,
                "12.22.207.184",
                38024,
                0xd2d0a5de,
                0x5c2b394a,
            ),
            (
                "38.27.205.30",
                48228,
                "209.142.163.6",
                2217,
                0x82989176,
                0xafc7327f,
            ),
            (
                "153.39.163.191",
                44251,
                "202.188.127.2",
                1303,
                0x5d1809c5,
                0x10e828a2,
            ),
        ];
        check_vectors(&vectors);
    }

    #[test]
    fn toeplitz_matches_the_microsoft_ipv6_verification_vectors() {
        let vectors = [
            (
                "3ffe:2501:200:1fff::7",
                2794,
                "3ffe:2501:200:3::1",
                1766,
                0x2cc18cd5,
                0x40207d3d,
            ),
            (
                "3ffe:501:8::260:97ff:fe40:efab",
                14230,
                "ff02::1",
                4739,
                0x0f0c461c,
                0xdde51bbf,
            ),
            (
                "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
                44251,
                "fe80::200:f8ff:fe21:67cf",
                38024,
                0x4b61e985,
                0x02d1feef,
            ),
        ];
        check_vectors(&vectors);
    }

    #[test]
    fn a_short_key_hashes_as_if_zero_padded() {
        // 36 bytes (IPv6 with ports): every key byte matters.
        let data: Vec<u8> = (0..36).map(|i| 0x5a ^ i).collect();
        let mut padded = [0u8; KEY_LEN];
        padded[..20].copy_from_slice(&MS_KEY[..20]);
        assert_eq!(toeplitz(&MS_KEY[..20], &data), toeplitz(&padded, &data));
        assert_ne!(toeplitz(&MS_KEY, &data), toeplitz(&padded, &data));
        assert_eq!(toeplitz(&[], &data), 0);
    }

    #[test]
    fn the_rust_layout_matches_the_c_header() {
        // struct mq_steer_slot / struct mq_steer_map in steering/bpf/steer_map.h.
        assert_eq!(offset_of!(SlotLayout, hash_types), 0);
        assert_eq!(offset_of!(SlotLayout, table_mask), 4);
        assert_eq!(offset_of!(SlotLayout, unclassified), 8);
        assert_eq!(offset_of!(SlotLayout, reserved), 10);
        assert_eq!(offset_of!(SlotLayout, key), 12);
        assert_eq!(offset_of!(SlotLayout, table), 52);
        assert_eq!(size_of::<SlotLayout>(), 308);
        assert_eq!(offset_of!(MapLayout, active), 0);
        assert_eq!(offset_of!(MapLayout, seq), 4);
        assert_eq!(offset_of!(MapLayout, slot), 8);
        assert_eq!(size_of::<MapLayout>(), 624);
    }

    fn config(table: Vec<u16>) -> SteerConfig {
        SteerConfig {
            hash_types: HASH_TCPV4 | HASH_UDPV6,
            key: MS_KEY,
            table,
            unclassified: 3,
        }
    }

    #[test]
    fn a_new_map_steers_everything_to_queue_0() {
        let map = SteeringMap::anonymous().unwrap();
        let live = map.live();
        assert_eq!(
            live,
            SteerConfig {
                hash_types: 0,
                key: [0; KEY_LEN],
                table: vec![0],
                unclassified: 0
            }
        );
        assert_eq!(map.seq(), 0);
    }

    #[test]
    fn publish_makes_the_configuration_live_through_the_other_slot() {
        let map = SteeringMap::anonymous().unwrap();
        let first = config(vec![1, 0, 3, 2]);
        map.publish(&first).unwrap();
        assert_eq!(map.live(), first);
        assert_eq!(map.active_word().load(Ordering::Relaxed), 1);
        let second = config((0..128).map(|i| i % 4).collect());
        map.publish(&second).unwrap();
        assert_eq!(map.live(), second);
        assert_eq!(map.active_word().load(Ordering::Relaxed), 0);
        assert_eq!(map.seq(), 2);
        // The mapping as the program reads it.
        // SAFETY: the mapping is live and nothing writes it during this read.
        let raw = unsafe { ptr::read_volatile(map.map.as_ptr()) };
        assert_eq!(raw.slot[0].table_mask, 127);
        assert_eq!(raw.slot[1].table_mask, 3);
        assert_eq!(raw.slot[1].table[..4], [1, 0, 3, 2]);
        assert_eq!(raw.slot[0].unclassified, 3);
    }

    #[test]
    fn invalid_tables_and_hash_types_are_refused_and_change_nothing() {
        let map = SteeringMap::anonymous().unwrap();
        let good = config(vec![2; 8]);
        map.publish(&good).unwrap();
        for table in [vec![], vec![0; 3], vec![0; 256], vec![0; 129]] {
            let len = table.len();
            let err = map.publish(&config(table)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{len}");
            assert!(err.to_string().contains(&format!("{len} entries")), "{err}");
        }
        let mut bad_types = config(vec![0; 4]);
        bad_types.hash_types |= 1 << 6;
        let err = map.publish(&bad_types).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(map.live(), good);
        assert_eq!(map.seq(), 1);
    }

    #[test]
    fn publishing_from_many_threads_leaves_one_whole_configuration() {
        let map = std::sync::Arc::new(SteeringMap::anonymous().unwrap());
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        map.publish(&config(vec![t; 64])).unwrap();
                        let live = map.live();
                        assert!(live.table.iter().all(|&q| q == live.table[0]), "{live:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(map.seq(), 800);
    }

    #[test]
    fn fdinfo_of_the_wrong_map_is_refused_with_what_differs() {
        let good = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t2\n\
                    key_size:\t4\nvalue_size:\t624\nmax_entries:\t1\nmap_flags:\t0x400\n\
                    map_extra:\t0x0\nmemlock:\t4096\nmap_id:\t7\nfrozen:\t0\n";
        check_map_info(9, &parse_fdinfo(good)).unwrap();
        let cases = [
            ("pos:\t0\nflags:\t02\n".to_owned(), "not a BPF map"),
            (good.replace("map_type:\t2", "map_type:\t1"), "map type 1"),
            (
                good.replace("value_size:\t624", "value_size:\t600"),
                "value size Some(600)",
            ),
            (
                good.replace("max_entries:\t1", "max_entries:\t2"),
                "Some(2) entries",
            ),
            (good.replace("0x400", "0x0"), "BPF_F_MMAPABLE"),
        ];
        for (text, needle) in cases {
            let err = check_map_info(9, &parse_fdinfo(&text)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let msg = err.to_string();
            assert!(msg.starts_with("steering map fd 9: "), "{msg}");
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn a_file_that_is_no_bpf_map_is_refused() {
        let file = fs::File::open("/proc/self/stat").unwrap();
        let err = SteeringMap::from_fd(OwnedFd::from(file)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("not a BPF map"), "{err}");
    }
}
