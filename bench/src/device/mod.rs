// SPDX-License-Identifier: Apache-2.0
//! Device data path, no guest: frames through mqvmm's own queue-pair code
//! (`virtio_net::rxtx::QueuePair::process_tx` / `process_rx`, the functions the device's
//! worker threads call) to and from a real multiqueue tap, against a raw loop doing the same
//! `writev` / `readv` calls on the same tap queues with the same buffers (the ceiling).
//!
//! # Set-up
//! The process enters a private network namespace and creates tap `mqbench0` with P queues
//! (P = 1, 2, 4), 12-byte vnet header, TUNSETOFFLOAD CSUM|TSO4|TSO6 (what a Linux guest with
//! GUEST_CSUM/GUEST_TSO4/6 gets), a transmit queue length of 4096 frames and IPv6 off (the
//! kernel sends nothing of its own through it). One thread per pair, as in the device. Each
//! owns its guest memory (mmap, pre-faulted), its two 256-entry split rings with the driver
//! side ([`driver::Ring`]), a `QueuePair` over them with the features a Linux guest
//! negotiates (VERSION_1, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, CSUM, TSO4/6 both ways), and
//! its tap queue. Interrupts go to an eventfd, as irqfd would take them.
//!
//! # Transmit (guest -> host)
//! One round = the driver publishes all 256 slots (slot i: the vnet header and frame in
//! buffer i; one descriptor up to 1514 B, an indirect table of 4 KiB segments for 64 KiB TSO),
//! asks for one interrupt at the last entry (EVENT_IDX), the device runs `process_tx`, the
//! driver reaps 256 used entries. The ceiling writes the same 256 buffers with `writev`, the
//! same iovec shape. A unit is 8 rounds (2048 frames). The kernel consumes each frame inside the `writev` (the tap passes it to
//! the stack, which drops it: the destination MAC is not the tap's), identical for both.
//!
//! # Receive (host -> guest)
//! The source (an AF_PACKET socket sending through the tap, see [`net::Source`]) first fills
//! every queue with K frames of a flow the tap steers to that queue (found by probing), K =
//! 2048 (128 for 64 KiB), untimed. Then all pair threads drain their queue at once, timed:
//! the device with `process_rx` into 4 KiB mergeable buffers (the driver reaps and re-posts
//! them between calls), the ceiling with `readv` into the same buffers in the same order,
//! with the iovec shape the device uses (the 17 buffers that hold a maximal frame). Both read
//! until EAGAIN.
//!
//! # Numbers
//! A unit runs on every pair at once; its wall time is from the first thread's start to the
//! last thread's end, its CPU time the sum of the threads' `CLOCK_THREAD_CPUTIME_ID` (user +
//! kernel). A sample is U units of each path, interleaved unit by unit (ceiling, device,
//! device, ceiling, ...), so that whatever else the machine does hits both paths alike; U is
//! fixed per configuration after a warm-up (every sample does the same work), chosen so the
//! ceiling's share of a sample lasts about `sample_ms`.

pub mod driver;
pub mod frames;
pub mod net;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tap::{MultiQueueTap, TapConfig, TapQueue};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_net::features::{bit, tun_offload_flags, Negotiated, VNET_HDR_LEN_V1};
use virtio_net::rxtx::{PathConfig, QueuePair, RxState};
use virtio_net::test_utils::ring::{write_table, Segment, DESC_F_INDIRECT, DESC_F_WRITE, DESC_LEN};
use virtio_net::{Interrupt, NetMetrics};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::record::{DevSample, Record};
use driver::Ring;
use frames::Flow;

/// Entries per virtqueue (what Linux guests get from mqvmm).
pub const QUEUE_SIZE: u16 = 256;
/// Size of one mergeable receive buffer and of one transmit segment.
const BUF: u64 = 4096;
/// Frames queued per receive unit (small frames, TSO frames).
const RX_UNIT: u64 = 2048;
const RX_UNIT_GSO: u64 = 128;
/// Rounds of 256 frames per transmit unit (2048 frames, as a receive unit of small frames).
const TX_UNIT_ROUNDS: u64 = 8;
/// Transmit queue length set on the tap: the capacity of each queue's frame ring.
const TXQUEUELEN: i32 = 4096;
/// Tap name inside the private namespace.
pub const TAP_NAME: &str = "mqbench0";
/// How long a receive may wait for frames that should already be queued.
const STALL: Duration = Duration::from_secs(3);

