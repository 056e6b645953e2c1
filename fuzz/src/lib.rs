// SPDX-License-Identifier: Apache-2.0
//! Pieces shared by the fuzz targets: a byte decoder that never fails, an in-memory fake
//! backend (behind `virtio_net::test_utils::fakes`' fault-injecting wrapper), a counting
//! interrupt sink, the guest memory layout and a hostile driver's view of one split virtqueue
//! (over `virtio_net::test_utils::ring`).
//!
//! Every target decodes its input with [`Input`]: a header, then a sequence of operations,
//! each a tag byte followed by its arguments. Missing bytes read as zero, so every input is
//! valid and the fuzzer never wastes executions on parse failures.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_net::test_utils::fakes::{AttachState, Fault, FaultPlan, FaultyBackend};
use virtio_net::test_utils::ring::{write_descriptor, RingLayout};
use virtio_net::{Backend, BackendError, Interrupt, Net, NetConfig};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod seeds;

/// Reads the raw fuzz input front to back; past the end every read yields zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.data.len());
        b[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A guest address: mostly inside the first 64 KiB, sometimes at a region edge,
    /// sometimes anything at all (the device must treat every address as hostile).
    pub fn addr(&mut self) -> u64 {
        match self.u8() % 8 {
            0..=3 => u64::from(self.u16()),
            4 => {
                let edge = EDGES[usize::from(self.u8()) % EDGES.len()];
                edge.wrapping_sub(u64::from(self.u8()))
            }
            5 => self.u64(),
            6 => u64::MAX - u64::from(self.u8()),
            _ => DATA_AREA + 16 * u64::from(self.u8()),
        }
    }

    /// A register value: a byte, a single bit, a dword or anything.
    pub fn value(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => u64::from(self.u8()),
            1 => 1u64 << (self.u8() % 64),
            2 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }

    /// A buffer length: mostly small, sometimes up to `u32::MAX`.
    pub fn len(&mut self) -> u32 {
        match self.u8() % 4 {
            0 | 1 => u32::from(self.u8()),
            2 => u32::from(self.u16()),
            _ => self.u32(),
        }
    }
}

/// Guest memory of the ctrl and queue_pair targets: two adjacent 32 KiB regions (buffers
/// may straddle them), a 4 KiB hole, then one more 4 KiB region.
pub const REGION_SPLIT: u64 = 0x8000;
pub const HOLE: u64 = 0x10000;
pub const HIGH_REGION: u64 = 0x11000;
pub const MEM_END: u64 = 0x12000;
/// Where the `addr()` encoding's "data" choice points (16-byte steps over 4 KiB).
pub const DATA_AREA: u64 = 0x4000;
const EDGES: [u64; 5] = [REGION_SPLIT, HOLE, HIGH_REGION, MEM_END, 0];

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SPLIT as usize),
        (GuestAddress(REGION_SPLIT), (HOLE - REGION_SPLIT) as usize),
        (GuestAddress(HIGH_REGION), (MEM_END - HIGH_REGION) as usize),
    ])
    .expect("fuzz guest memory layout")
}

/// Interrupt sink that only counts.
#[derive(Default)]
pub struct CountingInterrupt {
    pub used: AtomicU64,
    pub config: AtomicU64,
}

