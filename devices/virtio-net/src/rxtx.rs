// SPDX-License-Identifier: Apache-2.0
//! The data path of one queue pair, without threads: pop chains, readv/writev straight
//! between guest buffers and the backend, return used entries, notify per EVENT_IDX.
//!
//! The worker thread (`worker.rs`) calls [`QueuePair::process_tx`] and
//! [`QueuePair::process_rx`] from its epoll loop; tests call them directly.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::backend::Backend;
use crate::chain::{chain_iov_host, read_at, write_at, ChainError, HostMem, HostTable, MAX_IOV};
use crate::coalesce::{Coalesce, Coalescer};
use crate::features::{Negotiated, NUM_BUFFERS_OFFSET, VNET_HDR_LEN_V1};
use crate::filter::{RxFilter, FILTER_HEAD_LEN};
use crate::metrics::{NetMetrics, Tally};
use crate::ring::Ring;
use crate::Interrupt;

/// Chains handled per `process_tx` call before yielding to other events.
pub const TX_BUDGET: usize = 256;
/// Frames received (and malformed chains returned) per `process_rx` call before yielding to
/// other events.
pub const RX_BUDGET: usize = 256;
/// Descriptors read per `process_tx` / `process_rx` call before yielding to other events
/// (checked between chains; one chain holds at most a queue size of them). A guest decides
/// how many descriptors a chain has, so the work of a call is bounded in descriptors, not
/// only in frames: 256 frames of 17 segments each fit, 256 chains of a queue size do not.
pub const DESC_BUDGET: usize = 8192;
/// Used entries after which an interrupt is considered mid-batch.
const SIGNAL_BATCH: usize = 64;
/// Largest frame behind the vnet header: a 64 KiB GSO frame plus Ethernet and VLAN headers.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Largest frame without GSO at the default MTU (Ethernet + VLAN headers included).
const STD_FRAME_OVERHEAD: usize = 14 + 4;

/// Whether a process call stopped early and wants to be called again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing left to do until the next event.
    Done,
    /// The budget ran out with work left; call again after other events.
    More,
}

/// Receive-side state after a `process_rx` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend had no more frames (EAGAIN).
    Drained,
    /// The guest has no (or not enough) receive buffers; reading resumes on the next rx kick.
    WaitingForBuffers,
    /// Budget exhausted with frames possibly pending.
    More,
    /// The backend reported an error (logged); reading resumes on the next event.
    BackendError,
    /// The receive queue is unusable (bad avail index or ring memory).
    QueueBroken,
}

/// What the data path needs to know about the negotiated features.
#[derive(Debug, Clone, Copy)]
pub struct PathConfig {
    /// Bytes of vnet header in front of every frame.
    pub hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF negotiated.
    pub mrg_rxbuf: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// Receive capacity gathered before reading a frame with MRG_RXBUF.
    pub rx_frame_max: usize,
}

