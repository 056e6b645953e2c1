//! mqvmm: boots a Linux guest on KVM with a multiqueue virtio-net device. Runs unprivileged when
//! given its /dev/kvm and tap queue fds (see `mqvmm-launch`).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use log::LevelFilter;
use tap::MacAddr;
use virtio_net::config::MIN_MTU;
use virtio_net::MAX_QUEUE_PAIRS;

use vmm::api::ApiSocket;
use vmm::arch::boot::{self, Image, ImageKind};
use vmm::exit::VmExit;
use vmm::seccomp::{ApiFds, Machine, Mode as SeccompMode, Sandbox, ThreadKind};
use vmm::signals::SignalFd;
use vmm::terminal::RawTerminal;
use vmm::vm::{self, KvmSource, NetSetup, Transport, Vm, VmConfig};

/// Default kernel command lines. Without a PCI device `pci=off` spares the guest probing for
/// one; with virtio-pci the guest must probe.
const DEFAULT_CMDLINE_NO_PCI: &str = "console=ttyS0 pci=off";
const DEFAULT_CMDLINE_PCI: &str = "console=ttyS0";

#[derive(Parser, Debug)]
#[command(
    name = "mqvmm",
    version,
    about = "A minimal KVM VMM with a multiqueue virtio-net device backed by a multiqueue tap",
    after_help = "Unprivileged use: let mqvmm-launch create the tap and open /dev/kvm, e.g.\n  \
        mqvmm-launch --tap mq0 --queues 4 --user nobody -- --kernel vmlinux --initramfs initramfs.cpio.gz --cpus 4\n\
        Exit codes: 0 guest powered off or rebooted, 1 VM error, 2 bad arguments, 128+N signal N.\n\
        SIGUSR1 prints the network device counters as one line on stderr:\n  mqvmm-metrics: virtio-net max_pairs=4 active_pairs=2 ... | pair0 attached=1 parked=0 rx_packets=... | ctrl ...\n\
        With --api-socket PATH: mqvmm-ctl --api-socket PATH counters|queues|link up|link down|shutdown"
)]
#[command(group(ArgGroup::new("kernel_image").required(true).args(["kernel", "kernel_fd"])))]
#[command(group(ArgGroup::new("initramfs_image").args(["initramfs", "initramfs_fd"])))]
struct Args {
    /// Guest kernel: ELF vmlinux or bzImage (64-bit boot protocol).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The guest kernel as an already-open regular file (what mqvmm-launch passes, so that
    /// mqvmm boots an image its own uid may not open).
    #[arg(long, value_name = "N")]
    kernel_fd: Option<RawFd>,
    /// Initramfs (cpio archive, optionally compressed).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// The initramfs as an already-open regular file.
    #[arg(long, value_name = "N")]
    initramfs_fd: Option<RawFd>,
    /// Kernel command line [default: "console=ttyS0", plus "pci=off" when there is no PCI
    /// device (no --net, or --transport mmio)].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    memory: u64,
    /// Use this already-open /dev/kvm file descriptor instead of opening /dev/kvm.
    #[arg(long, value_name = "N")]
    kvm_fd: Option<RawFd>,
    /// Network device: `fds=A,B,...[,mac=MAC][,mtu=N][,mq=off]` (one tap queue fd per queue pair,
    /// passed in by mqvmm-launch or a manager) or `tap=NAME,queues=N[,mac=..][,mtu=..][,mq=off]`
    /// (opens the tap itself, which needs CAP_NET_ADMIN). `io-threads=N|auto`: worker threads
    /// the queue pairs share (auto: the CPUs mqvmm may use beyond its vCPUs, 1 to one per pair).
    #[arg(long, value_name = "SPEC", value_parser = parse_net_spec)]
    net: Option<NetSpec>,
    /// How the network device attaches: `pci` (virtio-pci, one MSI-X vector per queue: no
    /// interrupt status read or acknowledgement, each queue's interrupt on its own vCPU) or
    /// `mmio` (virtio-mmio, one interrupt line for all queues). Default: pci, unless --cmdline
    /// has `pci=off` (a guest that will not look for PCI devices) or `pci=nomsi` (no MSI-X,
    /// which virtio-pci needs), also among other `pci=` options: then mmio.
    #[arg(long, value_name = "pci|mmio", value_parser = parse_transport)]
    transport: Option<Transport>,
    /// Log level: error, warn, info, debug, trace, off.
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_log_level)]
    log_level: LevelFilter,
    /// System call filters once the VM is built: `on` (a call outside a thread's filter ends
    /// mqvmm with a line naming it, exit code 159), `log` (allowed, logged by the kernel; for
    /// debugging), `off` (no filters; for debugging only).
    #[arg(long, value_name = "MODE", default_value = "on", value_parser = parse_seccomp_mode)]
    seccomp: SeccompMode,
    /// The operator's control socket: a unix socket mqvmm creates at PATH (mode 0600; an
    /// existing file that is not a stale socket is refused) and removes at exit. One JSON
    /// request per connection: counters, queues, link up/down, shutdown (see mqvmm-ctl).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Test only: the named thread kind (main, vcpu, spawner, net-pair, net-ctrl, api) issues a
    /// forbidden system call right after entering its filter.
    #[arg(long, value_name = "THREAD", hide = true, value_parser = parse_thread_kind)]
    seccomp_selftest: Option<ThreadKind>,
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    Transport::parse(s).ok_or_else(|| format!("unknown transport {s:?} (pci, mmio)"))
}

