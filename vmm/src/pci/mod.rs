//! A PCI root bus for x86: one segment, bus 0, a host bridge at 00:00.0 and endpoint functions,
//! reached through the 0xCF8/0xCFC configuration mechanism ("conf1"); memory BARs live in one
//! 32-bit MMIO window that the DSDT's PCI root announces (see [`crate::arch::acpi`]).
//!
//! - [`config`]: a type-0 configuration space with per-bit write masks, memory BARs (sizing
//!   with all-ones writes falls out of the masks) and a capability list.
//! - [`msix`]: the MSI-X capability, table and pending-bit array, and the lock-free vector
//!   state the device's interrupt path uses (a masked vector latches its pending bit).
//! - [`root`]: the bus itself ([`PciRoot`]), the conf1 port device, the MMIO window device,
//!   and the host bridge. It decides where each BAR is decoded (memory decode on, naturally
//!   aligned, inside the window, no overlap) and tells the device when that changes, so the
//!   device can move what KVM knows about it (ioeventfds).
//! - [`kvm`]: [`PciPlatform`] on KVM: GSI routing (the default IOAPIC/PIC routes plus one MSI
//!   route per vector) and ioeventfd registration.
//!
//! Relocation by the guest is supported: Linux keeps valid firmware assignments, so in
//! practice a BAR only leaves and re-enters its place while the kernel sizes it (memory
//! decode off, all-ones written, the address written back, decode on).
//!
//! There is no ECAM (MMCONFIG): conf1 reaches the 256 bytes of every function's configuration
//! space, which is all a conventional PCI function without extended capabilities has. There is
//! no INTx either (interrupt pin 0): devices interrupt through MSI-X only.

pub mod config;
pub mod kvm;
pub mod msix;
pub mod root;

use std::io;

use vmm_sys_util::eventfd::EventFd;

pub use config::ConfigSpace;
pub use root::{HostBridge, PciConfigIo, PciMmioWindow, PciRoot};

/// A 32-bit MSI message as the guest writes it into an MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// What PCI devices ask of the hypervisor while the guest runs: KVM in mqvmm
/// ([`kvm::KvmPlatform`]), a recorder in unit tests. Called on vCPU threads (config and BAR
/// writes), so the KVM implementation's ioctls are in the vCPU seccomp filter.
pub trait PciPlatform: Send + Sync {
    /// Routes `gsi` to the MSI `message`. Routes are never removed: a vector that is masked
    /// or disabled keeps its route, its irqfd is just not written.
    fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> io::Result<()>;
    /// Makes a guest write of any length to MMIO `addr` signal `fd` instead of exiting.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes [`PciPlatform::register_ioevent`].
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}

/// A function on the root bus. Offsets in configuration space are 0..256; the root only calls
/// with accesses of 1, 2 or 4 bytes that stay within one dword.
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The memory BARs as programmed now: (BAR index, address, size) for each BAR the device
    /// has, whether or not its address is usable; `None` while memory decode is off.
    fn memory_bars(&self) -> Option<Vec<(u8, u64, u64)>>;
    /// The root decided that BAR `bar` is now decoded at `address` (`None`: not at all).
    fn bar_mapped(&mut self, bar: u8, address: Option<u64>);
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}

#[cfg(test)]
pub(crate) mod testing {
    //! A [`PciPlatform`] that records what devices asked for.
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Route(u32, MsiMessage),
        Register(i32, u64),
        Unregister(i32, u64),
    }

    /// Every call is recorded, also the ones it is told to fail (as KVM refusing them).
    #[derive(Default)]
    pub struct Recorder {
        pub calls: Mutex<Vec<Call>>,
        pub fail_routes: AtomicBool,
        pub fail_unregister: AtomicBool,
    }

    fn refused(fail: &AtomicBool) -> io::Result<()> {
        if fail.load(Ordering::Relaxed) {
            Err(io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            Ok(())
        }
    }

    impl Recorder {
        pub fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl PciPlatform for Recorder {
        fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> io::Result<()> {
            self.calls.lock().unwrap().push(Call::Route(gsi, message));
            refused(&self.fail_routes)
        }
        fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Register(fd.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Unregister(fd.as_raw_fd(), addr));
            refused(&self.fail_unregister)
        }
    }
}
