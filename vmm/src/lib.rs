//! mqvmm: a minimal KVM virtual machine monitor whose multiqueue virtio-net device maps each
//! virtqueue pair to one queue of a Linux multiqueue tap.
//!
//! The crate is split the way the data flows: [`arch`] lays out guest memory and boots Linux
//! (64-bit boot protocol, ACPI), [`vcpu`] runs KVM_RUN and dispatches exits to the [`bus`]es,
//! [`devices`] holds the platform devices, [`virtio`] the two transports (virtio-mmio, and
//! virtio-pci with MSI-X on the [`pci`] root bus) that host the `virtio-net` device, and [`vm`]
//! puts it together and runs the main loop. [`seccomp`] confines
//! every thread to the system calls its job needs once the VM is built. [`api`] is the
//! operator's control socket (`--api-socket`) and its JSON protocol.

pub mod api;
pub mod arch;
pub mod bus;
pub mod devices;
pub mod exit;
pub mod logger;
pub mod pci;
pub mod seccomp;
pub mod signals;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
