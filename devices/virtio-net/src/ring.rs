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
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::{DescTable, HostMem};

/// Host addresses of a ring's avail and used areas (each in one region, aligned as the spec
/// wants them), and the memory handle that keeps them mapped.
#[derive(Debug)]
struct RingHost {
    _mem: Arc<HostMem>,
    /// Avail ring: flags, idx, `ring[size]`, used_event (2-byte aligned).
    avail: usize,
    /// Used ring: flags, idx, `ring[size]` of (id, len), avail_event (4-byte aligned).
    used: usize,
    /// `size - 1`: ring positions to slots without a division (the size is a power of two).
    mask: u16,
}

impl RingHost {
    fn new(queue: &Queue, host: &Arc<HostMem>) -> Option<Self> {
        if !queue.size().is_power_of_two() {
            return None;
        }
        let size = u64::from(queue.size());
        let avail = host.host(GuestAddress(queue.avail_ring()), 6 + 2 * size)? as usize;
        let used = host.host(GuestAddress(queue.used_ring()), 6 + 8 * size)? as usize;
        (avail.is_multiple_of(2) && used.is_multiple_of(4)).then(|| RingHost {
            _mem: Arc::clone(host),
            avail,
            used,
            mask: queue.size() - 1,
        })
    }

    /// The avail ring's u16 at byte `offset`.
    ///
    /// # Safety
    /// `offset` must be even and at most `4 + 2 * size` (the used_event field).
    unsafe fn avail_u16(&self, offset: u64) -> &AtomicU16 {
        // SAFETY: `avail` is the host address of the avail area, `6 + 2 * size` bytes in one
        // region mapped while `_mem` lives, and 2-byte aligned; the caller keeps `offset`
        // even and inside it. Atomic: the guest shares the memory.
        unsafe { AtomicU16::from_ptr((self.avail + offset as usize) as *mut u16) }
    }

    /// The used ring's u16 at byte `offset`.
    ///
    /// # Safety
    /// `offset` must be even and at most `4 + 8 * size` (the avail_event field).
    unsafe fn used_u16(&self, offset: u64) -> &AtomicU16 {
        // SAFETY: as for `avail_u16`, for the used area (`6 + 8 * size` bytes, 4-byte
        // aligned).
        unsafe { AtomicU16::from_ptr((self.used + offset as usize) as *mut u16) }
    }

    /// The used ring's u32 at byte `offset`.
    ///
    /// # Safety
    /// `offset` must be a multiple of 4 and at most `8 * size` (the second half of the last
    /// used element).
    unsafe fn used_u32(&self, offset: u64) -> &AtomicU32 {
        // SAFETY: as for `used_u16`; the area is 4-byte aligned and the caller keeps
        // `offset` a multiple of 4 and the u32 inside it.
        unsafe { AtomicU32::from_ptr((self.used + offset as usize) as *mut u32) }
    }
}

/// One split virtqueue as the device sees it.
#[derive(Debug)]
pub struct Ring {
    queue: Queue,
    /// The driver's avail index as last read: entries up to it are popped without reading
    /// the index again.
    avail_seen: u16,
    /// Used entries put since the last [`Ring::publish`].
    unsignalled: u16,
    /// The avail and used areas' host addresses, when resolved ([`Ring::with_host`]); else
    /// every access goes through vm-memory.
    host: Option<RingHost>,
}

impl Ring {
    /// The device side of `queue`, continuing at its `next_avail` / `next_used`.
    pub fn new(queue: Queue) -> Self {
        Ring {
            avail_seen: queue.next_avail(),
            queue,
            unsignalled: 0,
            host: None,
        }
    }

