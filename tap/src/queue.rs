//! One queue of a multiqueue tap, and adoption of fds passed in by a privileged launcher.

use std::io;
use std::os::raw::c_int;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::iface::{self, LinkState};
use crate::sys::{self, TunValue};
use crate::{Error, MAX_QUEUES};

/// The flags every queue this crate works with must have.
pub(crate) const TAP_FLAGS: c_int =
    libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

/// Owns one queue fd of a multiqueue tap. The fd is non-blocking.
///
/// A detached queue's fd stays open; the kernel no longer steers frames to it, but (measured on
/// Linux 6.18) it still *accepts* frames written to it and delivers them to the host, its read
/// just reports EAGAIN, and poll() reports it writable, never an error. So this type refuses
/// I/O itself: after [`TapQueue::detach`] (and until [`TapQueue::attach`]) `read`, `readv`,
/// `write` and `writev` fail with EBADFD without reaching the kernel. A worker must also stop
/// polling a detached fd.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    if_name: String,
    queue: u16,
    /// Our view of the queue state: set by attach/detach/is_attached, initialised from TUNGETIFF.
    attached: AtomicBool,
}

impl TapQueue {
    /// Adopts a passed fd. Validates with TUNGETIFF that it is a queue of a tap with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE, sets O_NONBLOCK and takes ownership.
    /// `queue` is the label used in errors (the queue pair index).
    ///
    /// On error the fd is left open and still belongs to the caller. A queue that is currently
    /// detached is accepted ([`TapQueue::is_attached`] tells).
    ///
    /// IFF_NO_PI cannot be checked reliably: TUNGETIFF reports IFF_NOFILTER (the same bit) for
    /// every queue without a socket filter, so only a tap with packet information *and* a filter
    /// is caught here.
    ///
    /// # Safety
    /// `fd` must be open and owned by nobody else in this process (no `OwnedFd`, `File` or other
    /// holder uses or closes it): on success the returned queue owns it and closes it on drop.
    /// A number that is not open is refused ([`Error::FdNotOpen`]), not adopted.
    pub unsafe fn from_raw_fd(fd: RawFd, queue: u16) -> Result<TapQueue, Error> {
        let Validated { if_name, attached } = validate(fd, queue)?;
        sys::set_nonblocking(fd).map_err(|source| Error::SetNonBlocking { fd, queue, source })?;
        // SAFETY: the fd is open (validate checked it) and nobody else owns it (our contract).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TapQueue {
            fd,
            if_name,
            queue,
            attached: AtomicBool::new(attached),
        })
    }

    /// Binds a fresh `/dev/net/tun` fd to the multiqueue tap `name` with TUNSETIFF, creating the
    /// tap if no interface of that name exists (an empty name lets the kernel choose `tapN`).
    /// Needs CAP_NET_ADMIN (or, to join an existing tap, being its owner/group). This is what
    /// [`crate::MultiQueueTap::create`] does per queue.
    pub fn bind(tun: OwnedFd, name: &str, queue: u16) -> Result<TapQueue, Error> {
        if !name.is_empty() {
            iface::validate_name(name)?;
        }
        let shown = if name.is_empty() { "tap%d" } else { name };
        let mut ifr = sys::IfReq::with_flags(name, TAP_FLAGS);
        sys::tun_set_iff(tun.as_raw_fd(), &mut ifr).map_err(|source| {
            let exists = !name.contains('%') && sys::if_nametoindex(shown).is_some();
            if source.raw_os_error() == Some(libc::EINVAL) && exists {
                Error::ExistsNotMultiQueueTap {
                    name: shown.to_owned(),
                    source,
                }
            } else {
                Error::SetIff {
                    name: shown.to_owned(),
                    queue,
                    source,
                }
            }
        })?;
        // Joining a tap that already has queues keeps the device's flags, whatever we asked for:
        // check what we actually got.
        let raw = tun.as_raw_fd();
        let Validated { if_name, attached } = validate(raw, queue)?;
        sys::set_nonblocking(raw).map_err(|source| Error::SetNonBlocking {
            fd: raw,
            queue,
            source,
        })?;
        Ok(TapQueue {
            fd: tun,
            if_name,
            queue,
            attached: AtomicBool::new(attached),
        })
    }

    /// Name of the tap this queue belongs to.
    pub fn if_name(&self) -> &str {
        &self.if_name
    }

    /// The label given at adoption (the queue pair index).
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Re-enables this queue (TUNSETQUEUE IFF_ATTACH_QUEUE). Fails with EINVAL if it is attached.
    /// Needs no privilege.
    pub fn attach(&self) -> Result<(), Error> {
        let result = sys::tun_set_queue(self.raw(), libc::IFF_ATTACH_QUEUE);
        // EINVAL means the kernel does not consider this queue detached: it is attached.
        if result.is_ok() || is_einval(&result) {
            self.attached.store(true, Ordering::Release);
        }
        result.map_err(|source| Error::Attach {
            name: self.if_name.clone(),
            queue: self.queue,
            source,
        })
    }

    /// Disables this queue (TUNSETQUEUE IFF_DETACH_QUEUE): the kernel drops its pending frames and
    /// stops steering to it. Fails with EINVAL if it is already detached. Needs no privilege.
    pub fn detach(&self) -> Result<(), Error> {
        // Refuse I/O first, so no frame slips through between the kernel's detach and ours.
        let was = self.attached.swap(false, Ordering::AcqRel);
        let result = sys::tun_set_queue(self.raw(), libc::IFF_DETACH_QUEUE);
        // EINVAL means the kernel already considers this queue detached (or gone): stay refused.
        if result.is_err() && !is_einval(&result) {
            self.attached.store(was, Ordering::Release);
        }
        result.map_err(|source| Error::Detach {
            name: self.if_name.clone(),
            queue: self.queue,
            source,
        })
    }

    /// Whether the queue is attached, as the kernel reports it (TUNGETIFF's IFF_DETACH_QUEUE);
    /// also resynchronises the state that gates I/O, should another holder of the same open file
    /// have changed it.
    pub fn is_attached(&self) -> Result<bool, Error> {
        let attached = self.kernel_attached()?;
        self.attached.store(attached, Ordering::Release);
        Ok(attached)
    }

    /// Whether the kernel has the queue attached (TUNGETIFF), without touching the state that
    /// gates I/O: for an observer on another thread than the one that attaches and detaches,
    /// whose stale answer would otherwise overwrite a concurrent [`TapQueue::attach`] or
    /// [`TapQueue::detach`].
    pub fn kernel_attached(&self) -> Result<bool, Error> {
        let ifr = sys::tun_get_iff(self.raw()).map_err(|source| Error::QueueState {
            name: self.if_name.clone(),
            queue: self.queue,
            source,
        })?;
        Ok(ifr.flags() & libc::IFF_DETACH_QUEUE == 0)
    }

    /// The virtio-net header size the device uses (10 by default). It is per device, not per queue.
    pub fn vnet_hdr_size(&self) -> Result<i32, Error> {
        sys::tun_get_vnet_hdr_sz(self.raw()).map_err(|source| Error::GetVnetHdrSize {
            name: self.if_name.clone(),
            queue: self.queue,
            source,
        })
    }

    /// TUNSETVNETHDRSZ: 10 (legacy header) or 12 (with num_buffers); the kernel refuses < 10.
    /// Per device: setting it on one queue sets it for all. On rx the kernel fills the first 10
    /// bytes; older kernels skip the rest without writing it (6.18 zeroes it), so a 12-byte
    /// header's num_buffers is the reader's to fill.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), Error> {
        sys::tun_set_vnet_hdr_sz(self.raw(), size).map_err(|source| Error::SetVnetHdrSize {
            name: self.if_name.clone(),
            queue: self.queue,
            size,
            source,
        })
    }

    /// TUNSETOFFLOAD with `flags` built from the `TUN_F_*` constants (per device).
    pub fn set_offload(&self, flags: u32) -> Result<(), Error> {
        sys::tun_set_value(self.raw(), TunValue::Offload, libc::c_ulong::from(flags)).map_err(
            |source| Error::SetOffload {
                name: self.if_name.clone(),
                queue: self.queue,
                flags,
                source,
            },
        )
    }

    /// MTU of the tap, looked up by name in the caller's network namespace.
    pub fn mtu(&self) -> Result<u32, Error> {
        iface::interface_mtu(&self.if_name)
    }

    /// Administrative (IFF_UP) and operational (IFF_RUNNING) state of the tap, by name.
    pub fn link_state(&self) -> Result<LinkState, Error> {
        iface::link_state(&self.if_name)
    }

    /// Reads one frame (virtio-net header first) scattered over `iov`. Non-blocking: `WouldBlock`
    /// when nothing is pending; EBADFD when the queue is detached.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for writes for the duration of the call.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.check_attached()?;
        // SAFETY: the caller upholds readv's contract for `iov`.
        unsafe { sys::readv(self.raw(), iov) }
    }

    /// Writes one frame (virtio-net header first) gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads for the duration of the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.check_attached()?;
        // SAFETY: the caller upholds writev's contract for `iov`.
        unsafe { sys::writev(self.raw(), iov) }
    }

    /// Reads one frame (virtio-net header first) into `buf`; a frame longer than `buf` is truncated.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.check_attached()?;
        sys::read(self.raw(), buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.check_attached()?;
        sys::write(self.raw(), buf)
    }

    fn check_attached(&self) -> io::Result<()> {
        if self.attached.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EBADFD))
        }
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<TapQueue> for OwnedFd {
    fn from(queue: TapQueue) -> OwnedFd {
        queue.fd
    }
}

