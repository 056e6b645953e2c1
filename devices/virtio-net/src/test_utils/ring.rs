// SPDX-License-Identifier: Apache-2.0
//! The driver side of one split virtqueue (virtio 1.x, section 2.7), for every test, fuzz
//! target and benchmark that plays the driver.
//!
//! - [`RingLayout`]: where the descriptor table and the available and used rings lie, the
//!   device-side `Queue` over them, and raw access to every field. It writes what it is told
//!   wherever the layout says and returns the memory error: a fuzz target playing a hostile
//!   driver ignores it, a test unwraps it.
//! - [`write_chain`] / [`write_table`]: chains of readable and writable [`Segment`]s, in a
//!   ring's descriptor table or in an indirect table.
//! - [`SplitRing`]: a well-behaved driver with a free list. It adds chains, publishes them,
//!   asks for notifications as EVENT_IDX or the flags say, and pops used entries, checking
//!   everything the device could get wrong (an id never made available, a length beyond the
//!   chain's writable space, a used index running ahead) with a panic naming the queue and the
//!   values.
//!
//! Flag values are virtio-bindings' `VRING_*` constants, as the `u16` a descriptor or a ring
//! holds.

use std::fmt;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// `VRING_DESC_F_NEXT`: the chain continues in `next`.
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// `VRING_DESC_F_WRITE`: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver wants no interrupts (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
/// `VRING_USED_F_NO_NOTIFY`: the device wants no notifications (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

/// Bytes of one descriptor.
pub const DESC_LEN: u64 = 16;
const PAGE: u64 = 4096;

/// Bytes of the descriptor table of a queue of `size` entries.
pub const fn desc_table_len(size: u16) -> u64 {
    DESC_LEN * size as u64
}

/// Bytes of the available ring: flags, idx, `ring[size]`, used_event.
pub const fn avail_ring_len(size: u16) -> u64 {
    6 + 2 * size as u64
}

/// Bytes of the used ring: flags, idx, `ring[size]` of (id, len), avail_event.
pub const fn used_ring_len(size: u16) -> u64 {
    6 + 8 * size as u64
}

/// The EVENT_IDX test (virtio 1.x, 2.7.10): whether moving an index from `old` to `new`
/// crossed `event`, i.e. whether the other side asked to hear about entry `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A driver-side ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory refused the access (a ring or buffer placed outside it).
    #[error("{len}-byte ring access at guest address {addr:#x} failed")]
    Memory {
        /// Guest address accessed.
        addr: u64,
        /// Bytes accessed.
        len: usize,
        /// Why.
        #[source]
        source: GuestMemoryError,
    },
    /// virtio-queue refused the size or an address (misaligned, too large).
    #[error("virtio-queue refused the queue {layout} (maximum size {max_size})")]
    Refused {
        /// The queue asked for.
        layout: RingLayout,
        /// The maximum size given to virtio-queue.
        max_size: u16,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The queue does not validate against guest memory.
    #[error("the queue {layout} does not lie in guest memory")]
    OutsideMemory {
        /// The queue asked for.
        layout: RingLayout,
    },
}

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    val: T,
    addr: GuestAddress,
) -> Result<(), Error> {
    mem.write_obj(val, addr).map_err(|source| Error::Memory {
        addr: addr.0,
        len: size_of::<T>(),
        source,
    })
}

/// Stores a ring field with release ordering: what the driver wrote before (descriptors,
/// ring entries) is visible to the device before the field is.
fn store_u16(mem: &GuestMemoryMmap, val: u16, addr: GuestAddress) -> Result<(), Error> {
    mem.store(val.to_le(), addr, Ordering::Release)
        .map_err(|source| Error::Memory {
            addr: addr.0,
            len: 2,
            source,
        })
}

fn load_u16(mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<u16, Error> {
    mem.load(addr, Ordering::Acquire)
        .map(u16::from_le)
        .map_err(|source| Error::Memory {
            addr: addr.0,
            len: 2,
            source,
        })
}

fn zero(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), Error> {
    let zeros = vec![0u8; len as usize];
    mem.write_slice(&zeros, addr)
        .map_err(|source| Error::Memory {
            addr: addr.0,
            len: zeros.len(),
            source,
        })
}

/// Where the three parts of a split queue lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Entries.
    pub size: u16,
    /// The descriptor table.
    pub desc: GuestAddress,
    /// The available (driver) ring.
    pub avail: GuestAddress,
    /// The used (device) ring.
    pub used: GuestAddress,
}

