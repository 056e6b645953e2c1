// SPDX-License-Identifier: Apache-2.0
//! Unit tests: a driver-side ring helper over the shared `test_utils::ring`, fake backends (a
//! SOCK_SEQPACKET socketpair keeps frame boundaries; the shared `test_utils::fakes` fail the
//! k-th attach, detach or set_offload) and a recording interrupt sink.

mod bench;
mod chains;
mod coalescing;
mod config;
mod ctrl;
mod device;
mod faults;
mod filtering;
mod fuzz_regressions;
mod hostile;
mod pairs;
mod queue_reset;
mod real_tap;
mod rx;
mod steering;
mod tx;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{Backend, BackendError, BackendOp};
use crate::metrics::NetMetrics;
use crate::test_utils::fakes::{AttachState, Fault, FaultPlan};
use crate::test_utils::ring::{
    avail_ring_len, desc_table_len, used_ring_len, write_table, RingLayout, Segment,
    DESC_F_INDIRECT, DESC_LEN,
};
use crate::Interrupt;

/// Guest memory: two adjacent 8 MiB regions (buffers may straddle them), nothing above.
pub const MEM_END: u64 = 0x100_0000;
pub const REGION_SPLIT: u64 = 0x80_0000;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SPLIT as usize),
        (
            GuestAddress(REGION_SPLIT),
            (MEM_END - REGION_SPLIT) as usize,
        ),
    ])
    .unwrap()
}

fn used_ring_offset(size: u16) -> u64 {
    (desc_table_len(size) + avail_ring_len(size)).next_multiple_of(0x1000)
}

/// Bytes a [`TestQueue`] of `size` entries occupies.
pub fn queue_footprint(size: u16) -> u64 {
    used_ring_offset(size) + used_ring_len(size)
}

