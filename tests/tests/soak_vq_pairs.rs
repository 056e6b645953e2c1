//! Load: 1000 VQ_PAIRS_SET changes, cycling through every transition between the
//! counts 1..4 (`ethtool -L eth0 combined N` in the guest), while four iperf3 clients in the
//! guest, one pinned to each vCPU, run `--bidir` against four servers on the host over the
//! tap. Run by `make test-soak` (ignored otherwise; it takes minutes under the nested rig).
//!
//! Afterwards:
//! - no stuck queue: at 4 and at 2 pairs, every enabled pair carries rx and tx traffic (mqvmm's
//!   own per-pair counters, SIGUSR1, and the guest's `ethtool -S`), disabled pairs none, and the
//!   host tap's attached queue count follows;
//! - no descriptor leak: over the whole run every frame is accounted for between the host tap,
//!   mqvmm and the guest driver (see [`Accounting`]), over far more frames per queue than its
//!   ring holds;
//! - no fd leak: /proc/PID/fd has the same entries before and after;
//! - mqvmm's own RSS (guest RAM excluded) is stable.
//!
//! In the nested rig an L2 vCPU triple fault under this load is the emulator's (see
//! [`rig::EMULATOR_FAULT`]): the rig then runs the soak once more.
//!
//! Transport: virtio-mmio by default, `MQVMM_SOAK_TRANSPORT=pci` for virtio-pci: with its eight
//! MSI-X vectors under this load, the rig's emulated SVM crashes L1's kernel (docs/rig.md). The
//! data path, the control queue and VQ_PAIRS_SET are the transport's business only up to the
//! kick and the interrupt; boot_net runs the `ethtool -L` walk with traffic over both
//! transports.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqvmm_tests::console::GuestConsole;
use mqvmm_tests::rig::{self, GUEST_IP, HOST_IP};
use mqvmm_tests::{netns, skip};

const PAIRS: u32 = 4;
const CPUS: u32 = 4;
const STEP: Duration = Duration::from_secs(120);
/// Every ordered pair (a, b), a != b, of 1..4 once: a circuit through all transitions,
/// starting and ending at 4.
const CIRCUIT: &str = "1 2 1 3 1 4 2 3 2 4 3 4";

fn changes() -> u32 {
    std::env::var("MQVMM_SOAK_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn sh(cmd: &str) {
    let status = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("run sh");
    assert!(status.success(), "`{cmd}` failed: {status}");
}

struct HostTap {
    name: String,
}

impl HostTap {
    fn new(name: &str) -> HostTap {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip tuntap add dev {name} mode tap multi_queue vnet_hdr && ip addr add {HOST_IP}/24 dev {name} && ip link set {name} up"
        ));
        HostTap {
            name: name.to_string(),
        }
    }

    fn attached(&self) -> u32 {
        netns::tun_info(&self.name)
            .unwrap_or_else(|e| panic!("netlink query of {}: {e}", self.name))
            .num_queues
    }

    /// The kernel's counters of the tap: rx = frames mqvmm wrote (guest to host), tx = frames
    /// mqvmm read (host to guest).
    fn stat(&self, what: &str) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{what}", self.name);
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot read {path}"))
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// One iperf3 server per guest vCPU (ports 5201..), killed on drop.
struct IperfServers(Vec<Child>);

