// SPDX-License-Identifier: Apache-2.0
//! [`Backend`] for a real tap queue.

use std::io;

use crate::backend::{Backend, BackendError, BackendOp};

impl Backend for tap::TapQueue {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: our caller guarantees every iovec is valid for writes for the call.
        unsafe { tap::TapQueue::readv(self, iov) }
    }

    unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: our caller guarantees every iovec is valid for reads for the call.
        unsafe { tap::TapQueue::writev(self, iov) }
    }

    fn attach(&self) -> Result<(), BackendError> {
        tap::TapQueue::attach(self)
            .map_err(|e| BackendError::new(BackendOp::Attach, self.queue(), e))
    }

    fn detach(&self) -> Result<(), BackendError> {
        tap::TapQueue::detach(self)
            .map_err(|e| BackendError::new(BackendOp::Detach, self.queue(), e))
    }

    fn is_attached(&self) -> Result<bool, BackendError> {
        tap::TapQueue::is_attached(self)
            .map_err(|e| BackendError::new(BackendOp::QueryAttached, self.queue(), e))
    }

    fn set_vnet_hdr_size(&self, size: i32) -> Result<(), BackendError> {
        tap::TapQueue::set_vnet_hdr_size(self, size)
            .map_err(|e| BackendError::new(BackendOp::SetVnetHdrSize, self.queue(), e))
    }

    fn set_offload(&self, tun_flags: u32) -> Result<(), BackendError> {
        tap::TapQueue::set_offload(self, tun_flags)
            .map_err(|e| BackendError::new(BackendOp::SetOffload, self.queue(), e))
    }

    fn accepts_offload(&self, tun_flags: u32) -> bool {
        // EINVAL for flags the kernel does not know (USO before Linux 6.2).
        tap::TapQueue::set_offload(self, tun_flags).is_ok()
    }

    fn mtu(&self) -> Option<u32> {
        // By name, in our network namespace: right as long as mqvmm runs where the
        // launcher opened the tap (the usual case); otherwise the lookup fails or finds
        // another interface of the same name, which is why an explicit mtu= wins.
        tap::TapQueue::mtu(self).ok()
    }

    fn is_gone(&self) -> bool {
        // Once the interface is unregistered, the queue's file has no tun device any more
        // and the kernel answers TUNGETIFF with EBADFD (attached or detached alike). Any
        // other answer, even another error, is no proof.
        matches!(
            tap::TapQueue::is_attached(self),
            Err(e) if e.raw_os_error() == Some(libc::EBADFD)
        )
    }
}
