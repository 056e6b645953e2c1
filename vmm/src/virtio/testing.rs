//! A device double for the transports' unit tests: it records what the transport asks of it.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_net::features::bit;

/// What [`FakeDevice`] offers: VERSION_1, EVENT_IDX and two low device bits.
pub const FEATURES: u64 = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | 0x21;

/// What the transport did to the device.
#[derive(Default)]
pub struct Record {
    /// The features the device holds: what the transport acked last, forgotten at a reset
    /// (as virtio-net forgets them).
    pub acked: Option<u64>,
    /// Per activation: (queue index, size, EVENT_IDX enabled) of every queue handed over.
    pub activations: Vec<Vec<(u16, u16, bool)>>,
    /// Per activation: the features the device held when it started (0 for none).
    pub activated_features: Vec<u64>,
    /// Per activation: (queue index, next avail, next used) of every queue handed over.
    pub activated_positions: Vec<Vec<(u16, u16, u16)>>,
    pub resets: usize,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub interrupt: Option<Arc<dyn Interrupt>>,
    /// Queues reset on their own (VIRTIO_F_RING_RESET), in order.
    pub queue_resets: Vec<u16>,
    /// Queues enabled again after their reset: (index, size, descriptor table address).
    pub queue_enables: Vec<(u16, u16, u64)>,
}

/// A net-typed device with three queues (256, 256, 64) offering [`FEATURES`]; its config space
/// reads back `offset + i`; activation fails when `fail_activate` is set.
pub struct FakeDevice {
    pub fail_activate: bool,
    pub record: Arc<Mutex<Record>>,
    /// What it offers ([`FEATURES`] unless a test adds to it).
    pub offered: u64,
}

impl FakeDevice {
    /// A device and the record the test keeps.
    pub fn new(fail_activate: bool) -> (FakeDevice, Arc<Mutex<Record>>) {
        let record = Arc::new(Mutex::new(Record::default()));
        let device = FakeDevice {
            fail_activate,
            record: record.clone(),
            offered: FEATURES,
        };
        (device, record)
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 256, 64]
    }
    fn features(&self) -> u64 {
        self.offered
    }
    fn set_acked_features(&mut self, features: u64) {
        self.record.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.fail_activate {
            return Err("no backend".into());
        }
        let mut r = self.record.lock().unwrap();
        r.activations.push(
            queues
                .iter()
                .map(|(i, q, _)| (*i, q.size(), q.event_idx_enabled()))
                .collect(),
        );
        r.activated_positions.push(
            queues
                .iter()
                .map(|(i, q, _)| (*i, q.next_avail(), q.next_used()))
                .collect(),
        );
        let features = r.acked.unwrap_or(0);
        r.activated_features.push(features);
        r.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        let mut r = self.record.lock().unwrap();
        r.resets += 1;
        r.acked = None;
    }
    fn reset_queue(&mut self, index: u16) -> bool {
        self.record.lock().unwrap().queue_resets.push(index);
        true
    }
    fn enable_queue(&mut self, index: u16, queue: Queue, _kick: EventFd) -> bool {
        self.record
            .lock()
            .unwrap()
            .queue_enables
            .push((index, queue.size(), queue.desc_table()));
        true
    }
}