// Guest memory layout of one pair.
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const INDIRECT: u64 = 0x10000;
const INDIRECT_STRIDE: u64 = 32 * 16;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

/// The benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Host-side set-up.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// The tap could not be created or configured.
    #[error("tap {name} with {queues} queues")]
    Tap {
        /// Tap name.
        name: String,
        /// Queues requested.
        queues: usize,
        /// Why.
        #[source]
        source: tap::Error,
    },
    /// A pair thread could not be started.
    #[error("cannot start the thread of pair {pair}")]
    Spawn {
        /// Pair index.
        pair: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A pair thread failed (its message says where).
    #[error("pair {pair}: {message}")]
    Pair {
        /// Pair index.
        pair: usize,
        /// What went wrong.
        message: String,
    },
    /// No flow could be found that the tap steers to a queue.
    #[error("no TCP source port in {first}..{last} is steered to queue {queue} of {queues}")]
    NoFlow {
        /// Queue without a flow.
        queue: usize,
        /// Queues of the tap.
        queues: usize,
        /// Ports tried.
        first: u16,
        /// Ports tried.
        last: u16,
    },
}

/// Direction of traffic, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Guest to host: the device writes to the tap.
    Tx,
    /// Host to guest: the device reads from the tap.
    Rx,
}

impl Dir {
    /// `tx` or `rx`.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        }
    }
}

/// What moves the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// mqvmm's queue-pair code.
    Device,
    /// The raw readv/writev loop.
    Ceiling,
}

impl PathKind {
    /// `device` or `ceiling`.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Device => "device",
            PathKind::Ceiling => "ceiling",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pair counts.
    pub pairs: Vec<usize>,
    /// Ethernet frame lengths.
    pub sizes: Vec<usize>,
    /// Directions.
    pub dirs: Vec<Dir>,
    /// Paths (both for ratios; one for profiling).
    pub paths: Vec<PathKind>,
    /// Recorded samples per configuration and path.
    pub samples: usize,
    /// Target length of one ceiling sample.
    pub sample_ms: u64,
    /// Warm-up length per configuration.
    pub warmup_ms: u64,
}

/// The features a Linux guest acks from mqvmm (the control-queue ones do not affect the
/// data path).
pub fn guest_features() -> Negotiated {
    Negotiated(
        bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_MQ),
    )
}

/// Interrupt sink: an eventfd written per interrupt, as irqfd receives them.
struct EventInterrupt {
    evt: vmm_sys_util::eventfd::EventFd,
    count: AtomicU64,
}

