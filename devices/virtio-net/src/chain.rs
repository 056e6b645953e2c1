// SPDX-License-Identifier: Apache-2.0
//! Descriptor chains to iovecs, treating every guest-provided index, length and address as
//! hostile.
//!
//! virtio-queue's chain iterator silently ends a chain at a bad `next` index or a bad
//! indirect table, which would turn a malformed chain into a shorter, plausible one. This
//! walker reports those cases as errors so the chain is returned with length 0 instead.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileSlice,
};

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;
/// Largest indirect table we accept (a `next` field cannot address more entries). How much of
/// it is walked is bounded by the queue size, like any chain.
const MAX_INDIRECT_ENTRIES: u32 = 1 << 16;
/// Largest iovec array the kernel accepts for readv/writev.
pub const MAX_IOV: usize = libc::UIO_MAXIOV as usize;

/// Why a descriptor chain is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ChainError {
    /// A head or `next` index points outside its table.
    #[error("descriptor index {index} is outside a table of {size} entries")]
    IndexOutOfRange {
        /// The index found.
        index: u16,
        /// Entries in the table.
        size: u32,
    },
    /// The descriptor table entry is not in guest memory.
    #[error("descriptor {index} of the table at {table:#x} is not in guest memory")]
    DescriptorUnreadable {
        /// Guest address of the table.
        table: u64,
        /// The entry index.
        index: u16,
    },
    /// The chain loops, or has more descriptors (direct and indirect together) than the
    /// queue size, which the spec forbids a driver to build.
    #[error("chain has more than {limit} descriptors")]
    TooLong {
        /// The limit: the queue size.
        limit: u32,
    },
    /// VIRTQ_DESC_F_INDIRECT without VIRTIO_RING_F_INDIRECT_DESC negotiated.
    #[error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect table contains another indirect descriptor.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT.
    #[error("indirect descriptor also has VIRTQ_DESC_F_NEXT")]
    IndirectWithNext,
    /// The indirect table length is zero, not a multiple of 16, or too large.
    #[error("indirect table length {len} is not a multiple of 16 between 16 and 1 MiB")]
    IndirectTableLen {
        /// The length found.
        len: u32,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer at {addr:#x} of {len} bytes is not in guest memory")]
    OutOfMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-writable descriptor where only device-readable ones belong (tx).
    #[error("device-writable descriptor in a chain the device must only read")]
    UnexpectedWritable,
    /// A device-readable descriptor where only device-writable ones belong (rx).
    #[error("device-readable descriptor in a chain the device must only write")]
    UnexpectedReadable,
    /// The chain needs more iovecs than readv/writev take.
    #[error("chain needs more than {max} buffer segments")]
    TooManySegments {
        /// The limit.
        max: usize,
    },
    /// The chain cannot even hold the vnet header.
    #[error("chain holds {len} bytes, fewer than the {need}-byte header")]
    TooShort {
        /// Bytes in the chain.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
}

/// Where a queue's descriptors live.
#[derive(Debug, Clone, Copy)]
pub struct DescTable {
    /// Guest address of the descriptor table.
    pub addr: GuestAddress,
    /// Number of entries (the queue size).
    pub size: u16,
    /// Whether indirect tables may be followed.
    pub indirect: bool,
}

/// One guest memory region: guest start, length, host address of its first byte.
#[derive(Debug, Clone, Copy)]
struct HostRegion {
    start: u64,
    len: u64,
    host: usize,
}

impl HostRegion {
    #[inline]
    fn host(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let offset = addr.checked_sub(self.start)?;
        // `offset + len <= self.len`: inside the region's mapping.
        (offset < self.len && len <= self.len - offset)
            .then(|| (self.host + offset as usize) as *mut u8)
    }
}

/// Guest memory with the host address of every region resolved once, for the data path:
/// translating a buffer is then a compare per region (one, for most VMs) instead of a
/// vm-memory lookup, and ring entries are read and written through plain host pointers.
///
/// It keeps a handle on the memory, so every host address it hands out stays mapped for as
/// long as it lives. A range not inside one region is not translated here (`None`): callers
/// fall back to vm-memory, which splits it or reports it.
#[derive(Debug, Clone)]
pub struct HostMem {
    mem: GuestMemoryMmap,
    /// The first region, inline: the data path touches no other cache line for it.
    first: HostRegion,
    /// The others.
    rest: Vec<HostRegion>,
}

impl HostMem {
    /// Resolves the regions of `mem` (a region without a host address is left out: ranges in
    /// it take vm-memory's path).
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        let mut regions = mem.iter().filter_map(|r| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            Some(HostRegion {
                start: r.start_addr().0,
                len: r.len(),
                host: host as usize,
            })
        });
        // An empty region translates nothing.
        let first = regions.next().unwrap_or(HostRegion {
            start: 0,
            len: 0,
            host: 0,
        });
        HostMem {
            mem: mem.clone(),
            first,
            rest: regions.collect(),
        }
    }

    /// The memory this view was built from.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The host address of `len` bytes at guest address `addr`, if they lie in one region.
    /// The address stays valid for writes and reads of `len` bytes while `self` lives.
    #[inline]
    pub fn host(&self, addr: GuestAddress, len: u64) -> Option<*mut u8> {
        self.first
            .host(addr.0, len)
            .or_else(|| self.rest.iter().find_map(|r| r.host(addr.0, len)))
    }
}

