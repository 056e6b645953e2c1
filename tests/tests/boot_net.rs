//! The multiqueue network device with a real Linux guest: `ethtool -L` in the guest switches
//! the host tap's queues, traffic flows both ways at every count, and mqvmm runs as uid 65534
//! with no capabilities under mqvmm-launch the whole time. Every scenario runs over
//! both transports (`--transport mmio` and `--transport pci`); over virtio-pci the guest also
//! has a separate MSI-X vector per queue, and with several pairs more than one of them fires.
//! Runs where KVM works (directly, or inside the nested rig's L1, where these tests are root).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqvmm_tests::console::GuestConsole;
use mqvmm_tests::netns::{self, NOBODY};
use mqvmm_tests::rig::{self, GUEST_IP, HOST_IP};
use mqvmm_tests::skip;

const STEP: Duration = Duration::from_secs(60);

fn sh(cmd: &str) {
    let status = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("run sh");
    assert!(status.success(), "`{cmd}` failed: {status}");
}

/// A persistent multiqueue tap with the host's address, removed on drop.
struct HostTap {
    name: String,
}

impl HostTap {
    fn new(name: &str) -> HostTap {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        sh(&format!(
            "ip tuntap add dev {name} mode tap multi_queue vnet_hdr && ip addr add {HOST_IP}/24 dev {name} && ip link set {name} up"
        ));
        HostTap {
            name: name.to_string(),
        }
    }

    /// Attached queues according to netlink (IFLA_TUN_NUM_QUEUES).
    fn attached(&self) -> u32 {
        netns::tun_info(&self.name)
            .unwrap_or_else(|e| panic!("netlink query of {}: {e}", self.name))
            .num_queues
    }

    /// Waits briefly for the attached count to become `n`; returns the last value seen.
    fn wait_attached(&self, n: u32) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.attached();
            if now == n || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// iperf3 server on the host side of the tap, killed on drop.
struct IperfServer(Child);

impl IperfServer {
    fn start() -> IperfServer {
        let child = Command::new("iperf3")
            .args(["-s", "-B", HOST_IP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s");
        std::thread::sleep(Duration::from_millis(500));
        IperfServer(child)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How mqvmm attaches the network device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Mmio,
    Pci,
}

impl Transport {
    fn arg(self) -> &'static str {
        match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        }
    }

    /// The guest probes for PCI only where there is some.
    fn cmdline(self) -> String {
        let base = format!("console=ttyS0 quiet panic=-1 mqvmm.ip={GUEST_IP}/24");
        match self {
            Transport::Mmio => format!("{base} pci=off"),
            Transport::Pci => base,
        }
    }
}

/// Starts mqvmm through mqvmm-launch as `nobody` on `tap` and waits for the guest's shell.
fn start_guest(
    tap: &HostTap,
    queues: u16,
    cpus: u8,
    transport: Transport,
    launch_extra: &[&str],
) -> GuestConsole {
    let images = rig::guest_images();
    let mut cmd = Command::new(rig::bin_path("mqvmm-launch"));
    cmd.args(["--tap", &tap.name, "--queues", &queues.to_string()])
        .args(["--user", "nobody"])
        .args(launch_extra)
        .arg("--")
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--initramfs")
        .arg(&images.initramfs)
        .args(["--cpus", &cpus.to_string(), "--memory", "512"])
        .args(["--transport", transport.arg()])
        .args(["--cmdline", &transport.cmdline()]);
    let mut console = GuestConsole::spawn(cmd).expect("start mqvmm-launch");
    if console
        .wait_for("MQVMM-READY", Duration::from_secs(180))
        .is_none()
    {
        panic!("guest never became ready:\n{}", console.transcript());
    }
    // The shell starts right after the marker; type until it answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        console.send("echo MQSYNC:$((20+22))\n").expect("type");
        if console
            .wait_for("MQSYNC:42", Duration::from_secs(3))
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guest shell does not answer:\n{}",
            console.transcript()
        );
    }
    console
}

/// mqvmm is unprivileged: uid/gid 65534, no capabilities at all.
fn assert_unprivileged(console: &mut GuestConsole) {
    let status = netns::proc_status(console.pid()).expect("mqvmm /proc status");
    assert_eq!(
        status.get("Name").map(String::as_str),
        Some("mqvmm"),
        "the launcher did not exec mqvmm in place"
    );
    assert_eq!(netns::single_id(&status, "Uid"), NOBODY);
    assert_eq!(netns::single_id(&status, "Gid"), NOBODY);
    for key in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(netns::cap_mask(&status, key), 0, "{key} of mqvmm");
    }
}

/// Per-queue interrupt counts from the guest's /proc/interrupts: the virtio lines named
/// `virtioN-input.K` / `virtioN-output.K` (one MSI-X vector each), summed over the CPUs.
fn guest_queue_interrupts(console: &mut GuestConsole) -> BTreeMap<String, u64> {
    let table = console.check("cat /proc/interrupts", STEP);
    let mut lines = table.lines();
    let cpus = lines.next().map_or(0, |h| h.split_whitespace().count());
    lines
        .filter_map(|line| {
            let name = line.split_whitespace().last()?;
            let queue = name.contains("-input.") || name.contains("-output.");
            if !name.starts_with("virtio") || !queue {
                return None;
            }
            let total = line
                .split_whitespace()
                .skip(1)
                .take(cpus)
                .map_while(|f| f.parse::<u64>().ok())
                .sum();
            Some((name.to_string(), total))
        })
        .collect()
}