/// One descriptor as a test writes it: a buffer at `addr` the device writes or reads.
pub fn d(addr: u64, len: u32, write: bool) -> Segment {
    Segment {
        addr: GuestAddress(addr),
        len,
        writable: write,
    }
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> Segment {
    d(addr, len, false)
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> Segment {
    d(addr, len, true)
}

/// The driver side of one split queue, over the shared [`RingLayout`]: the descriptor table
/// at `base`, the avail ring right after it, the used ring on the next page boundary. A queue
/// of size `s` needs `queue_footprint(s)` bytes from `base`.
///
/// Unlike [`SplitRing`](crate::test_utils::ring::SplitRing), it keeps no free list: chains
/// take the next consecutive descriptor slots, starting over at 0 when the table is full
/// whether or not the device returned them, and are published at once. The tests push many
/// more chains through a queue than it has entries, read the used ring by position without
/// popping it, and build malformed chains in any slot. Only the used ring is zeroed: a queue
/// set up again over the same memory (a re-activation) finds the old descriptors and avail
/// ring there, as a guest's would.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    layout: RingLayout,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue whose structures start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let layout = RingLayout {
            size,
            desc: GuestAddress(base),
            avail: GuestAddress(base + desc_table_len(size)),
            used: GuestAddress(base + used_ring_offset(size)),
        };
        layout.zero_used(mem).unwrap();
        TestQueue {
            mem,
            layout,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue, ready, with `event_idx` as negotiated.
    pub fn queue(&self, event_idx: bool) -> Queue {
        self.layout
            .queue(self.layout.size, event_idx, self.mem)
            .unwrap()
    }

    fn alloc(&mut self, n: u16) -> u16 {
        if self.next_desc + n > self.layout.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    /// Writes descriptors at consecutive slots, linked in order; returns the head.
    pub fn write_chain(&mut self, descs: &[Segment]) -> u16 {
        let first = self.alloc(descs.len() as u16);
        let ids: Vec<u16> = (first..first + descs.len() as u16).collect();
        self.layout.write_chain(self.mem, &ids, descs).unwrap();
        first
    }

    /// Stores one raw descriptor.
    pub fn store(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(idx < self.layout.size, "descriptor {idx} beyond the table");
        let desc = Descriptor::new(addr, len, flags, next);
        self.layout.write_desc(self.mem, idx, desc).unwrap();
    }

    /// Makes `head` available to the device.
    pub fn publish(&mut self, head: u16) {
        self.layout
            .set_avail_ring(self.mem, self.avail_idx, head)
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.layout.set_avail_idx(self.mem, self.avail_idx).unwrap();
    }

    /// Writes and publishes a chain; returns its head.
    pub fn add(&mut self, descs: &[Segment]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    /// Writes `descs` as an indirect table at `table` and publishes a one-descriptor chain
    /// pointing to it.
    pub fn add_indirect(&mut self, table: u64, descs: &[Segment]) -> u16 {
        write_table(self.mem, GuestAddress(table), descs).unwrap();
        let head = self.alloc(1);
        let len = (DESC_LEN * descs.len() as u64) as u32;
        self.store(head, table, len, DESC_F_INDIRECT, 0);
        self.publish(head);
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.layout.used_idx(self.mem).unwrap()
    }

    /// Used entry `i` (ring position): (descriptor head, length).
    pub fn used(&self, i: u16) -> (u16, u32) {
        let (id, len) = self.layout.used_elem(self.mem, i).unwrap();
        (id as u16, len)
    }

    /// Sets used_event (EVENT_IDX: interrupt when the device passes this index).
    pub fn set_used_event(&self, v: u16) {
        self.layout.set_used_event(self.mem, v).unwrap();
    }

    /// avail_event as the device wrote it (EVENT_IDX: kick when passing this index).
    pub fn avail_event(&self) -> u16 {
        self.layout.avail_event(self.mem).unwrap()
    }

    /// Sets the avail ring flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.layout.set_avail_flags(self.mem, flags).unwrap();
    }

    /// Used ring flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.layout.used_flags(self.mem).unwrap()
    }

    /// Waits until the used index reaches `idx`.
    pub fn wait_used(&self, idx: u16) -> bool {
        wait_for(|| self.used_idx() == idx)
    }
}

/// Polls `cond` for up to 5 s.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// Interrupt sink counting signals per queue.
#[derive(Default)]
pub struct RecordingInterrupt {
    pub used: Mutex<Vec<u16>>,
    pub config: AtomicU32,
}

impl RecordingInterrupt {
    pub fn count(&self, queue: u16) -> usize {
        self.used
            .lock()
            .unwrap()
            .iter()
            .filter(|&&q| q == queue)
            .count()
    }
}

impl Interrupt for RecordingInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> io::Result<()> {
        self.used.lock().unwrap().push(queue_index);
        Ok(())
    }

    fn signal_config(&self) -> io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// What a fake backend did, in order, device-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Attach(u16),
    Detach(u16),
    AttachFailed(u16),
    DetachFailed(u16),
    VnetHdr(u16, i32),
    Offload(u16, u32),
    /// The steering program's table (tap queue numbers) was written.
    Steer(Vec<u16>),
}

type Probe = Box<dyn Fn(&Op) + Send + Sync>;

/// Shared journal and fault plan of a set of fake backends.
#[derive(Default)]
pub struct Journal {
    pub ops: Mutex<Vec<Op>>,
    /// Fails the k-th (counted device-wide) attach / detach / set_offload, with EIO.
    pub plan: FaultPlan,
    /// Called on every operation before it takes effect (tests observe device state there).
    pub probe: Mutex<Option<Probe>>,
}

