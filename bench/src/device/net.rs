// SPDX-License-Identifier: Apache-2.0
//! The host side of the device-path benchmark: a private network namespace, the tap's queue
//! length, the packet-socket traffic source, per-thread CPU time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Setting up the host side failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// unshare(CLONE_NEWNET) failed (not root, or a container forbids it).
    #[error("cannot enter a new network namespace")]
    Unshare(#[source] io::Error),
    /// An interface ioctl failed.
    #[error("ioctl {what} on interface {name} failed")]
    Ioctl {
        /// Which request.
        what: &'static str,
        /// Interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The packet socket could not be created or configured.
    #[error("packet socket on {name}: {what} failed")]
    Packet {
        /// Interface.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Moves this thread (and every thread it starts later) into a new, empty network namespace,
/// and switches IPv6 off there so the kernel sends nothing of its own (router solicitations,
/// DAD) through the tap. Call before starting threads.
pub fn enter_private_netns() -> Result<(), Error> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Unshare(io::Error::last_os_error()));
    }
    for which in ["default", "all"] {
        // Absent when IPv6 is not built in: then there is nothing to switch off.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{which}/disable_ipv6"), "1");
    }
    Ok(())
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is valid (a name of NULs and a zeroed union).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()).take(15) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn query_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the interface's transmit queue length (for a tap: the size of each queue's ring of
/// frames waiting for the reader).
pub fn set_txqueuelen(name: &str, len: i32) -> Result<(), Error> {
    let err = |source| Error::Ioctl {
        what: "SIOCSIFTXQLEN",
        name: name.to_string(),
        source,
    };
    let sock = query_socket().map_err(err)?;
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_metric = len;
    // SAFETY: SIOCSIFTXQLEN reads one ifreq, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFTXQLEN, &ifr) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the interface up.
pub fn set_up(name: &str) -> Result<(), Error> {
    let err = |what, source| Error::Ioctl {
        what,
        name: name.to_string(),
        source,
    };
    let sock = query_socket().map_err(|e| err("socket", e))?;
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFFLAGS writes one ifreq, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } != 0 {
        return Err(err("SIOCGIFFLAGS", io::Error::last_os_error()));
    }
    // SAFETY: the kernel just filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads one ifreq, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } != 0 {
        return Err(err("SIOCSIFFLAGS", io::Error::last_os_error()));
    }
    Ok(())
}

/// CPU time this thread has used (user + system), in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The traffic source of the receive benchmark: an AF_PACKET socket that transmits through the
/// tap (the tap hands each frame to one of its queues, chosen by flow hash), with the
/// 10-byte virtio-net header in front of each frame (PACKET_VNET_HDR, so TSO frames pass as
/// one 64 KiB frame) and the qdisc bypassed. It never receives (bound with protocol 0).
pub struct Source {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
    name: String,
}

/// Frames per sendmmsg call.
const SEND_BATCH: usize = 64;

impl Source {
    /// A source transmitting through interface `name`.
    pub fn new(name: &str) -> Result<Source, Error> {
        let err = |what, source| Error::Packet {
            name: name.to_string(),
            what,
            source,
        };
        let index = std::ffi::CString::new(name)
            .map_err(|e| err("interface name", io::Error::other(e)))
            // SAFETY: the name is a valid NUL-terminated string for the call.
            .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) })?;
        if index == 0 {
            return Err(err("if_nametoindex", io::Error::last_os_error()));
        }
        // SAFETY: socket() takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("socket", io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid (integers and byte arrays).
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll for the call and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err("bind", io::Error::last_os_error()));
        }
        for (opt, what) in [
            (libc::PACKET_VNET_HDR, "PACKET_VNET_HDR"),
            (libc::PACKET_QDISC_BYPASS, "PACKET_QDISC_BYPASS"),
        ] {
            let one: libc::c_int = 1;
            // SAFETY: `one` is a valid c_int for the call and its size is passed.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(err(what, io::Error::last_os_error()));
            }
        }
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_halen = 6;
        Ok(Source {
            fd,
            addr,
            name: name.to_string(),
        })
    }

    /// Sends `msg` (10-byte virtio-net header, then the frame) `count` times.
    pub fn send(&self, msg: &[u8], count: usize) -> Result<(), Error> {
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        let mut addr = self.addr;
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for h in hdrs.iter_mut() {
            h.msg_hdr.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        let mut left = count;
        while left > 0 {
            let n = left.min(SEND_BATCH);
            // SAFETY: the first `n` headers point to `addr` and `iov`, which point to `msg`;
            // all stay alive and unmoved for the call.
            let sent =
                unsafe { libc::sendmmsg(self.fd.as_raw_fd(), hdrs.as_mut_ptr(), n as u32, 0) };
            if sent < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Packet {
                    name: self.name.clone(),
                    what: "sendmmsg",
                    source: e,
                });
            }
            left -= sent as usize;
        }
        Ok(())
    }
}