/// What a kernel command line says about PCI: Linux takes every `pci=` parameter as a
/// comma-separated list of options.
#[derive(Debug, Default)]
struct GuestPci {
    /// `off`: the guest does not look for PCI devices.
    off: bool,
    /// `nomsi`: no MSI or MSI-X, which leaves a virtio-pci function without INTx no interrupt.
    no_msi: bool,
}

fn guest_pci(cmdline: &str) -> GuestPci {
    let mut pci = GuestPci::default();
    let options = cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("pci="))
        .flat_map(|value| value.split(','));
    for option in options {
        match option {
            "off" => pci.off = true,
            "nomsi" => pci.no_msi = true,
            _ => {}
        }
    }
    pci
}

/// The network device's transport and the guest's command line, from what was asked for:
/// without `--transport`, virtio-pci unless the command line turns PCI off in the guest
/// (`pci=off`) or MSI (`pci=nomsi`; the virtio-pci function interrupts through MSI-X only),
/// then virtio-mmio; `--transport pci` with either is refused (the guest would have no
/// network device, or no interrupts from it). Without `--cmdline`, the default, with
/// `pci=off` when the VM has no PCI device.
fn transport_and_cmdline(
    transport: Option<Transport>,
    cmdline: Option<String>,
    has_net: bool,
) -> Result<(Transport, String), String> {
    let pci = cmdline.as_deref().map(guest_pci).unwrap_or_default();
    let transport = match transport {
        Some(Transport::Pci) if pci.off && has_net => {
            return Err(
                "--transport pci with pci=off on the kernel command line: the guest would not see \
                 its network device (drop pci=off, or use --transport mmio)"
                    .into(),
            )
        }
        Some(Transport::Pci) if pci.no_msi && has_net => {
            return Err(
                "--transport pci with pci=nomsi on the kernel command line: the virtio-pci \
                 network device interrupts through MSI-X only (drop pci=nomsi, or use --transport mmio)"
                    .into(),
            )
        }
        Some(transport) => transport,
        None if pci.off || pci.no_msi => {
            if has_net {
                let option = if pci.off { "pci=off" } else { "pci=nomsi" };
                log::info!(
                    "the kernel command line has {option}: the network device uses virtio-mmio"
                );
            }
            Transport::Mmio
        }
        None => Transport::Pci,
    };
    let cmdline = cmdline.unwrap_or_else(|| {
        if has_net && transport == Transport::Pci {
            DEFAULT_CMDLINE_PCI.to_string()
        } else {
            DEFAULT_CMDLINE_NO_PCI.to_string()
        }
    });
    Ok((transport, cmdline))
}

fn parse_seccomp_mode(s: &str) -> Result<SeccompMode, String> {
    SeccompMode::parse(s).ok_or_else(|| format!("unknown seccomp mode {s:?} (on, log, off)"))
}