    /// The same, reading and writing the avail and used rings through their host addresses
    /// in `host` (resolved once here) when each lies in one region, as a driver lays them
    /// out. The `mem` passed to the other methods must be the memory of `host`.
    pub fn with_host(queue: Queue, host: &Arc<HostMem>) -> Self {
        let mut ring = Ring::new(queue);
        ring.host = RingHost::new(&ring.queue, host);
        ring
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
    #[inline]
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u16>, Error> {
        let queue = &mut self.queue;
        let next = queue.next_avail();
        if next == self.avail_seen {
            let idx = match &self.host {
                // SAFETY: offset 2 is the avail index, inside the area.
                Some(h) => u16::from_le(unsafe { h.avail_u16(2) }.load(Ordering::Acquire)),
                None => Self::read_avail_idx(queue, mem)?,
            };
            if idx.wrapping_sub(next) > queue.size() {
                return Err(Error::InvalidAvailRingIndex);
            }
            self.avail_seen = idx;
            if idx == next {
                return Ok(None);
            }
        }
        let head: u16 = match &self.host {
            Some(h) => {
                let offset = 4 + 2 * u64::from(next & h.mask);
                // SAFETY: `next & mask < size`, so the offset is even and inside the area.
                unsafe { h.avail_u16(offset) }.load(Ordering::Acquire)
            }
            None => Self::read_avail(queue, mem, next)?,
        };
        queue.set_next_avail(next.wrapping_add(1));
        Ok(Some(u16::from_le(head)))
    }

    /// `pop`'s read of the avail index through vm-memory (no host addresses resolved).
    #[inline(never)]
    fn read_avail_idx(queue: &Queue, mem: &GuestMemoryMmap) -> Result<u16, Error> {
        Ok(queue.avail_idx(mem, Ordering::Acquire)?.0)
    }

    /// `pop`'s read of avail entry `next` through vm-memory (no host addresses resolved).
    #[inline(never)]
    fn read_avail(queue: &Queue, mem: &GuestMemoryMmap, next: u16) -> Result<u16, Error> {
        let slot = u64::from(next % queue.size().max(1));
        let addr = queue
            .avail_ring()
            .checked_add(4 + 2 * slot)
            .ok_or(Error::AddressOverflow)?;
        mem.load(GuestAddress(addr), Ordering::Acquire)
            .map_err(Error::GuestMemory)
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
    #[inline]
    pub fn put(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), Error> {
        let queue = &mut self.queue;
        if head >= queue.size() {
            return Err(Error::InvalidDescriptorIndex);
        }
        let next = queue.next_used();
        match &self.host {
            Some(h) => {
                let offset = 4 + 8 * u64::from(next & h.mask);
                // SAFETY: `next & mask < size`: the element's two u32 lie at offsets that are
                // multiples of 4 and at most `8 * size`. Relaxed: `publish` stores the used
                // index with release ordering before the driver may look at the element.
                unsafe {
                    h.used_u32(offset)
                        .store(u32::from(head).to_le(), Ordering::Relaxed);
                    h.used_u32(offset + 4).store(len.to_le(), Ordering::Relaxed);
                }
            }
            None => Self::write_used(queue, mem, next, head, len)?,
        }
        queue.set_next_used(next.wrapping_add(1));
        self.unsignalled = self.unsignalled.wrapping_add(1);
        Ok(())
    }

    /// `put`'s element store through vm-memory (no host addresses resolved).
    #[inline(never)]
    fn write_used(
        queue: &Queue,
        mem: &GuestMemoryMmap,
        next: u16,
        head: u16,
        len: u32,
    ) -> Result<(), Error> {
        let addr = queue
            .used_ring()
            .checked_add(4 + 8 * u64::from(next % queue.size()))
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
        let published = match &self.host {
            Some(h) => {
                // SAFETY: offset 2 is the used index, inside the area.
                unsafe { h.used_u16(2) }.store(new.to_le(), Ordering::Release);
                true
            }
            None => queue.used_ring().checked_add(2).is_some_and(|at| {
                mem.store(new.to_le(), GuestAddress(at), Ordering::Release)
                    .is_ok()
            }),
        };
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
            let offset = 4 + 2 * u64::from(queue.size());
            let used_event = match &self.host {
                // SAFETY: `4 + 2 * size` is used_event, the area's last u16.
                Some(h) => Some(unsafe { h.avail_u16(offset) }.load(Ordering::Acquire)),
                None => queue
                    .avail_ring()
                    .checked_add(offset)
                    .and_then(|at| mem.load::<u16>(GuestAddress(at), Ordering::Acquire).ok()),
            };
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
