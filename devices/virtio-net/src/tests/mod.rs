// SPDX-License-Identifier: Apache-2.0
//! Unit tests: a driver-side ring helper over virtio-queue's mock, fake backends (a
//! SOCK_SEQPACKET socketpair keeps frame boundaries; a fault-injecting wrapper fails the k-th
//! attach or detach) and a recording interrupt sink.

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
mod tx;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{Backend, BackendError, BackendOp};
use crate::metrics::NetMetrics;
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
    let avail_end = 16 * u64::from(size) + 6 + 2 * u64::from(size);
    avail_end.div_ceil(0x1000) * 0x1000
}

/// Bytes a [`TestQueue`] of `size` entries occupies.
pub fn queue_footprint(size: u16) -> u64 {
    used_ring_offset(size) + 6 + 8 * u64::from(size)
}

/// One descriptor as a test writes it.
#[derive(Clone, Copy, Debug)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

/// The driver side of one split queue. Descriptor table and avail ring come from
/// `MockSplitQueue`; the used ring is placed by us on the next page boundary after the avail
/// ring (the mock's own used ring placement overlaps its avail ring for queues larger than a
/// few entries). A queue of size `s` needs `queue_footprint(s)` bytes from `base`.
pub struct TestQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    size: u16,
    used_addr: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue whose structures start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        let used_addr = used_ring_offset(size) + base;
        mem.write_slice(
            &vec![0u8; 6 + 8 * usize::from(size)],
            GuestAddress(used_addr),
        )
        .unwrap();
        TestQueue {
            mock,
            mem,
            size,
            used_addr,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue, ready, with `event_idx` as negotiated.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q: Queue = self.mock.create_queue().unwrap();
        q.set_used_ring_address(
            Some(self.used_addr as u32),
            Some((self.used_addr >> 32) as u32),
        );
        q.set_event_idx(event_idx);
        q
    }

    fn alloc(&mut self, n: u16) -> u16 {
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    /// Writes descriptors at consecutive slots, linked in order; returns the head.
    pub fn write_chain(&mut self, descs: &[D]) -> u16 {
        let first = self.alloc(descs.len() as u16);
        for (i, d) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                idx + 1
            } else {
                0
            };
            self.store(idx, d.addr, d.len, flags, next);
        }
        first
    }

    /// Stores one raw descriptor.
    pub fn store(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mock
            .desc_table()
            .store(
                idx,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    /// Makes `head` available to the device.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        let ring = self.mock.avail_addr().0 + 4 + 2 * u64::from(slot);
        self.mem
            .write_obj(head.to_le(), GuestAddress(ring))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(
                self.avail_idx.to_le(),
                GuestAddress(self.mock.avail_addr().0 + 2),
            )
            .unwrap();
    }

    /// Writes and publishes a chain; returns its head.
    pub fn add(&mut self, descs: &[D]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    /// Writes `descs` as an indirect table at `table` and publishes a one-descriptor chain
    /// pointing to it.
    pub fn add_indirect(&mut self, table: u64, descs: &[D]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                i as u16 + 1
            } else {
                0
            };
            let raw = RawDescriptor::from(Descriptor::new(d.addr, d.len, flags, next));
            self.mem
                .write_obj(raw, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.alloc(1);
        self.store(
            head,
            table,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.publish(head);
        head
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap())
    }

    /// Used entry `i` (ring position): (descriptor head, length).
    pub fn used(&self, i: u16) -> (u16, u32) {
        let at = self.used_addr + 4 + 8 * u64::from(i % self.size);
        let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(at)).unwrap());
        let len: u32 = u32::from_le(self.mem.read_obj(GuestAddress(at + 4)).unwrap());
        (id as u16, len)
    }

    /// Sets used_event (EVENT_IDX: interrupt when the device passes this index).
    pub fn set_used_event(&self, v: u16) {
        let at = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }

    /// avail_event as the device wrote it (EVENT_IDX: kick when passing this index).
    pub fn avail_event(&self) -> u16 {
        let at = self.used_addr + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// Sets the avail ring flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags.to_le(), self.mock.avail_addr())
            .unwrap();
    }

    /// Used ring flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used_addr)).unwrap())
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
}

type Probe = Box<dyn Fn(&Op) + Send + Sync>;

