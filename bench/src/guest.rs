// SPDX-License-Identifier: Apache-2.0
//! Guest benchmarks: mqvmm and Debian's QEMU (virtio-net-pci, vhost=off and vhost=on) boot
//! the same guest kernel and initramfs with the same vCPUs and memory on the same multiqueue
//! tap, one after the other, in one KVM environment (the nested rig's L1 here, one L1 boot for
//! everything), repeated `reps` times in rotating order. mqvmm boots twice per repetition: as
//! `mqvmm` (mqvmm-launch attaches its eBPF steering program to the tap, the device picks each
//! received frame's queue) and as `mqvmm-no-steering` (`mqvmm-launch --no-steering`: the tap's
//! own flow steering picks it). Steering only decides where host->guest frames land, so the
//! second boot measures host->guest throughput only.
//!
//! Per boot: boot time (VMM spawn to the guest's `MQVMM-READY`, wall; and the guest's own
//! uptime at that point), then for 1..=max pairs: `ethtool -L eth0 combined N` timed in the
//! guest (ktime from /proc/timer_list around the command, minus the same measurement around
//! the `true` builtin), for mqvmm also `last_vq_pairs_set_ns` from its SIGUSR1 metrics line
//! (control kick to used entry, inside the VMM), the host tap's attached queue count, iperf3
//! TCP guest->host and host->guest with parallel streams (host->guest only for
//! `mqvmm-no-steering`); at the end the VMM's RSS beyond guest RAM (VmRSS minus the Rss of the
//! guest-memory mapping in /proc/PID/smaps). For mqvmm, a fact per boot records whether the
//! launcher attached steering (`steering_<vmm>_rep<N>`). Around every iperf3 run the VM's KVM
//! counters are read from outside the VMM ([`crate::kvmstat`]) and their change per MB recorded
//! (`kvm_<counter>_per_mb_<dir>`) next to the guest's interrupts per MB; a VMM whose counters
//! cannot be read says why once per boot (`kvmstat_error_<vmm>_rep<N>`) and runs on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqvmm_tests::console::GuestConsole;
use mqvmm_tests::netns;
use mqvmm_tests::rig::{self, GUEST_IP, HOST_IP};

use crate::kvmstat::{self, Counters, PerMb};
use crate::record::{self, GuestSample, Record};

const TAP: &str = "mqbt0";
const STEP: Duration = Duration::from_secs(90);
const BOOT: Duration = Duration::from_secs(240);

/// A guest benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host command (ip, iperf3) failed.
    #[error("host command `{cmd}` failed: {detail}")]
    Host {
        /// The command.
        cmd: String,
        /// Exit status or error.
        detail: String,
    },
    /// The VMM could not be started.
    #[error("cannot start {vmm}")]
    Spawn {
        /// Which VMM.
        vmm: Vmm,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest misbehaved (no readiness marker, a command failed, unreadable output).
    #[error("{vmm} rep {rep}: {what}")]
    Guest {
        /// Which VMM.
        vmm: Vmm,
        /// Repetition.
        rep: usize,
        /// What happened (with the console tail).
        what: String,
    },
    /// The records could not be written or read.
    #[error(transparent)]
    Records(#[from] record::Error),
    /// The nested rig failed.
    #[error("nested rig")]
    Rig(#[source] rig::RigError),
    /// The run inside the KVM environment failed.
    #[error("guest benchmark inside L1 ended with {code:?}; its output ends with:\n{tail}")]
    Inner {
        /// Exit code.
        code: Option<i32>,
        /// Last lines of its output.
        tail: String,
    },
    /// Something the benchmark needs is missing.
    #[error("missing {0}")]
    Missing(String),
}

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// mqvmm under mqvmm-launch, unprivileged, with the launcher's eBPF steering (its default
    /// with more than one queue).
    Mqvmm,
    /// QEMU, virtio-net-pci, userspace virtio-net.
    QemuVhostOff,
    /// QEMU, virtio-net-pci, vhost-net in the host kernel.
    QemuVhostOn,
    /// mqvmm under `mqvmm-launch --no-steering`: the tap's own flow steering picks the queue of
    /// each host->guest frame. Measured host->guest only.
    MqvmmNoSteering,
    /// mqvmm with a worker thread per queue pair (`mqvmm-launch --io-threads <pairs>`), as it
    /// ran before its default became the CPUs left beside the vCPUs. Measured guest->host and
    /// host->guest.
    MqvmmThreadPerPair,
}

impl Vmm {
    /// All VMMs in report order.
    pub const ALL: [Vmm; 5] = [
        Vmm::Mqvmm,
        Vmm::QemuVhostOff,
        Vmm::QemuVhostOn,
        Vmm::MqvmmNoSteering,
        Vmm::MqvmmThreadPerPair,
    ];

    /// Key used in records.
    pub fn key(self) -> &'static str {
        match self {
            Vmm::Mqvmm => "mqvmm",
            Vmm::QemuVhostOff => "qemu-vhost-off",
            Vmm::QemuVhostOn => "qemu-vhost-on",
            Vmm::MqvmmNoSteering => "mqvmm-no-steering",
            Vmm::MqvmmThreadPerPair => "mqvmm-thread-per-pair",
        }
    }

    /// Whether this is mqvmm (with its SIGUSR1 metrics line), in either steering mode.
    pub fn is_mqvmm(self) -> bool {
        matches!(
            self,
            Vmm::Mqvmm | Vmm::MqvmmNoSteering | Vmm::MqvmmThreadPerPair
        )
    }

    /// Whether iperf3 runs in direction `dir` (`up`: guest->host, `down`: host->guest) under
    /// this VMM. Steering decides only where host->guest frames land: without it, guest->host
    /// would measure the same as `mqvmm`.
    pub fn measures(self, dir: &str) -> bool {
        self != Vmm::MqvmmNoSteering || dir == "down"
    }

    /// Parses a key.
    pub fn from_key(key: &str) -> Option<Vmm> {
        Vmm::ALL.into_iter().find(|v| v.key() == key)
    }
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Boots per VMM.
    pub reps: usize,
    /// Seconds per iperf3 run.
    pub iperf_secs: u32,
    /// Parallel iperf3 streams.
    pub streams: u32,
    /// Guest vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Queue pairs offered (the steps go 1..=pairs).
    pub pairs: u16,
    /// VMMs to compare.
    pub vmms: Vec<Vmm>,
    /// mqvmm's `--transport` (`mmio` or `pci`).
    pub mqvmm_transport: String,
}

