// SPDX-License-Identifier: Apache-2.0
//! From records to `latest.json` (every sample, with the machine and the method),
//! `latest.md` (tables) and two SVG plots; and from a `latest.json` back to its records.

pub mod svg;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::device::frames;
use crate::guest::Vmm;
use crate::record::{DevSample, GuestSample, Record};
use crate::stats::{paired_ratio, Summary};
use svg::{Panel, Point, Series, Svg};

/// The format of `latest.json`.
pub const SCHEMA: &str = "mqvmm-bench/1";

/// Writing the report, or reading a published one, failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A published `latest.json` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A published `latest.json` is not one.
    #[error("{path} is not a {SCHEMA} latest.json")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A published `latest.json` has another format.
    #[error("{path} has schema {found:?}, this report reads {SCHEMA:?}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// Its schema.
        found: String,
    },
    /// An output file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the device-path numbers were made (goes into the JSON and the markdown).
pub const DEVICE_METHOD: &str = "In-process, no guest: mqvmm's QueuePair::process_tx/process_rx (the functions the \
device's worker threads run) over split rings in mmap'd guest memory, a driver side posting and reaping 256-entry \
rings, and a real multiqueue tap in a private network namespace (vnet header 12 B, TUNSETOFFLOAD CSUM|TSO4|TSO6, \
txqueuelen 4096, IPv6 off); one thread per pair. Ceiling: the same writev/readv calls on the same tap queues with the \
same buffers and iovec shapes, no virtqueue. tx = guest->host: units of 8 x 256 frames written to the tap, which hands them \
to the stack (dropped: foreign destination MAC). rx = host->guest: an AF_PACKET socket (PACKET_VNET_HDR, qdisc bypass) \
first queues K frames on every tap queue (K=2048, 128 for 64 KiB TSO; flows chosen so the tap steers one to each \
queue), untimed; then all pairs drain at once, timed, device into 4 KiB mergeable buffers, ceiling into the same \
buffers with the same 17-segment iovecs; both read until EAGAIN. Frame sizes are Ethernet frame lengths without the \
vnet header; the 64 KiB TSO frame is 65535 bytes (the kernel segments larger GSO packets before the tap sees them) with gso_type TCPV4, gso_size 1448 and checksum offsets. Wall time: first thread start to \
last thread end; CPU time: sum of CLOCK_THREAD_CPUTIME_ID (user+kernel) of the pair threads. Warm-up, then 5 samples \
of the same number of units per path, the paths interleaved unit by unit (ABBA) so that other load hits both alike; ratio = device/ceiling \
per sample; the CPU ratio (ceiling CPU time per frame over the device's) is what the pps ratio would be with both CPU-bound on an idle machine, and is robust to other load. The driver's ring work is counted in the device path. Interrupts go to an eventfd (irqfd stand-in); \
kicks and epoll are not exercised (the worker loop's per-batch cost).";

/// How the guest numbers were made.
pub const GUEST_METHOD: &str = "mqvmm (under mqvmm-launch, uid nobody, vmlinux; transport in the guest config line: virtio-pci with one MSI-X vector per queue by default) and Debian's QEMU \
(-enable-kvm -cpu host -M q35, virtio-net-pci mq=on vectors=2N+2, tap queues=N, vhost=off and vhost=on, bzImage via \
SeaBIOS) boot the same guest kernel and initramfs with the same vCPUs and memory on the same kind of multiqueue tap, \
one boot after the other in one KVM host (the nested rig's L1 on this machine: an emulator, so only ratios within \
this run mean anything), repeated in rotating order. Boot: VMM spawn to the guest's MQVMM-READY (wall) and the \
guest's uptime at that line. Throughput: iperf3 TCP, parallel streams, guest client to an L1 server (guest->host) \
and with -R (host->guest), after `ethtool -L eth0 combined N`. ethtool -L: guest ktime around the command minus the \
same around `true`. VQ_PAIRS_SET: mqvmm's last_vq_pairs_set_ns (control kick to used entry, inside the VMM). RSS \
beyond guest RAM: VmRSS minus the Rss of the guest-RAM mapping, after the traffic. Ratios are mqvmm/QEMU per \
repetition (same L1, consecutive boots); median and range. Steering: mqvmm boots a second time per repetition as \
mqvmm-no-steering (mqvmm-launch --no-steering: no eBPF program on the tap, the tap's own flow steering picks the \
queue of each host->guest frame, as before steering existed), measured host->guest only (steering does not touch \
guest->host); mqvmm / mqvmm-no-steering is paired by repetition and step like the QEMU ratios, and whether the \
launcher attached steering is recorded per boot (steering_<vmm>_rep<N>).";

/// Everything a report is made of.
#[derive(Debug, Default)]
pub struct Data {
    /// Facts about the run (date, commit, machine, kernels), in order.
    pub meta: IndexMap<String, String>,
    /// Device samples.
    pub device: Vec<DevSample>,
    /// Guest samples.
    pub guest: Vec<GuestSample>,
}

impl Data {
    /// Collects `records`; of a meta key given twice the first value counts.
    pub fn from_records(records: impl IntoIterator<Item = Record>) -> Data {
        let mut d = Data::default();
        for r in records {
            match r {
                Record::Meta { key, value } => {
                    d.meta.entry(key).or_insert(value);
                }
                Record::Device(s) => d.device.push(s),
                Record::Guest(s) => d.guest.push(s),
            }
        }
        d
    }

    fn meta(&self, key: &str) -> &str {
        self.meta.get(key).map_or("unknown", String::as_str)
    }
}

/// Device-path summary of one (direction, frame, pairs).
#[derive(Debug, Clone, Serialize)]
pub struct DevRow {
    /// tx or rx.
    pub dir: String,
    /// Frame length.
    #[serde(rename = "frame_bytes")]
    pub frame: u64,
    /// Pairs.
    pub pairs: u64,
    /// The ceiling's figures.
    pub ceiling: PathFigures,
    /// The device's figures.
    pub device: PathFigures,
    /// device/ceiling packets/s of back-to-back samples.
    #[serde(rename = "ratio_pps_device_over_ceiling")]
    pub ratio: Option<Summary>,
    /// ceiling/device CPU time per frame of back-to-back samples: the throughput ratio the
    /// device would reach if both were CPU-bound on an idle machine (robust to contention).
    #[serde(rename = "ratio_cpu_per_frame_ceiling_over_device")]
    pub cpu_ratio: Option<Summary>,
}

/// The figures of one path (device or ceiling) in one configuration.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PathFigures {
    /// Packets/s.
    pub pps: Option<Summary>,
    /// Gbit/s.
    pub gbit_s: Option<Summary>,
    /// CPU ns per frame.
    pub cpu_ns_per_frame: Option<Summary>,
}

