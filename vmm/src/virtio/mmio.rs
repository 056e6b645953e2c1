//! virtio-mmio transport, version 2 (virtio 1.x "modern" register layout).
//!
//! The transport decodes the registers; the device-status state machine and the queue
//! configuration the driver writes are [`TransportState`]'s, shared with virtio-pci. The device
//! behind it ([`VirtioDevice`]) only sees finished queues at activation. Queue
//! notifications arrive on one eventfd per queue — registered with KVM as an ioeventfd by the VM
//! builder, or written by [`MmioTransport`] itself when a notify write reaches it (the in-process
//! driver model in the component tests has no KVM). Interrupts leave through one eventfd (an
//! irqfd under KVM) plus the InterruptStatus bits.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::transport::TransportState;
use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;

pub use super::transport::Error;

pub const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4d51_564d; // "MVQM"

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// The device status bits as the 32-bit Status register holds them: virtio_bindings'
/// VIRTIO_CONFIG_S_*, under the names the transport uses.
pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as STATUS_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as STATUS_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK, VIRTIO_CONFIG_S_FAILED as STATUS_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as STATUS_DEVICE_NEEDS_RESET,
};

pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// InterruptStatus bits plus the eventfd that raises the line.
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

impl Interrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        self.raise(INT_VRING)
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG)
    }
}