impl Options {
    /// The arguments that reproduce these options on the `guest-inner` command line.
    pub fn to_args(&self) -> Vec<String> {
        let vmms: Vec<&str> = self.vmms.iter().map(|v| v.key()).collect();
        vec![
            format!("--reps={}", self.reps),
            format!("--iperf-secs={}", self.iperf_secs),
            format!("--streams={}", self.streams),
            format!("--cpus={}", self.cpus),
            format!("--memory={}", self.memory_mib),
            format!("--pairs={}", self.pairs),
            format!("--vmms={}", vmms.join(",")),
            format!("--mqvmm-transport={}", self.mqvmm_transport),
        ]
    }
}

fn host(cmd: &str) -> Result<String, Error> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Host {
            cmd: cmd.into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Host {
            cmd: cmd.into(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A persistent multiqueue tap with the host address; removed on drop.
struct HostTap;

impl HostTap {
    fn new() -> Result<HostTap, Error> {
        let _ = host(&format!("ip link del {TAP} 2>/dev/null"));
        host(&format!(
            "ip tuntap add dev {TAP} mode tap multi_queue vnet_hdr && ip addr add {HOST_IP}/24 dev {TAP} && ip link set {TAP} up"
        ))?;
        Ok(HostTap)
    }

    fn attached(&self) -> Option<u32> {
        netns::tun_info(TAP).ok().map(|i| i.num_queues)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = host(&format!("ip link del {TAP}"));
    }
}

/// iperf3 server on the host side; killed on drop.
struct Iperf(Child);

impl Iperf {
    fn start() -> Result<Iperf, Error> {
        let child = Command::new("iperf3")
            .args(["-s", "-B", HOST_IP])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Host {
                cmd: "iperf3 -s".into(),
                detail: e.to_string(),
            })?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Iperf(child))
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vmm_command(vmm: Vmm, opts: &Options) -> Command {
    let images = rig::guest_images();
    let cmdline = format!("console=ttyS0 quiet panic=-1 mqvmm.ip={GUEST_IP}/24");
    match vmm {
        Vmm::Mqvmm | Vmm::MqvmmNoSteering | Vmm::MqvmmThreadPerPair => {
            let mut cmd = Command::new(rig::bin_path("mqvmm-launch"));
            cmd.args(["--tap", TAP, "--queues", &opts.pairs.to_string()]);
            if vmm == Vmm::MqvmmNoSteering {
                cmd.arg("--no-steering");
            }
            if vmm == Vmm::MqvmmThreadPerPair {
                cmd.args(["--io-threads", &opts.pairs.to_string()]);
            }
            cmd.args(["--user", "nobody", "--"])
                .arg("--kernel")
                .arg(&images.vmlinux)
                .arg("--initramfs")
                .arg(&images.initramfs)
                .args(["--cpus", &opts.cpus.to_string()])
                .args(["--memory", &opts.memory_mib.to_string()])
                .args(["--transport", &opts.mqvmm_transport]);
            if opts.mqvmm_transport == "pci" {
                cmd.args(["--cmdline", &cmdline]);
            } else {
                // Without PCI devices; the guest would otherwise probe for them.
                cmd.args(["--cmdline", &format!("{cmdline} pci=off")]);
            }
            cmd
        }
        Vmm::QemuVhostOff | Vmm::QemuVhostOn => {
            let vhost = if vmm == Vmm::QemuVhostOn { "on" } else { "off" };
            let n = opts.pairs;
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-enable-kvm", "-cpu", "host", "-M", "q35"])
                .args(["-smp", &opts.cpus.to_string()])
                .args(["-m", &opts.memory_mib.to_string()])
                .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
                .args(["-monitor", "none", "-no-reboot"])
                .arg("-kernel")
                .arg(&images.bzimage)
                .arg("-initrd")
                .arg(&images.initramfs)
                .args(["-append", &cmdline])
                .arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={TAP},script=no,downscript=no,queues={n},vhost={vhost}"
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n0,mq=on,vectors={}",
                    2 * n + 2
                ));
            cmd
        }
    }
}

/// From `/proc/interrupts` lines: how many lines fired at all, and how many of the first `cpus`
/// CPU columns took any of them.
pub fn irq_spread(table: &str, cpus: usize) -> (usize, usize) {
    let mut lines = 0;
    let mut per_cpu = vec![0u64; cpus];
    for line in table.lines() {
        let counts: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(cpus)
            .map_while(|f| f.parse().ok())
            .collect();
        if counts.iter().any(|&c| c > 0) {
            lines += 1;
        }
        for (total, c) in per_cpu.iter_mut().zip(counts) {
            *total += c;
        }
    }
    (lines, per_cpu.iter().filter(|&&c| c > 0).count())
}

/// Sum over the queue pairs of every `<queue>_<suffix>` counter in a `mqvmm-metrics:` line
/// (e.g. suffix `_interrupts`: rx and tx interrupts of every pair).
pub fn pair_sum(line: &str, suffix: &str) -> u64 {
    line.split(" | ")
        .filter(|seg| seg.starts_with("pair"))
        .flat_map(|seg| seg.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| k.ends_with(suffix))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// `[SUM] ... receiver` of iperf3 -f m: (Mbit/s, MBytes transferred).
pub fn iperf_sum(output: &str) -> Option<(f64, f64)> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("receiver") && (l.contains("[SUM]") || !output.contains("[SUM]")))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "<value> <unit>" with a G/M/K prefix, scaled to mega.
    let mega = |suffix: &str| -> Option<f64> {
        let unit = fields.iter().position(|f| f.ends_with(suffix))?;
        let value: f64 = fields.get(unit.checked_sub(1)?)?.parse().ok()?;
        let scale = match fields[unit].chars().next()? {
            'G' => 1e3,
            'M' => 1.0,
            'K' => 1e-3,
            _ => 1e-6,
        };
        Some(value * scale)
    };
    Some((mega("bits/sec")?, mega("Bytes")?))
}

