//! virtio-pci transport, modern (virtio 1.x, non-transitional) with MSI-X.
//!
//! One PCI function per device (vendor 0x1af4, device 0x1040 + virtio device id, revision 1)
//! with a single 64-bit memory BAR:
//!
//! ```text
//! BAR 0 offset  region                       capability
//! 0x0000        common configuration         VIRTIO_PCI_CAP_COMMON_CFG
//! 0x1000        ISR status (1 byte)          VIRTIO_PCI_CAP_ISR_CFG
//! 0x2000        device configuration         VIRTIO_PCI_CAP_DEVICE_CFG
//! 0x3000        notify: queue q at 4 * q     VIRTIO_PCI_CAP_NOTIFY_CFG (multiplier 4)
//! 0x4000        MSI-X table                  MSI-X capability
//! after it      MSI-X pending bits (page aligned)
//! ```
//!
//! plus a VIRTIO_PCI_CAP_PCI_CFG window (BAR access through configuration space).
//!
//! Queue notifications: each queue's notify address is an ioeventfd (matching the address
//! only, any write length), registered wherever the BAR is decoded and moved when the guest
//! relocates it; a notify write that reaches the transport (no ioeventfd, e.g. while the BAR
//! moves) kicks the same eventfd. Interrupts: every queue and the configuration change have
//! their own MSI-X vector (`queue_msix_vector`, `config_msix_vector`), each vector its own
//! irqfd and KVM MSI route, so the driver needs no ISR read and no acknowledgement, and each
//! queue's interrupt goes to whichever vCPU the guest aims that vector at. There is no INTx
//! (interrupt pin 0): Linux's virtio-pci driver only falls back to it when MSI-X fails. The
//! ISR byte is still kept (read-to-clear) for completeness.
//!
//! Bus-master enable (PCI command bit 2) gates everything the function does to guest memory:
//! while it is off the device does not run (turning it off stops a running device and clears
//! DRIVER_OK, as QEMU does) and MSI-X messages wait in the pending bits.

mod common;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{self, TransportState};
use super::VirtioDevice;
use crate::pci::config::{self, ConfigSpace, Identity, COMMAND, COMMAND_MEMORY};
use crate::pci::msix::{self, Msix};
use crate::pci::{PciDevice, PciPlatform};

use common::PciInterrupt;
pub use common::{COMMON_CFG_LEN, NO_VECTOR};

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern devices: 0x1040 + virtio device id.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The spec asks non-transitional devices for revision 1 or higher and a subsystem id of
/// 0x40 or higher.
pub const VIRTIO_PCI_REVISION: u8 = 1;
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x0040;

/// Vendor-specific capability and its virtio `cfg_type`s.
const CAP_VENDOR_SPECIFIC: u8 = 0x09;
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;
/// `struct virtio_pci_cap` without the id and next bytes: cap_len, cfg_type, bar, id,
/// 2 padding bytes, offset, length.
const CAP_BODY_LEN: usize = 14;
/// Offsets of the PCI_CFG capability's fields from its start.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

pub const BAR_INDEX: u8 = 0;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const ISR_LEN: u64 = 1;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
const PAGE: u64 = 0x1000;
/// The notify region has one page.
pub const MAX_QUEUES: usize = (PAGE / NOTIFY_OFF_MULTIPLIER as u64) as usize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device offers {0} queues; virtio-pci here supports at most {MAX_QUEUES}")]
    TooManyQueues(usize),
    #[error("{irqfds} irqfds given for {vectors} MSI-X vectors")]
    Irqfds { irqfds: usize, vectors: usize },
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error(transparent)]
    Msix(#[from] msix::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
}

/// Where the function's BAR starts and how its MSI-X vectors reach KVM.
pub struct PciTransportConfig {
    /// Initial (firmware) address of BAR 0, aligned to [`bar_size`].
    pub bar_address: u64,
    /// Vector `i` is GSI `msi_gsi_base + i`.
    pub msi_gsi_base: u32,
    /// One irqfd per vector ([`vector_count`]), registered for its GSI.
    pub irqfds: Vec<EventFd>,
}

/// MSI-X vectors for a device with `queues` queues: one per queue and one for configuration
/// changes.
pub fn vector_count(queues: usize) -> usize {
    queues + 1
}

fn page_align(len: u64) -> u64 {
    len.div_ceil(PAGE) * PAGE
}

fn pba_offset(vectors: usize) -> u64 {
    MSIX_TABLE_OFFSET + page_align(vectors as u64 * msix::ENTRY_SIZE)
}