impl Interrupt for EventInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.evt.write(1)
    }

    fn signal_config(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The result of one thread's share of a unit or sample.
#[derive(Debug, Clone, Copy)]
struct Measured {
    start: Instant,
    end: Instant,
    cpu_ns: u64,
    frames: u64,
    bytes: u64,
    irqs: u64,
}

enum Cmd {
    Tx {
        path: PathKind,
        rounds: u64,
    },
    Rx {
        path: PathKind,
        frames: u64,
    },
    /// Reads and discards what is queued; replies with the count in `frames`.
    Flush,
}

type Reply = (usize, Result<Measured, String>);

/// One pair thread's state (built on the thread: the queue pair and iovecs are not `Send`).
struct Pair {
    index: usize,
    tap: TapQueue,
    rx: Ring,
    tx: Ring,
    qp: QueuePair,
    metrics: Arc<NetMetrics>,
    irq: Arc<EventInterrupt>,
    frame_len: usize,
    /// Per transmit slot, the iovecs of its chain (for the ceiling).
    tx_iov: Vec<Vec<libc::iovec>>,
    /// The receive buffers as iovecs, the first `rx_need` repeated at the end so any window of
    /// `rx_need` consecutive buffers is one slice.
    rx_iov: Vec<libc::iovec>,
    rx_need: usize,
    rx_cursor: usize,
}

fn host_iov(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Result<libc::iovec, String> {
    let slice = mem
        .get_slice(GuestAddress(addr), len)
        .map_err(|e| format!("guest memory at {addr:#x}: {e}"))?;
    Ok(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: len,
    })
}

/// Guest memory a pair needs for frames of `frame_len` bytes.
fn memory_size(frame_len: usize) -> u64 {
    TX_BUFS + u64::from(QUEUE_SIZE) * tx_slot(frame_len)
}

fn tx_slot(frame_len: usize) -> u64 {
    ((VNET_HDR_LEN_V1 + frame_len) as u64).div_ceil(BUF) * BUF
}

impl Pair {
    fn new(
        index: usize,
        tap: TapQueue,
        metrics: Arc<NetMetrics>,
        frame_len: usize,
    ) -> Result<Pair, String> {
        let size = memory_size(frame_len);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| format!("cannot map {size} bytes of guest memory: {e}"))?;
        // Fault every page in now, not during a sample.
        let zeros = vec![0u8; size as usize];
        mem.write_slice(&zeros, GuestAddress(0))
            .map_err(|e| format!("cannot touch guest memory: {e}"))?;

        let e = |e: driver::Error| e.to_string();
        let mut rx = Ring::new(&mem, 2 * index as u16, RX_RING, QUEUE_SIZE).map_err(e)?;
        let tx = Ring::new(&mem, 2 * index as u16 + 1, TX_RING, QUEUE_SIZE).map_err(e)?;

        // Receive: slot i is the 4 KiB buffer i.
        let mut rx_iov = Vec::new();
        for i in 0..QUEUE_SIZE {
            let addr = RX_BUFS + u64::from(i) * BUF;
            rx.set_desc(i, addr, BUF as u32, DESC_F_WRITE).map_err(e)?;
            rx_iov.push(host_iov(&mem, addr, BUF as usize)?);
        }

        // Transmit: slot i holds header + frame in its buffer; one descriptor when it fits a
        // page, else an indirect table of page-sized segments (as a guest's skb frags).
        let msg_len = VNET_HDR_LEN_V1 + frame_len;
        let flow = tx_flow(index);
        let mut msg = frames::vnet_hdr(frame_len).to_vec();
        msg.extend_from_slice(&[0, 0]); // num_buffers
        msg.extend_from_slice(&frames::tcp_frame(frame_len, &flow));
        let mut tx_iov = Vec::new();
        for i in 0..QUEUE_SIZE {
            let addr = TX_BUFS + u64::from(i) * tx_slot(frame_len);
            mem.write_slice(&msg, GuestAddress(addr))
                .map_err(|err| format!("cannot write frame {i}: {err}"))?;
            let mut iov = Vec::new();
            if msg_len as u64 <= BUF {
                tx.set_desc(i, addr, msg_len as u32, 0).map_err(e)?;
                iov.push(host_iov(&mem, addr, msg_len)?);
            } else {
                let table = INDIRECT + u64::from(i) * INDIRECT_STRIDE;
                let mut segs = Vec::new();
                for off in (0..msg_len as u64).step_by(BUF as usize) {
                    let len = (msg_len as u64 - off).min(BUF);
                    segs.push(Segment::readable(GuestAddress(addr + off), len as u32));
                    iov.push(host_iov(&mem, addr + off, len as usize)?);
                }
                write_table(&mem, GuestAddress(table), &segs)
                    .map_err(|err| format!("cannot write indirect table {i}: {err}"))?;
                let table_len = DESC_LEN * segs.len() as u64;
                tx.set_desc(i, table, table_len as u32, DESC_F_INDIRECT)
                    .map_err(e)?;
            }
            tx_iov.push(iov);
        }

        let features = guest_features();
        let path = PathConfig::new(features, true, None);
        let rx_need = (path.rx_frame_max as u64).div_ceil(BUF) as usize;
        let wrap: Vec<libc::iovec> = rx_iov[..rx_need].to_vec();
        rx_iov.extend(wrap);

        let irq = Arc::new(EventInterrupt {
            evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|err| format!("eventfd: {err}"))?,
            count: AtomicU64::new(0),
        });
        let qp = QueuePair::new(
            index as u16,
            rx.queue(features.event_idx()).map_err(e)?,
            tx.queue(features.event_idx()).map_err(e)?,
            mem.clone(),
            irq.clone(),
            metrics.clone(),
            path,
        );
        // Every receive buffer is posted from the start, as a guest driver does.
        rx.publish(QUEUE_SIZE);
        rx.set_used_event(0);
        Ok(Pair {
            index,
            tap,
            rx,
            tx,
            qp,
            metrics,
            irq,
            frame_len,
            tx_iov,
            rx_iov,
            rx_need,
            rx_cursor: 0,
        })
    }

    fn counters(&self, dir: Dir) -> (u64, u64, u64) {
        let p = &self.metrics.pairs[self.index];
        let q = match dir {
            Dir::Tx => &p.tx,
            Dir::Rx => &p.rx,
        };
        (
            q.packets.load(Ordering::Relaxed),
            q.bytes.load(Ordering::Relaxed),
            q.drops.load(Ordering::Relaxed) + q.bad_chains.load(Ordering::Relaxed),
        )
    }

    fn run(&mut self, cmd: &Cmd) -> Result<Measured, String> {
        let irq0 = self.irq.count.load(Ordering::Relaxed);
        let cpu0 = net::thread_cpu_ns();
        let start = Instant::now();
        let (frames, bytes) = match *cmd {
            Cmd::Tx {
                path: PathKind::Device,
                rounds,
            } => self.tx_device(rounds)?,
            Cmd::Tx {
                path: PathKind::Ceiling,
                rounds,
            } => self.tx_ceiling(rounds)?,
            Cmd::Rx {
                path: PathKind::Device,
                frames,
            } => self.rx_device(frames)?,
            Cmd::Rx {
                path: PathKind::Ceiling,
                frames,
            } => self.rx_ceiling(frames)?,
            Cmd::Flush => (self.flush()?, 0),
        };
        let end = Instant::now();
        Ok(Measured {
            start,
            end,
            cpu_ns: net::thread_cpu_ns() - cpu0,
            frames,
            bytes,
            irqs: self.irq.count.load(Ordering::Relaxed) - irq0,
        })
    }

    fn tx_device(&mut self, rounds: u64) -> Result<(u64, u64), String> {
        let (p0, b0, d0) = self.counters(Dir::Tx);
        for _ in 0..rounds {
            let last = self.tx.used_seen().wrapping_add(QUEUE_SIZE - 1);
            self.tx.set_used_event(last);
            self.tx.publish(QUEUE_SIZE);
            self.qp.process_tx(Some(&self.tap), true);
            let n = self.tx.reap(|_, _| {}).map_err(|e| e.to_string())?;
            if n != QUEUE_SIZE {
                return Err(format!(
                    "device returned {n} of {QUEUE_SIZE} transmit chains"
                ));
            }
        }
        let (p1, b1, d1) = self.counters(Dir::Tx);
        if d1 != d0 || p1 - p0 != rounds * u64::from(QUEUE_SIZE) {
            return Err(format!(
                "device sent {} frames and dropped {} (expected {})",
                p1 - p0,
                d1 - d0,
                rounds * u64::from(QUEUE_SIZE)
            ));
        }
        Ok((p1 - p0, b1 - b0))
    }

    fn tx_ceiling(&mut self, rounds: u64) -> Result<(u64, u64), String> {
        let want = VNET_HDR_LEN_V1 + self.frame_len;
        for _ in 0..rounds {
            for iov in &self.tx_iov {
                // SAFETY: the iovecs point into this pair's guest memory, mapped for as long
                // as `self.qp` (which holds it) lives; writev only reads them.
                match unsafe { self.tap.writev(iov) } {
                    Ok(n) if n == want => {}
                    Ok(n) => return Err(format!("writev wrote {n} of {want} bytes")),
                    Err(e) => return Err(format!("writev: {e}")),
                }
            }
        }
        let frames = rounds * u64::from(QUEUE_SIZE);
        Ok((frames, frames * self.frame_len as u64))
    }

    fn rx_device(&mut self, frames: u64) -> Result<(u64, u64), String> {
        let (p0, b0, d0) = self.counters(Dir::Rx);
        let mut waited_since: Option<Instant> = None;
        loop {
            let state = self.qp.process_rx(&self.tap);
            let n = self.rx.reap(|_, _| {}).map_err(|e| e.to_string())?;
            if n > 0 {
                self.rx.publish(n);
                self.rx.set_used_event(self.rx.used_seen());
            }
            let (p, _, _) = self.counters(Dir::Rx);
            if p - p0 >= frames {
                break;
            }
            match state {
                RxState::QueueBroken | RxState::BackendError => {
                    return Err(format!("process_rx stopped with {state:?}"))
                }
                RxState::Drained => {
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL {
                        return Err(format!("only {} of {frames} queued frames arrived", p - p0));
                    }
                }
                RxState::More | RxState::WaitingForBuffers => waited_since = None,
            }
        }
        let (p1, b1, d1) = self.counters(Dir::Rx);
        if d1 != d0 {
            return Err(format!("device dropped {} received frames", d1 - d0));
        }
        self.check_lengths(p1 - p0, b1 - b0)?;
        Ok((p1 - p0, b1 - b0))
    }

    fn rx_ceiling(&mut self, frames: u64) -> Result<(u64, u64), String> {
        let mut got = 0u64;
        let mut bytes = 0u64;
        let mut waited_since: Option<Instant> = None;
        // Read until EAGAIN, as the device does: `frames` frames, then one more call.
        loop {
            let iov = &self.rx_iov[self.rx_cursor..self.rx_cursor + self.rx_need];
            // SAFETY: the iovecs point into this pair's guest memory (alive with `self.qp`)
            // and are valid for writes of their lengths.
            match unsafe { self.tap.readv(iov) } {
                Ok(n) => {
                    got += 1;
                    bytes += n.saturating_sub(VNET_HDR_LEN_V1) as u64;
                    let used = (n as u64).div_ceil(BUF).max(1) as usize;
                    self.rx_cursor = (self.rx_cursor + used) % usize::from(QUEUE_SIZE);
                    waited_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got >= frames {
                        break;
                    }
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL {
                        return Err(format!("only {got} of {frames} queued frames arrived"));
                    }
                }
                Err(e) => return Err(format!("readv: {e}")),
            }
        }
        self.check_lengths(got, bytes)?;
        Ok((got, bytes))
    }

    /// Every received frame must be the frame the source sent (not segmented on the way).
    fn check_lengths(&self, frames: u64, bytes: u64) -> Result<(), String> {
        if bytes == frames * self.frame_len as u64 {
            Ok(())
        } else {
            Err(format!(
                "received {frames} frames of {bytes} bytes in all, expected {} bytes each",
                self.frame_len
            ))
        }
    }

    fn flush(&mut self) -> Result<u64, String> {
        let mut buf = vec![0u8; 128 * 1024];
        let mut n = 0;
        loop {
            match self.tap.read(&mut buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

fn tx_flow(pair: usize) -> Flow {
    Flow {
        dst_mac: [0x02, 0, 0, 0, 0x7e, 0x01],
        src_mac: [0x02, 0, 0, 0, 0x7e, 0x02],
        src_ip: [10, 8, 0, 2],
        dst_ip: [10, 8, 0, 1],
        sport: 40000 + pair as u16,
        dport: 5201,
    }
}

fn rx_flow(sport: u16) -> Flow {
    Flow {
        dst_mac: [0x02, 0, 0, 0, 0x7f, 0x02],
        src_mac: [0x02, 0, 0, 0, 0x7f, 0x01],
        src_ip: [10, 9, 0, 1],
        dst_ip: [10, 9, 0, 2],
        sport,
        dport: 5201,
    }
}

fn pair_thread(
    index: usize,
    tap: TapQueue,
    metrics: Arc<NetMetrics>,
    frame_len: usize,
    cmds: Receiver<Cmd>,
    replies: Sender<Reply>,
) -> Option<TapQueue> {
    let mut pair = match Pair::new(index, tap, metrics, frame_len) {
        Ok(p) => p,
        Err(e) => {
            let _ = replies.send((index, Err(e)));
            return None;
        }
    };
    while let Ok(cmd) = cmds.recv() {
        let result = pair.run(&cmd);
        if replies.send((index, result)).is_err() {
            break;
        }
    }
    Some(pair.tap)
}

/// The pair threads of one (pair count, frame size).
struct Threads {
    cmds: Vec<Sender<Cmd>>,
    replies: Receiver<Reply>,
    handles: Vec<JoinHandle<Option<TapQueue>>>,
}

impl Threads {
    fn start(taps: Vec<TapQueue>, frame_len: usize) -> Result<Threads, Error> {
        let metrics = Arc::new(NetMetrics::new(taps.len()));
        let (reply_tx, replies) = channel();
        let mut cmds = Vec::new();
        let mut handles = Vec::new();
        for (index, tap) in taps.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = channel();
            let metrics = metrics.clone();
            let reply_tx = reply_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("bench-pair{index}"))
                .spawn(move || pair_thread(index, tap, metrics, frame_len, cmd_rx, reply_tx))
                .map_err(|source| Error::Spawn {
                    pair: index,
                    source,
                })?;
            cmds.push(cmd_tx);
            handles.push(handle);
        }
        Ok(Threads {
            cmds,
            replies,
            handles,
        })
    }

    /// Sends `make(pair)` to every thread and collects one reply each.
    fn all(&self, make: impl Fn(usize) -> Cmd) -> Result<Vec<Measured>, Error> {
        for (i, c) in self.cmds.iter().enumerate() {
            c.send(make(i)).map_err(|_| Error::Pair {
                pair: i,
                message: "thread is gone".into(),
            })?;
        }
        let mut out: Vec<Option<Measured>> = vec![None; self.cmds.len()];
        for _ in 0..self.cmds.len() {
            let (pair, result) = self.replies.recv().map_err(|_| Error::Pair {
                pair: 0,
                message: "threads are gone".into(),
            })?;
            out[pair] = Some(result.map_err(|message| Error::Pair { pair, message })?);
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn stop(self) -> Result<Vec<TapQueue>, Error> {
        drop(self.cmds);
        let mut taps = Vec::new();
        for (pair, h) in self.handles.into_iter().enumerate() {
            match h.join() {
                Ok(Some(tap)) => taps.push(tap),
                Ok(None) => {
                    // The error was sent as a reply; drain it.
                    let message = self
                        .replies
                        .try_iter()
                        .find_map(|(p, r)| (p == pair).then(|| r.err()).flatten())
                        .unwrap_or_else(|| "set-up failed".into());
                    return Err(Error::Pair { pair, message });
                }
                Err(_) => {
                    return Err(Error::Pair {
                        pair,
                        message: "thread panicked".into(),
                    })
                }
            }
        }
        Ok(taps)
    }
}

/// Sums of one sample.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    wall_ns: u64,
    cpu_ns: u64,
    frames: u64,
    bytes: u64,
    irqs: u64,
}

impl Totals {
    fn add(&mut self, parts: &[Measured]) {
        let start = parts.iter().map(|m| m.start).min();
        let end = parts.iter().map(|m| m.end).max();
        if let (Some(s), Some(e)) = (start, end) {
            self.wall_ns += (e - s).as_nanos() as u64;
        }
        for m in parts {
            self.cpu_ns += m.cpu_ns;
            self.frames += m.frames;
            self.bytes += m.bytes;
            self.irqs += m.irqs;
        }
    }
}

/// One configuration's runner: threads, the source, and the flows per queue.
struct Config<'a> {
    threads: &'a Threads,
    source: &'a net::Source,
    /// Per queue, the message (10-byte header + frame) the source sends to reach it.
    rx_msgs: &'a [Vec<u8>],
    frame_len: usize,
}

impl Config<'_> {
    fn unit_frames(&self) -> u64 {
        if frames::is_gso(self.frame_len) {
            RX_UNIT_GSO
        } else {
            RX_UNIT
        }
    }

    /// Runs `units` units of `dir` on every pair for each of `paths`, interleaved unit by
    /// unit (order reversed every other unit), so that anything else the machine does in the
    /// meantime hits every path alike. Returns one total per path.
    fn measure(&self, dir: Dir, paths: &[PathKind], units: u64) -> Result<Vec<Totals>, Error> {
        let mut totals = vec![Totals::default(); paths.len()];
        let k = self.unit_frames();
        for u in 0..units {
            for j in 0..paths.len() {
                let i = if u % 2 == 0 { j } else { paths.len() - 1 - j };
                let path = paths[i];
                let parts = match dir {
                    Dir::Tx => self.threads.all(|_| Cmd::Tx {
                        path,
                        rounds: TX_UNIT_ROUNDS,
                    })?,
                    Dir::Rx => {
                        for msg in self.rx_msgs {
                            self.source.send(msg, k as usize)?;
                        }
                        self.threads.all(|_| Cmd::Rx { path, frames: k })?
                    }
                };
                totals[i].add(&parts);
            }
        }
        Ok(totals)
    }
}

