//! How the VM ends: the first reason reported wins and wakes the main loop.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, KVM system event).
    Reset,
    /// The VM cannot go on: a one-paragraph explanation for the operator.
    Error(String),
    /// The VMM was told to stop by a signal.
    Signal(i32),
    /// An operator asked for it on the API socket (`shutdown`).
    Shutdown,
}

impl VmExit {
    /// Process exit code: 0 when the guest ended itself or an operator ended it through the
    /// API socket, 1 on errors, 128+N on signals.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reset | VmExit::Shutdown => 0,
            VmExit::Error(_) => 1,
            VmExit::Signal(sig) => 128 + sig,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create the exit eventfd")]
pub struct Error(#[source] std::io::Error);

/// Shared by vCPUs and devices; cloning is cheap.
#[derive(Clone)]
pub struct ExitHandle {
    reason: Arc<Mutex<Option<VmExit>>>,
    event: Arc<EventFd>,
}

impl ExitHandle {
    pub fn new() -> Result<Self, Error> {
        Ok(ExitHandle {
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error)?),
        })
    }

    /// Records `exit` unless another reason was recorded first, and wakes the main loop.
    pub fn request(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
        }
        drop(reason);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_follow() {
        let h = ExitHandle::new().unwrap();
        assert_eq!(h.reason(), None);
        h.clone().request(VmExit::PowerOff);
        h.request(VmExit::Error("late".into()));
        assert_eq!(h.reason(), Some(VmExit::PowerOff));
        assert_eq!(h.event().read().unwrap(), 2);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Shutdown.exit_code(), 0);
        assert_eq!(VmExit::Error(String::new()).exit_code(), 1);
        assert_eq!(VmExit::Signal(15).exit_code(), 143);
    }
}
