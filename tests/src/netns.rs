//! Network-namespace harness for the component tests that need a real tap (root, /dev/net/tun):
//! run a test body in a fresh network + mount namespace, read the kernel's view of a tap (sysfs
//! queue count, netlink IFLA_TUN_* attributes), pass fds to child processes at chosen numbers,
//! drop privileges in a helper, find the release binaries, and talk to the `tap-fdcheck` helper.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the test a re-executed test binary should run inside the namespace.
const NETNS_TEST_ENV: &str = "MQVMM_NETNS_TEST";
/// How long a namespaced test may run before it is killed.
const NETNS_TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the namespaced tests cannot run here, if they cannot (one line, for `skip:`).
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (creates network namespaces and taps)".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun (tun module not loaded?)".to_owned());
    }
    static PROBE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe_netns).clone()
}

/// A multiqueue tap named `name` with `queues` queues, owned by root: whether an unprivileged
/// process may join it must not depend on the kernel's rule for taps without an owner (it lets
/// anyone join those). Panics with the errno on failure.
pub fn root_owned_tap(name: &str, queues: u16) -> tap::MultiQueueTap {
    tap::MultiQueueTap::create(&tap::TapConfig {
        name: Some(name.to_owned()),
        queues,
        owner: Some(0),
        ..tap::TapConfig::default()
    })
    .unwrap_or_else(|e| panic!("create tap {name}: {e} ({:?})", e.raw_os_error()))
}

/// Whether the namespaced tests can run here; if not, says why through [`crate::skip::skip`]
/// (one `skip:` line, or a panic under `MQVMM_NO_SKIP=1`, so CI cannot skip them unseen).
pub fn require_netns() -> bool {
    match skip_reason() {
        Some(why) => crate::skip::skip(&why),
        None => true,
    }
}

/// Whether a child can enter new network and mount namespaces here (a container may forbid it).
fn probe_netns() -> Option<String> {
    let mut cmd = Command::new("/nonexistent-never-executed");
    enter_new_netns_on_exec(&mut cmd);
    // SAFETY: runs after the namespace setup, between fork and exec; _exit is async-signal-safe.
    // The child ends here, so the program named above is never executed.
    unsafe {
        cmd.pre_exec(|| libc::_exit(0));
    }
    match cmd.status() {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("cannot create network namespaces here ({status})")),
        Err(e) => Some(format!("cannot create network namespaces here ({e})")),
    }
}

/// Whether this process is the namespaced copy of a test started by [`run_in_netns`].
pub fn in_netns() -> bool {
    std::env::var_os(NETNS_TEST_ENV).is_some()
}

/// Runs `body` in a fresh network namespace with its own mount namespace (and a fresh sysfs on
/// /sys, so /sys/class/net shows the namespace's interfaces).
///
/// The test binary re-executes itself to run only the test named `test` (its name as given to
/// `--exact`, i.e. the function name for an integration test) with the namespaces already set up
/// in the child; the body runs there, and the parent asserts that the child ran exactly that test
/// and that it passed, printing its output.
pub fn run_in_netns(test: &str, body: impl FnOnce()) {
    if std::env::var(NETNS_TEST_ENV).as_deref() == Ok(test) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("current test executable");
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(NETNS_TEST_ENV, test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    enter_new_netns_on_exec(&mut cmd);
    let child = cmd
        .spawn()
        .expect("spawn the test binary in a new network namespace");
    let out = wait_with_timeout(child, NETNS_TEST_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "{test} failed in its network namespace ({})",
        out.status
    );
    // With --exact, "1 passed" means this very test ran (a wrong name would give "0 passed").
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the namespaced run did not run {test} (wrong test name given to run_in_netns?)"
    );
}

