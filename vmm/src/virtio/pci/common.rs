//! The common configuration structure (`struct virtio_pci_common_cfg`): its fields decoded onto
//! the device-status state machine both transports share ([`TransportState`]: handshake order,
//! feature pages, FEATURES_OK validation, queue setup only between FEATURES_OK and DRIVER_OK,
//! activation with the ready queues, DEVICE_NEEDS_RESET when activation fails). What PCI adds:
//! MSI-X vectors per queue and for configuration changes, queue notifications at
//! `queue_notify_off` of the notify region, and bus-master enable: the device only runs while
//! the function may access guest memory.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::super::transport::TransportState;
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
    state: TransportState,
    interrupt: Arc<PciInterrupt>,
    msix_vectors: u16,
}

impl CommonConfig {
    /// The fields over `state`; `msix_vectors` is the size of the MSI-X table.
    pub fn new(state: TransportState, interrupt: Arc<PciInterrupt>, msix_vectors: u16) -> Self {
        CommonConfig {
            state,
            interrupt,
            msix_vectors,
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.state.device()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.state.device_mut()
    }

    pub fn kicks(&self) -> &[EventFd] {
        self.state.kicks()
    }

    pub fn status(&self) -> u8 {
        self.state.status()
    }

    /// The guest changed bus-master enable in the command register (see
    /// [`TransportState::set_bus_master`]).
    pub fn set_bus_master(&mut self, enabled: bool) {
        self.state.set_bus_master(enabled);
    }

    /// A write to queue `queue`'s notify address that reached us (no ioeventfd caught it:
    /// the BAR moving, an ioeventfd KVM refused, the PCI_CFG window). It kicks like the
    /// ioeventfd would, whatever the status.
    pub fn notify(&self, queue: usize) {
        self.state.notify(queue);
    }

    fn queue_select(&self) -> u16 {
        self.state.queue_select as u16
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
        let queue = self.state.selected_queue();
        let value = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.state.device_features_select),
            (DEVICE_FEATURE, 4) => u64::from(self.state.device_features_word()),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.state.driver_features_select),
            (DRIVER_FEATURE, 4) => u64::from(self.state.driver_features_word()),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.interrupt.config_vector()),
            (NUM_QUEUES, 2) => self.state.queue_count() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.state.status()),
            (CONFIG_GENERATION, 1) => u64::from(self.interrupt.config_generation()),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select()),
            // A size of 0 tells the driver the queue does not exist.
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size())),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(
                self.interrupt
                    .queue_vector(usize::from(self.queue_select())),
            ),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready())),
            // Notify addresses: one per queue, at queue index x the notify multiplier.
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| u64::from(self.queue_select())),
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
            (DEVICE_FEATURE_SELECT, 4) => self.state.device_features_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.state.driver_features_select = value as u32,
            (DRIVER_FEATURE, 4) => self.state.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.valid_vector(value as u16);
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => {
                self.state.set_status(value as u8);
                if value == 0 {
                    self.interrupt.reset();
                }
            }
            (QUEUE_SELECT, 2) => self.state.queue_select = u32::from(value as u16),
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.valid_vector(value as u16);
                let select = self.queue_select();
                match self.interrupt.queue_vectors.get(usize::from(select)) {
                    Some(slot) => slot.store(vector, Ordering::Release),
                    None => log::warn!(
                        "virtio-pci: MSI-X vector written for nonexistent queue {select}"
                    ),
                }
            }
            (QUEUE_SIZE, 2) | (QUEUE_ENABLE, 2) | (QUEUE_DESC..=0x37, 4 | 8) => {
                self.write_queue_field(offset, data.len(), value)
            }
            (QUEUE_RESET, 2) if value == 0 => {}
            (QUEUE_RESET, 2) if value == 1 => {
                let select = usize::from(self.queue_select());
                self.state.reset_queue(select);
            }
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

    fn write_queue_field(&mut self, offset: u64, len: usize, value: u64) {
        let select = self.queue_select();
        let Some(queue) = self.state.queue_mut(offset) else {
            return;
        };
        match offset {
            QUEUE_SIZE => queue.set_size(value as u16),
            QUEUE_ENABLE => {
                if value == 1 {
                    queue.set_ready(true);
                    self.state.enable_reset_queue(usize::from(select));
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
}
