// SPDX-License-Identifier: Apache-2.0
//! The control queue: parsing (`ctrl::parse_request`), dispatch (`ctrl::execute`) and the
//! VQ_PAIRS_SET sequence with rollback, over guest memory, descriptor layouts and command
//! bytes from the input, with backends (and, in the direct mode, workers) that fail when
//! the input says so.
//!
//! Two modes (bit 0 of the first byte):
//! - direct: `CtrlQueue::process` against a model device whose pair switch is
//!   `ctrl::switch_pairs` over fake backends plus park/resume steps that can time out. Fast;
//!   checks the model's state after every VQ_PAIRS_SET.
//! - device: the real `Net` with fake backends, activated with all its worker threads and
//!   its control thread; each kick goes to the control thread's eventfd.
//!
//! Input: mode/feature byte, feature word, pair count, control ring (see `Ring::read`),
//! then operations (tag % 10): 0..=5 shape memory (`ring_op`), 6 add a backend fault,
//! 7 kick and check, 8 add a worker fault (direct mode), 9 write a VQ_PAIRS_SET or an
//! RSS_CONFIG command (the device mode's `Net` steers through a checking fake map).
//!
//! After every kick, when exactly one command was pending and its reply cannot have been
//! overwritten: the chain came back with length 1 iff it parsed, the ack byte is OK or ERR,
//! and a VQ_PAIRS_SET(n) answered OK left n pairs enabled, answered ERR left the count as
//! it was. Always: the enabled pairs have attached backends and running workers, the others
//! detached backends and parked workers (unless a rollback step failed, which is counted);
//! no backend is read or written while detached; and no thread or fd outlives the device.
#![no_main]

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mqvmm_fuzz::{
    guest_memory, read_fault, ring_op, thread_and_fd_count, trace, CountingInterrupt, FakeBackend,
    Input, Ring, DATA_AREA, HIGH_REGION,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_RSS, VIRTIO_NET_F_VQ_NOTF_COAL,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_net::chain::DescTable;
use virtio_net::ctrl::{
    parse_request, switch_pairs, CtrlQueue, CtrlRequest, CtrlTarget, PairSwitch, SwitchError,
    ACK_ERR, ACK_OK,
};
use virtio_net::features::{bit, tun_offload_flags, Negotiated};
use virtio_net::steer::{RssConfig, Steering};
use virtio_net::test_utils::fakes::{Fault, FaultPlan, FaultyBackend};
use virtio_net::{Backend, Net, NetConfig, NetMetrics};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CTRL_MAX: u16 = 64;
const PAIR_QUEUE_SIZE: u16 = 2;
const FEATURE_BITS: [u32; 18] = [
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_CTRL_VQ,
    // Input bits 12-14 were unused before these; 15 and 16 come from an extra input byte.
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_NOTF_COAL,
    VIRTIO_NET_F_VQ_NOTF_COAL,
    VIRTIO_NET_F_RSS,
];

/// The steering map of the device mode: every configuration the device writes must be one
/// the program can apply.
struct CheckedSteering;

impl Steering for CheckedSteering {
    fn publish(&self, cfg: &tap::steering::SteerConfig) -> std::io::Result<()> {
        let len = cfg.table.len();
        assert!(
            len.is_power_of_two() && len <= tap::steering::TABLE_LEN,
            "steering table of {len} entries"
        );
        assert_eq!(cfg.hash_types & !tap::steering::SUPPORTED_HASH_TYPES, 0);
        Ok(())
    }
}

/// The model device of the direct mode. Its pair switch runs the real `switch_pairs`.
struct Model<'a> {
    backends: &'a [FaultyBackend<FakeBackend>],
    plan: &'a FaultPlan,
    active: usize,
    running: Vec<bool>,
    undo_failures: usize,
}

struct ModelSwitch<'a, 'b> {
    m: &'b mut Model<'a>,
}

impl PairSwitch for ModelSwitch<'_, '_> {
    fn park(&mut self, pair: usize) -> Result<(), SwitchError> {
        if self.m.plan.call(Fault::Park).is_some() {
            return Err(SwitchError::WorkerTimeout {
                pair,
                state: "parked",
                timeout_ms: 0,
            });
        }
        self.m.running[pair] = false;
        Ok(())
    }