/// Finds, for each queue of the tap, a TCP source port whose flow the tap steers there.
fn find_flows(threads: &Threads, source: &net::Source, queues: usize) -> Result<Vec<u16>, Error> {
    const FIRST: u16 = 20000;
    const LAST: u16 = 20999;
    threads.all(|_| Cmd::Flush)?;
    let mut ports: Vec<Option<u16>> = vec![None; queues];
    for port in FIRST..=LAST {
        let mut msg = frames::vnet_hdr(frames::MIN_FRAME).to_vec();
        msg.extend(frames::tcp_frame(frames::MIN_FRAME, &rx_flow(port)));
        source.send(&msg, 1)?;
        let got = threads.all(|_| Cmd::Flush)?;
        if let Some(q) = got.iter().position(|m| m.frames > 0) {
            if ports[q].is_none() {
                ports[q] = Some(port);
            }
        }
        if ports.iter().all(Option::is_some) {
            return Ok(ports.into_iter().flatten().collect());
        }
    }
    let queue = ports.iter().position(Option::is_none).unwrap_or(0);
    Err(Error::NoFlow {
        queue,
        queues,
        first: FIRST,
        last: LAST,
    })
}

fn tap_err(queues: usize) -> impl Fn(tap::Error) -> Error {
    move |source| Error::Tap {
        name: TAP_NAME.into(),
        queues,
        source,
    }
}