/// `ethtool -S eth0` rx packet counters per queue.
fn guest_rx_counters(console: &mut GuestConsole) -> BTreeMap<u32, u64> {
    let stats = console.check("ethtool -S eth0", STEP);
    stats
        .lines()
        .filter_map(|l| {
            let (key, value) = l.trim().split_once(':')?;
            let queue = key.strip_prefix("rx_queue_")?.strip_suffix("_packets")?;
            Some((queue.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect()
}

/// The line of device counters mqvmm prints on SIGUSR1.
fn device_metrics_line(console: &mut GuestConsole) -> String {
    let pid = console.pid() as i32;
    // SAFETY: kill only sends a signal to the mqvmm child we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    console
        .wait_for("mqvmm-metrics:", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no metrics line after SIGUSR1:\n{}", console.transcript()))
}

/// mqvmm's own per-pair rx packet counters, from the line SIGUSR1 prints.
fn device_rx_counters(console: &mut GuestConsole) -> Vec<u64> {
    let line = device_metrics_line(console);
    line.split(" | ")
        .filter(|seg| seg.starts_with("pair"))
        .map(|seg| {
            seg.split_whitespace()
                .find_map(|kv| kv.strip_prefix("rx_packets="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no rx_packets in {seg:?}"))
        })
        .collect()
}

fn combined_current(ethtool_l: &str) -> Option<u32> {
    let current = ethtool_l.split("Current hardware settings:").nth(1)?;
    current
        .lines()
        .find_map(|l| l.trim().strip_prefix("Combined:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bits per second from iperf3's receiver summary line.
fn iperf_receiver_rate(output: &str) -> Option<f64> {
    let line = output.lines().rev().find(|l| l.contains("receiver"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let unit_pos = fields.iter().position(|f| f.ends_with("bits/sec"))?;
    let value: f64 = fields.get(unit_pos.checked_sub(1)?)?.parse().ok()?;
    let scale = match fields[unit_pos].chars().next()? {
        'G' => 1e9,
        'M' => 1e6,
        'K' => 1e3,
        _ => 1.0,
    };
    Some(value * scale)
}

fn requirements() -> bool {
    skip::require_kvm_env()
        && skip::require_guest_images()
        && skip::require_binary("mqvmm")
        && skip::require_binary("mqvmm-launch")
}

#[test]
fn ethtool_l_switches_host_tap_queues_with_traffic_at_every_count_mmio() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "ethtool_l_switches_host_tap_queues_with_traffic_at_every_count_mmio",
        || ethtool_l_walk(Transport::Mmio),
    );
}

#[test]
fn ethtool_l_switches_host_tap_queues_with_traffic_at_every_count_pci() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "ethtool_l_switches_host_tap_queues_with_traffic_at_every_count_pci",
        || ethtool_l_walk(Transport::Pci),
    );
}

/// 4 pairs, 4 vCPUs: `ethtool -L` 4 -> 1 -> 3 -> 2 -> 4 -> 1 with the host tap's queue count,
/// ping and iperf3 both ways after each step.
fn ethtool_l_walk(transport: Transport) {
    let tap = HostTap::new("mqnet4");
    let _iperf = IperfServer::start();
    let mut console = start_guest(&tap, 4, 4, transport, &[]);
    assert_unprivileged(&mut console);
    if transport == Transport::Pci {
        // One MSI-X vector per queue: 4 input and 4 output lines of their own.
        let vectors = guest_queue_interrupts(&mut console);
        for k in 0..4 {
            for dir in ["input", "output"] {
                assert!(
                    vectors.keys().any(|n| n.ends_with(&format!("-{dir}.{k}"))),
                    "no interrupt line for {dir} queue {k}: {vectors:?}"
                );
            }
        }
    }

    let l = console.check("ethtool -l eth0", STEP);
    assert!(l.contains("Combined:\t4"), "maximum is not 4 pairs:\n{l}");
    for n in [4u32, 1, 3, 2, 4, 1] {
        let started = Instant::now();
        console.check(&format!("ethtool -L eth0 combined {n}"), STEP);
        let set_time = started.elapsed();
        // The device acks only after the taps are switched: no waiting needed, but
        // netlink is polled briefly anyway so a failure shows the value it settled on.
        let host = tap.wait_attached(n);
        assert_eq!(
            host, n,
            "host tap has {host} attached queues after combined {n}"
        );
        let l = console.check("ethtool -l eth0", STEP);
        assert_eq!(
            combined_current(&l),
            Some(n),
            "ethtool -l in the guest:\n{l}"
        );
        console.check(&format!("ping -c 2 -W 5 {HOST_IP}"), STEP);

        let device_before = device_rx_counters(&mut console);
        let guest_before = guest_rx_counters(&mut console);
        let irqs_before = guest_queue_interrupts(&mut console);
        let up = console.check(&format!("iperf3 -c {HOST_IP} -t 2"), STEP);
        let down = console.check(&format!("iperf3 -c {HOST_IP} -t 2 -R -P 16"), STEP);
        let guest_after = guest_rx_counters(&mut console);
        let device_after = device_rx_counters(&mut console);
        let irqs_after = guest_queue_interrupts(&mut console);
        let busy_vectors: Vec<&String> = irqs_after
            .iter()
            .filter(|(name, after)| **after > irqs_before.get(*name).copied().unwrap_or(0))
            .map(|(name, _)| name)
            .collect();
        // Over PCI each receive queue has its own vector: 16 flows spread over n > 1 pairs must
        // fire more than one of them (over mmio every queue shares one line).
        let busy_rx_vectors = busy_vectors
            .iter()
            .filter(|name| name.contains("-input."))
            .count();
        if transport == Transport::Pci && n > 1 {
            assert!(
                busy_rx_vectors > 1,
                "16 flows at combined {n} fired only the queue vectors {busy_vectors:?}: before {irqs_before:?} after {irqs_after:?}"
            );
        }

        let device_delta: Vec<u64> = device_after
            .iter()
            .zip(&device_before)
            .map(|(a, b)| a - b)
            .collect();
        for (pair, delta) in device_delta.iter().enumerate() {
            if pair as u32 >= n {
                assert_eq!(
                    *delta, 0,
                    "disabled rx queue {pair} received {delta} frames at combined {n}"
                );
            }
        }
        let busy_guest_queues = guest_after
            .iter()
            .filter(|(q, after)| **after > guest_before.get(q).copied().unwrap_or(0))
            .count();
        if n > 1 {
            assert!(
                busy_guest_queues >= 2,
                "16 flows used only {busy_guest_queues} rx queue(s) at combined {n}: before {guest_before:?} after {guest_after:?}"
            );
        }
        let up_rate = iperf_receiver_rate(&up).unwrap_or(0.0);
        let down_rate = iperf_receiver_rate(&down).unwrap_or(0.0);
        assert!(up_rate > 0.0 && down_rate > 0.0, "iperf3:\n{up}\n{down}");
        rig::note(&format!(
            "timing: {}: combined {n}: ethtool -L {:.2} s, host attached {host}, guest->host {:.0} Mbit/s, host->guest (16 flows) {:.0} Mbit/s, device rx per pair {device_delta:?}, guest rx queues used {busy_guest_queues}, queue vectors fired {} ({busy_rx_vectors} rx)",
            transport.arg(),
            set_time.as_secs_f64(),
            up_rate / 1e6,
            down_rate / 1e6,
            busy_vectors.len()
        ));
        assert_unprivileged(&mut console);
    }
    console.send("poweroff\n").expect("type");
    let code = console.wait_exit(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "mqvmm did not exit 0:\n{}",
        console.transcript()
    );
}

#[test]
fn mq_off_keeps_the_guest_on_one_pair_mmio() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env("mq_off_keeps_the_guest_on_one_pair_mmio", || {
        mq_off(Transport::Mmio)
    });
}

#[test]
fn mq_off_keeps_the_guest_on_one_pair_pci() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env("mq_off_keeps_the_guest_on_one_pair_pci", || {
        mq_off(Transport::Pci)
    });
}

fn mq_off(transport: Transport) {
    let tap = HostTap::new("mqnet1");
    let mut console = start_guest(&tap, 2, 2, transport, &["--no-mq"]);
    assert_unprivileged(&mut console);
    assert_eq!(tap.wait_attached(1), 1, "host queues with mq=off");
    let set = console
        .run("ethtool -L eth0 combined 2", STEP)
        .expect("run ethtool");
    assert_ne!(
        set.status, 0,
        "ethtool -L combined 2 succeeded without MQ:\n{}",
        set.output
    );
    assert_eq!(tap.attached(), 1, "host queues after the refused change");
    console.check(&format!("ping -c 2 -W 5 {HOST_IP}"), STEP);
    console.send("poweroff\n").expect("type");
    assert_eq!(console.wait_exit(Duration::from_secs(60)), Some(0));
}

#[test]
fn the_guest_sees_speed_duplex_ecn_offloads_and_its_receive_filter_pci() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "the_guest_sees_speed_duplex_ecn_offloads_and_its_receive_filter_pci",
        nic_features,
    );
}

/// Ethernet frames to an address that is not the guest's, on an experimental ethertype.
fn foreign_frames(count: u8) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut f = vec![0x02, 0x00, 0x5e, 0x10, 0x20, i];
            f.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
            f.extend_from_slice(&[0x88, 0xb5]);
            f.extend_from_slice(&[0xab; 64]);
            f
        })
        .collect()
}

/// The guest's rx_packets counter of eth0.
fn guest_rx_packets(console: &mut GuestConsole) -> u64 {
    console
        .check("cat /sys/class/net/eth0/statistics/rx_packets", STEP)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("rx_packets: {e}"))
}

