//! tap-fdcheck: a stand-in for the unprivileged VMM in the tap component tests.
//!
//! Accepts mqvmm's command line (`... [--kernel-fd F] [--initramfs-fd I] [--kvm-fd K]
//! --net fds=A,B,...[,mac=M][,mtu=N][,steer-map=S]`, other arguments ignored) plus its own options, parses the
//! MAC as mqvmm does ([`tap::MacAddr`]), validates the passed tap fds with `tap::adopt_queues`
//! (exit 2 with one line naming the fd if they are not what mqvmm expects), prints one `ready`
//! line describing its identity and the fds (for an image fd: its number, the file it names and
//! its first bytes in hex, read through the fd; for a steering map: `steermap=S` and, after it
//! mapped the map and published a configuration into it as mqvmm does, `steer=ok` or
//! `steer=err(...)`), then answers one line per command on stdin:
//!
//!   detach I | attach I     TUNSETQUEUE on queue I             -> ok | err ...
//!   state                   attached state of every queue      -> attached=1,0,...
//!   bind-new NAME           TUNSETIFF on the spare tun fd (create)
//!   bind-join NAME          TUNSETIFF on the spare tun fd (join)  -> ok | err ...
//!   read I                  one non-blocking read on queue I   -> frame LEN | err ...
//!   quit
//!
//! Errors are reported as `err <tap::Error variant> errno=<n> <message>`.
//!
//! Own options: `--drop-to UID:GID` drops to that identity with no capabilities before adopting
//! the fds (when not started through mqvmm-launch); `--tun-fd N` is an unbound /dev/net/tun fd
//! used by bind-new / bind-join.

use std::io::{self, BufRead, Write};
use std::os::unix::io::{BorrowedFd, OwnedFd, RawFd};

use mqvmm_tests::netns;
use tap::MacAddr;

struct Opts {
    drop_to: Option<(u32, u32)>,
    tun_fd: Option<RawFd>,
    kvm_fd: Option<RawFd>,
    kernel_fd: Option<RawFd>,
    initramfs_fd: Option<RawFd>,
    fds: Vec<RawFd>,
    mac: Option<MacAddr>,
    steer_map: Option<RawFd>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut opts = Opts {
        drop_to: None,
        tun_fd: None,
        kvm_fd: None,
        kernel_fd: None,
        initramfs_fd: None,
        fds: Vec::new(),
        mac: None,
        steer_map: None,
    };
    let mut it = args.iter();
    let num = |v: Option<&String>, what: &str| -> Result<i32, String> {
        v.and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{what} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--drop-to" => {
                let v = it.next().ok_or("--drop-to needs UID:GID")?;
                let (u, g) = v.split_once(':').ok_or("--drop-to needs UID:GID")?;
                let id = |s: &str| s.parse::<u32>().map_err(|_| format!("bad id {s:?}"));
                opts.drop_to = Some((id(u)?, id(g)?));
            }
            "--tun-fd" => opts.tun_fd = Some(num(it.next(), "--tun-fd")?),
            "--kvm-fd" => opts.kvm_fd = Some(num(it.next(), "--kvm-fd")?),
            "--kernel-fd" => opts.kernel_fd = Some(num(it.next(), "--kernel-fd")?),
            "--initramfs-fd" => opts.initramfs_fd = Some(num(it.next(), "--initramfs-fd")?),
            "--net" => {
                let v = it.next().ok_or("--net needs a value")?;
                // fds=A,B,C[,mac=M][,mtu=N]: the comma separates both fds and options.
                let mut in_fds = false;
                for part in v.split(',') {
                    let fd = if let Some(first) = part.strip_prefix("fds=") {
                        in_fds = true;
                        first
                    } else if in_fds && !part.contains('=') {
                        part
                    } else {
                        in_fds = false;
                        if let Some(mac) = part.strip_prefix("mac=") {
                            opts.mac = Some(mac.parse().map_err(|e| format!("mac: {e}"))?);
                        }
                        if let Some(fd) = part.strip_prefix("steer-map=") {
                            opts.steer_map =
                                Some(fd.parse().map_err(|_| format!("bad steer-map {fd:?}"))?);
                        }
                        continue;
                    };
                    opts.fds
                        .push(fd.parse().map_err(|_| format!("bad fd {fd:?}"))?);
                }
            }
            _ => {}
        }
    }
    Ok(opts)
}