/// Runs every configuration of `opts`; `sink` receives one record per sample (warm-ups are
/// not recorded) and `progress` one line per configuration. Must be called in a private
/// network namespace ([`net::enter_private_netns`]) before other threads exist.
pub fn run(
    opts: &Options,
    sink: &mut dyn FnMut(Record),
    progress: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    for &pairs in &opts.pairs {
        let tap = MultiQueueTap::create(&TapConfig {
            name: Some(TAP_NAME.into()),
            queues: pairs as u16,
            ..TapConfig::default()
        })
        .map_err(tap_err(pairs))?;
        let mut taps = tap.into_queues();
        let features = guest_features();
        taps[0]
            .set_vnet_hdr_size(VNET_HDR_LEN_V1 as i32)
            .map_err(tap_err(pairs))?;
        taps[0]
            .set_offload(tun_offload_flags(features.guest_offloads()))
            .map_err(tap_err(pairs))?;
        net::set_txqueuelen(TAP_NAME, TXQUEUELEN)?;
        net::set_up(TAP_NAME)?;
        let source = net::Source::new(TAP_NAME)?;

        for &frame_len in &opts.sizes {
            let threads = Threads::start(taps, frame_len)?;
            let result = run_size(opts, &threads, &source, pairs, frame_len, sink, progress);
            let stopped = threads.stop();
            result?;
            taps = stopped?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_size(
    opts: &Options,
    threads: &Threads,
    source: &net::Source,
    pairs: usize,
    frame_len: usize,
    sink: &mut dyn FnMut(Record),
    progress: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let ports = find_flows(threads, source, pairs)?;
    let rx_msgs: Vec<Vec<u8>> = ports
        .iter()
        .map(|&p| {
            let mut m = frames::vnet_hdr(frame_len).to_vec();
            m.extend(frames::tcp_frame(frame_len, &rx_flow(p)));
            m
        })
        .collect();
    let cfg = Config {
        threads,
        source,
        rx_msgs: &rx_msgs,
        frame_len,
    };
    for &dir in &opts.dirs {
        // Warm-up: every path, interleaved, for the warm-up time; the first path's pace fixes
        // the units per sample.
        let mut units_done = 0u64;
        let mut wall = 0u64;
        let started = Instant::now();
        while units_done < 2 || started.elapsed() < Duration::from_millis(opts.warmup_ms) {
            wall += cfg.measure(dir, &opts.paths, 1)?[0].wall_ns;
            units_done += 1;
        }
        let per_unit = (wall / units_done).max(1);
        let units = (opts.sample_ms * 1_000_000).div_ceil(per_unit).max(1);
        let mut line = format!(
            "device path: {} {} pairs={pairs} units/sample={units}:",
            dir.name(),
            frames::label(frame_len)
        );
        for s in 0..opts.samples {
            let totals = cfg.measure(dir, &opts.paths, units)?;
            for (&path, t) in opts.paths.iter().zip(totals) {
                let pps = t.frames as f64 / (t.wall_ns as f64 / 1e9);
                if s == 0 {
                    line.push_str(&format!(" {}={:.0}kpps", path.name(), pps / 1e3));
                }
                sink(Record::Device(DevSample {
                    dir: dir.name().into(),
                    pairs: pairs as u64,
                    frame: frame_len as u64,
                    path: path.name().into(),
                    sample: s as u64,
                    units,
                    frames: t.frames,
                    bytes: t.bytes,
                    wall_ns: t.wall_ns,
                    cpu_ns: t.cpu_ns,
                    irqs: t.irqs,
                }));
            }
        }
        progress(&line);
    }
    Ok(())
}
