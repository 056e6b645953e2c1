// SPDX-License-Identifier: Apache-2.0
//! `mqvmm-bench`: what `make bench` runs.
//!
//! - `all`: the device data path against the raw tap ceiling (a child process in its own
//!   network namespace), then the guests (mqvmm vs QEMU vhost off/on, and mqvmm with vs
//!   without eBPF steering host->guest; in the nested rig's L1 when /dev/kvm cannot run guests
//!   here), then the report: `bench/results/latest.json`,
//!   `latest.md`, `device-vs-ceiling.svg`, `guest-throughput.svg`.
//! - `device`, `guest`: one part, records to a file; `report`: render records files.
//! - `guest-inner`: the guest part where KVM works (started inside L1 by `guest`).
//!
//! Needs root (taps, network namespaces, packet sockets).

mod device;
mod guest;
mod kvmstat;
mod record;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use record::Record;

#[derive(Parser, Debug)]
#[command(
    name = "mqvmm-bench",
    about = "mqvmm benchmarks: device data path vs the raw tap ceiling, guests vs QEMU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Device path, guests and report (what `make bench` runs).
    All {
        /// Where latest.json, latest.md and the plots go.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the raw records go (default: $MQVMM_BUILD/bench).
        #[arg(long)]
        work: Option<PathBuf>,
        /// Skip the guest part.
        #[arg(long)]
        no_guest: bool,
        /// Skip the device part.
        #[arg(long)]
        no_device: bool,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Device data path only (root; runs in a private network namespace).
    Device {
        /// Records file to write.
        #[arg(long)]
        records: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Guest benchmarks only (where KVM works, else in the nested rig).
    Guest {
        /// Records file to write.
        #[arg(long)]
        records: PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// The guest benchmarks, here (run inside L1 by `guest`).
    #[command(hide = true)]
    GuestInner {
        /// Records file to write.
        #[arg(long)]
        records: PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Render records files, or a latest.json, into latest.json, latest.md and the plots.
    Report {
        /// Records files (meta, device, guest), or a latest.json (by its extension) for its
        /// facts and samples.
        #[arg(long, required = true, num_args = 1..)]
        records: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct DeviceArgs {
    /// Pair counts.
    #[arg(long = "device-pairs", value_delimiter = ',', default_value = "1,2,4")]
    device_pairs: Vec<usize>,
    /// Ethernet frame lengths in bytes (above 1514: TSO frames).
    #[arg(long, value_delimiter = ',', default_value = "64,1514,65535")]
    sizes: Vec<usize>,
    /// Directions: tx (guest->host), rx (host->guest).
    #[arg(long, value_delimiter = ',', default_value = "tx,rx")]
    dirs: Vec<String>,
    /// Paths: ceiling, device (profiling runs use one).
    #[arg(long, value_delimiter = ',', default_value = "ceiling,device")]
    paths: Vec<String>,
    /// Samples per configuration and path (after the warm-up).
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Target length of one ceiling sample, in ms.
    #[arg(long, default_value_t = 200)]
    sample_ms: u64,
    /// Warm-up per configuration, in ms.
    #[arg(long, default_value_t = 300)]
    warmup_ms: u64,
}

#[derive(Args, Debug, Clone)]
struct GuestArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    iperf_secs: u32,
    /// Parallel iperf3 streams.
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    /// Guest memory (MiB).
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Queue pairs (steps 1..=N).
    #[arg(long, default_value_t = 4)]
    pairs: u16,
    /// VMMs to compare: mqvmm (with the launcher's eBPF steering), qemu-vhost-off,
    /// qemu-vhost-on, mqvmm-no-steering (`mqvmm-launch --no-steering`; host->guest only),
    /// mqvmm-thread-per-pair (`mqvmm-launch --io-threads <pairs>`: a worker thread per pair).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mqvmm,qemu-vhost-off,qemu-vhost-on,mqvmm-no-steering,mqvmm-thread-per-pair"
    )]
    vmms: Vec<String>,
    /// How mqvmm attaches its network device (`mqvmm --transport`; pci, mqvmm's default, is
    /// the transport QEMU's virtio-net-pci peer uses too).
    #[arg(long, default_value = "pci", value_parser = ["mmio", "pci"])]
    mqvmm_transport: String,
}

/// Command-line values that do not parse.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("unknown {what} {value:?} (expected {expected})")]
    Value {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("needs root (creates taps and network namespaces, opens packet sockets)")]
    NotRoot,
    #[error(transparent)]
    Device(#[from] device::Error),
    #[error(transparent)]
    Guest(#[from] guest::Error),
    #[error(transparent)]
    Records(#[from] record::Error),
    #[error(transparent)]
    Report(#[from] report::Error),
    #[error("cannot run {what}")]
    Run {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited with {status}")]
    Child {
        what: String,
        status: std::process::ExitStatus,
    },
}

impl DeviceArgs {
    fn options(&self) -> Result<device::Options, Error> {
        let dirs = self
            .dirs
            .iter()
            .map(|d| match d.as_str() {
                "tx" => Ok(device::Dir::Tx),
                "rx" => Ok(device::Dir::Rx),
                _ => Err(Error::Value {
                    what: "direction",
                    value: d.clone(),
                    expected: "tx or rx",
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let paths = self
            .paths
            .iter()
            .map(|p| match p.as_str() {
                "ceiling" => Ok(device::PathKind::Ceiling),
                "device" => Ok(device::PathKind::Device),
                _ => Err(Error::Value {
                    what: "path",
                    value: p.clone(),
                    expected: "ceiling or device",
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(device::Options {
            pairs: self.device_pairs.clone(),
            sizes: self.sizes.clone(),
            dirs,
            paths,
            samples: self.samples,
            sample_ms: self.sample_ms,
            warmup_ms: self.warmup_ms,
        })
    }

    fn to_args(&self) -> Vec<String> {
        let join = |v: &[String]| v.join(",");
        let nums = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        vec![
            format!("--device-pairs={}", nums(&self.device_pairs)),
            format!("--sizes={}", nums(&self.sizes)),
            format!("--dirs={}", join(&self.dirs)),
            format!("--paths={}", join(&self.paths)),
            format!("--samples={}", self.samples),
            format!("--sample-ms={}", self.sample_ms),
            format!("--warmup-ms={}", self.warmup_ms),
        ]
    }
}

impl GuestArgs {
    fn options(&self) -> Result<guest::Options, Error> {
        let vmms = self
            .vmms
            .iter()
            .map(|v| {
                guest::Vmm::from_key(v).ok_or_else(|| Error::Value {
                    what: "VMM",
                    value: v.clone(),
                    expected: "mqvmm, qemu-vhost-off, qemu-vhost-on, mqvmm-no-steering or mqvmm-thread-per-pair",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(guest::Options {
            reps: self.reps,
            iperf_secs: self.iperf_secs,
            streams: self.streams,
            cpus: self.cpus,
            memory_mib: self.memory,
            pairs: self.pairs,
            vmms,
            mqvmm_transport: self.mqvmm_transport.clone(),
        })
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn say(line: &str) {
    println!("{line}");
}

fn run_device(records: &Path, args: &DeviceArgs) -> Result<(), Error> {
    if !is_root() {
        return Err(Error::NotRoot);
    }
    let opts = args.options()?;
    device::net::enter_private_netns().map_err(device::Error::from)?;
    let mut out = Vec::new();
    device::run(&opts, &mut |r| out.push(r), &mut |l| say(l))?;
    record::write_all(records, &out)?;
    Ok(())
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn machine_meta() -> Vec<Record> {
    let ws = mqvmm_tests::rig::workspace_dir();
    let ws = ws.to_string_lossy();
    let commit = first_line("git", &["-C", &ws, "rev-parse", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", &ws, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        Record::meta("date", first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        Record::meta(
            "commit",
            format!(
                "{commit}{}",
                if dirty { " (with local changes)" } else { "" }
            ),
        ),
        Record::meta("cpu_model", cpu),
        Record::meta("cores", cores.to_string()),
        Record::meta("host_kernel", first_line("uname", &["-r"])),
        Record::meta("loadavg_start", loadavg()),
    ]
}

#[allow(clippy::too_many_arguments)]
fn run_all(
    out: Option<PathBuf>,
    work: Option<PathBuf>,
    no_guest: bool,
    no_device: bool,
    dargs: &DeviceArgs,
    gargs: &GuestArgs,
) -> Result<(), Error> {
    if !is_root() {
        return Err(Error::NotRoot);
    }
    let out = out.unwrap_or_else(|| mqvmm_tests::rig::workspace_dir().join("bench/results"));
    let work = work.unwrap_or_else(|| mqvmm_tests::rig::build_dir().join("bench"));
    std::fs::create_dir_all(&work).map_err(|source| Error::Run {
        what: format!("mkdir {}", work.display()),
        source,
    })?;
    let started = Instant::now();
    let meta_path = work.join("meta.rec");
    let device_path = work.join("device.rec");
    let guest_path = work.join("guest.rec");
    let mut meta = machine_meta();
    say(&format!(
        "bench: {} cores, load average {} (numbers are only comparable within one run)",
        meta.iter()
            .find_map(|r| match r {
                Record::Meta { key, value } if key == "cores" => Some(value.as_str()),
                _ => None,
            })
            .unwrap_or("?"),
        loadavg()
    ));
    let mut parts = vec![meta_path.clone()];
    let mut guest_failed = None;
    if !no_device {
        let t = Instant::now();
        let exe = std::env::current_exe().map_err(|source| Error::Run {
            what: "own executable".into(),
            source,
        })?;
        let status = Command::new(exe)
            .arg("device")
            .arg("--records")
            .arg(&device_path)
            .args(dargs.to_args())
            .status()
            .map_err(|source| Error::Run {
                what: "mqvmm-bench device".into(),
                source,
            })?;
        if !status.success() {
            return Err(Error::Child {
                what: "mqvmm-bench device".into(),
                status,
            });
        }
        say(&format!(
            "bench: device path done in {:.0} s",
            t.elapsed().as_secs_f64()
        ));
        parts.push(device_path);
    }
    if !no_guest {
        let t = Instant::now();
        let decision = mqvmm_tests::rig::decision();
        meta.push(Record::meta(
            "rig_decision",
            format!("{}: {}", decision.mode, decision.reason),
        ));
        // A failed guest run still leaves what it measured; render it, then report the failure.
        let _ = std::fs::remove_file(&guest_path);
        guest_failed = guest::run(&gargs.options()?, &guest_path, &mut |l| say(l)).err();
        say(&format!(
            "bench: guests {} in {:.0} s",
            if guest_failed.is_some() {
                "FAILED"
            } else {
                "done"
            },
            t.elapsed().as_secs_f64()
        ));
        if guest_path.is_file() {
            parts.push(guest_path);
        }
    }
    meta.push(Record::meta("loadavg_end", loadavg()));
    meta.push(Record::meta(
        "duration_s",
        format!("{:.0}", started.elapsed().as_secs_f64()),
    ));
    record::write_all(&meta_path, &meta)?;
    render(&parts, &out)?;
    match guest_failed {
        Some(e) => Err(Error::Guest(e)),
        None => Ok(()),
    }
}

fn render(parts: &[PathBuf], out: &Path) -> Result<(), Error> {
    let mut records = Vec::new();
    for p in parts {
        if p.extension().is_some_and(|e| e == "json") {
            records.extend(report::Published::read(p)?.into_records());
        } else {
            records.extend(record::read_all(p)?);
        }
    }
    let data = report::Data::from_records(records);
    let written = report::write(&data, out)?;
    say("");
    if !data.device.is_empty() {
        say(&written.device_table);
    }
    if !data.guest.is_empty() {
        say(&written.guest_table);
    }
    for f in &written.files {
        say(&format!("bench: wrote {}", f.display()));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::All {
            out,
            work,
            no_guest,
            no_device,
            device,
            guest,
        } => run_all(out, work, no_guest, no_device, &device, &guest),
        Cmd::Device { records, device } => run_device(&records, &device),
        Cmd::Guest { records, guest } => guest
            .options()
            .and_then(|o| guest::run(&o, &records, &mut |l| say(l)).map_err(Error::from)),
        Cmd::GuestInner { records, guest } => guest
            .options()
            .and_then(|o| guest::run_inner(&o, &records, &mut |l| say(l)).map_err(Error::from)),
        Cmd::Report { records, out } => render(&records, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("mqvmm-bench: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{guest, Cli, Cmd};

    #[test]
    fn command_line_is_consistent_and_defaults_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["mqvmm-bench", "all"]).unwrap();
        let Cmd::All { device, guest, .. } = cli.cmd else {
            panic!("not all");
        };
        let d = device.options().unwrap();
        assert_eq!(d.pairs, vec![1, 2, 4]);
        assert_eq!(d.sizes, vec![64, 1514, 65535]);
        let g = guest.options().unwrap();
        assert_eq!((g.reps, g.pairs), (3, 4));
        assert_eq!(g.vmms, guest::Vmm::ALL);
        // The device child and the L1 run get the same options back.
        let again = Cli::try_parse_from(
            [
                "mqvmm-bench".to_string(),
                "device".into(),
                "--records".into(),
                "x".into(),
            ]
            .into_iter()
            .chain(device.to_args()),
        )
        .unwrap();
        let Cmd::Device { device: back, .. } = again.cmd else {
            panic!("not device");
        };
        assert_eq!(back.options().unwrap().sizes, d.sizes);
        let inner = Cli::try_parse_from(
            [
                "mqvmm-bench".to_string(),
                "guest-inner".into(),
                "--records".into(),
                "y".into(),
            ]
            .into_iter()
            .chain(g.to_args()),
        );
        assert!(inner.is_ok(), "{inner:?}");
        assert_eq!(g.mqvmm_transport, "pci");
        let mmio = Cli::try_parse_from([
            "mqvmm-bench",
            "guest",
            "--records",
            "z",
            "--mqvmm-transport",
            "mmio",
        ])
        .unwrap();
        let Cmd::Guest { guest: mmio, .. } = mmio.cmd else {
            panic!("not guest");
        };
        let mmio = mmio.options().unwrap();
        assert!(mmio
            .to_args()
            .contains(&"--mqvmm-transport=mmio".to_string()));
        assert!(Cli::try_parse_from([
            "mqvmm-bench",
            "guest",
            "--records",
            "z",
            "--mqvmm-transport",
            "isa"
        ])
        .is_err());
    }

    #[test]
    fn the_no_steering_variant_is_selectable_alone_and_reaches_l1() {
        let cli = Cli::try_parse_from([
            "mqvmm-bench",
            "guest",
            "--records",
            "z",
            "--vmms",
            "mqvmm-no-steering",
        ])
        .unwrap();
        let Cmd::Guest { guest: args, .. } = cli.cmd else {
            panic!("not guest");
        };
        let opts = args.options().unwrap();
        assert_eq!(opts.vmms, vec![guest::Vmm::MqvmmNoSteering]);
        assert!(opts
            .to_args()
            .contains(&"--vmms=mqvmm-no-steering".to_string()));
    }

    #[test]
    fn unknown_values_are_refused() {
        let cli = Cli::try_parse_from(["mqvmm-bench", "device", "--records", "x", "--dirs", "up"])
            .unwrap();
        let Cmd::Device { device, .. } = cli.cmd else {
            panic!("not device");
        };
        assert!(device.options().unwrap_err().to_string().contains("\"up\""));
    }
}