impl PathConfig {
    /// The data-path settings for a negotiated feature set, `gso` telling whether the guest
    /// currently takes GSO frames, `mtu` the advertised MTU. Without GSO, frames are at most
    /// the advertised MTU (the guest cannot raise its MTU above it); without one, nothing
    /// bounds them below the largest frame.
    pub fn new(features: Negotiated, gso: bool, mtu: Option<u16>) -> Self {
        let hdr_len = features.vnet_hdr_len();
        let frame = match mtu {
            Some(mtu) if !gso => usize::from(mtu.max(1500)) + STD_FRAME_OVERHEAD,
            _ => MAX_GSO_FRAME,
        };
        PathConfig {
            hdr_len,
            mrg_rxbuf: features.mrg_rxbuf(),
            indirect: features.indirect_desc(),
            rx_frame_max: hdr_len + frame,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    iov_start: usize,
    iov_end: usize,
    cap: usize,
}

/// Receive chains popped ahead of the frame that will fill them, with their iovecs, in avail
/// order. Only consecutive popped chains are held, so giving them back is one
/// `set_next_avail`.
#[derive(Debug, Default)]
struct RxBuffers {
    chains: Vec<RxChain>,
    iov: Vec<libc::iovec>,
    front: usize,
    cap: usize,
}

impl RxBuffers {
    fn with_capacity(chains: usize) -> Self {
        RxBuffers {
            chains: Vec::with_capacity(chains),
            iov: Vec::with_capacity(MAX_IOV),
            front: 0,
            cap: 0,
        }
    }

    fn held(&self) -> usize {
        self.chains.len() - self.front
    }

    fn iov_front(&self) -> usize {
        self.chains
            .get(self.front)
            .map_or(self.iov.len(), |c| c.iov_start)
    }

    fn clear(&mut self) {
        self.chains.clear();
        self.iov.clear();
        self.front = 0;
        self.cap = 0;
    }

    /// Drops the first `k` held chains (they were returned to the guest).
    fn consume(&mut self, k: usize) {
        for c in &self.chains[self.front..self.front + k] {
            self.cap -= c.cap;
        }
        self.front += k;
        if self.front == self.chains.len() {
            self.clear();
        } else if self.front >= 32 {
            let iov_front = self.iov_front();
            self.chains.drain(..self.front);
            self.iov.drain(..iov_front);
            for c in &mut self.chains {
                c.iov_start -= iov_front;
                c.iov_end -= iov_front;
            }
            self.front = 0;
        }
    }
}

/// How `fill_rx` ended.
enum Fill {
    Ready,
    Empty {
        avail_seen: u16,
    },
    Broken,
    /// The call's budget is spent before a frame could be read.
    OutOfBudget,
}

/// The work one `process_rx` call may still do.
struct RxBudget {
    /// Frames read plus malformed chains returned.
    chains: usize,
    /// Descriptors read.
    descs: usize,
}

impl RxBudget {
    fn spent(&self) -> bool {
        self.chains >= RX_BUDGET || self.descs >= DESC_BUDGET
    }
}

/// One queue pair's rings and scratch buffers. Not `Send` (its scratch vectors hold raw
/// iovecs, valid only during a call): build it on the thread that uses it.
pub struct QueuePair {
    pair: u16,
    rx: Ring,
    tx: Ring,
    /// Guest memory with its regions' host addresses resolved, for chains and rings (shared,
    /// so a call can hold its descriptor table while it updates the pair).
    host: Arc<HostMem>,
    interrupt: Arc<dyn Interrupt>,
    metrics: Arc<NetMetrics>,
    path: PathConfig,
    tx_iov: Vec<libc::iovec>,
    rx_buf: RxBuffers,
    /// The receive filter, when the driver configured one that can drop frames.
    filter: Option<RxFilter>,
    /// When used-buffer notifications go out, per queue.
    rx_coal: Coalescer,
    tx_coal: Coalescer,
    /// Whether each queue is in use: the driver may reset one alone (VIRTIO_F_RING_RESET)
    /// and enable it again with a new ring.
    rx_live: bool,
    tx_live: bool,
    /// The used index at the last notification, per queue.
    rx_notified_at: u16,
    tx_notified_at: u16,
    rx_waiting: bool,
    warned_tx_broken: bool,
    warned_rx_broken: bool,
    warned_backend: bool,
    warned_irq: bool,
}

impl QueuePair {
    /// A queue pair over `rx`/`tx` (queue indices `2 * pair` and `2 * pair + 1`).
    pub fn new(
        pair: u16,
        rx: Queue,
        tx: Queue,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        metrics: Arc<NetMetrics>,
        path: PathConfig,
    ) -> Self {
        let rx_chains = usize::from(rx.size());
        let (rx_notified_at, tx_notified_at) = (rx.next_used(), tx.next_used());
        let host = Arc::new(HostMem::new(&mem));
        QueuePair {
            pair,
            rx: Ring::with_host(rx, &host),
            tx: Ring::with_host(tx, &host),
            host,
            interrupt,
            metrics,
            path,
            tx_iov: Vec::with_capacity(MAX_IOV),
            rx_buf: RxBuffers::with_capacity(rx_chains),
            filter: None,
            rx_coal: Coalescer::default(),
            tx_coal: Coalescer::default(),
            rx_live: true,
            tx_live: true,
            rx_notified_at,
            tx_notified_at,
            rx_waiting: false,
            warned_tx_broken: false,
            warned_rx_broken: false,
            warned_backend: false,
            warned_irq: false,
        }
    }

    /// Changes how much receive space is gathered per frame (GUEST_OFFLOADS_SET).
    pub fn set_path(&mut self, path: PathConfig) {
        self.path = path;
    }

    /// Publishes the used transmit entries and notifies the driver if it wants it and the
    /// coalescing parameters let it go now.
    fn publish_tx(&mut self, tally: &mut Tally) {
        let used = u32::from(self.tx.unpublished());
        let wanted = self.tx.publish(self.host.memory());
        if self.tx_coal.publish(used, wanted, Instant::now) {
            self.notify_tx(tally);
        }
    }

    /// The same for the receive queue.
    fn publish_rx(&mut self, tally: &mut Tally) {
        let used = u32::from(self.rx.unpublished());
        let wanted = self.rx.publish(self.host.memory());
        if self.rx_coal.publish(used, wanted, Instant::now) {
            self.notify_rx(tally);
        }
    }

    /// Sends the transmit queue's notification. One that was held back (coalescing) goes
    /// out only if the driver still wants it for what was used since the last one.
    fn notify_tx(&mut self, tally: &mut Tally) {
        if self.tx_coal.get().is_off()
            || self
                .tx
                .driver_wants(self.host.memory(), self.tx_notified_at)
        {
            self.signal(self.tx_index(), tally);
        }
        self.tx_notified_at = self.tx.queue().next_used();
    }

    /// The same for the receive queue.
    fn notify_rx(&mut self, tally: &mut Tally) {
        if self.rx_coal.get().is_off()
            || self
                .rx
                .driver_wants(self.host.memory(), self.rx_notified_at)
        {
            self.signal(self.rx_index(), tally);
        }
        self.rx_notified_at = self.rx.queue().next_used();
    }

    /// Stops using the receive (`rx`) or transmit queue and forgets its state: held receive
    /// chains are dropped (the driver reclaims every buffer of a reset queue) and a held
    /// notification with them.
    pub fn reset_queue(&mut self, rx: bool) {
        if rx {
            self.rx_live = false;
            self.rx_buf.clear();
            self.rx_waiting = false;
            self.rx_coal = Coalescer::default();
        } else {
            self.tx_live = false;
            self.tx_iov.clear();
            self.tx_coal = Coalescer::default();
        }
    }

    /// Uses the receive (`rx`) or transmit queue again, with the ring the driver set up after
    /// resetting it; coalescing stays as the driver configured it.
    pub fn enable_queue(&mut self, rx: bool, queue: Queue) {
        if rx {
            let cfg = self.rx_coal.get();
            self.rx_notified_at = queue.next_used();
            self.rx = Ring::with_host(queue, &self.host);
            self.rx_buf.clear();
            self.rx_coal.set(cfg);
            self.rx_live = true;
        } else {
            let cfg = self.tx_coal.get();
            self.tx_notified_at = queue.next_used();
            self.tx = Ring::with_host(queue, &self.host);
            self.tx_coal.set(cfg);
            self.tx_live = true;
        }
    }

    /// Sets the notification coalescing of the receive and the transmit queue.
    pub fn set_coalescing(&mut self, rx: Coalesce, tx: Coalesce) {
        self.rx_coal.set(rx);
        self.tx_coal.set(tx);
    }

    /// When the next held notification falls due, if any is held with a time limit.
    pub fn next_due(&self) -> Option<Instant> {
        match (self.rx_coal.due(), self.tx_coal.due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends the held notifications that are due at `now`.
    pub fn notify_due(&mut self, now: Instant) {
        let mut tally = Tally::default();
        if self.rx_coal.poll(now) {
            self.notify_rx(&mut tally);
            self.metrics.pairs[usize::from(self.pair)].rx.add(&tally);
            tally = Tally::default();
        }
        if self.tx_coal.poll(now) {
            self.notify_tx(&mut tally);
            self.metrics.pairs[usize::from(self.pair)].tx.add(&tally);
        }
    }

    /// Applies `filter` to received frames from now on (`None`: every frame passes).
    pub fn set_filter(&mut self, filter: Option<RxFilter>) {
        self.filter = filter;
    }

    /// The receive queue (tests inspect its indices).
    pub fn rx_queue(&self) -> &Queue {
        self.rx.queue()
    }

    /// The transmit queue.
    pub fn tx_queue(&self) -> &Queue {
        self.tx.queue()
    }

    /// Whether rx stopped for lack of guest buffers and waits for an rx kick.
    pub fn rx_waiting(&self) -> bool {
        self.rx_waiting
    }

    fn rx_index(&self) -> u16 {
        self.pair * 2
    }

    fn tx_index(&self) -> u16 {
        self.pair * 2 + 1
    }

    fn signal(&mut self, queue_index: u16, tally: &mut Tally) {
        match self.interrupt.signal_used_queue(queue_index) {
            Ok(()) => tally.interrupts += 1,
            Err(e) => {
                if !self.warned_irq {
                    warn!("virtio-net: interrupt for queue {queue_index} failed: {e}");
                    self.warned_irq = true;
                }
            }
        }
    }

    /// Sends every available transmit chain to `backend` (one writev per chain, vnet header
    /// first as the driver laid it out) and returns it with length 0.
    ///
    /// With `backend == None` (pair parked) or `link_up == false` the frames are dropped and
    /// counted; the backend is not touched. Malformed chains are returned with length 0 and
    /// counted as bad chains.
    pub fn process_tx<B: Backend + ?Sized>(&mut self, backend: Option<&B>, link_up: bool) -> Work {
        if !self.tx_live {
            return Work::Done;
        }
        let mut tally = Tally::default();
        let host = Arc::clone(&self.host);
        let table = host.table(self.tx.table(self.path.indirect));
        let mut budget = TX_BUDGET;
        let mut descs = 0usize;
        let mut used = 0usize;
        let mut work = Work::Done;
        // No kicks while draining; asked for again below.
        self.tx.suppress_kicks(self.host.memory());
        let mut empty_rounds = 0;
        'drain: loop {
            let mut popped = false;
            loop {
                let head = match self.tx.pop(self.host.memory()) {
                    Ok(Some(head)) => {
                        popped = true;
                        head
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if !self.warned_tx_broken {
                            warn!("virtio-net: tx queue {} unusable: {e}", self.tx_index());
                            self.warned_tx_broken = true;
                        }
                        break 'drain;
                    }
                };
                if budget == 0 || descs >= DESC_BUDGET {
                    self.tx.unpop(1);
                    work = Work::More;
                    break 'drain;
                }
                budget -= 1;
                self.tx_iov.clear();
                let chain =
                    chain_iov_host(&table, head, false, &mut self.tx_iov, MAX_IOV, &mut descs);
                match chain {
                    Ok(len) if len < self.path.hdr_len => {
                        debug!("virtio-net: tx chain {head} too short ({len} bytes)");
                        tally.bad_chains += 1;
                    }
                    Ok(len) => match backend {
                        Some(b) if link_up => {
                            // SAFETY: the iovecs were built by `chain_iov_host` inside
                            // `self.host`'s memory, which it keeps mapped; the backend only
                            // reads them.
                            match unsafe { b.writev(&self.tx_iov) } {
                                Ok(_) => {
                                    tally.packets += 1;
                                    tally.bytes += (len - self.path.hdr_len) as u64;
                                }
                                Err(e) => {
                                    debug!("virtio-net: tx {} write failed: {e}", self.tx_index());
                                    tally.drops += 1;
                                }
                            }
                        }
                        _ => tally.drops += 1,
                    },
                    Err(e) => {
                        debug!("virtio-net: bad tx chain {head}: {e}");
                        tally.bad_chains += 1;
                    }
                }
                self.tx_iov.clear();
                if self.tx.put(self.host.memory(), head, 0).is_ok() {
                    used += 1;
                }
                if used >= SIGNAL_BATCH {
                    used = 0;
                    self.publish_tx(&mut tally);
                }
            }
            empty_rounds = if popped { 0 } else { empty_rounds + 1 };
            match self.tx.enable_kicks(self.host.memory()) {
                // "More available" twice in a row with nothing to pop: the driver placed the
                // used flags over the avail index, so our own flag writes change it. Stop
                // instead of spinning; the next kick starts over.
                Ok(true) if empty_rounds < 2 => self.tx.suppress_kicks(self.host.memory()),
                Ok(_) | Err(_) => break,
            }
        }
        if used > 0 {
            self.publish_tx(&mut tally);
        }
        self.metrics.pairs[usize::from(self.pair)].tx.add(&tally);
        work
    }

    /// Tops up the held receive chains until a frame fits. Every chain read, good or
    /// malformed, counts against `budget`; once it is spent, no new frame is started, and a
    /// frame being gathered is read with the space held so far once twice the descriptor
    /// budget is reached (a legitimate gather is far below it).
    fn fill_rx(
        &mut self,
        table: &HostTable<'_>,
        tally: &mut Tally,
        used: &mut usize,
        budget: &mut RxBudget,
    ) -> Fill {
        loop {
            let enough = if self.path.mrg_rxbuf {
                self.rx_buf.cap >= self.path.rx_frame_max
            } else {
                self.rx_buf.held() > 0
            };
            if enough {
                return Fill::Ready;
            }
            if self.rx_buf.held() == 0 && budget.spent() {
                return Fill::OutOfBudget;
            }
            if budget.descs >= 2 * DESC_BUDGET {
                return Fill::Ready;
            }
            let head = match self.rx.pop(self.host.memory()) {
                Ok(Some(head)) => head,
                Ok(None) => {
                    // The whole ring is ours and still short of a maximal frame: read anyway
                    // rather than wait for buffers that cannot come.
                    if self.rx_buf.held() >= usize::from(self.rx.size()) {
                        return Fill::Ready;
                    }
                    return Fill::Empty {
                        avail_seen: self.rx.next_avail(),
                    };
                }
                Err(e) => {
                    if !self.warned_rx_broken {
                        warn!("virtio-net: rx queue {} unusable: {e}", self.rx_index());
                        self.warned_rx_broken = true;
                    }
                    return Fill::Broken;
                }
            };
            let iov_start = self.rx_buf.iov.len();
            let max_segments = self.rx_buf.iov_front() + MAX_IOV;
            let result = chain_iov_host(
                table,
                head,
                true,
                &mut self.rx_buf.iov,
                max_segments,
                &mut budget.descs,
            )
            .and_then(|cap| {
                if cap < self.path.hdr_len {
                    Err(ChainError::TooShort {
                        len: cap,
                        need: self.path.hdr_len,
                    })
                } else {
                    Ok(cap)
                }
            });
            match result {
                Ok(cap) => {
                    self.rx_buf.chains.push(RxChain {
                        head,
                        iov_start,
                        iov_end: self.rx_buf.iov.len(),
                        cap,
                    });
                    self.rx_buf.cap += cap;
                }
                Err(e) if self.rx_buf.held() > 0 => {
                    // Give it back: only a chain at the front may be returned, so that the
                    // held chains stay consecutive. Read with what we have.
                    self.rx_buf.iov.truncate(iov_start);
                    self.rx.unpop(1);
                    debug!("virtio-net: rx chain {head} deferred: {e}");
                    return Fill::Ready;
                }
                Err(e) => {
                    self.rx_buf.iov.truncate(iov_start);
                    debug!("virtio-net: bad rx chain {head}: {e}");
                    tally.bad_chains += 1;
                    budget.chains += 1;
                    if self.rx.put(self.host.memory(), head, 0).is_ok() {
                        *used += 1;
                    }
                }
            }
        }
    }

    /// Gives every held receive chain back to the avail ring.
    fn release_rx(&mut self) {
        self.rx.unpop(self.rx_buf.held() as u16);
        self.rx_buf.clear();
    }

    /// Reads frames from `backend` into receive chains until it has none left (EAGAIN), the
    /// guest runs out of buffers, or the budget is spent.
    ///
    /// Without MRG_RXBUF each frame takes one chain. With MRG_RXBUF the frame is read into
    /// several consecutive chains at once, `num_buffers` is written into its header, and
    /// the chains it did not need are given back. A frame larger than the space offered is
    /// dropped (counted) and its chains reused.
    pub fn process_rx<B: Backend + ?Sized>(&mut self, backend: &B) -> RxState {
        if !self.rx_live {
            // Frames wait in the backend until the driver enables the queue again.
            return RxState::WaitingForBuffers;
        }
        let mut tally = Tally::default();
        let mut used = 0usize;
        let mut signalled_at = 0usize;
        let mut budget = RxBudget {
            chains: 0,
            descs: 0,
        };
        let host = Arc::clone(&self.host);
        let table = host.table(self.rx.table(self.path.indirect));
        let state = loop {
            if budget.chains >= RX_BUDGET {
                break RxState::More;
            }
            match self.fill_rx(&table, &mut tally, &mut used, &mut budget) {
                Fill::Ready => {}
                Fill::OutOfBudget => break RxState::More,
                Fill::Broken => break RxState::QueueBroken,
                Fill::Empty { avail_seen } => {
                    self.release_rx();
                    if self.rx.arm_kick(self.host.memory(), avail_seen) {
                        continue;
                    }
                    self.rx_waiting = true;
                    break RxState::WaitingForBuffers;
                }
            }
            if self.rx_waiting {
                self.rx_waiting = false;
                self.rx.suppress_kicks(self.host.memory());
            }
            let iov = if self.path.mrg_rxbuf {
                &self.rx_buf.iov[self.rx_buf.iov_front()..]
            } else {
                let c = self.rx_buf.chains[self.rx_buf.front];
                &self.rx_buf.iov[c.iov_start..c.iov_end]
            };
            // SAFETY: the iovecs were built by `chain_iov_host` (writable) inside
            // `self.host`'s memory, which it keeps mapped.
            match unsafe { backend.readv(iov) } {
                Ok(n) => {
                    budget.chains += 1;
                    if let Some(filter) = &self.filter {
                        let mut head = [0u8; FILTER_HEAD_LEN];
                        let want = n.saturating_sub(self.path.hdr_len).min(head.len());
                        // SAFETY: `iov` was built by `chain_iov_host` inside `self.host`'s
                        // memory, which it keeps mapped; readv just wrote these bytes.
                        let got = unsafe { read_at(iov, self.path.hdr_len, &mut head[..want]) };
                        if !filter.accepts(&head[..got]) {
                            // Not for this guest: its chains take the next frame.
                            tally.filtered += 1;
                            continue;
                        }
                    }
                    self.deliver(n, &mut tally, &mut used);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxState::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.warned_backend {
                        warn!("virtio-net: rx {} read failed: {e}", self.rx_index());
                        self.warned_backend = true;
                    }
                    break RxState::BackendError;
                }
            }
            if used - signalled_at >= SIGNAL_BATCH {
                signalled_at = used;
                self.publish_rx(&mut tally);
            }
        };
        self.release_rx();
        if used > signalled_at {
            self.publish_rx(&mut tally);
        }
        self.metrics.pairs[usize::from(self.pair)].rx.add(&tally);
        state
    }

    /// Returns the chains a frame of `n` bytes (header included) was read into.
    fn deliver(&mut self, n: usize, tally: &mut Tally, used: &mut usize) {
        let hdr_len = self.path.hdr_len;
        let span = if self.path.mrg_rxbuf {
            self.rx_buf.cap
        } else {
            self.rx_buf.chains[self.rx_buf.front].cap
        };
        if n < hdr_len || n > span {
            // Truncated or nonsense: drop it, keep the chains for the next frame.
            tally.drops += 1;
            return;
        }
        // Return the chains the frame filled, in order: all of a chain's space but the last
        // one's, which holds the rest.
        let first = self.rx_buf.front;
        let mut left = n;
        let mut count = 0;
        for c in &self.rx_buf.chains[first..] {
            let len = left.min(c.cap);
            left -= len;
            count += 1;
            if self.rx.put(self.host.memory(), c.head, len as u32).is_ok() {
                *used += 1;
            }
            if left == 0 || !self.path.mrg_rxbuf {
                break;
            }
        }
        if hdr_len == VNET_HDR_LEN_V1 {
            // Written before `publish` makes the entries visible.
            let c = self.rx_buf.chains[first];
            let num_buffers = (count as u16).to_le_bytes();
            // SAFETY: the iovecs of held chains were built by `chain_iov_host` (writable)
            // inside `self.host`'s memory, which it keeps mapped; the chain holds at least the
            // header (checked when it was popped).
            unsafe {
                write_at(
                    &self.rx_buf.iov[c.iov_start..],
                    NUM_BUFFERS_OFFSET,
                    &num_buffers,
                )
            };
        }
        self.rx_buf.consume(count);
        tally.packets += 1;
        tally.bytes += (n - hdr_len) as u64;
    }
}