/// Summarises the device samples per configuration (tx before rx, then frame, then pairs).
pub fn device_rows(data: &Data) -> Vec<DevRow> {
    let keys: BTreeSet<(bool, u64, u64)> = data
        .device
        .iter()
        .map(|s| (s.dir == "rx", s.frame, s.pairs))
        .collect();
    keys.into_iter()
        .map(|(rx, frame, pairs)| {
            let dir = if rx { "rx" } else { "tx" };
            let of = |path: &str| -> Vec<&DevSample> {
                let mut v: Vec<&DevSample> = data
                    .device
                    .iter()
                    .filter(|s| {
                        s.dir == dir && s.frame == frame && s.pairs == pairs && s.path == path
                    })
                    .collect();
                v.sort_by_key(|s| s.sample);
                v
            };
            let (c, d) = (of("ceiling"), of("device"));
            let sums = |v: &[&DevSample]| PathFigures {
                pps: Summary::of(&v.iter().map(|s| s.pps()).collect::<Vec<_>>()),
                gbit_s: Summary::of(&v.iter().map(|s| s.gbps()).collect::<Vec<_>>()),
                cpu_ns_per_frame: Summary::of(
                    &v.iter().map(|s| s.cpu_per_frame()).collect::<Vec<_>>(),
                ),
            };
            let paired = |f: fn(&DevSample) -> f64| {
                let pairs: Vec<(f64, f64)> = d
                    .iter()
                    .filter_map(|ds| {
                        c.iter()
                            .find(|cs| cs.sample == ds.sample)
                            .map(|cs| (f(ds), f(cs)))
                    })
                    .collect();
                paired_ratio(&pairs)
            };
            DevRow {
                dir: dir.to_string(),
                frame,
                pairs,
                ceiling: sums(&c),
                device: sums(&d),
                ratio: paired(DevSample::pps),
                cpu_ratio: paired(|s| 1.0 / s.cpu_per_frame().max(f64::MIN_POSITIVE)),
            }
        })
        .collect()
}

/// A guest metric as shown in the report.
pub struct MetricInfo {
    /// Record name.
    pub key: &'static str,
    /// Table label.
    pub label: &'static str,
    /// Whether each pair step gets its own row (otherwise all steps are pooled).
    pub per_pairs: bool,
    /// Decimals in the table.
    pub digits: usize,
}

/// Guest metrics in table order.
pub const METRICS: [MetricInfo; 15] = [
    MetricInfo {
        key: "boot_wall_s",
        label: "boot: spawn to MQVMM-READY, wall (s, lower is better)",
        per_pairs: false,
        digits: 2,
    },
    MetricInfo {
        key: "boot_guest_uptime_s",
        label: "boot: guest uptime at MQVMM-READY (s, lower is better)",
        per_pairs: false,
        digits: 2,
    },
    MetricInfo {
        key: "iperf_up_mbps",
        label: "iperf3 TCP guest→host (Mbit/s)",
        per_pairs: true,
        digits: 0,
    },
    MetricInfo {
        key: "iperf_down_mbps",
        label: "iperf3 TCP host→guest (Mbit/s)",
        per_pairs: true,
        digits: 0,
    },
    MetricInfo {
        key: "ethtool_l_ms",
        label: "`ethtool -L` in the guest, all steps (ms, lower is better)",
        per_pairs: false,
        digits: 1,
    },
    MetricInfo {
        key: "vq_pairs_set_us",
        label: "VQ_PAIRS_SET kick→used inside the VMM, all steps (µs)",
        per_pairs: false,
        digits: 0,
    },
    MetricInfo {
        key: "rss_beyond_guest_mib",
        label: "RSS beyond guest RAM (MiB, lower is better)",
        per_pairs: false,
        digits: 1,
    },
    MetricInfo {
        key: "rss_guest_mib",
        label: "diagnostic: guest RAM resident after the run (MiB)",
        per_pairs: false,
        digits: 0,
    },
    MetricInfo {
        key: "guest_virtio_irq_lines",
        label: "diagnostic: guest virtio interrupt lines that fired",
        per_pairs: false,
        digits: 0,
    },
    MetricInfo {
        key: "guest_virtio_irq_cpus",
        label: "diagnostic: guest vCPUs that took virtio interrupts",
        per_pairs: false,
        digits: 0,
    },
    MetricInfo {
        key: "guest_irqs_per_mb_up",
        label: "diagnostic: guest virtio interrupts per MB, guest→host, all steps",
        per_pairs: false,
        digits: 1,
    },
    MetricInfo {
        key: "guest_irqs_per_mb_down",
        label: "diagnostic: guest virtio interrupts per MB, host→guest, all steps",
        per_pairs: false,
        digits: 1,
    },
    MetricInfo {
        key: "vmm_irqs_per_mb_up",
        label: "diagnostic: interrupts the device raised per MB, guest→host (mqvmm metrics)",
        per_pairs: false,
        digits: 1,
    },
    MetricInfo {
        key: "vmm_irqs_per_mb_down",
        label: "diagnostic: interrupts the device raised per MB, host→guest (mqvmm metrics)",
        per_pairs: false,
        digits: 1,
    },
    MetricInfo {
        key: "vmm_kicks_per_mb_up",
        label: "diagnostic: driver kicks per MB, guest→host (mqvmm metrics)",
        per_pairs: false,
        digits: 1,
    },
];

/// The VMMs of the guest table's columns, in order; the others are shown only where a run has
/// them (`mqvmm-no-steering`: [`steering_table`]).
const COLUMNS: [Vmm; 3] = [Vmm::Mqvmm, Vmm::QemuVhostOff, Vmm::QemuVhostOn];

/// One row of the guest table.
#[derive(Debug, Clone, Serialize)]
pub struct GuestRow {
    /// Metric key.
    pub metric: &'static str,
    /// Pairs (per-step metrics) or None (pooled).
    pub pairs: Option<u64>,
    /// Per VMM (in [`Vmm::ALL`] order; an object keyed by VMM in JSON).
    #[serde(serialize_with = "by_vmm")]
    pub vmms: Vec<Option<Summary>>,
    /// mqvmm / QEMU vhost=off, paired by repetition and step.
    #[serde(rename = "ratio_mqvmm_over_qemu_vhost_off")]
    pub vs_vhost_off: Option<Summary>,
    /// mqvmm / QEMU vhost=on, paired by repetition and step.
    #[serde(rename = "ratio_mqvmm_over_qemu_vhost_on")]
    pub vs_vhost_on: Option<Summary>,
    /// mqvmm (eBPF steering) / mqvmm-no-steering, paired by repetition and step; left out of
    /// the JSON where there is none.
    #[serde(
        rename = "ratio_mqvmm_over_mqvmm_no_steering",
        skip_serializing_if = "Option::is_none"
    )]
    pub vs_no_steering: Option<Summary>,
    /// mqvmm (worker threads: its default) / mqvmm-thread-per-pair, paired by repetition and
    /// step; left out of the JSON where there is none.
    #[serde(
        rename = "ratio_mqvmm_over_mqvmm_thread_per_pair",
        skip_serializing_if = "Option::is_none"
    )]
    pub vs_thread_per_pair: Option<Summary>,
}

impl GuestRow {
    /// The summary of `vmm`'s samples.
    pub fn of(&self, vmm: Vmm) -> Option<Summary> {
        let k = Vmm::ALL.iter().position(|&v| v == vmm)?;
        self.vmms.get(k).copied().flatten()
    }
}

/// Every column VMM, `null` where it has no samples; the others only where they have some (a
/// run without them publishes what it did before they existed).
fn by_vmm<S: Serializer>(vmms: &[Option<Summary>], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(
        Vmm::ALL
            .iter()
            .zip(vmms)
            .filter(|(v, s)| COLUMNS.contains(v) || s.is_some())
            .map(|(v, s)| (v.key(), s)),
    )
}