/// Adopts several passed fds as queues 0, 1, ... of one tap. Every fd is validated first (see
/// [`TapQueue::from_raw_fd`]); they must be distinct open files of the same tap device. On error
/// nothing is adopted and the error names the offending fd.
///
/// Devices are compared by name, in the fds' own terms: two taps of the same name in different
/// network namespaces are not told apart.
///
/// # Safety
/// Every fd must be open and owned by nobody else in this process: on success the returned
/// queues own them and close them on drop. Numbers that are not open, or given twice, are
/// refused before any is adopted.
pub unsafe fn adopt_queues(fds: &[RawFd]) -> Result<Vec<TapQueue>, Error> {
    if fds.is_empty() {
        return Err(Error::NoQueues);
    }
    if fds.len() > usize::from(MAX_QUEUES) {
        return Err(Error::QueueCount {
            count: fds.len(),
            max: MAX_QUEUES,
        });
    }
    // Queue labels fit in u16: checked against MAX_QUEUES above.
    let label = |i: usize| i as u16;
    for (i, &fd) in fds.iter().enumerate() {
        if let Some(first) = fds[..i].iter().position(|&other| other == fd) {
            return Err(Error::DuplicateFd {
                fd,
                first_queue: label(first),
                queue: label(i),
            });
        }
    }
    let mut checked = Vec::with_capacity(fds.len());
    for (i, &fd) in fds.iter().enumerate() {
        checked.push(validate(fd, label(i))?);
    }
    let names: Vec<&str> = checked.iter().map(|v| v.if_name.as_str()).collect();
    for (i, &fd) in fds.iter().enumerate().skip(1) {
        if names[i] != names[0] {
            return Err(Error::DifferentDevice {
                fd,
                queue: label(i),
                name: names[i].to_owned(),
                first_fd: fds[0],
                first_name: names[0].to_owned(),
            });
        }
        // Two fds sharing one open file (dup) would detach and attach together.
        if let Some(first) = (0..i).find(|&j| sys::same_open_file(fds[j], fd) == Some(true)) {
            return Err(Error::SameOpenFile {
                fd,
                queue: label(i),
                first_fd: fds[first],
                first_queue: label(first),
            });
        }
    }
    for (i, &fd) in fds.iter().enumerate() {
        sys::set_nonblocking(fd).map_err(|source| Error::SetNonBlocking {
            fd,
            queue: label(i),
            source,
        })?;
    }
    let queues = fds
        .iter()
        .zip(checked)
        .enumerate()
        .map(|(i, (&fd, Validated { if_name, attached }))| TapQueue {
            // SAFETY: every fd was validated as open and distinct above, and nobody else owns
            // them (our contract).
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            if_name,
            queue: label(i),
            attached: AtomicBool::new(attached),
        })
        .collect::<Vec<_>>();
    log::debug!(
        "adopted {} queues of tap {} (fds {:?})",
        queues.len(),
        queues[0].if_name,
        fds
    );
    Ok(queues)
}

