//! What the virtio transports share, whatever their registers look like: the device-status
//! state machine and the state behind it.
//!
//! [`TransportState`] owns the device, the queues as the driver configures them and one kick
//! eventfd per queue. It checks the handshake (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK in
//! that order; bits only cleared by a reset), pages the driver's features in 32-bit words,
//! accepts FEATURES_OK only for a subset of what the device offers that includes VERSION_1,
//! lets queues be set up only between FEATURES_OK and DRIVER_OK, hands the device its ready
//! queues at DRIVER_OK, and sets DEVICE_NEEDS_RESET (with a configuration interrupt) when that
//! fails. Each transport keeps its register decoding and its interrupt type: virtio-mmio
//! ([`super::mmio`]) and virtio-pci's common configuration ([`super::pci`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_net::features::bit;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Interrupt, VirtioDevice};

// The device status bits (virtio_bindings' VIRTIO_CONFIG_S_*), as the byte both transports
// keep.
pub const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// The handshake bits, in the order the driver must set them.
const HANDSHAKE: [u8; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device offers no queues")]
    NoQueues,
    #[error("cannot create a virtqueue of size {size}")]
    Queue {
        size: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot create the eventfd for queue {queue}")]
    Kick {
        queue: usize,
        #[source]
        source: std::io::Error,
    },
}

pub struct TransportState {
    /// The transport's name in log messages.
    name: &'static str,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    /// The queue the queue registers or fields refer to.
    pub queue_select: u32,
    /// The 32-bit word of the device's and of the driver's features the feature registers
    /// show.
    pub device_features_select: u32,
    pub driver_features_select: u32,
    driver_features: u64,
    status: u8,
    activated: bool,
    /// PCI's bus-master enable: the device runs only while it is on. virtio-mmio has no such
    /// switch and leaves it on.
    bus_master: bool,
    /// Device features this transport cannot carry (virtio-mmio: VIRTIO_F_RING_RESET, which
    /// needs a queue-reset register); never offered.
    hidden_features: u64,
    /// Queues the driver reset on their own (VIRTIO_F_RING_RESET) while the device runs: set
    /// up again from scratch, then enabled.
    queue_reset: Vec<bool>,
}

impl TransportState {
    /// One queue of the device's maximum size and one kick eventfd per queue the device has.
    pub fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        bus_master: bool,
    ) -> Result<TransportState, Error> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() {
            return Err(Error::NoQueues);
        }
        let queues = sizes
            .iter()
            .map(|&size| Queue::new(size).map_err(|source| Error::Queue { size, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let kicks = (0..sizes.len())
            .map(|queue| EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Kick { queue, source }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TransportState {
            name,
            device,
            mem,
            interrupt,
            queues,
            kicks,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            bus_master,
            hidden_features: 0,
            queue_reset: vec![false; sizes.len()],
        })
    }

    /// Never offers `features`, whatever the device offers: the transport cannot carry them.
    pub fn hide_features(&mut self, features: u64) {
        self.hidden_features |= features;
    }

    /// What the driver is offered: the device's features less those the transport hides.
    fn offered_features(&self) -> u64 {
        self.device.features() & !self.hidden_features
    }

    /// VIRTIO_F_RING_RESET: the driver resets queue `index` alone while the device runs. The
    /// device stops using it and forgets its state; the transport's copy starts over as after
    /// a device reset (not ready, maximum size, no addresses), for the driver to set up and
    /// enable again. Done before this returns, so the queue-reset register reads 0 at once,
    /// as QEMU's does. Returns whether the queue was reset.
    pub fn reset_queue(&mut self, index: usize) -> bool {
        let negotiated = self.driver_features & bit(VIRTIO_F_RING_RESET) != 0;
        if !negotiated || !self.activated || index >= self.queues.len() {
            log::warn!(
                "{}: reset of queue {index} refused (RING_RESET {}, device {})",
                self.name,
                if negotiated {
                    "negotiated"
                } else {
                    "not negotiated"
                },
                if self.activated {
                    "running"
                } else {
                    "not running"
                }
            );
            return false;
        }
        if !self.device.reset_queue(index as u16) {
            log::warn!("{}: the device cannot reset queue {index}", self.name);
            return false;
        }
        self.queues[index].reset();
        self.queue_reset[index] = true;
        true
    }

    /// Whether queue `index` was reset on its own and not yet enabled again.
    pub fn is_queue_reset(&self, index: usize) -> bool {
        self.queue_reset.get(index).copied().unwrap_or(false)
    }

    /// The driver enabled queue `index` again after resetting it alone: the device takes the
    /// new ring. A ring the device cannot use leaves the device needing a reset.
    pub fn enable_reset_queue(&mut self, index: usize) {
        if !self.is_queue_reset(index) {
            return;
        }
        let event_idx = self.driver_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let queue = &mut self.queues[index];
        if !queue.is_valid(&self.mem) {
            log::error!(
                "{}: queue {index} enabled after its reset with invalid rings",
                self.name
            );
            self.fail_activation();
            return;
        }
        queue.set_event_idx(event_idx);
        let taken = match (
            Queue::try_from(queue.state()),
            self.kicks[index].try_clone(),
        ) {
            (Ok(copy), Ok(kick)) => self.device.enable_queue(index as u16, copy, kick),
            _ => false,
        };
        if taken {
            self.queue_reset[index] = false;
        } else {
            log::error!("{}: the device cannot take queue {index} back", self.name);
            self.fail_activation();
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// One eventfd per queue, in queue-index order.
    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// The word of the device's features that `device_features_select` picks (0 beyond 1).
    pub fn device_features_word(&self) -> u32 {
        feature_word(self.offered_features(), self.device_features_select)
    }

    /// The word of the driver's features that `driver_features_select` picks (0 beyond 1).
    pub fn driver_features_word(&self) -> u32 {
        feature_word(self.driver_features, self.driver_features_select)
    }

    /// The driver acks `value` as the word of its features `driver_features_select` picks;
    /// only between DRIVER and FEATURES_OK.
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            log::warn!(
                "{}: driver features written in status {:#x}; ignored",
                self.name,
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
                    log::warn!(
                        "{}: driver acked features {value:#x} in page {page}",
                        self.name
                    );
                }
            }
        }
    }

    /// The queue `queue_select` picks, if the device has it.
    pub fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue, to change what the driver writes to queue register or field
    /// `field` — only while the driver sets the device up (between FEATURES_OK and
    /// DRIVER_OK) and if the device has that queue; otherwise the write is logged and `None`.
    pub fn queue_mut(&mut self, field: u64) -> Option<&mut Queue> {
        let select = self.queue_select as usize;
        let setting_up =
            self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        if !setting_up && !self.is_queue_reset(select) {
            log::warn!(
                "{}: queue field {field:#x} written in status {:#x}; ignored",
                self.name,
                self.status
            );
            return None;
        }
        let select = self.queue_select;
        let queue = self.queues.get_mut(select as usize);
        if queue.is_none() {
            log::warn!(
                "{}: queue field {field:#x} written for nonexistent queue {select}",
                self.name
            );
        }
        queue
    }

    /// A notify of `queue` that reached the transport (no ioeventfd caught it). It kicks the
    /// queue whatever the status, as an ioeventfd does: the eventfd holds the kick until the
    /// device reads it after activation.
    pub fn notify(&self, queue: usize) {
        match self.kicks.get(queue) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    log::error!("{}: cannot kick queue {queue}: {e}", self.name);
                }
            }
            None => log::warn!("{}: notify of nonexistent queue {queue}", self.name),
        }
    }

    /// The driver writes the device status; 0 resets the device. The transport resets its
    /// interrupt state itself after a reset.
    pub fn set_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if new & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        if new & old != old {
            log::warn!(
                "{}: driver cleared status bits ({old:#x} -> {new:#x}); ignored",
                self.name
            );
            return;
        }
        // The handshake bits must be a prefix of ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK.
        let set: Vec<bool> = HANDSHAKE.iter().map(|bit| new & bit != 0).collect();
        if set.windows(2).any(|w| !w[0] && w[1]) {
            log::warn!(
                "{}: status {new:#x} skips a step of the handshake (was {old:#x}); ignored",
                self.name
            );
            return;
        }
        let known = HANDSHAKE.iter().fold(0, |acc, bit| acc | bit);
        if new & !known & !STATUS_DEVICE_NEEDS_RESET != 0 {
            log::warn!(
                "{}: driver set unknown status bits {:#x}; ignored",
                self.name,
                new & !known
            );
        }
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 && !self.accept_features() {
            self.status = old | (new & (STATUS_ACKNOWLEDGE | STATUS_DRIVER));
            return;
        }
        self.status = old | (new & known);
        if added & STATUS_DRIVER_OK != 0 {
            if self.bus_master {
                self.activate();
            } else {
                log::warn!(
                    "{}: DRIVER_OK while bus mastering is off: the device starts when the driver turns it on",
                    self.name
                );
            }
        }
    }

    /// PCI's bus-master enable changed. Without it the function may not access guest memory,
    /// so, as QEMU's virtio-pci does, a running device is stopped and DRIVER_OK leaves the
    /// status; the rest of the handshake stays. DRIVER_OK written again restarts the device
    /// with the features negotiated before (a reset and a new handshake work too). A
    /// DRIVER_OK written while bus mastering is off takes effect when it comes on (Linux
    /// enables bus mastering before it starts the handshake).
    pub fn set_bus_master(&mut self, enabled: bool) {
        if enabled == self.bus_master {
            return;
        }
        self.bus_master = enabled;
        if enabled {
            if self.status & STATUS_DRIVER_OK != 0 && !self.activated {
                self.activate();
            }
            return;
        }
        if self.activated {
            log::info!(
                "{}: bus mastering turned off while the device runs: device stopped until DRIVER_OK",
                self.name
            );
            self.stop();
        }
        self.status &= !STATUS_DRIVER_OK;
    }

    /// Stops the running device but keeps what FEATURES_OK stands for. The device's only way
    /// to stop is its reset, which also forgets the acked features (virtio-net's does), so
    /// they are acked again: the status keeps FEATURES_OK, and a device activated later
    /// without them would run with none.
    ///
    /// The driver keeps its rings too, so the restart must continue where the device left
    /// them, not at 0 (it would hand the driver back buffers it already got). The device ran
    /// on copies of the queues and cannot say where it stopped; the used index it wrote to
    /// guest memory can, and each ring resumes there: a buffer the device took but never
    /// returned is taken again (QEMU does the same when a vhost backend cannot report its
    /// position, virtio_queue_restore_last_avail_idx).
    fn stop(&mut self) {
        self.device.reset();
        self.activated = false;
        if self.status & STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(self.driver_features);
        }
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            match queue.used_idx(&self.mem, Ordering::Acquire) {
                Ok(used) => {
                    queue.set_next_avail(used.0);
                    queue.set_next_used(used.0);
                }
                Err(e) => log::warn!(
                    "{}: cannot read the used index of queue {index} ({e}); it restarts at {}",
                    self.name,
                    queue.next_avail()
                ),
            }
        }
    }

    fn reset(&mut self) {
        // From FEATURES_OK on the device holds negotiated features, and a failed activation
        // may have left state behind; the device's reset is idempotent when nothing runs.
        if self.activated || self.status & STATUS_FEATURES_OK != 0 {
            self.device.reset();
        }
        self.activated = false;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_reset.iter_mut().for_each(|r| *r = false);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }

    /// FEATURES_OK only sticks for a subset of what we offered, including VERSION_1.
    fn accept_features(&mut self) -> bool {
        let offered = self.offered_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            log::warn!(
                "{}: driver acked features {unknown:#x} that were not offered",
                self.name
            );
            return false;
        }
        if self.driver_features & bit(VIRTIO_F_VERSION_1) == 0 {
            log::warn!(
                "{}: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.name
            );
            return false;
        }
        self.device.set_acked_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            if !queue.is_valid(&self.mem) {
                log::error!("{}: queue {index} is ready but its rings are invalid (size {}, desc {:#x}, avail {:#x}, used {:#x})",
                    self.name, queue.size(), queue.desc_table(), queue.avail_ring(), queue.used_ring());
                self.fail_activation();
                return;
            }
            queue.set_event_idx(event_idx);
            let kick = match self.kicks[index].try_clone() {
                Ok(kick) => kick,
                Err(e) => {
                    log::error!(
                        "{}: cannot clone the kick eventfd of queue {index}: {e}",
                        self.name
                    );
                    self.fail_activation();
                    return;
                }
            };
            // The device gets its own copy; ours is reset with the transport.
            let queue = match Queue::try_from(queue.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    log::error!("{}: queue {index} state is invalid: {e}", self.name);
                    self.fail_activation();
                    return;
                }
            };
            queues.push((index as u16, queue, kick));
        }
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("{}: device activation failed: {e}", self.name);
                self.fail_activation();
            }
        }
    }

    fn fail_activation(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config() {
            log::error!("{}: cannot signal DEVICE_NEEDS_RESET: {e}", self.name);
        }
    }
}

fn feature_word(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}