    fn resume(&mut self, pair: usize) -> Result<(), SwitchError> {
        if self.m.plan.call(Fault::Resume).is_some() {
            return Err(SwitchError::WorkerTimeout {
                pair,
                state: "running",
                timeout_ms: 0,
            });
        }
        self.m.running[pair] = true;
        Ok(())
    }

    fn attach(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.m.backends[pair]
            .attach()
            .map_err(|source| SwitchError::Backend { pair, source })
    }

    fn detach(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.m.backends[pair]
            .detach()
            .map_err(|source| SwitchError::Backend { pair, source })
    }

    fn undo_failed(&mut self, _pair: usize, _err: &SwitchError) {
        self.m.undo_failures += 1;
    }
}

impl Model<'_> {
    /// Enabled pairs `0..active`: attached and running; all others detached and parked.
    fn check_canonical(&self, when: &str) {
        if self.undo_failures > 0 {
            return;
        }
        for (pair, b) in self.backends.iter().enumerate() {
            let enabled = pair < self.active;
            assert_eq!(
                b.inner().attached_now(),
                enabled,
                "{when}: pair {pair} attached, {} active",
                self.active
            );
            assert_eq!(
                self.running[pair], enabled,
                "{when}: pair {pair} running, {} active",
                self.active
            );
        }
    }
}

impl CtrlTarget for Model<'_> {
    fn max_pairs(&self) -> u16 {
        self.backends.len() as u16
    }

    fn set_queue_pairs(&mut self, n: u16) -> bool {
        let n = usize::from(n);
        assert!(
            n >= 1 && n <= self.backends.len(),
            "VQ_PAIRS_SET({n}) passed the range check"
        );
        let before = self.active;
        if n == before {
            return true;
        }
        let ok = switch_pairs(&mut ModelSwitch { m: self }, before, n).is_ok();
        if ok {
            self.active = n;
        }
        self.check_canonical(if ok {
            "switch succeeded"
        } else {
            "switch rolled back"
        });
        ok
    }

    fn set_rss(&mut self, cfg: RssConfig) -> bool {
        let n = cfg.pairs_needed();
        assert!(
            n >= 1 && usize::from(n) <= self.backends.len(),
            "RSS_CONFIG needing {n} pairs passed validation"
        );
        self.set_queue_pairs(n)
    }

    fn set_guest_offloads(&mut self, offloads: u64) -> bool {
        let flags = tun_offload_flags(offloads);
        self.backends
            .iter()
            .filter(|b| b.inner().attached_now())
            .all(|b| b.set_offload(flags).is_ok())
    }

    fn set_mac(&mut self, _mac: [u8; 6]) -> bool {
        true
    }
}

/// What one kick is expected to answer, computed before the kick.
enum Expect {
    /// No command pending: nothing returned, nothing changed.
    Nothing,
    /// Exactly one command pending, and its reply cannot be overwritten.
    One(Pending),
    /// Several, or a layout where the device's own writes change what is pending.
    Unknown,
}

struct Pending {
    head: u16,
    request: Option<CtrlRequest>,
    active_before: usize,
}

struct Checker {
    ring_snapshot: Ring,
    features: Negotiated,
    max_pairs: usize,
    /// Avail and used rings do not overlap (else the device's own writes change what is
    /// available and per-command accounting is off).
    disjoint: bool,
}

impl Checker {
    fn table(&self) -> DescTable {
        DescTable {
            addr: self.ring_snapshot.layout.desc,
            size: self.ring_snapshot.layout.size,
            indirect: self.features.indirect_desc(),
        }
    }

    fn in_avail_ring(&self, addr: u64) -> bool {
        let r = &self.ring_snapshot.layout;
        addr >= r.avail.0 && addr < r.avail.0 + 6 + 2 * u64::from(r.size)
    }

    /// What the next kick must answer, given the device's next avail index.
    fn expect(&self, mem: &GuestMemoryMmap, next_avail: u16, active: usize) -> Expect {
        let r = &self.ring_snapshot.layout;
        // virtio-queue takes an avail ring at guest address 0 for "not set up" and refuses
        // to iterate it; the device then logs once and answers nothing.
        if !self.disjoint || r.avail.0 == 0 {
            return Expect::Unknown;
        }
        let Ok(idx) = mem.read_obj::<u16>(GuestAddress(r.avail.0 + 2)) else {
            return Expect::Unknown;
        };
        match (Wrapping(u16::from_le(idx)) - Wrapping(next_avail)).0 {
            0 => return Expect::Nothing,
            1 => {}
            _ => return Expect::Unknown,
        }
        let slot = u64::from(next_avail % r.size);
        let Ok(head) = mem.read_obj::<u16>(GuestAddress(r.avail.0 + 4 + 2 * slot)) else {
            return Expect::Unknown;
        };
        let head = u16::from_le(head);
        let request = parse_request(mem, self.table(), head).ok();
        if let Some(req) = &request {
            let ack = req.ack_addr.0;
            if r.used_ring_contains(ack) || self.in_avail_ring(ack) || ack >= HIGH_REGION {
                return Expect::Unknown;
            }
        }
        trace!("expect: head {head}, request {request:?}");
        Expect::One(Pending {
            head,
            request,
            active_before: active,
        })
    }