impl fmt::Display for RingLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "of {} entries at desc {:#x}, avail {:#x}, used {:#x}",
            self.size, self.desc.0, self.avail.0, self.used.0
        )
    }
}

impl RingLayout {
    /// Descriptor table at `base`, then the available and used rings, each on its own 4 KiB
    /// page (more alignment than the spec's 16/2/4 bytes asks for).
    pub fn at(base: GuestAddress, size: u16) -> RingLayout {
        let avail = base.0 + desc_table_len(size).next_multiple_of(PAGE);
        let used = avail + avail_ring_len(size).next_multiple_of(PAGE);
        RingLayout {
            size,
            desc: base,
            avail: GuestAddress(avail),
            used: GuestAddress(used),
        }
    }

    /// Descriptor table at `base`, the available ring right after it, the used ring on the
    /// next 4-byte boundary: the spec's minimum alignment, for small guest memories.
    pub fn packed(base: GuestAddress, size: u16) -> RingLayout {
        let avail = base.0 + desc_table_len(size);
        let used = (avail + avail_ring_len(size)).next_multiple_of(4);
        RingLayout {
            size,
            desc: base,
            avail: GuestAddress(avail),
            used: GuestAddress(used),
        }
    }

    /// Bytes from the descriptor table to the end of the used ring (for layouts that put the
    /// parts in that order, as [`RingLayout::at`] and [`RingLayout::packed`] do).
    pub fn footprint(&self) -> u64 {
        self.used.0 + used_ring_len(self.size) - self.desc.0
    }

    /// Whether `addr` lies in the used ring (which the device writes).
    pub fn used_ring_contains(&self, addr: u64) -> bool {
        addr >= self.used.0 && addr < self.used.0 + used_ring_len(self.size)
    }

    /// The device-side queue as a transport builds it: `max_size` as the device's maximum,
    /// this size and these addresses (refused as virtio-queue refuses them), ready, with
    /// `event_idx` as negotiated, and valid in `mem`.
    pub fn queue(
        &self,
        max_size: u16,
        event_idx: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<Queue, Error> {
        let refused = |source| Error::Refused {
            layout: *self,
            max_size,
            source,
        };
        let mut q = Queue::new(max_size).map_err(refused)?;
        q.try_set_size(self.size).map_err(refused)?;
        q.try_set_desc_table_address(self.desc).map_err(refused)?;
        q.try_set_avail_ring_address(self.avail).map_err(refused)?;
        q.try_set_used_ring_address(self.used).map_err(refused)?;
        q.set_ready(true);
        q.set_event_idx(event_idx);
        if !q.is_valid(mem) {
            return Err(Error::OutsideMemory { layout: *self });
        }
        Ok(q)
    }

    /// Zeroes all three parts (flags, indices and events 0: a fresh queue).
    pub fn zero(&self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        zero(mem, self.desc, desc_table_len(self.size))?;
        zero(mem, self.avail, avail_ring_len(self.size))?;
        self.zero_used(mem)
    }

    /// Zeroes the used ring only.
    pub fn zero_used(&self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        zero(mem, self.used, used_ring_len(self.size))
    }

    /// Writes descriptor `index` of this queue's table (any index: a hostile driver may
    /// write past the table).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        desc: Descriptor,
    ) -> Result<(), Error> {
        write_descriptor(mem, desc_at(self.desc, index), desc)
    }

    /// Writes `segments` as one chain into this queue's table at descriptors `ids`; returns
    /// the chain's writable bytes. See [`write_chain`].
    pub fn write_chain(
        &self,
        mem: &GuestMemoryMmap,
        ids: &[u16],
        segments: &[Segment],
    ) -> Result<u32, Error> {
        write_chain(mem, self.desc, ids, segments)
    }

    /// Puts `head` in the available ring at position `pos` (slot `pos % size`); the device
    /// takes it once the available index passes `pos`.
    pub fn set_avail_ring(&self, mem: &GuestMemoryMmap, pos: u16, head: u16) -> Result<(), Error> {
        let slot = u64::from(pos % self.size);
        write_obj(mem, head.to_le(), GuestAddress(self.avail.0 + 4 + 2 * slot))
    }