/// mqvmm's count of frames its receive filter kept from the guest (all pairs).
fn device_rx_filtered(console: &mut GuestConsole) -> u64 {
    device_metrics_line(console)
        .split_whitespace()
        .filter_map(|kv| kv.strip_prefix("rx_filtered="))
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum()
}

/// 2 pairs over virtio-pci, launched with `--speed 25000 --duplex half`: `ethtool eth0` shows
/// them, `ethtool -k` shows ECN segmentation, and with the interface not promiscuous a
/// burst of frames to a foreign MAC does not reach the guest (mqvmm counts them as
/// filtered) while after `ip link set eth0 promisc on` the same burst does. `ethtool -G`
/// resizes the rings one queue at a time (VIRTIO_F_RING_RESET) under iperf3. Then
/// `ethtool -C` sets notification coalescing, `ethtool -c` shows it, and iperf3 both ways
/// before and after gives throughput and mqvmm's interrupts per MB.
fn nic_features() {
    let tap = HostTap::new("mqnic0");
    let mut console = start_guest(
        &tap,
        2,
        2,
        Transport::Pci,
        &["--speed", "25000", "--duplex", "half"],
    );
    let settings = console.check("ethtool eth0", STEP);
    assert!(
        settings.contains("Speed: 25000Mb/s") && settings.contains("Duplex: Half"),
        "ethtool eth0:\n{settings}"
    );
    let features = console.check("ethtool -k eth0", STEP);
    assert!(
        features.contains("tx-tcp-ecn-segmentation: on"),
        "ethtool -k eth0:\n{features}"
    );
    // USO needs a 6.2+ guest and host kernel; note what this one shows.
    let uso = features
        .lines()
        .find(|l| l.contains("tx-udp-segmentation"))
        .unwrap_or("tx-udp-segmentation: (absent)")
        .trim()
        .to_string();

    let sender = netns::PacketSocket::bind(&tap.name).expect("packet socket on the tap");
    let burst = foreign_frames(50);
    let delivered = |console: &mut GuestConsole| {
        let before = (guest_rx_packets(console), device_rx_filtered(console));
        for f in &burst {
            sender.send(f).expect("send a frame into the tap");
        }
        std::thread::sleep(Duration::from_secs(2));
        let after = (guest_rx_packets(console), device_rx_filtered(console));
        (after.0 - before.0, after.1 - before.1)
    };
    let (arrived, filtered) = delivered(&mut console);
    assert!(
        arrived < 10 && filtered >= 50,
        "promisc off: {arrived} frames reached the guest, mqvmm filtered {filtered}"
    );
    console.check("ip link set eth0 promisc on", STEP);
    let (arrived_promisc, filtered_promisc) = delivered(&mut console);
    assert!(
        arrived_promisc >= 50 && filtered_promisc == 0,
        "promisc on: {arrived_promisc} frames reached the guest, mqvmm filtered {filtered_promisc}"
    );
    rig::note(&format!(
        "timing: nic features: ethtool eth0 25000Mb/s half, ECN segmentation on, {uso}; 50 foreign frames: {arrived} reached the guest / {filtered} filtered with promisc off, {arrived_promisc} / {filtered_promisc} with promisc on"
    ));

    // Ring resize (VIRTIO_F_RING_RESET): ethtool -G resets and re-creates each queue while
    // the others carry traffic; the new size shows and traffic flows on.
    let _iperf = IperfServer::start();
    let rings = console.check("ethtool -g eth0", STEP);
    assert!(
        rings.contains("RX:\t\t256") || rings.contains("RX: 256"),
        "ethtool -g eth0:\n{rings}"
    );
    console.check(
        &format!("iperf3 -c {HOST_IP} -P 2 -t 6 > /tmp/during-resize.txt 2>&1 & sleep 2"),
        STEP,
    );
    let resize = Instant::now();
    console.check("ethtool -G eth0 rx 128 tx 128", STEP);
    let resize_s = resize.elapsed().as_secs_f64();
    let resized = console.check("ethtool -g eth0", STEP);
    let current = resized
        .split("Current hardware settings:")
        .nth(1)
        .unwrap_or_else(|| panic!("ethtool -g eth0:\n{resized}"));
    assert!(
        current.contains("128") && !current.contains("256"),
        "ethtool -g eth0 after -G:\n{resized}"
    );
    console.check("wait", STEP);
    let during = console.check("cat /tmp/during-resize.txt", STEP);
    let during_rate = iperf_receiver_rate(&during).unwrap_or(0.0);
    assert!(during_rate > 0.0, "iperf3 across the resize:\n{during}");
    console.check(&format!("ping -c 2 -W 5 {HOST_IP}"), STEP);
    rig::note(&format!(
        "timing: ethtool -G eth0 rx 128 tx 128 took {resize_s:.2} s under iperf3; iperf3 across it {:.0} Mbit/s",
        during_rate / 1e6
    ));

    // Notification coalescing: ethtool -C takes effect (ethtool -c shows it), traffic still
    // flows, and interrupts per MB drop.
    let plain = iperf_interrupts(&mut console);
    console.check(
        "ethtool -C eth0 rx-usecs 200 rx-frames 64 tx-usecs 200 tx-frames 64",
        STEP,
    );
    let shown = console.check("ethtool -c eth0", STEP);
    for line in [
        "rx-usecs: 200",
        "rx-frames: 64",
        "tx-usecs: 200",
        "tx-frames: 64",
    ] {
        assert!(
            shown.contains(line),
            "ethtool -c eth0 lacks {line:?}:\n{shown}"
        );
    }
    let coalesced = iperf_interrupts(&mut console);
    rig::note(&format!(
        "timing: coalescing: guest->host {:.0} Mbit/s at {:.1} interrupts/MB without, {:.0} Mbit/s at {:.1} with rx/tx-usecs 200, frames 64; host->guest {:.0} Mbit/s at {:.1} without, {:.0} Mbit/s at {:.1} with",
        plain.up_mbps, plain.up_irq_per_mb, coalesced.up_mbps, coalesced.up_irq_per_mb,
        plain.down_mbps, plain.down_irq_per_mb, coalesced.down_mbps, coalesced.down_irq_per_mb
    ));
    assert!(coalesced.up_mbps > 0.0 && coalesced.down_mbps > 0.0);
    // What the guest sees of rx-usecs, deterministically: a ping's reply waits for the
    // held interrupt (the packet limit is never reached), then no longer once it is off.
    console.check("ethtool -C eth0 rx-usecs 100000 rx-frames 1000", STEP);
    // A held notification goes out when its time is up, and every frame that arrived on the
    // queue meanwhile goes with it: a stray frame from the host (IPv6 neighbour or multicast
    // traffic) shortly before a reply cuts that reply's wait. So the better of two rounds of
    // three pings counts (seen once in about five runs: an average of 74 ms).
    let held = ping_avg_ms(&mut console).max(ping_avg_ms(&mut console));
    console.check("ethtool -C eth0 rx-usecs 0 rx-frames 0", STEP);
    let prompt = ping_avg_ms(&mut console);
    rig::note(&format!(
        "timing: ping round trip {held:.1} ms with rx-usecs 100000, {prompt:.1} ms with coalescing off"
    ));
    assert!(
        held >= 90.0 && prompt < 50.0,
        "ping with rx-usecs 100000: {held} ms, without: {prompt} ms"
    );
    console.send("poweroff\n").expect("type");
    assert_eq!(console.wait_exit(Duration::from_secs(60)), Some(0));
}