fn parse_thread_kind(s: &str) -> Result<ThreadKind, String> {
    ThreadKind::parse(s).ok_or_else(|| format!("unknown thread kind {s:?}"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NetSource {
    Fds(Vec<RawFd>),
    Tap { name: String, queues: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NetSpec {
    source: NetSource,
    mac: Option<MacAddr>,
    mtu: Option<u16>,
    mq: bool,
    speed_mbps: u32,
    duplex: virtio_net::Duplex,
    /// `steer-map=`: the fd of the tap's steering program's map (from mqvmm-launch).
    steer_map: Option<RawFd>,
    /// `io-threads=`: worker threads the queue pairs share; `None` (`auto`): the CPUs left
    /// beside the vCPUs.
    io_threads: Option<u16>,
}

fn parse_log_level(s: &str) -> Result<LevelFilter, String> {
    vmm::logger::parse_level(s)
        .ok_or_else(|| format!("unknown log level {s:?} (error, warn, info, debug, trace, off)"))
}

/// A count from 1 to the most queue pairs the device has (`queues=`, `io-threads=`).
fn pair_count(value: &str) -> Option<u16> {
    value
        .parse::<u16>()
        .ok()
        .filter(|&n| n >= 1 && usize::from(n) <= MAX_QUEUE_PAIRS)
}

fn parse_net_spec(s: &str) -> Result<NetSpec, String> {
    let mut fds = None;
    let mut tap = None;
    let mut queues = None;
    let mut mac = None;
    let mut mtu = None;
    let mut mq = true;
    let mut speed_mbps = virtio_net::config::DEFAULT_SPEED_MBPS;
    let mut duplex = virtio_net::Duplex::Full;
    let mut steer_map = None;
    let mut io_threads = None;
    // Options are comma-separated `key=value`; only `fds=` takes a list, so a bare number
    // continues the `fds=` list before it.
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for token in s.split(',') {
        match token.split_once('=') {
            Some((key, value)) => pairs.push((key, value.to_string())),
            None => match pairs.last_mut() {
                Some((key, value)) if *key == "fds" => {
                    value.push(',');
                    value.push_str(token);
                }
                _ => return Err(format!("expected key=value, got {token:?}")),
            },
        }
    }
    for (key, value) in pairs {
        let value = value.as_str();
        match key {
            "fds" => {
                let list = value
                    .split(',')
                    .map(|f| {
                        f.parse::<RawFd>()
                            .ok()
                            .filter(|fd| *fd >= 0)
                            .ok_or_else(|| format!("fds: {f:?} is not a file descriptor number"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                fds = Some(list);
            }
            "tap" => {
                tap::validate_name(value).map_err(|e| format!("tap: {e}"))?;
                tap = Some(value.to_string());
            }
            "queues" => {
                queues = Some(pair_count(value).ok_or_else(|| {
                    format!(
                        "queues={value} is not a number from 1 to {MAX_QUEUE_PAIRS} \
                         (the most queue pairs the virtio-net device has)"
                    )
                })?)
            }
            "mac" => mac = Some(value.parse::<MacAddr>().map_err(|e| format!("mac: {e}"))?),
            "mtu" => {
                mtu = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|&m| m >= MIN_MTU)
                        .ok_or_else(|| {
                            format!("mtu={value} is not a number from {MIN_MTU} to 65535")
                        })?,
                )
            }
            "mq" => {
                mq = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("mq={value}: expected on or off")),
                }
            }
            "speed" => {
                let max = virtio_net::config::MAX_SPEED_MBPS;
                speed_mbps = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| (1..=max).contains(&v))
                    .ok_or_else(|| {
                        format!("speed={value} is not a number of Mbit/s from 1 to {max}")
                    })?;
            }
            "duplex" => duplex = value.parse().map_err(|e| format!("duplex: {e}"))?,
            "steer-map" => {
                steer_map = Some(
                    value
                        .parse::<RawFd>()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| {
                            format!("steer-map={value} is not a file descriptor number")
                        })?,
                )
            }
            "io-threads" => {
                io_threads = match value {
                    "auto" => None,
                    _ => Some(pair_count(value).ok_or_else(|| {
                        format!(
                            "io-threads={value} is not auto or a number from 1 to \
                             {MAX_QUEUE_PAIRS}"
                        )
                    })?),
                }
            }
            _ => return Err(format!("unknown --net option {key:?}")),
        }
    }
    let source = match (fds, tap) {
        (Some(_), Some(_)) => return Err("give either fds= or tap=, not both".into()),
        (Some(fds), None) => {
            if queues.is_some() {
                return Err(
                    "queues= goes with tap=; with fds= there is one queue pair per fd".into(),
                );
            }
            if fds.is_empty() || fds.len() > MAX_QUEUE_PAIRS {
                return Err(format!(
                    "fds= has {} file descriptors; give 1 to {MAX_QUEUE_PAIRS}, one per queue \
                     pair (the most queue pairs the virtio-net device has)",
                    fds.len()
                ));
            }
            NetSource::Fds(fds)
        }
        (None, Some(name)) => NetSource::Tap {
            name,
            queues: queues.unwrap_or(1),
        },
        (None, None) => return Err("--net needs fds=A,B,... or tap=NAME".into()),
    };
    Ok(NetSpec {
        source,
        mac,
        mtu,
        speed_mbps,
        duplex,
        mq,
        steer_map,
        io_threads,
    })
}

/// A stable, locally administered MAC derived from the tap name.
fn default_mac(if_name: &str) -> MacAddr {
    let mut hash: u32 = 0x811c_9dc5;
    for b in if_name.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let h = hash.to_be_bytes();
    MacAddr::from([0x02, 0x6d, h[0], h[1], h[2], h[3]])
}

enum Failure {
    /// Bad arguments or unusable inputs: exit code 2.
    Usage(String),
    /// The VM could not be built or failed: exit code 1.
    Runtime(String),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn capabilities_line() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".to_string())
    };
    format!(
        "uid {} euid {}, CapEff {}",
        // SAFETY: getuid/geteuid cannot fail.
        unsafe { libc::getuid() },
        // SAFETY: as above.
        unsafe { libc::geteuid() },
        field("CapEff:")
    )
}

fn holds_capabilities() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps != 0)
}

