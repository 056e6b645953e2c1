//! The common configuration structure (`struct virtio_pci_common_cfg`) and the device-status
//! state machine behind it. It mirrors the virtio-mmio transport's: the same handshake order,
//! feature pages, FEATURES_OK validation (a subset of what was offered, VERSION_1 included),
//! queue setup only between FEATURES_OK and DRIVER_OK, activation with the ready queues, and
//! DEVICE_NEEDS_RESET when activation fails. What PCI adds: MSI-X vectors per queue and for
//! configuration changes, queue notifications at `queue_notify_off` of the notify region, and
//! bus-master enable: the device only runs while the function may access guest memory.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::super::mmio::{
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK,
};
use super::super::{Interrupt, VirtioDevice};
use crate::pci::msix::MsixVectors;

pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const CONFIG_GENERATION: u64 = 0x15;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;
/// virtio 1.2 fields, only meaningful with features this transport does not offer
/// (NOTIF_CONFIG_DATA, RING_RESET); they read as 0.
pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
pub const QUEUE_RESET: u64 = 0x3a;
/// Size of the structure up to and including `queue_reset`.
pub const COMMON_CFG_LEN: u64 = 0x3c;

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// ISR status bits (read-to-clear).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// How the device's notifications reach the driver: the MSI-X vector each queue and the
/// configuration change map to, and the ISR byte. Called from device threads; lock-free.
pub struct PciInterrupt {
    vectors: Arc<MsixVectors>,
    queue_vectors: Box<[AtomicU16]>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    config_generation: AtomicU8,
}

impl PciInterrupt {
    pub fn new(vectors: Arc<MsixVectors>, queues: usize) -> PciInterrupt {
        PciInterrupt {
            vectors,
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
        }
    }

    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// Reading the ISR clears it.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Sets an ISR cause bit. Every worker thread signals through this one byte, so the
    /// read-modify-write (which takes the cache line exclusively) only happens when the bit
    /// is not set yet; once set, it stays set until the driver's read clears it.
    fn set_isr(&self, bit: u8) {
        if self.isr.load(Ordering::Acquire) & bit == 0 {
            self.isr.fetch_or(bit, Ordering::AcqRel);
        }
    }

    fn send(&self, vector: u16) -> std::io::Result<()> {
        // NO_VECTOR: the driver wants no interrupt for this source (there is no INTx).
        if vector == NO_VECTOR {
            return Ok(());
        }
        self.vectors.trigger(vector)
    }

    fn reset(&self) {
        for vector in self.queue_vectors.iter() {
            vector.store(NO_VECTOR, Ordering::Release);
        }
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        self.isr.store(0, Ordering::Release);
    }
}

impl Interrupt for PciInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()> {
        self.set_isr(ISR_QUEUE);
        self.send(self.queue_vector(usize::from(queue_index)))
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.set_isr(ISR_CONFIG);
        self.send(self.config_vector())
    }
}

pub struct CommonConfig {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<PciInterrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    msix_vectors: u16,
    queue_select: u16,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u8,
    activated: bool,
    /// Bus-master enable of the function's command register.
    bus_master: bool,
}