/// What mqvmm-launch said about steering in a VMM's output: `attached`, `off: <why>` (the
/// launcher could not attach it), or `off` (no line: `--no-steering`, or one queue).
pub fn launcher_steering(transcript: &str) -> String {
    for line in transcript.lines() {
        let Some(msg) = line.trim().strip_prefix("mqvmm-launch: tap ") else {
            continue;
        };
        if msg.contains(": eBPF steering attached") {
            return "attached".into();
        }
        if let Some((_, why)) = msg.split_once(": steering is off: ") {
            return format!("off: {why}");
        }
    }
    "off".into()
}

/// `key=value` from a `mqvmm-metrics:` line (device fields come before the first `|`).
pub fn metric(line: &str, key: &str) -> Option<u64> {
    let device = line.split(" | ").next()?;
    device
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// RSS of a process beyond its guest memory, in KiB: VmRSS minus the Rss of the mappings at
/// least `guest_kib` large (the guest RAM block; QEMU and mqvmm map it in one piece).
pub fn rss_beyond_guest_kib(smaps: &str, status: &str, guest_kib: u64) -> Option<(u64, u64)> {
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    let mut guest_rss = 0;
    let mut found = false;
    let mut size: Option<u64> = None;
    for line in smaps.lines() {
        let kib = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        };
        if line.starts_with("Size:") {
            size = kib(line);
        } else if line.starts_with("Rss:") {
            if size.is_some_and(|s| s >= guest_kib) {
                guest_rss += kib(line)?;
                found = true;
            }
            size = None;
        }
    }
    found.then(|| (vm_rss.saturating_sub(guest_rss), guest_rss))
}

struct Boot<'a> {
    vmm: Vmm,
    rep: usize,
    opts: &'a Options,
    console: GuestConsole,
    out: &'a mut Vec<Record>,
}