/// Where a chain's descriptors are read from.
enum TableSrc<'a> {
    /// A host pointer to the whole table, 8-byte aligned and valid for the table's entries
    /// while the [`HostMem`] it came from is borrowed.
    Host(*const u8),
    /// The table as one vm-memory slice.
    Slice(VolatileSlice<'a>),
    /// Entry by entry through vm-memory, which reports exactly which one is unreadable.
    Memory,
}

/// The descriptor table of `entries` entries at `base`, as directly readable as it can be:
/// when it lies in one memory region (always, for a sane driver) descriptors are read with a
/// bounds check instead of a guest-memory lookup each; with `host`, and the table 8-byte
/// aligned (a driver aligns it to 16), straight from its host address.
fn table_src<'a>(
    mem: &'a GuestMemoryMmap,
    host: Option<&HostMem>,
    base: GuestAddress,
    entries: u32,
) -> TableSrc<'a> {
    let len = u64::from(entries) * DESC_SIZE;
    if let Some(ptr) = host.and_then(|h| h.host(base, len)) {
        if (ptr as usize).is_multiple_of(8) {
            return TableSrc::Host(ptr);
        }
    }
    match usize::try_from(len)
        .ok()
        .and_then(|len| mem.get_slice(base, len).ok())
    {
        Some(slice) => TableSrc::Slice(slice),
        None => TableSrc::Memory,
    }
}

/// Reads descriptor `index` of a table at host address `table`.
///
/// # Safety
/// `table` must be 8-byte aligned and valid for reads of at least `index + 1` descriptors.
unsafe fn read_desc(table: *const u8, index: u16) -> Descriptor {
    // SAFETY: the caller guarantees the entry is inside the table and aligned; volatile
    // because the guest shares the memory (a torn read gives garbage, which is checked like
    // any other guest value).
    let (a, b) = unsafe {
        let p = table
            .add(usize::from(index) * DESC_SIZE as usize)
            .cast::<u64>();
        (
            std::ptr::read_volatile(p),
            std::ptr::read_volatile(p.add(1)),
        )
    };
    let b = u64::from_le(b);
    Descriptor::new(
        u64::from_le(a),
        b as u32,
        (b >> 32) as u16,
        (b >> 48) as u16,
    )
}

/// Calls `f` for every descriptor of the chain starting at `head`, following at most one
/// level of indirect table, and fails on any malformed link.
///
/// A chain may hold at most `table.size` (the queue size) descriptors, direct and indirect
/// together (virtio 1.x, 2.7.5.3.1: a driver must not build longer ones). That also bounds
/// the work one chain can cost, whatever the guest put in an indirect table's length: `f`
/// is called at most `table.size` times.
pub fn walk<F>(mem: &GuestMemoryMmap, table: DescTable, head: u16, f: F) -> Result<(), ChainError>
where
    F: FnMut(&Descriptor) -> Result<(), ChainError>,
{
    walk_in(mem, None, table, head, f)
}