fn errno_of(e: &tap::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| "none".to_owned(), |n| n.to_string())
}

/// `err <Variant> errno=<n> <message>`; the variant name is the typed error's own.
fn report(e: &tap::Error) -> String {
    let debug = format!("{e:?}");
    let variant: String = debug.chars().take_while(|c| c.is_alphanumeric()).collect();
    format!("err {variant} errno={} {e}", errno_of(e))
}

fn status_field(status: &std::collections::HashMap<String, String>, key: &str) -> String {
    status
        .get(key)
        .cloned()
        .unwrap_or_default()
        .replace('\t', " ")
}

/// `fd=N file=PATH head=HEX` for an image fd (`none` for each when not passed): what the VMM
/// can read through it, whatever its uid may open.
fn image_fields(prefix: &str, fd: Option<RawFd>) -> String {
    let Some(fd) = fd else {
        return format!("{prefix}fd=none {prefix}=none {prefix}head=none");
    };
    let file = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_or_else(|e| format!("unreadable({e})"), |p| p.display().to_string());
    let mut head = [0u8; 8];
    // SAFETY: pread writes at most `head.len()` bytes into `head`; any fd number is safe.
    let n = unsafe { libc::pread(fd, head.as_mut_ptr().cast(), head.len(), 0) };
    let head = match usize::try_from(n) {
        Ok(n) => head[..n].iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => format!(
            "errno:{}",
            io::Error::last_os_error().raw_os_error().unwrap_or(0)
        ),
    };
    format!("{prefix}fd={fd} {prefix}={file} {prefix}head={head}")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tap-fdcheck: {e}");
            std::process::exit(2);
        }
    };
    if let Some((uid, gid)) = opts.drop_to {
        if let Err(e) = netns::drop_privileges(uid, gid) {
            eprintln!("tap-fdcheck: cannot drop to {uid}:{gid}: {e}");
            std::process::exit(1);
        }
    }
    // SAFETY: like mqvmm, this stand-in is handed the fds of --net fds= by whoever started it
    // (mqvmm-launch, or a test), and nothing else in it uses them.
    let queues = match unsafe { tap::adopt_queues(&opts.fds) } {
        Ok(q) => q,
        Err(e) => {
            eprintln!("tap-fdcheck: {e}");
            std::process::exit(2);
        }
    };
    let status = netns::proc_status(std::process::id()).unwrap_or_default();
    let kvm = opts.kvm_fd.map_or_else(
        || "none".to_owned(),
        |fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map_or_else(|e| format!("unreadable({e})"), |p| p.display().to_string())
        },
    );
    let fds: Vec<String> = opts.fds.iter().map(|fd| fd.to_string()).collect();
    let open: Vec<String> = netns::open_fds().iter().map(|fd| fd.to_string()).collect();
    let steer = opts
        .steer_map
        .map_or_else(|| "none".to_owned(), check_steering_map);
    let groups = status_field(&status, "Groups");
    let out = io::stdout();
    let mut out = out.lock();
    let _ = writeln!(
        out,
        "ready pid={} uid={} gid={} groups={} capinh={} capprm={} capeff={} capbnd={} capamb={} nnp={} tap={} queues={} fds={} kvm={} kvmfd={} {} {} mac={} steermap={} steer={} open={}",
        std::process::id(),
        status_field(&status, "Uid").replace(' ', ","),
        status_field(&status, "Gid").replace(' ', ","),
        if groups.is_empty() { "none".to_owned() } else { groups.replace(' ', ",") },
        status_field(&status, "CapInh"),
        status_field(&status, "CapPrm"),
        status_field(&status, "CapEff"),
        status_field(&status, "CapBnd"),
        status_field(&status, "CapAmb"),
        status_field(&status, "NoNewPrivs"),
        queues[0].if_name(),
        queues.len(),
        fds.join(","),
        kvm,
        opts.kvm_fd.map_or_else(|| "none".to_owned(), |fd| fd.to_string()),
        image_fields("kernel", opts.kernel_fd),
        image_fields("initramfs", opts.initramfs_fd),
        opts.mac.map_or_else(|| "none".to_owned(), |mac| mac.to_string()),
        opts.steer_map
            .map_or_else(|| "none".to_owned(), |fd| fd.to_string()),
        steer,
        open.join(","),
    );
    let _ = out.flush();

    let queue = |word: Option<&str>| -> Result<&tap::TapQueue, String> {
        word.and_then(|w| w.parse::<usize>().ok())
            .and_then(|i| queues.get(i))
            .ok_or_else(|| "err usage no such queue".to_owned())
    };
    let bind = |name: Option<&str>| -> String {
        let (Some(tun), Some(name)) = (opts.tun_fd, name) else {
            return "err usage needs --tun-fd and a name".to_owned();
        };
        // SAFETY: the spare tun fd stays open for the helper's lifetime; it is only borrowed here.
        let borrowed = unsafe { BorrowedFd::borrow_raw(tun) };
        let dup: OwnedFd = match borrowed.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return format!("err dup errno={} {e}", e.raw_os_error().unwrap_or(0)),
        };
        match tap::TapQueue::bind(dup, name, 99) {
            Ok(q) => format!("ok bound to {}", q.if_name()),
            Err(e) => report(&e),
        }
    };
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let reply = match words.next() {
            Some("quit") => break,
            Some("detach") => queue(words.next())
                .map(|q| q.detach().map_or_else(|e| report(&e), |()| "ok".to_owned()))
                .unwrap_or_else(|e| e),
            Some("attach") => queue(words.next())
                .map(|q| q.attach().map_or_else(|e| report(&e), |()| "ok".to_owned()))
                .unwrap_or_else(|e| e),
            Some("state") => {
                let states: Result<Vec<&str>, tap::Error> = queues
                    .iter()
                    .map(|q| q.is_attached().map(|a| if a { "1" } else { "0" }))
                    .collect();
                states.map_or_else(|e| report(&e), |s| format!("attached={}", s.join(",")))
            }
            Some("bind-new") | Some("bind-join") => bind(words.next()),
            Some("read") => queue(words.next())
                .map(|q| {
                    let mut buf = vec![0u8; 65_562];
                    match q.read(&mut buf) {
                        Ok(n) => format!("frame {n}"),
                        Err(e) => format!("err io errno={} {e}", e.raw_os_error().unwrap_or(0)),
                    }
                })
                .unwrap_or_else(|e| e),
            _ => format!("err usage unknown command {line:?}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}

/// Maps the steering map passed as `fd` and publishes a configuration into it, as mqvmm does
/// (no bpf() call, whatever identity this process has by now): `ok`, or `err(...)` without
/// spaces.
fn check_steering_map(fd: RawFd) -> String {
    use tap::steering::{SteerConfig, SteeringMap, HASH_TCPV4, KEY_LEN};
    // SAFETY: the fd was handed to this process for this purpose (like mqvmm's steer-map=), and
    // nothing else in it uses that number.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let cfg = SteerConfig {
        hash_types: HASH_TCPV4,
        key: [7; KEY_LEN],
        table: vec![1, 0],
        unclassified: 1,
    };
    let result = SteeringMap::from_fd(fd).and_then(|map| {
        map.publish(&cfg)?;
        if map.live() == cfg && map.seq() == 1 {
            Ok(())
        } else {
            Err(io::Error::other("published configuration not live"))
        }
    });
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("err({})", e.to_string().replace(' ', "_")),
    }
}
