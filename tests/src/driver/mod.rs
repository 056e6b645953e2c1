//! An in-process virtio-net driver: it owns guest memory and a `vmm::virtio::mmio::MmioTransport`
//! and drives the device behind it through the virtio-mmio registers only, the way a guest
//! kernel would, but without KVM: the component tests use it to exercise the real device over a
//! real tap, and the device benchmarks to push frames through it.
//!
//! What it does (virtio 1.x):
//! - bring-up ([`NetDriver::init`]): magic, version and device id checked; reset, ACKNOWLEDGE,
//!   DRIVER; both feature pages read and the chosen features written; FEATURES_OK set and read
//!   back; every queue set up (QueueSel, QueueNumMax, QueueNum, the three ring addresses,
//!   QueueReady read back); DRIVER_OK, and the status checked for DEVICE_NEEDS_RESET;
//! - split rings ([`SplitRing`], shared with the other test doubles in `virtio_net::test_utils`)
//!   per queue, with buffers placed per descriptor head;
//! - rx: [`NetDriver::post_rx`] makes receive buffers available, [`NetDriver::reap_rx`] returns
//!   whole frames (mergeable buffers reassembled by `num_buffers`);
//! - tx: [`NetDriver::send`] puts a 12-byte `virtio_net_hdr_v1` and the frame in one buffer;
//! - control: [`NetDriver::ctrl_command`] (class, command, data, ack) and
//!   [`NetDriver::set_queue_pairs`] (VQ_PAIRS_SET), waiting for the used entry;
//! - interrupts: the irq eventfd is polled with a timeout and InterruptStatus read and acked;
//! - config space: MAC, status, max_virtqueue_pairs, MTU (generation-checked reads).
//!
//! Every wait is bounded ([`DriverConfig::timeout`]); a device that breaks the protocol (an
//! unknown used id, a length beyond the buffer, a refused FEATURES_OK, a lost ack byte) ends in a
//! panic that names the queue and the values, so a test fails instead of hanging.
//!
//! Guest memory layout: the rings of queue `i` from `RING_BASE + i * stride` (three 4 KiB-aligned
//! parts), then one buffer area per queue where chain head `h` owns bytes `[h * slot, (h+1) * slot)`.

use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_net::test_utils::ring::{RingLayout, Segment, SplitRing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::bus::BusDevice;
use vmm::virtio::mmio::{self, MmioTransport};
use vmm::virtio::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The mask of feature bit `bit`.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// VERSION_1, MAC, STATUS, MQ, CTRL_VQ, MRG_RXBUF: what a multiqueue Linux guest negotiates
/// at minimum.
pub const DEFAULT_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_NET_F_MAC)
    | feature(VIRTIO_NET_F_STATUS)
    | feature(VIRTIO_NET_F_MQ)
    | feature(VIRTIO_NET_F_CTRL_VQ)
    | feature(VIRTIO_NET_F_MRG_RXBUF);
/// Checksum offload in both directions (add to [`DEFAULT_FEATURES`] as wanted).
pub const CSUM_FEATURES: u64 = feature(VIRTIO_NET_F_CSUM) | feature(VIRTIO_NET_F_GUEST_CSUM);
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = feature(VIRTIO_RING_F_EVENT_IDX);

/// Size of `virtio_net_hdr_v1` (VERSION_1 always carries `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Control reply bytes.
pub const ACK_OK: u8 = VIRTIO_NET_OK as u8;
pub const ACK_ERR: u8 = VIRTIO_NET_ERR as u8;

/// Where the rings start in guest memory.
const RING_BASE: u64 = 0x10_0000;
/// Buffer slots are aligned to this.
const SLOT_ALIGN: u64 = 64;
/// Slot size of control-queue chains (header, data, ack).
const CTRL_SLOT: u64 = 4096;
/// Where control data starts in a control slot (after the 2-byte class/command header).
const CTRL_DATA_OFFSET: u64 = 16;
/// Longest wait on the irq eventfd between two looks at the rings.
const POLL_SLICE: Duration = Duration::from_millis(2);