/// Summarises the guest samples.
pub fn guest_rows(data: &Data) -> Vec<GuestRow> {
    let mut rows = Vec::new();
    for m in &METRICS {
        let steps: Vec<Option<u64>> = if m.per_pairs {
            data.guest
                .iter()
                .filter(|s| s.metric == m.key)
                .filter_map(|s| s.pairs)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        for pairs in steps {
            let select = |vmm: Vmm| -> Vec<&GuestSample> {
                data.guest
                    .iter()
                    .filter(|s| s.metric == m.key && s.vmm == vmm.key())
                    .filter(|s| pairs.is_none() || s.pairs == pairs)
                    .collect()
            };
            let vmms: Vec<Option<Summary>> = Vmm::ALL
                .iter()
                .map(|&v| Summary::of(&select(v).iter().map(|s| s.value).collect::<Vec<_>>()))
                .collect();
            if vmms.iter().all(Option::is_none) {
                continue;
            }
            let mq = select(Vmm::Mqvmm);
            let ratio = |peer: Vmm| {
                let theirs = select(peer);
                let pairs: Vec<(f64, f64)> = mq
                    .iter()
                    .filter_map(|a| {
                        theirs
                            .iter()
                            .find(|b| b.rep == a.rep && b.pairs == a.pairs)
                            .map(|b| (a.value, b.value))
                    })
                    .collect();
                paired_ratio(&pairs)
            };
            rows.push(GuestRow {
                metric: m.key,
                pairs,
                vs_vhost_off: ratio(Vmm::QemuVhostOff),
                vs_vhost_on: ratio(Vmm::QemuVhostOn),
                vs_no_steering: ratio(Vmm::MqvmmNoSteering),
                vs_thread_per_pair: ratio(Vmm::MqvmmThreadPerPair),
                vmms,
            });
        }
    }
    rows
}

/// `latest.json`: the run's facts and every sample, with the summaries made from them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Published {
    /// [`SCHEMA`].
    schema: String,
    /// Facts about the run, in the order recorded.
    meta: IndexMap<String, String>,
    /// The device data path.
    device: Part<DevRow, DevFigures>,
    /// The guests.
    guest: Part<GuestRow, GuestSample>,
    /// KVM's exits, kicks and interrupts per MB next to the guest's and mqvmm's, made from the
    /// guest samples (not read back); left out of runs without KVM counters.
    #[serde(skip_deserializing, default, skip_serializing_if = "Vec::is_empty")]
    guest_exits_per_mb: Vec<ExitsRow>,
}

/// One half of the report: how it was measured, the summaries, the samples.
#[derive(Debug, Serialize, Deserialize)]
struct Part<Row, Sample> {
    method: String,
    /// Made from the samples: not read back but made again.
    #[serde(skip_deserializing, default = "Vec::new")]
    summary: Vec<Row>,
    samples: Vec<Sample>,
}

/// A device sample with the figures the report makes of it (not read back).
#[derive(Debug, Serialize, Deserialize)]
struct DevFigures {
    #[serde(flatten)]
    sample: DevSample,
    #[serde(skip_deserializing)]
    pps: f64,
    #[serde(skip_deserializing)]
    gbit_s: f64,
    #[serde(skip_deserializing)]
    cpu_ns_per_frame: f64,
}

impl Published {
    /// The report of `data`.
    pub fn of(data: &Data) -> Published {
        Published {
            schema: SCHEMA.into(),
            meta: data.meta.clone(),
            device: Part {
                method: DEVICE_METHOD.into(),
                summary: device_rows(data),
                samples: data
                    .device
                    .iter()
                    .map(|s| DevFigures {
                        sample: s.clone(),
                        pps: s.pps(),
                        gbit_s: s.gbps(),
                        cpu_ns_per_frame: s.cpu_per_frame(),
                    })
                    .collect(),
            },
            guest: Part {
                method: GUEST_METHOD.into(),
                summary: guest_rows(data),
                samples: data.guest.clone(),
            },
            guest_exits_per_mb: exits_rows(data),
        }
    }

    /// Parses a `latest.json`; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Published, Error> {
        let published: Published = serde_json::from_str(text).map_err(|source| Error::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if published.schema != SCHEMA {
            return Err(Error::Schema {
                path: path.to_path_buf(),
                found: published.schema,
            });
        }
        Ok(published)
    }

    /// Reads a `latest.json`.
    pub fn read(path: &Path) -> Result<Published, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Published::parse(path, &text)
    }

    /// The records the report was made of.
    pub fn into_records(self) -> Vec<Record> {
        let meta = self.meta.into_iter().map(|(k, v)| Record::meta(k, v));
        let device = self.device.samples.into_iter();
        let guest = self.guest.samples.into_iter();
        meta.chain(device.map(|s| Record::Device(s.sample)))
            .chain(guest.map(Record::Guest))
            .collect()
    }

    /// The pretty-printed document with a trailing newline.
    fn to_text(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self).map(|text| text + "\n")
    }
}

fn fmt_num(v: f64, digits: usize) -> String {
    format!("{v:.digits$}")
}

fn cell(s: &Option<Summary>, digits: usize) -> String {
    match s {
        Some(s) => format!("{} ±{:.0}%", fmt_num(s.median, digits), s.spread * 100.0),
        None => "–".into(),
    }
}

fn ratio_cell(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "–".into(),
    }
}

/// The device-path table (markdown).
pub fn device_table(rows: &[DevRow]) -> String {
    let mut s = String::from(
        "| dir | frame | pairs | ceiling kpps | device kpps | device Gbit/s | CPU ns/frame ceiling | CPU ns/frame device | device/ceiling (pps) | ceiling/device (CPU per frame) |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let k = |x: &Option<Summary>| {
            x.map(|s| Summary {
                median: s.median / 1e3,
                min: s.min / 1e3,
                max: s.max / 1e3,
                ..s
            })
        };
        let dir = if r.dir == "tx" {
            "tx (guest→host)"
        } else {
            "rx (host→guest)"
        };
        let _ = writeln!(
            s,
            "| {dir} | {} | {} | {} | {} | {} | {} | {} | **{}** | {} |",
            frames::label(r.frame as usize),
            r.pairs,
            cell(&k(&r.ceiling.pps), 0),
            cell(&k(&r.device.pps), 0),
            cell(&r.device.gbit_s, 2),
            cell(&r.ceiling.cpu_ns_per_frame, 0),
            cell(&r.device.cpu_ns_per_frame, 0),
            ratio_cell(&r.ratio),
            ratio_cell(&r.cpu_ratio)
        );
    }
    s
}

/// The device-path summary (markdown): throughput and the two ratios per configuration.
pub fn device_summary_table(rows: &[DevRow]) -> String {
    let mut s = String::from(
        "| dir | frame | pairs | device Gbit/s | device/ceiling (pps) | ceiling/device (CPU per frame) |\n\
         |---|---|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | **{}** | {} |",
            r.dir,
            frames::label(r.frame as usize),
            r.pairs,
            cell(&r.device.gbit_s, 2),
            ratio_cell(&r.ratio),
            ratio_cell(&r.cpu_ratio)
        );
    }
    s
}