/// Shared journal and fault plan of a set of fake backends.
#[derive(Default)]
pub struct Journal {
    pub ops: Mutex<Vec<Op>>,
    /// Fail the k-th (1-based, counted device-wide) attach / detach / set_offload.
    pub fail_attach_at: Mutex<Option<usize>>,
    pub fail_detach_at: Mutex<Option<usize>>,
    pub fail_offload_at: Mutex<Option<usize>>,
    attaches: Mutex<usize>,
    detaches: Mutex<usize>,
    offloads: Mutex<usize>,
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

    /// Makes the k-th attach from now on fail.
    pub fn fail_attach_after(&self, k: usize) {
        let done = *self.attaches.lock().unwrap();
        *self.fail_attach_at.lock().unwrap() = Some(done + k);
    }

    /// Makes the k-th detach from now on fail.
    pub fn fail_detach_after(&self, k: usize) {
        let done = *self.detaches.lock().unwrap();
        *self.fail_detach_at.lock().unwrap() = Some(done + k);
    }

    /// Makes the k-th set_offload from now on fail.
    pub fn fail_offload_after(&self, k: usize) {
        let done = *self.offloads.lock().unwrap();
        *self.fail_offload_at.lock().unwrap() = Some(done + k);
    }

    fn hit(counter: &Mutex<usize>, plan: &Mutex<Option<usize>>) -> bool {
        let mut c = counter.lock().unwrap();
        *c += 1;
        *plan.lock().unwrap() == Some(*c)
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
    queue: u16,
    attached: AtomicBool,
    pub hdr_size: AtomicI32,
    pub offload: AtomicU32,
    pub fail_writes: AtomicBool,
    /// readv/writev calls made while detached (a parked worker must make none).
    pub touched_detached: AtomicU32,
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
                queue,
                attached: AtomicBool::new(true),
                hdr_size: AtomicI32::new(0),
                offload: AtomicU32::new(0),
                fail_writes: AtomicBool::new(false),
                touched_detached: AtomicU32::new(0),
                mtu: AtomicU32::new(0),
                accept_uso: AtomicBool::new(false),
                journal,
            },
            Peer { fd: b },
        )
    }

    pub fn is_attached_now(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    fn err(&self, op: BackendOp, errno: i32) -> BackendError {
        BackendError::new(op, self.queue, io::Error::from_raw_os_error(errno))
    }
}

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Backend for SockBackend {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        if !self.is_attached_now() {
            self.touched_detached.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
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
        if !self.is_attached_now() {
            self.touched_detached.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
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
        if Journal::hit(&self.journal.attaches, &self.journal.fail_attach_at) {
            self.journal.record(Op::AttachFailed(self.queue));
            return Err(self.err(BackendOp::Attach, libc::EIO));
        }
        if self.attached.swap(true, Ordering::SeqCst) {
            return Err(self.err(BackendOp::Attach, libc::EINVAL));
        }
        self.journal.record(Op::Attach(self.queue));
        Ok(())
    }

    fn detach(&self) -> Result<(), BackendError> {
        if Journal::hit(&self.journal.detaches, &self.journal.fail_detach_at) {
            self.journal.record(Op::DetachFailed(self.queue));
            return Err(self.err(BackendOp::Detach, libc::EIO));
        }
        if !self.attached.swap(false, Ordering::SeqCst) {
            return Err(self.err(BackendOp::Detach, libc::EINVAL));
        }
        self.journal.record(Op::Detach(self.queue));
        Ok(())
    }

    fn is_attached(&self) -> Result<bool, BackendError> {
        Ok(self.is_attached_now())
    }

    fn set_vnet_hdr_size(&self, size: i32) -> Result<(), BackendError> {
        if !self.is_attached_now() {
            return Err(self.err(BackendOp::SetVnetHdrSize, libc::EBADFD));
        }
        self.hdr_size.store(size, Ordering::SeqCst);
        self.journal.record(Op::VnetHdr(self.queue, size));
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
        if Journal::hit(&self.journal.offloads, &self.journal.fail_offload_at) {
            return Err(self.err(BackendOp::SetOffload, libc::EIO));
        }
        if !self.is_attached_now() {
            return Err(self.err(BackendOp::SetOffload, libc::EBADFD));
        }
        self.offload.store(tun_flags, Ordering::SeqCst);
        self.journal.record(Op::Offload(self.queue, tun_flags));
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
