// SPDX-License-Identifier: Apache-2.0
//! The host side of one queue pair: a tap queue in production, fakes in tests.

use std::io;
use std::os::fd::AsRawFd;

/// Which backend operation failed (used in [`BackendError`] messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOp {
    /// Enable the queue (TUNSETQUEUE IFF_ATTACH_QUEUE for a tap).
    Attach,
    /// Disable the queue (TUNSETQUEUE IFF_DETACH_QUEUE for a tap).
    Detach,
    /// Ask whether the queue is enabled.
    QueryAttached,
    /// Set the vnet header size (TUNSETVNETHDRSZ).
    SetVnetHdrSize,
    /// Set the receive offloads (TUNSETOFFLOAD).
    SetOffload,
}

impl std::fmt::Display for BackendOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendOp::Attach => "attach",
            BackendOp::Detach => "detach",
            BackendOp::QueryAttached => "query attach state of",
            BackendOp::SetVnetHdrSize => "set vnet header size on",
            BackendOp::SetOffload => "set offloads on",
        })
    }
}

/// A failed control operation on a backend queue.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The operation failed; `source` says why (a tap error or an errno).
    #[error("cannot {op} backend queue {queue}")]
    Op {
        /// What was attempted.
        op: BackendOp,
        /// The backend's queue label (the pair index).
        queue: u16,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BackendError {
    /// Wraps any error as the failure of `op` on backend queue `queue`.
    pub fn new(
        op: BackendOp,
        queue: u16,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError::Op {
            op,
            queue,
            source: source.into(),
        }
    }

    /// The operation that failed.
    pub fn op(&self) -> BackendOp {
        match self {
            BackendError::Op { op, .. } => *op,
        }
    }
}

/// One host queue serving one virtqueue pair.
///
/// Frames carry the vnet header first (its size is set with `set_vnet_hdr_size`), exactly as
/// a tap with `IFF_VNET_HDR` reads and writes them. The fd must be non-blocking: `readv`
/// returns `WouldBlock` when no frame is queued. The worker polls the fd edge-triggered for
/// `EPOLLIN` while the pair is enabled and never touches it while the pair is parked.
pub trait Backend: Send + Sync + AsRawFd {
    /// Reads one whole frame (vnet header included) into `iov`.
    ///
    /// Returns the frame's full length, which exceeds the iovec capacity when the frame did
    /// not fit (the tap truncates silently and still reports the full length).
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes of `iov_len` bytes for the call.
    unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Writes one whole frame (vnet header included) gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of `iov_len` bytes for the call.
    unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Enables the queue (the host may queue frames on it again).
    fn attach(&self) -> Result<(), BackendError>;

    /// Disables the queue (the host stops queueing frames on it and drops what is queued).
    fn detach(&self) -> Result<(), BackendError>;

    /// Whether the queue is currently enabled.
    fn is_attached(&self) -> Result<bool, BackendError>;

    /// Sets the size of the vnet header that prefixes every frame.
    fn set_vnet_hdr_size(&self, size: i32) -> Result<(), BackendError>;

    /// Sets which offloads the receiving side (the guest) accepts, as `TUN_F_*` flags.
    fn set_offload(&self, tun_flags: u32) -> Result<(), BackendError>;

    /// The MTU of the host interface behind the queue, if it can be learned: the largest
    /// frame (without link-layer header) the host will hand to this queue. The device
    /// advertises it (VIRTIO_NET_F_MTU) when no MTU was configured, and sizes receive
    /// buffers by it; unknown means receive buffers are sized for the largest frame.
    fn mtu(&self) -> Option<u32> {
        None
    }

    /// Whether the host side accepts the TUNSETOFFLOAD `tun_flags` (asked once, at device
    /// creation, on an attached queue; the offloads in force afterwards are unspecified
    /// until the next [`Backend::set_offload`]). Backends that cannot tell keep the
    /// default, `false`, and such offloads are not offered.
    fn accepts_offload(&self, _tun_flags: u32) -> bool {
        false
    }

    /// Whether the host side of this queue is gone for good (for a tap: the interface was
    /// deleted while we hold its queue fds). Asked only after an operation failed. Backends
    /// that cannot disappear keep the default, `false`.
    fn is_gone(&self) -> bool {
        false
    }
}
