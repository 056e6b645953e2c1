// SPDX-License-Identifier: Apache-2.0
//! The control virtqueue: command parsing, dispatch, and the VQ_PAIRS_SET sequence with
//! rollback.
//!
//! Side effects go through two small traits so that the parsing and the ordering rules are
//! testable without threads: [`CtrlTarget`] (what a command changes) and [`PairSwitch`]
//! (park/resume a worker, attach/detach a backend queue).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_NOTF_COAL,
    VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_ALLUNI, VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI, VIRTIO_NET_CTRL_RX_NOUNI, VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL, VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_RSS,
    VIRTIO_NET_F_VQ_NOTF_COAL, VIRTIO_NET_OK,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::backend::BackendError;
use crate::chain::{walk, ChainError, DescTable};
use crate::coalesce::Coalesce;
use crate::features::Negotiated;
use crate::filter::{parse_mac_table, MacTable, RxMode, VLAN_IDS};
use crate::metrics::{NetMetrics, Tally};
use crate::ring::Ring;
use crate::rxtx::Work;
use crate::steer::RssConfig;
use crate::Interrupt;

/// Reply byte for a command that was applied.
pub const ACK_OK: u8 = VIRTIO_NET_OK as u8;
/// Reply byte for a command that was refused (state unchanged).
pub const ACK_ERR: u8 = VIRTIO_NET_ERR as u8;

/// Commands answered per [`CtrlQueue::process`] call before the control thread looks at its
/// other events (a stop request among them).
pub const CTRL_BUDGET: usize = 64;

/// Readable bytes of a command we look at: class, command, and the largest payload we
/// parse in full, a MAC table of two times [`crate::filter::MAC_TABLE_ENTRIES`] addresses (776 bytes);
/// anything beyond is only counted.
const CMD_BUF_LEN: usize = 1024;

/// Why a step of a queue-pair switch failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The worker did not confirm the state change in time.
    #[error("worker of pair {pair} did not confirm {state} within {timeout_ms} ms")]
    WorkerTimeout {
        /// The pair.
        pair: usize,
        /// The requested state.
        state: &'static str,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The worker could not start polling its backend.
    #[error("worker of pair {pair} cannot poll its backend")]
    WorkerPoll {
        /// The pair.
        pair: usize,
        /// What epoll said.
        #[source]
        source: std::io::Error,
    },
    /// The device is being stopped (reset) while the switch waited for a worker.
    #[error("device is stopping; pair {pair} left as it is")]
    Stopping {
        /// The pair.
        pair: usize,
    },
    /// The pair has no worker because the driver did not set up its queues.
    #[error("pair {pair} has no worker: its virtqueues were not set up")]
    NoWorker {
        /// The pair.
        pair: usize,
    },
    /// A backend operation failed.
    #[error("backend of pair {pair} failed")]
    Backend {
        /// The pair.
        pair: usize,
        /// The backend error.
        #[source]
        source: BackendError,
    },
}

/// The four primitive steps of a queue-pair switch.
pub trait PairSwitch {
    /// Stop the worker of `pair` from touching its backend; returns once it confirmed.
    fn park(&mut self, pair: usize) -> Result<(), SwitchError>;
    /// Let the worker of `pair` use its backend again; returns once it confirmed.
    fn resume(&mut self, pair: usize) -> Result<(), SwitchError>;
    /// Enable the backend queue of `pair`.
    fn attach(&mut self, pair: usize) -> Result<(), SwitchError>;
    /// Disable the backend queue of `pair`.
    fn detach(&mut self, pair: usize) -> Result<(), SwitchError>;
    /// An undo step failed; the pair stays as it is (metrics show it).
    fn undo_failed(&mut self, pair: usize, err: &SwitchError) {
        error!("virtio-net: rollback of pair {pair} failed: {err}");
    }
}

fn undo<S: PairSwitch>(sw: &mut S, pair: usize, result: Result<(), SwitchError>) {
    if let Err(e) = result {
        sw.undo_failed(pair, &e);
    }
}

/// Re-enables pairs `range` that a failed shrink had disabled (in reverse order of the
/// shrink: lowest first).
fn undo_shrink<S: PairSwitch>(sw: &mut S, range: std::ops::Range<usize>) {
    for pair in range {
        let r = sw.attach(pair);
        let ok = r.is_ok();
        undo(sw, pair, r);
        if ok {
            let r = sw.resume(pair);
            undo(sw, pair, r);
        }
    }
}

