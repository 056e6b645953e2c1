//! Thin wrappers around the system calls this crate needs. All `unsafe` of the crate lives here,
//! but for `steering`'s accesses to the memory it maps.

use std::io;
use std::os::raw::{c_int, c_short, c_uint, c_ulong};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

/// `IFNAMSIZ` from linux/if.h: interface names are at most 15 bytes plus the NUL.
pub const IFNAMSIZ: usize = 16;

const TUNTAP: c_uint = b'T' as c_uint;
// The size encoded in these numbers is the one linux/if_tun.h declares (int / unsigned int), even
// where the kernel actually copies a whole `struct ifreq` (TUNSETIFF, TUNGETIFF, TUNSETQUEUE):
// callers must always pass an `IfReq`, never a bare int, to those.
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETPERSIST, TUNTAP, 203, c_int);
ioctl_iow_nr!(TUNSETOWNER, TUNTAP, 204, c_int);
ioctl_iow_nr!(TUNSETGROUP, TUNTAP, 206, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, c_uint);
ioctl_ior_nr!(TUNGETVNETHDRSZ, TUNTAP, 215, c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);
ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, c_int);

/// `struct ifreq` (40 bytes on 64-bit Linux): the name, then a 24-byte union of which this crate
/// only uses the leading `short` (flags) or `int` (mtu).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct IfReq {
    name: [u8; IFNAMSIZ],
    ifru: [u8; 24],
}

impl IfReq {
    /// `name` must already be validated (shorter than IFNAMSIZ, no NUL); longer input is truncated.
    pub fn new(name: &str) -> Self {
        let mut ifr = IfReq {
            name: [0; IFNAMSIZ],
            ifru: [0; 24],
        };
        let bytes = name.as_bytes();
        let len = bytes.len().min(IFNAMSIZ - 1);
        ifr.name[..len].copy_from_slice(&bytes[..len]);
        ifr
    }

    pub fn with_flags(name: &str, flags: c_int) -> Self {
        let mut ifr = Self::new(name);
        // ifr_flags is a C short; every tun flag fits in 16 bits.
        ifr.ifru[..2].copy_from_slice(&(flags as c_short).to_ne_bytes());
        ifr
    }

    /// `ifr_flags`, zero-extended (IFF_TUN_EXCL is 0x8000, the sign bit of the short).
    pub fn flags(&self) -> c_int {
        c_int::from(u16::from_ne_bytes([self.ifru[0], self.ifru[1]]))
    }