/// The guest table (markdown); `diagnostics` adds the diagnostic rows.
pub fn guest_table(rows: &[GuestRow], diagnostics: bool) -> String {
    let mut s = String::from(
        "| metric | pairs | mqvmm | QEMU vhost=off | QEMU vhost=on | mqvmm / QEMU off | mqvmm / QEMU on |\n\
         |---|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let Some(m) = METRICS.iter().find(|m| m.key == r.metric) else {
            continue;
        };
        if !diagnostics && m.label.starts_with("diagnostic") {
            continue;
        }
        let pairs = r.pairs.map_or("–".to_string(), |p| p.to_string());
        let _ = writeln!(
            s,
            "| {} | {pairs} | {} | {} | {} | {} | {} |",
            m.label,
            cell(&r.of(COLUMNS[0]), m.digits),
            cell(&r.of(COLUMNS[1]), m.digits),
            cell(&r.of(COLUMNS[2]), m.digits),
            ratio_cell(&r.vs_vhost_off),
            ratio_cell(&r.vs_vhost_on)
        );
    }
    s
}

/// Host->guest throughput of mqvmm with the launcher's eBPF steering against the same without
/// (`mqvmm-no-steering`), per active pair count, next to mqvmm's ratios to QEMU (markdown);
/// empty when the run has no `mqvmm-no-steering` samples.
pub fn steering_table(rows: &[GuestRow]) -> String {
    let rows: Vec<&GuestRow> = rows
        .iter()
        .filter(|r| r.metric == "iperf_down_mbps" && r.of(Vmm::MqvmmNoSteering).is_some())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "| pairs | mqvmm host→guest, eBPF steering (Mbit/s) | mqvmm host→guest, --no-steering (Mbit/s) | steering / no steering | mqvmm / QEMU off | mqvmm / QEMU on |\n\
         |--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let pairs = r.pairs.map_or("–".to_string(), |p| p.to_string());
        let _ = writeln!(
            s,
            "| {pairs} | {} | {} | **{}** | {} | {} |",
            cell(&r.of(Vmm::Mqvmm), 0),
            cell(&r.of(Vmm::MqvmmNoSteering), 0),
            ratio_cell(&r.vs_no_steering),
            ratio_cell(&r.vs_vhost_off),
            ratio_cell(&r.vs_vhost_on)
        );
    }
    s
}

/// Guest throughput and interrupts of mqvmm with its default worker threads against the same
/// with a worker thread per pair (`mqvmm-thread-per-pair`), per direction and active pair
/// count, next to mqvmm's ratio to QEMU vhost=off (markdown); empty when the run has no
/// `mqvmm-thread-per-pair` samples.
pub fn threads_table(rows: &[GuestRow]) -> String {
    let rows: Vec<&GuestRow> = rows
        .iter()
        .filter(|r| {
            matches!(r.metric, "iperf_up_mbps" | "iperf_down_mbps")
                && r.of(Vmm::MqvmmThreadPerPair).is_some()
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "| dir | pairs | mqvmm, default threads (Mbit/s) | mqvmm, a thread per pair (Mbit/s) | default / per pair | mqvmm / QEMU off |\n\
         |---|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let dir = if r.metric == "iperf_up_mbps" {
            "guest→host"
        } else {
            "host→guest"
        };
        let pairs = r.pairs.map_or("–".to_string(), |p| p.to_string());
        let _ = writeln!(
            s,
            "| {dir} | {pairs} | {} | {} | **{}** | {} |",
            cell(&r.of(Vmm::Mqvmm), 0),
            cell(&r.of(Vmm::MqvmmThreadPerPair), 0),
            ratio_cell(&r.vs_thread_per_pair),
            ratio_cell(&r.vs_vhost_off),
        );
    }
    s
}

/// Under the worker-threads table.
const THREADS_NOTE: &str = "mqvmm serves its queue pairs from `--net ...,io-threads=N` worker \
threads, by default the CPUs it may use beyond its vCPUs (one to one per pair; in this rig's L1, 2 CPUs and 2 vCPUs: \
one thread for all pairs); mqvmm-thread-per-pair boots the same mqvmm a second time per repetition with \
`mqvmm-launch --io-threads <pairs>`, a worker thread per pair as every mqvmm before this option. Ratios paired by \
repetition and step.";

/// What the exits table's counters are and where they come from (goes under the table).
pub const EXITS_METHOD: &str = "KVM's own per-vCPU counters of the VMM's VM in L1 (debugfs, \
/sys/kernel/debug/kvm/<pid>-<vm fd>/<counter>, summed over the vCPUs by KVM; the counters the kvm:kvm_exit and \
kvm:kvm_userspace_exit tracepoints and injection would show, without tracing), their change \
across each iperf3 run (the run's console output is printed after the second reading) divided by the MB that run \
moved. exits: every exit from the guest. MMIO/PIO to VMM: mmio_exits + io_exits, accesses KVM handed to the VMM \
(kicks without an ioeventfd, MSI-X table, config space, the serial console). emulated in KVM: insn_emulation − \
mmio_exits, instructions KVM emulated and completed itself: under L1's shadow paging that is where ioeventfd kicks \
show (an MMIO page fault KVM emulates; KVM keeps no ioeventfd counter), together with the guest's writes to its \
write-protected page tables; mqvmm's own kick counter tells the kicks apart. irq injections: irq_injections, every \
interrupt KVM injected (virtio MSIs, timer, IPIs). halts: halt_exits. Guest virtio irqs: the guest's /proc/interrupts \
virtio lines over the same run (rx / tx queues: the virtioN-input.Q / virtioN-output.Q lines of virtio-pci's per-queue vectors); device kicks and irqs: mqvmm's own counters (SIGUSR1 metrics) over the same run.";

/// The per-MB figures of one (direction, pairs, VMM): KVM's counters and the guest's and
/// mqvmm's own, all over the same iperf3 runs.
#[derive(Debug, Clone, Serialize)]
pub struct ExitsRow {
    /// `up` (guest->host) or `down` (host->guest).
    pub dir: &'static str,
    /// Active pairs.
    pub pairs: u64,
    /// VMM key.
    pub vmm: &'static str,
    /// Exits from the guest per MB.
    pub kvm_exits_per_mb: Option<Summary>,
    /// MMIO and port-I/O exits to the VMM per MB.
    pub kvm_vmm_io_exits_per_mb: Option<Summary>,
    /// Instructions KVM emulated and completed itself (ioeventfd kicks, shadow page-table
    /// writes) per MB.
    pub kvm_kernel_emulation_per_mb: Option<Summary>,
    /// Interrupts KVM injected per MB.
    pub kvm_irq_injections_per_mb: Option<Summary>,
    /// HLT exits per MB.
    pub kvm_halt_exits_per_mb: Option<Summary>,
    /// The guest's virtio interrupts per MB (/proc/interrupts).
    pub guest_irqs_per_mb: Option<Summary>,
    /// Of those, the receive queues' (virtio-pci: `virtioN-input.Q` lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_rx_irqs_per_mb: Option<Summary>,
    /// And the transmit queues' (`virtioN-output.Q`: transmit completions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_tx_irqs_per_mb: Option<Summary>,
    /// Kicks the device counted per MB (mqvmm only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_kicks_per_mb: Option<Summary>,
    /// Interrupts the device raised per MB (mqvmm only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_irqs_per_mb: Option<Summary>,
}