/// iperf3 both ways over the current settings, with mqvmm's interrupt counts per MB moved.
struct IrqRun {
    up_mbps: f64,
    up_irq_per_mb: f64,
    down_mbps: f64,
    down_irq_per_mb: f64,
}

/// Sum of one counter over every pair in the SIGUSR1 line, e.g. `tx_interrupts`.
fn device_total(line: &str, key: &str) -> u64 {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .filter_map(|kv| kv.strip_prefix(prefix.as_str()))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

fn iperf_interrupts(console: &mut GuestConsole) -> IrqRun {
    let one_way = |console: &mut GuestConsole, reverse: bool| {
        let (irq_key, bytes_key) = if reverse {
            ("rx_interrupts", "rx_bytes")
        } else {
            ("tx_interrupts", "tx_bytes")
        };
        let before = device_metrics_line(console);
        let flag = if reverse { "-R " } else { "" };
        let out = console.check(&format!("iperf3 -c {HOST_IP} {flag}-P 2 -t 3"), STEP);
        let after = device_metrics_line(console);
        let irqs = device_total(&after, irq_key) - device_total(&before, irq_key);
        let bytes = device_total(&after, bytes_key) - device_total(&before, bytes_key);
        let mbps = iperf_receiver_rate(&out).unwrap_or(0.0) / 1e6;
        (mbps, irqs as f64 / (bytes as f64 / 1e6).max(1e-9))
    };
    let (up_mbps, up_irq_per_mb) = one_way(console, false);
    let (down_mbps, down_irq_per_mb) = one_way(console, true);
    IrqRun {
        up_mbps,
        up_irq_per_mb,
        down_mbps,
        down_irq_per_mb,
    }
}

/// The average round trip of 3 pings to the host, in ms (busybox: `min/avg/max = a/b/c ms`).
fn ping_avg_ms(console: &mut GuestConsole) -> f64 {
    let out = console.check(&format!("ping -c 3 -i 0.3 -W 5 {HOST_IP}"), STEP);
    out.lines()
        .find_map(|l| l.split("min/avg/max").nth(1))
        .and_then(|rest| rest.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|avg| avg.trim().parse().ok())
        .unwrap_or_else(|| panic!("no round-trip line in:\n{out}"))
}

#[test]
fn an_operator_sets_the_link_reads_counters_and_stops_mqvmm_over_the_api_socket_pci() {
    if !requirements() || !skip::require_binary("mqvmm-ctl") {
        return;
    }
    rig::in_kvm_env(
        "an_operator_sets_the_link_reads_counters_and_stops_mqvmm_over_the_api_socket_pci",
        api_socket,
    );
}

/// `mqvmm-ctl --api-socket SOCKET ARGS...`: its exit status and the JSON it printed.
fn ctl(socket: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(rig::bin_path("mqvmm-ctl"))
        .args(["--api-socket", socket])
        .args(args)
        .output()
        .expect("run mqvmm-ctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "mqvmm-ctl {args:?} printed no JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), reply)
}

