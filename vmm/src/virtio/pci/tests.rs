//! The virtio-pci transport driven the way Linux's virtio_pci_modern driver drives it, through
//! configuration space and BAR accesses, without KVM (a recorder stands in for it).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::common::*;
use super::*;
use crate::bus::BusDevice;
use crate::pci::config::{
    BAR0, CAPABILITIES_POINTER, COMMAND_BUS_MASTER, STATUS, STATUS_CAPABILITIES_LIST,
};
use crate::pci::msix::{CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
use crate::pci::testing::{Call, Recorder};
use crate::pci::{MsiMessage, PciConfigIo, PciMmioWindow, PciRoot};
use crate::virtio::testing::{FakeDevice, Record, FEATURES};
use crate::virtio::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_FEATURES_OK,
};
use crate::virtio::Interrupt;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_net::features::bit;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const BAR: u64 = 0xe000_0000;
const GSI_BASE: u32 = 24;
const ACK_DRIVER: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
const FEATURES_OK: u8 = ACK_DRIVER | STATUS_FEATURES_OK;

struct Harness {
    dev: VirtioPciDevice,
    /// The guest memory the device sees (shared, not a copy).
    mem: GuestMemoryMmap,
    record: Arc<Mutex<Record>>,
    platform: Arc<Recorder>,
    /// Our copies of the four vectors' irqfds.
    irqfds: Vec<EventFd>,
}

fn harness(fail_activate: bool) -> Harness {
    harness_offering(fail_activate, 0)
}

/// A harness whose device also offers `extra` features.
fn harness_offering(fail_activate: bool, extra: u64) -> Harness {
    let (mut device, record) = FakeDevice::new(fail_activate);
    device.offered |= extra;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irqfds: Vec<EventFd> = (0..vector_count(3))
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let ours = irqfds.iter().map(|e| e.try_clone().unwrap()).collect();
    let platform = Arc::new(Recorder::default());
    let mut dev = VirtioPciDevice::new(
        Box::new(device),
        mem.clone(),
        PciTransportConfig {
            bar_address: BAR,
            msi_gsi_base: GSI_BASE,
            irqfds,
        },
        platform.clone(),
    )
    .unwrap();
    // What Linux's virtio_pci_probe does before the virtio handshake: pci_enable_device
    // (memory decode) and pci_set_master.
    dev.config_write(
        COMMAND,
        &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
    );
    Harness {
        dev,
        mem,
        record,
        platform,
        irqfds: ours,
    }
}

impl Harness {
    fn cfg8(&mut self, offset: usize) -> u8 {
        let mut d = [0u8; 1];
        self.dev.config_read(offset, &mut d);
        d[0]
    }
    fn cfg16(&mut self, offset: usize) -> u16 {
        let mut d = [0u8; 2];
        self.dev.config_read(offset, &mut d);
        u16::from_le_bytes(d)
    }
    fn cfg32(&mut self, offset: usize) -> u32 {
        let mut d = [0u8; 4];
        self.dev.config_read(offset, &mut d);
        u32::from_le_bytes(d)
    }
    fn set_cfg(&mut self, offset: usize, data: &[u8]) {
        self.dev.config_write(offset, data);
    }
    /// Memory decoding stays on; bus mastering as `enabled` says (pci_set_master,
    /// pci_clear_master).
    fn set_bus_master(&mut self, enabled: bool) {
        let bits = COMMAND_MEMORY | if enabled { COMMAND_BUS_MASTER } else { 0 };
        self.set_cfg(COMMAND, &bits.to_le_bytes());
    }
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        self.dev.bar_read(0, offset, &mut d[..len]);
        u64::from_le_bytes(d)
    }
    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }
    fn common(&mut self, field: u64, len: usize) -> u64 {
        self.read(COMMON_OFFSET + field, len)
    }
    fn set_common(&mut self, field: u64, len: usize, value: u64) {
        self.write(COMMON_OFFSET + field, len, value);
    }
    fn status(&mut self) -> u8 {
        self.common(DEVICE_STATUS, 1) as u8
    }
    fn set_status(&mut self, status: u8) {
        self.set_common(DEVICE_STATUS, 1, u64::from(status));
    }
    fn set_features(&mut self, features: u64) {
        self.set_common(DRIVER_FEATURE_SELECT, 4, 0);
        self.set_common(DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.set_common(DRIVER_FEATURE_SELECT, 4, 1);
        self.set_common(DRIVER_FEATURE, 4, features >> 32);
    }
    fn bring_up(&mut self, features: u64) {
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(ACK_DRIVER);
        self.set_features(features);
        self.set_status(FEATURES_OK);
    }
    /// Queue `index` with rings at `base` (size 16), 64-bit address writes in two halves as
    /// Linux does them.
    fn setup_queue(&mut self, index: u16, base: u64) {
        self.set_common(QUEUE_SELECT, 2, u64::from(index));
        self.set_common(QUEUE_SIZE, 2, 16);
        for (field, addr) in [
            (QUEUE_DESC, base),
            (QUEUE_DRIVER, base + 0x1000),
            (QUEUE_DEVICE, base + 0x2000),
        ] {
            self.set_common(field, 4, addr & 0xffff_ffff);
            self.set_common(field + 4, 4, addr >> 32);
        }
        self.set_common(QUEUE_ENABLE, 2, 1);
    }
    fn fired(&self, vector: usize) -> u64 {
        self.irqfds[vector].read().unwrap_or(0)
    }
    fn interrupt(&self) -> Arc<dyn Interrupt> {
        self.record.lock().unwrap().interrupt.clone().unwrap()
    }
    /// MSI-X on, every vector unmasked and aimed at 0xfee00000 with data 0x30 + vector.
    fn enable_msix(&mut self) {
        let control = self.dev.msix_cap + 2;
        self.set_cfg(control, &CONTROL_ENABLE.to_le_bytes());
        for v in 0..4u64 {
            let entry = MSIX_TABLE_OFFSET + v * 16;
            self.write(entry, 4, 0xfee0_0000);
            self.write(entry + 4, 4, 0);
            self.write(entry + 8, 4, 0x30 + v);
            self.write(entry + 12, 4, 0);
        }
    }
}

