// SPDX-License-Identifier: Apache-2.0
//! Pieces of fake and fault-injecting backends:
//! - [`FaultPlan`]: which call of which operation fails, counted across every backend that
//!   shares the plan;
//! - [`FaultyBackend`]: puts a plan in front of any [`Backend`] (a real tap queue, a fake);
//! - [`AttachState`]: the attach rules of a tap queue, for fake backends.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::{Backend, BackendError, BackendOp};

/// An operation a [`FaultPlan`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// [`Backend::attach`].
    Attach = 0,
    /// [`Backend::detach`].
    Detach = 1,
    /// [`Backend::set_vnet_hdr_size`].
    VnetHdr = 2,
    /// [`Backend::set_offload`].
    Offload = 3,
    /// [`Backend::is_attached`].
    Query = 4,
    /// A worker does not confirm it parked (a model `PairSwitch`).
    Park = 5,
    /// A worker does not confirm it resumed (a model `PairSwitch`).
    Resume = 6,
}

const FAULTS: usize = 7;

impl From<BackendOp> for Fault {
    fn from(op: BackendOp) -> Fault {
        match op {
            BackendOp::Attach => Fault::Attach,
            BackendOp::Detach => Fault::Detach,
            BackendOp::QueryAttached => Fault::Query,
            BackendOp::SetVnetHdrSize => Fault::VnetHdr,
            BackendOp::SetOffload => Fault::Offload,
        }
    }
}

/// Which calls fail. Calls are counted per operation from the plan's creation, across every
/// backend that shares it; a planned failure names the operation, the call (1-based) and the
/// errno. It fires once: the count only grows.
#[derive(Default)]
pub struct FaultPlan {
    calls: [AtomicU32; FAULTS],
    fail_at: Mutex<Vec<(Fault, u32, i32)>>,
}

impl FaultPlan {
    /// Makes the `k`-th call of `op` from now (1-based; 0 counts as 1) fail with EIO.
    pub fn fail_kth(&self, op: Fault, k: u32) {
        self.fail_kth_with(op, k, libc::EIO);
    }

    /// Makes the `k`-th call of `op` from now (1-based; 0 counts as 1) fail with `errno`
    /// (the errno the host gives when it cannot do it, say).
    pub fn fail_kth_with(&self, op: Fault, k: u32, errno: i32) {
        let done = self.calls[op as usize].load(Ordering::SeqCst);
        if let Ok(mut plan) = self.fail_at.lock() {
            plan.push((op, done.saturating_add(k.max(1)), errno));
        }
    }

    /// Counts a call of `op`; returns the error it fails with, if the plan says it fails.
    pub fn call(&self, op: Fault) -> Option<io::Error> {
        let n = self.calls[op as usize].fetch_add(1, Ordering::SeqCst) + 1;
        let plan = self.fail_at.lock().ok()?;
        plan.iter()
            .find(|&&(o, at, _)| o == op && at == n)
            .map(|&(_, _, errno)| io::Error::from_raw_os_error(errno))
    }

    /// Counts a call of backend operation `op` on backend queue `queue`; fails it if the plan
    /// says so.
    pub fn check(&self, op: BackendOp, queue: u16) -> Result<(), BackendError> {
        match self.call(op.into()) {
            Some(e) => Err(BackendError::new(op, queue, e)),
            None => Ok(()),
        }
    }
}

/// A backend whose control operations (attach, detach, query, vnet header size, offloads)
/// first ask a shared [`FaultPlan`]; every call the plan lets through, and everything else,
/// goes to the inner backend. The inner backend is kept in an `Arc`, so a harness can hold on
/// to it after the device took the wrapper.
pub struct FaultyBackend<B> {
    inner: Arc<B>,
    queue: u16,
    plan: Arc<FaultPlan>,
}

impl<B> FaultyBackend<B> {
    /// `inner`, named backend queue `queue` in the errors the plan causes, failing as `plan`
    /// says.
    pub fn new(queue: u16, inner: impl Into<Arc<B>>, plan: Arc<FaultPlan>) -> Self {
        FaultyBackend {
            inner: inner.into(),
            queue,
            plan,
        }
    }