    /// Checks what a kick did against what was expected; returns how far the device's
    /// avail index moved, if known.
    fn check(
        &self,
        mem: &GuestMemoryMmap,
        e: &Expect,
        used_before: u16,
        used: u16,
        active_before: usize,
        active_after: usize,
    ) -> Option<u16> {
        match e {
            Expect::Nothing => {
                assert_eq!(used, 0, "nothing pending, {used} returned");
                assert_eq!(
                    active_after, active_before,
                    "pair count changed without a command"
                );
                Some(0)
            }
            Expect::One(p) => {
                self.check_reply(mem, p, used_before, used, active_after);
                Some(1)
            }
            Expect::Unknown => None,
        }
    }

    /// Checks the reply to `p` given the used entries added by the kick.
    fn check_reply(
        &self,
        mem: &GuestMemoryMmap,
        p: &Pending,
        used_before: u16,
        used: u16,
        active_after: usize,
    ) {
        let r = &self.ring_snapshot;
        if p.head >= r.layout.size {
            assert_eq!(used, 0, "chain {} outside the ring was returned", p.head);
            assert_eq!(active_after, p.active_before);
            return;
        }
        assert_eq!(used, 1, "one command pending, {used} returned");
        let (id, len) = r
            .used_elem(mem, used_before)
            .expect("used ring is in memory");
        assert_eq!(id, u32::from(p.head), "used entry names another chain");
        let Some(req) = &p.request else {
            assert_eq!(
                len, 0,
                "malformed chain {} returned with length {len}",
                p.head
            );
            assert_eq!(
                active_after, p.active_before,
                "malformed chain changed the pair count"
            );
            return;
        };
        let ack: u8 = mem.read_obj(req.ack_addr).expect("ack byte in memory");
        assert!(ack == ACK_OK || ack == ACK_ERR, "ack byte {ack}");
        // Only VQ_GET answers OK with a result (struct virtio_net_ctrl_coal) after the ack.
        let vq_get = req.header()
            == Some((
                VIRTIO_NET_CTRL_NOTF_COAL as u8,
                VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET as u8,
            ));
        let expected_len = if vq_get && ack == ACK_OK { 9 } else { 1 };
        assert_eq!(
            len, expected_len,
            "parsed command returned with length {len}"
        );
        let pairs_set = req.header()
            == Some((
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ));
        let n = req
            .data()
            .get(..2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
        let rss_config = req.header()
            == Some((
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8,
            ));
        if rss_config {
            let parsed = RssConfig::parse(req.data(), req.data_len(), self.max_pairs as u16)
                .filter(|_| self.features.has(VIRTIO_NET_F_RSS));
            match parsed {
                None => assert_eq!(ack, ACK_ERR, "invalid or unnegotiated RSS_CONFIG acked"),
                Some(cfg) if ack == ACK_OK => assert_eq!(
                    active_after,
                    usize::from(cfg.pairs_needed()),
                    "RSS_CONFIG acked OK"
                ),
                Some(_) => assert_eq!(active_after, p.active_before, "RSS_CONFIG answered ERR"),
            }
            return;
        }
        match (pairs_set, n) {
            (true, Some(n)) if self.features.mq() => {
                if n == 0 || n > self.max_pairs {
                    assert_eq!(
                        ack, ACK_ERR,
                        "VQ_PAIRS_SET({n}) of {} acked",
                        self.max_pairs
                    );
                }
                if ack == ACK_OK {
                    assert_eq!(active_after, n, "VQ_PAIRS_SET({n}) acked OK");
                } else {
                    assert_eq!(
                        active_after, p.active_before,
                        "VQ_PAIRS_SET({n}) answered ERR"
                    );
                }
            }
            (true, _) => {
                assert_eq!(
                    ack, ACK_ERR,
                    "VQ_PAIRS_SET without MQ or without data acked"
                );
                assert_eq!(active_after, p.active_before);
            }
            _ => assert_eq!(
                active_after, p.active_before,
                "non-MQ command changed the pair count"
            ),
        }
    }
}

fn read_features(inp: &mut Input, first: u8) -> u64 {
    let word = u32::from(first >> 1) | (u32::from(inp.u8()) << 7) | (u32::from(inp.u8()) << 15);
    FEATURE_BITS
        .iter()
        .enumerate()
        .filter(|(i, _)| word & (1 << i) != 0)
        .fold(0, |acc, (_, &b)| acc | bit(b))
}

/// Writes a VQ_PAIRS_SET or (when the input's next byte has its top bit set) an RSS_CONFIG
/// command at an input-chosen address.
fn write_mq_command(inp: &mut Input, mem: &GuestMemoryMmap) {
    let sel = inp.u8();
    if sel & 0x80 != 0 {
        write_rss_config(inp, mem, sel);
    } else {
        write_pairs_set(inp, mem);
    }
}

/// Writes an RSS_CONFIG command: mostly well-formed (table length, queues, key length from
/// small input values), sometimes with raw input lengths and queue numbers.
fn write_rss_config(inp: &mut Input, mem: &GuestMemoryMmap, sel: u8) {
    let at = DATA_AREA + 16 * u64::from(inp.u8());
    let raw = sel & 0x40 != 0;
    let hash_types = if raw {
        u32::from(inp.u16())
    } else {
        u32::from(inp.u8() & 0x3f)
    };
    let len: u16 = if raw {
        inp.u8().into()
    } else {
        1 << (inp.u8() % 8)
    };
    let mut cmd = vec![
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8,
    ];
    cmd.extend(hash_types.to_le_bytes());
    cmd.extend(len.wrapping_sub(1).to_le_bytes());
    let queue = |inp: &mut Input| {
        if raw {
            inp.u16()
        } else {
            u16::from(inp.u8() % 6)
        }
    };
    cmd.extend(queue(inp).to_le_bytes());
    for _ in 0..len {
        cmd.extend(queue(inp).to_le_bytes());
    }
    cmd.extend(queue(inp).to_le_bytes());
    let key_len = if raw { inp.u8() } else { inp.u8() % 41 };
    cmd.push(key_len);
    cmd.extend((0..key_len).map(|i| i.wrapping_mul(37)));
    let _ = mem.write_slice(&cmd, GuestAddress(at));
}

/// Writes a VQ_PAIRS_SET command (class, command, n) at an input-chosen address.
fn write_pairs_set(inp: &mut Input, mem: &GuestMemoryMmap) {
    let at = DATA_AREA + 16 * u64::from(inp.u8());
    let n = match inp.u8() {
        b @ 0..=0xef => u16::from(b % 6),
        _ => inp.u16(),
    };
    let [lo, hi] = n.to_le_bytes();
    let cmd = [
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
        lo,
        hi,
    ];
    let _ = mem.write_slice(&cmd, GuestAddress(at));
}

fn run_direct(mut inp: Input, features: u64, pairs: usize, mut ring: Ring) {
    let mem = guest_memory();
    let features = Negotiated(features | bit(VIRTIO_NET_F_CTRL_VQ));
    let Some(queue) = ring.queue(CTRL_MAX, features.event_idx(), &mem) else {
        trace!("direct: ctrl ring {ring:?} refused");
        return;
    };
    let plan = Arc::new(FaultPlan::default());
    let backends: Vec<FaultyBackend<FakeBackend>> = (0..pairs)
        .map(|p| FakeBackend::faulty(p as u16, p == 0, plan.clone()))
        .collect();
    let mut model = Model {
        backends: &backends,
        plan: &plan,
        active: 1,
        running: (0..pairs).map(|p| p == 0).collect(),
        undo_failures: 0,
    };
    let metrics = Arc::new(NetMetrics::new(pairs));
    let index = if features.mq() { 2 * pairs as u16 } else { 2 };
    let mut cq = CtrlQueue::new(
        queue,
        index,
        mem.clone(),
        Arc::new(CountingInterrupt::default()),
        metrics,
        features,
    );
    let checker = Checker {
        ring_snapshot: ring,
        features,
        max_pairs: pairs,
        disjoint: !rings_overlap(&ring),
    };
    while !inp.is_empty() {
        match inp.u8() % 10 {
            op @ 0..=5 => {
                ring_op(op, &mut inp, &mem, &mut ring);
            }
            6 => read_fault(&mut inp, &plan),
            7 => {
                let used_before = cq.queue().next_used();
                let active_before = model.active;
                let expect = checker.expect(&mem, cq.queue().next_avail(), active_before);
                cq.process(&mut model, Instant::now());
                let used = (Wrapping(cq.queue().next_used()) - Wrapping(used_before)).0;
                let moved = checker.check(
                    &mem,
                    &expect,
                    used_before,
                    used,
                    active_before,
                    model.active,
                );
                trace!(
                    "direct kick: used {used}, pairs {active_before} -> {}, checked {moved:?}",
                    model.active
                );
                model.check_canonical("after kick");
            }
            8 => {
                let b = inp.u8();
                let op = if b & 1 == 0 {
                    Fault::Park
                } else {
                    Fault::Resume
                };
                plan.fail_kth(op, u32::from(b >> 1) % 8 + 1);
            }
            _ => write_mq_command(&mut inp, &mem),
        }
    }
}

fn rings_overlap(r: &Ring) -> bool {
    let r = &r.layout;
    let avail_end = r.avail.0 + 6 + 2 * u64::from(r.size);
    let used_end = r.used.0 + 6 + 8 * u64::from(r.size);
    r.avail.0 < used_end && r.used.0 < avail_end
}

/// Whether the control thread `net-ctrl` is blocked in epoll_wait, i.e. between kicks and
/// not inside `CtrlQueue::process` (its kernel-side syscall number, from /proc).
fn ctrl_thread_waiting() -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .map(|c| c.trim() == "net-ctrl")
            .unwrap_or(false);
        if named {
            let syscall = std::fs::read_to_string(path.join("syscall")).unwrap_or_default();
            // x86_64: epoll_wait 232, epoll_pwait 281, epoll_pwait2 441.
            return matches!(
                syscall.split_whitespace().next(),
                Some("232" | "281" | "441")
            );
        }
    }
    panic!("no net-ctrl thread while the device is active");
}

