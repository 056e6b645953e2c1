//! mqvmm-launch: the privileged half of mqvmm's privilege split.
//!
//! Creates (or adopts) a multiqueue tap and opens one fd per queue plus /dev/kvm, and the guest
//! kernel and initramfs named in mqvmm's arguments (as the caller, so that mqvmm boots images its
//! own uid may not read), then gives up every privilege — no_new_privs, empty bounding set,
//! target uid/gid with no supplementary groups, empty capability sets including ambient, all
//! verified — and execs mqvmm with exactly those fds:
//! `mqvmm [ARGS...] --kernel-fd F [--initramfs-fd I] --kvm-fd K --net fds=A,B,...[,mac=MAC][,steer-map=M]`.
//!
//! With more than one queue it also attaches the eBPF steering program to the tap (the
//! `steering` crate) and passes the program's map as `steer-map=M`, through which mqvmm applies
//! the guest's RSS configuration; when the kernel refuses, it says so in one line and goes on
//! without (`--no-steering` skips it).
//!
//! Self-contained on purpose (only the tap and steering crates, clap, libc, thiserror, and
//! virtio-net's limits): small enough to audit.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::raw::{c_char, c_int, c_ulong};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use tap::MacAddr;
use virtio_net::config::MIN_MTU;
use virtio_net::MAX_QUEUE_PAIRS;

const EXAMPLE: &str = "\
Example (as root):

  # either let the launcher create the tap (it disappears when mqvmm exits) ...
  mqvmm-launch --tap mq0 --queues 4 --user nobody --mac 52:54:00:12:34:56 -- \\
      --kernel /var/lib/mqvmm/vmlinux --initramfs /var/lib/mqvmm/initramfs.cpio.gz \\
      --cmdline 'console=ttyS0' --cpus 4 --memory 1024
  # ... and configure the host side once it exists (from another shell):
  ip addr add 192.168.100.1/24 dev mq0; ip link set mq0 up

  # or create a persistent multiqueue tap first; the launcher adopts it:
  ip tuntap add dev mq0 mode tap multi_queue vnet_hdr user root
  ip addr add 192.168.100.1/24 dev mq0; ip link set mq0 up
  mqvmm-launch --tap mq0 --queues 4 --user nobody -- --kernel ...

mqvmm then runs as nobody:nogroup with no capabilities, as
  mqvmm --kernel-fd 3 --initramfs-fd 4 ... --kvm-fd 9 --net fds=5,6,7,8,mac=52:54:00:12:34:56,steer-map=10
(the launcher opens the kernel and initramfs as its caller, so nobody need not be able to read
them; one tap queue per virtio-net queue pair; the guest enables them with
`ethtool -L eth0 combined N`; steer-map is the tap's eBPF steering map, see --no-steering).

Who may run it: root, or a caller given CAP_NET_ADMIN, e.g.
  setpriv --reuid U --regid G --clear-groups --inh-caps +net_admin --ambient-caps +net_admin \\
      mqvmm-launch --user U ...
(such a caller runs mqvmm as itself); never setuid, setgid or with file capabilities.
--mqvmm must be an absolute path; only the default mqvmm may run as --user root;
--seccomp off|log after -- needs --allow-unsandboxed.

--api-socket /run/mqvmm/vm1/api.sock gives the operator a control socket (the launcher creates
/run/mqvmm/vm1 for USER if missing): mqvmm-ctl --api-socket /run/mqvmm/vm1/api.sock counters

Exit status: 2 for bad arguments or a refused invocation (a kernel or initramfs that cannot be
opened among them), 1 when setting up fails; otherwise mqvmm's own.";

/// Create or adopt a multiqueue tap, open its queues and /dev/kvm, drop every privilege and exec
/// mqvmm with the fds.
#[derive(Parser, Debug)]
#[command(name = "mqvmm-launch", version, after_help = EXAMPLE)]
struct Args {
    /// Tap interface: adopted if it exists (it must be a multiqueue tap), else created
    /// (non-persistent, owned by the launcher's uid so that nobody else can attach queues).
    #[arg(long, value_name = "NAME")]
    tap: String,
    /// Number of tap queues = virtio-net queue pairs, from 1 to the device's maximum.
    #[arg(long, value_name = "N", value_parser = parse_queues,
          help = format!("Number of tap queues = virtio-net queue pairs (1-{MAX_QUEUE_PAIRS})"))]
    queues: u16,
    /// User to run mqvmm as (name or uid). Running it as root needs `--user root` spelled out.
    #[arg(long, value_name = "USER")]
    user: String,
    /// Group to run mqvmm as (name or gid); default: USER's primary group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Guest MAC address, passed on as `--net ...,mac=MAC`.
    #[arg(long, value_name = "MAC")]
    mac: Option<MacAddr>,
    /// Guest MTU, passed on as `--net ...,mtu=N`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(i64::from(MIN_MTU)..),
          help = format!("Guest MTU ({MIN_MTU}-65535), passed on as `--net ...,mtu=N`"))]
    mtu: Option<u16>,
    /// Link speed in Mbit/s the guest's `ethtool eth0` shows, passed on as `--net ...,speed=N`
    /// (mqvmm's default: 10000).
    #[arg(long, value_name = "MBPS", value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    speed: Option<u32>,
    /// Worker threads mqvmm serves the queue pairs with, passed on as `--net ...,io-threads=N`
    /// (mqvmm's default: the CPUs it may use beyond its vCPUs, one to one per pair).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    io_threads: Option<u16>,
    /// Link duplex the guest sees, `full` or `half`, passed on as `--net ...,duplex=D`.
    #[arg(long, value_name = "full|half", value_parser = ["full", "half"])]
    duplex: Option<String>,
    /// Offer no multiqueue to the guest (one queue pair; `--net ...,mq=off`). The tap keeps its
    /// queues, all but the first detached.
    #[arg(long)]
    no_mq: bool,
    /// The mqvmm binary, an absolute path; default: `mqvmm` in the launcher's own directory.
    /// Only the default may run as root (`--user root`).
    #[arg(long, value_name = "PATH")]
    mqvmm: Option<PathBuf>,
    /// Allow `--seccomp off` or `--seccomp log` among mqvmm's arguments: mqvmm then runs
    /// without working system call filters (for debugging only).
    #[arg(long)]
    allow_unsandboxed: bool,
    /// The operator's control socket, passed on as mqvmm's `--api-socket PATH` (mqvmm creates
    /// the socket; see mqvmm-ctl). A missing directory of PATH (the last level only) is
    /// created, mode 0700, owned by USER and GROUP; an existing one is left as it is.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Attach no eBPF steering program to the tap. By default, with more than one queue, the
    /// launcher attaches one (TUNSETSTEERINGEBPF; needs CAP_BPF or root, and Linux 4.16+) and
    /// passes its map on as `--net ...,steer-map=FD`: mqvmm then steers each frame to the queue
    /// the guest's RSS configuration picks. If attaching fails, the launcher logs one line
    /// and goes on without (the kernel's own flow hash picks the queue).
    #[arg(long)]
    no_steering: bool,
    /// Do not open /dev/kvm and pass no --kvm-fd (for tests with a stand-in VMM).
    #[arg(long)]
    no_kvm: bool,
    /// Arguments for mqvmm; --kvm-fd and --net are added by the launcher, which also opens the
    /// files of --kernel and --initramfs and passes them as --kernel-fd and --initramfs-fd.
    #[arg(last = true, value_name = "MQVMM ARGS")]
    mqvmm_args: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