/// KVM's per-MB counters next to the guest's and mqvmm's, per direction, pair count and VMM;
/// empty for a run without KVM counters.
pub fn exits_rows(data: &Data) -> Vec<ExitsRow> {
    let mut rows = Vec::new();
    for dir in ["up", "down"] {
        let exits = format!("kvm_exits_per_mb_{dir}");
        let steps: BTreeSet<u64> = data
            .guest
            .iter()
            .filter(|s| s.metric == exits)
            .filter_map(|s| s.pairs)
            .collect();
        for pairs in steps {
            for vmm in Vmm::ALL {
                let summary = |metric: &str| {
                    let metric = format!("{metric}_{dir}");
                    let values: Vec<f64> = data
                        .guest
                        .iter()
                        .filter(|s| s.metric == metric && s.vmm == vmm.key())
                        .filter(|s| s.pairs == Some(pairs))
                        .map(|s| s.value)
                        .collect();
                    Summary::of(&values)
                };
                let row = ExitsRow {
                    dir,
                    pairs,
                    vmm: vmm.key(),
                    kvm_exits_per_mb: summary("kvm_exits_per_mb"),
                    kvm_vmm_io_exits_per_mb: summary("kvm_vmm_io_exits_per_mb"),
                    kvm_kernel_emulation_per_mb: summary("kvm_kernel_emulation_per_mb"),
                    kvm_irq_injections_per_mb: summary("kvm_irq_injections_per_mb"),
                    kvm_halt_exits_per_mb: summary("kvm_halt_exits_per_mb"),
                    guest_irqs_per_mb: summary("guest_irqs_per_mb"),
                    guest_rx_irqs_per_mb: summary("guest_rx_irqs_per_mb"),
                    guest_tx_irqs_per_mb: summary("guest_tx_irqs_per_mb"),
                    vmm_kicks_per_mb: summary("vmm_kicks_per_mb"),
                    vmm_irqs_per_mb: summary("vmm_irqs_per_mb"),
                };
                if row.kvm_exits_per_mb.is_some() {
                    rows.push(row);
                }
            }
        }
    }
    rows
}

/// The exits table (markdown); empty without rows.
pub fn exits_table(rows: &[ExitsRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "| dir | pairs | VMM | exits | MMIO/PIO to VMM | emulated in KVM (ioeventfd kicks, PT writes) | irq injections | halts | guest virtio irqs | of which rx queues | of which tx queues | device kicks | device irqs |\n\
         |---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let dir = if r.dir == "up" {
            "guest→host"
        } else {
            "host→guest"
        };
        let _ = writeln!(
            s,
            "| {dir} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.pairs,
            r.vmm,
            cell(&r.kvm_exits_per_mb, 1),
            cell(&r.kvm_vmm_io_exits_per_mb, 1),
            cell(&r.kvm_kernel_emulation_per_mb, 1),
            cell(&r.kvm_irq_injections_per_mb, 1),
            cell(&r.kvm_halt_exits_per_mb, 1),
            cell(&r.guest_irqs_per_mb, 1),
            cell(&r.guest_rx_irqs_per_mb, 1),
            cell(&r.guest_tx_irqs_per_mb, 1),
            cell(&r.vmm_kicks_per_mb, 1),
            cell(&r.vmm_irqs_per_mb, 1),
        );
    }
    s
}

/// What the launcher reported about steering, per mqvmm variant: boots with it attached out of
/// those recorded, and why it was off where it said so.
fn steering_note(data: &Data) -> String {
    let mut parts = Vec::new();
    for v in [Vmm::Mqvmm, Vmm::MqvmmNoSteering] {
        let prefix = format!("steering_{}_rep", v.key());
        let said: Vec<&str> = data
            .meta
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, said)| said.as_str())
            .collect();
        if said.is_empty() {
            continue;
        }
        let attached = said.iter().filter(|s| **s == "attached").count();
        let mut part = format!("{} {attached}/{}", v.key(), said.len());
        let why: BTreeSet<&str> = said
            .iter()
            .filter_map(|s| s.strip_prefix("off: "))
            .collect();
        if !why.is_empty() {
            let why: Vec<&str> = why.into_iter().collect();
            let _ = write!(part, " (off: {})", why.join("; "));
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return String::new();
    }
    format!(
        "\nBoots in which mqvmm-launch attached its eBPF steering program: {}.\n",
        parts.join(", ")
    )
}

fn point(s: &Option<Summary>) -> Option<Point> {
    s.map(|s| Point {
        mid: s.median,
        lo: s.min,
        hi: s.max,
    })
}

/// Device/ceiling ratio per frame size, tx and rx panels, one bar per pair count.
pub fn device_plot(rows: &[DevRow]) -> String {
    let sizes: Vec<u64> = rows
        .iter()
        .map(|r| r.frame)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let pair_counts: Vec<u64> = rows
        .iter()
        .map(|r| r.pairs)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let groups: Vec<String> = sizes.iter().map(|&f| frames::label(f as usize)).collect();
    let mut svg = Svg::new(900.0, 400.0);
    svg.text(
        450.0,
        22.0,
        "Device data path vs raw tap ceiling (packets/s ratio; whiskers: min–max of 5 samples)",
        14.0,
        "middle",
        true,
    );
    let y_max = rows
        .iter()
        .filter_map(|r| r.ratio.map(|s| s.max))
        .fold(1.05f64, f64::max);
    for (i, dir) in ["tx", "rx"].iter().enumerate() {
        let series: Vec<Series> = pair_counts
            .iter()
            .map(|&p| Series {
                points: sizes
                    .iter()
                    .map(|&f| {
                        rows.iter()
                            .find(|r| r.dir == *dir && r.frame == f && r.pairs == p)
                            .and_then(|r| point(&r.ratio))
                    })
                    .collect(),
            })
            .collect();
        let title = if *dir == "tx" {
            "tx: guest → tap"
        } else {
            "rx: tap → guest"
        };
        svg::bar_panel(
            &mut svg,
            Panel {
                x0: 70.0 + 430.0 * i as f64,
                y0: 60.0,
                w: 370.0,
                h: 270.0,
                y_max,
            },
            title,
            "device / ceiling",
            &groups,
            &series,
            &[(1.0, "ceiling"), (0.8, "0.8")],
        );
    }
    let names: Vec<String> = pair_counts
        .iter()
        .map(|&p| format!("{p} pair{}", if p == 1 { "" } else { "s" }))
        .collect();
    svg::legend(&mut svg, 330.0, 385.0, &names);
    svg.finish()
}