    /// The backend behind the faults.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: AsRawFd> AsRawFd for FaultyBackend<B> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: our caller upholds readv's contract for `iov`; it is passed on unchanged.
        unsafe { self.inner.readv(iov) }
    }

    unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: our caller upholds writev's contract for `iov`; it is passed on unchanged.
        unsafe { self.inner.writev(iov) }
    }

    fn attach(&self) -> Result<(), BackendError> {
        self.plan.check(BackendOp::Attach, self.queue)?;
        self.inner.attach()
    }

    fn detach(&self) -> Result<(), BackendError> {
        self.plan.check(BackendOp::Detach, self.queue)?;
        self.inner.detach()
    }

    fn is_attached(&self) -> Result<bool, BackendError> {
        self.plan.check(BackendOp::QueryAttached, self.queue)?;
        self.inner.is_attached()
    }

    fn set_vnet_hdr_size(&self, size: i32) -> Result<(), BackendError> {
        self.plan.check(BackendOp::SetVnetHdrSize, self.queue)?;
        self.inner.set_vnet_hdr_size(size)
    }

    fn set_offload(&self, tun_flags: u32) -> Result<(), BackendError> {
        self.plan.check(BackendOp::SetOffload, self.queue)?;
        self.inner.set_offload(tun_flags)
    }

    fn mtu(&self) -> Option<u32> {
        self.inner.mtu()
    }

    fn is_gone(&self) -> bool {
        self.inner.is_gone()
    }
}

/// The attach state of a fake backend queue, under a tap queue's rules: attaching an attached
/// queue or detaching a detached one fails with EINVAL, and a read or write while detached
/// fails with EBADFD and is counted (a parked worker must make none).
pub struct AttachState {
    queue: u16,
    attached: AtomicBool,
    touched_detached: AtomicU64,
}

impl AttachState {
    /// Backend queue `queue` (its label in errors), attached or not.
    pub fn new(queue: u16, attached: bool) -> Self {
        AttachState {
            queue,
            attached: AtomicBool::new(attached),
            touched_detached: AtomicU64::new(0),
        }
    }

    /// The backend queue's label.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Whether the queue is attached now.
    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// Reads and writes tried while detached.
    pub fn touched_detached(&self) -> u64 {
        self.touched_detached.load(Ordering::SeqCst)
    }

    /// Before a read or write: EBADFD, counted, while detached.
    pub fn check_io(&self) -> io::Result<()> {
        if self.is_attached() {
            return Ok(());
        }
        self.touched_detached.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }

    /// Before `op` that needs an attached queue: EBADFD while detached.
    pub fn require_attached(&self, op: BackendOp) -> Result<(), BackendError> {
        if self.is_attached() {
            return Ok(());
        }
        Err(self.error(op, libc::EBADFD))
    }

    /// Attaches; EINVAL if attached.
    pub fn attach(&self) -> Result<(), BackendError> {
        if self.attached.swap(true, Ordering::SeqCst) {
            return Err(self.error(BackendOp::Attach, libc::EINVAL));
        }
        Ok(())
    }

    /// Detaches; EINVAL if detached.
    pub fn detach(&self) -> Result<(), BackendError> {
        if !self.attached.swap(false, Ordering::SeqCst) {
            return Err(self.error(BackendOp::Detach, libc::EINVAL));
        }
        Ok(())
    }

    /// `op` on this queue failed with `errno`.
    pub fn error(&self, op: BackendOp, errno: i32) -> BackendError {
        BackendError::new(op, self.queue, io::Error::from_raw_os_error(errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planned_failure_hits_the_kth_call_from_now_once() {
        let plan = FaultPlan::default();
        assert!(plan.call(Fault::Detach).is_none());
        plan.fail_kth_with(Fault::Detach, 2, libc::EBUSY);
        plan.fail_kth(Fault::Attach, 0);
        assert!(plan.call(Fault::Detach).is_none(), "first detach from now");
        let e = plan.call(Fault::Detach).expect("second detach fails");
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
        assert!(plan.call(Fault::Detach).is_none(), "once only");
        let e = plan.check(BackendOp::Attach, 3).unwrap_err();
        assert_eq!(e.op(), BackendOp::Attach);
        assert!(e.to_string().contains("queue 3"), "{e}");
        assert!(plan.check(BackendOp::Attach, 3).is_ok());
    }

    #[test]
    fn attach_state_follows_the_tap_rules() {
        let s = AttachState::new(1, true);
        assert!(s.check_io().is_ok());
        assert!(s.attach().is_err(), "attach of an attached queue");
        s.detach().unwrap();
        assert!(s.detach().is_err(), "detach of a detached queue");
        let e = s.check_io().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADFD));
        assert_eq!(s.touched_detached(), 1);
        assert!(s.require_attached(BackendOp::SetOffload).is_err());
        s.attach().unwrap();
        assert!(s.is_attached());
    }
}