impl Journal {
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.ops.lock().unwrap().clear();
    }

    fn record(&self, op: Op) {
        if let Some(p) = self.probe.lock().unwrap().as_ref() {
            p(&op);
        }
        self.ops.lock().unwrap().push(op);
    }
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A backend over one end of a SOCK_SEQPACKET socketpair: each readv/writev is one frame.
/// Like a tap, readv reports the full frame length even when it was truncated, and a
/// detached backend fails reads and writes with EBADFD.
pub struct SockBackend {
    fd: OwnedFd,
    /// Attached or not, and the reads and writes tried while detached (a parked worker must
    /// make none).
    pub state: AttachState,
    pub hdr_size: AtomicI32,
    pub offload: AtomicU32,
    pub fail_writes: AtomicBool,
    /// What [`Backend::mtu`] reports (0: unknown).
    pub mtu: AtomicU32,
    /// Whether [`Backend::accepts_offload`] takes USO (a tap of Linux 6.2+).
    pub accept_uso: AtomicBool,
    journal: Arc<Journal>,
}

/// The host side of a [`SockBackend`].
pub struct Peer {
    fd: OwnedFd,
}

impl Peer {
    /// Sends one frame towards the device's rx path.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a valid readable buffer of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// Receives one frame the device transmitted, if any.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        // SAFETY: `buf` is a valid writable buffer of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    /// Waits up to 5 s for a frame.
    pub fn recv_wait(&self) -> Option<Vec<u8>> {
        let mut got = None;
        wait_for(|| {
            got = self.recv();
            got.is_some()
        });
        got
    }
}

impl SockBackend {
    pub fn new(queue: u16, journal: Arc<Journal>) -> (SockBackend, Peer) {
        let (a, b) = socketpair();
        (
            SockBackend {
                fd: a,
                state: AttachState::new(queue, true),
                hdr_size: AtomicI32::new(0),
                offload: AtomicU32::new(0),
                fail_writes: AtomicBool::new(false),
                mtu: AtomicU32::new(0),
                accept_uso: AtomicBool::new(false),
                journal,
            },
            Peer { fd: b },
        )
    }

    /// Attach or detach (`op`, done by `apply`) unless the journal's plan fails it first;
    /// journals what happened.
    fn switch(
        &self,
        op: BackendOp,
        apply: fn(&AttachState) -> Result<(), BackendError>,
        done: fn(u16) -> Op,
        failed: fn(u16) -> Op,
    ) -> Result<(), BackendError> {
        let queue = self.state.queue();
        if let Err(e) = self.journal.plan.check(op, queue) {
            self.journal.record(failed(queue));
            return Err(e);
        }
        apply(&self.state)?;
        self.journal.record(done(queue));
        Ok(())
    }
}

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Backend for SockBackend {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.state.check_io()?;
        // SAFETY: an all-zero msghdr is valid; we fill in the iovec array below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        // SAFETY: `msg` points to the caller's iovecs, valid for writes per our contract.
        // MSG_TRUNC makes recvmsg report the full frame length, as a tap does.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.state.check_io()?;
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // SAFETY: the caller guarantees the iovecs are valid for reads.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn attach(&self) -> Result<(), BackendError> {
        self.switch(
            BackendOp::Attach,
            AttachState::attach,
            Op::Attach,
            Op::AttachFailed,
        )
    }

    fn detach(&self) -> Result<(), BackendError> {
        self.switch(
            BackendOp::Detach,
            AttachState::detach,
            Op::Detach,
            Op::DetachFailed,
        )
    }

    fn is_attached(&self) -> Result<bool, BackendError> {
        Ok(self.state.is_attached())
    }

    fn set_vnet_hdr_size(&self, size: i32) -> Result<(), BackendError> {
        self.state.require_attached(BackendOp::SetVnetHdrSize)?;
        self.hdr_size.store(size, Ordering::SeqCst);
        self.journal.record(Op::VnetHdr(self.state.queue(), size));
        Ok(())
    }

    fn mtu(&self) -> Option<u32> {
        Some(self.mtu.load(Ordering::SeqCst)).filter(|&m| m != 0)
    }

    fn accepts_offload(&self, tun_flags: u32) -> bool {
        let uso = tap::TUN_F_USO4 | tap::TUN_F_USO6;
        tun_flags & uso == 0 || self.accept_uso.load(Ordering::SeqCst)
    }

    fn set_offload(&self, tun_flags: u32) -> Result<(), BackendError> {
        self.journal
            .plan
            .check(BackendOp::SetOffload, self.state.queue())?;
        self.state.require_attached(BackendOp::SetOffload)?;
        self.offload.store(tun_flags, Ordering::SeqCst);
        self.journal
            .record(Op::Offload(self.state.queue(), tun_flags));
        Ok(())
    }
}

