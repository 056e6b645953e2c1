//! The crate's error type.

use std::io;
use std::os::unix::io::RawFd;

/// Everything that can go wrong with a tap. Each variant names the fd, queue or interface concerned;
/// kernel failures keep their errno as the `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- adopting a passed fd ---
    #[error("fd {fd} (queue {queue}) is not an open file descriptor")]
    FdNotOpen { fd: RawFd, queue: u16 },
    #[error("cannot inspect fd {fd} (queue {queue})")]
    Inspect {
        fd: RawFd,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} (queue {queue}) is not a tap queue fd: it is {kind}")]
    NotTunFd { fd: RawFd, queue: u16, kind: String },
    #[error(
        "fd {fd} (queue {queue}) is an open /dev/net/tun fd that is not attached to any device"
    )]
    NotAttachedToDevice { fd: RawFd, queue: u16 },
    #[error("TUNGETIFF on fd {fd} (queue {queue}) failed")]
    GetIff {
        fd: RawFd,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} (queue {queue}) belongs to {name}, a layer-3 tun device, not a tap")]
    NotTap { fd: RawFd, queue: u16, name: String },
    #[error("fd {fd} (queue {queue}) belongs to tap {name}, which is single-queue (IFF_MULTI_QUEUE is not set)")]
    NotMultiQueue { fd: RawFd, queue: u16, name: String },
    #[error("fd {fd} (queue {queue}) belongs to tap {name}, which has no virtio-net header (IFF_VNET_HDR is not set)")]
    NoVnetHdr { fd: RawFd, queue: u16, name: String },
    #[error("fd {fd} (queue {queue}) belongs to tap {name}, which prepends packet information (IFF_NO_PI is not set)")]
    PacketInfo { fd: RawFd, queue: u16, name: String },
    #[error("fd {fd} (queue {queue}) belongs to tap {name}, but fd {first_fd} (queue 0) belongs to tap {first_name}: all fds must be queues of one tap")]
    DifferentDevice {
        fd: RawFd,
        queue: u16,
        name: String,
        first_fd: RawFd,
        first_name: String,
    },
    #[error("fd {fd} is given twice (queues {first_queue} and {queue})")]
    DuplicateFd {
        fd: RawFd,
        first_queue: u16,
        queue: u16,
    },
    #[error("fds {first_fd} (queue {first_queue}) and {fd} (queue {queue}) are the same open file, not two queues")]
    SameOpenFile {
        fd: RawFd,
        queue: u16,
        first_fd: RawFd,
        first_queue: u16,
    },
    #[error("no tap queue fds given")]
    NoQueues,
    #[error("{count} tap queues requested, but a tap supports 1 to {max}")]
    QueueCount { count: usize, max: u16 },
    #[error("cannot make fd {fd} (queue {queue}) non-blocking")]
    SetNonBlocking {
        fd: RawFd,
        queue: u16,
        #[source]
        source: io::Error,
    },

    // --- creating / joining a tap (privileged side) ---
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot open {path}")]
    OpenTun {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETIFF for tap {name} (queue {queue}) failed")]
    SetIff {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("interface {name} exists but is not a multiqueue tap")]
    ExistsNotMultiQueueTap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETOWNER({uid}) on tap {name} failed")]
    SetOwner {
        name: String,
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETGROUP({gid}) on tap {name} failed")]
    SetGroup {
        name: String,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETPERSIST({persist}) on tap {name} failed")]
    SetPersist {
        name: String,
        persist: bool,
        #[source]
        source: io::Error,
    },

    // --- operations on an adopted queue ---
    #[error("TUNSETQUEUE(IFF_ATTACH_QUEUE) on tap {name} queue {queue} failed")]
    Attach {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETQUEUE(IFF_DETACH_QUEUE) on tap {name} queue {queue} failed")]
    Detach {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("TUNGETIFF on tap {name} queue {queue} failed")]
    QueueState {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("TUNGETVNETHDRSZ on tap {name} queue {queue} failed")]
    GetVnetHdrSize {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETVNETHDRSZ({size}) on tap {name} queue {queue} failed")]
    SetVnetHdrSize {
        name: String,
        queue: u16,
        size: i32,
        #[source]
        source: io::Error,
    },
    #[error("TUNSETOFFLOAD({flags:#x}) on tap {name} queue {queue} failed")]
    SetOffload {
        name: String,
        queue: u16,
        flags: u32,
        #[source]
        source: io::Error,
    },

    // --- interface queries by name ---
    #[error("cannot open a socket for interface queries")]
    QuerySocket(#[source] io::Error),
    #[error("{request} on interface {name} failed")]
    InterfaceQuery {
        name: String,
        request: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno behind this error, if a system call failed (e.g. `libc::EPERM` from TUNSETIFF
    /// without CAP_NET_ADMIN, `libc::EINVAL` from attaching an attached queue).
    pub fn raw_os_error(&self) -> Option<i32> {
        std::error::Error::source(self)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
    }
}