fn is_einval(result: &io::Result<()>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

/// What validation learnt about a queue fd.
struct Validated {
    if_name: String,
    attached: bool,
}

/// Checks that `fd` is an open queue fd of a multiqueue tap with a vnet header.
fn validate(fd: RawFd, queue: u16) -> Result<Validated, Error> {
    match sys::fd_flags(fd) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
            return Err(Error::FdNotOpen { fd, queue });
        }
        Err(source) => return Err(Error::Inspect { fd, queue, source }),
    }
    let st = sys::fstat(fd).map_err(|source| Error::Inspect { fd, queue, source })?;
    let kind = describe(&st);
    // Only character devices (/dev/net/tun, or a macvtap/ipvtap node) can be tap queues; do not
    // send tun ioctls to sockets or files.
    if st.st_mode & libc::S_IFMT != libc::S_IFCHR {
        return Err(Error::NotTunFd { fd, queue, kind });
    }
    let ifr = match sys::tun_get_iff(fd) {
        Ok(ifr) => ifr,
        Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
            return Err(Error::NotAttachedToDevice { fd, queue });
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            return Err(Error::NotTunFd { fd, queue, kind });
        }
        Err(source) => return Err(Error::GetIff { fd, queue, source }),
    };
    let flags = ifr.flags();
    let name = ifr.name();
    if flags & libc::IFF_TAP == 0 {
        return Err(Error::NotTap { fd, queue, name });
    }
    if flags & libc::IFF_MULTI_QUEUE == 0 {
        return Err(Error::NotMultiQueue { fd, queue, name });
    }
    if flags & libc::IFF_VNET_HDR == 0 {
        return Err(Error::NoVnetHdr { fd, queue, name });
    }
    if flags & libc::IFF_NO_PI == 0 {
        return Err(Error::PacketInfo { fd, queue, name });
    }
    Ok(Validated {
        if_name: name,
        attached: flags & libc::IFF_DETACH_QUEUE == 0,
    })
}