/// Makes `cmd`'s child unshare its network and mount namespaces and mount a fresh sysfs before exec.
pub fn enter_new_netns_on_exec(cmd: &mut Command) {
    let root = CString::new("/").expect("static path");
    let none = CString::new("none").expect("static string");
    let sys = CString::new("/sys").expect("static path");
    let sysfs = CString::new("sysfs").expect("static string");
    // SAFETY: the closure runs between fork and exec and only makes raw system calls
    // (unshare, mount) with pointers to CStrings allocated before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Keep our mounts (the new sysfs) out of the parent's mount namespace.
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // A sysfs mounted from inside the namespace shows its interfaces under /sys/class/net.
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(
                sysfs.as_ptr(),
                sys.as_ptr(),
                sysfs.as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for `child`, killing it after `timeout`; collects its piped output.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> std::process::Output {
    // Drain the pipes in threads so a chatty child cannot block on a full pipe.
    let stdout = child
        .stdout
        .take()
        .map(|s| std::thread::spawn(move || read_all(s)));
    let stderr = child
        .stderr
        .take()
        .map(|s| std::thread::spawn(move || read_all(s)));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!(
                "child {} still running after {timeout:?}; killed",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    std::process::Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

fn read_all(mut r: impl io::Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf);
    buf
}

// ---------------------------------------------------------------------------------------------
// The kernel's view of a tap.

/// Number of `/sys/class/net/<ifname>/queues/tx-*` entries: the tap's attached queue count
/// (the kernel keeps at least one, even with no queue attached).
pub fn tx_queue_count(ifname: &str) -> io::Result<usize> {
    queue_count(ifname, "tx-")
}

/// Number of `/sys/class/net/<ifname>/queues/rx-*` entries.
pub fn rx_queue_count(ifname: &str) -> io::Result<usize> {
    queue_count(ifname, "rx-")
}

fn queue_count(ifname: &str, prefix: &str) -> io::Result<usize> {
    let dir = format!("/sys/class/net/{ifname}/queues");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir)? {
        if entry?.file_name().to_string_lossy().starts_with(prefix) {
            n += 1;
        }
    }
    Ok(n)
}

/// The tun attributes netlink reports for a tap (RTM_GETLINK, IFLA_LINKINFO / IFLA_INFO_DATA).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunInfo {
    pub kind: String,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// IFLA_TUN_TYPE: IFF_TUN (1) or IFF_TAP (2).
    pub tun_type: u8,
    pub pi: bool,
    pub vnet_hdr: bool,
    pub persist: bool,
    pub multi_queue: bool,
    /// IFLA_TUN_NUM_QUEUES: attached queues.
    pub num_queues: u32,
    /// IFLA_TUN_NUM_DISABLED_QUEUES: detached queues.
    pub num_disabled: u32,
}

// From linux/if_link.h and linux/rtnetlink.h.
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PI: u16 = 4;
const IFLA_TUN_VNET_HDR: u16 = 5;
const IFLA_TUN_PERSIST: u16 = 6;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFLA_TUN_NUM_DISABLED_QUEUES: u16 = 9;
const NLA_F_MASK: u16 = 0x3fff; // strip NLA_F_NESTED / NLA_F_NET_BYTEORDER

/// Asks the kernel (rtnetlink) for the tun attributes of `ifname`.
pub fn tun_info(ifname: &str) -> io::Result<TunInfo> {
    let index = if_index(ifname)?;
    // SAFETY: socket() takes no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // struct nlmsghdr (16 bytes) + struct ifinfomsg (16 bytes).
    let mut req = Vec::with_capacity(32);
    req.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&libc::RTM_GETLINK.to_ne_bytes()); // nlmsg_type
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
    req.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    req.push(libc::AF_UNSPEC as u8); // ifi_family
    req.push(0); // pad
    req.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    req.extend_from_slice(&(index as i32).to_ne_bytes()); // ifi_index
    req.extend_from_slice(&0u32.to_ne_bytes()); // ifi_flags
    req.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
                                                // SAFETY: `req` is valid for reads of its length for the call.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: `buf` is valid for writes of its length for the call.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    parse_getlink_reply(&buf[..n])
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {what}"))
}

fn u16_at(b: &[u8], at: usize) -> io::Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
        .ok_or_else(|| invalid("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| invalid("truncated"))
}

/// Splits a run of netlink attributes into (type, payload).
fn attributes(mut b: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & NLA_F_MASK;
        if len < 4 || len > b.len() {
            return Err(invalid("bad attribute length"));
        }
        out.push((ty, &b[4..len]));
        let aligned = (len + 3) & !3;
        b = &b[aligned.min(b.len())..];
    }
    Ok(out)
}

