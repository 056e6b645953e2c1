// SPDX-License-Identifier: Apache-2.0
//! The driver side of one split virtqueue, as lean as a benchmark needs: descriptors are
//! written once at setup (slot `i` always describes buffer `i`), buffers are reused in order,
//! publishing is one avail entry per chain plus one index store, reaping reads the used ring.
//!
//! The driver's work is counted in the device path's time, so the hot operations (publish,
//! reap, used_event) go straight to the rings' host addresses (resolved once, kept valid by
//! the guest memory handle the ring holds), as a guest driver writes its own memory.
//!
//! The device under test (`virtio_net::rxtx::QueuePair`) uses buffers in the order they were
//! made available, so slot order is the only bookkeeping needed; reaping checks it.
//!
//! Everything else (the layout, descriptors, indirect tables, the device's queue) is the
//! shared driver-side ring, `virtio_net::test_utils::ring`.

use std::sync::atomic::{AtomicU16, Ordering};

use virtio_net::test_utils::ring::{self, RingLayout};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A driver-side ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Setting up the rings or descriptors, or building the device's queue.
    #[error(transparent)]
    Ring(#[from] ring::Error),
    /// A ring part has no host mapping of its own (it straddles two regions).
    #[error("no host mapping of {len} bytes at guest address {addr:#x}")]
    Mapping {
        /// Guest address of the ring part.
        addr: u64,
        /// Its length.
        len: usize,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The device returned a chain out of order or one that was never made available.
    #[error("queue {index}: used entry {at} has id {id}, expected {expected}")]
    OutOfOrder {
        /// Queue index.
        index: u16,
        /// Used ring position.
        at: u16,
        /// Id found.
        id: u32,
        /// Id expected.
        expected: u16,
    },
}

/// One split queue, driver side: the shared [`RingLayout`] (the layout of
/// [`RingLayout::at`], the device's queue, descriptors and indirect tables), plus its own
/// publish / reap / used_event through host pointers. It does not use the shared
/// `SplitRing`: that one keeps a free list and checks every used entry against its chain,
/// work that would be counted in the device path's time.
pub struct Ring {
    mem: GuestMemoryMmap,
    index: u16,
    layout: RingLayout,
    /// Host address of the avail ring (flags, idx, `ring[size]`, used_event).
    avail_host: *mut u8,
    /// Host address of the used ring (flags, idx, `ring[size]` of (id, len), avail_event).
    used_host: *mut u8,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of `size` entries laid out from `base` (descriptor table, then the avail and used
    /// rings, each page-aligned); zeroes the rings. `index` names the queue in errors.
    pub fn new(mem: &GuestMemoryMmap, index: u16, base: u64, size: u16) -> Result<Ring, Error> {
        let layout = RingLayout::at(GuestAddress(base), size);
        layout.zero(mem)?;
        let host = |addr: GuestAddress, len: u64| {
            mem.get_slice(addr, len as usize)
                .map(|s| s.ptr_guard_mut().as_ptr())
                .map_err(|source| Error::Mapping {
                    addr: addr.0,
                    len: len as usize,
                    source,
                })
        };
        Ok(Ring {
            mem: mem.clone(),
            index,
            layout,
            avail_host: host(layout.avail, ring::avail_ring_len(size))?,
            used_host: host(layout.used, ring::used_ring_len(size))?,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// The device's view of this ring: a ready `virtio_queue::Queue`.
    pub fn queue(&self, event_idx: bool) -> Result<Queue, Error> {
        Ok(self.layout.queue(self.layout.size, event_idx, &self.mem)?)
    }

    /// Writes descriptor `i` of this ring's table.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) -> Result<(), Error> {
        let desc = Descriptor::new(addr, len, flags, 0);
        Ok(self.layout.write_desc(&self.mem, i, desc)?)
    }

    fn avail_u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(
            offset + 2 <= 6 + 2 * usize::from(self.layout.size) && offset.is_multiple_of(2)
        );
        // SAFETY: `avail_host` is the host address of this ring's avail area (6 + 2 * size
        // bytes, resolved in `new` from `self.mem`, which keeps the mapping alive as long as
        // `self`); every caller passes an even offset inside it, and the area starts on a page,
        // so the u16 is aligned. The guest-memory contract is that it is shared, hence atomic.
        unsafe { AtomicU16::from_ptr(self.avail_host.add(offset).cast()) }
    }

    fn used_u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(
            offset + 2 <= 6 + 8 * usize::from(self.layout.size) && offset.is_multiple_of(2)
        );
        // SAFETY: as for `avail_u16`, for the used area (6 + 8 * size bytes).
        unsafe { AtomicU16::from_ptr(self.used_host.add(offset).cast()) }
    }

    /// Makes the next `n` slots available (slot = position modulo size, so slot `i` is always
    /// descriptor `i`), then publishes the index with release ordering.
    pub fn publish(&mut self, n: u16) {
        let mut idx = self.avail_idx;
        for _ in 0..n {
            let slot = idx % self.layout.size;
            self.avail_u16(4 + 2 * usize::from(slot))
                .store(slot.to_le(), Ordering::Relaxed);
            idx = idx.wrapping_add(1);
        }
        self.avail_u16(2).store(idx.to_le(), Ordering::Release);
        self.avail_idx = idx;
    }

    /// Asks for a used-buffer notification once the device has used entry `idx` (EVENT_IDX's
    /// `used_event`).
    pub fn set_used_event(&self, idx: u16) {
        self.avail_u16(4 + 2 * usize::from(self.layout.size))
            .store(idx.to_le(), Ordering::Release);
    }

    /// Chains made available and not yet reaped.
    #[cfg(test)]
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_seen)
    }

    /// Reaps every new used entry, checking it is the next slot in order; `f` gets the slot and
    /// the length the device wrote. Returns how many were reaped.
    pub fn reap(&mut self, mut f: impl FnMut(u16, u32)) -> Result<u16, Error> {
        let used_idx = u16::from_le(self.used_u16(2).load(Ordering::Acquire));
        let mut n = 0;
        while self.used_seen != used_idx {
            let pos = usize::from(self.used_seen % self.layout.size);
            let elem = 4 + 8 * pos;
            let half = |o: usize| u32::from(u16::from_le(self.used_u16(o).load(Ordering::Relaxed)));
            let id = half(elem) | half(elem + 2) << 16;
            let len = half(elem + 4) | half(elem + 6) << 16;
            let expected = self.used_seen % self.layout.size;
            if id != u32::from(expected) {
                return Err(Error::OutOfOrder {
                    index: self.index,
                    at: self.used_seen,
                    id,
                    expected,
                });
            }
            f(expected, len);
            self.used_seen = self.used_seen.wrapping_add(1);
            n += 1;
        }
        Ok(n)
    }

    /// The index the next reaped entry will have.
    pub fn used_seen(&self) -> u16 {
        self.used_seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn layout_and_queue_validate() {
        let m = mem();
        let ring = Ring::new(&m, 0, 0x1000, 256).unwrap();
        let layout = RingLayout::at(GuestAddress(0x1000), 256);
        assert_eq!(
            layout.footprint().next_multiple_of(4096),
            4096 + 4096 + 4096
        );
        let q = ring.queue(true).unwrap();
        assert_eq!(q.desc_table(), 0x1000);
        assert_eq!(q.avail_ring(), 0x2000);
        assert_eq!(q.used_ring(), 0x3000);
        assert!(q.event_idx_enabled());
    }

    #[test]
    fn device_sees_published_slots_in_order_and_reap_checks_order() {
        let m = mem();
        let mut ring = Ring::new(&m, 1, 0, 8).unwrap();
        for i in 0..8 {
            ring.set_desc(i, 0x10000 + u64::from(i) * 0x100, 0x100, 0)
                .unwrap();
        }
        let mut q = ring.queue(true).unwrap();
        ring.publish(3);
        ring.set_used_event(2);
        assert_eq!(ring.in_flight(), 3);
        let used_event: u16 = m
            .load(GuestAddress(q.avail_ring() + 4 + 16), Ordering::Acquire)
            .unwrap();
        assert_eq!(used_event, 2);
        let heads: Vec<u16> = q.iter(&m).unwrap().map(|c| c.head_index()).collect();
        assert_eq!(heads, vec![0, 1, 2]);
        for h in heads {
            q.add_used(&m, h, 7 + u32::from(h) * 0x10000).unwrap();
        }
        let mut seen = Vec::new();
        assert_eq!(ring.reap(|slot, len| seen.push((slot, len))).unwrap(), 3);
        assert_eq!(seen, vec![(0, 7), (1, 0x10007), (2, 0x20007)]);
        assert_eq!(ring.in_flight(), 0);

        // A device returning slot 4 before slot 3 is caught.
        ring.publish(2);
        let _ = q.iter(&m).unwrap().count();
        q.add_used(&m, 4, 0).unwrap();
        let err = ring.reap(|_, _| {}).unwrap_err();
        assert!(err.to_string().contains("expected 3"), "{err}");
    }
}