/// (offset, cap id, cfg_type for vendor caps) of every capability, walked as a driver does.
fn capabilities(h: &mut Harness) -> Vec<(usize, u8, u8)> {
    let mut caps = Vec::new();
    let mut at = usize::from(h.cfg8(CAPABILITIES_POINTER));
    while at != 0 {
        assert!(caps.len() < 48, "capability list loops");
        assert_eq!(at % 4, 0, "capability at {at:#x} is not dword aligned");
        let id = h.cfg8(at);
        let cfg_type = if id == 0x09 { h.cfg8(at + 3) } else { 0 };
        caps.push((at, id, cfg_type));
        at = usize::from(h.cfg8(at + 1));
    }
    caps
}

fn find_virtio_cap(h: &mut Harness, cfg_type: u8) -> usize {
    capabilities(h)
        .into_iter()
        .find(|c| c.1 == 0x09 && c.2 == cfg_type)
        .unwrap_or_else(|| panic!("no virtio capability of cfg_type {cfg_type}"))
        .0
}

#[test]
fn identifies_as_a_modern_virtio_net_function() {
    let mut h = harness(false);
    assert_eq!(h.cfg16(0), 0x1af4);
    assert_eq!(h.cfg16(2), 0x1041);
    assert_eq!(h.cfg8(0x08), 1, "revision");
    assert_eq!(h.cfg32(0x08) >> 8, 0x02_00_00, "Ethernet controller");
    assert_eq!(h.cfg16(0x2c), 0x1af4);
    assert!(h.cfg16(0x2e) >= 0x40);
    assert_eq!(h.cfg8(0x0e), 0, "single-function type-0 header");
    assert_eq!(h.cfg8(0x3d), 0, "no INTx pin");
    assert_ne!(h.cfg16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
}

#[test]
fn capability_list_describes_every_region_of_bar0() {
    let mut h = harness(false);
    let caps = capabilities(&mut h);
    let kinds: Vec<(u8, u8)> = caps.iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(
        kinds,
        vec![
            (0x09, CAP_COMMON_CFG),
            (0x09, CAP_NOTIFY_CFG),
            (0x09, CAP_ISR_CFG),
            (0x09, CAP_DEVICE_CFG),
            (0x09, CAP_PCI_CFG),
            (0x11, 0)
        ]
    );
    // (cap_len, bar, offset, length) of each virtio capability.
    let mut regions = Vec::new();
    for &(at, id, _) in &caps {
        if id == 0x09 {
            regions.push((
                h.cfg8(at + 2),
                h.cfg8(at + 4),
                h.cfg32(at + 8),
                h.cfg32(at + 12),
            ));
        }
    }
    assert_eq!(
        regions,
        vec![
            (16, 0, 0x0000, COMMON_CFG_LEN as u32),
            (20, 0, 0x3000, 3 * 4),
            (16, 0, 0x1000, 1),
            (16, 0, 0x2000, 0x1000),
            (20, 0, 0, 0),
        ]
    );
    let notify = find_virtio_cap(&mut h, CAP_NOTIFY_CFG);
    assert_eq!(h.cfg32(notify + 16), NOTIFY_OFF_MULTIPLIER);
    // MSI-X: 4 vectors (3 queues + config), table and PBA in BAR 0, disabled.
    let msix = caps.last().unwrap().0;
    let control = h.cfg16(msix + 2);
    assert_eq!(control & 0x7ff, 3, "table size - 1");
    assert_eq!(control & 0xc000, 0);
    assert_eq!(h.cfg32(msix + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(h.cfg32(msix + 8), 0x5000);
    // Every region lies inside the BAR.
    let bar_size = h.dev.bar_size();
    for (_, _, offset, length) in regions {
        assert!(u64::from(offset) + u64::from(length) <= bar_size);
    }
    assert!(0x5000 + 8 <= bar_size);
}

#[test]
fn bar0_is_a_64_bit_memory_bar_that_sizes_and_relocates() {
    let mut h = harness(false);
    assert_eq!(h.cfg32(BAR0), BAR as u32 | 0b100);
    assert_eq!(h.cfg32(BAR0 + 4), 0);
    assert_eq!(h.dev.memory_bars(), Some(vec![(0, BAR, 0x8000)]));
    h.set_cfg(BAR0, &u32::MAX.to_le_bytes());
    h.set_cfg(BAR0 + 4, &u32::MAX.to_le_bytes());
    let size = !((u64::from(h.cfg32(BAR0 + 4)) << 32) | u64::from(h.cfg32(BAR0) & !0xf)) + 1;
    assert_eq!(size, h.dev.bar_size());
    h.set_cfg(BAR0, &((BAR as u32) + 0x10_0000).to_le_bytes());
    h.set_cfg(BAR0 + 4, &0u32.to_le_bytes());
    assert_eq!(
        h.dev.memory_bars(),
        Some(vec![(0, BAR + 0x10_0000, 0x8000)])
    );
    h.set_cfg(0x04, &0u16.to_le_bytes());
    assert_eq!(h.dev.memory_bars(), None, "memory decode off");
    // Other BARs read 0.
    for bar in 2..6 {
        h.set_cfg(BAR0 + 4 * bar, &u32::MAX.to_le_bytes());
        assert_eq!(h.cfg32(BAR0 + 4 * bar), 0);
    }
}

#[test]
fn feature_pages_queue_count_and_sizes() {
    let mut h = harness(false);
    h.set_common(DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(h.common(DEVICE_FEATURE, 4), FEATURES & 0xffff_ffff);
    h.set_common(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(h.common(DEVICE_FEATURE, 4), FEATURES >> 32);
    assert_eq!(h.common(DEVICE_FEATURE_SELECT, 4), 1);
    h.set_common(DEVICE_FEATURE_SELECT, 4, 2);
    assert_eq!(h.common(DEVICE_FEATURE, 4), 0);
    assert_eq!(h.common(NUM_QUEUES, 2), 3);
    h.set_common(QUEUE_SELECT, 2, 2);
    assert_eq!(h.common(QUEUE_SIZE, 2), 64);
    assert_eq!(h.common(QUEUE_NOTIFY_OFF, 2), 2);
    assert_eq!(h.common(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    h.set_common(QUEUE_SELECT, 2, 3);
    assert_eq!(h.common(QUEUE_SIZE, 2), 0, "nonexistent queue has size 0");
    assert_eq!(h.common(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.common(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
}

#[test]
fn full_bring_up_activates_ready_queues_with_event_idx() {
    let mut h = harness(false);
    h.bring_up(FEATURES);
    assert_eq!(h.status(), FEATURES_OK);
    assert_eq!(h.record.lock().unwrap().acked, Some(FEATURES));
    h.setup_queue(0, 0x10000);
    h.setup_queue(2, 0x20000);
    h.set_common(QUEUE_SELECT, 2, 0);
    assert_eq!(h.common(QUEUE_ENABLE, 2), 1);
    assert_eq!(h.common(QUEUE_SIZE, 2), 16);
    assert_eq!(h.common(QUEUE_DRIVER, 4), 0x11000);
    assert_eq!(h.common(QUEUE_DEVICE, 8), 0x12000);
    h.set_status(0xf);
    assert_eq!(h.status(), 0xf);
    assert_eq!(
        h.record.lock().unwrap().activations,
        vec![vec![(0, 16, true), (2, 16, true)]]
    );
}

#[test]
fn features_ok_refused_for_unoffered_or_legacy_features() {
    let mut h = harness(false);
    h.bring_up(FEATURES | 1 << 40);
    assert_eq!(h.status(), ACK_DRIVER);
    assert_eq!(h.record.lock().unwrap().acked, None);
    let mut h = harness(false);
    h.bring_up(0x21);
    assert_eq!(h.status() & STATUS_FEATURES_OK, 0, "no VERSION_1");
}

#[test]
fn out_of_order_status_and_late_queue_writes_are_ignored() {
    let mut h = harness(false);
    h.set_status(STATUS_ACKNOWLEDGE | 4);
    assert_eq!(h.status(), 0);
    h.setup_queue(0, 0x10000);
    h.set_common(QUEUE_SELECT, 2, 0);
    assert_eq!(
        h.common(QUEUE_ENABLE, 2),
        0,
        "queue fields before FEATURES_OK"
    );
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    h.set_common(QUEUE_SELECT, 2, 0);
    h.set_common(QUEUE_SIZE, 2, 8);
    assert_eq!(h.common(QUEUE_SIZE, 2), 16, "after DRIVER_OK");
    h.set_features(bit(VIRTIO_F_VERSION_1));
    assert_eq!(h.record.lock().unwrap().acked, Some(FEATURES));
    h.set_status(STATUS_ACKNOWLEDGE);
    assert_eq!(h.status(), 0xf, "clearing bits without reset");
    // Wrong widths are refused, not a panic.
    h.set_common(DEVICE_STATUS, 4, 0);
    assert_eq!(h.status(), 0xf);
    assert_eq!(h.common(NUM_QUEUES, 4), 0);
    h.set_common(QUEUE_DESC + 4, 8, 0);
}

#[test]
fn invalid_rings_or_failed_activation_set_needs_reset_and_signal_config() {
    let mut h = harness(false);
    h.enable_msix();
    h.bring_up(FEATURES);
    h.set_common(CONFIG_MSIX_VECTOR, 2, 3);
    h.setup_queue(0, 0x1000_0000);
    h.set_status(0xf);
    assert_ne!(h.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(h.record.lock().unwrap().activations.is_empty());
    assert_eq!(h.fired(3), 1, "configuration change vector");
    assert_eq!(h.read(ISR_OFFSET, 1) as u8 & ISR_CONFIG, ISR_CONFIG);

    let mut h = harness(true);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    assert_ne!(h.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn reset_returns_to_initial_state_and_resets_the_device() {
    let mut h = harness(false);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_common(QUEUE_MSIX_VECTOR, 2, 1);
    h.set_common(CONFIG_MSIX_VECTOR, 2, 0);
    h.set_status(0xf);
    h.set_status(0);
    assert_eq!(h.status(), 0);
    assert_eq!(h.record.lock().unwrap().resets, 1);
    h.set_common(QUEUE_SELECT, 2, 0);
    assert_eq!(h.common(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.common(QUEUE_SIZE, 2), 256, "size back to the maximum");
    assert_eq!(h.common(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(h.common(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    h.bring_up(FEATURES);
    h.setup_queue(1, 0x30000);
    h.set_status(0xf);
    assert_eq!(h.record.lock().unwrap().activations.len(), 2);
    // Before FEATURES_OK the device has nothing to forget.
    let mut h = harness(false);
    h.set_status(ACK_DRIVER);
    h.set_status(0);
    assert_eq!(h.record.lock().unwrap().resets, 0);
    // After FEATURES_OK it has acked features, after a failed activation maybe more.
    h.bring_up(FEATURES);
    h.set_status(0);
    assert_eq!(
        h.record.lock().unwrap().resets,
        1,
        "reset after FEATURES_OK"
    );
    let mut h = harness(true);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    assert_ne!(h.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    h.set_status(0);
    assert_eq!(
        h.record.lock().unwrap().resets,
        1,
        "reset after a failed activation"
    );
}

#[test]
fn each_queue_interrupts_through_its_own_vector_and_irqfd() {
    let mut h = harness(false);
    h.enable_msix();
    h.bring_up(FEATURES);
    h.set_common(CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(h.common(CONFIG_MSIX_VECTOR, 2), 0);
    for (queue, vector) in [(0u16, 1u64), (1, 2), (2, 9)] {
        h.setup_queue(queue, 0x10000 * (u64::from(queue) + 1));
        h.set_common(QUEUE_MSIX_VECTOR, 2, vector);
    }
    // Vector 9 does not exist: the driver reads back NO_VECTOR.
    assert_eq!(h.common(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    h.set_status(0xf);
    let irq = h.interrupt();
    let gen = h.common(CONFIG_GENERATION, 1);
    irq.signal_used_queue(0).unwrap();
    irq.signal_used_queue(1).unwrap();
    irq.signal_used_queue(1).unwrap();
    irq.signal_used_queue(2).unwrap();
    assert_eq!(
        [h.fired(0), h.fired(1), h.fired(2), h.fired(3)],
        [0, 1, 2, 0]
    );
    irq.signal_config().unwrap();
    assert_eq!(h.fired(0), 1);
    assert_eq!(h.common(CONFIG_GENERATION, 1), gen + 1);
    // Routes went to KVM once per vector, GSI = base + vector.
    let routes: Vec<Call> = h
        .platform
        .take()
        .into_iter()
        .filter(|c| matches!(c, Call::Route(..)))
        .collect();
    assert_eq!(routes.len(), 4);
    assert!(routes.contains(&Call::Route(
        GSI_BASE + 2,
        MsiMessage {
            address: 0xfee0_0000,
            data: 0x32
        }
    )));
    // ISR: both causes, cleared by the read.
    assert_eq!(h.read(ISR_OFFSET, 1) as u8, ISR_QUEUE | ISR_CONFIG);
    assert_eq!(h.read(ISR_OFFSET, 1), 0);
}

#[test]
fn isr_keeps_each_cause_until_read_and_sets_it_again_after() {
    let mut h = harness(false);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    let irq = h.interrupt();
    irq.signal_used_queue(0).unwrap();
    irq.signal_used_queue(0).unwrap();
    assert_eq!(h.read(ISR_OFFSET, 1) as u8, ISR_QUEUE);
    assert_eq!(h.read(ISR_OFFSET, 1), 0, "read clears");
    irq.signal_used_queue(0).unwrap();
    irq.signal_config().unwrap();
    assert_eq!(
        h.read(ISR_OFFSET, 1) as u8,
        ISR_QUEUE | ISR_CONFIG,
        "a set queue bit does not hide the config cause"
    );
    irq.signal_config().unwrap();
    irq.signal_used_queue(0).unwrap();
    assert_eq!(h.read(ISR_OFFSET, 1) as u8, ISR_QUEUE | ISR_CONFIG);
}

#[test]
fn masked_vectors_show_in_the_pba_and_fire_when_unmasked() {
    let mut h = harness(false);
    h.enable_msix();
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_common(QUEUE_MSIX_VECTOR, 2, 1);
    h.set_status(0xf);
    let control = h.dev.msix_cap + 2;
    h.set_cfg(
        control,
        &(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes(),
    );
    assert_eq!(
        h.cfg16(control) & 0xc000,
        CONTROL_ENABLE | CONTROL_FUNCTION_MASK
    );
    h.interrupt().signal_used_queue(0).unwrap();
    assert_eq!(h.fired(1), 0);
    assert_eq!(h.read(0x5000, 8), 1 << 1, "PBA bit of vector 1");
    h.set_cfg(control, &CONTROL_ENABLE.to_le_bytes());
    assert_eq!(h.fired(1), 1);
    assert_eq!(h.read(0x5000, 8), 0);
    // Per-vector mask through the table in the BAR.
    h.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    h.interrupt().signal_used_queue(0).unwrap();
    assert_eq!((h.fired(1), h.read(0x5000, 8)), (0, 2));
    h.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert_eq!(h.fired(1), 1);
}

#[test]
fn bus_master_off_stops_the_device_and_holds_its_interrupts() {
    let mut h = harness(false);
    h.enable_msix();
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_common(QUEUE_MSIX_VECTOR, 2, 1);
    h.set_status(0xf);
    let irq = h.interrupt();
    h.set_bus_master(false);
    assert_eq!(h.record.lock().unwrap().resets, 1, "the device was stopped");
    assert_eq!(h.status(), FEATURES_OK, "DRIVER_OK is gone");
    irq.signal_used_queue(0).unwrap();
    assert_eq!(h.fired(1), 0, "no MSI-X message without bus mastering");
    assert_eq!(h.read(0x5000, 8), 1 << 1, "held in the PBA");
    h.set_bus_master(true);
    assert_eq!(h.fired(1), 1, "sent once bus mastering is back");
    assert_eq!(
        h.record.lock().unwrap().activations.len(),
        1,
        "bus mastering alone does not restart the device"
    );
    // The driver starts over, as Linux does after a reset.
    h.set_status(0);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    assert_eq!(h.record.lock().unwrap().activations.len(), 2);

    // DRIVER_OK while bus mastering is off: the device starts when it comes on.
    let mut h = harness(false);
    h.set_bus_master(false);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    assert!(h.record.lock().unwrap().activations.is_empty());
    h.set_bus_master(true);
    assert_eq!(h.record.lock().unwrap().activations.len(), 1);
    assert_eq!(h.status(), 0xf);
}

/// Bus mastering off stops the device the way QEMU does: DRIVER_OK leaves the status,
/// FEATURES_OK and the negotiated features stay. DRIVER_OK written again, before or after
/// bus mastering comes back on, restarts the device with those features, not with none.
#[test]
fn bus_master_off_keeps_the_negotiated_features_for_the_restart() {
    // Not everything offered, so that the device cannot pass with its defaults.
    let negotiated = FEATURES & !0x20;
    for driver_ok_first in [false, true] {
        let mut h = harness(false);
        h.bring_up(negotiated);
        h.setup_queue(0, 0x10000);
        h.setup_queue(1, 0x20000);
        h.set_status(0xf);
        h.set_bus_master(false);
        assert_eq!(
            h.status(),
            FEATURES_OK,
            "DRIVER_OK is gone, FEATURES_OK stays"
        );
        assert_eq!(
            h.record.lock().unwrap().acked,
            Some(negotiated),
            "the stopped device holds the features FEATURES_OK stands for"
        );
        if driver_ok_first {
            h.set_status(0xf);
            assert_eq!(h.record.lock().unwrap().activations.len(), 1);
            h.set_bus_master(true);
        } else {
            h.set_bus_master(true);
            assert_eq!(h.record.lock().unwrap().activations.len(), 1);
            h.set_status(0xf);
        }
        assert_eq!(h.status(), 0xf);
        let record = h.record.lock().unwrap();
        assert_eq!(
            record.activated_features,
            vec![negotiated, negotiated],
            "driver_ok_first {driver_ok_first}"
        );
        assert_eq!(record.activations[1], record.activations[0]);
    }
}

/// The restart after a bus-master-off stop resumes each ring where the device left it, at
/// the used index it wrote to guest memory: the driver keeps its rings across the stop, and
/// a device starting over at 0 would hand it back buffers it already got. A reset starts
/// the rings over.
#[test]
fn restart_after_bus_master_off_resumes_each_ring_at_its_used_index() {
    let mut h = harness(false);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.set_status(0xf);
    // What the running device wrote: the used index of each ring (`setup_queue` puts the
    // used ring at base + 0x2000, its index 2 bytes in), one of them wrapped.
    h.mem
        .write_slice(&5u16.to_le_bytes(), GuestAddress(0x12002))
        .unwrap();
    h.mem
        .write_slice(&0xfffeu16.to_le_bytes(), GuestAddress(0x22002))
        .unwrap();
    h.set_bus_master(false);
    h.set_bus_master(true);
    h.set_status(0xf);
    assert_eq!(
        h.record.lock().unwrap().activated_positions,
        vec![
            vec![(0, 0, 0), (1, 0, 0)],
            vec![(0, 5, 5), (1, 0xfffe, 0xfffe)]
        ]
    );
    h.set_status(0);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    assert_eq!(
        h.record.lock().unwrap().activated_positions[2],
        vec![(0, 0, 0)]
    );
}

#[test]
fn notify_writes_kick_the_queue_at_notify_off_times_multiplier() {
    let mut h = harness(false);
    h.bring_up(FEATURES);
    h.setup_queue(1, 0x10000);
    h.set_common(QUEUE_SELECT, 2, 1);
    let off = h.common(QUEUE_NOTIFY_OFF, 2);
    let addr = NOTIFY_OFFSET + off * u64::from(NOTIFY_OFF_MULTIPLIER);
    h.write(addr, 2, 1);
    assert_eq!(
        h.dev.queue_kicks()[1].read().unwrap(),
        1,
        "a kick before DRIVER_OK latches, as it does in an ioeventfd"
    );
    h.set_status(0xf);
    h.write(addr, 2, 1);
    assert_eq!(h.dev.queue_kicks()[1].read().unwrap(), 1);
    assert!(h.dev.queue_kicks()[0].read().is_err());
    h.write(NOTIFY_OFFSET + 0x100, 2, 0); // past the last queue: ignored
}

#[test]
fn ioeventfds_follow_the_bar_through_sizing_and_relocation() {
    let h = harness(false);
    let kicks: Vec<i32> = h.dev.queue_kicks().iter().map(|k| k.as_raw_fd()).collect();
    let platform = h.platform.clone();
    let mut root = PciRoot::new(0xe000_0000, 0x1000_0000);
    root.add(1, Box::new(h.dev)).unwrap();
    let registered = |base: u64| -> Vec<Call> {
        (0..3)
            .map(|q| Call::Register(kicks[q], base + 0x3000 + 4 * q as u64))
            .collect()
    };
    let unregistered = |base: u64| -> Vec<Call> {
        (0..3)
            .map(|q| Call::Unregister(kicks[q], base + 0x3000 + 4 * q as u64))
            .collect()
    };
    assert_eq!(platform.take(), registered(BAR));
    let root = Arc::new(Mutex::new(root));
    let mut io = PciConfigIo::new(root.clone());
    let cfg_write = |io: &mut PciConfigIo, reg: u32, value: u32| {
        io.write(0, &(0x8000_0000u32 | 1 << 11 | reg).to_le_bytes());
        io.write(4, &value.to_le_bytes());
    };
    // Linux's sizing: decode off, all ones, restore, decode on.
    cfg_write(&mut io, 0x04, 0);
    assert_eq!(platform.take(), unregistered(BAR));
    cfg_write(&mut io, BAR0 as u32, u32::MAX);
    cfg_write(&mut io, BAR0 as u32 + 4, u32::MAX);
    cfg_write(&mut io, BAR0 as u32, BAR as u32);
    cfg_write(&mut io, BAR0 as u32 + 4, 0);
    assert!(platform.take().is_empty());
    cfg_write(&mut io, 0x04, 0x6);
    assert_eq!(platform.take(), registered(BAR));
    // Relocation: the ioeventfds move, and the BAR answers at its new place only.
    let new = BAR + 0x80_0000;
    cfg_write(&mut io, BAR0 as u32, new as u32);
    let mut calls = unregistered(BAR);
    calls.extend(registered(new));
    let mut got = platform.take();
    // One queue at a time: unregister then register.
    got.sort_by_key(|c| matches!(c, Call::Register(..)));
    assert_eq!(got, calls);
    let mut window = PciMmioWindow::new(root, 0xe000_0000);
    let mut d = [0u8; 2];
    window.read(new - 0xe000_0000 + COMMON_OFFSET + NUM_QUEUES, &mut d);
    assert_eq!(u16::from_le_bytes(d), 3);
    window.read(COMMON_OFFSET + NUM_QUEUES, &mut d);
    assert_eq!(d, [0xff, 0xff], "old address answers nothing");
}

#[test]
fn an_ioeventfd_kvm_would_not_remove_stays_on_record_and_is_retried() {
    let mut h = harness(false);
    let kicks: Vec<i32> = h.dev.queue_kicks().iter().map(|k| k.as_raw_fd()).collect();
    let calls = |make: fn(i32, u64) -> Call, base: u64| -> Vec<Call> {
        (0..3)
            .map(|q| make(kicks[q], base + NOTIFY_OFFSET + 4 * q as u64))
            .collect()
    };
    h.dev.bar_mapped(0, Some(BAR));
    assert_eq!(h.platform.take(), calls(Call::Register, BAR));
    let new = BAR + 0x10_0000;
    h.platform.fail_unregister.store(true, Ordering::Relaxed);
    h.dev.bar_mapped(0, Some(new));
    assert_eq!(
        h.platform.take(),
        calls(Call::Unregister, BAR),
        "nothing registered at the new place while the old one is still there"
    );
    // A notify at the new address exits to the transport and still kicks.
    h.write(NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(h.dev.queue_kicks()[1].read().unwrap(), 1);
    // The next BAR change removes the old ones first.
    h.platform.fail_unregister.store(false, Ordering::Relaxed);
    h.dev.bar_mapped(0, None);
    assert_eq!(h.platform.take(), calls(Call::Unregister, BAR));
    h.dev.bar_mapped(0, Some(new));
    assert_eq!(h.platform.take(), calls(Call::Register, new));
}

#[test]
fn device_config_region_is_the_devices_config_space() {
    let mut h = harness(false);
    assert_eq!(h.read(DEVICE_CFG_OFFSET + 6, 2), 0x0706);
    h.write(DEVICE_CFG_OFFSET + 2, 1, 9);
    assert_eq!(h.record.lock().unwrap().config_writes, vec![(2, vec![9])]);
}

#[test]
fn pci_cfg_capability_reaches_bar0() {
    let mut h = harness(false);
    let cap = find_virtio_cap(&mut h, CAP_PCI_CFG);
    h.set_cfg(cap + PCI_CFG_BAR, &[0]);
    h.set_cfg(
        cap + PCI_CFG_OFFSET,
        &((COMMON_OFFSET + NUM_QUEUES) as u32).to_le_bytes(),
    );
    h.set_cfg(cap + PCI_CFG_LENGTH, &2u32.to_le_bytes());
    assert_eq!(h.cfg16(cap + PCI_CFG_DATA), 3);
    // A write through the window: driver status.
    h.set_cfg(
        cap + PCI_CFG_OFFSET,
        &((COMMON_OFFSET + DEVICE_STATUS) as u32).to_le_bytes(),
    );
    h.set_cfg(cap + PCI_CFG_LENGTH, &1u32.to_le_bytes());
    h.set_cfg(cap + PCI_CFG_DATA, &[STATUS_ACKNOWLEDGE]);
    assert_eq!(h.status(), STATUS_ACKNOWLEDGE);
    // Invalid windows (misaligned, other BAR, beyond the BAR) read 0 and write nothing.
    h.set_cfg(
        cap + PCI_CFG_OFFSET,
        &((COMMON_OFFSET + NUM_QUEUES + 1) as u32).to_le_bytes(),
    );
    h.set_cfg(cap + PCI_CFG_LENGTH, &2u32.to_le_bytes());
    assert_eq!(h.cfg16(cap + PCI_CFG_DATA), 0);
    h.set_cfg(cap + PCI_CFG_BAR, &[1]);
    h.set_cfg(
        cap + PCI_CFG_OFFSET,
        &((COMMON_OFFSET + NUM_QUEUES) as u32).to_le_bytes(),
    );
    assert_eq!(h.cfg16(cap + PCI_CFG_DATA), 0);
    h.set_cfg(cap + PCI_CFG_BAR, &[0]);
    h.set_cfg(cap + PCI_CFG_OFFSET, &0xffff_fffeu32.to_le_bytes());
    assert_eq!(h.cfg16(cap + PCI_CFG_DATA), 0);
}

#[test]
fn construction_checks_vectors_and_queues() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let result = VirtioPciDevice::new(
        Box::new(FakeDevice::new(false).0),
        mem,
        PciTransportConfig {
            bar_address: BAR,
            msi_gsi_base: GSI_BASE,
            irqfds: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        },
        Arc::new(Recorder::default()),
    );
    assert!(matches!(
        result,
        Err(Error::Irqfds {
            irqfds: 1,
            vectors: 4
        })
    ));
    assert_eq!(bar_size(4), 0x8000);
    assert_eq!(bar_size(129 + 1), 0x8000);
    assert_eq!(bar_size(1025), 0x10000);
}

#[test]
fn a_queue_reset_alone_is_set_up_again_and_handed_back_to_the_running_device() {
    let ring_reset = bit(virtio_bindings::virtio_config::VIRTIO_F_RING_RESET);
    let mut h = harness_offering(false, ring_reset);
    h.bring_up(FEATURES | ring_reset);
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.set_status(0xf);
    assert_eq!(h.record.lock().unwrap().activations.len(), 1);

    // Linux's vp_modern_set_queue_reset: select, write 1, wait until it reads 0.
    h.set_common(QUEUE_SELECT, 2, 1);
    h.set_common(QUEUE_RESET, 2, 1);
    assert_eq!(
        h.common(QUEUE_RESET, 2),
        0,
        "reset done before the write returned"
    );
    assert_eq!(h.common(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.common(QUEUE_SIZE, 2), 256, "back to the maximum size");
    assert_eq!(h.record.lock().unwrap().queue_resets, [1]);
    // Set up again with another size and rings while the device runs, then enabled.
    h.set_common(QUEUE_SIZE, 2, 64);
    h.set_common(QUEUE_DESC, 8, 0x30000);
    h.set_common(QUEUE_DRIVER, 8, 0x31000);
    h.set_common(QUEUE_DEVICE, 8, 0x32000);
    h.set_common(QUEUE_ENABLE, 2, 1);
    assert_eq!(h.record.lock().unwrap().queue_enables, [(1, 64, 0x30000)]);
    assert_eq!(h.status(), 0xf, "the device kept running");
    assert_eq!(
        h.record.lock().unwrap().activations.len(),
        1,
        "no re-activation"
    );
    // A queue that was not reset keeps its rings: writes to it are still ignored.
    h.set_common(QUEUE_SELECT, 2, 0);
    h.set_common(QUEUE_SIZE, 2, 32);
    assert_eq!(h.common(QUEUE_SIZE, 2), 16);
}

#[test]
fn queue_reset_needs_ring_reset_negotiated_and_a_running_device() {
    let ring_reset = bit(virtio_bindings::virtio_config::VIRTIO_F_RING_RESET);
    let mut h = harness_offering(false, ring_reset);
    h.bring_up(FEATURES);
    h.setup_queue(0, 0x10000);
    h.set_status(0xf);
    h.set_common(QUEUE_SELECT, 2, 0);
    h.set_common(QUEUE_RESET, 2, 1);
    assert!(
        h.record.lock().unwrap().queue_resets.is_empty(),
        "not negotiated"
    );
    assert_eq!(h.common(QUEUE_ENABLE, 2), 1);

    let mut h = harness_offering(false, ring_reset);
    h.bring_up(FEATURES | ring_reset);
    h.setup_queue(0, 0x10000);
    h.set_common(QUEUE_RESET, 2, 1);
    assert!(
        h.record.lock().unwrap().queue_resets.is_empty(),
        "before DRIVER_OK"
    );
}