impl Interrupt for CountingInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> io::Result<()> {
        self.used.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn signal_config(&self) -> io::Result<()> {
        self.config.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// What the fake backend's `readv` returns next.
#[derive(Debug, Clone, Copy)]
pub enum RxEvent {
    /// A frame of `len` bytes (vnet header included), every byte `fill`.
    Frame { len: usize, fill: u8 },
    /// An errno.
    Error(i32),
}

/// A backend that keeps everything in memory and behaves like a tap queue where it matters
/// (the attach rules of [`AttachState`], `readv` reports the full length of a truncated frame,
/// WouldBlock when empty). Wrapped in a [`FaultyBackend`], it fails control operations as
/// the input's [`FaultPlan`] says. Its fd is an eventfd the worker may poll;
/// [`FakeBackend::push`] makes it readable.
pub struct FakeBackend {
    evt: EventFd,
    /// Attached or not, and reads and writes tried while detached (a parked worker must make
    /// none).
    pub state: AttachState,
    rx: Mutex<VecDeque<RxEvent>>,
    /// Frames and bytes (header included) written by the device.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames read by the device.
    pub rx_frames: AtomicU64,
}

impl FakeBackend {
    pub fn new(queue: u16, attached: bool) -> Self {
        FakeBackend {
            evt: EventFd::new(EFD_NONBLOCK).expect("eventfd for a fake backend"),
            state: AttachState::new(queue, attached),
            rx: Mutex::new(VecDeque::new()),
            tx_frames: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_frames: AtomicU64::new(0),
        }
    }

    /// `new`, behind `plan`.
    pub fn faulty(queue: u16, attached: bool, plan: Arc<FaultPlan>) -> FaultyBackend<Self> {
        FaultyBackend::new(queue, FakeBackend::new(queue, attached), plan)
    }

    pub fn attached_now(&self) -> bool {
        self.state.is_attached()
    }

    /// Queues something for `readv` and makes the fd readable (edge for EPOLLET).
    pub fn push(&self, ev: RxEvent) {
        if let Ok(mut q) = self.rx.lock() {
            q.push_back(ev);
        }
        let _ = self.evt.write(1);
    }
}

impl AsRawFd for FakeBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl Backend for FakeBackend {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.state.check_io()?;
        let ev = self.rx.lock().ok().and_then(|mut q| q.pop_front());
        match ev {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(RxEvent::Error(errno)) => Err(io::Error::from_raw_os_error(errno)),
            Some(RxEvent::Frame { len, fill }) => {
                let mut left = len;
                for seg in iov {
                    let n = left.min(seg.iov_len);
                    // SAFETY: the caller guarantees every iovec is valid for writes of
                    // `iov_len` bytes, and `n <= iov_len`.
                    unsafe { std::ptr::write_bytes(seg.iov_base.cast::<u8>(), fill, n) };
                    left -= n;
                    if left == 0 {
                        break;
                    }
                }
                self.rx_frames.fetch_add(1, Ordering::SeqCst);
                Ok(len)
            }
        }
    }

    unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.state.check_io()?;
        let mut total = 0usize;
        let mut sum = 0u8;
        for seg in iov {
            if seg.iov_len == 0 {
                continue;
            }
            // SAFETY: the caller guarantees every iovec is valid for reads of `iov_len`
            // bytes. Reading all of them is the point: a bad iovec faults here.
            let bytes =
                unsafe { std::slice::from_raw_parts(seg.iov_base.cast::<u8>(), seg.iov_len) };
            sum = bytes.iter().fold(sum, |a, &b| a.wrapping_add(b));
            total += seg.iov_len;
        }
        std::hint::black_box(sum);
        self.tx_frames.fetch_add(1, Ordering::SeqCst);
        self.tx_bytes.fetch_add(total as u64, Ordering::SeqCst);
        Ok(total)
    }

    fn attach(&self) -> Result<(), BackendError> {
        self.state.attach()
    }

    fn detach(&self) -> Result<(), BackendError> {
        self.state.detach()
    }

    fn is_attached(&self) -> Result<bool, BackendError> {
        Ok(self.attached_now())
    }

    fn set_vnet_hdr_size(&self, _size: i32) -> Result<(), BackendError> {
        Ok(())
    }

