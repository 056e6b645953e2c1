//! `virtio_net::Net` as a [`VirtioDevice`]: the device either transport (virtio-mmio or
//! virtio-pci) hosts.

use std::sync::Arc;

use virtio_net::{Backend, Net};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice};

impl<B: Backend + 'static> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        Net::<B>::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        Net::queue_max_sizes(self)
    }

    fn features(&self) -> u64 {
        self.avail_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        Net::set_acked_features(self, features)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        Net::read_config(self, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        Net::write_config(self, offset, data)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Net::activate(self, mem, interrupt, queues).map_err(|e| e.into())
    }

    fn reset(&mut self) {
        Net::reset(self)
    }

    fn reset_queue(&mut self, index: u16) -> bool {
        match Net::reset_queue(self, index) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("virtio-net: {e}");
                false
            }
        }
    }

    fn enable_queue(&mut self, index: u16, queue: Queue, _kick: EventFd) -> bool {
        // The kick is the eventfd the device already polls for this queue.
        match Net::enable_queue(self, index, queue) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("virtio-net: {e}");
                false
            }
        }
    }
}
