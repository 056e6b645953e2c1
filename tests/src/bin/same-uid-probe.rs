//! same-uid-probe: what another process of the VMM's uid can take from a running VMM.
//!
//! `same-uid-probe UID:GID PID FD` drops to UID:GID with no capabilities (and no_new_privs),
//! then tries, against process PID:
//!
//!   pidfd_open(PID) and pidfd_getfd(pidfd, FD)   copy the VMM's fd FD (a tap queue, /dev/kvm)
//!   listing /proc/PID/fd                         see which files the VMM holds
//!
//! and prints one line: `pidfd_open=ok pidfd_getfd=errno:1 proc_fd=errno:13` (`ok` or the
//! errno of each step; `skipped` when pidfd_open failed). Exit 0 whatever the outcome, 2 for
//! bad arguments, 1 if the drop fails.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use mqvmm_tests::netns;

fn outcome(result: io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("errno:{}", e.raw_os_error().unwrap_or(0)),
    }
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers; a returned fd is owned by nobody else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by the kernel for this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<()> {
    // SAFETY: pidfd_getfd takes integers; a returned fd is owned by nobody else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just installed in this process by the kernel; closing it is all we do.
    drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    Ok(())
}

fn parse(args: &[String]) -> Option<(u32, u32, libc::pid_t, RawFd)> {
    let [ids, pid, fd] = args else { return None };
    let (uid, gid) = ids.split_once(':')?;
    Some((
        uid.parse().ok()?,
        gid.parse().ok()?,
        pid.parse().ok()?,
        fd.parse().ok()?,
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((uid, gid, pid, fd)) = parse(&args) else {
        eprintln!("usage: same-uid-probe UID:GID PID FD");
        std::process::exit(2);
    };
    if let Err(e) = netns::drop_privileges(uid, gid) {
        eprintln!("same-uid-probe: cannot drop to {uid}:{gid}: {e}");
        std::process::exit(1);
    }
    let (open, getfd) = match pidfd_open(pid) {
        Ok(pidfd) => ("ok".to_owned(), outcome(pidfd_getfd(&pidfd, fd))),
        Err(e) => (outcome(Err(e)), "skipped".to_owned()),
    };
    let proc_fd = outcome(std::fs::read_dir(format!("/proc/{pid}/fd")).map(drop));
    println!("pidfd_open={open} pidfd_getfd={getfd} proc_fd={proc_fd}");
}
