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

use std::sync::atomic::{AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// A driver-side ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory rejected an access (ring placed outside memory).
    #[error("ring access at guest address {addr:#x} failed")]
    Memory {
        /// Guest address accessed.
        addr: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// virtio-queue refused the queue size.
    #[error("virtio-queue refused a queue of {size} entries")]
    QueueSize {
        /// Requested size.
        size: u16,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The queue does not validate against guest memory.
    #[error("queue {index} at {desc:#x} is not valid in guest memory")]
    Invalid {
        /// Queue index (for the message).
        index: u16,
        /// Descriptor table address.
        desc: u64,
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

fn page(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

/// Bytes from a queue's base to the end of its used ring (page-aligned parts).
pub fn footprint(size: u16) -> u64 {
    page(16 * u64::from(size)) + page(6 + 2 * u64::from(size)) + page(6 + 8 * u64::from(size))
}

/// One split queue, driver side.
pub struct Ring {
    mem: GuestMemoryMmap,
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Host address of the avail ring (flags, idx, `ring[size]`, used_event).
    avail_host: *mut u8,
    /// Host address of the used ring (flags, idx, `ring[size]` of (id, len), avail_event).
    used_host: *mut u8,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of `size` entries laid out from `base` (descriptor table, then the avail and used
    /// rings, each page-aligned); zeroes the area. `index` names the queue in errors.
    pub fn new(mem: &GuestMemoryMmap, index: u16, base: u64, size: u16) -> Result<Ring, Error> {
        let avail = base + page(16 * u64::from(size));
        let used = avail + page(6 + 2 * u64::from(size));
        let zeros = vec![0u8; footprint(size) as usize];
        mem.write_slice(&zeros, GuestAddress(base))
            .map_err(|source| Error::Memory { addr: base, source })?;
        let host = |addr: u64, len: u64| {
            mem.get_slice(GuestAddress(addr), len as usize)
                .map(|s| s.ptr_guard_mut().as_ptr())
                .map_err(|source| Error::Memory { addr, source })
        };
        Ok(Ring {
            mem: mem.clone(),
            index,
            size,
            desc: base,
            avail,
            used,
            avail_host: host(avail, 6 + 2 * u64::from(size))?,
            used_host: host(used, 6 + 8 * u64::from(size))?,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// The device's view of this ring: a ready `virtio_queue::Queue`.
    pub fn queue(&self, event_idx: bool) -> Result<Queue, Error> {
        let mut q = Queue::new(self.size).map_err(|source| Error::QueueSize {
            size: self.size,
            source,
        })?;
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err(Error::Invalid {
                index: self.index,
                desc: self.desc,
            });
        }
        Ok(q)
    }

    /// Writes descriptor `i` of the table at `table` (the ring's own table, or an indirect one).
    pub fn write_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), Error> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = table + 16 * u64::from(i);
        mem.write_slice(&d, GuestAddress(at))
            .map_err(|source| Error::Memory { addr: at, source })
    }

    /// Writes descriptor `i` of this ring's table.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) -> Result<(), Error> {
        Self::write_desc(&self.mem, self.desc, i, addr, len, flags, 0)
    }

    fn avail_u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(offset + 2 <= 6 + 2 * usize::from(self.size) && offset.is_multiple_of(2));
        // SAFETY: `avail_host` is the host address of this ring's avail area (6 + 2 * size
        // bytes, resolved in `new` from `self.mem`, which keeps the mapping alive as long as
        // `self`); every caller passes an even offset inside it, and the area starts on a page,
        // so the u16 is aligned. The guest-memory contract is that it is shared, hence atomic.
        unsafe { AtomicU16::from_ptr(self.avail_host.add(offset).cast()) }
    }

    fn used_u16(&self, offset: usize) -> &AtomicU16 {
        debug_assert!(offset + 2 <= 6 + 8 * usize::from(self.size) && offset.is_multiple_of(2));
        // SAFETY: as for `avail_u16`, for the used area (6 + 8 * size bytes).
        unsafe { AtomicU16::from_ptr(self.used_host.add(offset).cast()) }
    }

    /// Makes the next `n` slots available (slot = position modulo size, so slot `i` is always
    /// descriptor `i`), then publishes the index with release ordering.
    pub fn publish(&mut self, n: u16) {
        let mut idx = self.avail_idx;
        for _ in 0..n {
            let slot = idx % self.size;
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
        self.avail_u16(4 + 2 * usize::from(self.size))
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
            let pos = usize::from(self.used_seen % self.size);
            let elem = 4 + 8 * pos;
            let half = |o: usize| u32::from(u16::from_le(self.used_u16(o).load(Ordering::Relaxed)));
            let id = half(elem) | half(elem + 2) << 16;
            let len = half(elem + 4) | half(elem + 6) << 16;
            let expected = self.used_seen % self.size;
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
    use virtio_queue::QueueOwnedT;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn layout_and_queue_validate() {
        let m = mem();
        let ring = Ring::new(&m, 0, 0x1000, 256).unwrap();
        assert_eq!(footprint(256), 4096 + 4096 + 4096);
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