/// Kicks the control queue and waits until the control thread took the kick (the eventfd
/// is empty) and went back to epoll_wait: the kick is fully processed, and the thread
/// cannot touch guest memory until the next kick.
fn kick_and_settle(kick: &EventFd) {
    kick.write(1).expect("kick");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut pfd = libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc == 0 && ctrl_thread_waiting() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "control thread did not finish a kick within 30 s"
        );
        std::thread::yield_now();
    }
}

fn check_device(
    net: &Net<FaultyBackend<FakeBackend>>,
    attached_after_setup: &[bool],
    has_worker: bool,
) {
    let m = net.metrics();
    let active = usize::from(net.active_queue_pairs());
    let backends = net.backends();
    assert!(
        active >= 1 && active <= backends.len(),
        "{active} pairs active"
    );
    let real = backends.iter().filter(|b| b.inner().attached_now()).count();
    assert_eq!(m.attached_pairs(), real, "metrics attached vs backends");
    if m.rollback_failures.load(Ordering::SeqCst) > 0 {
        return;
    }
    for (pair, b) in backends.iter().enumerate() {
        let touched = b.inner().state.touched_detached();
        assert_eq!(touched, 0, "pair {pair}: backend used while detached");
        if pair < active {
            assert!(
                b.inner().attached_now(),
                "enabled pair {pair} has a detached backend"
            );
            if has_worker {
                assert!(
                    !m.pairs[pair].parked.load(Ordering::SeqCst),
                    "enabled pair {pair} parked"
                );
            }
        } else if !attached_after_setup[pair] {
            assert!(
                !b.inner().attached_now(),
                "disabled pair {pair} ({active} active) attached"
            );
        }
    }
}