/// [`walk`], translating tables through `host` when given.
fn walk_in<F>(
    mem: &GuestMemoryMmap,
    host: Option<&HostMem>,
    table: DescTable,
    head: u16,
    mut f: F,
) -> Result<(), ChainError>
where
    F: FnMut(&Descriptor) -> Result<(), ChainError>,
{
    let mut base = table.addr;
    let mut size = u32::from(table.size);
    let limit = size;
    let mut budget = limit;
    let mut index = head;
    let mut in_indirect = false;
    let mut src = table_src(mem, host, base, size);
    loop {
        if u32::from(index) >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        let unreadable = ChainError::DescriptorUnreadable {
            table: base.0,
            index,
        };
        let addr = base
            .0
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or_else(|| unreadable.clone())?;
        let desc: Descriptor = match &src {
            // SAFETY: `table_src` checked that the table's `size` entries lie in one region
            // of `host`'s memory (mapped while `host` is borrowed) and are 8-byte aligned;
            // `index < size` was checked above.
            TableSrc::Host(t) => unsafe { read_desc(*t, index) },
            TableSrc::Slice(s) => s
                .read_obj(usize::from(index) * DESC_SIZE as usize)
                .map_err(|_| unreadable)?,
            TableSrc::Memory => mem.read_obj(GuestAddress(addr)).map_err(|_| unreadable)?,
        };

        if desc.refers_to_indirect_table() {
            if !table.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if desc.has_next() {
                return Err(ChainError::IndirectWithNext);
            }
            let len = desc.len();
            let entries = len / DESC_SIZE as u32;
            if len == 0 || !len.is_multiple_of(DESC_SIZE as u32) || entries > MAX_INDIRECT_ENTRIES {
                return Err(ChainError::IndirectTableLen { len });
            }
            base = desc.addr();
            size = entries;
            src = table_src(mem, host, base, size);
            index = 0;
            in_indirect = true;
            continue;
        }

        if budget == 0 {
            return Err(ChainError::TooLong { limit });
        }
        budget -= 1;
        f(&desc)?;
        if !desc.has_next() {
            return Ok(());
        }
        index = desc.next();
    }
}

/// The host address of `slice`, for an iovec the kernel writes (`writable`) or reads.
fn slice_base(slice: &VolatileSlice<'_>, writable: bool) -> *mut u8 {
    if writable {
        slice.ptr_guard_mut().as_ptr()
    } else {
        slice.ptr_guard().as_ptr() as *mut u8
    }
}

/// Appends one iovec of `len` bytes at host address `base`, within `max_segments` in all.
fn push_iov(
    iov: &mut Vec<libc::iovec>,
    base: *mut u8,
    len: usize,
    max_segments: usize,
) -> Result<(), ChainError> {
    if iov.len() >= max_segments {
        return Err(ChainError::TooManySegments { max: max_segments });
    }
    iov.push(libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    });
    Ok(())
}

/// Appends the host iovecs of `len` bytes of guest memory at `addr`.
fn push_segments(
    mem: &GuestMemoryMmap,
    host: Option<&HostMem>,
    addr: GuestAddress,
    len: u32,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
    max_segments: usize,
) -> Result<(), ChainError> {
    let out_of_memory = || ChainError::OutOfMemory { addr: addr.0, len };
    // Fastest path: the buffer lies in one region whose host address is known.
    if let Some(ptr) = host.and_then(|h| h.host(addr, u64::from(len))) {
        return push_iov(iov, ptr, len as usize, max_segments);
    }
    // Fast path: the buffer lies in one region (get_slice refuses anything else, which then
    // takes the general path below and fails or splits there).
    if let Ok(slice) = mem.get_slice(addr, len as usize) {
        return push_iov(iov, slice_base(&slice, writable), slice.len(), max_segments);
    }
    for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
        let slice = slice.map_err(|_| out_of_memory())?;
        push_iov(iov, slice_base(&slice, writable), slice.len(), max_segments)?;
    }
    Ok(())
}

/// Appends the iovecs of a chain whose descriptors must all be device-readable (tx) or all
/// device-writable (rx), and returns the chain's byte length. `iov` may already hold
/// segments; the total is kept at or below `max_segments`. On error `iov` is left as it was.
/// `descs` is increased by the number of descriptors read, whether the chain was good or
/// not: callers budget their work in descriptors.
pub fn chain_iov(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
    max_segments: usize,
    descs: &mut usize,
) -> Result<usize, ChainError> {
    chain_iov_in(mem, None, table, head, writable, iov, max_segments, descs)
}

/// A queue's descriptor table in a [`HostMem`], its host address resolved once (for a batch
/// of chains) when the whole table lies in one region, 8-byte aligned.
#[derive(Clone, Copy)]
pub struct HostTable<'a> {
    host: &'a HostMem,
    table: DescTable,
    /// Host address of entry 0, valid for `table.size` entries while `host` is borrowed.
    ptr: Option<*const u8>,
}

impl HostMem {
    /// `table` with its host address resolved.
    pub fn table(&self, table: DescTable) -> HostTable<'_> {
        let ptr = self
            .host(table.addr, u64::from(table.size) * DESC_SIZE)
            .filter(|p| (*p as usize).is_multiple_of(8))
            .map(|p| p as *const u8);
        HostTable {
            host: self,
            table,
            ptr,
        }
    }
}