/// Where the network device's queues come from once the command line's fds are adopted.
enum NetQueues {
    /// `fds=`: the adopted queues.
    Adopted(Vec<tap::TapQueue>),
    /// `tap=NAME,queues=N`: mqvmm opens them (needs CAP_NET_ADMIN).
    Open { name: String, queues: u16 },
}

/// Takes ownership of the steering map's fd.
///
/// # Safety
/// `fd` must be handed over to mqvmm and used by nothing else in the process.
unsafe fn adopt_steer_map(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only reads the fd's flags; it fails for a number that is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "--net steer-map={fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the fd is open, and the caller guarantees it is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The steering map, mapped; without it the device runs with the tap's own steering, and
/// says so in one line.
fn map_steering(fd: Option<OwnedFd>) -> Option<tap::steering::SteeringMap> {
    match tap::steering::SteeringMap::from_fd(fd?) {
        Ok(map) => Some(map),
        Err(e) => {
            log::warn!(
                "virtio-net: steering off (the tap's steering map cannot be mapped: {e}); \
                 RSS is not offered and VQ_PAIRS_SET may lose frames queued for a disabled pair"
            );
            None
        }
    }
}

fn open_net(
    spec: NetSpec,
    queues: NetQueues,
    steer_map: Option<OwnedFd>,
) -> Result<NetSetup, Failure> {
    let queues = match queues {
        NetQueues::Adopted(queues) => queues,
        NetQueues::Open { name, queues } => {
            let config = tap::TapConfig {
                name: Some(name.clone()),
                queues,
                owner: None,
                group: None,
                persist: false,
            };
            match tap::MultiQueueTap::create(&config) {
                Ok(tap) => tap.into_queues(),
                Err(e) => {
                    let mut message = format!("--net tap={name}: {}", error_chain(&e));
                    if !holds_capabilities() {
                        message.push_str(
                            "; opening a tap needs CAP_NET_ADMIN: run mqvmm through mqvmm-launch \
                             (it creates the tap, passes one fd per queue and drops privileges) \
                             or pass fds= from your own manager",
                        );
                    }
                    return Err(Failure::Usage(message));
                }
            }
        }
    };
    let name = queues
        .first()
        .map(|q| q.if_name().to_string())
        .unwrap_or_default();
    Ok(NetSetup {
        mac: spec.mac.unwrap_or_else(|| default_mac(&name)),
        mtu: spec.mtu,
        mq: spec.mq,
        speed_mbps: spec.speed_mbps,
        duplex: spec.duplex,
        queues,
        steering: map_steering(steer_map),
        io_threads: spec.io_threads.map(usize::from),
    })
}

/// One fd number the command line hands over, and the option that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HandedFd {
    option: &'static str,
    fd: RawFd,
}

impl std::fmt::Display for HandedFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.option {
            NET_FDS => write!(f, "fd {} of {NET_FDS}", self.fd),
            option if option.ends_with('=') => write!(f, "{option}{}", self.fd),
            option => write!(f, "{option} {}", self.fd),
        }
    }
}

const NET_FDS: &str = "--net fds=";

/// Every fd the command line hands over: --kvm-fd, --net fds=, --kernel-fd, --initramfs-fd.
fn handed_fds(args: &Args) -> Vec<HandedFd> {
    let mut fds: Vec<HandedFd> = Vec::new();
    let mut add = |option, fd| fds.push(HandedFd { option, fd });
    args.kvm_fd.into_iter().for_each(|fd| add("--kvm-fd", fd));
    if let Some(NetSpec {
        source: NetSource::Fds(net),
        ..
    }) = &args.net
    {
        net.iter().for_each(|&fd| add(NET_FDS, fd));
    }
    if let Some(fd) = args.net.as_ref().and_then(|spec| spec.steer_map) {
        add("--net steer-map=", fd);
    }
    args.kernel_fd
        .into_iter()
        .for_each(|fd| add("--kernel-fd", fd));
    args.initramfs_fd
        .into_iter()
        .for_each(|fd| add("--initramfs-fd", fd));
    fds
}

/// What makes the handed fds mqvmm's alone: none is a standard stream (the console's) and no
/// fd is named by two options. (An fd listed twice in `fds=` is the tap crate's to refuse.)
fn check_handed_fds(fds: &[HandedFd]) -> Result<(), String> {
    for (i, handed) in fds.iter().enumerate() {
        if (0..=2).contains(&handed.fd) {
            return Err(format!(
                "{handed} is standard input, output or error, which mqvmm keeps for the console"
            ));
        }
        let other = fds[..i]
            .iter()
            .find(|first| first.fd == handed.fd && first.option != handed.option);
        if let Some(first) = other {
            return Err(format!(
                "{} and {} are both fd {}",
                first.option, handed.option, handed.fd
            ));
        }
    }
    Ok(())
}