    fn set_offload(&self, _tun_flags: u32) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Asserts that a device status holds only a prefix of the handshake (ACKNOWLEDGE, DRIVER,
/// FEATURES_OK, DRIVER_OK) plus DEVICE_NEEDS_RESET and FAILED (the same bits on every
/// transport).
pub fn assert_status_prefix(s: u32) {
    use vmm::virtio::mmio::{
        STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
        STATUS_FAILED, STATUS_FEATURES_OK,
    };
    let steps = [
        STATUS_ACKNOWLEDGE,
        STATUS_DRIVER,
        STATUS_FEATURES_OK,
        STATUS_DRIVER_OK,
    ];
    let known = steps
        .iter()
        .fold(STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED, |a, b| a | b);
    assert_eq!(s & !known, 0, "status {s:#x} has unknown bits");
    for w in steps.windows(2) {
        if s & w[1] != 0 {
            assert_ne!(s & w[0], 0, "status {s:#x} skips a handshake step");
        }
    }
}

/// Operation tags of the `pci` target (see its doc comment), shared with its seeds.
pub mod pci_op {
    pub const CFG_READ: u8 = 0;
    pub const CFG_WRITE: u8 = 1;
    pub const PORT: u8 = 2;
    pub const BAR_READ: u8 = 3;
    pub const BAR_WRITE: u8 = 4;
    pub const HANDSHAKE: u8 = 5;
    pub const QUEUE: u8 = 6;
    pub const STATUS: u8 = 7;
    pub const MSIX_ENTRY: u8 = 8;
    pub const MSIX_CONTROL: u8 = 9;
    pub const MSIX_MASK: u8 = 10;
    pub const VECTOR: u8 = 11;
    pub const RING: u8 = 12;
    pub const NOTIFY: u8 = 13;
    pub const BACKEND: u8 = 14;
    pub const RELOCATE: u8 = 15;
    pub const COUNT: u8 = 16;
}

/// Reads a fault-plan entry from the input: which operation, and the how-manieth call.
pub fn read_fault(inp: &mut Input, plan: &FaultPlan) {
    let b = inp.u8();
    let op = match b % 5 {
        0 => Fault::Attach,
        1 => Fault::Detach,
        2 => Fault::VnetHdr,
        3 => Fault::Offload,
        _ => Fault::Query,
    };
    plan.fail_kth(op, u32::from(b / 5 % 8) + 1);
}

/// A hostile driver's side of one split virtqueue in guest memory: the shared [`RingLayout`]
/// placed by the input, and the avail index it last wrote. Every write ignores failures: the
/// rings may lie anywhere the input put them.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    pub layout: RingLayout,
    /// The avail index the driver last published.
    pub avail_idx: u16,
}

impl Ring {
    /// Rings placed from the input: a power-of-two size up to `max_size` and three aligned
    /// addresses in the first 64 KiB.
    pub fn read(inp: &mut Input, max_size: u16) -> Self {
        let shift = u32::from(inp.u8()) % (max_size.trailing_zeros() + 1);
        let size = (1u16 << shift).max(2).min(max_size);
        let desc = u64::from(inp.u16() & !0xf);
        let avail = u64::from(inp.u16() & !1);
        let used = u64::from(inp.u16() & !3);
        Ring {
            layout: RingLayout {
                size,
                desc: GuestAddress(desc),
                avail: GuestAddress(avail),
                used: GuestAddress(used),
            },
            avail_idx: 0,
        }
    }

    /// Fixed rings at `base`: desc, avail and used one after the other (size <= 16).
    pub fn at(base: u64, size: u16) -> Self {
        Ring {
            layout: RingLayout::packed(GuestAddress(base), size),
            avail_idx: 0,
        }
    }

    /// The device-side queue as a transport would build it, or None when the transport would
    /// refuse it (rings outside memory).
    pub fn queue(&self, max_size: u16, event_idx: bool, mem: &GuestMemoryMmap) -> Option<Queue> {
        self.layout.queue(max_size, event_idx, mem).ok()
    }

    /// Puts `head` in the next avail slot and publishes it.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let _ = self.layout.set_avail_ring(mem, self.avail_idx, head);
        self.set_avail_idx(mem, self.avail_idx.wrapping_add(1));
    }

    /// Writes the avail index (a hostile driver may write anything).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        let _ = self.layout.set_avail_idx(mem, idx);
    }

    /// Used element `i` (ring position), if readable.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> Option<(u32, u32)> {
        self.layout.used_elem(mem, i).ok()
    }
}

/// Maps the input's flag byte to descriptor flags: the three defined bits in any mix, and
/// now and then undefined bits as well.
pub fn desc_flags(b: u8) -> u16 {
    let defined = u16::from(b & 7);
    if b & 0x80 != 0 {
        defined | (u16::from(b) << 5)
    } else {
        defined
    }
}

