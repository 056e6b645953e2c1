//! Linux multiqueue tap for mqvmm.
//!
//! Two sides:
//! - privileged: [`MultiQueueTap::create`] makes (or joins) a tap with
//!   IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE and opens one fd per queue (CAP_NET_ADMIN);
//! - unprivileged: [`adopt_queues`] / [`TapQueue::from_raw_fd`] validate fds passed in by a
//!   launcher and take ownership of them (`unsafe`: the caller vouches that nothing else owns
//!   those numbers), after which [`TapQueue::detach`] and [`TapQueue::attach`] (TUNSETQUEUE)
//!   switch queues off and on with no capability at all.
//!
//! [`steering`] maps the tap's eBPF steering map (made by the launcher) and publishes RSS
//! configurations into it, with no bpf() call.
//!
//! [`MacAddr`] is the one parser and text form of a MAC address (a device's, a tap's).
//!
//! Kernel facts this crate relies on (checked by the component tests): detaching a queue purges
//! its pending frames and the kernel renumbers the remaining queues; attaching an attached queue
//! (or detaching a detached one) fails with EINVAL; creating a tap needs CAP_NET_ADMIN, joining
//! one needs CAP_NET_ADMIN or the tap's owner/group — or nothing at all if the tap has neither.
//! The kernel still accepts frames *written* to a detached queue (and hands them to the host), so
//! [`TapQueue`] refuses I/O on queues it detached.

mod create;
mod error;
mod iface;
mod mac;
mod queue;
pub mod steering;
mod sys;

pub use create::{MultiQueueTap, TapConfig};
pub use error::Error;
pub use iface::{interface_mtu, link_state, validate_name, LinkState};
pub use mac::{MacAddr, ParseMacError};
pub use queue::{adopt_queues, TapQueue};

/// Request numbers of the tun ioctls a [`TapQueue`] issues once it exists, for a system call
/// filter that must allow exactly those.
pub mod ioctl {
    pub use crate::sys::{TUNGETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};
}

/// Most queues a tap can have (MAX_TAP_QUEUES in drivers/net/tun.c).
pub const MAX_QUEUES: u16 = 256;

// TUNSETOFFLOAD flags, from linux/if_tun.h.
/// The reader handles partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM).
pub const TUN_F_CSUM: u32 = 0x01;
/// TCPv4 segmentation offload (needs TUN_F_CSUM).
pub const TUN_F_TSO4: u32 = 0x02;
/// TCPv6 segmentation offload (needs TUN_F_CSUM).
pub const TUN_F_TSO6: u32 = 0x04;
/// TSO with the ECN bit (needs TUN_F_TSO4 or TUN_F_TSO6).
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// UDP fragmentation offload.
pub const TUN_F_UFO: u32 = 0x10;
/// UDP segmentation offload over IPv4 (kernel 6.2+, only together with TUN_F_USO6).
pub const TUN_F_USO4: u32 = 0x20;
/// UDP segmentation offload over IPv6 (kernel 6.2+, only together with TUN_F_USO4).
pub const TUN_F_USO6: u32 = 0x40;

#[cfg(test)]
mod tests {
    #[test]
    fn offload_flags_match_linux_headers() {
        assert_eq!(super::TUN_F_CSUM, libc::TUN_F_CSUM);
        assert_eq!(super::TUN_F_TSO4, libc::TUN_F_TSO4);
        assert_eq!(super::TUN_F_TSO6, libc::TUN_F_TSO6);
        assert_eq!(super::TUN_F_TSO_ECN, libc::TUN_F_TSO_ECN);
        assert_eq!(super::TUN_F_UFO, libc::TUN_F_UFO);
        assert_eq!(super::TUN_F_USO4, libc::TUN_F_USO4);
        assert_eq!(super::TUN_F_USO6, libc::TUN_F_USO6);
    }
}