/// How the driver sets the device up.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Guest memory size in bytes.
    pub mem_size: usize,
    /// Features to negotiate; each must be offered (the driver panics otherwise).
    pub features: u64,
    /// Queue size to program; `None` takes each queue's QueueNumMax.
    pub queue_size: Option<u16>,
    /// Bytes of each receive buffer (one descriptor per buffer). Without MRG_RXBUF a frame
    /// must fit in one buffer, header included.
    pub rx_buf_len: u32,
    /// Bytes of each transmit slot: the 12-byte header plus the largest frame sent.
    pub tx_buf_len: u32,
    /// Bound of every wait (control replies, free tx descriptors).
    pub timeout: Duration,
    /// Notify after every publish, ignoring the device's suppression (NO_NOTIFY / avail_event).
    pub always_notify: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            mem_size: 64 << 20,
            features: DEFAULT_FEATURES,
            queue_size: None,
            rx_buf_len: 2048,
            tx_buf_len: 2048,
            timeout: Duration::from_secs(10),
            always_notify: false,
        }
    }
}

/// A received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// Queue pair (the receive queue is `2 * pair`).
    pub pair: u16,
    /// The `virtio_net_hdr_v1` the device wrote.
    pub hdr: [u8; VNET_HDR_LEN],
    /// The Ethernet frame.
    pub data: Vec<u8>,
    /// Receive buffers the frame used (`num_buffers`, 1 without MRG_RXBUF).
    pub buffers: u16,
}

/// Per receive queue counts since the driver was set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxCount {
    /// Used entries reaped.
    pub used: u64,
    /// Frames reassembled.
    pub frames: u64,
    /// Frame bytes (headers excluded).
    pub bytes: u64,
}

/// One set-up queue: its ring and its buffer area.
#[derive(Debug)]
struct DriverQueue {
    ring: SplitRing,
    buf_base: u64,
    slot: u64,
}

impl DriverQueue {
    fn slot_addr(&self, head: u16) -> GuestAddress {
        GuestAddress(self.buf_base + u64::from(head) * self.slot)
    }
}

/// The driver. Single-threaded: the device's threads only see guest memory and eventfds.
pub struct NetDriver {
    transport: MmioTransport,
    mem: GuestMemoryMmap,
    irq: EventFd,
    cfg: DriverConfig,
    offered: u64,
    negotiated: u64,
    max_pairs: u16,
    queues: Vec<Option<DriverQueue>>,
    ctrl_index: Option<u16>,
    rx_counts: Vec<RxCount>,
    interrupts: u64,
    notifies: u64,
}