pub struct MmioTransport {
    state: TransportState,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// `irq` is what the interrupt line is raised with (an irqfd under KVM).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, Error> {
        let interrupt = Arc::new(MmioInterrupt::new(irq));
        // No bus-master switch on virtio-mmio: the device may always run.
        let mut state = TransportState::new("virtio-mmio", device, mem, interrupt.clone(), true)?;
        // virtio-mmio has no queue-reset register here (Linux's virtio-mmio driver has no
        // ring reset either).
        state.hide_features(virtio_net::features::bit(
            virtio_bindings::virtio_config::VIRTIO_F_RING_RESET,
        ));
        Ok(MmioTransport { state, interrupt })
    }

    /// One eventfd per queue, to register as ioeventfd for QueueNotify == index.
    pub fn queue_kicks(&self) -> &[EventFd] {
        self.state.kicks()
    }

    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        u32::from(self.state.status())
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.state.device()
    }

    fn set_status(&mut self, value: u32) {
        // The handshake lives in the low byte; higher bits are unknown to every version.
        if value > 0xff {
            log::warn!(
                "virtio-mmio: driver set unknown status bits {:#x}; ignored",
                value & !0xff
            );
            if value & 0xff == 0 {
                return;
            }
        }
        self.state.set_status(value as u8);
        if value & 0xff == 0 {
            self.interrupt.status.store(0, Ordering::SeqCst);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.state.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => self.state.device_features_word(),
            REG_QUEUE_NUM_MAX => self
                .state
                .selected_queue()
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .state
                .selected_queue()
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.interrupt.config_generation.load(Ordering::SeqCst),
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.state.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.state.driver_features_select = value,
            REG_DRIVER_FEATURES => self.state.write_driver_features(value),
            REG_QUEUE_SEL => self.state.queue_select = value,
            // Under KVM the ioeventfd swallows these writes; in-process drivers land here.
            REG_QUEUE_NOTIFY => self.state.notify(value as usize),
            REG_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            _ => log::debug!("virtio-mmio: write of {value:#x} to unknown register {offset:#x}"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        let Some(queue) = self.state.queue_mut(offset) else {
            return;
        };
        match offset {
            REG_QUEUE_NUM => queue.set_size(value as u16),
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.state.device().read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::warn!(
                "virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.state
                .device_mut()
                .write_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::warn!(
                "virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_net::features::bit;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use crate::virtio::testing::{FakeDevice, Record, FEATURES};

    fn transport(fail_activate: bool) -> (MmioTransport, Arc<Mutex<Record>>) {
        let (device, record) = FakeDevice::new(fail_activate);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let t =
            MmioTransport::new(Box::new(device), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        (t, record)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn set_features(t: &mut MmioTransport, features: u64) {
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Sets up queue `index` with rings at `base` (size 16: desc 256 B, avail 38 B, used 134 B).
    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        w(t, REG_QUEUE_SEL, index);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    fn bring_up(t: &mut MmioTransport, features: u64) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        set_features(t, features);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(false);
        assert_eq!(r(&mut t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 1);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
    }

    #[test]
    fn feature_pages_and_queue_sizes() {
        let (mut t, _) = transport(false);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), FEATURES as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 64);
        w(&mut t, REG_QUEUE_SEL, 3);
        assert_eq!(
            r(&mut t, REG_QUEUE_NUM_MAX),
            0,
            "nonexistent queue has max 0"
        );
    }

    #[test]
    fn full_bring_up_activates_ready_queues_with_event_idx() {
        let (mut t, record) = transport(false);
        bring_up(&mut t, FEATURES);
        assert_eq!(
            r(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        assert_eq!(record.lock().unwrap().acked, Some(FEATURES));
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 2, 0x20000);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(r(&mut t, REG_STATUS), 0xf);
        let rec = record.lock().unwrap();
        assert_eq!(rec.activations, vec![vec![(0, 16, true), (2, 16, true)]]);
    }

    #[test]
    fn ring_reset_is_never_offered_over_mmio() {
        let ring_reset = bit(virtio_bindings::virtio_config::VIRTIO_F_RING_RESET);
        let (mut device, record) = FakeDevice::new(false);
        device.offered |= ring_reset;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut t =
            MmioTransport::new(Box::new(device), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        let high = u64::from(r(&mut t, REG_DEVICE_FEATURES)) << 32;
        assert_eq!(high & ring_reset, 0);
        assert_eq!(high, FEATURES & !0xffff_ffff, "the rest is offered");
        bring_up(&mut t, FEATURES | ring_reset);
        assert_eq!(
            record.lock().unwrap().acked,
            None,
            "acking it fails FEATURES_OK"
        );
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_legacy_features() {
        let (mut t, record) = transport(false);
        bring_up(&mut t, FEATURES | 1 << 40);
        assert_eq!(r(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(record.lock().unwrap().acked, None);
        let (mut t, _) = transport(false);
        bring_up(&mut t, 0x21);
        assert_eq!(
            r(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            0,
            "no VERSION_1"
        );
    }

    #[test]
    fn out_of_order_status_and_late_queue_writes_are_ignored() {
        let (mut t, record) = transport(false);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        // Queue registers before FEATURES_OK do nothing.
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_STATUS, 0xf);
        // After DRIVER_OK the queue cannot be changed any more.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 8);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        // Features cannot change after FEATURES_OK either.
        set_features(&mut t, bit(VIRTIO_F_VERSION_1));
        assert_eq!(record.lock().unwrap().acked, Some(FEATURES));
        // Clearing bits without a reset is ignored.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), 0xf);
    }

    #[test]
    fn invalid_rings_or_failed_activation_set_needs_reset() {
        let (mut t, record) = transport(false);
        bring_up(&mut t, FEATURES);
        // Rings outside the 1 MiB of guest memory.
        setup_queue(&mut t, 0, 0x1000_0000);
        w(&mut t, REG_STATUS, 0xf);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(record.lock().unwrap().activations.is_empty());
        assert_ne!(r(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);

        let (mut t, _) = transport(true);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_STATUS, 0xf);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_returns_to_initial_state_and_resets_the_device() {
        let (mut t, record) = transport(false);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_STATUS, 0xf);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // The device can be brought up again.
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 1, 0x30000);
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(record.lock().unwrap().activations.len(), 2);
        // Before FEATURES_OK the device has nothing to forget.
        let (mut t, record) = transport(false);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(record.lock().unwrap().resets, 0);
        // After FEATURES_OK it has acked features, after a failed activation maybe more.
        bring_up(&mut t, FEATURES);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(record.lock().unwrap().resets, 1, "reset after FEATURES_OK");
        let (mut t, record) = transport(true);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_STATUS, 0xf);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(
            record.lock().unwrap().resets,
            1,
            "reset after a failed activation"
        );
    }

    #[test]
    fn interrupts_ack_and_config_generation() {
        let (mut t, record) = transport(false);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_STATUS, 0xf);
        let irq = record.lock().unwrap().interrupt.clone().unwrap();
        let gen0 = r(&mut t, REG_CONFIG_GENERATION);
        irq.signal_used_queue(0).unwrap();
        irq.signal_config().unwrap();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(t.interrupt().irq().read().unwrap(), 2);
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), gen0 + 1);
        w(&mut t, REG_INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
    }

    #[test]
    fn notify_kicks_the_queue_eventfd_in_any_status() {
        let (mut t, _) = transport(false);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 1, 0x10000);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(
            t.queue_kicks()[1].read().unwrap(),
            1,
            "a kick before DRIVER_OK latches, as it does in an ioeventfd"
        );
        w(&mut t, REG_STATUS, 0xf);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_kicks()[1].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 99); // ignored, no panic
    }

    #[test]
    fn status_bits_above_the_low_byte_are_ignored_not_taken_for_a_reset() {
        let (mut t, record) = transport(false);
        bring_up(&mut t, FEATURES);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, REG_STATUS, 0xf);
        w(&mut t, REG_STATUS, 0x100);
        w(&mut t, REG_STATUS, 0x100 | 0xf);
        assert_eq!(r(&mut t, REG_STATUS), 0xf);
        assert_eq!(record.lock().unwrap().resets, 0);
        w(&mut t, REG_STATUS, 0x100 | STATUS_FAILED);
        assert_eq!(r(&mut t, REG_STATUS), 0xf | STATUS_FAILED);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let (mut t, record) = transport(false);
        let mut d = [0u8; 3];
        t.read(REG_CONFIG + 5, &mut d);
        assert_eq!(d, [5, 6, 7]);
        t.write(REG_CONFIG + 2, &[9, 9]);
        assert_eq!(record.lock().unwrap().config_writes, vec![(2, vec![9, 9])]);
        // Narrow or unaligned register accesses are refused, not a panic.
        let mut two = [0xaa; 2];
        t.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(REG_STATUS, &[1]);
        t.write(REG_STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }
}