/// Size of BAR 0 for `vectors` MSI-X vectors (a power of two).
pub fn bar_size(vectors: usize) -> u64 {
    let pba_len = vectors.div_ceil(64) as u64 * 8;
    (pba_offset(vectors) + page_align(pba_len)).next_power_of_two()
}

fn class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network, Ethernet
        _ => 0xff_00_00, // unclassified
    }
}

fn virtio_cap(cfg_type: u8, cap_len: u8, offset: u64, length: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(CAP_BODY_LEN + 4);
    body.extend_from_slice(&[cap_len, cfg_type, BAR_INDEX, 0, 0, 0]);
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body
}

pub struct VirtioPciDevice {
    config: ConfigSpace,
    msix: Msix,
    msix_cap: usize,
    pci_cfg_cap: usize,
    bar_size: u64,
    pba_offset: u64,
    common: common::CommonConfig,
    interrupt: Arc<PciInterrupt>,
    platform: Arc<dyn PciPlatform>,
    /// The address each queue's ioeventfd is registered at, if it is.
    ioevents: Vec<Option<u64>>,
}

impl VirtioPciDevice {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        transport: PciTransportConfig,
        platform: Arc<dyn PciPlatform>,
    ) -> Result<VirtioPciDevice, Error> {
        let queue_count = device.queue_max_sizes().len();
        if queue_count > MAX_QUEUES {
            return Err(Error::TooManyQueues(queue_count));
        }
        let vectors = vector_count(queue_count);
        if transport.irqfds.len() != vectors {
            return Err(Error::Irqfds {
                irqfds: transport.irqfds.len(),
                vectors,
            });
        }
        let msix = Msix::new(transport.irqfds, transport.msi_gsi_base, platform.clone())?;
        let interrupt = Arc::new(PciInterrupt::new(msix.vectors(), queue_count));

        let device_type = device.device_type();
        // Bus mastering is off until the driver turns it on (pci_set_master).
        let state = TransportState::new("virtio-pci", device, mem, interrupt.clone(), false)?;
        let mut config = ConfigSpace::new(&Identity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision_id: VIRTIO_PCI_REVISION,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        let bar_size = bar_size(vectors);
        let pba_offset = pba_offset(vectors);
        config.add_memory_bar64(usize::from(BAR_INDEX), transport.bar_address, bar_size)?;
        // As firmware leaves it: memory decode on at the assigned address.
        config.set(COMMAND, &COMMAND_MEMORY.to_le_bytes());

        let notify_len = queue_count as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        config.add_capability(
            CAP_VENDOR_SPECIFIC,
            &virtio_cap(CAP_COMMON_CFG, 16, COMMON_OFFSET, COMMON_CFG_LEN),
            &[],
        )?;
        let mut notify = virtio_cap(CAP_NOTIFY_CFG, 20, NOTIFY_OFFSET, notify_len);
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(CAP_VENDOR_SPECIFIC, &notify, &[])?;
        config.add_capability(
            CAP_VENDOR_SPECIFIC,
            &virtio_cap(CAP_ISR_CFG, 16, ISR_OFFSET, ISR_LEN),
            &[],
        )?;
        config.add_capability(
            CAP_VENDOR_SPECIFIC,
            &virtio_cap(CAP_DEVICE_CFG, 16, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
            &[],
        )?;
        // PCI_CFG: the driver writes bar, offset and length, then accesses pci_cfg_data.
        let mut pci_cfg = virtio_cap(CAP_PCI_CFG, 20, 0, 0);
        pci_cfg.extend_from_slice(&[0; 4]);
        let mut pci_cfg_writable = vec![0u8; pci_cfg.len()];
        pci_cfg_writable[PCI_CFG_BAR - 2] = 0xff;
        pci_cfg_writable[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_cap =
            config.add_capability(CAP_VENDOR_SPECIFIC, &pci_cfg, &pci_cfg_writable)?;
        let (body, writable) =
            msix.capability(BAR_INDEX, MSIX_TABLE_OFFSET as u32, pba_offset as u32);
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &body, &writable)?;

        let msix_count = msix.count();
        Ok(VirtioPciDevice {
            config,
            msix,
            msix_cap,
            pci_cfg_cap,
            bar_size,
            pba_offset,
            common: common::CommonConfig::new(state, interrupt.clone(), msix_count),
            interrupt,
            platform,
            ioevents: vec![None; queue_count],
        })
    }

    /// One eventfd per queue; the ioeventfd of its notify address.
    pub fn queue_kicks(&self) -> &[EventFd] {
        self.common.kicks()
    }

    pub fn status(&self) -> u8 {
        self.common.status()
    }

    pub fn bar_size(&self) -> u64 {
        self.bar_size
    }

    fn region_read(&mut self, offset: u64, data: &mut [u8]) {
        let table_end = MSIX_TABLE_OFFSET + self.msix.table_len();
        let pba_end = self.pba_offset + self.msix.pba_len();
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_LEN => self.common.read(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = self.interrupt.take_isr();
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => self
                .common
                .device()
                .read_config(o - DEVICE_CFG_OFFSET, data),
            o if (MSIX_TABLE_OFFSET..table_end).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (self.pba_offset..pba_end).contains(&o) => {
                self.msix.pba_read(o - self.pba_offset, data)
            }
            _ => data.fill(0),
        }
    }

    fn region_write(&mut self, offset: u64, data: &[u8]) {
        let notify_end =
            NOTIFY_OFFSET + self.ioevents.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        let table_end = MSIX_TABLE_OFFSET + self.msix.table_len();
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_LEN => self.common.write(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => self
                .common
                .device_mut()
                .write_config(o - DEVICE_CFG_OFFSET, data),
            o if (NOTIFY_OFFSET..notify_end).contains(&o) => {
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.common.notify(queue as usize);
            }
            o if (MSIX_TABLE_OFFSET..table_end).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => log::debug!(
                "virtio-pci: {}-byte write at BAR offset {offset:#x} ignored",
                data.len()
            ),
        }
    }

    /// The BAR access a PCI_CFG capability describes: (offset, length) if valid.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + PCI_CFG_BAR);
        let offset = u64::from(self.config.read_u32(cap + PCI_CFG_OFFSET));
        let len = self.config.read_u32(cap + PCI_CFG_LENGTH) as usize;
        let valid = bar == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset % len as u64 == 0
            && offset + len as u64 <= self.bar_size;
        if !valid {
            log::debug!(
                "virtio-pci: PCI_CFG access to BAR {bar} offset {offset:#x} length {len} refused"
            );
        }
        valid.then_some((offset, len))
    }

    fn touches(&self, offset: usize, len: usize, field: usize, field_len: usize) -> bool {
        ConfigSpace::overlaps(offset, len, field, field_len)
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let data_field = self.pci_cfg_cap + PCI_CFG_DATA;
        if self.touches(offset, data.len(), data_field, 4) {
            let mut window = [0u8; 4];
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                self.region_read(bar_offset, &mut window[..len]);
            }
            self.config.set(data_field, &window);
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if self.touches(offset, data.len(), COMMAND, 2) {
            // MSI-X first: turning bus mastering off holds interrupts back before the device
            // stops, turning it on lets them out before a deferred activation.
            let bus_master = self.config.bus_master_enabled();
            self.msix.set_bus_master(bus_master);
            self.common.set_bus_master(bus_master);
        }
        let control = self.msix_cap + 2;
        if self.touches(offset, data.len(), control, 2) {
            let value = self.config.read_u16(control);
            self.msix.set_control(value);
        }
        let data_field = self.pci_cfg_cap + PCI_CFG_DATA;
        if self.touches(offset, data.len(), data_field, 4) {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut window = [0u8; 4];
                self.config.read(data_field, &mut window);
                self.region_write(bar_offset, &window[..len]);
            }
        }
    }

    fn memory_bars(&self) -> Option<Vec<(u8, u64, u64)>> {
        self.config
            .memory_enabled()
            .then(|| self.config.memory_bars())
    }

    fn bar_mapped(&mut self, bar: u8, address: Option<u64>) {
        if bar != BAR_INDEX {
            return;
        }
        let kicks = self.common.kicks();
        for (queue, kick) in kicks.iter().enumerate() {
            let wanted = address
                .map(|a| a + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER));
            if self.ioevents[queue] == wanted {
                continue;
            }
            if let Some(old) = self.ioevents[queue] {
                // Forgotten only once KVM let go of it. Until then it stays on record (retried
                // at the next BAR change) and no second one is registered: notifies at the
                // new address exit to us and kick the same eventfd.
                if let Err(e) = self.platform.unregister_ioevent(kick, old) {
                    log::error!(
                        "virtio-pci: cannot remove the ioeventfd of queue {queue} at {old:#x} (retried when the BAR next changes): {e}"
                    );
                    continue;
                }
                self.ioevents[queue] = None;
            }
            if let Some(new) = wanted {
                match self.platform.register_ioevent(kick, new) {
                    Ok(()) => self.ioevents[queue] = Some(new),
                    Err(e) => log::error!(
                        "virtio-pci: cannot register the ioeventfd of queue {queue} at {new:#x} (its notifications now exit to mqvmm): {e}"
                    ),
                }
            }
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == BAR_INDEX {
            self.region_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == BAR_INDEX {
            self.region_write(offset, data);
        }
    }
}