/// One memory-shaping operation on `ring`, decoded from `inp` with `tag` (0..6). Returns
/// false for tags it does not handle.
pub fn ring_op(tag: u8, inp: &mut Input, mem: &GuestMemoryMmap, ring: &mut Ring) -> bool {
    match tag {
        // A descriptor in the ring's table.
        0 => {
            let index = u16::from(inp.u8());
            let addr = inp.addr();
            let len = inp.len();
            let flags = desc_flags(inp.u8());
            let next = u16::from(inp.u8());
            let desc = Descriptor::new(addr, len, flags, next);
            let _ = ring.layout.write_desc(mem, index % ring.layout.size, desc);
        }
        // A descriptor anywhere (an indirect table entry).
        1 => {
            let at = inp.addr();
            let i = u64::from(inp.u8() % 32);
            let addr = inp.addr();
            let len = inp.len();
            let flags = desc_flags(inp.u8());
            let next = u16::from(inp.u8());
            let desc = Descriptor::new(addr, len, flags, next);
            let _ = write_descriptor(mem, GuestAddress(at.wrapping_add(16 * i)), desc);
        }
        // Publish a head.
        2 => {
            let head = u16::from(inp.u8());
            ring.publish(mem, head);
        }
        // Raw avail index.
        3 => {
            let idx = inp.u16();
            ring.set_avail_idx(mem, idx);
        }
        // Avail flags and used_event.
        4 => {
            let flags = inp.u16();
            let event = inp.u16();
            let _ = ring.layout.set_avail_flags(mem, flags);
            let _ = ring.layout.set_used_event(mem, event);
        }
        // Raw bytes anywhere.
        5 => {
            let at = inp.addr();
            let n = usize::from(inp.u8() % 64);
            let bytes = inp.bytes(n);
            let _ = mem.write_slice(bytes, GuestAddress(at));
        }
        _ => return false,
    }
    true
}

/// Threads and open fds of this process, to check that a target leaves none behind.
pub fn thread_and_fd_count() -> (usize, usize) {
    let count = |dir: &str| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    (count("/proc/self/task"), count("/proc/self/fd"))
}

/// Whether `MQVMM_FUZZ_TRACE` is set: the targets then say what each input did (for
/// checking seeds and reading a crash; never set while fuzzing).
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var_os("MQVMM_FUZZ_TRACE").is_some();
        if on {
            // The device's own log lines too, on stderr.
            let _ = log::set_logger(&StderrLog);
            log::set_max_level(log::LevelFilter::Debug);
        }
        on
    })
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        eprintln!("[{}] {}", record.level(), record.args());
    }
    fn flush(&self) {}
}

/// `eprintln!` when [`tracing`] is on.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::tracing() {
            eprintln!($($arg)*);
        }
    };
}

/// The real device behind a transport target, shaped by the input's first bytes: a device byte
/// (pairs 1..4, MQ, MTU), a queue-size byte and the initially attached backends. Returns the
/// device, the fault plan its backends share and the harness' handles to them; `None` when the
/// configuration is refused.
pub struct FuzzNet {
    pub net: Net<FaultyBackend<FakeBackend>>,
    pub plan: Arc<FaultPlan>,
    pub handles: Vec<Arc<FakeBackend>>,
    /// The size of every queue.
    pub queue_size: u16,
}

pub fn net_from_input(inp: &mut Input) -> Option<FuzzNet> {
    let dev = inp.u8();
    let pairs = 1 + usize::from(dev % 4);
    let mq = dev & 0x10 == 0;
    let mtu = (dev & 0x20 != 0).then_some(1500 + u16::from(dev >> 6) * 3000);
    let queue_size = 1u16 << (1 + inp.u8() % 8);
    let initially = inp.u8();
    let plan = Arc::new(FaultPlan::default());
    let handles: Vec<Arc<FakeBackend>> = (0..pairs)
        .map(|p| Arc::new(FakeBackend::new(p as u16, initially & (1 << p) != 0)))
        .collect();
    let cfg = NetConfig {
        mq,
        mtu,
        queue_size,
        ..NetConfig::default()
    };
    let backends = handles
        .iter()
        .enumerate()
        .map(|(p, h)| FaultyBackend::new(p as u16, h.clone(), plan.clone()))
        .collect();
    let net = Net::new(cfg, backends).ok()?;
    Some(FuzzNet {
        net,
        plan,
        handles,
        queue_size,
    })
}