/// The image given as an adopted fd or as a path (mqvmm opens it); clap allows at most one.
fn image(
    kind: ImageKind,
    adopted: Option<Image>,
    path: Option<PathBuf>,
) -> Result<Option<Image>, boot::Error> {
    match (adopted, path) {
        (Some(image), _) => Ok(Some(image)),
        (None, Some(path)) => Image::open(kind, &path).map(Some),
        (None, None) => Ok(None),
    }
}

fn run(args: Args) -> Result<VmExit, Failure> {
    log::info!("starting as {}", capabilities_line());
    if holds_capabilities() {
        log::warn!(
            "mqvmm holds capabilities ({}); it needs none when given --kvm-fd and --net fds= (see mqvmm-launch)",
            capabilities_line()
        );
    }
    let usage = |e: &dyn std::error::Error| Failure::Usage(error_chain(e));
    // The handed fds are checked and adopted before anything is opened, so that a launcher's
    // mistake is reported as such.
    check_handed_fds(&handed_fds(&args)).map_err(Failure::Usage)?;
    // SAFETY: the fds of --kvm-fd, --net fds= and steer-map=, --kernel-fd and --initramfs-fd are handed over by
    // whoever started mqvmm (mqvmm-launch, or a manager), and nothing else in this process uses
    // them: none is a standard stream and no two options name the same fd (check_handed_fds),
    // and adopt_queues refuses an fd listed twice. So each is owned once, by what adopts it
    // here; a number that is not open is refused, not adopted.
    let (kvm, net_queues, kernel, initramfs, steer_map) = unsafe {
        let kvm = args.kvm_fd.map(|fd| vm::adopt_kvm_fd(fd));
        let net_queues = args.net.as_ref().map(|spec| match &spec.source {
            NetSource::Fds(fds) => tap::adopt_queues(fds).map(NetQueues::Adopted),
            NetSource::Tap { name, queues } => Ok(NetQueues::Open {
                name: name.clone(),
                queues: *queues,
            }),
        });
        let kernel = args
            .kernel_fd
            .map(|fd| Image::from_fd(ImageKind::Kernel, fd));
        let initramfs = args
            .initramfs_fd
            .map(|fd| Image::from_fd(ImageKind::Initramfs, fd));
        let steer_map = args
            .net
            .as_ref()
            .and_then(|spec| spec.steer_map)
            .map(|fd| adopt_steer_map(fd));
        (kvm, net_queues, kernel, initramfs, steer_map)
    };
    let steer_map = steer_map.transpose().map_err(Failure::Usage)?;
    let kvm = match kvm.transpose().map_err(|e| usage(&e))? {
        Some(kvm) => KvmSource::Fd(kvm),
        None => KvmSource::Open,
    };
    let net_queues = net_queues
        .transpose()
        .map_err(|e| Failure::Usage(format!("--net: {}", error_chain(&e))))?;
    let kernel = kernel.transpose().map_err(|e| usage(&e))?;
    let initramfs = initramfs.transpose().map_err(|e| usage(&e))?;
    let net = match (args.net, net_queues) {
        (Some(spec), Some(queues)) => Some(open_net(spec, queues, steer_map)?),
        _ => None,
    };
    // Catch a wrong path or a file that is no kernel at all before touching KVM.
    let mut kernel = image(ImageKind::Kernel, kernel, args.kernel)
        .map_err(|e| usage(&e))?
        .ok_or_else(|| Failure::Usage("give --kernel or --kernel-fd".to_string()))?;
    boot::detect_format(&mut kernel).map_err(|e| usage(&e))?;
    let initramfs =
        image(ImageKind::Initramfs, initramfs, args.initramfs).map_err(|e| usage(&e))?;
    if args.seccomp == SeccompMode::Off {
        eprintln!(
            "mqvmm: warning: --seccomp=off: NO SYSTEM CALL FILTERS. A guest that compromises a \
             device thread gets every system call this process may make. For debugging only."
        );
    }
    let (transport, cmdline) = transport_and_cmdline(args.transport, args.cmdline, net.is_some())
        .map_err(Failure::Usage)?;
    // Created after the handed fds are adopted (its fds cannot take one of their numbers) and
    // before the filters, which name its fds. Dropped at the end of this function, which
    // removes the socket file.
    let mut api_socket = args
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()
        .map_err(|e| usage(&e))?;
    let machine = Machine {
        pci: net.is_some() && transport == Transport::Pci,
        api: api_socket.as_ref().and_then(|socket| {
            Some(ApiFds {
                listener: socket.listener_fd()?,
                dir: socket.dir_fd(),
            })
        }),
    };
    let sandbox = Sandbox::for_machine(args.seccomp, args.seccomp_selftest, machine)
        .map_err(|e| Failure::Runtime(error_chain(&e)))?;
    let config = VmConfig {
        kernel,
        initramfs,
        cmdline,
        cpus: args.cpus,
        memory_mib: args.memory,
        kvm,
        net,
        transport,
        sandbox: std::sync::Arc::new(sandbox),
        api: api_socket.as_mut().and_then(ApiSocket::take_listener),
    };
    let signals = SignalFd::new(&[
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
    ])
    .map_err(|e| Failure::Runtime(error_chain(&e)))?;
    let classify = |e: vm::Error| {
        if e.is_usage() {
            Failure::Usage(error_chain(&e))
        } else {
            Failure::Runtime(error_chain(&e))
        }
    };
    let vm = Vm::new(config).map_err(classify)?;
    let started = std::time::Instant::now();
    let _terminal = RawTerminal::enable();
    let exit = vm.run(signals).map_err(classify)?;
    log::info!("VM ran for {:.3} s", started.elapsed().as_secs_f64());
    drop(api_socket);
    Ok(exit)
}