/// [`chain_iov`] over `host`'s memory, translating through its resolved regions (what the
/// data path uses); the same checks, the same errors.
///
/// The common chain, one direct descriptor whose buffer lies in one region (a mergeable
/// receive buffer, a small transmit frame), is handled here with the same checks in the
/// same order as [`walk`] would make them; anything else takes the general walk.
pub fn chain_iov_host(
    table: &HostTable<'_>,
    head: u16,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
    max_segments: usize,
    descs: &mut usize,
) -> Result<usize, ChainError> {
    if let Some(t) = table.ptr.filter(|_| head < table.table.size) {
        // SAFETY: `HostMem::table` checked that the table's `size` entries lie in one region
        // of `table.host` (borrowed, so mapped) and are 8-byte aligned; `head < size`.
        let desc = unsafe { read_desc(t, head) };
        let simple = !desc.has_next() && !desc.refers_to_indirect_table();
        if simple && desc.is_write_only() == writable && desc.len() > 0 {
            if let Some(ptr) = table.host.host(desc.addr(), u64::from(desc.len())) {
                *descs += 1;
                push_iov(iov, ptr, desc.len() as usize, max_segments)?;
                return Ok(desc.len() as usize);
            }
        }
    }
    chain_iov_in(
        table.host.memory(),
        Some(table.host),
        table.table,
        head,
        writable,
        iov,
        max_segments,
        descs,
    )
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn chain_iov_in(
    mem: &GuestMemoryMmap,
    host: Option<&HostMem>,
    table: DescTable,
    head: u16,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
    max_segments: usize,
    descs: &mut usize,
) -> Result<usize, ChainError> {
    let start = iov.len();
    let mut total: usize = 0;
    let result = walk_in(mem, host, table, head, |desc| {
        *descs += 1;
        if desc.is_write_only() != writable {
            return Err(if writable {
                ChainError::UnexpectedReadable
            } else {
                ChainError::UnexpectedWritable
            });
        }
        if desc.len() == 0 {
            return Ok(());
        }
        push_segments(
            mem,
            host,
            desc.addr(),
            desc.len(),
            writable,
            iov,
            max_segments,
        )?;
        total += desc.len() as usize;
        Ok(())
    });
    match result {
        Ok(()) => Ok(total),
        Err(e) => {
            iov.truncate(start);
            Err(e)
        }
    }
}

/// Writes `bytes` at byte `offset` of the buffer described by `iov` (used to set
/// `num_buffers` in a received header, which the tap leaves untouched). Returns whether all
/// bytes fit.
///
/// # Safety
/// Every iovec must point to memory valid for writes of `iov_len` bytes, as the ones built by
/// [`chain_iov`] with `writable = true` are while their guest memory is alive.
pub unsafe fn write_at(iov: &[libc::iovec], mut offset: usize, bytes: &[u8]) -> bool {
    let mut rest = bytes;
    for seg in iov {
        if rest.is_empty() {
            break;
        }
        if offset >= seg.iov_len {
            offset -= seg.iov_len;
            continue;
        }
        let n = rest.len().min(seg.iov_len - offset);
        let dst = seg.iov_base.cast::<u8>();
        for (i, b) in rest[..n].iter().enumerate() {
            // SAFETY: `offset + i < seg.iov_len`, and the caller guarantees the segment is
            // valid for writes of `iov_len` bytes. Volatile because the guest shares the
            // memory.
            unsafe { std::ptr::write_volatile(dst.add(offset + i), *b) };
        }
        rest = &rest[n..];
        offset = 0;
    }
    rest.is_empty()
}

/// Reads up to `out.len()` bytes at byte `offset` of the buffer described by `iov` into
/// `out`; returns how many it read.
///
/// # Safety
/// Every iovec must point to memory valid for reads of `iov_len` bytes, as the ones built by
/// [`chain_iov`] are while their guest memory is alive.
pub unsafe fn read_at(iov: &[libc::iovec], mut offset: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for seg in iov {
        if done == out.len() {
            break;
        }
        if offset >= seg.iov_len {
            offset -= seg.iov_len;
            continue;
        }
        let n = (out.len() - done).min(seg.iov_len - offset);
        let src = seg.iov_base.cast::<u8>();
        for (i, b) in out[done..done + n].iter_mut().enumerate() {
            // SAFETY: `offset + i < seg.iov_len`, and the caller guarantees the segment is
            // valid for reads of `iov_len` bytes. Volatile because the guest shares the
            // memory.
            *b = unsafe { std::ptr::read_volatile(src.add(offset + i)) };
        }
        done += n;
        offset = 0;
    }
    done
}