fn run_device(mut inp: Input, features: u64, pairs: usize, mut ring: Ring) {
    let plan = Arc::new(FaultPlan::default());
    let initially = inp.u8();
    let backends: Vec<FaultyBackend<FakeBackend>> = (0..pairs)
        .map(|p| FakeBackend::faulty(p as u16, initially & (1 << p) != 0, plan.clone()))
        .collect();
    // Faults before creation hit Net::new and activation.
    while inp.u8() & 0x80 != 0 {
        read_fault(&mut inp, &plan);
    }
    let cfg = NetConfig {
        queue_size: CTRL_MAX,
        ..NetConfig::default()
    };
    let steering: Arc<dyn Steering> = Arc::new(CheckedSteering);
    let Ok(mut net) = Net::with_steering(cfg, backends, Some(steering)) else {
        trace!("device: Net::new failed");
        return;
    };
    net.set_acked_features(features | bit(VIRTIO_NET_F_CTRL_VQ));
    let negotiated = Negotiated(net.acked_features());
    let mem = guest_memory();
    let Some(ctrl) = ring.queue(CTRL_MAX, negotiated.event_idx(), &mem) else {
        trace!("device: ctrl ring {ring:?} refused");
        return;
    };
    let queue_pairs = if negotiated.mq() { pairs } else { 1 };
    let mut queues: Vec<(u16, Queue, EventFd)> = Vec::new();
    for q in 0..2 * queue_pairs {
        let r = Ring::at(HIGH_REGION + 0x80 * q as u64, PAIR_QUEUE_SIZE);
        let queue = r
            .queue(CTRL_MAX, negotiated.event_idx(), &mem)
            .expect("pair rings fit");
        queues.push((
            q as u16,
            queue,
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        ));
    }
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    queues.push((
        net.ctrl_queue_index(),
        ctrl,
        kick.try_clone().expect("eventfd clone"),
    ));
    if let Err(e) = net.activate(mem.clone(), Arc::new(CountingInterrupt::default()), queues) {
        trace!("device: activation failed: {e}");
        return;
    }
    let attached_after_setup: Vec<bool> = net
        .backends()
        .iter()
        .enumerate()
        .map(|(p, b)| p > 0 && b.inner().attached_now())
        .collect();
    let checker = Checker {
        ring_snapshot: ring,
        features: negotiated,
        max_pairs: pairs,
        disjoint: !rings_overlap(&ring),
    };
    // The device's ring positions, followed from the outside: valid while every kick
    // answered exactly what was pending.
    let mut next_avail = Some(0u16);
    let mut used_seen = 0u16;
    check_device(&net, &attached_after_setup, true);
    while !inp.is_empty() {
        match inp.u8() % 10 {
            op @ 0..=5 => {
                ring_op(op, &mut inp, &mem, &mut ring);
            }
            6 | 8 => read_fault(&mut inp, &plan),
            7 => {
                let used_before = ring.layout.used_idx(&mem).unwrap_or(0);
                if used_before != used_seen {
                    next_avail = None;
                }
                let active_before = usize::from(net.active_queue_pairs());
                let expect = match next_avail {
                    Some(na) => checker.expect(&mem, na, active_before),
                    None => Expect::Unknown,
                };
                kick_and_settle(&kick);
                used_seen = ring.layout.used_idx(&mem).unwrap_or(0);
                let used = (Wrapping(used_seen) - Wrapping(used_before)).0;
                let active_after = usize::from(net.active_queue_pairs());
                let moved = checker.check(
                    &mem,
                    &expect,
                    used_before,
                    used,
                    active_before,
                    active_after,
                );
                trace!("device kick: used {used}, pairs {active_before} -> {active_after}, checked {moved:?}");
                next_avail = match (next_avail, moved) {
                    (Some(na), Some(k)) => Some(na.wrapping_add(k)),
                    _ => None,
                };
                check_device(&net, &attached_after_setup, true);
            }
            _ => write_mq_command(&mut inp, &mem),
        }
    }
    net.reset();
    assert_eq!(net.active_queue_pairs(), 1, "reset leaves one pair");
    let m = net.metrics();
    let real = net
        .backends()
        .iter()
        .filter(|b| b.inner().attached_now())
        .count();
    assert_eq!(
        m.attached_pairs(),
        real,
        "metrics attached vs backends after reset"
    );
}

fn run(data: &[u8]) {
    mqvmm_fuzz::tracing();
    let mut inp = Input::new(data);
    let first = inp.u8();
    let features = read_features(&mut inp, first);
    let pairs = 1 + usize::from(inp.u8() % 4);
    let ring = Ring::read(&mut inp, CTRL_MAX);
    if first & 1 == 0 {
        run_direct(inp, features, pairs, ring);
    } else {
        let (threads, fds) = thread_and_fd_count();
        run_device(inp, features, pairs, ring);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let now = thread_and_fd_count();
            if now == (threads, fds) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device left threads/fds behind: {now:?}, was {:?}",
                (threads, fds)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