enum LaunchError {
    // Bad arguments (exit 2).
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("uid {0} has no passwd entry, so it has no primary group: give --group")]
    NoPrimaryGroup(u32),
    #[error("refusing to run mqvmm as root (--user {0}); say --user root to do that deliberately")]
    RootUser(String),
    #[error(
        "refusing to run mqvmm with group root (gid 0); say --group root to do that deliberately"
    )]
    RootGroup,
    #[error("{0} is added by mqvmm-launch: do not pass it after --")]
    Reserved(String),
    #[error("--mqvmm {0} is not an absolute path")]
    MqvmmNotAbsolute(String),
    #[error(
        "refusing to run {path} as root: only the mqvmm next to mqvmm-launch ({real}) may run \
         as root"
    )]
    RootNeedsRealMqvmm { path: String, real: String },
    #[error(
        "--seccomp {0} leaves mqvmm without working system call filters: pass \
         --allow-unsandboxed to mqvmm-launch to do that deliberately"
    )]
    Unsandboxed(String),
    #[error("{0} after -- needs a value")]
    MissingValue(&'static str),
    #[error("invalid --tap")]
    TapName(#[source] tap::Error),
    #[error("--api-socket {0}: not a path of a file")]
    ApiSocketPath(String),
    #[error("cannot open {what} {path}")]
    OpenImage {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    ImageNotAFile { what: &'static str, path: String },
    // Refused invocations (exit 2, like bad arguments: nothing has been set up).
    #[error(
        "refusing to run setuid, setgid or with file capabilities (uid {uid} euid {euid}, gid \
         {gid} egid {egid}, AT_SECURE {secure}): run mqvmm-launch as root, or give its caller \
         CAP_NET_ADMIN (e.g. setpriv --inh-caps +net_admin --ambient-caps +net_admin)"
    )]
    SecureExec {
        uid: u32,
        euid: u32,
        gid: u32,
        egid: u32,
        secure: c_ulong,
    },
    #[error(
        "mqvmm-launch needs root or CAP_NET_ADMIN (running as uid {uid} with effective \
         capabilities {caps:#x})"
    )]
    NotPrivileged { uid: u32, caps: u64 },

    // Setup failures (exit 1).
    #[error("looking up {what} {name:?} failed")]
    Lookup {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot locate the launcher's own executable to find mqvmm next to it (pass --mqvmm)")]
    OwnExe(#[source] io::Error),
    #[error("mqvmm binary {0} not found (build it, or pass --mqvmm PATH)")]
    MqvmmMissing(String),
    #[error("cannot resolve the mqvmm binary {path}")]
    MqvmmPath {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up {queues} queues of tap {name}")]
    Tap {
        name: String,
        queues: u16,
        #[source]
        source: tap::Error,
    },
    #[error("cannot open /dev/null onto a closed standard fd (0, 1 or 2)")]
    StdFds(#[source] io::Error),
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] io::Error),
    #[error("cannot create the --api-socket directory {path} for uid {uid} gid {gid}")]
    ApiDirectory {
        path: String,
        uid: u32,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed")]
    Syscall {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("privilege drop did not stick: {0}")]
    Verify(String),
    #[error("cannot execute {path} as uid {uid}")]
    Exec {
        path: String,
        uid: u32,
        #[source]
        source: io::Error,
    },
}

impl LaunchError {
    fn exit_code(&self) -> i32 {
        match self {
            LaunchError::UnknownUser(_)
            | LaunchError::UnknownGroup(_)
            | LaunchError::NoPrimaryGroup(_)
            | LaunchError::RootUser(_)
            | LaunchError::RootGroup
            | LaunchError::Reserved(_)
            | LaunchError::MqvmmNotAbsolute(_)
            | LaunchError::RootNeedsRealMqvmm { .. }
            | LaunchError::Unsandboxed(_)
            | LaunchError::MissingValue(_)
            | LaunchError::TapName(_)
            | LaunchError::ApiSocketPath(_)
            | LaunchError::OpenImage { .. }
            | LaunchError::ImageNotAFile { .. }
            | LaunchError::SecureExec { .. }
            | LaunchError::NotPrivileged { .. } => 2,
            _ => 1,
        }
    }
}

fn syscall_error(what: impl Into<String>) -> LaunchError {
    LaunchError::Syscall {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

fn log(msg: &str) {
    eprintln!("mqvmm-launch: {msg}");
}

fn main() {
    if let Err(source) = open_std_fds() {
        exit_with(LaunchError::StdFds(source));
    }
    // Not even the arguments are looked at for a caller who gained privileges by exec.
    if let Err(err) = refuse_secure_exec() {
        exit_with(err);
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's message spans several lines (error, usage, hint): keep it to one.
            let text = e.to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("mqvmm-launch: error: {msg} (see --help)");
            std::process::exit(2);
        }
    };
    match run(args) {
        Ok(never) => match never {},
        Err(err) => exit_with(err),
    }
}

/// One line with the error and its sources, and the error's exit status.
fn exit_with(err: LaunchError) -> ! {
    eprintln!("mqvmm-launch: error: {}", error_line(&err));
    std::process::exit(err.exit_code());
}

/// `err` and its sources joined by `: `, a message that repeats the one before it (some
/// errors print their source too, the BPF loader's at two levels) said once.
fn error_line(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        match parts.last() {
            Some(last) if last.ends_with(&part) => {}
            Some(last) if part.starts_with(last.as_str()) => {
                parts.pop();
                parts.push(part);
            }
            _ => parts.push(part),
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Everything up to the exec; returns only on failure.
fn run(args: Args) -> Result<std::convert::Infallible, LaunchError> {
    // Arguments first: nothing is opened before they are all known to be good.
    for arg in &args.mqvmm_args {
        let arg = arg.to_string_lossy();
        for reserved in [
            "--kvm-fd",
            "--net",
            "--kernel-fd",
            "--initramfs-fd",
            "--api-socket",
        ] {
            if arg == reserved || arg.starts_with(&format!("{reserved}=")) {
                return Err(LaunchError::Reserved(reserved.to_owned()));
            }
        }
    }
    if let Some(mode) = unsandboxed_mode(&args.mqvmm_args) {
        if !args.allow_unsandboxed {
            return Err(LaunchError::Unsandboxed(mode));
        }
    }
    let image_args = image_args(&args.mqvmm_args)?;
    let api_dir = args.api_socket.as_deref().map(api_socket_dir).transpose()?;
    let (uid, primary_gid) = resolve_user(&args.user)?;
    let gid = match &args.group {
        Some(group) => resolve_group(group)?,
        None => primary_gid.ok_or(LaunchError::NoPrimaryGroup(uid))?,
    };
    if uid == 0 && args.user != "root" {
        return Err(LaunchError::RootUser(args.user.clone()));
    }
    if gid == 0 && args.group.as_deref() != Some("root") && args.user != "root" {
        return Err(LaunchError::RootGroup);
    }
    // An absolute path, canonical from here on: what is checked is what is executed (a bare
    // name would be looked up in PATH by exec).
    let own_mqvmm = || -> Result<PathBuf, LaunchError> {
        Ok(std::env::current_exe()
            .map_err(LaunchError::OwnExe)?
            .with_file_name("mqvmm"))
    };
    let mqvmm = match &args.mqvmm {
        Some(path) if !path.is_absolute() => {
            return Err(LaunchError::MqvmmNotAbsolute(path.display().to_string()))
        }
        Some(path) => path.clone(),
        None => own_mqvmm()?,
    };
    let mqvmm = canonical_file(&mqvmm)?;
    if uid == 0 {
        // Root may run mqvmm, not whatever --mqvmm names (a shell, say).
        let own = own_mqvmm()?;
        if std::fs::canonicalize(&own).ok().as_ref() != Some(&mqvmm) {
            return Err(LaunchError::RootNeedsRealMqvmm {
                path: mqvmm.display().to_string(),
                real: own.display().to_string(),
            });
        }
    }
    let caps = effective_caps().map_err(|source| LaunchError::Syscall {
        what: "capget".to_owned(),
        source,
    })?;
    // SAFETY: getuid has no preconditions.
    let caller = unsafe { libc::getuid() };
    if caller != 0 && caps & cap_bit(CAP_NET_ADMIN) == 0 {
        return Err(LaunchError::NotPrivileged { uid: caller, caps });
    }

    // Still as the caller: the guest images, which mqvmm's uid may not be able to open.
    let mut images = Vec::with_capacity(image_args.len());
    for arg in &image_args {
        let fd = open_image(arg)?;
        log(&format!(
            "{} {} on fd {}",
            arg.image.what(),
            arg.path.display(),
            fd.as_raw_fd()
        ));
        images.push(fd);
    }
    let image_fds: Vec<RawFd> = images.iter().map(AsRawFd::as_raw_fd).collect();
    let mqvmm_args = pass_images(&args.mqvmm_args, &image_args, &image_fds);

    // The privileged part: the tap queues and /dev/kvm.
    let cfg = tap::TapConfig {
        name: Some(args.tap.clone()),
        queues: args.queues,
        ..tap::TapConfig::default()
    };
    let tap = tap::MultiQueueTap::create(&cfg).map_err(|source| match source {
        tap::Error::InvalidName { .. } => LaunchError::TapName(source),
        _ => LaunchError::Tap {
            name: args.tap.clone(),
            queues: args.queues,
            source,
        },
    })?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if tap.created() {
        // The kernel lets anyone who can open /dev/net/tun join a tap with no owner.
        tap.set_owner(euid).map_err(|source| LaunchError::Tap {
            name: args.tap.clone(),
            queues: args.queues,
            source,
        })?;
    }
    let tap_name = tap.name().to_owned();
    let how = if tap.created() {
        format!("created (non-persistent, owner uid {euid})")
    } else {
        "adopted the existing multiqueue tap".to_owned()
    };
    let queues = tap.into_queues();
    let queue_fds: Vec<RawFd> = queues.iter().map(AsRawFd::as_raw_fd).collect();
    log(&format!(
        "tap {tap_name}: {how}; {} queues on fds {}",
        queue_fds.len(),
        join(&queue_fds)
    ));
    let steer_map = attach_steering(&tap_name, &queues, args.no_steering);
    let steer_map_fd = steer_map.as_ref().map(AsRawFd::as_raw_fd);
    let kvm: Option<OwnedFd> = if args.no_kvm {
        None
    } else {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")
            .map_err(LaunchError::OpenKvm)?;
        Some(OwnedFd::from(file))
    };
    let kvm_fd = kvm.as_ref().map(AsRawFd::as_raw_fd);
    if let Some(fd) = kvm_fd {
        log(&format!("/dev/kvm on fd {fd}"));
    }
    if let Some(dir) = &api_dir {
        let created =
            create_api_dir(dir, uid, gid).map_err(|source| LaunchError::ApiDirectory {
                path: dir.display().to_string(),
                uid,
                gid,
                source,
            })?;
        log(&format!(
            "--api-socket directory {}: {}",
            dir.display(),
            if created {
                format!("created, mode 0700, owner {uid}:{gid}")
            } else {
                "exists, left as it is".to_owned()
            }
        ));
    }

    // Only the fds we pass survive the exec.
    let mut pass = queue_fds.clone();
    pass.extend(kvm_fd);
    pass.extend(&image_fds);
    pass.extend(steer_map_fd);
    cloexec_all_except(&pass)?;

    let kept_bounding_set = drop_privileges(uid, gid)?;
    verify_dropped(uid, gid, kept_bounding_set)?;
    log(&format!(
        "running as uid {uid} gid {gid}: no supplementary groups, no capabilities, no_new_privs{}",
        if kept_bounding_set {
            " (bounding set left as it was: emptying it needs CAP_SETPCAP)"
        } else {
            ""
        }
    ));

    let mut net = format!("fds={}", join(&queue_fds));
    if let Some(mac) = args.mac {
        net.push_str(&format!(",mac={mac}"));
    }
    if let Some(mtu) = args.mtu {
        net.push_str(&format!(",mtu={mtu}"));
    }
    if let Some(speed) = args.speed {
        net.push_str(&format!(",speed={speed}"));
    }
    if let Some(duplex) = &args.duplex {
        net.push_str(&format!(",duplex={duplex}"));
    }
    if let Some(n) = args.io_threads {
        net.push_str(&format!(",io-threads={n}"));
    }
    if args.no_mq {
        net.push_str(",mq=off");
    }
    if let Some(fd) = steer_map_fd {
        net.push_str(&format!(",steer-map={fd}"));
    }
    let mut cmd = Command::new(&mqvmm);
    cmd.args(&mqvmm_args);
    if let Some(fd) = kvm_fd {
        cmd.arg("--kvm-fd").arg(fd.to_string());
    }
    cmd.arg("--net").arg(&net);
    if let Some(path) = &args.api_socket {
        cmd.arg("--api-socket").arg(path);
    }
    let shown: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    log(&format!("exec {} {}", mqvmm.display(), shown.join(" ")));
    let source = cmd.exec();
    // The fds must stay open until exec; it failed, so they close here.
    drop((queues, kvm, images, steer_map));
    Err(LaunchError::Exec {
        path: mqvmm.display().to_string(),
        uid,
        source,
    })
}

/// Attaches the eBPF steering program to the tap (through its first queue; the program is the
/// tap's, not the queue's) and returns its map's fd, for mqvmm. One log line either way; a
/// failure is not an error: mqvmm runs without steering. Without steering, a program an earlier
/// run left on an adopted tap is taken off: nobody updates its map any more, and it would steer
/// to queues mqvmm has disabled (a kernel without TUNSETSTEERINGEBPF has none to take off).
fn attach_steering(tap: &str, queues: &[tap::TapQueue], off: bool) -> Option<OwnedFd> {
    let first = queues.first()?;
    let map = if off || queues.len() < 2 {
        None
    } else {
        match steering::attach(first.as_fd()) {
            Ok(map) => {
                log(&format!(
                    "tap {tap}: eBPF steering attached; its map on fd {}",
                    map.as_raw_fd()
                ));
                Some(map)
            }
            Err(err) => {
                log(&format!("tap {tap}: steering is off: {}", error_line(&err)));
                None
            }
        }
    };
    if map.is_none() {
        let _ = steering::detach(first.as_fd());
    }
    map
}

/// The directory of an `--api-socket` path (`.` for a bare name); refused without a file name.
fn api_socket_dir(path: &std::path::Path) -> Result<PathBuf, LaunchError> {
    if path.file_name().is_none() {
        return Err(LaunchError::ApiSocketPath(path.display().to_string()));
    }
    Ok(match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    })
}

/// Creates `dir` (its parent must exist), mode 0700, owned by `uid`:`gid`; returns false,
/// changing nothing, when something of that name exists. The new directory is opened without
/// following a symlink and changed through that fd, so that a name swapped in between (by
/// whoever may write the parent) is refused rather than chowned.
fn create_api_dir(dir: &std::path::Path, uid: u32, gid: u32) -> io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    let opened = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?;
    // SAFETY: fchown and fchmod take the fd of the directory opened above and integers.
    if unsafe { libc::fchown(opened.as_raw_fd(), uid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; mkdir's mode was narrowed by the umask, this sets it exactly.
    if unsafe { libc::fchmod(opened.as_raw_fd(), 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// `path` with every symlink, `.` and `..` resolved, if it is a file.
fn canonical_file(path: &std::path::Path) -> Result<PathBuf, LaunchError> {
    let missing = || LaunchError::MqvmmMissing(path.display().to_string());
    let canonical = match std::fs::canonicalize(path) {
        Ok(canonical) => canonical,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        Err(source) => {
            return Err(LaunchError::MqvmmPath {
                path: path.display().to_string(),
                source,
            })
        }
    };
    if !canonical.is_file() {
        return Err(missing());
    }
    Ok(canonical)
}

/// The mode of a `--seccomp off` or `--seccomp log` (either spelling) among mqvmm's arguments:
/// with both, mqvmm's system calls go unfiltered (`log` only logs them).
fn unsandboxed_mode(args: &[OsString]) -> Option<String> {
    args.iter().enumerate().find_map(|(i, arg)| {
        let arg = arg.to_str()?;
        let mode = match arg.strip_prefix("--seccomp=") {
            Some(mode) => mode,
            None if arg == "--seccomp" => args.get(i + 1)?.to_str()?,
            None => return None,
        };
        matches!(mode, "off" | "log").then(|| mode.to_owned())
    })
}

/// `--queues`: what mqvmm's virtio-net device accepts, checked before a tap is touched.
fn parse_queues(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|&n| n >= 1 && usize::from(n) <= MAX_QUEUE_PAIRS)
        .ok_or_else(|| {
            format!(
                "{s} is not a number from 1 to {MAX_QUEUE_PAIRS} (the most queue pairs mqvmm's \
                 virtio-net device has)"
            )
        })
}

fn join(fds: &[RawFd]) -> String {
    fds.iter()
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------------
// Guest images.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestImage {
    Kernel,
    Initramfs,
}

impl GuestImage {
    const ALL: [GuestImage; 2] = [GuestImage::Kernel, GuestImage::Initramfs];

    /// mqvmm's option naming the image's path.
    fn path_option(self) -> &'static str {
        match self {
            GuestImage::Kernel => "--kernel",
            GuestImage::Initramfs => "--initramfs",
        }
    }

    /// mqvmm's option passing the image as an open fd.
    fn fd_option(self) -> &'static str {
        match self {
            GuestImage::Kernel => "--kernel-fd",
            GuestImage::Initramfs => "--initramfs-fd",
        }
    }

    fn what(self) -> &'static str {
        match self {
            GuestImage::Kernel => "kernel image",
            GuestImage::Initramfs => "initramfs",
        }
    }
}

/// A guest image named in mqvmm's arguments: `--kernel PATH` (two arguments) or
/// `--kernel=PATH` (one), at `span` in the argument list.
#[derive(Debug, PartialEq, Eq)]
struct ImageArg {
    image: GuestImage,
    path: PathBuf,
    span: Range<usize>,
}

/// Finds `--kernel`/`--initramfs` with their paths among mqvmm's arguments.
fn image_args(args: &[OsString]) -> Result<Vec<ImageArg>, LaunchError> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_bytes();
        let mut next = i + 1;
        for image in GuestImage::ALL {
            let option = image.path_option();
            if arg == option.as_bytes() {
                let path = args.get(i + 1).ok_or(LaunchError::MissingValue(option))?;
                next = i + 2;
                found.push(ImageArg {
                    image,
                    path: PathBuf::from(path),
                    span: i..next,
                });
            } else if let Some(path) = arg
                .strip_prefix(option.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                found.push(ImageArg {
                    image,
                    path: PathBuf::from(OsStr::from_bytes(path)),
                    span: i..next,
                });
            }
        }
        i = next;
    }
    Ok(found)
}

/// Opens an image read-only as the caller. O_NONBLOCK and O_NOCTTY keep a FIFO or a terminal
/// given by mistake from blocking or becoming ours before it is refused as no regular file.
fn open_image(arg: &ImageArg) -> Result<OwnedFd, LaunchError> {
    let path = arg.path.display().to_string();
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&arg.path)
        .map_err(|source| LaunchError::OpenImage {
            what: arg.image.what(),
            path: path.clone(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| LaunchError::OpenImage {
        what: arg.image.what(),
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(LaunchError::ImageNotAFile {
            what: arg.image.what(),
            path,
        });
    }
    Ok(OwnedFd::from(file))
}

/// mqvmm's arguments with each image argument replaced by its fd option (`--kernel-fd N`).
fn pass_images(args: &[OsString], images: &[ImageArg], fds: &[RawFd]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut replaced = images.iter().zip(fds).peekable();
    let mut i = 0;
    while i < args.len() {
        match replaced.next_if(|(arg, _)| arg.span.start == i) {
            Some((arg, fd)) => {
                out.push(arg.image.fd_option().into());
                out.push(fd.to_string().into());
                i = arg.span.end;
            }
            None => {
                out.push(args[i].clone());
                i += 1;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Users and groups.

/// Numeric uid, or a user name looked up with getpwnam_r; returns (uid, primary gid if known).
fn resolve_user(spec: &str) -> Result<(u32, Option<u32>), LaunchError> {
    let lookup_err = |source| LaunchError::Lookup {
        what: "user",
        name: spec.to_owned(),
        source,
    };
    if let Ok(uid) = spec.parse::<u32>() {
        let entry = passwd_entry(PwKey::Uid(uid)).map_err(lookup_err)?;
        return Ok((uid, entry.map(|(_, gid)| gid)));
    }
    let name = CString::new(spec).map_err(|_| LaunchError::UnknownUser(spec.to_owned()))?;
    match passwd_entry(PwKey::Name(&name)).map_err(lookup_err)? {
        Some((uid, gid)) => Ok((uid, Some(gid))),
        None => Err(LaunchError::UnknownUser(spec.to_owned())),
    }
}

/// Numeric gid, or a group name looked up with getgrnam_r.
fn resolve_group(spec: &str) -> Result<u32, LaunchError> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(spec).map_err(|_| LaunchError::UnknownGroup(spec.to_owned()))?;
    let mut buf: Vec<c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero `struct group` is valid (null pointers and zero ids).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local or to `buf`, whose length is passed; the
        // strings written into `buf` are not used after this call.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            0 if result.is_null() => return Err(LaunchError::UnknownGroup(spec.to_owned())),
            0 => return Ok(grp.gr_gid),
            // getgrnam_r(3): these mean "not found" with some NSS modules.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => {
                return Err(LaunchError::UnknownGroup(spec.to_owned()))
            }
            errno => {
                return Err(LaunchError::Lookup {
                    what: "group",
                    name: spec.to_owned(),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }
}

enum PwKey<'a> {
    Name(&'a CStr),
    Uid(u32),
}

/// (uid, gid) of a passwd entry, `None` if there is none.
fn passwd_entry(key: PwKey<'_>) -> io::Result<Option<(u32, u32)>> {
    let mut buf: Vec<c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero `struct passwd` is valid (null pointers and zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local or to `buf`, whose length is passed; the
        // strings written into `buf` are not used after this call.
        let rc = unsafe {
            match key {
                PwKey::Name(name) => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                ),
                PwKey::Uid(uid) => {
                    libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result)
                }
            }
        };
        match rc {
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some((pwd.pw_uid, pwd.pw_gid))),
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fds and privileges.

/// Opens /dev/null onto each of fds 0, 1 and 2 that is closed, before anything else is opened:
/// a tap queue, /dev/kvm or an image landing on one would become mqvmm's stdin, stdout or
/// stderr. (Rust's runtime does the same before main today; the launcher does not rely on it.)
fn open_std_fds() -> io::Result<()> {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: the path is a NUL-terminated literal; the new fd is ours (no CLOEXEC: it is
        // meant to be inherited as a standard stream).
        let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if null < 0 {
            return Err(io::Error::last_os_error());
        }
        // open returns the lowest free fd, which is `fd` as the ones below it are open.
        if null != fd {
            // SAFETY: dup2 and close take integers; `null` is ours to close.
            let rc = unsafe { libc::dup2(null, fd) };
            // SAFETY: as above.
            unsafe { libc::close(null) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn set_cloexec(fd: RawFd, cloexec: bool) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFD/F_SETFD) takes no pointers; it only changes this fd's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if cloexec {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every fd above stderr close-on-exec (whatever our parent let us inherit), then clears
/// the flag on exactly the fds passed to mqvmm.
fn cloexec_all_except(keep: &[RawFd]) -> Result<(), LaunchError> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it sets FD_CLOEXEC on a range.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as c_ulong,
            c_ulong::from(u32::MAX),
            c_ulong::from(libc::CLOSE_RANGE_CLOEXEC),
        )
    };
    if rc != 0 {
        // Kernels before 5.11: walk /proc/self/fd instead.
        let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .map_err(|source| LaunchError::Syscall {
                what: "listing /proc/self/fd".to_owned(),
                source,
            })?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        for fd in fds {
            match set_cloexec(fd, true) {
                // The directory's own fd, closed by now.
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => {}
                Err(source) => {
                    return Err(LaunchError::Syscall {
                        what: format!("setting FD_CLOEXEC on fd {fd}"),
                        source,
                    })
                }
                Ok(()) => {}
            }
        }
    }
    for &fd in keep {
        set_cloexec(fd, false).map_err(|source| LaunchError::Syscall {
            what: format!("clearing FD_CLOEXEC on fd {fd}"),
            source,
        })?;
    }
    Ok(())
}

/// prctl's variadic arguments are read by the kernel as unsigned longs.
fn prctl(option: c_int, arg: c_ulong) -> c_int {
    // SAFETY: the prctl options used here take integer arguments only.
    unsafe { libc::prctl(option, arg, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong) }
}

// From linux/capability.h.
const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn cap_bit(cap: u32) -> u64 {
    1 << cap
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This process's effective capability set.
fn effective_caps() -> io::Result<u64> {
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads one header and writes two data structs (version 3), live locals.
    if unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | u64::from(data[1].effective) << 32)
}

/// Refuses a launcher that gained privileges by exec: setuid or setgid (real and effective ids
/// differ), or anything else the kernel marks AT_SECURE (file capabilities among them). Its
/// caller would be untrusted, and could attach to any tap or run any program as root.
fn refuse_secure_exec() -> Result<(), LaunchError> {
    // SAFETY: these take no arguments and cannot fail.
    let (uid, euid, gid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    // SAFETY: getauxval reads this process's auxiliary vector; 0 when the entry is absent.
    let secure = unsafe { libc::getauxval(libc::AT_SECURE) };
    if uid != euid || gid != egid || secure != 0 {
        return Err(LaunchError::SecureExec {
            uid,
            euid,
            gid,
            egid,
            secure,
        });
    }
    Ok(())
}

/// Gives up everything; returns whether the bounding set had to be left as it was: a caller
/// that is not root and holds CAP_NET_ADMIN but not CAP_SETPCAP cannot empty it (it is inert
/// for a process that is not root and has no_new_privs, as verify_dropped then requires).
fn drop_privileges(uid: u32, gid: u32) -> Result<bool, LaunchError> {
    if prctl(libc::PR_SET_NO_NEW_PRIVS, 1) != 0 {
        return Err(syscall_error("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    let caps = effective_caps().map_err(|source| LaunchError::Syscall {
        what: "capget".to_owned(),
        source,
    })?;
    // The bounding set can only shrink while we still hold CAP_SETPCAP, i.e. before setuid.
    let keep_bounding_set = caps & cap_bit(CAP_SETPCAP) == 0 && uid != 0;
    if !keep_bounding_set {
        let mut cap: c_ulong = 0;
        loop {
            match prctl(libc::PR_CAPBSET_READ, cap) {
                r if r < 0 => break, // EINVAL: past the last capability this kernel knows
                0 => {}
                _ => {
                    if prctl(libc::PR_CAPBSET_DROP, cap) != 0 {
                        return Err(syscall_error(format!("prctl(PR_CAPBSET_DROP, {cap})")));
                    }
                }
            }
            cap += 1;
        }
    }
    // setgroups needs CAP_SETGID even to set the empty list a caller without it may already have.
    // SAFETY: getgroups with size 0 only returns the count.
    if unsafe { libc::getgroups(0, std::ptr::null_mut()) } != 0 {
        // SAFETY: setgroups with size 0 reads no memory.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(syscall_error("setgroups(0)"));
        }
    }
    // SAFETY: setresgid/setresuid take integers only; this process has no other threads.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(syscall_error(format!("setresgid({gid})")));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(syscall_error(format!("setresuid({uid})")));
    }
    // setresuid away from root already empties the permitted and effective sets; capset clears
    // them for --user root and for a caller that was not root, and the inheritable set in every
    // case.
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3), both live locals.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(syscall_error("capset(all zero)"));
    }
    if prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
    ) != 0
    {
        return Err(syscall_error("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
    }
    Ok(keep_bounding_set)
}

/// Checks the drop with the kernel's own account of us, and that it cannot be undone. The
/// bounding set must be empty unless `kept_bounding_set` (then uid is not 0).
fn verify_dropped(uid: u32, gid: u32, kept_bounding_set: bool) -> Result<(), LaunchError> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three ids into live locals.
    if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 || (r, e, s) != (uid, uid, uid) {
        return Err(LaunchError::Verify(format!(
            "uids are {r}/{e}/{s}, not {uid}"
        )));
    }
    // SAFETY: getresgid writes three ids into live locals.
    if unsafe { libc::getresgid(&mut r, &mut e, &mut s) } != 0 || (r, e, s) != (gid, gid, gid) {
        return Err(LaunchError::Verify(format!(
            "gids are {r}/{e}/{s}, not {gid}"
        )));
    }
    // SAFETY: getgroups with size 0 only returns the count.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return Err(LaunchError::Verify(format!(
            "{groups} supplementary groups remain"
        )));
    }
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| LaunchError::Syscall {
            what: "reading /proc/self/status".to_owned(),
            source,
        })?;
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if key == "CapBnd" && kept_bounding_set && uid != 0 {
            continue;
        }
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim);
        if value.map(|v| u64::from_str_radix(v, 16)) != Some(Ok(0)) {
            return Err(LaunchError::Verify(format!("{key} is {value:?}, not 0")));
        }
    }
    let nnp = status
        .lines()
        .find_map(|l| l.strip_prefix("NoNewPrivs:"))
        .map(str::trim);
    if nnp != Some("1") {
        return Err(LaunchError::Verify(format!("NoNewPrivs is {nnp:?}, not 1")));
    }
    if uid != 0 {
        // SAFETY: setuid/setgid take an integer; success here would be the failure we check for.
        if unsafe { libc::setuid(0) } == 0 || unsafe { libc::setgid(0) } == 0 {
            return Err(LaunchError::Verify("could regain root".to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_passed_on_in_lower_case_and_refused_when_unusable() {
        let parse = |mac: &str| {
            Args::try_parse_from([
                "mqvmm-launch",
                "--tap",
                "mq0",
                "--queues",
                "1",
                "--user",
                "nobody",
                "--mac",
                mac,
            ])
        };
        let args = parse("52:54:00:AB:cd:ef").unwrap();
        assert_eq!(
            args.mac.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:ab:cd:ef")
        );
        for (bad, says) in [
            ("52-54-00-ab-cd-ef", "is not a MAC address"),
            ("5:54:00:ab:cd:ef", "is not a MAC address"),
            ("01:00:5e:00:00:01", "multicast"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn users_and_groups_resolve() {
        assert_eq!(resolve_user("root").unwrap(), (0, Some(0)));
        assert_eq!(resolve_user("0").unwrap(), (0, Some(0)));
        assert!(matches!(
            resolve_user("no-such-user-mqvmm"),
            Err(LaunchError::UnknownUser(_))
        ));
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert!(matches!(
            resolve_group("no-such-group-mqvmm"),
            Err(LaunchError::UnknownGroup(_))
        ));
        // A uid without a passwd entry has no primary group.
        assert_eq!(resolve_user("3999999").unwrap(), (3_999_999, None));
    }

    #[test]
    fn argument_errors_exit_2_setup_errors_exit_1() {
        assert_eq!(LaunchError::RootUser("0".into()).exit_code(), 2);
        assert_eq!(LaunchError::Reserved("--net".into()).exit_code(), 2);
        // Refused invocations count as bad arguments: nothing was set up.
        let refused = LaunchError::SecureExec {
            uid: 1000,
            euid: 0,
            gid: 1000,
            egid: 1000,
            secure: 1,
        };
        assert_eq!(refused.exit_code(), 2);
        assert_eq!(
            LaunchError::NotPrivileged { uid: 1000, caps: 0 }.exit_code(),
            2
        );
        assert_eq!(
            LaunchError::OpenKvm(io::Error::from_raw_os_error(libc::ENOENT)).exit_code(),
            1
        );
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn image_arguments_are_found_in_both_spellings_and_replaced_by_fds() {
        let args = os(&[
            "--cpus",
            "2",
            "--kernel",
            "/boot/vmlinux",
            "--cmdline",
            "console=ttyS0",
            "--initramfs=/boot/initrd.img",
        ]);
        let found = image_args(&args).unwrap();
        assert_eq!(
            found,
            [
                ImageArg {
                    image: GuestImage::Kernel,
                    path: "/boot/vmlinux".into(),
                    span: 2..4
                },
                ImageArg {
                    image: GuestImage::Initramfs,
                    path: "/boot/initrd.img".into(),
                    span: 6..7
                },
            ]
        );
        assert_eq!(
            pass_images(&args, &found, &[7, 8]),
            os(&[
                "--cpus",
                "2",
                "--kernel-fd",
                "7",
                "--cmdline",
                "console=ttyS0",
                "--initramfs-fd",
                "8"
            ])
        );
        // Other options, and values that merely contain the option names, are left alone.
        let args = os(&["--kernelx=1", "--initramfs-fdx", "--cmdline=--kernel=/x"]);
        assert_eq!(image_args(&args).unwrap(), []);
        assert_eq!(pass_images(&args, &[], &[]), args);
        assert!(matches!(
            image_args(&os(&["--cpus", "1", "--initramfs"])),
            Err(LaunchError::MissingValue("--initramfs"))
        ));
    }

    #[test]
    fn the_api_socket_directory_is_the_paths_parent() {
        assert_eq!(
            api_socket_dir("/run/mqvmm/vm1/api.sock".as_ref()).unwrap(),
            PathBuf::from("/run/mqvmm/vm1")
        );
        assert_eq!(
            api_socket_dir("api.sock".as_ref()).unwrap(),
            PathBuf::from(".")
        );
        for bad in ["/", "/run/..", ""] {
            assert!(
                matches!(
                    api_socket_dir(bad.as_ref()),
                    Err(LaunchError::ApiSocketPath(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn seccomp_off_and_log_are_found_in_both_spellings() {
        assert_eq!(
            unsandboxed_mode(&os(&["--cpus", "2", "--seccomp", "off"])).as_deref(),
            Some("off")
        );
        assert_eq!(
            unsandboxed_mode(&os(&["--seccomp=log", "--cpus", "2"])).as_deref(),
            Some("log")
        );
        for sandboxed in [
            &["--seccomp", "on"][..],
            &["--seccomp=on"],
            &["--seccomp"],
            &["--cmdline", "seccomp=off"],
            &["--seccomp-selftest", "off"],
            &[],
        ] {
            assert_eq!(unsandboxed_mode(&os(sandboxed)), None, "{sandboxed:?}");
        }
    }

    #[test]
    fn help_shows_a_complete_example() {
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for needle in [
            "--tap",
            "--queues",
            "--user",
            "--mac",
            "ip addr add",
            "ip link set mq0 up",
            "--kvm-fd",
            "--kernel-fd",
            "--net fds=",
            "--ambient-caps +net_admin",
            "--allow-unsandboxed",
            "--api-socket",
            "mqvmm-ctl",
        ] {
            assert!(help.contains(needle), "help lacks {needle:?}");
        }
    }
}