fn parse_getlink_reply(msg: &[u8]) -> io::Result<TunInfo> {
    let len = u32_at(msg, 0)? as usize;
    let ty = u16_at(msg, 4)?;
    if ty == libc::NLMSG_ERROR as u16 {
        let errno = u32_at(msg, 16)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if ty != libc::RTM_NEWLINK {
        return Err(invalid("not RTM_NEWLINK"));
    }
    let body = msg
        .get(32..len)
        .ok_or_else(|| invalid("truncated message"))?;
    let mut info = TunInfo::default();
    for (ty, payload) in attributes(body)? {
        if ty != IFLA_LINKINFO {
            continue;
        }
        for (ty, payload) in attributes(payload)? {
            match ty {
                IFLA_INFO_KIND => {
                    info.kind = String::from_utf8_lossy(payload)
                        .trim_end_matches('\0')
                        .to_owned()
                }
                IFLA_INFO_DATA => parse_tun_data(payload, &mut info)?,
                _ => {}
            }
        }
    }
    if info.kind != "tun" {
        return Err(invalid(&format!("interface kind {:?}, not tun", info.kind)));
    }
    Ok(info)
}

fn parse_tun_data(data: &[u8], info: &mut TunInfo) -> io::Result<()> {
    for (ty, p) in attributes(data)? {
        let byte = || {
            p.first()
                .copied()
                .ok_or_else(|| invalid("empty u8 attribute"))
        };
        match ty {
            IFLA_TUN_OWNER => info.owner = Some(u32_at(p, 0)?),
            IFLA_TUN_GROUP => info.group = Some(u32_at(p, 0)?),
            IFLA_TUN_TYPE => info.tun_type = byte()?,
            IFLA_TUN_PI => info.pi = byte()? != 0,
            IFLA_TUN_VNET_HDR => info.vnet_hdr = byte()? != 0,
            IFLA_TUN_PERSIST => info.persist = byte()? != 0,
            IFLA_TUN_MULTI_QUEUE => info.multi_queue = byte()? != 0,
            IFLA_TUN_NUM_QUEUES => info.num_queues = u32_at(p, 0)?,
            IFLA_TUN_NUM_DISABLED_QUEUES => info.num_disabled = u32_at(p, 0)?,
            _ => {}
        }
    }
    Ok(())
}

pub fn if_index(ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `name` is a NUL-terminated string valid for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid (a name of NULs and a zeroed union).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= ifr.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(ifr)
}

/// Sets `ifname` up (SIOCSIFFLAGS |= IFF_UP); needs CAP_NET_ADMIN.
pub fn set_link_up(ifname: &str) -> io::Result<()> {
    let mut ifr = ifreq(ifname)?;
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write one ifreq, valid for each call; the union
    // field read is the one the kernel just wrote.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Inside a test run by [`run_in_netns`]: replaces `/dev/net/tun`, in the test's own mount
/// namespace only, by a node of the same device that every uid may open (mode 0666, as most
/// distributions ship it; some hosts have 0600), so that an unprivileged caller holding
/// CAP_NET_ADMIN can create a tap. Mounts a tmpfs over /dev/net for it.
pub fn world_usable_tun() -> io::Result<()> {
    if !in_netns() {
        return Err(io::Error::other(
            "world_usable_tun outside run_in_netns would change the host's /dev/net",
        ));
    }
    let tun = std::fs::metadata("/dev/net/tun")?;
    let rdev = std::os::unix::fs::MetadataExt::rdev(&tun);
    let dir = CString::new("/dev/net").expect("static path");
    let tmpfs = CString::new("tmpfs").expect("static string");
    let mode = CString::new("mode=0755").expect("static string");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            dir.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            mode.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let node = CString::new("/dev/net/tun").expect("static path");
    // SAFETY: `node` is a NUL-terminated path that outlives the call; umask(0) only changes
    // this process's file creation mask, restored right after.
    let rc = unsafe {
        let old = libc::umask(0);
        let rc = libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, rdev);
        libc::umask(old);
        rc
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `/dev/net/tun` and binds it with TUNSETIFF to `name` with exactly `flags` (e.g. a
/// single-queue tap, a tun, a tap without vnet header): the devices the tap crate must refuse.
pub fn open_raw_tun(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, valid for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// Opens `/dev/net/tun` without binding it to any device.
pub fn open_unbound_tun() -> io::Result<OwnedFd> {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    Ok(OwnedFd::from(file))
}

// ---------------------------------------------------------------------------------------------
// Processes: fds, privileges, /proc.

/// Makes the child of `cmd` inherit `fds[i].0` as fd number `fds[i].1` (without CLOEXEC) and
/// have `closed` definitely closed. Target numbers must not collide with the sources; pick
/// numbers well above what the test process uses (e.g. 100+).
pub fn pass_fds(cmd: &mut Command, fds: &[(RawFd, RawFd)], closed: &[RawFd]) {
    let fds = fds.to_vec();
    let closed = closed.to_vec();
    // SAFETY: the closure runs between fork and exec and only calls dup2/close on integers from
    // vectors allocated before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &fds {
                // dup2 leaves the new fd without FD_CLOEXEC.
                if libc::dup2(src, dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for &fd in &closed {
                libc::close(fd);
            }
            Ok(())
        });
    }
}

/// `/proc/<pid>/status` as key -> value.
pub fn proc_status(pid: u32) -> io::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// A capability mask from a status map (`CapEff`, `CapPrm`, ...).
pub fn cap_mask(status: &HashMap<String, String>, key: &str) -> u64 {
    let hex = status
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in status"));
    u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("bad {key} {hex:?}"))
}

/// The first field of a `Uid:`/`Gid:` line after checking that real, effective, saved and fs ids agree.
pub fn single_id(status: &HashMap<String, String>, key: &str) -> u32 {
    let line = status
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in status"));
    let ids: Vec<u32> = line
        .split_whitespace()
        .map(|s| s.parse().expect("numeric id"))
        .collect();
    assert_eq!(ids.len(), 4, "{key}: {line}");
    assert!(
        ids.iter().all(|&id| id == ids[0]),
        "{key} ids differ: {line}"
    );
    ids[0]
}

/// uid and gid of Debian's `nobody`, the unprivileged identity the tests run the VMM as.
pub const NOBODY: u32 = 65534;

/// Drops this process to `uid`/`gid` with no supplementary groups, no capabilities in any set and
/// no_new_privs. Used by test helpers to become "the unprivileged VMM"; returns a description of
/// the step that failed.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    let fail = |what: &str| format!("{what}: {}", io::Error::last_os_error());
    // SAFETY: prctl/setgroups/setres[ug]id/syscall(capset) below take integers or pointers to
    // locals valid for each call; this runs before the helper starts any thread.
    unsafe {
        // prctl is variadic: pass every argument as the unsigned long the kernel reads.
        let zero: libc::c_ulong = 0;
        if libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            zero,
            zero,
            zero,
        ) != 0
        {
            return Err(fail("PR_SET_NO_NEW_PRIVS"));
        }
        let mut cap: libc::c_ulong = 0;
        while libc::prctl(libc::PR_CAPBSET_READ, cap, zero, zero, zero) >= 0 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, zero, zero, zero) != 0 {
                return Err(fail(&format!("PR_CAPBSET_DROP({cap})")));
            }
            cap += 1;
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups(0)"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(fail(&format!("setresgid({gid})")));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(fail(&format!("setresuid({uid})")));
        }
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        struct CapData {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(fail("capset(0)"));
        }
        let clear_all = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
        if libc::prctl(libc::PR_CAP_AMBIENT, clear_all, zero, zero, zero) != 0 {
            return Err(fail("PR_CAP_AMBIENT_CLEAR_ALL"));
        }
    }
    let status = proc_status(std::process::id()).map_err(|e| format!("/proc/self/status: {e}"))?;
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if cap_mask(&status, key) != 0 {
            return Err(format!("{key} is {} after dropping", status[key]));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Binaries.

/// A release binary of the workspace (`cargo build --release`): looked up in $CARGO_TARGET_DIR,
/// then the target directory this test binary was built in, then `<workspace>/target`.
pub fn release_bin(name: &str) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    // <target>/<profile>/deps/<test binary>
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
    {
        dirs.push(target);
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    dirs.into_iter()
        .map(|dir| dir.join("release").join(name))
        .find(|path| path.is_file())
}

// ---------------------------------------------------------------------------------------------
// The tap-fdcheck helper (tests/src/bin/tap-fdcheck.rs): a stand-in for the unprivileged VMM.

/// A running `tap-fdcheck`: after its `ready ...` line it answers one line per command
/// (`detach I`, `attach I`, `state`, `bind-new NAME`, `bind-join NAME`, `read I`, `quit`).
pub struct FdCheck {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The `ready ...` line as key=value pairs (uid, gid, capeff, tap, queues, kvm, ...).
    pub ready: HashMap<String, String>,
}

impl FdCheck {
    /// Spawns `cmd` (which must run tap-fdcheck, directly or through mqvmm-launch) with piped
    /// stdin/stdout, and waits for its `ready` line. Panics with the helper's output if it
    /// exits instead.
    pub fn spawn(mut cmd: Command) -> FdCheck {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tap-fdcheck");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if !line.starts_with("ready ") {
            let status = child.wait();
            panic!("tap-fdcheck did not start: {line:?} ({status:?})");
        }
        let ready = parse_fields(&line["ready ".len()..]);
        FdCheck {
            child,
            stdin,
            stdout,
            ready,
        }
    }

    /// Sends one command and returns the reply line (trimmed).
    pub fn cmd(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to tap-fdcheck");
        self.stdin.flush().expect("flush to tap-fdcheck");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from tap-fdcheck");
        assert!(!line.is_empty(), "tap-fdcheck exited during {command:?}");
        line.trim_end().to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `quit` and waits for a clean exit.
    pub fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let status = self.child.wait().expect("wait for tap-fdcheck");
        assert!(status.success(), "tap-fdcheck exited with {status}");
    }
}