impl Boot<'_> {
    fn fail(&mut self, what: impl Into<String>) -> Error {
        let transcript = self.console.transcript();
        let tail: Vec<&str> = transcript.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::Guest {
            vmm: self.vmm,
            rep: self.rep,
            what: format!("{}; console tail:\n{}", what.into(), tail.join("\n")),
        }
    }

    fn sample(&mut self, metric: &str, pairs: Option<u16>, value: f64) {
        self.out.push(Record::Guest(GuestSample {
            vmm: self.vmm.key().into(),
            rep: self.rep as u64,
            metric: metric.into(),
            pairs: pairs.map(u64::from),
            value,
        }));
    }

    fn check(&mut self, cmd: &str) -> Result<String, Error> {
        match self.console.run(cmd, STEP) {
            Ok(out) if out.status == 0 => Ok(out.output),
            Ok(out) => Err(self.fail(format!("`{cmd}` exited {}: {}", out.status, out.output))),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn metrics_line(&mut self) -> Result<String, Error> {
        let pid = self.console.pid() as i32;
        // SAFETY: kill only sends a signal to the VMM child we started.
        if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
            return Err(self.fail("cannot send SIGUSR1"));
        }
        match self
            .console
            .wait_for("mqvmm-metrics:", Duration::from_secs(10))
        {
            Some(line) => Ok(line),
            None => Err(self.fail("no metrics line after SIGUSR1")),
        }
    }

    /// KVM's counters of the VMM's vCPUs, summed ([`kvmstat`]); None (and a meta record saying
    /// why, once per boot) where they cannot be read, which costs only these figures.
    fn kvm_counters(&mut self) -> Option<Counters> {
        match kvmstat::snapshot(self.console.pid()) {
            Ok(c) => Some(c),
            Err(e) => {
                let key = format!("kvmstat_error_{}_rep{}", self.vmm.key(), self.rep);
                if !self
                    .out
                    .iter()
                    .any(|r| matches!(r, Record::Meta { key: k, .. } if *k == key))
                {
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        why.push_str(": ");
                        why.push_str(&s.to_string());
                        source = s.source();
                    }
                    self.out.push(Record::meta(key, why));
                }
                None
            }
        }
    }

    fn timed(&mut self, cmd: &str) -> Result<f64, Error> {
        let out = self.check(&format!(
            "a=$(nowns); {cmd}; r=$?; b=$(nowns); echo ELAPSED_NS=$((b-a)); [ $r = 0 ]"
        ))?;
        match out
            .lines()
            .find_map(|l| l.trim().strip_prefix("ELAPSED_NS="))
            .and_then(|v| v.parse::<f64>().ok())
        {
            Some(ns) => Ok(ns),
            None => Err(self.fail(format!("no ELAPSED_NS in {out:?}"))),
        }
    }

    fn run(&mut self, tap: &HostTap) -> Result<(), Error> {
        let wall = {
            let uptime = self
                .console
                .wait_for("MQVMM-UPTIME=", BOOT)
                .ok_or_else(|| self.fail("no MQVMM-UPTIME line"))?;
            let ready = self.console.wait_for("MQVMM-READY", BOOT);
            let wall = self.console.elapsed().as_secs_f64();
            if ready.is_none() {
                return Err(self.fail("no MQVMM-READY"));
            }
            let up: f64 = uptime
                .trim()
                .trim_start_matches("MQVMM-UPTIME=")
                .trim()
                .parse()
                .map_err(|_| self.fail(format!("unreadable {uptime:?}")))?;
            self.sample("boot_guest_uptime_s", None, up);
            wall
        };
        self.sample("boot_wall_s", None, wall);
        if self.vmm.is_mqvmm() {
            let steering = launcher_steering(&self.console.transcript());
            self.out.push(Record::meta(
                format!("steering_{}_rep{}", self.vmm.key(), self.rep),
                steering,
            ));
        }
        self.sync_shell()?;
        self.check(
            "nowns() { { read -r _; read -r _; read -r _ _ n _; } </proc/timer_list; echo $n; }; irqs() { awk '/virtio/ { s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; a += s; if ($NF ~ /input/) n += s; if ($NF ~ /output/) o += s } END { print a + 0, n + 0, o + 0 }' /proc/interrupts; }",
        )?;
        let kernel = self.check("uname -r")?;
        self.out.push(Record::meta(
            format!("l2_kernel_{}", self.vmm.key()),
            kernel.trim(),
        ));
        let mut baseline = Vec::new();
        for n in 1..=self.opts.pairs {
            baseline.push(self.timed("true")?);
            let set_ns = self.timed(&format!("ethtool -L eth0 combined {n}"))?;
            let base = baseline.iter().copied().fold(f64::INFINITY, f64::min);
            self.sample("ethtool_l_ms", Some(n), (set_ns - base).max(0.0) / 1e6);
            if self.vmm.is_mqvmm() {
                let line = self.metrics_line()?;
                let ns = metric(&line, "last_vq_pairs_set_ns")
                    .ok_or_else(|| self.fail(format!("no last_vq_pairs_set_ns in {line:?}")))?;
                self.sample("vq_pairs_set_us", Some(n), ns as f64 / 1e3);
            }
            if let Some(q) = tap.attached() {
                self.sample("host_queues", Some(n), f64::from(q));
            }
            let secs = self.opts.iperf_secs;
            let p = self.opts.streams;
            for (dir, extra) in [("up", ""), ("down", " -R")] {
                if !self.vmm.measures(dir) {
                    continue;
                }
                let before = if self.vmm.is_mqvmm() {
                    Some(self.metrics_line()?)
                } else {
                    None
                };
                let kvm_before = self.kvm_counters();
                // iperf3's report goes to a file and is shown after the second reading of
                // KVM's counters: every byte on the serial console is several port-I/O exits.
                let irq_line = self.check(&format!(
                    "set -- $(irqs); a0=$1 n0=$2 o0=$3; iperf3 -c {HOST_IP} -P {p} -t {secs} -f m{extra} >/tmp/iperf.out 2>&1; r=$?; set -- $(irqs); echo GUEST_IRQS=$(($1-a0)) $(($2-n0)) $(($3-o0)); [ $r = 0 ] || {{ cat /tmp/iperf.out; false; }}"
                ))?;
                let kvm_after = self.kvm_counters();
                let out = self.check("grep -E 'SUM|receiver|sender' /tmp/iperf.out")?;
                let (mbps, mbytes) = iperf_sum(&out)
                    .ok_or_else(|| self.fail(format!("no iperf3 summary in {out:?}")))?;
                if let (Some(before), Some(after)) = (&kvm_before, &kvm_after) {
                    if let Some(per_mb) = PerMb::between(before, after, mbytes) {
                        for (stem, value) in per_mb.fields() {
                            self.sample(&format!("kvm_{stem}_per_mb_{dir}"), Some(n), value);
                        }
                    }
                }
                self.sample(&format!("iperf_{dir}_mbps"), Some(n), mbps);
                let irqs = irq_line
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("GUEST_IRQS="))
                    .map(guest_irqs);
                if let (Some((all, split)), true) = (irqs, mbytes > 0.0) {
                    self.sample(&format!("guest_irqs_per_mb_{dir}"), Some(n), all / mbytes);
                    // Per queue direction where the lines tell it (virtio-pci names each
                    // vector virtioN-input.Q / -output.Q; virtio-mmio has one line).
                    if let Some((input, output)) = split {
                        self.sample(
                            &format!("guest_rx_irqs_per_mb_{dir}"),
                            Some(n),
                            input / mbytes,
                        );
                        self.sample(
                            &format!("guest_tx_irqs_per_mb_{dir}"),
                            Some(n),
                            output / mbytes,
                        );
                    }
                }
                if let Some(before) = before {
                    let after = self.metrics_line()?;
                    // Interrupts split by queue direction too (receive: frames and the ACKs
                    // of guest->host flows; transmit: completions), kept in the raw records
                    // for the analysis of where guest->host interrupts come from.
                    for (kind, suffix) in [
                        ("irqs", "_interrupts"),
                        ("kicks", "_notifications"),
                        ("rx_irqs", "rx_interrupts"),
                        ("tx_irqs", "tx_interrupts"),
                    ] {
                        let delta =
                            pair_sum(&after, suffix).saturating_sub(pair_sum(&before, suffix));
                        if mbytes > 0.0 {
                            self.sample(
                                &format!("vmm_{kind}_per_mb_{dir}"),
                                Some(n),
                                delta as f64 / mbytes,
                            );
                        }
                    }
                }
            }
        }
        self.irq_spread()?;
        self.rss()?;
        self.console
            .send("poweroff\n")
            .map_err(|e| self.fail(format!("cannot type poweroff: {e}")))?;
        if self.console.wait_exit(Duration::from_secs(60)).is_none() {
            return Err(self.fail("did not exit within 60 s of poweroff"));
        }
        Ok(())
    }

    fn sync_shell(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            self.console
                .send("echo MQSYNC:$((20+22))\n")
                .map_err(|e| self.fail(format!("cannot type: {e}")))?;
            if self
                .console
                .wait_for("MQSYNC:42", Duration::from_secs(3))
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.fail("the guest shell does not answer"));
            }
        }
    }

    /// How the guest's virtio interrupts were spread: lines that fired and CPUs that took them
    /// (virtio-mmio has one line for every queue; virtio-pci with MSI-X one per queue).
    fn irq_spread(&mut self) -> Result<(), Error> {
        let table = self.check("grep virtio /proc/interrupts")?;
        let (lines, cpus) = irq_spread(&table, usize::from(self.opts.cpus));
        self.sample("guest_virtio_irq_lines", None, lines as f64);
        self.sample("guest_virtio_irq_cpus", None, cpus as f64);
        Ok(())
    }

    fn rss(&mut self) -> Result<(), Error> {
        let pid = self.console.pid();
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
        let (Ok(smaps), Ok(status)) = (smaps, status) else {
            return Err(self.fail(format!("cannot read /proc/{pid}/smaps or status")));
        };
        let guest_kib = u64::from(self.opts.memory_mib) * 1024;
        match rss_beyond_guest_kib(&smaps, &status, guest_kib) {
            Some((beyond, guest)) => {
                self.sample("rss_beyond_guest_mib", None, beyond as f64 / 1024.0);
                self.sample("rss_guest_mib", None, guest as f64 / 1024.0);
                Ok(())
            }
            None => Err(self.fail(format!(
                "no mapping of {guest_kib} KiB or more in /proc/{pid}/smaps"
            ))),
        }
    }
}

