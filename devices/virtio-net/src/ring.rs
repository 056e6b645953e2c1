// SPDX-License-Identifier: Apache-2.0
//! The device side of one split virtqueue: pop available heads, put used entries, publish
//! the used index, decide whether the driver wants an interrupt, and ask for (or suppress)
//! kicks — the one implementation every queue of the device uses (data path and control
//! queue alike).
//!
//! Every index and address comes from guest memory and is treated as hostile: an avail index
//! more than a queue size ahead, a head outside the table or ring addresses that overflow are
//! errors, never panics.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::DescTable;

/// One split virtqueue as the device sees it.
#[derive(Debug)]
pub struct Ring {
    queue: Queue,
    /// The driver's avail index as last read: entries up to it are popped without reading
    /// the index again.
    avail_seen: u16,
    /// Used entries put since the last [`Ring::publish`].
    unsignalled: u16,
}

impl Ring {
    /// The device side of `queue`, continuing at its `next_avail` / `next_used`.
    pub fn new(queue: Queue) -> Self {
        Ring {
            avail_seen: queue.next_avail(),
            queue,
            unsignalled: 0,
        }
    }

    /// The underlying queue (its addresses, size and indices).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is in force.
    pub fn event_idx(&self) -> bool {
        self.queue.event_idx_enabled()
    }

    /// Where the queue's descriptors live, `indirect` saying whether indirect tables may be
    /// followed.
    pub fn table(&self, indirect: bool) -> DescTable {
        DescTable {
            addr: GuestAddress(self.queue.desc_table()),
            size: self.queue.size(),
            indirect,
        }
    }