/// Makes this process non-dumpable: another process of the same uid (mqvmm usually runs as a
/// shared unprivileged user) may then neither ptrace it nor copy its tap and KVM fds with
/// pidfd_getfd, /proc/PID belongs to root, and no core dump holds guest memory. The fds are
/// inherited from the launcher, so this comes first; exec made the process dumpable again.
fn make_undumpable() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes integer arguments only; prctl is variadic, so each is passed
    // as the unsigned long the kernel reads.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_DUMPABLE,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = make_undumpable() {
        eprintln!("mqvmm: error: prctl(PR_SET_DUMPABLE, 0) failed: {e}");
        return ExitCode::from(1);
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    vmm::logger::init("mqvmm", args.log_level);
    match run(args) {
        Ok(exit) => {
            match &exit {
                VmExit::Error(paragraph) => eprintln!("mqvmm: error: {paragraph}"),
                VmExit::Signal(sig) => eprintln!("mqvmm: stopped by signal {sig}"),
                VmExit::PowerOff | VmExit::Reset => log::info!("guest ended: {exit:?}"),
                VmExit::Shutdown => log::info!("stopped by a shutdown request on the API socket"),
            }
            ExitCode::from(exit.exit_code() as u8)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("mqvmm: error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("mqvmm: error: {message}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_spec_with_fds_and_options() {
        let spec = parse_net_spec("fds=4,5,6,7,mac=02:00:00:00:00:01,mtu=9000,mq=off").unwrap();
        assert_eq!(spec.source, NetSource::Fds(vec![4, 5, 6, 7]));
        assert_eq!(spec.mac, Some(MacAddr::from([2, 0, 0, 0, 0, 1])));
        assert_eq!(spec.mtu, Some(9000));
        assert!(!spec.mq);
        let spec = parse_net_spec("fds=3").unwrap();
        assert_eq!(spec.source, NetSource::Fds(vec![3]));
        assert!(spec.mq);
        assert_eq!(spec.speed_mbps, 10_000);
        assert_eq!(spec.duplex, virtio_net::Duplex::Full);
        let spec = parse_net_spec("fds=3,4,steer-map=9").unwrap();
        assert_eq!(spec.source, NetSource::Fds(vec![3, 4]));
        assert_eq!(spec.steer_map, Some(9));
        assert_eq!(spec.io_threads, None);
        let spec = parse_net_spec("fds=3,4,io-threads=2").unwrap();
        assert_eq!(spec.io_threads, Some(2));
        let spec = parse_net_spec("fds=3,4,io-threads=auto").unwrap();
        assert_eq!(spec.io_threads, None);
        let spec = parse_net_spec("fds=3,speed=25000,duplex=half").unwrap();
        assert_eq!(spec.speed_mbps, 25_000);
        assert_eq!(spec.duplex, virtio_net::Duplex::Half);
    }

    #[test]
    fn net_spec_with_tap() {
        let spec = parse_net_spec("tap=mq0,queues=4").unwrap();
        assert_eq!(
            spec.source,
            NetSource::Tap {
                name: "mq0".into(),
                queues: 4
            }
        );
    }

    #[test]
    fn net_spec_errors_are_specific() {
        for (spec, needle) in [
            ("fds=a,b", "not a file descriptor"),
            ("fds=", "not a file descriptor"),
            ("fds=-1", "not a file descriptor"),
            ("tap=x,fds=3", "not both"),
            ("fds=3,queues=2", "queues= goes with tap="),
            ("fds=3,speed=0", "speed=0 is not a number of Mbit/s"),
            ("fds=3,speed=fast", "speed=fast is not"),
            ("fds=3,duplex=auto", "neither full nor half"),
            ("mac=02:00:00:00:00:01", "needs fds="),
            ("fds=3,mac=01:00:00:00:00:01", "multicast"),
            ("fds=3,mac=zz", "mac: \"zz\" is not a MAC address"),
            ("fds=3,mac=00:00:00:00:00:00", "not a usable MAC address"),
            ("fds=3,mtu=10", "68 to 65535"),
            ("fds=3,mq=maybe", "on or off"),
            (
                "fds=3,io-threads=0",
                "io-threads=0 is not auto or a number from 1",
            ),
            ("fds=3,io-threads=many", "io-threads=many is not auto"),
            ("fds=3,color=red", "unknown --net option"),
            ("tap=averyveryverylongname", "longer than 15 bytes"),
            ("tap=a/b", "invalid interface name \"a/b\""),
            ("nonsense", "key=value"),
            ("fds=3,,4", "not a file descriptor"),
            (
                "fds=3,steer-map=x",
                "steer-map=x is not a file descriptor number",
            ),
            (
                "fds=3,steer-map=-2",
                "steer-map=-2 is not a file descriptor number",
            ),
        ] {
            let err = parse_net_spec(spec).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn queue_pairs_are_limited_to_what_the_device_supports() {
        let limit = format!("1 to {MAX_QUEUE_PAIRS}");
        assert!(parse_net_spec(&format!("tap=x,queues={MAX_QUEUE_PAIRS}")).is_ok());
        for queues in [0, MAX_QUEUE_PAIRS + 1] {
            let err = parse_net_spec(&format!("tap=x,queues={queues}")).unwrap_err();
            assert!(
                err.starts_with(&format!("queues={queues} is not a number from {limit}")),
                "{err}"
            );
        }
        let fds = |n: usize| (3..3 + n).map(|fd| fd.to_string()).collect::<Vec<_>>();
        assert!(parse_net_spec(&format!("fds={}", fds(MAX_QUEUE_PAIRS).join(","))).is_ok());
        let err =
            parse_net_spec(&format!("fds={}", fds(MAX_QUEUE_PAIRS + 1).join(","))).unwrap_err();
        let count = MAX_QUEUE_PAIRS + 1;
        assert!(
            err.starts_with(&format!("fds= has {count} file descriptors; give {limit}")),
            "{err}"
        );
    }

    #[test]
    fn handed_fds_must_be_distinct_and_no_standard_stream() {
        let check = |args: &[&str]| {
            let args = Args::try_parse_from([&["mqvmm"], args].concat()).unwrap();
            check_handed_fds(&handed_fds(&args))
        };
        assert_eq!(
            check(&["--kernel-fd", "5", "--initramfs-fd", "6", "--kvm-fd", "7"]),
            Ok(())
        );
        // Listed twice within fds=: left to tap::adopt_queues, which names both queues.
        assert_eq!(check(&["--kernel", "k", "--net", "fds=3,4,3"]), Ok(()));
        for (args, error) in [
            (
                &["--kernel-fd", "5", "--initramfs-fd", "5"][..],
                "--kernel-fd and --initramfs-fd are both fd 5",
            ),
            (
                &["--kernel", "k", "--kvm-fd", "4", "--net", "fds=3,4"],
                "--kvm-fd and --net fds= are both fd 4",
            ),
            (
                &["--kernel-fd", "3", "--net", "fds=3"],
                "--net fds= and --kernel-fd are both fd 3",
            ),
            (
                &["--kernel", "k", "--kvm-fd", "0"],
                "--kvm-fd 0 is standard input, output or error, which mqvmm keeps for the console",
            ),
            (
                &["--kernel", "k", "--net", "fds=3,1"],
                "fd 1 of --net fds= is standard input, output or error, which mqvmm keeps for \
                 the console",
            ),
            (
                &["--kernel", "k", "--net", "fds=3,4,steer-map=4"],
                "--net fds= and --net steer-map= are both fd 4",
            ),
            (
                &["--kernel", "k", "--net", "fds=3,steer-map=2"],
                "--net steer-map=2 is standard input, output or error, which mqvmm keeps for \
                 the console",
            ),
            (
                &["--kernel-fd", "2"],
                "--kernel-fd 2 is standard input, output or error, which mqvmm keeps for the \
                 console",
            ),
        ] {
            assert_eq!(check(args), Err(error.to_string()), "{args:?}");
        }
    }

    #[test]
    fn default_mac_is_stable_unicast_and_local() {
        let a = default_mac("mqtap0");
        assert_eq!(a, default_mac("mqtap0"));
        assert_ne!(a, default_mac("mqtap1"));
        assert!(a.is_locally_administered() && !a.is_multicast());
    }

    #[test]
    fn transport_defaults_to_pci_unless_the_guest_turns_pci_off() {
        let args = Args::try_parse_from(["mqvmm", "--kernel", "k"]).unwrap();
        assert_eq!(args.transport, None);
        let args = Args::try_parse_from(["mqvmm", "--kernel", "k", "--transport", "mmio"]).unwrap();
        assert_eq!(args.transport, Some(Transport::Mmio));
        let err = Args::try_parse_from(["mqvmm", "--kernel", "k", "--transport", "isa"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown transport"), "{err}");

        let resolve = |t, c: Option<&str>, net| transport_and_cmdline(t, c.map(String::from), net);
        assert_eq!(
            resolve(None, None, true),
            Ok((Transport::Pci, "console=ttyS0".to_string()))
        );
        assert_eq!(
            resolve(Some(Transport::Mmio), None, true),
            Ok((Transport::Mmio, "console=ttyS0 pci=off".to_string()))
        );
        assert_eq!(
            resolve(None, None, false).unwrap().1,
            "console=ttyS0 pci=off",
            "no device, no PCI probing"
        );
        assert_eq!(
            resolve(None, Some("console=ttyS0 pci=off quiet"), true),
            Ok((Transport::Mmio, "console=ttyS0 pci=off quiet".to_string()))
        );
        assert_eq!(
            resolve(None, Some("quiet"), true),
            Ok((Transport::Pci, "quiet".to_string()))
        );
        assert_eq!(
            resolve(Some(Transport::Mmio), Some("quiet"), true),
            Ok((Transport::Mmio, "quiet".to_string()))
        );
        let err = resolve(Some(Transport::Pci), Some("pci=off"), true).unwrap_err();
        assert!(err.contains("drop pci=off"), "{err}");
        assert!(resolve(Some(Transport::Pci), Some("pci=off"), false).is_ok());
    }

    #[test]
    fn pci_options_are_read_from_every_comma_separated_pci_value() {
        let resolve = |t, c: &str| transport_and_cmdline(t, Some(c.to_string()), true);
        // `off` among other options turns PCI off just the same.
        for cmdline in [
            "console=ttyS0 pci=noacpi,off",
            "pci=off,realloc quiet",
            "pci=realloc pci=off",
        ] {
            assert_eq!(
                resolve(None, cmdline),
                Ok((Transport::Mmio, cmdline.to_string())),
                "{cmdline}"
            );
            let err = resolve(Some(Transport::Pci), cmdline).unwrap_err();
            assert!(err.contains("drop pci=off"), "{cmdline}: {err}");
        }
        // Not an option of pci=, or not pci= at all.
        assert_eq!(resolve(None, "pci=offx").unwrap().0, Transport::Pci);
        assert_eq!(resolve(None, "xpci=off").unwrap().0, Transport::Pci);
        assert_eq!(resolve(None, "pci=realloc").unwrap().0, Transport::Pci);
        // No MSI: no interrupts from the virtio-pci function, so mmio, and pci is refused
        // with one line.
        for cmdline in ["pci=nomsi", "console=ttyS0 pci=realloc,nomsi"] {
            assert_eq!(
                resolve(None, cmdline).unwrap().0,
                Transport::Mmio,
                "{cmdline}"
            );
            let err = resolve(Some(Transport::Pci), cmdline).unwrap_err();
            assert!(
                err.contains("pci=nomsi") && err.contains("MSI-X only"),
                "{err}"
            );
            assert!(!err.contains('\n'), "one line: {err}");
            assert_eq!(
                resolve(Some(Transport::Mmio), cmdline).unwrap().0,
                Transport::Mmio
            );
            assert!(
                transport_and_cmdline(Some(Transport::Pci), Some(cmdline.into()), false).is_ok()
            );
        }
    }

    #[test]
    fn cli_takes_exactly_one_kernel_and_at_most_one_initramfs_source() {
        let parse = |args: &[&str]| Args::try_parse_from([&["mqvmm"], args].concat());
        let args = parse(&["--kernel-fd", "5", "--initramfs-fd", "6"]).unwrap();
        assert_eq!((args.kernel, args.kernel_fd), (None, Some(5)));
        assert_eq!((args.initramfs, args.initramfs_fd), (None, Some(6)));
        let args = parse(&["--kernel", "k", "--initramfs", "i"]).unwrap();
        assert_eq!(args.kernel_fd, None);
        assert!(parse(&["--kernel-fd", "5", "--initramfs", "i"]).is_ok());
        for both in [
            &["--kernel", "k", "--kernel-fd", "5"][..],
            &["--kernel", "k", "--initramfs", "i", "--initramfs-fd", "6"],
        ] {
            let err = parse(both).unwrap_err().to_string();
            assert!(err.contains("cannot be used with"), "{both:?}: {err}");
        }
        let err = parse(&["--initramfs-fd", "6"]).unwrap_err().to_string();
        assert!(err.contains("--kernel"), "{err}");
    }

    #[test]
    fn cli_rejects_zero_cpus_and_bad_memory() {
        assert!(Args::try_parse_from(["mqvmm", "--kernel", "k", "--cpus", "0"]).is_err());
        assert!(Args::try_parse_from(["mqvmm", "--kernel", "k", "--memory", "1"]).is_err());
        assert!(Args::try_parse_from(["mqvmm", "--kernel", "k", "--cpus", "8"]).is_ok());
        assert!(Args::try_parse_from(["mqvmm"]).is_err());
    }
}