/// `k=v k=v ...` into a map.
pub fn parse_fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Frames from the host side.

/// A raw AF_PACKET socket bound to one interface: writes whole ethernet frames into the host
/// side of a tap, which the tap then delivers to one of its attached queues. Needs CAP_NET_RAW.
pub struct PacketSocket {
    fd: OwnedFd,
    index: u32,
}

impl PacketSocket {
    pub fn bind(ifname: &str) -> io::Result<PacketSocket> {
        let index = if_index(ifname)?;
        // ETH_P_ALL in network byte order, as the socket protocol.
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Do not receive anything: this socket only sends. Binding with protocol 0 stops delivery.
        let mut addr = sockaddr_ll(index);
        addr.sll_protocol = 0;
        // SAFETY: `addr` is a valid sockaddr_ll for the call, its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd, index })
    }

    /// Sends one complete ethernet frame (destination MAC first).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let addr = sockaddr_ll(self.index);
        // SAFETY: `frame` and `addr` are valid for reads for the call; sizes are passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "short send: {n} of {}",
                frame.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }
}

fn sockaddr_ll(index: u32) -> libc::sockaddr_ll {
    // SAFETY: an all-zero sockaddr_ll is valid (plain integers and byte arrays).
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    addr
}

/// A broadcast ethernet frame carrying IPv4/UDP from 10.0.0.1:`src_port` to 10.0.0.2:9 with
/// `payload`: distinct source ports make distinct flows, which the tap spreads over its queues.
pub fn udp_broadcast_frame(src_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source: locally administered
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(ip_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id, DF, ttl, UDP, checksum (below)
    ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(payload);
    f
}

/// A pipe (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`, valid for the call.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The fds open in this process (probed with fcntl, so the probe opens none itself).
pub fn open_fds() -> Vec<RawFd> {
    (0..4096)
        // SAFETY: fcntl(F_GETFD) takes no pointer; any integer is a safe argument.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}

/// One counter of `/sys/class/net/<ifname>/statistics/`.
pub fn link_stat(ifname: &str, counter: &str) -> io::Result<u64> {
    let path = format!("/sys/class/net/{ifname}/statistics/{counter}");
    std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_attributes_parse() {
        // Two attributes: a 5-byte payload padded to 8, then a u32.
        let mut b = Vec::new();
        b.extend_from_slice(&9u16.to_ne_bytes());
        b.extend_from_slice(&(IFLA_INFO_KIND | 0x8000).to_ne_bytes());
        b.extend_from_slice(b"tun\0\0\0\0\0");
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&IFLA_TUN_NUM_QUEUES.to_ne_bytes());
        b.extend_from_slice(&4u32.to_ne_bytes());
        let attrs = attributes(&b).unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (IFLA_INFO_KIND, &b"tun\0\0"[..]));
        assert_eq!(attrs[1].0, IFLA_TUN_NUM_QUEUES);
        assert!(attributes(&[2, 0, 1, 0]).is_err());
    }

    #[test]
    fn loopback_is_not_a_tun() {
        let err = tun_info("lo").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn fields_parse() {
        let f = parse_fields("uid=65534 tap=mq0 junk");
        assert_eq!(f["uid"], "65534");
        assert_eq!(f["tap"], "mq0");
        assert_eq!(f.len(), 2);
    }
}