    /// Writes the available index (release: the entries before it are visible first).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) -> Result<(), Error> {
        store_u16(mem, idx, GuestAddress(self.avail.0 + 2))
    }

    /// Writes the available ring's flags ([`AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) -> Result<(), Error> {
        store_u16(mem, flags, self.avail)
    }

    /// Writes used_event (EVENT_IDX: interrupt once the device passes this used index).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) -> Result<(), Error> {
        store_u16(mem, idx, self.used_event_addr())
    }

    /// The used ring's flags ([`USED_F_NO_NOTIFY`]).
    pub fn used_flags(&self, mem: &GuestMemoryMmap) -> Result<u16, Error> {
        load_u16(mem, self.used)
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, Error> {
        load_u16(mem, GuestAddress(self.used.0 + 2))
    }

    /// The used entry at position `pos` (slot `pos % size`), as the device wrote it:
    /// (id, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, pos: u16) -> Result<(u32, u32), Error> {
        let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(pos % self.size));
        let mut elem = [0u8; 8];
        mem.read_slice(&mut elem, at)
            .map_err(|source| Error::Memory {
                addr: at.0,
                len: elem.len(),
                source,
            })?;
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        Ok((id, len))
    }

    /// avail_event as the device wrote it (EVENT_IDX: notify once the driver passes this
    /// available index).
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> Result<u16, Error> {
        load_u16(mem, self.avail_event_addr())
    }

    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size))
    }

    fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size))
    }
}

fn desc_at(table: GuestAddress, index: u16) -> GuestAddress {
    GuestAddress(table.0 + DESC_LEN * u64::from(index))
}

/// Writes one descriptor at `at` (an entry of a ring's table or of an indirect table, or
/// anywhere a hostile driver puts one).
pub fn write_descriptor(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    desc: Descriptor,
) -> Result<(), Error> {
    write_obj(mem, desc, at)
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address of the buffer.
    pub addr: GuestAddress,
    /// Bytes.
    pub len: u32,
    /// The device writes it (receive buffers, the control ack byte).
    pub writable: bool,
}

impl Segment {
    /// A buffer the device reads.
    pub fn readable(addr: GuestAddress, len: u32) -> Segment {
        Segment {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: GuestAddress, len: u32) -> Segment {
        Segment {
            addr,
            len,
            writable: true,
        }
    }
}

/// Writes `segments` as one chain into the table at `table`: segment `k` at descriptor
/// `ids[k]`, [`DESC_F_WRITE`] on the writable ones, linked by [`DESC_F_NEXT`] to `ids[k + 1]`
/// (the last one's `next` is 0). Directions are taken as given, in any order (a test may
/// want a malformed chain). Returns the chain's writable bytes.
///
/// # Panics
/// If `ids` and `segments` differ in length.
pub fn write_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    ids: &[u16],
    segments: &[Segment],
) -> Result<u32, Error> {
    assert_eq!(
        ids.len(),
        segments.len(),
        "a chain of {} buffers at descriptors {ids:?}",
        segments.len()
    );
    let mut writable = 0u32;
    for (k, (seg, &id)) in segments.iter().zip(ids).enumerate() {
        let next = ids.get(k + 1).copied();
        let mut flags = 0;
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        if seg.writable {
            flags |= DESC_F_WRITE;
            writable = writable.saturating_add(seg.len);
        }
        let desc = Descriptor::new(seg.addr.0, seg.len, flags, next.unwrap_or(0));
        write_descriptor(mem, desc_at(table, id), desc)?;
    }
    Ok(writable)
}

/// Writes `segments` as an indirect table at `table` (entries 0, 1, ... linked in order);
/// returns the table's writable bytes. The descriptor pointing to it has length
/// `DESC_LEN * segments.len()` and [`DESC_F_INDIRECT`].
pub fn write_table(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    segments: &[Segment],
) -> Result<u32, Error> {
    let ids: Vec<u16> = (0..segments.len() as u16).collect();
    write_chain(mem, table, &ids, segments)
}

/// One entry the device put in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the chain.
    pub head: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// A well-behaved driver's state of one split queue: a free list of descriptors, chains added
