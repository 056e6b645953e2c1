//! Virtio transports and the device interface they drive.

pub mod mmio;
pub mod net;
pub mod pci;
#[cfg(test)]
pub(crate) mod testing;
pub mod transport;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// How a device raises interrupts; implemented by each transport.
pub use virtio_net::Interrupt;

/// What a transport needs from a device. Kept small so that both transports (virtio-mmio and
/// virtio-pci) drive the same devices unchanged.
pub trait VirtioDevice: Send {
    /// Virtio device id (1 = network).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue, in queue-index order.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Called once the driver's features passed validation (subset of `features`).
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` (index, ring state, kick eventfd) of the ready queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Device reset (status 0 after activation): stop and return to the pre-activation state.
    fn reset(&mut self);
    /// VIRTIO_F_RING_RESET: stop using queue `index` and forget its state while the rest of
    /// the device runs on; false if the device cannot.
    fn reset_queue(&mut self, _index: u16) -> bool {
        false
    }
    /// Use queue `index` again, with the ring the driver set up after [`Self::reset_queue`].
    fn enable_queue(&mut self, _index: u16, _queue: Queue, _kick: EventFd) -> bool {
        false
    }
}