/// `n` socket backends sharing one journal, and their peers.
pub fn backends(n: u16) -> (Vec<SockBackend>, Vec<Peer>, Arc<Journal>) {
    let journal = Arc::new(Journal::default());
    let (b, p) = (0..n).map(|q| SockBackend::new(q, journal.clone())).unzip();
    (b, p, journal)
}

/// A vnet header (12 bytes, num_buffers 0) followed by `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(payload);
    f
}

/// Deterministic payload of `len` bytes.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Reads `len` guest bytes at `addr`.
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub fn metrics(pairs: usize) -> Arc<NetMetrics> {
    Arc::new(NetMetrics::new(pairs))
}

pub const F_BASE: u64 = crate::features::bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | crate::features::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
pub const F_MRG: u64 =
    F_BASE | crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF);
pub const F_EVENT_IDX: u64 =
    crate::features::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// Where test frame buffers start (above every queue structure).
pub const BUF: u64 = 0x10_0000;

/// One queue pair driven without threads: driver-side rings, the device-side `QueuePair`, a
/// socket backend and its peer.
pub struct PairRig<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rxq: TestQueue<'a>,
    pub txq: TestQueue<'a>,
    pub irq: Arc<RecordingInterrupt>,
    pub metrics: Arc<NetMetrics>,
    pub qp: crate::rxtx::QueuePair,
    pub backend: SockBackend,
    pub peer: Peer,
}

impl<'a> PairRig<'a> {
    /// Pair 0 with queues of `size` entries; `gso` says whether the guest takes GSO frames.
    /// The device advertises an MTU of 1500 (as over a default tap).
    pub fn new(mem: &'a GuestMemoryMmap, features: u64, gso: bool, size: u16) -> Self {
        Self::with_mtu(mem, features, gso, size, Some(1500))
    }

    /// As [`Self::new`], with `mtu` advertised (`None`: no MTU known).
    pub fn with_mtu(
        mem: &'a GuestMemoryMmap,
        features: u64,
        gso: bool,
        size: u16,
        mtu: Option<u16>,
    ) -> Self {
        let rxq = TestQueue::new(mem, 0, size);
        let txq = TestQueue::new(mem, queue_footprint(size).next_multiple_of(0x1000), size);
        let irq = Arc::new(RecordingInterrupt::default());
        let metrics = metrics(1);
        let f = crate::features::Negotiated(features);
        let qp = crate::rxtx::QueuePair::new(
            0,
            rxq.queue(f.event_idx()),
            txq.queue(f.event_idx()),
            mem.clone(),
            irq.clone(),
            metrics.clone(),
            crate::rxtx::PathConfig::new(f, gso, mtu),
        );
        let (backend, peer) = SockBackend::new(0, Arc::new(Journal::default()));
        PairRig {
            mem,
            rxq,
            txq,
            irq,
            metrics,
            qp,
            backend,
            peer,
        }
    }

    pub fn tx(&mut self) -> crate::rxtx::Work {
        self.qp.process_tx(Some(&self.backend), true)
    }

    pub fn rx(&mut self) -> crate::rxtx::RxState {
        self.qp.process_rx(&self.backend)
    }

    pub fn rx_m(&self) -> &crate::metrics::QueueMetrics {
        &self.metrics.pairs[0].rx
    }

    pub fn tx_m(&self) -> &crate::metrics::QueueMetrics {
        &self.metrics.pairs[0].tx
    }

    /// Writes `bytes` into guest memory at `addr`.
    pub fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }
}

/// Loads a counter.
pub fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}