impl NetDriver {
    /// Guest memory of `cfg.mem_size` and a virtio-mmio transport around `device`. Nothing is
    /// written to the device yet; see [`NetDriver::init`].
    pub fn new(device: Box<dyn VirtioDevice>, cfg: DriverConfig) -> NetDriver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), cfg.mem_size)])
            .unwrap_or_else(|e| panic!("guest memory of {} bytes: {e}", cfg.mem_size));
        let irq = EventFd::new(EFD_NONBLOCK).expect("irq eventfd");
        let irq_for_transport = irq.try_clone().expect("clone the irq eventfd");
        let transport = MmioTransport::new(device, mem.clone(), irq_for_transport)
            .unwrap_or_else(|e| panic!("virtio-mmio transport: {e}"));
        NetDriver {
            transport,
            mem,
            irq,
            cfg,
            offered: 0,
            negotiated: 0,
            max_pairs: 0,
            queues: Vec::new(),
            ctrl_index: None,
            rx_counts: Vec::new(),
            interrupts: 0,
            notifies: 0,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Registers.

    /// Reads a 32-bit register.
    pub fn reg_read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Writes a 32-bit register.
    pub fn reg_write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The device status register.
    pub fn status(&mut self) -> u32 {
        self.reg_read(mmio::REG_STATUS)
    }

    fn write_status(&mut self, status: u32) {
        self.reg_write(mmio::REG_STATUS, status);
    }

    /// The 64 feature bits the device offers (both selector pages).
    pub fn device_features(&mut self) -> u64 {
        self.reg_write(mmio::REG_DEVICE_FEATURES_SEL, 0);
        let low = self.reg_read(mmio::REG_DEVICE_FEATURES);
        self.reg_write(mmio::REG_DEVICE_FEATURES_SEL, 1);
        let high = self.reg_read(mmio::REG_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    // -----------------------------------------------------------------------------------------
    // Bring-up.

    /// Reset, feature negotiation, queue setup, DRIVER_OK. Returns the negotiated features.
    pub fn init(&mut self) -> u64 {
        let features = self.negotiate();
        self.setup_queues();
        self.driver_ok();
        features
    }

    /// Checks the identification registers, resets the device and negotiates
    /// `cfg.features` up to FEATURES_OK (read back). Returns the negotiated features.
    pub fn negotiate(&mut self) -> u64 {
        let magic = self.reg_read(mmio::REG_MAGIC);
        assert_eq!(magic, mmio::MMIO_MAGIC, "virtio-mmio magic {magic:#x}");
        let version = self.reg_read(mmio::REG_VERSION);
        assert_eq!(version, 2, "virtio-mmio version {version} (want 2, modern)");
        let id = self.reg_read(mmio::REG_DEVICE_ID);
        assert_eq!(id, 1, "device id {id} is not a network card");

        self.reset();
        self.write_status(mmio::STATUS_ACKNOWLEDGE);
        self.write_status(mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER);
        self.offered = self.device_features();
        let wanted = self.cfg.features;
        let missing = wanted & !self.offered;
        assert!(
            missing == 0,
            "device does not offer features {missing:#x} (offers {:#x}, wanted {wanted:#x})",
            self.offered
        );
        assert!(
            wanted & feature(VIRTIO_F_VERSION_1) != 0,
            "this driver is virtio 1.x only: VERSION_1 must be among the features"
        );
        self.reg_write(mmio::REG_DRIVER_FEATURES_SEL, 0);
        self.reg_write(mmio::REG_DRIVER_FEATURES, wanted as u32);
        self.reg_write(mmio::REG_DRIVER_FEATURES_SEL, 1);
        self.reg_write(mmio::REG_DRIVER_FEATURES, (wanted >> 32) as u32);
        let status = mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER | mmio::STATUS_FEATURES_OK;
        self.write_status(status);
        let read_back = self.status();
        assert!(
            read_back & mmio::STATUS_FEATURES_OK != 0,
            "device refused features {wanted:#x}: status reads {read_back:#x} after FEATURES_OK"
        );
        self.negotiated = wanted;
        self.max_pairs = if self.has(VIRTIO_NET_F_MQ) {
            let n = self.max_virtqueue_pairs();
            assert!(n >= 1, "MQ negotiated but max_virtqueue_pairs is {n}");
            n
        } else {
            1
        };
        wanted
    }

    fn has(&self, bit: u32) -> bool {
        self.negotiated & feature(bit) != 0
    }

    /// Sets up rx/tx of every pair and the control queue if negotiated.
    pub fn setup_queues(&mut self) {
        let pairs = usize::from(self.max_pairs);
        self.ctrl_index = self.has(VIRTIO_NET_F_CTRL_VQ).then_some(2 * self.max_pairs);
        let count = 2 * pairs + usize::from(self.ctrl_index.is_some());
        let event_idx = self.has(VIRTIO_RING_F_EVENT_IDX);
        let mut sizes = Vec::with_capacity(count);
        for index in 0..count as u16 {
            self.reg_write(mmio::REG_QUEUE_SEL, u32::from(index));
            let ready = self.reg_read(mmio::REG_QUEUE_READY);
            assert_eq!(ready, 0, "queue {index} is ready before setup");
            let max = self.reg_read(mmio::REG_QUEUE_NUM_MAX);
            assert!(max > 0, "queue {index} is not available (QueueNumMax 0)");
            let max = u16::try_from(max)
                .unwrap_or_else(|_| panic!("queue {index}: QueueNumMax {max} beyond 32768"));
            let size = self.cfg.queue_size.unwrap_or(max);
            assert!(
                size <= max && size.is_power_of_two(),
                "queue {index}: size {size} (QueueNumMax {max})"
            );
            sizes.push(size);
        }
        // Rings first, then buffer areas.
        let mut next = RING_BASE;
        let mut layouts = Vec::with_capacity(count);
        for &size in &sizes {
            let layout = RingLayout::at(GuestAddress(next), size);
            next += layout.footprint().next_multiple_of(4096);
            layouts.push(layout);
        }
        let mut queues = Vec::with_capacity(count);
        for (index, layout) in layouts.into_iter().enumerate() {
            let index = index as u16;
            let slot = if Some(index) == self.ctrl_index {
                CTRL_SLOT
            } else if index.is_multiple_of(2) {
                u64::from(self.cfg.rx_buf_len)
            } else {
                u64::from(self.cfg.tx_buf_len)
            }
            .div_ceil(SLOT_ALIGN)
                * SLOT_ALIGN;
            let buf_base = next;
            next += slot * u64::from(layout.size);
            assert!(
                next <= self.cfg.mem_size as u64,
                "guest memory of {} bytes is too small for {count} queues (queue {index} needs up to {next:#x}); raise DriverConfig::mem_size",
                self.cfg.mem_size
            );
            self.program_queue(index, layout);
            queues.push(Some(DriverQueue {
                ring: SplitRing::new(&self.mem, index, layout, event_idx),
                buf_base,
                slot,
            }));
        }
        self.queues = queues;
        self.rx_counts = vec![RxCount::default(); pairs];
    }

    fn program_queue(&mut self, index: u16, layout: RingLayout) {
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        self.reg_write(mmio::REG_QUEUE_SEL, u32::from(index));
        self.reg_write(mmio::REG_QUEUE_NUM, u32::from(layout.size));
        let (lo, hi) = split(layout.desc);
        self.reg_write(mmio::REG_QUEUE_DESC_LOW, lo);
        self.reg_write(mmio::REG_QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(layout.avail);
        self.reg_write(mmio::REG_QUEUE_DRIVER_LOW, lo);
        self.reg_write(mmio::REG_QUEUE_DRIVER_HIGH, hi);
        let (lo, hi) = split(layout.used);
        self.reg_write(mmio::REG_QUEUE_DEVICE_LOW, lo);
        self.reg_write(mmio::REG_QUEUE_DEVICE_HIGH, hi);
        self.reg_write(mmio::REG_QUEUE_READY, 1);
        let ready = self.reg_read(mmio::REG_QUEUE_READY);
        assert_eq!(ready, 1, "queue {index} does not read back ready");
    }

    /// Sets DRIVER_OK and checks the device accepted it (activation may fail: the transport
    /// then sets DEVICE_NEEDS_RESET).
    pub fn driver_ok(&mut self) {
        let ok = mmio::STATUS_ACKNOWLEDGE
            | mmio::STATUS_DRIVER
            | mmio::STATUS_FEATURES_OK
            | mmio::STATUS_DRIVER_OK;
        self.write_status(ok);
        let status = self.status();
        assert_eq!(
            status,
            ok,
            "status {status:#x} after DRIVER_OK (DEVICE_NEEDS_RESET = {:#x}: activation failed)",
            mmio::STATUS_DEVICE_NEEDS_RESET
        );
    }

    /// Device reset (status 0, read back); forgets every queue.
    pub fn reset(&mut self) {
        self.write_status(0);
        let status = self.status();
        assert_eq!(status, 0, "status {status:#x} after writing 0 (reset)");
        self.queues.clear();
        self.ctrl_index = None;
    }

    // -----------------------------------------------------------------------------------------
    // Accessors.

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    /// Features offered by the device (read during [`NetDriver::negotiate`]).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features in force.
    pub fn negotiated_features(&self) -> u64 {
        self.negotiated
    }

    /// Queue pairs set up (max_virtqueue_pairs with MQ, else 1).
    pub fn max_pairs(&self) -> u16 {
        self.max_pairs
    }

    /// Index of the control queue, if set up.
    pub fn ctrl_queue_index(&self) -> Option<u16> {
        self.ctrl_index
    }

    /// Counts of the receive queue of `pair`.
    pub fn rx_count(&self, pair: u16) -> RxCount {
        self.rx_counts[usize::from(pair)]
    }

    /// Interrupts seen (eventfd counts) and QueueNotify writes made.
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    fn queue(&self, index: u16) -> &DriverQueue {
        self.queues
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("queue {index} is not set up"))
    }

    fn queue_mut(&mut self, index: u16) -> &mut DriverQueue {
        self.split(index).1
    }

    /// Guest memory and queue `index`, borrowed together.
    fn split(&mut self, index: u16) -> (&GuestMemoryMmap, &mut DriverQueue) {
        let q = self
            .queues
            .get_mut(usize::from(index))
            .and_then(Option::as_mut)
            .unwrap_or_else(|| panic!("queue {index} is not set up"));
        (&self.mem, q)
    }

    /// The device's used index of queue `index`, straight from guest memory.
    pub fn device_used_idx(&self, index: u16) -> u16 {
        self.queue(index).ring.device_used_idx(&self.mem)
    }

    /// The ring state of queue `index`, for messages.
    pub fn describe_queue(&self, index: u16) -> String {
        self.queue(index).ring.describe(&self.mem)
    }

    // -----------------------------------------------------------------------------------------
    // Config space.

    /// `len` bytes of the device config space at `offset`, read until the config generation
    /// is stable around the read.
    pub fn config_read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        for _ in 0..100 {
            let before = self.reg_read(mmio::REG_CONFIG_GENERATION);
            let mut data = vec![0u8; len];
            self.transport.read(mmio::REG_CONFIG + offset, &mut data);
            if self.reg_read(mmio::REG_CONFIG_GENERATION) == before {
                return data;
            }
        }
        panic!("config generation kept changing while reading {len} bytes at {offset}");
    }

    fn config_u16(&mut self, offset: u64) -> u16 {
        let b = self.config_read(offset, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn mac(&mut self) -> [u8; 6] {
        let b = self.config_read(0, 6);
        [b[0], b[1], b[2], b[3], b[4], b[5]]
    }

    /// The `status` field (VIRTIO_NET_S_LINK_UP = 1).
    pub fn link_status(&mut self) -> u16 {
        self.config_u16(6)
    }

    pub fn max_virtqueue_pairs(&mut self) -> u16 {
        self.config_u16(8)
    }

    pub fn mtu(&mut self) -> u16 {
        self.config_u16(10)
    }

    // -----------------------------------------------------------------------------------------
    // Notifications and interrupts.

    /// Publishes what was added to queue `index` and notifies the device if it wants it.
    fn publish(&mut self, index: u16) {
        let always = self.cfg.always_notify;
        let (mem, q) = self.split(index);
        let published = q.ring.publish(mem);
        let notify = q.ring.needs_notify(mem);
        if published > 0 && (notify || always) {
            self.notify(index);
        }
    }

    /// Writes QueueNotify for queue `index`.
    pub fn notify(&mut self, index: u16) {
        self.reg_write(mmio::REG_QUEUE_NOTIFY, u32::from(index));
        self.notifies += 1;
    }

    /// InterruptStatus (INT_VRING = 1, INT_CONFIG = 2).
    pub fn interrupt_status(&mut self) -> u32 {
        self.reg_read(mmio::REG_INTERRUPT_STATUS)
    }

    /// InterruptACK for `bits`.
    pub fn ack_interrupt(&mut self, bits: u32) {
        self.reg_write(mmio::REG_INTERRUPT_ACK, bits);
    }

    /// Waits up to `max` for the irq eventfd; if it fired, reads and acks InterruptStatus and
    /// returns the status bits seen (0 if it did not fire).
    pub fn wait_interrupt(&mut self, max: Duration) -> u32 {
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(max.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return 0;
        }
        if let Ok(count) = self.irq.read() {
            self.interrupts += count;
        }
        let status = self.interrupt_status();
        if status != 0 {
            self.ack_interrupt(status);
        }
        status
    }

    /// Calls `done` until it returns true or `timeout` passes, sleeping on the irq eventfd
    /// (at most a few ms at a time) in between. Returns whether `done` became true.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&mut NetDriver) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.wait_interrupt(POLL_SLICE.min(deadline - now));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Receive.

    /// Makes up to `count` receive buffers available on pair `pair` (fewer if the ring is
    /// full) and notifies. Returns how many were added.
    pub fn post_rx(&mut self, pair: u16, count: usize) -> usize {
        let index = 2 * pair;
        let len = self.cfg.rx_buf_len;
        let mem = self.mem.clone();
        let q = self.queue_mut(index);
        let mut added = 0;
        while added < count {
            let Some(head) = q.ring.peek_head() else {
                break;
            };
            let seg = Segment::writable(q.slot_addr(head), len);
            if q.ring.add(&mem, &[seg]).is_none() {
                break;
            }
            added += 1;
        }
        if added > 0 {
            self.publish(index);
        }
        added
    }

    /// Fills the receive ring of `pair` with buffers. Returns how many were added.
    pub fn fill_rx(&mut self, pair: u16) -> usize {
        self.post_rx(pair, usize::MAX)
    }

    /// Takes every complete received frame of `pair` off its used ring. The buffers are not
    /// made available again (see [`NetDriver::post_rx`]).
    pub fn reap_rx(&mut self, pair: u16) -> Vec<RxFrame> {
        let mut frames = Vec::new();
        self.reap_rx_with(pair, |hdr, data, buffers| {
            frames.push(RxFrame {
                pair,
                hdr: *hdr,
                data: data.to_vec(),
                buffers,
            })
        });
        frames
    }

    /// Like [`NetDriver::reap_rx`], handing each frame to `each` (header, frame, buffers)
    /// instead of collecting it. Returns the number of frames.
    pub fn reap_rx_with(
        &mut self,
        pair: u16,
        mut each: impl FnMut(&[u8; VNET_HDR_LEN], &[u8], u16),
    ) -> usize {
        let index = 2 * pair;
        let mrg = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let mem = self.mem.clone();
        let mut counts = self.rx_counts[usize::from(pair)];
        let q = self.queue_mut(index);
        let mut frame = Vec::new();
        let mut n = 0;
        while let Some(first) = q.ring.peek_used(&mem, 0) {
            let len = first.len as usize;
            assert!(
                len >= VNET_HDR_LEN,
                "rx queue {index}: used entry (head {}) of {len} bytes, shorter than the {VNET_HDR_LEN}-byte header",
                first.head
            );
            let mut hdr = [0u8; VNET_HDR_LEN];
            mem.read_slice(&mut hdr, q.slot_addr(first.head))
                .expect("header in guest memory");
            let buffers = if mrg {
                u16::from_le_bytes([hdr[10], hdr[11]])
            } else {
                1
            };
            assert!(
                buffers >= 1 && buffers <= q.ring.size(),
                "rx queue {index}: num_buffers {buffers} in the header of head {} (queue size {})",
                first.head,
                q.ring.size()
            );
            if q.ring.used_pending(&mem) < buffers {
                // The rest of the frame is not published yet.
                break;
            }
            frame.clear();
            for k in 0..buffers {
                let used = q.ring.pop_used(&mem).expect("entry counted as pending");
                let skip = if k == 0 { VNET_HDR_LEN } else { 0 };
                let len = used.len as usize;
                let start = frame.len();
                frame.resize(start + len - skip.min(len), 0);
                mem.read_slice(
                    &mut frame[start..],
                    GuestAddress(q.slot_addr(used.head).0 + skip as u64),
                )
                .expect("rx buffer in guest memory");
                counts.used += 1;
            }
            counts.frames += 1;
            counts.bytes += frame.len() as u64;
            each(&hdr, &frame, buffers);
            n += 1;
        }
        self.rx_counts[usize::from(pair)] = counts;
        n
    }

    // -----------------------------------------------------------------------------------------
    // Transmit.

    /// Adds one frame (zeroed 12-byte header, then `frame`) to the transmit queue of `pair`
    /// without publishing it. Returns false if the ring has no free descriptor.
    pub fn queue_tx(&mut self, pair: u16, frame: &[u8]) -> bool {
        self.queue_tx_with_header(pair, &[0; VNET_HDR_LEN], frame)
    }

    /// Like [`NetDriver::queue_tx`] with a caller-made header (checksum or GSO requests).
    pub fn queue_tx_with_header(
        &mut self,
        pair: u16,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> bool {
        let index = 2 * pair + 1;
        let total = VNET_HDR_LEN + frame.len();
        let mem = self.mem.clone();
        let q = self.queue_mut(index);
        assert!(
            total as u64 <= q.slot,
            "tx frame of {} bytes does not fit a {}-byte slot; raise DriverConfig::tx_buf_len",
            frame.len(),
            q.slot
        );
        let Some(head) = q.ring.peek_head() else {
            return false;
        };
        let addr = q.slot_addr(head);
        mem.write_slice(hdr, addr)
            .expect("tx header in guest memory");
        mem.write_slice(frame, GuestAddress(addr.0 + VNET_HDR_LEN as u64))
            .expect("tx frame in guest memory");
        q.ring
            .add(&mem, &[Segment::readable(addr, total as u32)])
            .is_some()
    }

    /// Publishes the frames queued on `pair` and notifies the device if it wants it.
    pub fn flush_tx(&mut self, pair: u16) {
        self.publish(2 * pair + 1);
    }

    /// Sends one frame on `pair`: reclaims finished transmissions, waits (bounded) for a free
    /// descriptor if the ring is full, queues, publishes and notifies.
    pub fn send(&mut self, pair: u16, frame: &[u8]) {
        self.reap_tx(pair);
        if !self.queue_tx(pair, frame) {
            let index = 2 * pair + 1;
            let timeout = self.cfg.timeout;
            let freed = self.wait_until(timeout, |d| d.reap_tx(pair) > 0);
            assert!(
                freed,
                "tx ring full for {timeout:?}: {}",
                self.describe_queue(index)
            );
            assert!(
                self.queue_tx(pair, frame),
                "tx descriptor freed but not usable"
            );
        }
        self.flush_tx(pair);
    }

    /// Reclaims transmit chains the device has used. Returns how many.
    pub fn reap_tx(&mut self, pair: u16) -> usize {
        let mem = self.mem.clone();
        let q = self.queue_mut(2 * pair + 1);
        let mut n = 0;
        while q.ring.pop_used(&mem).is_some() {
            n += 1;
        }
        n
    }

    /// Transmit chains of `pair` not yet returned by the device.
    pub fn tx_in_flight(&self, pair: u16) -> u16 {
        self.queue(2 * pair + 1).ring.in_flight()
    }

    /// Waits (bounded by `timeout`) until the device has returned every transmit chain of
    /// `pair`. Returns whether it did.
    pub fn wait_tx_done(&mut self, pair: u16, timeout: Duration) -> bool {
        self.wait_until(timeout, |d| {
            d.reap_tx(pair);
            d.tx_in_flight(pair) == 0
        })
    }

    // -----------------------------------------------------------------------------------------
    // Control queue.

    /// Sends a control command (class, command, `data`) and waits (bounded) for the device's
    /// reply byte. Panics if the device does not answer in time or returns the chain without
    /// writing a valid ack.
    pub fn ctrl_command(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        let index = self
            .ctrl_index
            .unwrap_or_else(|| panic!("no control queue (CTRL_VQ not negotiated)"));
        let mem = self.mem.clone();
        let q = self.queue_mut(index);
        assert!(
            q.ring.in_flight() == 0,
            "a control command is still in flight: {}",
            q.ring.describe(&mem)
        );
        assert!(
            CTRL_DATA_OFFSET + (data.len() as u64) < q.slot,
            "control data of {} bytes is too long",
            data.len()
        );
        let head = q
            .ring
            .peek_head()
            .expect("control ring has free descriptors");
        let base = q.slot_addr(head).0;
        let ack_addr = GuestAddress(base + q.slot - 1);
        mem.write_slice(&[class, command], GuestAddress(base))
            .expect("control header in guest memory");
        mem.write_slice(data, GuestAddress(base + CTRL_DATA_OFFSET))
            .expect("control data in guest memory");
        // A value no reply has: shows whether the device wrote the ack.
        mem.write_obj(0xeeu8, ack_addr)
            .expect("ack byte in guest memory");
        let mut segs = vec![Segment::readable(GuestAddress(base), 2)];
        if !data.is_empty() {
            segs.push(Segment::readable(
                GuestAddress(base + CTRL_DATA_OFFSET),
                data.len() as u32,
            ));
        }
        segs.push(Segment::writable(ack_addr, 1));
        let added = q.ring.add(&mem, &segs);
        assert_eq!(added, Some(head), "control chain not added");
        self.publish(index);

        let timeout = self.cfg.timeout;
        let mut used = None;
        let answered = self.wait_until(timeout, |d| {
            let (mem, q) = d.split(index);
            used = q.ring.pop_used(mem);
            used.is_some()
        });
        assert!(
            answered,
            "no reply to control command class {class} command {command} data {data:02x?} within {timeout:?}: {}",
            self.describe_queue(index)
        );
        let used = used.expect("answered");
        assert_eq!(used.head, head, "control reply for another chain");
        let ack: u8 = mem.read_obj(ack_addr).expect("ack byte in guest memory");
        assert!(
            used.len >= 1 && (ack == ACK_OK || ack == ACK_ERR),
            "control command class {class} command {command}: used length {}, ack byte {ack:#x}",
            used.len
        );
        ack
    }

    /// VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET(`n`): returns the ack byte ([`ACK_OK`] or [`ACK_ERR`]).
    pub fn set_queue_pairs(&mut self, n: u16) -> u8 {
        self.ctrl_command(
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            &n.to_le_bytes(),
        )
    }
}

/// Builds a `virtio_net_hdr_v1` (little endian fields).
pub fn vnet_hdr(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

#[cfg(test)]
mod tests;
