// SPDX-License-Identifier: Apache-2.0
//! Descriptor chains to iovecs, treating every guest-provided index, length and address as
//! hostile.
//!
//! virtio-queue's chain iterator silently ends a chain at a bad `next` index or a bad
//! indirect table, which would turn a malformed chain into a shorter, plausible one. This
//! walker reports those cases as errors so the chain is returned with length 0 instead.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

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

/// The descriptor table of `entries` entries at `base` as one host slice, when it lies in one
/// memory region (always, for a sane driver): descriptors are then read with a bounds check
/// instead of a guest-memory lookup each. `None` sends every read the slow way, which reports
/// exactly which entry is unreadable.
fn table_slice(
    mem: &GuestMemoryMmap,
    base: GuestAddress,
    entries: u32,
) -> Option<VolatileSlice<'_>> {
    let len = usize::try_from(u64::from(entries) * DESC_SIZE).ok()?;
    mem.get_slice(base, len).ok()
}

/// Calls `f` for every descriptor of the chain starting at `head`, following at most one
/// level of indirect table, and fails on any malformed link.
///
/// A chain may hold at most `table.size` (the queue size) descriptors, direct and indirect
/// together (virtio 1.x, 2.7.5.3.1: a driver must not build longer ones). That also bounds
/// the work one chain can cost, whatever the guest put in an indirect table's length: `f`
/// is called at most `table.size` times.
pub fn walk<F>(
    mem: &GuestMemoryMmap,
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
    let mut slice = table_slice(mem, base, size);
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
        let desc: Descriptor = match &slice {
            Some(s) => s
                .read_obj(usize::from(index) * DESC_SIZE as usize)
                .map_err(|_| unreadable)?,
            None => mem.read_obj(GuestAddress(addr)).map_err(|_| unreadable)?,
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
            slice = table_slice(mem, base, size);
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

fn host_iovec(slice: &VolatileSlice<'_>, writable: bool) -> libc::iovec {
    let base = if writable {
        slice.ptr_guard_mut().as_ptr()
    } else {
        slice.ptr_guard().as_ptr() as *mut u8
    };
    libc::iovec {
        iov_base: base.cast(),
        iov_len: slice.len(),
    }
}

/// Appends the host iovecs of `len` bytes of guest memory at `addr`.
fn push_segments(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
    max_segments: usize,
) -> Result<(), ChainError> {
    let out_of_memory = || ChainError::OutOfMemory { addr: addr.0, len };
    // Fast path: the buffer lies in one region (get_slice refuses anything else, which then
    // takes the general path below and fails or splits there).
    if let Ok(slice) = mem.get_slice(addr, len as usize) {
        if iov.len() >= max_segments {
            return Err(ChainError::TooManySegments { max: max_segments });
        }
        iov.push(host_iovec(&slice, writable));
        return Ok(());
    }
    for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
        let slice = slice.map_err(|_| out_of_memory())?;
        if iov.len() >= max_segments {
            return Err(ChainError::TooManySegments { max: max_segments });
        }
        iov.push(host_iovec(&slice, writable));
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
    let start = iov.len();
    let mut total: usize = 0;
    let result = walk(mem, table, head, |desc| {
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
        push_segments(mem, desc.addr(), desc.len(), writable, iov, max_segments)?;
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