/// Guest throughput vs active pairs, guest->host and host->guest panels, one line per VMM.
pub fn guest_plot(rows: &[GuestRow]) -> String {
    let pair_counts: Vec<u64> = rows
        .iter()
        .filter_map(|r| r.pairs)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let labels: Vec<String> = pair_counts.iter().map(u64::to_string).collect();
    // The column VMMs always (their colours stay put), the others where the run has them.
    let plotted: Vec<Vmm> = Vmm::ALL
        .into_iter()
        .filter(|v| COLUMNS.contains(v) || rows.iter().any(|r| r.of(*v).is_some()))
        .collect();
    let mut svg = Svg::new(900.0, 400.0);
    svg.text(
        450.0,
        22.0,
        "iperf3 TCP throughput vs active queue pairs (nested rig; median, min–max)",
        14.0,
        "middle",
        true,
    );
    for (i, (metric, title)) in [
        ("iperf_up_mbps", "guest → host"),
        ("iperf_down_mbps", "host → guest"),
    ]
    .iter()
    .enumerate()
    {
        let series: Vec<Series> = plotted
            .iter()
            .map(|&v| Series {
                points: pair_counts
                    .iter()
                    .map(|&p| {
                        rows.iter()
                            .find(|r| r.metric == *metric && r.pairs == Some(p))
                            .and_then(|r| point(&r.of(v)))
                    })
                    .collect(),
            })
            .collect();
        let y_max = series
            .iter()
            .flat_map(|s| s.points.iter().flatten().map(|p| p.hi))
            .fold(1.0f64, f64::max);
        svg::line_panel(
            &mut svg,
            Panel {
                x0: 80.0 + 430.0 * i as f64,
                y0: 60.0,
                w: 360.0,
                h: 260.0,
                y_max,
            },
            title,
            "Mbit/s",
            "active queue pairs (ethtool -L combined N)",
            &labels,
            &series,
        );
    }
    let names: Vec<String> = plotted.iter().map(|v| v.key().to_string()).collect();
    // Where the legend of the column VMMs alone starts, moved left by half of what more there is.
    let extra: usize = names[COLUMNS.len()..]
        .iter()
        .map(|n| svg::legend_width(n))
        .sum();
    svg::legend(&mut svg, 300.0 - extra as f64 / 2.0, 390.0, &names);
    svg.finish()
}

fn markdown(data: &Data, dev: &[DevRow], guest: &[GuestRow], exits: &[ExitsRow]) -> String {
    let mut s = String::from("# mqvmm benchmark results\n\n");
    let _ = writeln!(
        s,
        "Run {} at commit `{}`. Machine: {} ({} cores), host kernel {}; load average {} at start, {} at end.",
        data.meta("date"),
        data.meta("commit"),
        data.meta("cpu_model"),
        data.meta("cores"),
        data.meta("host_kernel"),
        data.meta("loadavg_start"),
        data.meta("loadavg_end"),
    );
    let _ = writeln!(
        s,
        "Cells: median ±spread, spread = (max − min) / median over the samples; ratios: median (min–max) of paired samples.\n"
    );
    s.push_str("## Summary\n\n");
    if !dev.is_empty() {
        s.push_str(&device_summary_table(dev));
        s.push('\n');
    }
    if !guest.is_empty() {
        s.push_str(&guest_table(guest, false));
        s.push('\n');
    }
    let steering = steering_table(guest);
    if !steering.is_empty() {
        s.push_str(&steering);
        s.push('\n');
    }
    if !dev.is_empty() {
        s.push_str("## Device data path (no guest)\n\n");
        s.push_str(&device_table(dev));
        s.push_str("\n![device path vs ceiling](device-vs-ceiling.svg)\n\n");
        let _ = writeln!(s, "Method: {DEVICE_METHOD}\n");
    }
    if !guest.is_empty() {
        s.push_str("## Guests: mqvmm vs QEMU, same run\n\n");
        let _ = writeln!(
            s,
            "KVM host: {} (kernel {}, {} CPUs); guest kernel {}; {}; {}.\n",
            data.meta("kvm_env"),
            data.meta("kvm_host_kernel"),
            data.meta("kvm_host_cpus"),
            data.meta("l2_kernel_mqvmm"),
            data.meta("guest_config"),
            data.meta("qemu_version"),
        );
        s.push_str(&guest_table(guest, true));
        s.push_str(&host_queue_note(data));
        if !steering.is_empty() {
            s.push_str("\n### Host→guest with and without eBPF steering (mqvmm), same run\n\n");
            s.push_str(&steering);
            s.push_str(&steering_note(data));
        }
        let threads = threads_table(guest);
        if !threads.is_empty() {
            s.push_str(
                "\n### Worker threads: mqvmm's default against a thread per pair, same run\n\n",
            );
            s.push_str(&threads);
            s.push_str(&format!("\n{THREADS_NOTE}\n"));
        }
        s.push_str("\n![guest throughput](guest-throughput.svg)\n\n");
        let _ = writeln!(s, "Method: {GUEST_METHOD}\n");
    }
    let exits = exits_table(exits);
    if !exits.is_empty() {
        s.push_str("### Exits, kicks and interrupts per MB (same run)\n\n");
        s.push_str(&exits);
        let _ = writeln!(s, "\nCounters: {EXITS_METHOD}\n");
    }
    s
}

/// Whether the host tap's attached queue count followed every `ethtool -L` step, per VMM.
fn host_queue_note(data: &Data) -> String {
    let mut parts = Vec::new();
    for v in Vmm::ALL {
        let steps: Vec<&GuestSample> = data
            .guest
            .iter()
            .filter(|s| s.metric == "host_queues" && s.vmm == v.key())
            .collect();
        if steps.is_empty() {
            continue;
        }
        let ok = steps
            .iter()
            .filter(|s| s.pairs.is_some_and(|p| p as f64 == s.value))
            .count();
        parts.push(format!("{} {ok}/{}", v.key(), steps.len()));
    }
    if parts.is_empty() {
        return String::new();
    }
    format!(
        "\nHost tap attached queues equal to the guest's active pairs after each step: {}.\n",
        parts.join(", ")
    )
}

/// What [`write()`] produced.
pub struct Written {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The device table.
    pub device_table: String,
    /// The guest table, then the steering table when the run has one.
    pub guest_table: String,
}