fn one_boot(vmm: Vmm, rep: usize, opts: &Options, out: &mut Vec<Record>) -> Result<(), Error> {
    let tap = HostTap::new()?;
    let _iperf = Iperf::start()?;
    let console = GuestConsole::spawn(vmm_command(vmm, opts))
        .map_err(|source| Error::Spawn { vmm, source })?;
    let mut boot = Boot {
        vmm,
        rep,
        opts,
        console,
        out,
    };
    boot.run(&tap)
}

/// Facts about the KVM environment the guests run in.
fn environment_facts() -> Vec<Record> {
    let first_line = |cmd: &str| {
        host(cmd)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    };
    vec![
        Record::meta(
            "kvm_env",
            if rig::in_l1() {
                "nested rig L1 (QEMU TCG, emulated SVM)"
            } else {
                "direct (host KVM)"
            },
        ),
        Record::meta("kvm_host_kernel", first_line("uname -r")),
        Record::meta("qemu_version", first_line("qemu-system-x86_64 --version")),
        Record::meta("kvm_host_cpus", first_line("nproc")),
    ]
}

/// Runs every boot here (where /dev/kvm works), appending records to `path` after each boot
/// so that a failure keeps what was measured.
pub fn run_inner(opts: &Options, path: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), Error> {
    for (what, ok) in [
        ("/dev/kvm", Path::new("/dev/kvm").exists()),
        ("/dev/net/tun", Path::new("/dev/net/tun").exists()),
        (
            "qemu-system-x86_64",
            mqvmm_tests::skip::find_in_path("qemu-system-x86_64").is_some(),
        ),
        (
            "iperf3",
            mqvmm_tests::skip::find_in_path("iperf3").is_some(),
        ),
    ] {
        if !ok {
            return Err(Error::Missing(what.into()));
        }
    }
    let mut out = environment_facts();
    out.push(Record::meta(
        "guest_config",
        format!(
            "{} vCPUs, {} MiB, {} queue pairs, mqvmm --transport {}, iperf3 -P {} -t {}",
            opts.cpus,
            opts.memory_mib,
            opts.pairs,
            opts.mqvmm_transport,
            opts.streams,
            opts.iperf_secs
        ),
    ));
    record::write_all(path, &out)?;
    for rep in 1..=opts.reps {
        // Rotate the order so no VMM always runs first (or right after another).
        let k = opts.vmms.len();
        for i in 0..k {
            let vmm = opts.vmms[(i + rep - 1) % k];
            let started = Instant::now();
            // One retry: a boot that fails is reported and run again from scratch (its
            // samples discarded); a second failure ends the run.
            let mut samples = Vec::new();
            let mut result = one_boot(vmm, rep, opts, &mut samples);
            if let Err(e) = &result {
                let why = e.to_string().lines().next().unwrap_or_default().to_string();
                progress(&format!(
                    "guest: rep {rep} {vmm} failed, retrying once: {why}"
                ));
                out.push(Record::meta(format!("retried_{vmm}_rep{rep}"), why));
                samples.clear();
                result = one_boot(vmm, rep, opts, &mut samples);
            }
            let summary = summarize_boot(&samples);
            out.extend(samples);
            record::write_all(path, &out)?;
            result?;
            progress(&format!(
                "guest: rep {rep} {vmm}: {summary} ({:.0} s)",
                started.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(())
}

fn summarize_boot(samples: &[Record]) -> String {
    let get = |m: &str| {
        samples
            .iter()
            .filter_map(|r| match r {
                Record::Guest(s) if s.metric == m => Some(s.value),
                _ => None,
            })
            .collect::<Vec<f64>>()
    };
    let fmt = |v: Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    format!(
        "boot {:.1} s, up Mbit/s {}, down Mbit/s {}",
        get("boot_wall_s").first().copied().unwrap_or(f64::NAN),
        fmt(get("iperf_up_mbps")),
        fmt(get("iperf_down_mbps"))
    )
}

/// Runs the guest benchmarks where KVM works: in-process in direct mode (or inside L1),
/// otherwise as `<this binary> guest-inner` inside one L1 of the nested rig. Records end up in
/// `path`.
pub fn run(opts: &Options, path: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), Error> {
    let images = rig::guest_images();
    for p in [&images.vmlinux, &images.bzimage, &images.initramfs] {
        if !p.is_file() {
            return Err(Error::Missing(format!(
                "{} (run `make resources`)",
                p.display()
            )));
        }
    }
    for bin in ["mqvmm", "mqvmm-launch"] {
        if !rig::bin_path(bin).is_file() {
            return Err(Error::Missing(format!(
                "{} (run `make build`)",
                rig::bin_path(bin).display()
            )));
        }
    }
    if rig::in_l1() || rig::mode() == rig::Mode::Direct {
        return run_inner(opts, path, progress);
    }
    let scratch = rig::scratch_dir();
    std::fs::create_dir_all(&scratch).map_err(|e| Error::Host {
        cmd: format!("mkdir {}", scratch.display()),
        detail: e.to_string(),
    })?;
    let inner_path: PathBuf = scratch.join(format!("bench-guest-{}.rec", std::process::id()));
    let exe = std::env::current_exe().map_err(|e| Error::Missing(format!("own path: {e}")))?;
    let mut cmd = format!(
        "{} guest-inner --records {}",
        rig::shell_quote(&exe.to_string_lossy()),
        rig::shell_quote(&inner_path.to_string_lossy())
    );
    for a in opts.to_args() {
        cmd.push(' ');
        cmd.push_str(&rig::shell_quote(&a));
    }
    let l1_facts = "uname -r; nproc";
    let mut tail: Vec<String> = Vec::new();
    let mut sink = |chunk: &str| {
        for line in chunk.lines() {
            if line.starts_with("guest:") || line.starts_with("error") {
                progress(line);
            }
            tail.push(line.to_string());
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
    };
    let timeout = Duration::from_secs(60 * 30);
    let out = rig::try_exec_in_l1_streaming(&format!("{l1_facts}; exec {cmd}"), timeout, &mut sink)
        .map_err(Error::Rig)?;
    let records_ok = inner_path.is_file();
    if records_ok {
        let _ = std::fs::copy(&inner_path, path);
        let _ = std::fs::remove_file(&inner_path);
    }
    if !out.success() {
        return Err(Error::Inner {
            code: out.code,
            tail: tail.join("\n"),
        });
    }
    Ok(())
}

/// The guest's virtio interrupts over a run, `ALL INPUT OUTPUT` as the guest printed them:
/// all, and (receive queues, transmit queues) where the interrupt lines tell them apart.
fn guest_irqs(line: &str) -> (f64, Option<(f64, f64)>) {
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse::<f64>().ok())
        .collect();
    let all = v.first().copied().unwrap_or(0.0);
    match (v.get(1), v.get(2)) {
        (Some(&i), Some(&o)) if i + o > 0.0 => (all, Some((i, o))),
        _ => (all, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_interrupts_split_by_queue_direction_only_where_the_lines_tell() {
        assert_eq!(guest_irqs("120 70 50"), (120.0, Some((70.0, 50.0))));
        // virtio-mmio: one line for every queue, neither input nor output.
        assert_eq!(guest_irqs("120 0 0"), (120.0, None));
        assert_eq!(guest_irqs("7"), (7.0, None));
    }

    #[test]
    fn iperf_summary_is_read_from_the_receiver_sum() {
        let out = "[SUM]   0.00-2.02   sec  14.0 MBytes  58.3 Mbits/sec    0             sender\n\
                   [SUM]   0.00-2.08   sec  12.1 MBytes  48.7 Mbits/sec                  receiver\n";
        assert_eq!(iperf_sum(out), Some((48.7, 12.1)));
        let g = "[SUM]   0.00-2.08   sec  1.5 GBytes  1.25 Gbits/sec                  receiver";
        assert_eq!(iperf_sum(g), Some((1250.0, 1500.0)));
        assert_eq!(iperf_sum("iperf3: error"), None);
    }

    #[test]
    fn every_vmm_key_parses_back_and_only_no_steering_skips_guest_to_host() {
        for v in Vmm::ALL {
            assert_eq!(Vmm::from_key(v.key()), Some(v));
            assert!(v.measures("down"), "{v}");
        }
        assert_eq!(
            Vmm::from_key("mqvmm-no-steering"),
            Some(Vmm::MqvmmNoSteering)
        );
        assert!(!Vmm::MqvmmNoSteering.measures("up"));
        assert!(Vmm::Mqvmm.measures("up") && Vmm::QemuVhostOn.measures("up"));
        assert!(Vmm::MqvmmNoSteering.is_mqvmm() && !Vmm::QemuVhostOff.is_mqvmm());
    }

    #[test]
    fn no_steering_variant_passes_the_launcher_option_before_the_separator() {
        let opts = Options {
            reps: 1,
            iperf_secs: 1,
            streams: 1,
            cpus: 1,
            memory_mib: 128,
            pairs: 4,
            vmms: vec![Vmm::MqvmmNoSteering],
            mqvmm_transport: "pci".into(),
        };
        let args = |vmm| -> Vec<String> {
            vmm_command(vmm, &opts)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let off = args(Vmm::MqvmmNoSteering);
        let flag = off.iter().position(|a| a == "--no-steering").unwrap();
        let separator = off.iter().position(|a| a == "--").unwrap();
        assert!(flag < separator, "{off:?}");
        assert!(!args(Vmm::Mqvmm).contains(&"--no-steering".to_string()));
        let per_pair = args(Vmm::MqvmmThreadPerPair);
        let flag = per_pair.iter().position(|a| a == "--io-threads").unwrap();
        assert_eq!(per_pair[flag + 1], "4");
        assert!(flag < per_pair.iter().position(|a| a == "--").unwrap());
        assert!(!args(Vmm::Mqvmm).contains(&"--io-threads".to_string()));
    }

    #[test]
    fn launcher_steering_reads_the_launchers_line() {
        let on = "mqvmm-launch: tap mqbt0: 4 queues\nmqvmm-launch: tap mqbt0: eBPF steering attached; its map on fd 9\n";
        assert_eq!(launcher_steering(on), "attached");
        let refused =
            "mqvmm-launch: tap mqbt0: steering is off: cannot load the program: Operation not permitted (os error 1)\n";
        assert_eq!(
            launcher_steering(refused),
            "off: cannot load the program: Operation not permitted (os error 1)"
        );
        assert_eq!(launcher_steering("[    0.000000] Linux version\n"), "off");
    }

    #[test]
    fn metric_reads_device_fields_only() {
        let line = "mqvmm-metrics: virtio-net max_pairs=4 vq_pairs_set=3 last_vq_pairs_set_ns=81234 | pair0 attached=1 rx_packets=5";
        assert_eq!(metric(line, "last_vq_pairs_set_ns"), Some(81234));
        assert_eq!(metric(line, "vq_pairs_set"), Some(3));
        assert_eq!(metric(line, "rx_packets"), None);
    }

    #[test]
    fn irq_spread_counts_lines_and_cpus_that_fired() {
        let mmio = " 24:          0       2456   IO-APIC   5-edge      virtio0\n";
        assert_eq!(irq_spread(mmio, 2), (1, 1));
        let msix = " 24:  0  0   PCI-MSI 16384-edge virtio0-config\n 25:  820  1   PCI-MSI 16385-edge virtio0-input.0\n 27:  0  1259   PCI-MSI 16387-edge virtio0-input.1\n";
        assert_eq!(irq_spread(msix, 2), (2, 2));
    }

    #[test]
    fn pair_sum_adds_every_queue_of_every_pair() {
        let line = "mqvmm-metrics: virtio-net rx_interrupts=99 | pair0 attached=1 rx_interrupts=3 tx_interrupts=4 tx_notifications=7 | pair1 rx_interrupts=10 tx_interrupts=0 | ctrl interrupts=5";
        assert_eq!(pair_sum(line, "_interrupts"), 17);
        assert_eq!(pair_sum(line, "_notifications"), 7);
        assert_eq!(pair_sum(line, "rx_interrupts"), 13);
        assert_eq!(pair_sum(line, "tx_interrupts"), 4);
    }

    #[test]
    fn rss_beyond_guest_subtracts_the_big_mapping() {
        let smaps = "7f00-7f10 rw-p 00000000 00:00 0\nSize:             524288 kB\nRss:              200000 kB\n\
                     5600-5610 r-xp 00000000 08:01 12 /usr/bin/x\nSize:               4096 kB\nRss:                3000 kB\n";
        let status = "Name:\tx\nVmRSS:\t  215000 kB\n";
        assert_eq!(
            rss_beyond_guest_kib(smaps, status, 524288),
            Some((15000, 200000))
        );
        assert_eq!(rss_beyond_guest_kib(smaps, status, 1 << 30), None);
    }
}