impl CommonConfig {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<PciInterrupt>,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        msix_vectors: u16,
    ) -> CommonConfig {
        CommonConfig {
            device,
            mem,
            interrupt,
            queues,
            kicks,
            msix_vectors,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            bus_master: false,
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// The guest changed bus-master enable in the command register. Without it the function
    /// may not access guest memory, so, as QEMU's virtio-pci does, a running device is stopped
    /// (device reset) and DRIVER_OK leaves the status: the driver has to initialise the device
    /// again. A DRIVER_OK written while bus mastering is off takes effect when it comes on
    /// (Linux enables bus mastering before it starts the handshake).
    pub fn set_bus_master(&mut self, enabled: bool) {
        if enabled == self.bus_master {
            return;
        }
        self.bus_master = enabled;
        if enabled {
            if self.status & STATUS_DRIVER_OK as u8 != 0 && !self.activated {
                self.activate();
            }
            return;
        }
        if self.activated {
            log::info!("virtio-pci: bus mastering turned off while the device runs: device stopped, driver must reset it");
            self.device.reset();
            self.activated = false;
        }
        self.status &= !(STATUS_DRIVER_OK as u8);
    }

    /// A write to queue `queue`'s notify address that reached us (no ioeventfd caught it).
    /// Kicks it whatever the status: a notify caught by the ioeventfd latches in the eventfd
    /// until the device reads it after activation, and one that exits here (the BAR moving,
    /// an ioeventfd KVM refused, the PCI_CFG window) must not behave differently.
    pub fn notify(&self, queue: usize) {
        match self.kicks.get(queue) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    log::error!("virtio-pci: cannot kick queue {queue}: {e}");
                }
            }
            None => log::warn!("virtio-pci: notify of nonexistent queue {queue}"),
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK as u8 != 0 && self.status & STATUS_DRIVER_OK as u8 == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.read_field(offset, data.len());
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()[..data.len()]),
            None => {
                log::debug!(
                    "virtio-pci: {}-byte read of common config at {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn read_field(&self, offset: u64, len: usize) -> Option<u64> {
        let queue = self.selected_queue();
        let value = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_features_select),
            (DEVICE_FEATURE, 4) => match self.device_features_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_features_select),
            (DRIVER_FEATURE, 4) => match self.driver_features_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.interrupt.config_vector()),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.status),
            (CONFIG_GENERATION, 1) => u64::from(self.interrupt.config_generation()),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            // A size of 0 tells the driver the queue does not exist.
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size())),
            (QUEUE_MSIX_VECTOR, 2) => {
                u64::from(self.interrupt.queue_vector(usize::from(self.queue_select)))
            }
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready())),
            // Notify addresses: one per queue, at queue index x the notify multiplier.
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| u64::from(self.queue_select)),
            (QUEUE_DESC..=0x37, 4 | 8) => {
                let q = queue?;
                let address = match offset & !7 {
                    QUEUE_DESC => q.desc_table(),
                    QUEUE_DRIVER => q.avail_ring(),
                    QUEUE_DEVICE => q.used_ring(),
                    _ => return None,
                };
                match (offset & 7, len) {
                    (0, 8) => address,
                    (0, 4) => address & 0xffff_ffff,
                    (4, 4) => address >> 32,
                    _ => return None,
                }
            }
            (QUEUE_NOTIFY_DATA | QUEUE_RESET, 2) => 0,
            _ => return None,
        };
        Some(value)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 8 {
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_features_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_features_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.valid_vector(value as u16);
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => self.set_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.valid_vector(value as u16);
                match self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    Some(slot) => slot.store(vector, Ordering::Release),
                    None => log::warn!(
                        "virtio-pci: MSI-X vector written for nonexistent queue {}",
                        self.queue_select
                    ),
                }
            }
            (QUEUE_SIZE, 2) | (QUEUE_ENABLE, 2) | (QUEUE_DESC..=0x37, 4 | 8) => {
                self.write_queue_field(offset, data.len(), value)
            }
            (QUEUE_RESET, 2) if value == 0 => {}
            _ => log::debug!(
                "virtio-pci: {}-byte write of {value:#x} to common config at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    /// The vector the device will use: the one asked for if the table has it, else NO_VECTOR
    /// (which the driver reads back to learn that the mapping failed).
    fn valid_vector(&self, vector: u16) -> u16 {
        if vector == NO_VECTOR || vector < self.msix_vectors {
            vector
        } else {
            log::warn!(
                "virtio-pci: MSI-X vector {vector} does not exist ({} vectors)",
                self.msix_vectors
            );
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let driver = STATUS_DRIVER as u8;
        let features_ok = STATUS_FEATURES_OK as u8;
        if self.status & driver == 0 || self.status & features_ok != 0 {
            log::warn!(
                "virtio-pci: driver features written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            page => {
                if value != 0 {
                    log::warn!("virtio-pci: driver acked features {value:#x} in page {page}");
                }
            }
        }
    }

    fn write_queue_field(&mut self, offset: u64, len: usize, value: u64) {
        if !self.queue_setup_allowed() {
            log::warn!(
                "virtio-pci: queue field {offset:#x} written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let select = self.queue_select;
        let Some(queue) = self.queues.get_mut(usize::from(select)) else {
            log::warn!(
                "virtio-pci: queue field {offset:#x} written for nonexistent queue {select}"
            );
            return;
        };
        match offset {
            QUEUE_SIZE => queue.set_size(value as u16),
            QUEUE_ENABLE => {
                if value == 1 {
                    queue.set_ready(true);
                } else {
                    log::warn!("virtio-pci: queue_enable {value} for queue {select} ignored (only 1 is defined)");
                }
            }
            _ => {
                let (low, high) = match (offset & 7, len) {
                    (0, 8) => (Some(value as u32), Some((value >> 32) as u32)),
                    (0, 4) => (Some(value as u32), None),
                    (4, 4) => (None, Some(value as u32)),
                    _ => {
                        log::warn!("virtio-pci: {len}-byte write at {offset:#x} straddles a queue address; ignored");
                        return;
                    }
                };
                match offset & !7 {
                    QUEUE_DESC => queue.set_desc_table_address(low, high),
                    QUEUE_DRIVER => queue.set_avail_ring_address(low, high),
                    QUEUE_DEVICE => queue.set_used_ring_address(low, high),
                    _ => {}
                }
            }
        }
    }

    fn reset(&mut self) {
        // From FEATURES_OK on the device holds negotiated features, and a failed activation
        // may have left state behind; the device's reset is idempotent when nothing runs.
        if self.activated || self.status & STATUS_FEATURES_OK as u8 != 0 {
            self.device.reset();
        }
        self.activated = false;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.reset();
    }

    fn set_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if new & STATUS_FAILED as u8 != 0 {
            self.status |= STATUS_FAILED as u8;
            return;
        }
        if new & old != old {
            log::warn!("virtio-pci: driver cleared status bits ({old:#x} -> {new:#x}); ignored");
            return;
        }
        let handshake = [
            STATUS_ACKNOWLEDGE as u8,
            STATUS_DRIVER as u8,
            STATUS_FEATURES_OK as u8,
            STATUS_DRIVER_OK as u8,
        ];
        let set: Vec<bool> = handshake.iter().map(|bit| new & bit != 0).collect();
        if set.windows(2).any(|w| !w[0] && w[1]) {
            log::warn!(
                "virtio-pci: status {new:#x} skips a step of the handshake (was {old:#x}); ignored"
            );
            return;
        }
        let known = handshake.iter().fold(0, |acc, bit| acc | bit);
        if new & !known & !(STATUS_DEVICE_NEEDS_RESET as u8) != 0 {
            log::warn!(
                "virtio-pci: driver set unknown status bits {:#x}; ignored",
                new & !known
            );
        }
        let added = new & !old;
        if added & STATUS_FEATURES_OK as u8 != 0 && !self.accept_features() {
            self.status = old | (new & (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u8);
            return;
        }
        self.status = old | (new & known);
        if added & STATUS_DRIVER_OK as u8 != 0 {
            if self.bus_master {
                self.activate();
            } else {
                log::warn!("virtio-pci: DRIVER_OK while bus mastering is off: the device starts when the driver turns it on");
            }
        }
    }

    fn accept_features(&mut self) -> bool {
        let offered = self.device.features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            log::warn!("virtio-pci: driver acked features {unknown:#x} that were not offered");
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            log::warn!("virtio-pci: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)");
            return false;
        }
        self.device.set_acked_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.mem) {
                log::error!("virtio-pci: queue {index} is ready but its rings are invalid (size {}, desc {:#x}, avail {:#x}, used {:#x})",
                    queue.size(), queue.desc_table(), queue.avail_ring(), queue.used_ring());
                self.fail_activation();
                return;
            }
            queue.set_event_idx(event_idx);
            let kick = match self.kicks[index].try_clone() {
                Ok(kick) => kick,
                Err(e) => {
                    log::error!("virtio-pci: cannot clone the kick eventfd of queue {index}: {e}");
                    self.fail_activation();
                    return;
                }
            };
            // The device gets its own copy; ours is reset with the transport.
            let queue = match Queue::try_from(queue.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    log::error!("virtio-pci: queue {index} state is invalid: {e}");
                    self.fail_activation();
                    return;
                }
            };
            queues.push((index as u16, queue, kick));
        }
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        match self.device.activate(self.mem.clone(), interrupt, queues) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("virtio-pci: device activation failed: {e}");
                self.fail_activation();
            }
        }
    }

    fn fail_activation(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET as u8;
        if let Err(e) = self.interrupt.signal_config() {
            log::error!("virtio-pci: cannot signal DEVICE_NEEDS_RESET: {e}");
        }
    }
}