/// `mqvmm-ctl ARGS...` must succeed; its reply.
fn ctl_ok(socket: &str, args: &[&str]) -> serde_json::Value {
    let (code, reply) = ctl(socket, args);
    assert_eq!((code, &reply["ok"]), (0, &true.into()), "{args:?}: {reply}");
    reply
}

/// The guest's eth0 carrier (`/sys/class/net/eth0/carrier`) once it is `want`, or what it
/// still is after 10 s.
fn guest_carrier(console: &mut GuestConsole, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let carrier = console
            .check("cat /sys/class/net/eth0/carrier", STEP)
            .trim()
            .to_string();
        if carrier == want || Instant::now() > deadline {
            return carrier;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (rx_packets, tx_packets) of the guest's eth0.
fn guest_packets(console: &mut GuestConsole) -> (u64, u64) {
    let out = console.check(
        "cat /sys/class/net/eth0/statistics/rx_packets /sys/class/net/eth0/statistics/tx_packets",
        STEP,
    );
    let numbers: Vec<u64> = out
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match numbers[..] {
        [rx, tx] => (rx, tx),
        _ => panic!("guest statistics: {out:?}"),
    }
}

/// The device's (rx, tx) packets over all pairs in a `counters` reply.
fn device_packets(reply: &serde_json::Value) -> (u64, u64) {
    let pairs = reply["counters"]["pairs"]
        .as_array()
        .unwrap_or_else(|| panic!("no pairs in {reply}"));
    let sum = |dir: &str| {
        pairs
            .iter()
            .map(|p| p[dir]["packets"].as_u64().expect("a packet counter"))
            .sum()
    };
    (sum("rx"), sum("tx"))
}

/// 2 pairs over virtio-pci, launched with `--api-socket`: `queues` agrees with the host
/// tap's attached count; `mqvmm-ctl link down` gives the guest NO-CARRIER and stops its
/// traffic, `link up` brings the carrier and the traffic back; the device's packet counters
/// from `counters` match the guest's own eth0 statistics; a bad request gets an error and
/// changes nothing; `shutdown` ends mqvmm with exit status 0 and removes the socket.
fn api_socket() {
    let tap = HostTap::new("mqapi0");
    let dir = "/run/mqvmm-api-boot";
    let _ = std::fs::remove_dir_all(dir);
    let socket = format!("{dir}/api.sock");
    let started = Instant::now();
    let mut console = start_guest(&tap, 2, 2, Transport::Pci, &["--api-socket", &socket]);
    assert_unprivileged(&mut console);

    let queues = ctl_ok(&socket, &["queues"]);
    let host = tap.attached();
    assert_eq!(queues["queues"]["max_pairs"], 2, "{queues}");
    assert_eq!(
        queues["queues"]["host_attached_queues"],
        u64::from(host),
        "queues reply against netlink's {host}: {queues}"
    );
    assert_eq!(
        queues["queues"]["attached_pairs"],
        u64::from(host),
        "{queues}"
    );
    console.check(&format!("ping -c 2 -W 5 {HOST_IP}"), STEP);

    let reply = ctl_ok(&socket, &["link", "down"]);
    assert_eq!(reply["link"]["up"], false, "{reply}");
    let carrier = guest_carrier(&mut console, "0");
    assert_eq!(carrier, "0", "guest carrier after link down");
    let link = console.check("ip link show eth0", STEP);
    assert!(link.contains("NO-CARRIER"), "ip link show eth0:\n{link}");
    let ping = console
        .run(&format!("ping -c 1 -W 2 {HOST_IP}"), STEP)
        .expect("run ping");
    assert_ne!(ping.status, 0, "ping with the link down:\n{}", ping.output);
    let counters = ctl_ok(&socket, &["counters"]);
    assert_eq!(counters["counters"]["link_up"], false, "{counters}");

    ctl_ok(&socket, &["link", "up"]);
    let carrier = guest_carrier(&mut console, "1");
    assert_eq!(carrier, "1", "guest carrier after link up");
    // The guest's neighbour entry and route come back with the carrier: give it a few tries.
    console.check(
        &format!("for i in 1 2 3 4 5; do ping -c 1 -W 2 {HOST_IP} && break; done; ping -c 10 -i 0.2 -W 2 {HOST_IP}"),
        STEP,
    );

    std::thread::sleep(Duration::from_secs(1));
    let guest_before = guest_packets(&mut console);
    let counters = ctl_ok(&socket, &["counters"]);
    let guest_after = guest_packets(&mut console);
    let device = device_packets(&counters);
    // The guest counts a received frame after the device used its buffer, and a sent one
    // once the device returned it: the device's counts lie between two reads of the guest's,
    // give or take a frame in flight.
    const SLACK: u64 = 2;
    for (what, dev, before, after) in [
        ("rx", device.0, guest_before.0, guest_after.0),
        ("tx", device.1, guest_before.1, guest_after.1),
    ] {
        assert!(
            dev + SLACK >= before && dev <= after + SLACK,
            "device {what} packets {dev}, guest {before}..{after}: {counters}"
        );
    }
    assert!(device.1 >= 10, "the pings are not in tx: {counters}");

    let mut conn = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let bad = vmm::api::client::call_raw(
        &mut conn,
        b"{\"command\":\"link\",\"up\":\"maybe\"}\n",
        Duration::from_secs(10),
    )
    .expect("a reply to a bad request");
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("invalid request"),
        "{bad}"
    );
    assert_eq!(
        guest_carrier(&mut console, "1"),
        "1",
        "a bad request changed the link"
    );

    let reply = ctl_ok(&socket, &["shutdown"]);
    assert_eq!(reply["shutdown"]["exit_code"], 0, "{reply}");
    let code = console.wait_exit(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "mqvmm did not exit 0 after shutdown:\n{}",
        console.transcript()
    );
    assert!(
        !std::path::Path::new(&socket).exists(),
        "the API socket outlived mqvmm"
    );
    let _ = std::fs::remove_dir_all(dir);
    rig::note(&format!(
        "timing: api socket: host attached {host}, link down -> NO-CARRIER, link up -> ping ok, device rx/tx {device:?} vs guest {guest_before:?}..{guest_after:?}, shutdown exit 0, {:.1} s in all",
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn ethtool_l_loses_no_datagram_with_steering_and_some_without_pci() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "ethtool_l_loses_no_datagram_with_steering_and_some_without_pci",
        lossless_shrink,
    );
}

/// `(lost, total)` from the receiver summary of an iperf3 UDP client: the `[SUM]` line with
/// `-P` > 1, else the only receiver line.
fn iperf_udp_loss(output: &str) -> Option<(u64, u64)> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("receiver") && l.contains('/'))?;
    line.split_whitespace().find_map(|f| {
        let (lost, total) = f.split_once('/')?;
        Some((lost.parse().ok()?, total.parse().ok()?))
    })
}