/// Writes latest.json, latest.md and the plots into `dir`.
pub fn write(data: &Data, dir: &Path) -> Result<Written, Error> {
    let published = Published::of(data);
    let (dev, guest) = (&published.device.summary, &published.guest.summary);
    let mut files = Vec::new();
    let mut put = |name: &str, text: String| -> Result<(), Error> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
        files.push(path);
        Ok(())
    };
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let json = published.to_text().map_err(|e| Error::Write {
        path: dir.join("latest.json"),
        source: e.into(),
    })?;
    put("latest.json", json)?;
    put(
        "latest.md",
        markdown(data, dev, guest, &published.guest_exits_per_mb),
    )?;
    if !dev.is_empty() {
        put("device-vs-ceiling.svg", device_plot(dev))?;
    }
    if !guest.is_empty() {
        put("guest-throughput.svg", guest_plot(guest))?;
    }
    Ok(Written {
        files,
        device_table: device_table(dev),
        guest_table: [
            guest_table(guest, true),
            steering_table(guest),
            threads_table(guest),
        ]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn dev(path: &str, sample: u64, frames: u64, wall_ns: u64) -> Record {
        Record::Device(DevSample {
            dir: "tx".into(),
            pairs: 1,
            frame: 1514,
            path: path.into(),
            sample,
            units: 4,
            frames,
            bytes: frames * 1514,
            wall_ns,
            cpu_ns: wall_ns,
            irqs: 4,
        })
    }

    fn guest(vmm: &str, rep: u64, metric: &str, pairs: Option<u64>, value: f64) -> Record {
        Record::Guest(GuestSample {
            vmm: vmm.into(),
            rep,
            metric: metric.into(),
            pairs,
            value,
        })
    }

    #[test]
    fn device_ratio_pairs_samples_taken_together() {
        let recs = vec![
            dev("ceiling", 0, 1000, 1_000_000),
            dev("device", 0, 900, 1_000_000),
            dev("ceiling", 1, 1000, 2_000_000),
            dev("device", 1, 800, 2_000_000),
        ];
        let rows = device_rows(&Data::from_records(recs));
        assert_eq!(rows.len(), 1);
        let r = rows[0].ratio.unwrap();
        assert!(
            (r.median - 0.85).abs() < 1e-9 && r.min == 0.8 && r.max == 0.9,
            "{r:?}"
        );
        assert_eq!(rows[0].device.pps.unwrap().n, 2);
        let table = device_table(&rows);
        assert!(
            table.contains("| tx (guest→host) | 1514 B | 1 |"),
            "{table}"
        );
        assert!(table.contains("**0.85 (0.80–0.90)**"), "{table}");
    }

    #[test]
    fn guest_rows_pool_or_split_by_pairs_and_pair_ratios_by_rep() {
        let mut recs = Vec::new();
        for rep in 1..=3 {
            recs.push(guest("mqvmm", rep, "boot_wall_s", None, 10.0));
            recs.push(guest("qemu-vhost-off", rep, "boot_wall_s", None, 20.0));
            for p in 1..=2 {
                recs.push(guest(
                    "mqvmm",
                    rep,
                    "iperf_up_mbps",
                    Some(p),
                    100.0 * p as f64,
                ));
                recs.push(guest("qemu-vhost-on", rep, "iperf_up_mbps", Some(p), 50.0));
            }
        }
        let rows = guest_rows(&Data::from_records(recs));
        let boot = rows.iter().find(|r| r.metric == "boot_wall_s").unwrap();
        assert_eq!(boot.pairs, None);
        assert_eq!(boot.vs_vhost_off.unwrap().median, 0.5);
        assert!(boot.vs_vhost_on.is_none() && boot.vmms[2].is_none());
        let up2 = rows
            .iter()
            .find(|r| r.metric == "iperf_up_mbps" && r.pairs == Some(2))
            .unwrap();
        assert_eq!(up2.vs_vhost_on.unwrap().median, 4.0);
        assert_eq!(up2.vmms[0].unwrap().n, 3);
        let table = guest_table(&rows, true);
        assert!(
            table.contains("| 2 | 200 ±0% | – | 50 ±0% | – | 4.00 (4.00–4.00) |"),
            "{table}"
        );
        let plot = guest_plot(&rows);
        assert!(plot.contains("<polyline") && plot.contains("qemu-vhost-on"));
    }

    #[test]
    fn thread_per_pair_boots_add_a_threads_table_in_both_directions() {
        let mut recs = Vec::new();
        for rep in 1..=2 {
            for p in 1..=2 {
                let p_f = p as f64;
                for (vmm, up, down) in [
                    ("mqvmm", 300.0 * p_f, 400.0),
                    ("mqvmm-thread-per-pair", 150.0 * p_f, 400.0),
                    ("qemu-vhost-off", 200.0, 200.0),
                ] {
                    recs.push(guest(vmm, rep, "iperf_up_mbps", Some(p), up));
                    recs.push(guest(vmm, rep, "iperf_down_mbps", Some(p), down));
                }
            }
        }
        let with = Data::from_records(recs.clone());
        let rows = guest_rows(&with);
        let table = threads_table(&rows);
        assert_eq!(table.lines().count(), 6, "{table}");
        assert!(
            table.contains(
                "| guest→host | 2 | 600 ±0% | 300 ±0% | **2.00 (2.00–2.00)** | 3.00 (3.00–3.00) |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| host→guest | 1 | 400 ±0% | 400 ±0% | **1.00 (1.00–1.00)** | 2.00 (2.00–2.00) |"
            ),
            "{table}"
        );
        let md = markdown(&with, &[], &rows, &exits_rows(&with));
        assert!(md.contains("### Worker threads: mqvmm's default against a thread per pair"));
        let without: Vec<Record> = recs
            .into_iter()
            .filter(|r| !matches!(r, Record::Guest(g) if g.vmm == "mqvmm-thread-per-pair"))
            .collect();
        assert_eq!(threads_table(&guest_rows(&Data::from_records(without))), "");
    }

    #[test]
    fn no_steering_boots_add_a_steering_table_and_leave_the_guest_table_as_it_was() {
        let (mut base, mut extra) = (Vec::new(), Vec::new());
        for rep in 1..=2 {
            for p in 1..=2 {
                let p_f = p as f64;
                base.push(guest("mqvmm", rep, "iperf_down_mbps", Some(p), 300.0 * p_f));
                base.push(guest("mqvmm", rep, "iperf_up_mbps", Some(p), 100.0));
                base.push(guest(
                    "qemu-vhost-off",
                    rep,
                    "iperf_down_mbps",
                    Some(p),
                    200.0 * p_f,
                ));
                extra.push(guest(
                    "mqvmm-no-steering",
                    rep,
                    "iperf_down_mbps",
                    Some(p),
                    150.0 * p_f,
                ));
            }
            base.push(guest("mqvmm", rep, "boot_wall_s", None, 3.0));
            extra.push(guest("mqvmm-no-steering", rep, "boot_wall_s", None, 3.0));
            extra.push(Record::meta(format!("steering_mqvmm_rep{rep}"), "attached"));
            extra.push(Record::meta(
                format!("steering_mqvmm-no-steering_rep{rep}"),
                "off",
            ));
        }
        let without = Data::from_records(base.clone());
        let with = Data::from_records(base.into_iter().chain(extra));
        let (rows_without, rows_with) = (guest_rows(&without), guest_rows(&with));
        assert_eq!(
            guest_table(&rows_with, true),
            guest_table(&rows_without, true)
        );
        assert_eq!(steering_table(&rows_without), "");
        let table = steering_table(&rows_with);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            table.contains(
                "| 2 | 600 ±0% | 300 ±0% | **2.00 (2.00–2.00)** | 1.50 (1.50–1.50) | – |"
            ),
            "{table}"
        );
        let md = markdown(&with, &[], &rows_with, &exits_rows(&with));
        assert_eq!(
            md.matches(table.as_str()).count(),
            2,
            "summary and guests: {md}"
        );
        assert!(md.contains("### Host→guest with and without eBPF steering (mqvmm), same run"));
        assert!(
            md.contains("eBPF steering program: mqvmm 2/2, mqvmm-no-steering 0/2."),
            "{md}"
        );
        let md_without = without_method(&markdown(
            &without,
            &[],
            &rows_without,
            &exits_rows(&without),
        ));
        assert!(!md_without.contains("steering"), "{md_without}");
        // JSON: the variant and its ratio only where it was measured.
        let json = serde_json::to_value(&rows_with).unwrap();
        let row = |metric: &str, pairs: Value| {
            json.as_array()
                .unwrap()
                .iter()
                .find(|r| r["metric"] == metric && r["pairs"] == pairs)
                .unwrap()
                .clone()
        };
        let up = row("iperf_up_mbps", 1.into());
        assert!(up["vmms"].get("mqvmm-no-steering").is_none(), "{up}");
        assert!(up["vmms"]["qemu-vhost-on"].is_null(), "{up}");
        assert!(
            up.get("ratio_mqvmm_over_mqvmm_no_steering").is_none(),
            "{up}"
        );
        let down = row("iperf_down_mbps", 1.into());
        assert_eq!(down["vmms"]["mqvmm-no-steering"]["median"], 150.0);
        assert_eq!(down["ratio_mqvmm_over_mqvmm_no_steering"]["median"], 2.0);
        assert!(guest_plot(&rows_with).contains("mqvmm-no-steering"));
        assert!(!guest_plot(&rows_without).contains("mqvmm-no-steering"));
    }

    #[test]
    fn kvm_counters_add_an_exits_table_and_leave_the_other_tables_as_they_were() {
        let mut without = Vec::new();
        for (vmm, irqs) in [("mqvmm", 12.0), ("qemu-vhost-off", 6.0)] {
            for p in 1..=2 {
                without.push(guest(vmm, 1, "iperf_up_mbps", Some(p), 1000.0));
                without.push(guest(vmm, 1, "guest_irqs_per_mb_up", Some(p), irqs));
            }
        }
        without.push(guest("mqvmm", 1, "vmm_kicks_per_mb_up", Some(2), 30.0));
        without.push(guest(
            "qemu-vhost-off",
            1,
            "guest_rx_irqs_per_mb_up",
            Some(1),
            2.5,
        ));
        without.push(guest(
            "qemu-vhost-off",
            1,
            "guest_tx_irqs_per_mb_up",
            Some(1),
            3.5,
        ));
        let mut with = without.clone();
        for (vmm, exits) in [("mqvmm", 400.0), ("qemu-vhost-off", 250.0)] {
            for p in 1..=2 {
                for (stem, v) in [
                    ("exits", exits * p as f64),
                    ("vmm_io_exits", 1.5),
                    ("kernel_emulation", 31.0),
                    ("irq_injections", 20.0),
                    ("halt_exits", 9.0),
                ] {
                    with.push(guest(vmm, 1, &format!("kvm_{stem}_per_mb_up"), Some(p), v));
                }
            }
        }
        let (with, without) = (Data::from_records(with), Data::from_records(without));
        assert!(exits_rows(&without).is_empty());
        let rows = exits_rows(&with);
        assert_eq!(rows.len(), 4, "{rows:?}");
        let table = exits_table(&rows);
        assert!(
            table.contains("| guest→host | 2 | mqvmm | 800.0 ±0% | 1.5 ±0% | 31.0 ±0% | 20.0 ±0% | 9.0 ±0% | 12.0 ±0% | – | – | 30.0 ±0% | – |"),
            "{table}"
        );
        assert!(
            table.contains("| guest→host | 1 | qemu-vhost-off | 250.0 ±0% | 1.5 ±0% | 31.0 ±0% | 20.0 ±0% | 9.0 ±0% | 6.0 ±0% | 2.5 ±0% | 3.5 ±0% | – | – |"),
            "{table}"
        );
        let md = |d: &Data| markdown(d, &[], &guest_rows(d), &exits_rows(d));
        let (md_with, md_without) = (md(&with), md(&without));
        assert!(!md_without.contains("Exits, kicks and interrupts"));
        let (head, tail) = md_with
            .split_once("### Exits, kicks and interrupts per MB (same run)\n\n")
            .unwrap();
        assert_eq!(head, md_without);
        assert!(tail.starts_with(&table), "{tail}");
        let json: Value = serde_json::from_str(&Published::of(&with).to_text().unwrap()).unwrap();
        let first = &json["guest_exits_per_mb"][0];
        assert_eq!(first["vmm"], "mqvmm");
        assert_eq!(first["kvm_exits_per_mb"]["median"], 400.0);
        assert_eq!(first["guest_irqs_per_mb"]["median"], 12.0);
        let json: Value =
            serde_json::from_str(&Published::of(&without).to_text().unwrap()).unwrap();
        assert!(json.get("guest_exits_per_mb").is_none(), "{json}");
    }

    /// The markdown without its method paragraphs (prose, not rendering).
    fn without_method(md: &str) -> String {
        md.lines()
            .filter(|l| !l.starts_with("Method: "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn legacy_records_render_the_tables_the_previous_renderer_wrote() {
        // testdata/legacy.rec: part of the published run's samples in the tab-separated
        // records format; legacy.md: what the renderer wrote from it before serde.
        let path = Path::new("testdata/legacy.rec");
        let records =
            crate::record::parse(path, include_str!("../../testdata/legacy.rec")).unwrap();
        let data = Data::from_records(records);
        let (dev, guest) = (device_rows(&data), guest_rows(&data));
        assert_eq!(
            without_method(&markdown(&data, &dev, &guest, &exits_rows(&data))),
            without_method(include_str!("../../testdata/legacy.md"))
        );
    }

    /// Where two JSON documents first differ, numbers compared as values (the writer before
    /// serde wrote 3.0 as 3) and method paragraphs left out.
    fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
        let differs = || Some(format!("{at}: {a} vs {b}"));
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then(differs)?,
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}[{i}]"))),
            (Value::Object(x), Value::Object(y)) if x.len() == y.len() => x
                .iter()
                .filter(|(k, _)| *k != "method")
                .find_map(|(k, x)| match y.get(k) {
                    Some(y) => first_difference(x, y, &format!("{at}.{k}")),
                    None => Some(format!("{at}.{k} missing")),
                }),
            _ => (a != b).then(differs)?,
        }
    }

    #[test]
    fn the_published_latest_json_renders_the_published_tables_and_itself() {
        let path = Path::new("bench/results/latest.json");
        let text = include_str!("../../results/latest.json");
        let published = Published::parse(path, text).unwrap();
        let keys: Vec<String> = published.meta.keys().cloned().collect();
        let data = Data::from_records(published.into_records());
        assert_eq!((data.device.len(), data.guest.len()), (180, 1458));
        let again = Published::of(&data);
        let (dev, guest) = (&again.device.summary, &again.guest.summary);
        assert_eq!(
            without_method(&markdown(&data, dev, guest, &again.guest_exits_per_mb)),
            without_method(include_str!("../../results/latest.md"))
        );
        let written = again.to_text().unwrap();
        let (before, after): (Value, Value) = (
            serde_json::from_str(text).unwrap(),
            serde_json::from_str(&written).unwrap(),
        );
        assert_eq!(first_difference(&before, &after, "latest.json"), None);
        let reread = Published::parse(path, &written).unwrap();
        assert!(reread.meta.keys().eq(keys.iter()), "meta order");
    }

    #[test]
    fn a_json_that_is_not_a_published_report_is_refused() {
        let path = Path::new("x.json");
        let other = r#"{"schema": "mqvmm-bench/0", "meta": {}, "device": {"method": "", "samples": []}, "guest": {"method": "", "samples": []}}"#;
        let err = Published::parse(path, other).unwrap_err();
        assert!(err.to_string().contains("\"mqvmm-bench/0\""), "{err}");
        let err = Published::parse(path, "{\"kind\": \"meta\"}").unwrap_err();
        assert!(
            err.to_string().contains("x.json is not a mqvmm-bench/1"),
            "{err}"
        );
    }

    #[test]
    fn json_keeps_every_sample_and_meta() {
        let recs = vec![
            Record::meta("commit", "abc"),
            dev("ceiling", 0, 1000, 1_000_000),
            dev("device", 0, 900, 1_000_000),
            guest("mqvmm", 1, "rss_beyond_guest_mib", None, 12.5),
        ];
        let data = Data::from_records(recs);
        let j = Published::of(&data).to_text().unwrap();
        assert!(j.contains("\"commit\": \"abc\""));
        assert_eq!(j.matches("\"wall_ns\"").count(), 2);
        assert!(j.contains("\"metric\": \"rss_beyond_guest_mib\""));
    }
}