impl IperfServers {
    fn start(n: u32) -> IperfServers {
        let children = (0..n)
            .map(|i| {
                Command::new("iperf3")
                    .args(["-s", "-B", HOST_IP, "-p", &(5201 + i).to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start iperf3 -s")
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        IperfServers(children)
    }
}

impl Drop for IperfServers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The transport the soak runs over: virtio-mmio unless `MQVMM_SOAK_TRANSPORT=pci`.
fn soak_over_pci() -> bool {
    std::env::var("MQVMM_SOAK_TRANSPORT").as_deref() == Ok("pci")
}

/// The guest's command line; `pci=off` makes mqvmm use virtio-mmio.
fn soak_cmdline() -> String {
    let base = format!("console=ttyS0 quiet panic=-1 mqvmm.ip={GUEST_IP}/24");
    if soak_over_pci() {
        base
    } else {
        format!("{base} pci=off")
    }
}

fn start_guest(tap: &HostTap) -> GuestConsole {
    let images = rig::guest_images();
    let mut cmd = Command::new(rig::bin_path("mqvmm-launch"));
    cmd.args(["--tap", &tap.name, "--queues", &PAIRS.to_string()])
        .args(["--user", "nobody", "--"])
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--initramfs")
        .arg(&images.initramfs)
        .args(["--cpus", &CPUS.to_string(), "--memory", "512"])
        .args(["--cmdline", &soak_cmdline()]);
    let mut console = GuestConsole::spawn(cmd).expect("start mqvmm-launch");
    if console
        .wait_for("MQVMM-READY", Duration::from_secs(180))
        .is_none()
    {
        panic!("guest never became ready:\n{}", console.transcript());
    }
    let deadline = Instant::now() + STEP;
    loop {
        console.send("echo MQSYNC:$((20+22))\n").expect("type");
        if console
            .wait_for("MQSYNC:42", Duration::from_secs(3))
            .is_some()
        {
            return console;
        }
        assert!(
            Instant::now() < deadline,
            "guest shell does not answer:\n{}",
            console.transcript()
        );
    }
}

/// The `key=value` fields of mqvmm's SIGUSR1 line: "device" for the device, "pairN" per
/// pair, "ctrl" for the control queue.
type Metrics = BTreeMap<String, BTreeMap<String, u64>>;

fn metrics(console: &mut GuestConsole) -> Metrics {
    let pid = console.pid() as i32;
    // SAFETY: kill only sends a signal to the mqvmm child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    let line = console
        .wait_for("mqvmm-metrics:", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no metrics line after SIGUSR1:\n{}", console.transcript()));
    parse_metrics(&line)
}

fn parse_metrics(line: &str) -> Metrics {
    let body = line.split_once("mqvmm-metrics:").map_or(line, |(_, b)| b);
    body.split(" | ")
        .map(|segment| {
            let mut words = segment.split_whitespace();
            let name = match words.next() {
                Some("virtio-net") | None => "device".to_string(),
                Some(name) => name.to_string(),
            };
            let fields = words
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            (name, fields)
        })
        .collect()
}

fn field(m: &Metrics, segment: &str, key: &str) -> u64 {
    m.get(segment)
        .and_then(|s| s.get(key))
        .copied()
        .unwrap_or_else(|| panic!("no {segment}.{key} in the metrics: {m:?}"))
}

fn pair_sum(m: &Metrics, key: &str) -> u64 {
    (0..PAIRS).map(|p| field(m, &format!("pair{p}"), key)).sum()
}

/// The guest driver's per-queue counters from `ethtool -S eth0` ("rx_queue_0_packets" ...).
fn guest_stats(console: &mut GuestConsole) -> BTreeMap<String, u64> {
    console
        .check("ethtool -S eth0", STEP)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn guest_queue(stats: &BTreeMap<String, u64>, dir: &str, q: u32) -> u64 {
    stats
        .get(&format!("{dir}_queue_{q}_packets"))
        .copied()
        .unwrap_or(0)
}

fn fds(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Anonymous inodes carry no identity worth comparing beyond their kind.
            let kind = target.split(':').next().unwrap_or("").to_string();
            format!("{}={kind}", e.file_name().to_string_lossy())
        })
        .collect();
    fds.sort();
    fds
}

/// Resident KiB of mqvmm: (everything, guest RAM). Guest RAM is the one anonymous mapping of
/// the guest's memory size (512 MiB); its residency grows as the guest touches its memory,
/// which is not the VMM's.
fn rss_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                in_guest = e - s >= 256 << 20;
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (total, guest)
}

/// Runs four pinned `--bidir` iperf3 clients for `secs` seconds and waits for them.
fn traffic(console: &mut GuestConsole, secs: u32) {
    let cmd = format!(
        "for i in $(seq 0 {last}); do taskset -c $i iperf3 -c {HOST_IP} -p $((5201+i)) --bidir -t {secs} > /tmp/check$i.log 2>&1 & done; wait; \
         grep -h -c receiver /tmp/check*.log",
        last = CPUS - 1
    );
    let out = console.check(&cmd, STEP);
    let finished: u32 = out
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .sum();
    assert_eq!(
        finished,
        2 * CPUS,
        "not every iperf3 client finished both directions:\n{out}\n{}",
        console.check("tail -n 3 /tmp/check*.log", STEP)
    );
}

/// At `n` pairs: the host follows, every enabled pair carries rx and tx traffic, disabled ones
/// none.
fn check_queues_at(console: &mut GuestConsole, tap: &HostTap, n: u32) {
    console.check(&format!("ethtool -L eth0 combined {n}"), STEP);
    assert_eq!(tap.attached(), n, "host tap queues at combined {n}");
    let before = metrics(console);
    let guest_before = guest_stats(console);
    traffic(console, 4);
    let after = metrics(console);
    let guest_after = guest_stats(console);
    let mut line = format!("check: combined {n}:");
    for p in 0..PAIRS {
        let seg = format!("pair{p}");
        let rx = field(&after, &seg, "rx_packets") - field(&before, &seg, "rx_packets");
        let tx = field(&after, &seg, "tx_packets") - field(&before, &seg, "tx_packets");
        let g_rx = guest_queue(&guest_after, "rx", p) - guest_queue(&guest_before, "rx", p);
        let g_tx = guest_queue(&guest_after, "tx", p) - guest_queue(&guest_before, "tx", p);
        line.push_str(&format!(
            " pair{p} rx {rx} tx {tx} (guest rx {g_rx} tx {g_tx});"
        ));
        if p < n {
            assert!(
                rx > 0 && tx > 0 && g_rx > 0 && g_tx > 0,
                "pair {p} is stuck at combined {n}: {line}"
            );
        } else {
            assert_eq!(
                rx, 0,
                "disabled rx queue {p} received at combined {n}: {line}"
            );
            assert_eq!(tx, 0, "disabled tx queue {p} sent at combined {n}: {line}");
        }
    }
    println!("{line}");
}

/// Counters at a quiescent moment (no traffic in flight), for the frame accounting.
#[derive(Debug, Clone, Copy)]
struct Accounting {
    /// Guest driver: frames received (ethtool -S rx_queue_N_packets, summed).
    guest_rx: u64,
    /// Guest driver: transmitted frames whose buffers came back (tx_queue_N_packets).
    guest_tx: u64,
    /// mqvmm: frames written into rx buffers / dropped (too big for the buffers) / kept
    /// from the guest by its receive filter (not for its addresses: the host's IPv6
    /// multicast, say, once the driver turned promiscuity off).
    dev_rx: u64,
    dev_rx_drops: u64,
    dev_rx_filtered: u64,
    /// mqvmm: tx chains written to the tap / dropped (pair parked: the purged queues) /
    /// malformed.
    dev_tx: u64,
    dev_tx_drops: u64,
    dev_bad_chains: u64,
    /// Host tap: frames mqvmm read (tx) and wrote (rx); frames the kernel dropped.
    tap_tx: u64,
    tap_rx: u64,
    tap_tx_dropped: u64,
    tap_rx_dropped: u64,
}

/// Reads all three sides while no frame moves: mqvmm's counters are read before and after the
/// guest's and the tap's, and the reading is repeated until they did not change (a late TCP
/// retransmission or neighbour probe would otherwise fall between two of the readings).
fn accounting(console: &mut GuestConsole, tap: &HostTap) -> Accounting {
    let moving = |m: &Metrics| {
        [
            "rx_packets",
            "tx_packets",
            "rx_drops",
            "tx_drops",
            "rx_filtered",
        ]
        .map(|k| pair_sum(m, k))
    };
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(3));
        let m = metrics(console);
        let g = guest_stats(console);
        let a = accounting_of(&m, &g, tap);
        let again = metrics(console);
        if moving(&m) == moving(&again) && a.tap_tx == tap.stat("tx_packets") {
            return a;
        }
    }
    panic!(
        "frames kept moving for 30 s with no traffic running:
{}",
        console.transcript()
    );
}

fn accounting_of(m: &Metrics, g: &BTreeMap<String, u64>, tap: &HostTap) -> Accounting {
    Accounting {
        guest_rx: (0..PAIRS).map(|q| guest_queue(g, "rx", q)).sum(),
        guest_tx: (0..PAIRS).map(|q| guest_queue(g, "tx", q)).sum(),
        dev_rx: pair_sum(m, "rx_packets"),
        dev_rx_drops: pair_sum(m, "rx_drops"),
        dev_rx_filtered: pair_sum(m, "rx_filtered"),
        dev_tx: pair_sum(m, "tx_packets"),
        dev_tx_drops: pair_sum(m, "tx_drops"),
        dev_bad_chains: pair_sum(m, "rx_bad_chains") + pair_sum(m, "tx_bad_chains"),
        tap_tx: tap.stat("tx_packets"),
        tap_rx: tap.stat("rx_packets"),
        tap_tx_dropped: tap.stat("tx_dropped"),
        tap_rx_dropped: tap.stat("rx_dropped"),
    }
}

#[test]
#[ignore = "soak: minutes of load; run by `make test-soak`"]
fn thousand_vq_pairs_set_changes_under_bidirectional_load() {
    if !skip::require_kvm_env()
        || !skip::require_guest_images()
        || !skip::require_binary("mqvmm")
        || !skip::require_binary("mqvmm-launch")
    {
        return;
    }
    rig::in_kvm_env(
        "thousand_vq_pairs_set_changes_under_bidirectional_load",
        soak_once,
    );
}

fn soak_once() {
    let n_changes = changes();
    let tap = HostTap::new("mqsoak0");
    let _servers = IperfServers::start(CPUS);
    let mut console = start_guest(&tap);
    let pid = console.pid();
    console.check(&format!("ethtool -L eth0 combined {PAIRS}"), STEP);
    console.check(&format!("ping -c 2 -W 5 {HOST_IP}"), STEP);
    // Warm up every pair once so the baselines include the steady-state allocations.
    traffic(&mut console, 2);
    let fds_before = fds(pid);
    let (rss_before, guest_rss_before) = rss_kib(pid);
    let acct_before = accounting(&mut console, &tap);
    let m_before = metrics(&mut console);

    // Load: one bidirectional client per vCPU, for longer than the soak lasts.
    console.check(
                &format!(
                    "for i in $(seq 0 {last}); do taskset -c $i iperf3 -c {HOST_IP} -p $((5201+i)) --bidir -t 3600 > /tmp/soak$i.log 2>&1 & done; sleep 3",
                    last = CPUS - 1
                ),
                STEP,
            );
    let started = Instant::now();
    let out = console.check(
                &format!(
                    "c=0; fail=0; while [ $c -lt {n_changes} ]; do for n in {CIRCUIT}; do [ $c -ge {n_changes} ] && break; \
                     ethtool -L eth0 combined $n > /dev/null 2>&1 || fail=$((fail+1)); c=$((c+1)); done; done; \
                     echo SOAK changes=$c failures=$fail running=$(pidof iperf3 | wc -w)"
                ),
                Duration::from_secs(1500),
            );
    let elapsed = started.elapsed();
    let summary = out
        .lines()
        .find(|l| l.starts_with("SOAK "))
        .unwrap_or_else(|| panic!("no summary:\n{out}"))
        .to_string();
    // Stop the clients (SIGINT: they print their totals) and collect what they moved.
    let totals = console.check(
        "killall -INT iperf3; sleep 3; grep -h -E 'sender|receiver' /tmp/soak*.log",
        STEP,
    );
    assert!(
        summary.contains(&format!("changes={n_changes} failures=0 ")),
        "ethtool -L failed during the soak: {summary}\n{}",
        console.transcript()
    );
    assert!(
        summary.ends_with(&format!("running={CPUS}")),
        "an iperf3 client died during the soak: {summary}\n{totals}"
    );
    let m_after = metrics(&mut console);
    let set =
        field(&m_after, "device", "vq_pairs_set") - field(&m_before, "device", "vq_pairs_set");
    let errors = field(&m_after, "device", "vq_pairs_set_errors");
    let rollback_failures = field(&m_after, "device", "rollback_failures");
    let moved = |key: &str| pair_sum(&m_after, key) - pair_sum(&m_before, key);
    let (soak_rx, soak_tx) = (moved("rx_packets"), moved("tx_packets"));
    let transport = if soak_over_pci() {
        "virtio-pci"
    } else {
        "virtio-mmio"
    };
    println!(
        "soak ({transport}): {n_changes} changes in {:.1} s = {:.1} changes/s under load; device saw {set} VQ_PAIRS_SET, {errors} ERR, {rollback_failures} rollback failures; frames during the soak: host->guest {soak_rx}, guest->host {soak_tx}",
        elapsed.as_secs_f64(),
        f64::from(n_changes) / elapsed.as_secs_f64()
    );
    assert_eq!(
        set,
        u64::from(n_changes),
        "VQ_PAIRS_SET commands seen by mqvmm"
    );
    assert_eq!(errors, 0);
    assert_eq!(rollback_failures, 0);
    assert!(
        soak_rx > 0 && soak_tx > 0,
        "no traffic moved during the soak:\n{totals}"
    );
    assert!(
        !console.transcript().contains("timed out"),
        "a guest transmit queue timed out:\n{}",
        console.transcript()
    );

    // No stuck queue, at every pair and with some disabled.
    check_queues_at(&mut console, &tap, PAIRS);
    check_queues_at(&mut console, &tap, 2);
    console.check(&format!("ethtool -L eth0 combined {PAIRS}"), STEP);

    // Frame accounting over everything since the baseline.
    let a = accounting(&mut console, &tap);
    let b = acct_before;
    let d = |x: u64, y: u64| x as i64 - y as i64;
    let guest_tx = d(a.guest_tx, b.guest_tx);
    let dev_tx = d(a.dev_tx, b.dev_tx);
    let dev_tx_drops = d(a.dev_tx_drops, b.dev_tx_drops);
    let bad = d(a.dev_bad_chains, b.dev_bad_chains);
    let tap_rx = d(a.tap_rx, b.tap_rx);
    let tap_tx = d(a.tap_tx, b.tap_tx);
    let dev_rx = d(a.dev_rx, b.dev_rx);
    let dev_rx_drops = d(a.dev_rx_drops, b.dev_rx_drops);
    let dev_rx_filtered = d(a.dev_rx_filtered, b.dev_rx_filtered);
    let guest_rx = d(a.guest_rx, b.guest_rx);
    // Guest -> host: every chain the driver got back was written to the tap or
    // dropped by a parked pair (its queue purged by VQ_PAIRS_SET); every frame written
    // reached the host.
    let tx_unaccounted = guest_tx - (dev_tx + dev_tx_drops + bad);
    let tx_lost_to_host = dev_tx - tap_rx;
    // Host -> guest: every frame mqvmm read from the tap reached the guest driver or was
    // counted as too big or as filtered (not for the guest); frames the kernel purged from a
    // detached queue are never read and never counted by the tap.
    let rx_lost_in_device = tap_tx - (dev_rx + dev_rx_drops + dev_rx_filtered);
    let rx_lost_to_guest = dev_rx - guest_rx;
    let lost = tx_unaccounted.abs()
        + tx_lost_to_host.abs()
        + rx_lost_in_device.abs()
        + rx_lost_to_guest.abs();
    println!(
                "frames: guest->host: guest driver {guest_tx} completed, mqvmm wrote {dev_tx}, dropped on parked pairs {dev_tx_drops}, malformed {bad}, host tap received {tap_rx} (kernel rx_dropped {}); \
                 host->guest: mqvmm read {tap_tx} from the tap (kernel tx_dropped {} on full queues), delivered {dev_rx}, too big {dev_rx_drops}, filtered {dev_rx_filtered}, guest driver received {guest_rx}; \
                 lost outside the purged queues: {lost} (tx unaccounted {tx_unaccounted}, tx not received by the host {tx_lost_to_host}, rx lost in mqvmm {rx_lost_in_device}, rx not received by the guest {rx_lost_to_guest})",
                d(a.tap_rx_dropped, b.tap_rx_dropped),
                d(a.tap_tx_dropped, b.tap_tx_dropped),
            );
    if lost != 0 {
        let m = metrics(&mut console);
        let g = guest_stats(&mut console);
        for p in 0..PAIRS {
            println!(
                        "debug: pair{p}: device rx {} tx {} tx_drops {} rx_drops {} | guest rx {} tx {} | guest all: {:?}",
                        field(&m, &format!("pair{p}"), "rx_packets"),
                        field(&m, &format!("pair{p}"), "tx_packets"),
                        field(&m, &format!("pair{p}"), "tx_drops"),
                        field(&m, &format!("pair{p}"), "rx_drops"),
                        guest_queue(&g, "rx", p),
                        guest_queue(&g, "tx", p),
                        g.iter().filter(|(k, _)| k.contains(&format!("_{p}_"))).collect::<Vec<_>>()
                    );
        }
        println!(
            "debug: {}",
            console.check(
                "cat /sys/class/net/eth0/statistics/rx_*; grep -i virtio /proc/interrupts",
                STEP
            )
        );
    }
    assert_eq!(bad, 0, "malformed chains from a well-behaved driver");
    assert_eq!(lost, 0, "frames lost outside the purged queues");

    let fds_after = fds(pid);
    let (rss_after, guest_rss_after) = rss_kib(pid);
    let own_before = rss_before - guest_rss_before;
    let own_after = rss_after - guest_rss_after;
    println!(
                "resources: fds {} before, {} after; RSS {} KiB before, {} KiB after (guest RAM {} -> {} KiB; mqvmm's own {} -> {} KiB)",
                fds_before.len(),
                fds_after.len(),
                rss_before,
                rss_after,
                guest_rss_before,
                guest_rss_after,
                own_before,
                own_after
            );
    assert_eq!(fds_before, fds_after, "mqvmm's open fds changed");
    assert!(
        own_after <= own_before + 4096,
        "mqvmm's own RSS grew from {own_before} KiB to {own_after} KiB"
    );

    console.send("poweroff\n").expect("type");
    assert_eq!(
        console.wait_exit(Duration::from_secs(60)),
        Some(0),
        "mqvmm did not exit 0:\n{}",
        console.transcript()
    );
}