    /// The next avail ring position to pop.
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Pops the next available head. The driver's avail index is read (acquire) only when
    /// every entry up to the last value read has been popped, so `None` always means a fresh
    /// read found nothing new. An index more than a queue size ahead is an error, as in
    /// virtio-queue's iterator.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u16>, Error> {
        let queue = &mut self.queue;
        let next = queue.next_avail();
        if next == self.avail_seen {
            let idx = queue.avail_idx(mem, Ordering::Acquire)?.0;
            if idx.wrapping_sub(next) > queue.size() {
                return Err(Error::InvalidAvailRingIndex);
            }
            self.avail_seen = idx;
            if idx == next {
                return Ok(None);
            }
        }
        let slot = u64::from(next % queue.size().max(1));
        let addr = queue
            .avail_ring()
            .checked_add(4 + 2 * slot)
            .ok_or(Error::AddressOverflow)?;
        let head: u16 = mem
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(Error::GuestMemory)?;
        queue.set_next_avail(next.wrapping_add(1));
        Ok(Some(u16::from_le(head)))
    }

    /// Gives the last `n` popped heads back: they are popped again next time.
    pub fn unpop(&mut self, n: u16) {
        let next = Wrapping(self.queue.next_avail()) - Wrapping(n);
        self.queue.set_next_avail(next.0);
    }

    /// Writes the used element `(head, len)` into the next used slot. The used index is not
    /// stored here but by [`Ring::publish`], once per batch and always before a notification
    /// decision, so the driver sees the entries no later than the interrupt (and one index
    /// store serves a whole batch).
    pub fn put(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), Error> {
        let queue = &mut self.queue;
        let size = queue.size();
        if head >= size {
            return Err(Error::InvalidDescriptorIndex);
        }
        let next = queue.next_used();
        let addr = queue
            .used_ring()
            .checked_add(4 + 8 * u64::from(next % size))
            .map(GuestAddress)
            .ok_or(Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        match mem.get_slice(addr, elem.len()) {
            Ok(slot) => slot.copy_from(&elem),
            // Not in one region (or not in memory): the general path splits or fails.
            Err(_) => mem.write_slice(&elem, addr).map_err(Error::GuestMemory)?,
        }
        queue.set_next_used(next.wrapping_add(1));
        self.unsignalled = self.unsignalled.wrapping_add(1);
        Ok(())
    }

    /// How many entries were put since the last [`Ring::publish`].
    pub fn unpublished(&self) -> u16 {
        self.unsignalled
    }

    /// Publishes the used index (release), then tells whether the driver wants a used-buffer
    /// notification for the entries put since the last call: with EVENT_IDX whether the
    /// index moved past `used_event`, else whether the driver left
    /// VRING_AVAIL_F_NO_INTERRUPT clear. If the index cannot be written, signal anyway.
    pub fn publish(&mut self, mem: &GuestMemoryMmap) -> bool {
        let queue = &self.queue;
        let new = queue.next_used();
        let old = new.wrapping_sub(self.unsignalled);
        self.unsignalled = 0;
        let published = queue.used_ring().checked_add(2).is_some_and(|at| {
            mem.store(new.to_le(), GuestAddress(at), Ordering::Release)
                .is_ok()
        });
        // The index store must be visible before the driver's event index or flags are read.
        fence(Ordering::SeqCst);
        if !published {
            return true;
        }
        self.driver_wants(mem, old)
    }

    /// Whether the driver wants a used-buffer notification for the entries published since
    /// used index `since`: with EVENT_IDX whether they crossed `used_event`, else whether the
    /// driver left VRING_AVAIL_F_NO_INTERRUPT clear. A notification held back (coalescing)
    /// is checked again with this when it falls due: a driver that has since started polling
    /// does not want it any more.
    pub fn driver_wants(&self, mem: &GuestMemoryMmap, since: u16) -> bool {
        let queue = &self.queue;
        let (new, old) = (queue.next_used(), since);
        if queue.event_idx_enabled() {
            let used_event = queue
                .avail_ring()
                .checked_add(4 + 2 * u64::from(queue.size()))
                .and_then(|at| mem.load::<u16>(GuestAddress(at), Ordering::Acquire).ok());
            return match used_event {
                // The EVENT_IDX test (virtio 1.x, 2.7.10): did new - old entries cross used_event?
                Some(event) => {
                    let event = u16::from_le(event);
                    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
                }
                None => true,
            };
        }
        match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
            Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            Err(_) => true,
        }
    }

    /// Without EVENT_IDX, asks the driver not to kick (VRING_USED_F_NO_NOTIFY) while the
    /// device drains the queue anyway; with EVENT_IDX nothing is needed.
    pub fn suppress_kicks(&mut self, mem: &GuestMemoryMmap) {
        if !self.queue.event_idx_enabled() {
            let _ = self.queue.disable_notification(mem);
        }
    }

    /// Asks for a kick when the driver makes the next head available (avail_event =
    /// next_avail, or the NO_NOTIFY flag cleared); returns whether one already is, in which
    /// case the caller pops again instead of waiting.
    pub fn enable_kicks(&mut self, mem: &GuestMemoryMmap) -> Result<bool, Error> {
        self.queue.enable_notification(mem)
    }

    /// Asks for a kick when the driver's avail index moves past `avail_seen`; returns whether
    /// it already has (the caller retries instead of waiting). With EVENT_IDX, avail_event is
    /// `avail_seen`, not `next_avail`: with heads popped and given back (too little space for
    /// a frame) the driver is already past `next_avail` and would never cross it again.
    pub fn arm_kick(&mut self, mem: &GuestMemoryMmap, avail_seen: u16) -> bool {
        if self.queue.event_idx_enabled() {
            let offset = 4 + 8 * u64::from(self.queue.size());
            let Some(addr) = self.queue.used_ring().checked_add(offset) else {
                return false;
            };
            if mem
                .store(
                    u16::to_le(avail_seen),
                    GuestAddress(addr),
                    Ordering::Release,
                )
                .is_err()
            {
                return false;
            }
        } else if self.queue.enable_notification(mem).is_err() {
            return false;
        }
        fence(Ordering::SeqCst);
        match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != avail_seen,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{guest_memory, r, w, TestQueue, BUF};

    #[test]
    fn pops_what_the_driver_published_in_order_and_nothing_more() {
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 0, 8);
        let mut ring = Ring::new(q.queue(false));
        assert_eq!(ring.pop(&mem).ok(), Some(None));
        let a = q.add(&[r(BUF, 10)]);
        let b = q.add(&[w(BUF, 10)]);
        assert_eq!(ring.pop(&mem).ok(), Some(Some(a)));
        assert_eq!(ring.pop(&mem).ok(), Some(Some(b)));
        assert_eq!(ring.pop(&mem).ok(), Some(None));
        // Given back, popped again.
        ring.unpop(2);
        assert_eq!(ring.pop(&mem).ok(), Some(Some(a)));
        ring.unpop(1);
        assert_eq!(ring.next_avail(), 0);
    }

    #[test]
    fn an_avail_index_more_than_a_queue_ahead_is_an_error() {
        let mem = guest_memory();
        let q = TestQueue::new(&mem, 0, 8);
        let mut ring = Ring::new(q.queue(false));
        let avail = ring.queue().avail_ring();
        mem.write_obj(9u16.to_le(), GuestAddress(avail + 2))
            .unwrap();
        assert!(matches!(ring.pop(&mem), Err(Error::InvalidAvailRingIndex)));
    }

    #[test]
    fn used_entries_are_visible_after_publish_only() {
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 0, 8);
        let mut ring = Ring::new(q.queue(false));
        let head = q.add(&[w(BUF, 64)]);
        assert_eq!(ring.pop(&mem).ok(), Some(Some(head)));
        ring.put(&mem, head, 42).unwrap();
        assert_eq!(ring.unpublished(), 1);
        assert_eq!(q.used_idx(), 0, "not published yet");
        assert!(
            ring.publish(&mem),
            "no EVENT_IDX, interrupts not suppressed"
        );
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used(0), (head, 42));
        assert_eq!(ring.unpublished(), 0);
        // A head outside the table is refused.
        assert!(matches!(
            ring.put(&mem, 8, 0),
            Err(Error::InvalidDescriptorIndex)
        ));
    }

    #[test]
    fn publish_follows_used_event_or_the_no_interrupt_flag() {
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 0, 8);
        let mut ring = Ring::new(q.queue(true));
        q.set_used_event(1);
        for expect in [false, true, false] {
            let head = q.add(&[w(BUF, 64)]);
            ring.pop(&mem).unwrap();
            ring.put(&mem, head, 1).unwrap();
            assert_eq!(ring.publish(&mem), expect, "used idx {}", q.used_idx());
        }
        // Two entries in one batch crossing used_event: one interrupt.
        q.set_used_event(4);
        for _ in 0..2 {
            let head = q.add(&[w(BUF, 64)]);
            ring.pop(&mem).unwrap();
            ring.put(&mem, head, 1).unwrap();
        }
        assert!(ring.publish(&mem));

        let mut q = TestQueue::new(&mem, 0x4000, 8);
        let mut ring = Ring::new(q.queue(false));
        q.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        let head = q.add(&[w(BUF, 64)]);
        ring.pop(&mem).unwrap();
        ring.put(&mem, head, 1).unwrap();
        assert!(!ring.publish(&mem));
        assert_eq!(q.used_idx(), 1, "published all the same");
    }

    #[test]
    fn arming_a_kick_reports_buffers_added_meanwhile() {
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 0, 8);
        let mut ring = Ring::new(q.queue(true));
        assert!(!ring.arm_kick(&mem, 0));
        assert_eq!(q.avail_event(), 0);
        q.add(&[w(BUF, 64)]);
        assert!(
            ring.arm_kick(&mem, 0),
            "the driver is already past avail_event"
        );
        assert_eq!(ring.enable_kicks(&mem).ok(), Some(true));
    }
}