/// and published, used entries popped and checked. Not shared: the owner calls it from one
/// thread; the device sees only guest memory.
#[derive(Debug)]
pub struct SplitRing {
    /// Virtqueue index (for messages and QueueNotify).
    index: u16,
    layout: RingLayout,
    event_idx: bool,
    /// Free descriptor indices; the last one is handed out next.
    free: Vec<u16>,
    /// Our own copy of each descriptor's `next` (the device must not be trusted to keep the
    /// table intact).
    next: Vec<u16>,
    /// Descriptors in the chain headed by each index; 0 when that index heads no chain.
    chain_len: Vec<u16>,
    /// Writable bytes of the chain headed by each index.
    chain_writable: Vec<u32>,
    /// Chains made available and not yet used.
    in_flight: u16,
    /// Available index including entries not yet published.
    next_avail: u16,
    /// Available index the device can see.
    published: u16,
    /// `published` when the last notification decision was made.
    notified_at: u16,
    /// Next used index to read.
    last_used: u16,
}

impl SplitRing {
    /// A queue whose rings are at `layout`; zeroes them (flags, indices, events) in guest
    /// memory. `event_idx` says whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn new(mem: &GuestMemoryMmap, index: u16, layout: RingLayout, event_idx: bool) -> Self {
        let size = layout.size;
        assert!(
            size.is_power_of_two(),
            "queue {index}: size {size} is not a power of two"
        );
        layout
            .zero(mem)
            .unwrap_or_else(|e| panic!("queue {index}: rings {layout}: {e}"));
        SplitRing {
            index,
            layout,
            event_idx,
            // Hand out descriptor 0 first (pop from the end).
            free: (0..size).rev().collect(),
            next: vec![0; usize::from(size)],
            chain_len: vec![0; usize::from(size)],
            chain_writable: vec![0; usize::from(size)],
            in_flight: 0,
            next_avail: 0,
            published: 0,
            notified_at: 0,
            last_used: 0,
        }
    }

    /// The virtqueue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Where the rings are.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Chains available to the device or being used by it.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The head index the next [`SplitRing::add`] will use (to place its buffers by head),
    /// or `None` when no descriptor is free.
    pub fn peek_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// The available index as published to the device.
    pub fn avail_idx(&self) -> u16 {
        self.published
    }

    /// Next used index this driver will read.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Writes a chain of `segments` (readable ones first) into the descriptor table and the
    /// available ring, unpublished. Returns its head, or `None` if not enough descriptors are
    /// free.
    pub fn add(&mut self, mem: &GuestMemoryMmap, segments: &[Segment]) -> Option<u16> {
        assert!(
            !segments.is_empty(),
            "queue {}: a chain needs at least one buffer",
            self.index
        );
        if let Some(w) = segments.iter().position(|s| s.writable) {
            assert!(
                segments[w..].iter().all(|s| s.writable),
                "queue {}: readable buffer after a writable one in {segments:?}",
                self.index
            );
        }
        if segments.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..segments.len())
            .map(|_| self.free.pop().expect("checked above"))
            .collect();
        let head = ids[0];
        let writable = self
            .layout
            .write_chain(mem, &ids, segments)
            .unwrap_or_else(|e| panic!("queue {}: chain at head {head}: {e}", self.index));
        for (k, &id) in ids.iter().enumerate() {
            self.next[usize::from(id)] = ids.get(k + 1).copied().unwrap_or(0);
        }
        self.chain_len[usize::from(head)] = segments.len() as u16;
        self.chain_writable[usize::from(head)] = writable;
        self.layout
            .set_avail_ring(mem, self.next_avail, head)
            .unwrap_or_else(|e| panic!("queue {}: avail ring: {e}", self.index));
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight += 1;
        Some(head)
    }

    /// Makes every added chain visible to the device (the store of `avail.idx` is a release:
    /// descriptors and ring entries are written before it). Returns how many were published.
    pub fn publish(&mut self, mem: &GuestMemoryMmap) -> u16 {
        let added = self.next_avail.wrapping_sub(self.published);
        if added == 0 {
            return 0;
        }
        self.layout
            .set_avail_idx(mem, self.next_avail)
            .unwrap_or_else(|e| panic!("queue {}: avail idx: {e}", self.index));
        self.published = self.next_avail;
        added
    }

    /// Whether the device wants a notification for what was published since the last call
    /// (used ring NO_NOTIFY flag, or `avail_event` with EVENT_IDX). Call after
    /// [`SplitRing::publish`]; the fence orders the index store before the flag load.
    pub fn needs_notify(&mut self, mem: &GuestMemoryMmap) -> bool {
        fence(Ordering::SeqCst);
        let old = self.notified_at;
        let new = self.published;
        self.notified_at = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            let event = self
                .layout
                .avail_event(mem)
                .unwrap_or_else(|e| panic!("queue {}: avail_event: {e}", self.index));
            need_event(event, new, old)
        } else {
            let flags = self
                .layout
                .used_flags(mem)
                .unwrap_or_else(|e| panic!("queue {}: used flags: {e}", self.index));
            flags & USED_F_NO_NOTIFY == 0
        }
    }

    /// The device's used index.
    pub fn device_used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        self.layout
            .used_idx(mem)
            .unwrap_or_else(|e| panic!("queue {}: used idx: {e}", self.index))
    }

    /// Used entries the device published that this driver has not read yet. Panics if the
    /// device claims more than is in flight.
    pub fn used_pending(&self, mem: &GuestMemoryMmap) -> u16 {
        let idx = self.device_used_idx(mem);
        let pending = idx.wrapping_sub(self.last_used);
        assert!(
            pending <= self.in_flight,
            "queue {}: device used index {idx} is {pending} ahead of ours ({}), but only {} chains are in flight",
            self.index,
            self.last_used,
            self.in_flight
        );
        pending
    }

    /// The `k`-th unread used entry, without consuming it; `None` if not yet published.
    /// Panics if the entry names a chain that is not in flight or claims more bytes than the
    /// chain can take.
    pub fn peek_used(&self, mem: &GuestMemoryMmap, k: u16) -> Option<Used> {
        if k >= self.used_pending(mem) {
            return None;
        }
        let pos = self.last_used.wrapping_add(k);
        let (id, len) = self.layout.used_elem(mem, pos).unwrap_or_else(|e| {
            panic!("queue {}: used entry {pos}: {e}", self.index);
        });
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.layout.size)
            .unwrap_or_else(|| {
                panic!(
                    "queue {}: used entry {pos} names descriptor {id}, beyond the queue size {}",
                    self.index, self.layout.size
                )
            });
        assert!(
            self.chain_len[usize::from(head)] != 0,
            "queue {}: used entry {pos} names descriptor {head}, which heads no chain in flight",
            self.index
        );
        let writable = self.chain_writable[usize::from(head)];
        assert!(
            len <= writable,
            "queue {}: used entry {pos} (head {head}) says {len} bytes written, but the chain has {writable} writable bytes",
            self.index
        );
        Some(Used { head, len })
    }

    /// Consumes the next used entry and frees its descriptors. With EVENT_IDX, asks for an
    /// interrupt at the next entry (used_event = our next used index).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<Used> {
        let used = self.peek_used(mem, 0)?;
        let mut id = used.head;
        let count = std::mem::take(&mut self.chain_len[usize::from(id)]);
        self.chain_writable[usize::from(id)] = 0;
        for i in 0..count {
            self.free.push(id);
            if i + 1 < count {
                id = self.next[usize::from(id)];
            }
        }
        self.in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            self.layout
                .set_used_event(mem, self.last_used)
                .unwrap_or_else(|e| panic!("queue {}: used_event: {e}", self.index));
        }
        Some(used)
    }

    /// Sets or clears [`AVAIL_F_NO_INTERRUPT`] (meaningful without EVENT_IDX).
    pub fn set_no_interrupt(&mut self, mem: &GuestMemoryMmap, no_interrupt: bool) {
        let flags = if no_interrupt {
            AVAIL_F_NO_INTERRUPT
        } else {
            0
        };
        self.layout
            .set_avail_flags(mem, flags)
            .unwrap_or_else(|e| panic!("queue {}: avail flags: {e}", self.index));
    }

    /// One line for failure messages.
    pub fn describe(&self, mem: &GuestMemoryMmap) -> String {
        let used = self.layout.used_idx(mem).ok();
        format!(
            "queue {} (size {}): avail idx {} published, {} in flight, driver used idx {}, device used idx {:?}, {} free descriptors",
            self.index,
            self.layout.size,
            self.published,
            self.in_flight,
            self.last_used,
            used,
            self.free.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueOwnedT;

    const SIZE: u16 = 8;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A driver ring at 0x1000 and a device-side virtio-queue `Queue` over the same memory.
    fn pair(mem: &GuestMemoryMmap, event_idx: bool) -> (SplitRing, Queue) {
        let layout = RingLayout::at(GuestAddress(0x1000), SIZE);
        let ring = SplitRing::new(mem, 3, layout, event_idx);
        let mut q = Queue::new(SIZE).unwrap();
        q.set_desc_table_address(Some(layout.desc.0 as u32), Some(0));
        q.set_avail_ring_address(Some(layout.avail.0 as u32), Some(0));
        q.set_used_ring_address(Some(layout.used.0 as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(mem));
        (ring, q)
    }

    #[test]
    fn need_event_follows_the_spec_formula() {
        // The other side wants to hear about entry 5: moving 4 -> 6 crosses it, 6 -> 8 not.
        assert!(need_event(5, 6, 4));
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 5, 4));
        assert!(!need_event(5, 8, 6));
        // Across the u16 wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(need_event(0, 2, 0xffff));
        assert!(!need_event(3, 2, 0xffff));
        // Nothing moved: never.
        assert!(!need_event(7, 7, 7));
    }

    #[test]
    fn layout_sizes_and_alignment() {
        assert_eq!(desc_table_len(256), 4096);
        assert_eq!(avail_ring_len(256), 518);
        assert_eq!(used_ring_len(256), 2054);
        let l = RingLayout::at(GuestAddress(0x10000), 256);
        assert_eq!(l.avail, GuestAddress(0x11000));
        assert_eq!(l.used, GuestAddress(0x12000));
        assert_eq!(l.footprint(), 0x2000 + 2054);
        let l = RingLayout::at(GuestAddress(0), 1024);
        assert_eq!(l.avail.0, 16384);
        assert_eq!(l.used.0, 16384 + 4096);
        // The used ring of 1024 entries is 8198 bytes: into a third page.
        assert_eq!(l.footprint(), 16384 + 4096 + 8198);
        assert_eq!(l.footprint().next_multiple_of(4096), 16384 + 4096 + 12288);
        // Packed: the avail ring right after the table, the used ring 4-byte aligned.
        let l = RingLayout::packed(GuestAddress(0x100), 2);
        assert_eq!(l.avail.0, 0x120);
        assert_eq!(l.used.0, 0x12c);
        assert_eq!(l.footprint(), 0x2c + 22);
        assert!(l.used_ring_contains(0x12c) && l.used_ring_contains(0x141));
        assert!(!l.used_ring_contains(0x12b) && !l.used_ring_contains(0x142));
    }

    #[test]
    fn queue_is_refused_where_a_transport_refuses_it() {
        let mem = memory();
        let l = RingLayout::at(GuestAddress(0x1000), SIZE);
        let q = l.queue(64, true, &mem).unwrap();
        assert_eq!(q.size(), SIZE);
        assert_eq!(q.desc_table(), 0x1000);
        assert_eq!(q.avail_ring(), 0x2000);
        assert_eq!(q.used_ring(), 0x3000);
        assert!(q.ready() && q.event_idx_enabled());
        let misaligned = RingLayout {
            desc: GuestAddress(0x1008),
            ..l
        };
        let err = misaligned.queue(64, false, &mem).unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err}");
        let outside = RingLayout::at(GuestAddress(1 << 20), SIZE);
        let err = outside.queue(64, false, &mem).unwrap_err();
        assert!(matches!(err, Error::OutsideMemory { .. }), "{err}");
        assert!(err.to_string().contains("desc 0x100000"), "{err}");
    }

    #[test]
    fn an_indirect_table_reaches_the_device_as_one_chain() {
        let mem = memory();
        let (_, mut q) = pair(&mem, false);
        let layout = RingLayout::at(GuestAddress(0x1000), SIZE);
        let segs = [
            Segment::readable(GuestAddress(0x9000), 12),
            Segment::readable(GuestAddress(0x9100), 100),
            Segment::writable(GuestAddress(0x9200), 7),
        ];
        let table = GuestAddress(0x8000);
        assert_eq!(write_table(&mem, table, &segs).unwrap(), 7);
        let len = (DESC_LEN * segs.len() as u64) as u32;
        layout
            .write_desc(&mem, 5, Descriptor::new(table.0, len, DESC_F_INDIRECT, 0))
            .unwrap();
        layout.set_avail_ring(&mem, 0, 5).unwrap();
        layout.set_avail_idx(&mem, 1).unwrap();
        let chains: Vec<_> = q
            .iter(&mem)
            .unwrap()
            .map(|c| {
                let head = c.head_index();
                (
                    head,
                    c.map(|d| (d.addr().0, d.len(), d.is_write_only()))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let want: Vec<(u64, u32, bool)> =
            segs.iter().map(|s| (s.addr.0, s.len, s.writable)).collect();
        assert_eq!(chains, [(5, want)]);
    }

    #[test]
    fn chains_round_trip_through_a_device_queue_across_index_wrap() {
        let mem = memory();
        let (mut ring, mut q) = pair(&mem, false);
        let buf = |head: u16| GuestAddress(0x8000 + 0x100 * u64::from(head));
        // 70 000 chains through an 8-entry queue: both 16-bit indices wrap.
        let mut total = 0u32;
        while total < 70_000 {
            // Fill the table with chains of 1 to 3 descriptors (readable then writable).
            let mut added = Vec::new();
            loop {
                let n = (total as usize + added.len()) % 3 + 1;
                let Some(head) = ring.peek_head() else { break };
                let mut segs = vec![Segment::readable(buf(head), 10)];
                for k in 1..n {
                    segs.push(Segment::writable(
                        GuestAddress(buf(head).0 + 0x10 * k as u64),
                        16,
                    ));
                }
                match ring.add(&mem, &segs) {
                    Some(h) => {
                        assert_eq!(h, head, "add uses the head peek_head announced");
                        added.push((h, segs));
                    }
                    None => break,
                }
            }
            assert!(!added.is_empty());
            assert_eq!(ring.publish(&mem), added.len() as u16);
            // The device sees exactly those chains, in order, with our buffers.
            let mut seen = Vec::new();
            for chain in q.iter(&mem).unwrap() {
                let head = chain.head_index();
                let descs: Vec<(u64, u32, bool)> = chain
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect();
                seen.push((head, descs));
            }
            assert_eq!(seen.len(), added.len());
            for ((h, segs), (dh, descs)) in added.iter().zip(&seen) {
                assert_eq!(h, dh);
                let want: Vec<(u64, u32, bool)> =
                    segs.iter().map(|s| (s.addr.0, s.len, s.writable)).collect();
                assert_eq!(&want, descs);
            }
            // Used in reverse order, each writing all it may.
            for (h, segs) in added.iter().rev() {
                let writable = segs.iter().filter(|s| s.writable).map(|s| s.len).sum();
                q.add_used(&mem, *h, writable).unwrap();
            }
            for (h, segs) in added.iter().rev() {
                let u = ring.pop_used(&mem).expect("used entry");
                let writable: u32 = segs.iter().filter(|s| s.writable).map(|s| s.len).sum();
                assert_eq!(
                    u,
                    Used {
                        head: *h,
                        len: writable
                    }
                );
            }
            assert!(ring.pop_used(&mem).is_none());
            assert_eq!(ring.in_flight(), 0);
            assert_eq!(ring.free_descriptors(), usize::from(SIZE));
            total += added.len() as u32;
        }
        assert_eq!(ring.avail_idx(), (total % 65536) as u16);
        assert_eq!(ring.last_used(), ring.avail_idx());
        assert_eq!(q.next_avail(), ring.avail_idx());
    }

    #[test]
    fn a_full_table_refuses_more_chains() {
        let mem = memory();
        let (mut ring, _) = pair(&mem, false);
        let seg = Segment::readable(GuestAddress(0x9000), 64);
        assert!(ring.add(&mem, &[seg; 5]).is_some());
        assert!(
            ring.add(&mem, &[seg; 4]).is_none(),
            "only 3 descriptors left"
        );
        assert!(ring.add(&mem, &[seg; 3]).is_some());
        assert_eq!(ring.peek_head(), None);
        assert!(ring.add(&mem, &[seg]).is_none());
        assert_eq!(ring.in_flight(), 2);
    }

    #[test]
    fn notification_suppression_without_event_idx() {
        let mem = memory();
        let (mut ring, mut q) = pair(&mem, false);
        let seg = Segment::readable(GuestAddress(0x9000), 64);
        ring.add(&mem, &[seg]).unwrap();
        ring.publish(&mem);
        assert!(ring.needs_notify(&mem), "notifications enabled by default");
        assert!(!ring.needs_notify(&mem), "nothing new published");
        q.disable_notification(&mem).unwrap();
        ring.add(&mem, &[seg]).unwrap();
        ring.publish(&mem);
        assert!(!ring.needs_notify(&mem), "device set NO_NOTIFY");
        assert!(
            q.enable_notification(&mem).unwrap(),
            "device sees pending chains"
        );
        ring.add(&mem, &[seg]).unwrap();
        ring.publish(&mem);
        assert!(ring.needs_notify(&mem));
    }

    #[test]
    fn event_idx_in_both_directions() {
        let mem = memory();
        let (mut ring, mut q) = pair(&mem, true);
        let seg = Segment::writable(GuestAddress(0x9000), 64);
        // Device asks to be notified at avail index 0 (its next_avail): the first publish
        // crosses it.
        assert!(!q.enable_notification(&mem).unwrap());
        ring.add(&mem, &[seg]).unwrap();
        ring.publish(&mem);
        assert!(ring.needs_notify(&mem));
        // Without a new request from the device (avail_event still 0), more chains need none.
        ring.add(&mem, &[seg]).unwrap();
        ring.publish(&mem);
        assert!(!ring.needs_notify(&mem));
        // The device consumes both and asks again at 2.
        let heads: Vec<u16> = q.iter(&mem).unwrap().map(|c| c.head_index()).collect();
        assert_eq!(heads.len(), 2);
        assert!(!q.enable_notification(&mem).unwrap());
        ring.add(&mem, &[seg]).unwrap();
        ring.publish(&mem);
        assert!(ring.needs_notify(&mem));

        // Interrupts: the driver's used_event starts at 0, so the first used entry signals.
        q.add_used(&mem, heads[0], 4).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
        // Not read by the driver yet: used_event still 0, the second entry needs no signal.
        q.add_used(&mem, heads[1], 4).unwrap();
        assert!(!q.needs_notification(&mem).unwrap());
        // Popping both moves used_event to 2: the device's next entry (index 2) signals.
        ring.pop_used(&mem).unwrap();
        ring.pop_used(&mem).unwrap();
        let third: Vec<u16> = q.iter(&mem).unwrap().map(|c| c.head_index()).collect();
        q.add_used(&mem, third[0], 4).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
    }

    #[test]
    #[should_panic(expected = "which heads no chain in flight")]
    fn used_entry_for_a_chain_not_in_flight_panics() {
        let mem = memory();
        let (mut ring, mut q) = pair(&mem, false);
        ring.add(&mem, &[Segment::readable(GuestAddress(0x9000), 8)])
            .unwrap();
        ring.publish(&mem);
        q.add_used(&mem, 5, 0).unwrap();
        ring.pop_used(&mem);
    }

    #[test]
    #[should_panic(expected = "writable bytes")]
    fn used_length_beyond_the_writable_space_panics() {
        let mem = memory();
        let (mut ring, mut q) = pair(&mem, false);
        let head = ring
            .add(
                &mem,
                &[
                    Segment::readable(GuestAddress(0x9000), 8),
                    Segment::writable(GuestAddress(0x9100), 100),
                ],
            )
            .unwrap();
        ring.publish(&mem);
        q.add_used(&mem, head, 101).unwrap();
        ring.pop_used(&mem);
    }

    #[test]
    #[should_panic(expected = "chains are in flight")]
    fn used_index_running_ahead_panics() {
        let mem = memory();
        let (ring, _) = pair(&mem, false);
        mem.store(
            3u16.to_le(),
            GuestAddress(ring.layout().used.0 + 2),
            Ordering::Release,
        )
        .unwrap();
        ring.used_pending(&mem);
    }

    #[test]
    #[should_panic(expected = "readable buffer after a writable one")]
    fn readable_after_writable_is_refused() {
        let mem = memory();
        let (mut ring, _) = pair(&mem, false);
        ring.add(
            &mem,
            &[
                Segment::writable(GuestAddress(0x9000), 8),
                Segment::readable(GuestAddress(0x9100), 8),
            ],
        );
    }
}