    /// `ifr_mtu` (an int at the start of the union).
    pub fn int(&self) -> c_int {
        c_int::from_ne_bytes([self.ifru[0], self.ifru[1], self.ifru[2], self.ifru[3]])
    }

    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn tun_get_iff(fd: RawFd) -> io::Result<IfReq> {
    let mut ifr = IfReq::new("");
    // SAFETY: TUNGETIFF writes one `struct ifreq` (IfReq has its size and layout) into `ifr`, which
    // lives for the whole call; on fds that are not tun fds the kernel rejects the request without
    // touching memory.
    check(unsafe { ioctl_with_mut_ref(&fd, TUNGETIFF(), &mut ifr) })?;
    Ok(ifr)
}

/// TUNSETIFF; on success the kernel writes the device's real name back into `ifr`.
pub fn tun_set_iff(fd: RawFd, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, valid for the call.
    check(unsafe { ioctl_with_mut_ref(&fd, TUNSETIFF(), ifr) }).map(drop)
}

pub fn tun_set_queue(fd: RawFd, flags: c_int) -> io::Result<()> {
    let ifr = IfReq::with_flags("", flags);
    // SAFETY: TUNSETQUEUE only reads one `struct ifreq` (ifr_flags), which `ifr` is.
    check(unsafe { ioctl_with_ref(&fd, TUNSETQUEUE(), &ifr) }).map(drop)
}

pub enum TunValue {
    Persist,
    Owner,
    Group,
    Offload,
}

/// The TUNSET* requests whose argument is passed by value.
pub fn tun_set_value(fd: RawFd, which: TunValue, value: c_ulong) -> io::Result<()> {
    let req = match which {
        TunValue::Persist => TUNSETPERSIST(),
        TunValue::Owner => TUNSETOWNER(),
        TunValue::Group => TUNSETGROUP(),
        TunValue::Offload => TUNSETOFFLOAD(),
    };
    // SAFETY: these requests take their argument by value; no memory is passed to the kernel.
    check(unsafe { ioctl_with_val(&fd, req, value) }).map(drop)
}

pub fn tun_get_vnet_hdr_sz(fd: RawFd) -> io::Result<c_int> {
    let mut size: c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int into `size`, valid for the call.
    check(unsafe { ioctl_with_mut_ref(&fd, TUNGETVNETHDRSZ(), &mut size) })?;
    Ok(size)
}

pub fn tun_set_vnet_hdr_sz(fd: RawFd, size: c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int from `size`, valid for the call.
    check(unsafe { ioctl_with_ref(&fd, TUNSETVNETHDRSZ(), &size) }).map(drop)
}

/// F_GETFD: fails with EBADF when `fd` is not open.
pub fn fd_flags(fd: RawFd) -> io::Result<c_int> {
    // SAFETY: fcntl(F_GETFD) takes no pointer; any integer is a safe argument.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL/F_SETFL) takes no pointer; it only changes the file status flags.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `struct stat` is a valid value (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` into `st`, valid for the call.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// Whether two fds of this process are the same open file (kcmp KCMP_FILE). `None` when the kernel
/// cannot tell (kcmp not built in, or denied).
pub fn same_open_file(a: RawFd, b: RawFd) -> Option<bool> {
    const KCMP_FILE: c_int = 0;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: kcmp(KCMP_FILE) compares two fds of the given processes; it takes no pointers.
    let ret = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    match ret {
        0 => Some(true),
        1..=3 => Some(false),
        _ => None,
    }
}

/// `None` when no interface of that name exists in this network namespace.
pub fn if_nametoindex(name: &str) -> Option<u32> {
    let ifr = IfReq::new(name);
    // The name buffer is NUL-terminated: IfReq::new leaves at least the last byte zero.
    // SAFETY: `ifr.name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(ifr.name.as_ptr().cast()) };
    (index != 0).then_some(index)
}

pub fn open_query_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers.
    let fd =
        check(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIOCGIF* requests that read an `ifreq` for the interface `name` (validated by the caller).
pub fn interface_ioctl(sock: &OwnedFd, name: &str, request: c_ulong) -> io::Result<IfReq> {
    let mut ifr = IfReq::new(name);
    // SAFETY: the SIOCGIF* requests used here read and write one `struct ifreq`, which `ifr` is,
    // valid for the call.
    check(unsafe { ioctl_with_mut_ref(&sock.as_raw_fd(), request, &mut ifr) })?;
    Ok(ifr)
}

fn check_len(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    check_len(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    check_len(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })
}

/// # Safety
/// Every iovec must describe memory valid for writes for the duration of the call.
pub unsafe fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let count =
        c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees every iovec is writable memory; `iov` itself is a valid
    // array of `count` iovecs for the call.
    check_len(unsafe { libc::readv(fd, iov.as_ptr(), count) })
}

/// # Safety
/// Every iovec must describe memory valid for reads for the duration of the call.
pub unsafe fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let count =
        c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller guarantees every iovec is readable memory; `iov` itself is a valid
    // array of `count` iovecs for the call.
    check_len(unsafe { libc::writev(fd, iov.as_ptr(), count) })
}

/// The system's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Maps `len` bytes (a multiple of the page size) of `fd` from offset 0, or of anonymous memory
/// when `fd` is None, shared and read-write; zero-filled when anonymous.
pub fn mmap_shared(fd: Option<RawFd>, len: usize) -> io::Result<std::ptr::NonNull<u8>> {
    let (fd, flags) = match fd {
        Some(fd) => (fd, libc::MAP_SHARED),
        None => (-1, libc::MAP_SHARED | libc::MAP_ANONYMOUS),
    };
    // SAFETY: a new mapping at an address the kernel chooses: no existing memory is touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    std::ptr::NonNull::new(addr.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))
}

/// Unmaps a mapping made by [`mmap_shared`]; the caller must hold no reference into it.
pub fn munmap(addr: std::ptr::NonNull<u8>, len: usize) {
    // SAFETY: `addr` and `len` describe a mapping of mmap_shared that the caller owns and no
    // longer uses; munmap only fails for arguments that are not such a mapping.
    unsafe { libc::munmap(addr.as_ptr().cast(), len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_headers() {
        // Values from linux/if_tun.h as compiled for x86_64 (also what the libc crate declares).
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETPERSIST(), 0x4004_54cb);
        assert_eq!(TUNSETOWNER(), 0x4004_54cc);
        assert_eq!(TUNSETGROUP(), 0x4004_54ce);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNGETIFF(), 0x8004_54d2);
        assert_eq!(TUNGETVNETHDRSZ(), 0x8004_54d7);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert_eq!(TUNSETQUEUE(), 0x4004_54d9);
        assert_eq!(TUNSETIFF(), libc::TUNSETIFF as c_ulong);
        assert_eq!(TUNSETQUEUE(), libc::TUNSETQUEUE as c_ulong);
        assert_eq!(TUNGETIFF(), libc::TUNGETIFF as c_ulong);
    }

    #[test]
    fn ifreq_layout_and_fields() {
        assert_eq!(
            std::mem::size_of::<IfReq>(),
            std::mem::size_of::<libc::ifreq>()
        );
        let ifr = IfReq::with_flags("tap0", libc::IFF_TAP | libc::IFF_TUN_EXCL);
        assert_eq!(ifr.name(), "tap0");
        assert_eq!(ifr.flags(), libc::IFF_TAP | libc::IFF_TUN_EXCL);
        // A 16-byte name is truncated to 15 so the NUL terminator survives.
        assert_eq!(IfReq::new("0123456789abcdefg").name(), "0123456789abcde");
    }
}