/// UDP datagrams the guest's sockets dropped for want of buffer space (`/proc/net/snmp`
/// `Udp: ... RcvbufErrors`): loss that is the guest's own, not the device's.
fn guest_udp_rcvbuf_errors(console: &mut GuestConsole) -> u64 {
    let snmp = console.check("grep '^Udp:' /proc/net/snmp", STEP);
    let mut lines = snmp.lines();
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no RcvbufErrors in:\n{snmp}"))
}

/// One run: 4 UDP flows host -> guest (iperf3, sequence-numbered datagrams) while the guest
/// switches `ethtool -L` 4 -> 1 -> 4 at least 20 times. Returns (lost, total, cycles).
fn udp_through_shrinks(tap: &HostTap, launch_extra: &[&str]) -> (u64, u64, u32) {
    let mut console = start_guest(tap, 4, 2, Transport::Pci, launch_extra);
    assert_unprivileged(&mut console);
    console.check("ethtool -L eth0 combined 4 && iperf3 -s -D", STEP);
    console.check(&format!("ping -c 1 -W 5 {HOST_IP}"), STEP);
    let rcvbuf_before = guest_udp_rcvbuf_errors(&mut console);
    // 4 streams of 1 Mbit/s, 1000-byte datagrams: 500 datagrams/s, well within what the rig's
    // guest takes, so that any loss is the switches'.
    let client = Command::new("iperf3")
        .args([
            "-c", GUEST_IP, "-u", "-b", "1M", "-l", "1000", "-P", "4", "-t", "75",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start iperf3 -c");
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let out = console.check(
        "c=0; end=$(($(date +%s) + 30)); \
         while [ $c -lt 20 ] || [ $(date +%s) -lt $end ]; do \
           ethtool -L eth0 combined 1 && sleep 0.3 && ethtool -L eth0 combined 4 && sleep 0.3 || break; \
           c=$((c+1)); \
         done; echo CYCLES=$c",
        Duration::from_secs(240),
    );
    let cycles_took = started.elapsed();
    let cycles: u32 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("CYCLES="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cycle count:\n{out}"));
    let result = client.wait_with_output().expect("iperf3 -c");
    let report = String::from_utf8_lossy(&result.stdout).into_owned();
    assert!(
        result.status.success(),
        "iperf3 -c failed:\n{report}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    // With steering every cycle must have run under traffic; the run without is a contrast
    // only (its switches have been seen to take twice as long in the rig), so it reports.
    let under_traffic = cycles_took < Duration::from_secs(71);
    assert!(
        under_traffic || launch_extra.contains(&"--no-steering"),
        "the {cycles} cycles took {cycles_took:?}, longer than the traffic ran"
    );
    let (lost, total) =
        iperf_udp_loss(&report).unwrap_or_else(|| panic!("no UDP receiver summary:\n{report}"));
    let rcvbuf = guest_udp_rcvbuf_errors(&mut console) - rcvbuf_before;
    let line = device_metrics_line(&mut console);
    rig::note(&format!(
        "timing: steering {}: {cycles} cycles of ethtool -L 4 -> 1 -> 4 in {:.1} s under 4 UDP flows: \
         {lost} of {total} datagrams lost (guest socket buffer drops {rcvbuf}); device: {}",
        if launch_extra.contains(&"--no-steering") {
            "off"
        } else {
            "on"
        },
        cycles_took.as_secs_f64(),
        line.split(" | ").next().unwrap_or("")
    ));
    assert_eq!(
        rcvbuf, 0,
        "the guest's own sockets dropped datagrams: the load is too high for this test to tell"
    );
    console.send("poweroff\n").expect("type");
    assert_eq!(console.wait_exit(Duration::from_secs(60)), Some(0));
    (lost, total, cycles)
}

/// With the launcher's steering program, every VQ_PAIRS_SET shrink steers flows away from
/// the pairs it disables and drains their tap queues first: not one datagram is lost. The
/// same run without steering (`--no-steering`) shows what the kernel purges on detach; its
/// loss is reported, not asserted (it depends on where the flows happened to be).
fn lossless_shrink() {
    let tap = HostTap::new("mqsteer0");
    let (lost, total, cycles) = udp_through_shrinks(&tap, &[]);
    assert!(cycles >= 20, "only {cycles} cycles");
    assert!(total > 20_000, "only {total} datagrams sent");
    assert_eq!(lost, 0, "{lost} of {total} datagrams lost with steering");
    drop(tap);
    let tap = HostTap::new("mqsteer1");
    let (lost_off, total_off, cycles_off) = udp_through_shrinks(&tap, &["--no-steering"]);
    rig::note(&format!(
        "timing: steering contrast: on {lost}/{total} lost over {cycles} cycles; off {lost_off}/{total_off} over {cycles_off}"
    ));
}

#[test]
fn ethtool_x_and_n_move_flows_between_queues_pci() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "ethtool_x_and_n_move_flows_between_queues_pci",
        rss_moves_flows,
    );
}

/// Frames per guest receive queue while 16 UDP flows run host -> guest for 3 s.
fn rx_per_queue_under_flows(console: &mut GuestConsole) -> Vec<u64> {
    let before = guest_rx_counters(console);
    let out = Command::new("iperf3")
        .args([
            "-c", GUEST_IP, "-u", "-b", "200K", "-l", "1000", "-P", "16", "-t", "3",
        ])
        .output()
        .expect("iperf3 -c");
    assert!(
        out.status.success(),
        "iperf3 -c:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = guest_rx_counters(console);
    after
        .iter()
        .map(|(q, a)| a - before.get(q).copied().unwrap_or(0))
        .collect()
}

/// Queues that took a real share (≥ 100 datagrams) of the flows.
fn busy(deltas: &[u64]) -> Vec<usize> {
    (0..deltas.len()).filter(|&q| deltas[q] >= 100).collect()
}

/// RSS over virtio-pci, 4 pairs: `ethtool -x` shows the table the device took; `ethtool -X
/// weight 1 0 1 0` leaves queues 1 and 3 without a frame, `equal 2` uses 0 and 1 only;
/// `ethtool -N rx-flow-hash udp4 sd` puts every UDP flow between the two hosts on one queue
/// (ports no longer hashed), `sdfn` spreads them again.
fn rss_moves_flows() {
    let tap = HostTap::new("mqrss0");
    let mut console = start_guest(&tap, 4, 2, Transport::Pci, &[]);
    assert_unprivileged(&mut console);
    console.check("ethtool -L eth0 combined 4 && iperf3 -s -D", STEP);
    console.check(&format!("ping -c 1 -W 5 {HOST_IP}"), STEP);
    let x = console.check("ethtool -x eth0", STEP);
    assert!(
        x.contains("indirection table") && x.contains("RSS hash key"),
        "ethtool -x:\n{x}"
    );

    console.check("ethtool -X eth0 weight 1 0 1 0", STEP);
    let d = rx_per_queue_under_flows(&mut console);
    assert_eq!((d[1], d[3]), (0, 0), "weight 1 0 1 0: per-queue rx {d:?}");
    assert!(d[0] + d[2] >= 1000, "weight 1 0 1 0: per-queue rx {d:?}");
    rig::note(&format!(
        "timing: rss: weight 1 0 1 0: guest rx per queue {d:?}"
    ));

    console.check("ethtool -X eth0 equal 2", STEP);
    let d = rx_per_queue_under_flows(&mut console);
    assert_eq!((d[2], d[3]), (0, 0), "equal 2: per-queue rx {d:?}");
    assert_eq!(
        busy(&d),
        [0, 1],
        "equal 2: 16 flows over queues 0 and 1: {d:?}"
    );
    rig::note(&format!("timing: rss: equal 2: guest rx per queue {d:?}"));

    console.check("ethtool -X eth0 equal 4 && ethtool -K eth0 rxhash on", STEP);
    console.check("ethtool -N eth0 rx-flow-hash udp4 sd", STEP);
    let d = rx_per_queue_under_flows(&mut console);
    assert_eq!(
        busy(&d).len(),
        1,
        "udp4 sd: one source and destination address, one queue: {d:?}"
    );
    rig::note(&format!("timing: rss: udp4 sd: guest rx per queue {d:?}"));
    console.check("ethtool -N eth0 rx-flow-hash udp4 sdfn", STEP);
    let d = rx_per_queue_under_flows(&mut console);
    assert!(busy(&d).len() >= 2, "udp4 sdfn: 16 flows by port: {d:?}");
    rig::note(&format!("timing: rss: udp4 sdfn: guest rx per queue {d:?}"));

    let line = device_metrics_line(&mut console);
    assert!(line.contains("rss_config_errors=0"), "{line}");
    console.send("poweroff\n").expect("type");
    assert_eq!(console.wait_exit(Duration::from_secs(60)), Some(0));
}