fn describe(st: &libc::stat) -> String {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file".to_owned(),
        libc::S_IFDIR => "a directory".to_owned(),
        libc::S_IFIFO => "a pipe".to_owned(),
        libc::S_IFSOCK => "a socket".to_owned(),
        libc::S_IFBLK => "a block device".to_owned(),
        libc::S_IFLNK => "a symbolic link".to_owned(),
        libc::S_IFCHR => format!(
            "character device {}:{}",
            libc::major(st.st_rdev),
            libc::minor(st.st_rdev)
        ),
        // eventfd, epoll, signalfd, ... are anonymous inodes with no file type bits.
        _ => "an anonymous file (eventfd, epoll, ...)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::net::UnixDatagram;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into `fds`, valid for the call.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// An fd number that is not open in this process (tests run in parallel threads, so only a
    /// number far above anything the harness opens is safe to assume closed).
    const CLOSED_FD: RawFd = 987_654;

    #[test]
    fn closed_fd_is_refused_by_number() {
        // SAFETY: CLOSED_FD is not open, so nothing owns it; it is refused, not adopted.
        let err = unsafe { TapQueue::from_raw_fd(CLOSED_FD, 3) }.unwrap_err();
        assert!(
            matches!(
                err,
                Error::FdNotOpen {
                    fd: CLOSED_FD,
                    queue: 3
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "fd 987654 (queue 3) is not an open file descriptor"
        );
    }

    #[test]
    fn non_tun_fds_are_refused_and_left_open() {
        let (r, _w) = pipe();
        // SAFETY: `r` keeps the fd, which the contract allows only because nothing is adopted:
        // a pipe is no tap queue and is refused before ownership is taken (asserted below).
        // The same holds for the socket, the file and /dev/null below.
        let err = unsafe { TapQueue::from_raw_fd(r.as_raw_fd(), 0) }.unwrap_err();
        assert!(matches!(err, Error::NotTunFd { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&format!("fd {} ", r.as_raw_fd())),
            "{err}"
        );
        assert!(err.to_string().ends_with("it is a pipe"), "{err}");
        // Not adopted: still open and ours.
        assert!(sys::fd_flags(r.as_raw_fd()).is_ok());

        let sock = UnixDatagram::unbound().unwrap();
        // SAFETY: as above, a socket is refused.
        let err = unsafe { TapQueue::from_raw_fd(sock.as_raw_fd(), 1) }.unwrap_err();
        assert!(err.to_string().ends_with("it is a socket"), "{err}");

        let file = File::open("/proc/self/status").unwrap();
        // SAFETY: as above, a regular file is refused.
        let err = unsafe { TapQueue::from_raw_fd(file.as_raw_fd(), 1) }.unwrap_err();
        assert!(err.to_string().ends_with("it is a regular file"), "{err}");

        // A character device that is not a tun: the tun ioctl is refused with ENOTTY.
        let null = File::open("/dev/null").unwrap();
        // SAFETY: as above, a character device that is not a tun is refused.
        let err = unsafe { TapQueue::from_raw_fd(null.as_raw_fd(), 2) }.unwrap_err();
        assert!(matches!(err, Error::NotTunFd { .. }), "{err:?}");
        assert!(err.to_string().ends_with("character device 1:3"), "{err}");
    }

    #[test]
    fn unbound_tun_fd_is_refused() {
        let tun = match File::options().read(true).write(true).open("/dev/net/tun") {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skip: cannot open /dev/net/tun ({e})");
                return;
            }
        };
        // SAFETY: `tun` keeps the fd: an unbound tun fd is refused before ownership is taken.
        let err = unsafe { TapQueue::from_raw_fd(tun.as_raw_fd(), 0) }.unwrap_err();
        assert!(matches!(err, Error::NotAttachedToDevice { .. }), "{err:?}");
    }

    #[test]
    fn adopt_checks_the_list_before_any_fd() {
        // SAFETY: an empty list adopts nothing.
        assert!(matches!(unsafe { adopt_queues(&[]) }, Err(Error::NoQueues)));
        let (r, _w) = pipe();
        let fd = r.as_raw_fd();
        // SAFETY: `r` keeps its fd: a list naming an fd twice is refused before any is adopted.
        let err = unsafe { adopt_queues(&[fd, CLOSED_FD, fd]) }.unwrap_err();
        assert!(
            matches!(
                err,
                Error::DuplicateFd {
                    first_queue: 0,
                    queue: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("fd {fd} is given twice (queues 0 and 2)")
        );
        let many: Vec<RawFd> = (0..=i32::from(MAX_QUEUES)).collect();
        // SAFETY: more fds than a tap has queues are refused before any is looked at.
        let err = unsafe { adopt_queues(&many) };
        assert!(matches!(err, Err(Error::QueueCount { count: 257, .. })));
    }

    #[test]
    fn adopt_names_the_first_bad_fd() {
        let (r, _w) = pipe();
        // SAFETY: `r` keeps its fd: a list with a closed fd is refused before any is adopted.
        let err = unsafe { adopt_queues(&[CLOSED_FD, r.as_raw_fd()]) }.unwrap_err();
        assert!(
            matches!(
                err,
                Error::FdNotOpen {
                    fd: CLOSED_FD,
                    queue: 0
                }
            ),
            "{err:?}"
        );
        // SAFETY: as above; here the pipe, checked first, is what is refused.
        let err = unsafe { adopt_queues(&[r.as_raw_fd(), CLOSED_FD]) }.unwrap_err();
        assert!(matches!(err, Error::NotTunFd { queue: 0, .. }), "{err:?}");
    }

    #[test]
    fn same_open_file_is_detected_through_dup() {
        let (r, w) = pipe();
        let dup = r.try_clone().unwrap();
        match sys::same_open_file(r.as_raw_fd(), dup.as_raw_fd()) {
            Some(same) => assert!(same),
            None => eprintln!("skip: kcmp not available"),
        }
        assert_ne!(
            sys::same_open_file(r.as_raw_fd(), w.as_raw_fd()),
            Some(true)
        );
    }

    #[test]
    fn errno_is_kept() {
        let err = Error::Attach {
            name: "tap0".into(),
            queue: 1,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(
            err.to_string(),
            "TUNSETQUEUE(IFF_ATTACH_QUEUE) on tap tap0 queue 1 failed"
        );
        assert_eq!(Error::NoQueues.raw_os_error(), None);
    }
}