/// Disables pairs `range` that a failed grow had enabled (highest first).
fn undo_grow<S: PairSwitch>(sw: &mut S, range: std::ops::Range<usize>) {
    for pair in range.rev() {
        let r = sw.park(pair);
        undo(sw, pair, r);
        let r = sw.detach(pair);
        undo(sw, pair, r);
    }
}

/// Moves from `current` to `target` enabled pairs (pairs `0..n` enabled).
///
/// Shrinking parks each surplus worker (it confirms it no longer touches the backend) and
/// then detaches its backend, highest pair first. Growing attaches each backend and then
/// resumes its worker. On the first failure everything done so far is undone in reverse and
/// the error is returned, so the enabled set is `0..current` again (unless an undo step
/// itself fails, which [`PairSwitch::undo_failed`] reports).
pub fn switch_pairs<S: PairSwitch>(
    sw: &mut S,
    current: usize,
    target: usize,
) -> Result<(), SwitchError> {
    if target < current {
        for pair in (target..current).rev() {
            if let Err(e) = sw.park(pair) {
                // The worker may have parked after the timeout; make sure it runs.
                let r = sw.resume(pair);
                undo(sw, pair, r);
                undo_shrink(sw, pair + 1..current);
                return Err(e);
            }
            if let Err(e) = sw.detach(pair) {
                let r = sw.resume(pair);
                undo(sw, pair, r);
                undo_shrink(sw, pair + 1..current);
                return Err(e);
            }
        }
    } else {
        for pair in current..target {
            if let Err(e) = sw.attach(pair) {
                undo_grow(sw, current..pair);
                return Err(e);
            }
            if let Err(e) = sw.resume(pair) {
                let r = sw.park(pair);
                undo(sw, pair, r);
                let r = sw.detach(pair);
                undo(sw, pair, r);
                undo_grow(sw, current..pair);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// What control commands change.
pub trait CtrlTarget {
    /// Number of queue pairs the device has.
    fn max_pairs(&self) -> u16;
    /// Enable pairs `0..n` (1 <= n <= max already checked); false means refused and
    /// rolled back.
    fn set_queue_pairs(&mut self, n: u16) -> bool;
    /// Steer received frames as `cfg` says (validated), enabling the pairs it needs.
    fn set_rss(&mut self, _cfg: RssConfig) -> bool {
        false
    }
    /// Apply guest receive offloads (VIRTIO_NET_F_GUEST_* bits, already checked against
    /// the negotiated features).
    fn set_guest_offloads(&mut self, offloads: u64) -> bool;
    /// Change the MAC in the config space.
    fn set_mac(&mut self, mac: [u8; 6]) -> bool;
    /// Switch a receive mode (VIRTIO_NET_CTRL_RX). Targets that do not filter accept it.
    fn set_rx_mode(&mut self, _mode: RxMode, _on: bool) -> bool {
        true
    }
    /// Replace the MAC table (VIRTIO_NET_CTRL_MAC_TABLE_SET).
    fn set_mac_table(&mut self, _table: MacTable) -> bool {
        true
    }
    /// Let frames tagged with `vid` (< 4096, checked) pass or not (VIRTIO_NET_CTRL_VLAN).
    fn set_vlan(&mut self, _vid: u16, _allowed: bool) -> bool {
        true
    }
    /// Set the notification coalescing of all transmit (`tx`) or receive queues.
    fn set_coalescing(&mut self, _tx: bool, _cfg: Coalesce) -> bool {
        true
    }
    /// Set the notification coalescing of data queue `vqn` (checked to exist).
    fn set_queue_coalescing(&mut self, _vqn: u16, _cfg: Coalesce) -> bool {
        true
    }
    /// The notification coalescing of data queue `vqn` (checked to exist).
    fn queue_coalescing(&self, _vqn: u16) -> Coalesce {
        Coalesce::default()
    }
    /// Waits until the device may carry out `cmd` (host operations are rate-limited);
    /// false if the device is being stopped meanwhile, and `cmd` must not run.
    fn admit(&mut self, _cmd: &Command) -> bool {
        true
    }
    /// Whether the device is being stopped (reset): the control queue then answers no
    /// further command.
    fn stopping(&self) -> bool {
        false
    }
}

/// A control command that is well-formed and allowed by the negotiated features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, `1 <= n <= max_virtqueue_pairs`.
    VqPairsSet(u16),
    /// VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, only negotiated offload bits.
    GuestOffloadsSet(u64),
    /// VIRTIO_NET_CTRL_MAC_ADDR_SET, exactly 6 bytes of data.
    MacAddrSet([u8; 6]),
    /// VIRTIO_NET_CTRL_RX_*: a receive mode on or off.
    RxMode(RxMode, bool),
    /// VIRTIO_NET_CTRL_MAC_TABLE_SET.
    MacTableSet(MacTable),
    /// VIRTIO_NET_CTRL_VLAN_ADD (`true`) / _DEL (`false`), vid < 4096.
    Vlan(u16, bool),
    /// VIRTIO_NET_CTRL_NOTF_COAL_TX_SET (`tx`) / _RX_SET.
    NotfCoal {
        /// Transmit queues (else receive queues).
        tx: bool,
        /// The parameters.
        cfg: Coalesce,
    },
    /// VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET: one data queue's coalescing.
    VqCoalSet {
        /// The queue index.
        vqn: u16,
        /// The parameters.
        cfg: Coalesce,
    },
    /// VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET: one data queue's coalescing, returned after the ack
    /// as `struct virtio_net_ctrl_coal`.
    VqCoalGet {
        /// The queue index.
        vqn: u16,
    },
    /// VIRTIO_NET_CTRL_MQ_RSS_CONFIG, validated ([`RssConfig::parse`]).
    RssConfig(RssConfig),
}

/// Parses one command. `data` is the command-specific data, possibly truncated to what we
/// read; `data_len` is how long the driver made it. Trailing bytes are ignored, except that
/// MAC_ADDR_SET takes exactly 6. `None` means the command is refused (ERR) with nothing
/// changed: unknown, not negotiated, too short, or out of range.
pub fn parse_command(
    features: Negotiated,
    class: u8,
    command: u8,
    data: &[u8],
    data_len: usize,
    max_pairs: u16,
) -> Option<Command> {
    let parsed = match (u32::from(class), u32::from(command)) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if features.mq() => {
            let b = data.get(..2)?;
            let n = u16::from_le_bytes([b[0], b[1]]);
            if n == 0 || n > max_pairs {
                debug!("virtio-net: VQ_PAIRS_SET({n}) outside 1..={max_pairs}");
                return None;
            }
            Command::VqPairsSet(n)
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG) if features.has(VIRTIO_NET_F_RSS) => {
            Command::RssConfig(RssConfig::parse(data, data_len, max_pairs)?)
        }
        (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET)
            if features.has(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) =>
        {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(data.get(..8)?);
            let offloads = u64::from_le_bytes(raw);
            // Only offloads negotiated at FEATURES_OK may be switched on.
            if offloads & !features.guest_offloads() != 0 {
                debug!("virtio-net: GUEST_OFFLOADS_SET({offloads:#x}) not negotiated");
                return None;
            }
            Command::GuestOffloadsSet(offloads)
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET)
            if features.has(VIRTIO_NET_F_CTRL_MAC_ADDR) && data_len == 6 =>
        {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(data.get(..6)?);
            Command::MacAddrSet(mac)
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET)
            if features.has(VIRTIO_NET_F_CTRL_RX) =>
        {
            Command::MacTableSet(parse_mac_table(data, data_len)?)
        }
        (VIRTIO_NET_CTRL_RX, cmd) => {
            let mode = match cmd {
                VIRTIO_NET_CTRL_RX_PROMISC => RxMode::Promisc,
                VIRTIO_NET_CTRL_RX_ALLMULTI => RxMode::AllMulti,
                VIRTIO_NET_CTRL_RX_ALLUNI => RxMode::AllUni,
                VIRTIO_NET_CTRL_RX_NOMULTI => RxMode::NoMulti,
                VIRTIO_NET_CTRL_RX_NOUNI => RxMode::NoUni,
                VIRTIO_NET_CTRL_RX_NOBCAST => RxMode::NoBcast,
                _ => return None,
            };
            let needs = match mode {
                RxMode::Promisc | RxMode::AllMulti => VIRTIO_NET_F_CTRL_RX,
                _ => VIRTIO_NET_F_CTRL_RX_EXTRA,
            };
            if !features.has(needs) {
                return None;
            }
            Command::RxMode(mode, *data.first()? != 0)
        }
        (VIRTIO_NET_CTRL_VLAN, cmd) if features.has(VIRTIO_NET_F_CTRL_VLAN) => {
            let b = data.get(..2)?;
            let vid = u16::from_le_bytes([b[0], b[1]]);
            if usize::from(vid) >= VLAN_IDS {
                return None;
            }
            match cmd {
                VIRTIO_NET_CTRL_VLAN_ADD => Command::Vlan(vid, true),
                VIRTIO_NET_CTRL_VLAN_DEL => Command::Vlan(vid, false),
                _ => return None,
            }
        }
        (
            VIRTIO_NET_CTRL_NOTF_COAL,
            cmd @ (VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET | VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET),
        ) if features.has(VIRTIO_NET_F_VQ_NOTF_COAL) => {
            let b = data.get(..2)?;
            let vqn = u16::from_le_bytes([b[0], b[1]]);
            // Data queues only: the control queue has no coalescing.
            let data_queues = if features.mq() {
                2 * u32::from(max_pairs)
            } else {
                2
            };
            if u32::from(vqn) >= data_queues {
                debug!("virtio-net: coalescing of queue {vqn}: not a data queue");
                return None;
            }
            if cmd == VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET {
                Command::VqCoalGet { vqn }
            } else {
                let b = data.get(4..12)?;
                let cfg = Coalesce {
                    max_packets: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    usecs: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                };
                Command::VqCoalSet { vqn, cfg }
            }
        }
        (VIRTIO_NET_CTRL_NOTF_COAL, cmd) if features.has(VIRTIO_NET_F_NOTF_COAL) => {
            let tx = match cmd {
                VIRTIO_NET_CTRL_NOTF_COAL_TX_SET => true,
                VIRTIO_NET_CTRL_NOTF_COAL_RX_SET => false,
                _ => return None,
            };
            let b = data.get(..8)?;
            let cfg = Coalesce {
                max_packets: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                usecs: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            };
            Command::NotfCoal { tx, cfg }
        }
        // ANNOUNCE needs GUEST_ANNOUNCE, HASH_CONFIG needs HASH_REPORT: neither is offered. Commands of
        // features that were not negotiated, and unknown ones, are refused.
        _ => {
            debug!("virtio-net: control command class {class} command {command} refused");
            return None;
        }
    };
    Some(parsed)
}

/// Carries out a parsed command; returns the ack byte.
pub fn apply<T: CtrlTarget>(cmd: Command, target: &mut T) -> u8 {
    let ok = match cmd {
        Command::VqPairsSet(n) => target.set_queue_pairs(n),
        Command::RssConfig(cfg) => target.set_rss(cfg),
        Command::GuestOffloadsSet(offloads) => target.set_guest_offloads(offloads),
        Command::MacAddrSet(mac) => target.set_mac(mac),
        Command::RxMode(mode, on) => target.set_rx_mode(mode, on),
        Command::MacTableSet(table) => target.set_mac_table(table),
        Command::Vlan(vid, allowed) => target.set_vlan(vid, allowed),
        Command::NotfCoal { tx, cfg } => target.set_coalescing(tx, cfg),
        Command::VqCoalSet { vqn, cfg } => target.set_queue_coalescing(vqn, cfg),
        // The value is written by the control queue after the ack.
        Command::VqCoalGet { .. } => true,
    };
    if ok {
        ACK_OK
    } else {
        ACK_ERR
    }
}

/// Parses and carries out one command at once (no rate limit); returns the ack byte.
pub fn execute<T: CtrlTarget>(
    features: Negotiated,
    class: u8,
    command: u8,
    data: &[u8],
    target: &mut T,
) -> u8 {
    match parse_command(
        features,
        class,
        command,
        data,
        data.len(),
        target.max_pairs(),
    ) {
        Some(cmd) => apply(cmd, target),
        None => ACK_ERR,
    }
}

/// A control chain, parsed: the first bytes of its readable part and where the ack goes.
#[derive(Debug)]
pub struct CtrlRequest {
    buf: [u8; CMD_BUF_LEN],
    /// Readable bytes in the chain (may exceed what `buf` holds).
    pub readable_len: usize,
    /// Guest address of the ack byte: the first device-writable byte, right after the
    /// command-specific data (virtio 1.x 5.1.6.5: `ack` precedes any command-specific
    /// result).
    pub ack_addr: GuestAddress,
    /// Where the device-writable bytes after the ack are, for a command-specific result: (address, length) of up to [`RESULT_SEGMENTS`] writable
    /// pieces after the ack byte.
    result_segments: [(GuestAddress, usize); RESULT_SEGMENTS],
}

/// Writable pieces of a control chain a result may be spread over (Linux uses one).
const RESULT_SEGMENTS: usize = 4;

impl CtrlRequest {
    /// Class and command, if the readable part holds them.
    pub fn header(&self) -> Option<(u8, u8)> {
        (self.readable_len >= 2).then(|| (self.buf[0], self.buf[1]))
    }

    /// How many bytes of command-specific data the driver sent.
    pub fn data_len(&self) -> usize {
        self.readable_len.saturating_sub(2)
    }

    /// Command-specific data (at most `CMD_BUF_LEN - 2` bytes of it).
    pub fn data(&self) -> &[u8] {
        let end = self.readable_len.min(CMD_BUF_LEN);
        self.buf.get(2..end).unwrap_or(&[])
    }

    /// Writes a command-specific result after the ack byte; false if the driver gave too
    /// little room (or it is not in guest memory), and then nothing is written.
    pub fn write_result(&self, mem: &GuestMemoryMmap, result: &[u8]) -> bool {
        let room: usize = self.result_segments.iter().map(|(_, len)| len).sum();
        if room < result.len() {
            return false;
        }
        let mut rest = result;
        for &(addr, len) in &self.result_segments {
            if rest.is_empty() {
                break;
            }
            let n = len.min(rest.len());
            if mem.write_slice(&rest[..n], addr).is_err() {
                return false;
            }
            rest = &rest[n..];
        }
        true
    }
}

/// Why a control chain cannot be answered at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtrlChainError {
    /// The chain itself is malformed.
    #[error("malformed control chain")]
    Chain(#[from] ChainError),
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// No device-writable byte for the ack.
    #[error("no device-writable byte for the ack")]
    NoAck,
}

/// Parses the control chain at `head`: class/command/data may be split across readable
/// descriptors or share one; the ack goes into the first writable byte and a command's
/// result, if any, after it.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
) -> Result<CtrlRequest, CtrlChainError> {
    let mut req = CtrlRequest {
        buf: [0; CMD_BUF_LEN],
        readable_len: 0,
        ack_addr: GuestAddress(0),
        result_segments: [(GuestAddress(0), 0); RESULT_SEGMENTS],
    };
    let mut segments = 0;
    let mut ack: Option<GuestAddress> = None;
    let mut seen_writable = false;
    let mut order_error = false;
    walk(mem, table, head, |desc| {
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(ChainError::OutOfMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        if desc.is_write_only() {
            seen_writable = true;
            if len > 0 {
                let (at, room) = match ack {
                    None => {
                        ack = Some(desc.addr());
                        (GuestAddress(desc.addr().0.wrapping_add(1)), len - 1)
                    }
                    Some(_) => (desc.addr(), len),
                };
                if room > 0 && segments < RESULT_SEGMENTS {
                    req.result_segments[segments] = (at, room);
                    segments += 1;
                }
            }
        } else {
            if seen_writable {
                order_error = true;
            }
            let filled = req.readable_len.min(CMD_BUF_LEN);
            let n = len.min(CMD_BUF_LEN - filled);
            if n > 0 {
                mem.read_slice(&mut req.buf[filled..filled + n], desc.addr())
                    .map_err(|_| ChainError::OutOfMemory {
                        addr: desc.addr().0,
                        len: desc.len(),
                    })?;
            }
            req.readable_len = req.readable_len.saturating_add(len);
        }
        Ok(())
    })?;
    if order_error {
        return Err(CtrlChainError::ReadableAfterWritable);
    }
    req.ack_addr = ack.ok_or(CtrlChainError::NoAck)?;
    Ok(req)
}

/// The control virtqueue and what answering on it needs.
pub struct CtrlQueue {
    ring: Ring,
    index: u16,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    metrics: Arc<NetMetrics>,
    features: Negotiated,
    warned: bool,
}

impl CtrlQueue {
    /// The control queue at transport index `index`.
    pub fn new(
        queue: Queue,
        index: u16,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        metrics: Arc<NetMetrics>,
        features: Negotiated,
    ) -> Self {
        CtrlQueue {
            ring: Ring::new(queue),
            index,
            mem,
            interrupt,
            metrics,
            features,
            warned: false,
        }
    }

    /// The queue (tests inspect its indices).
    pub fn queue(&self) -> &Queue {
        self.ring.queue()
    }

    /// Counts `n` kicks from the driver.
    pub fn count_kicks(&self, n: u64) {
        self.metrics.ctrl.add_notifications(n);
    }

    /// Counts `tally`, then returns `head` with `len` bytes written and signals the driver
    /// if it asked for it.
    fn finish(&mut self, head: u16, len: u32, mut tally: Tally) {
        self.metrics.ctrl.add(&tally);
        tally = Tally::default();
        if self.ring.put(&self.mem, head, len).is_err() {
            return;
        }
        if self.ring.publish(&self.mem) {
            match self.interrupt.signal_used_queue(self.index) {
                Ok(()) => tally.interrupts += 1,
                Err(e) => warn!("virtio-net: ctrl interrupt failed: {e}"),
            }
        }
        self.metrics.ctrl.add(&tally);
    }

    /// Answers the available commands, at most [`CTRL_BUDGET`] per call (returns
    /// [`Work::More`] when some are left). Each command's counters, ack byte, used entry
    /// and interrupt are written only after the command took full effect (or was rolled
    /// back), counters first, so whoever sees the used entry also sees the counters. Nothing
    /// more is answered once the target is stopping. `kicked_at` is when the kick was seen,
    /// for the VQ_PAIRS_SET latency.
    pub fn process<T: CtrlTarget>(&mut self, target: &mut T, kicked_at: Instant) -> Work {
        let table = self.ring.table(self.features.indirect_desc());
        let mut budget = CTRL_BUDGET;
        loop {
            loop {
                if target.stopping() {
                    return Work::Done;
                }
                if budget == 0 {
                    return Work::More;
                }
                let head = match self.ring.pop(&self.mem) {
                    Ok(Some(head)) => head,
                    Ok(None) => break,
                    Err(e) => {
                        if !self.warned {
                            warn!("virtio-net: control queue unusable: {e}");
                            self.warned = true;
                        }
                        return Work::Done;
                    }
                };
                budget -= 1;
                let mut tally = Tally::default();
                let req = match parse_request(&self.mem, table, head) {
                    Ok(req) => req,
                    Err(e) => {
                        debug!("virtio-net: bad control chain {head}: {e}");
                        tally.bad_chains += 1;
                        self.finish(head, 0, tally);
                        continue;
                    }
                };
                let cmd = req.header().and_then(|(class, command)| {
                    parse_command(
                        self.features,
                        class,
                        command,
                        req.data(),
                        req.data_len(),
                        target.max_pairs(),
                    )
                });
                let mut result = Vec::new();
                let mut ack = match cmd {
                    Some(cmd) => {
                        if !target.admit(&cmd) {
                            // Stopping: the reset that follows discards the queue.
                            return Work::Done;
                        }
                        if let Command::VqCoalGet { vqn } = cmd {
                            let cfg = target.queue_coalescing(vqn);
                            result.extend_from_slice(&cfg.max_packets.to_le_bytes());
                            result.extend_from_slice(&cfg.usecs.to_le_bytes());
                        }
                        apply(cmd, target)
                    }
                    None => ACK_ERR,
                };
                // A result goes after the ack; no room for it is an error.
                if ack == ACK_OK && !result.is_empty() && !req.write_result(&self.mem, &result) {
                    ack = ACK_ERR;
                    result.clear();
                }
                if ack == ACK_OK {
                    tally.packets += 1;
                } else {
                    tally.drops += 1;
                }
                if self.mem.write_obj(ack, req.ack_addr).is_err() {
                    tally.bad_chains += 1;
                    self.finish(head, 0, tally);
                    continue;
                }
                let m = &self.metrics;
                let mq_command = match req.header() {
                    Some((class, command)) if u32::from(class) == VIRTIO_NET_CTRL_MQ => {
                        Some(u32::from(command))
                    }
                    _ => None,
                };
                match mq_command {
                    Some(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                        m.vq_pairs_set.fetch_add(1, Ordering::Relaxed);
                        if ack != ACK_OK {
                            m.vq_pairs_set_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let ns = u64::try_from(kicked_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        m.last_vq_pairs_set_ns.store(ns, Ordering::Relaxed);
                    }
                    Some(VIRTIO_NET_CTRL_MQ_RSS_CONFIG) => {
                        m.rss_configs.fetch_add(1, Ordering::Relaxed);
                        if ack != ACK_OK {
                            m.rss_config_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {}
                }
                self.finish(head, 1 + result.len() as u32, tally);
            }
            match self.ring.enable_kicks(&self.mem) {
                Ok(true) => continue,
                Ok(false) | Err(_) => return Work::Done,
            }
        }
    }
}
