//! The multiqueue virtio-net device over a real 4-queue tap, driven through the virtio-mmio
//! registers by the in-process driver model (`mqvmm_tests::driver`), in a process that dropped
//! to uid/gid 65534 with no capabilities before the device existed. No KVM.
//!
//! Each test runs in a network namespace of its own (`netns::run_in_netns`). As root it creates
//! the tap (owned by root), gives it 10.88.0.1/24 with IPv6 off (no stray frames) and brings it
//! up; then it forks. The child drops every privilege, adopts the four queue fds the way mqvmm
//! does, creates the device and drives it: VQ_PAIRS_SET 4 -> 1 -> 3 -> 2 -> 4 -> 1, and after each
//! step checks the host's attached queue count (netlink and sysfs), sends a burst of 128 UDP
//! flows into the tap from an unprivileged host socket and counts which receive queues they land
//! on, and sends frames from every active pair back to a host socket. The parent waits for it.
//!
//! Needs root and /dev/net/tun; skips with one line otherwise. One summary line per step is
//! printed (through the rig's note channel, so it shows for passing runs too).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::io::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvmm_tests::driver::{
    feature, DriverConfig, NetDriver, ACK_ERR, ACK_OK, CSUM_FEATURES, DEFAULT_FEATURES, EVENT_IDX,
};
use mqvmm_tests::netns::{self, NOBODY};
use mqvmm_tests::rig;
use tap::{MultiQueueTap, TapConfig};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_RSS, VIRTIO_NET_F_STATUS,
};
use virtio_net::{Net, NetConfig, NetMetrics};

const PAIRS: u16 = 4;
const QUEUE_SIZE: u16 = 256;
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 255);
/// Flows per burst: one UDP destination port each.
const BURST: u16 = 128;
const BURST_PORT: u16 = 20_000;
/// The host socket that receives what the guest sends.
const HOST_RX_PORT: u16 = 47_000;
/// Frames each active pair transmits per step.
const TX_PER_PAIR: u16 = 4;
const WALK: [u16; 6] = [4, 1, 3, 2, 4, 1];
/// How long frames may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(5);
/// How long the unprivileged child may run.
const CHILD_TIMEOUT: Duration = Duration::from_secs(45);

/// What one test varies.
struct Scenario {
    test: &'static str,
    tap: &'static str,
    features: u64,
    /// After the walk: reset the device, check only pair 0 stays attached, bring it up again.
    reset_at_end: bool,
    /// The launcher's eBPF steering program on the tap, its map handed to the device (which
    /// then offers RSS); the walk ends with an RSS table.
    steering: bool,
}

#[test]
fn vq_pairs_set_walk_unprivileged_mrg_rxbuf() {
    let scenario = Scenario {
        test: "vq_pairs_set_walk_unprivileged_mrg_rxbuf",
        tap: "mqcn0",
        features: DEFAULT_FEATURES,
        reset_at_end: false,
        steering: false,
    };
    if netns::require_netns() {
        run_test(scenario);
    }
}

#[test]
fn vq_pairs_set_walk_unprivileged_with_steering_and_rss() {
    let scenario = Scenario {
        test: "vq_pairs_set_walk_unprivileged_with_steering_and_rss",
        tap: "mqcn2",
        features: DEFAULT_FEATURES | feature(VIRTIO_NET_F_RSS),
        reset_at_end: true,
        steering: true,
    };
    if netns::require_netns() {
        run_test(scenario);
    }
}

#[test]
fn vq_pairs_set_walk_unprivileged_event_idx_csum_then_reset() {
    let scenario = Scenario {
        test: "vq_pairs_set_walk_unprivileged_event_idx_csum_then_reset",
        tap: "mqcn1",
        // No MRG_RXBUF: every frame in one buffer; EVENT_IDX for both notification directions.
        features: feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_MQ)
            | feature(VIRTIO_NET_F_CTRL_VQ)
            | EVENT_IDX
            | CSUM_FEATURES,
        reset_at_end: true,
        steering: false,
    };
    if netns::require_netns() {
        run_test(scenario);
    }
}

/// Summary lines of the namespaced run, handed to the outer test process to print.
fn summary_path(test: &str, outer_pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("mqvmm-component-net-{test}-{outer_pid}.txt"))
}

fn run_test(scenario: Scenario) {
    let test = scenario.test;
    netns::run_in_netns(test, || privileged_part(&scenario));
    if !netns::in_netns() {
        let path = summary_path(test, std::process::id());
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                rig::note(line);
            }
        }
        let _ = std::fs::remove_file(path);
    }
}

// -------------------------------------------------------------------------------------------
// Root, in the namespace: the launcher's part.

fn privileged_part(s: &Scenario) {
    let tap = MultiQueueTap::create(&TapConfig {
        name: Some(s.tap.to_owned()),
        queues: PAIRS,
        // Owned by root, so joining it needs CAP_NET_ADMIN too (a tap without owner lets anyone in).
        owner: Some(0),
        ..TapConfig::default()
    })
    .unwrap_or_else(|e| panic!("create tap {}: {e}", s.tap));
    configure_host_side(s.tap);
    let tap_mac = interface_mac(s.tap);
    // The launcher's step: the steering program on the tap, its map for the device.
    let steer_map: Option<RawFd> = s.steering.then(|| {
        let queue = tap.queues().first().expect("a queue");
        steering::attach(queue.as_fd())
            .unwrap_or_else(|e| panic!("attach the steering program: {e}"))
            .into_raw_fd()
    });
    let fds: Vec<RawFd> = tap
        .into_queues()
        .into_iter()
        .map(|q| OwnedFd::from(q).into_raw_fd())
        .collect();
    // Opened as root, bound to nothing: the child tries TUNSETIFF on it once unprivileged.
    let spare_tun = netns::open_unbound_tun().expect("open /dev/net/tun");
    // SAFETY: getppid has no preconditions.
    let outer = unsafe { libc::getppid() } as u32;
    let mut summary = File::create(summary_path(s.test, outer)).expect("summary file");

    // SAFETY: the child runs only the closure below and leaves with _exit, never returning into
    // the test harness. At this point the harness's other thread waits for this test on a
    // channel and holds no lock the child needs; glibc's allocator is fork-safe.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            unprivileged_part(s, &fds, steer_map, &spare_tun, tap_mac, &mut summary)
        }));
        let _ = std::io::stderr().flush();
        // SAFETY: ends the child without unwinding into the harness or running its exit hooks.
        unsafe { libc::_exit(i32::from(result.is_err())) };
    }
    // The parent keeps no queue fd: the unprivileged child holds the only ones.
    for fd in fds.into_iter().chain(steer_map) {
        // SAFETY: `fd` came from into_raw_fd above and is owned by nothing else in this process.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    drop(spare_tun);
    let status = wait_child(pid, CHILD_TIMEOUT);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the unprivileged device process failed (wait status {status:#x}); its output is above"
    );
}

fn wait_child(pid: libc::pid_t, timeout: Duration) -> libc::c_int {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: `status` is valid for writes for the call.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == pid {
            return status;
        }
        if Instant::now() > deadline {
            // SAFETY: kill takes plain integers; `pid` is our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("the unprivileged device process ran longer than {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// 10.88.0.1/24 on `ifname`, IPv6 off (no DAD/MLD frames in the counts), link up.
fn configure_host_side(ifname: &str) {
    let ipv6 = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if std::path::Path::new(&ipv6).exists() {
        std::fs::write(&ipv6, "1").unwrap_or_else(|e| panic!("{ipv6}: {e}"));
    }
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |request: libc::c_ulong, addr: Ipv4Addr| {
        // SAFETY: all-zero is a valid ifreq.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        // struct sockaddr_in laid over struct sockaddr: family, port (0), then the address.
        let mut sa = libc::sockaddr {
            sa_family: libc::AF_INET as libc::sa_family_t,
            sa_data: [0; 14],
        };
        for (d, s) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_addr = sa;
        // SAFETY: `ifr` is a valid ifreq for SIOCSIFADDR / SIOCSIFNETMASK.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut ifr) };
        assert_eq!(
            rc,
            0,
            "ioctl {request:#x} {addr} on {ifname}: {}",
            std::io::Error::last_os_error()
        );
    };
    set(libc::SIOCSIFADDR, HOST_IP);
    set(libc::SIOCSIFNETMASK, Ipv4Addr::new(255, 255, 255, 0));
    netns::set_link_up(ifname).unwrap_or_else(|e| panic!("{ifname} up: {e}"));
}

fn interface_mac(ifname: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address")).unwrap();
    let mac: tap::MacAddr = text
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{ifname}'s address: {e}"));
    mac.octets()
}

// -------------------------------------------------------------------------------------------
// uid/gid 65534, no capabilities: the VMM's part.

fn unprivileged_part(
    s: &Scenario,
    fds: &[RawFd],
    steer_map: Option<RawFd>,
    spare_tun: &OwnedFd,
    tap_mac: [u8; 6],
    summary: &mut File,
) {
    netns::drop_privileges(NOBODY, NOBODY).unwrap_or_else(|e| panic!("drop privileges: {e}"));
    let status = netns::proc_status(std::process::id()).unwrap();
    assert_eq!(
        netns::cap_mask(&status, "CapEff"),
        0,
        "CapEff after the drop"
    );
    assert_unprivileged("before the device exists", 1);
    assert_tunsetiff_refused(spare_tun, s.tap);

    let mut ctx = Ctx::new(s, fds, steer_map, tap_mac, summary);
    ctx.walk();
    if s.steering {
        ctx.rss();
    }
    if s.reset_at_end {
        ctx.reset_and_restart();
    }
    // The same process that switched queues through its fds still cannot TUNSETIFF.
    assert_tunsetiff_refused(spare_tun, s.tap);
    assert_unprivileged("at the end", 1 + usize::from(PAIRS) + 1);
    assert!(ctx.drv.interrupts() > 0, "no interrupt was ever raised");
    let line = format!(
        "{}: ok, {} interrupts, {} notifies; every thread of the device process had uid {NOBODY} and CapEff 0",
        s.test,
        ctx.drv.interrupts(),
        ctx.drv.notifies()
    );
    ctx.say(&line);
    // Dropping the driver drops the transport and the device: the threads must stop.
    let Ctx { drv, .. } = ctx;
    drop(drv);
}

/// `/proc/self/task/*/status` as maps, one per thread.
fn thread_statuses() -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = entry.unwrap().path().join("status");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // the thread ended meanwhile
        };
        out.push(
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
                .collect(),
        );
    }
    out
}

/// Every thread of this process runs as 65534:65534 with no capability in any set and
/// no_new_privs; at least `min_threads` threads exist.
fn assert_unprivileged(when: &str, min_threads: usize) {
    let threads = thread_statuses();
    assert!(
        threads.len() >= min_threads,
        "{when}: {} threads, expected at least {min_threads}",
        threads.len()
    );
    for t in &threads {
        let name = &t["Name"];
        assert_eq!(netns::single_id(t, "Uid"), NOBODY, "{when}: uid of {name}");
        assert_eq!(netns::single_id(t, "Gid"), NOBODY, "{when}: gid of {name}");
        for key in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
            assert_eq!(netns::cap_mask(t, key), 0, "{when}: {key} of {name}");
        }
        assert_eq!(t["NoNewPrivs"], "1", "{when}: no_new_privs of {name}");
    }
}

/// TUNSETIFF, to create a tap or to join `tap` (owned by root), fails with EPERM here.
fn assert_tunsetiff_refused(tun: &OwnedFd, tap: &str) {
    for name in ["mqcnnew0", tap] {
        // SAFETY: all-zero is a valid ifreq.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
                as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, valid for the call.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        let err = std::io::Error::last_os_error();
        assert!(
            rc != 0 && err.raw_os_error() == Some(libc::EPERM),
            "TUNSETIFF {name} without privileges: rc {rc}, {err} (want EPERM)"
        );
    }
    assert!(
        netns::if_index("mqcnnew0").is_err(),
        "a tap was created unprivileged"
    );
}

/// The host's view of the tap: (netlink attached, netlink disabled, sysfs tx-*).
fn host_queues(tap: &str) -> (u32, u32, usize) {
    let info = netns::tun_info(tap).unwrap_or_else(|e| panic!("netlink info of {tap}: {e}"));
    let tx = netns::tx_queue_count(tap).unwrap_or_else(|e| panic!("sysfs queues of {tap}: {e}"));
    (info.num_queues, info.num_disabled, tx)
}

fn expect_host_queues(tap: &str, n: u16, when: &str) {
    let n32 = u32::from(n);
    assert_eq!(
        host_queues(tap),
        (n32, u32::from(PAIRS) - n32, usize::from(n)),
        "{when}: (netlink attached, netlink disabled, sysfs tx-*) of {tap}"
    );
}

fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Frames the tap (host to guest direction: its tx_dropped) or the device dropped on the way
/// to the guest.
fn rx_drops(tap: &str, metrics: &NetMetrics) -> u64 {
    let tap = netns::link_stat(tap, "tx_dropped").unwrap();
    let device: u64 = metrics.pairs.iter().map(|p| get(&p.rx.drops)).sum();
    tap + device
}

/// The unprivileged side's state: the driver, the device's counters, host sockets.
struct Ctx<'a> {
    tap: &'static str,
    drv: NetDriver,
    metrics: Arc<NetMetrics>,
    guest_mac: [u8; 6],
    tap_mac: [u8; 6],
    /// Sends the bursts (broadcast into the tap).
    sender: UdpSocket,
    /// Receives what the guest transmits.
    receiver: UdpSocket,
    summary: &'a mut File,
    step: u32,
}

impl<'a> Ctx<'a> {
    fn new(
        s: &Scenario,
        fds: &[RawFd],
        steer_map: Option<RawFd>,
        tap_mac: [u8; 6],
        summary: &'a mut File,
    ) -> Ctx<'a> {
        // The kernel still has all four queues attached, as the launcher left them.
        expect_host_queues(s.tap, PAIRS, "adoption");
        // SAFETY: the fds came from into_raw_fd in `privileged_part`, and this forked child, which
        // runs only `unprivileged_part`, adopts them once, here.
        let queues = unsafe { tap::adopt_queues(fds) }
            .unwrap_or_else(|e| panic!("adopt the queue fds: {e}"));
        let steering = steer_map.map(|fd| {
            // SAFETY: the map's fd came from into_raw_fd in `privileged_part` and is adopted
            // once, here, as mqvmm adopts `steer-map=`.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let map = tap::steering::SteeringMap::from_fd(fd)
                .unwrap_or_else(|e| panic!("map the steering map unprivileged: {e}"));
            Arc::new(map) as Arc<dyn virtio_net::steer::Steering>
        });
        let net = Net::with_steering(
            NetConfig {
                queue_size: QUEUE_SIZE,
                ..NetConfig::default()
            },
            queues,
            steering,
        )
        .unwrap_or_else(|e| panic!("create the device unprivileged: {e}"));
        // Creation puts the backends in the reset state: pair 0 attached only.
        expect_host_queues(s.tap, 1, "device creation");
        let metrics = net.metrics();
        let mut drv = NetDriver::new(
            Box::new(net),
            DriverConfig {
                features: s.features,
                queue_size: Some(QUEUE_SIZE),
                ..DriverConfig::default()
            },
        );
        assert_eq!(drv.init(), s.features);
        assert_eq!(drv.max_virtqueue_pairs(), PAIRS);
        assert_eq!(drv.link_status() & 1, 1, "link up in the config space");
        let guest_mac = drv.mac();
        assert_eq!(guest_mac, NetConfig::DEFAULT_MAC);
        expect_host_queues(s.tap, 1, "activation, before any VQ_PAIRS_SET");
        assert_eq!(get(&metrics.active_pairs), 1);
        for pair in 0..PAIRS {
            assert_eq!(drv.fill_rx(pair), usize::from(QUEUE_SIZE));
        }
        let sender = UdpSocket::bind((HOST_IP, 0)).expect("bind the burst socket");
        sender.set_broadcast(true).expect("SO_BROADCAST");
        let receiver = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, HOST_RX_PORT)).expect("bind");
        receiver
            .set_nonblocking(true)
            .expect("non-blocking receiver");
        Ctx {
            tap: s.tap,
            drv,
            metrics,
            guest_mac,
            tap_mac,
            sender,
            receiver,
            summary,
            step: 0,
        }
    }

    fn say(&mut self, line: &str) {
        eprintln!("{line}");
        let _ = writeln!(self.summary, "{line}");
    }

    /// Activation state, then every step of the walk with traffic both ways, and the refused
    /// counts in the middle.
    fn walk(&mut self) {
        self.traffic(1, "activation (no VQ_PAIRS_SET yet)".to_owned());
        let mut errors_checked = false;
        for n in WALK {
            let errors_before = get(&self.metrics.vq_pairs_set_errors);
            let started = Instant::now();
            let ack = self.drv.set_queue_pairs(n);
            let took = started.elapsed();
            assert_eq!(ack, ACK_OK, "VQ_PAIRS_SET({n})");
            expect_host_queues(self.tap, n, &format!("VQ_PAIRS_SET({n})"));
            self.expect_device_pairs(n);
            assert_eq!(get(&self.metrics.vq_pairs_set_errors), errors_before);
            self.traffic(n, format!("VQ_PAIRS_SET({n}) acked OK in {took:.1?}"));
            if n == 3 && !errors_checked {
                self.refused_counts(n);
                errors_checked = true;
            }
        }
    }

    fn expect_device_pairs(&self, n: u16) {
        let m = &self.metrics;
        assert_eq!(get(&m.active_pairs), u64::from(n), "device active_pairs");
        assert_eq!(m.attached_pairs(), usize::from(n), "device attached_pairs");
        for (p, pair) in m.pairs.iter().enumerate() {
            let active = p < usize::from(n);
            assert_eq!(
                pair.attached.load(Ordering::Relaxed),
                active,
                "pair {p} attached"
            );
            assert_eq!(
                pair.parked.load(Ordering::Relaxed),
                !active,
                "pair {p} parked"
            );
        }
    }

    /// With steering: an RSS table naming pairs 0 and 2 only keeps every flow off 1 and 3
    /// (all four stay enabled: `max_tx_vq` is 4); a table naming a pair beyond the device is
    /// refused and changes nothing; VQ_PAIRS_SET returns to spreading over every pair.
    fn rss(&mut self) {
        assert_eq!(self.drv.set_queue_pairs(PAIRS), ACK_OK);
        let rss = |table: &[u16], max_tx_vq: u16| {
            let mut b = 0x3fu32.to_le_bytes().to_vec();
            b.extend((table.len() as u16 - 1).to_le_bytes());
            b.extend(0u16.to_le_bytes());
            table.iter().for_each(|q| b.extend(q.to_le_bytes()));
            b.extend(max_tx_vq.to_le_bytes());
            b.push(40);
            b.extend((0..40u8).map(|i| i.wrapping_mul(73)));
            b
        };
        let mq = VIRTIO_NET_CTRL_MQ as u8;
        let cmd = VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8;
        assert_eq!(self.drv.ctrl_command(mq, cmd, &rss(&[0, 2], PAIRS)), ACK_OK);
        expect_host_queues(self.tap, PAIRS, "RSS_CONFIG [0, 2]");
        self.step += 1;
        let (per_queue, dropped) = self.burst(PAIRS);
        assert_eq!(
            (per_queue[1], per_queue[3]),
            (0, 0),
            "RSS [0, 2]: {per_queue:?}"
        );
        assert!(
            per_queue[0] > 0 && per_queue[2] > 0,
            "RSS [0, 2]: {per_queue:?}"
        );
        self.say(&format!(
            "step {} RSS_CONFIG table [0, 2]: rx burst per rx queue {per_queue:?} (dropped {dropped})",
            self.step
        ));
        assert_eq!(
            self.drv.ctrl_command(mq, cmd, &rss(&[0, 4], PAIRS)),
            ACK_ERR
        );
        self.step += 1;
        let (per_queue, _) = self.burst(PAIRS);
        assert_eq!(
            (per_queue[1], per_queue[3]),
            (0, 0),
            "after a refused RSS_CONFIG: {per_queue:?}"
        );
        assert_eq!(self.drv.set_queue_pairs(PAIRS), ACK_OK);
        self.traffic(
            PAIRS,
            "VQ_PAIRS_SET after RSS: automatic steering again".to_owned(),
        );
    }

    /// VQ_PAIRS_SET 0, max + 1, 0x8001: ERR and nothing changes; the same n again: OK.
    fn refused_counts(&mut self, n: u16) {
        let errors = get(&self.metrics.vq_pairs_set_errors);
        for bad in [0, PAIRS + 1, 0x8001] {
            assert_eq!(
                self.drv.set_queue_pairs(bad),
                ACK_ERR,
                "VQ_PAIRS_SET({bad})"
            );
            expect_host_queues(self.tap, n, &format!("refused VQ_PAIRS_SET({bad})"));
            self.expect_device_pairs(n);
        }
        assert_eq!(get(&self.metrics.vq_pairs_set_errors), errors + 3);
        assert_eq!(
            self.drv.set_queue_pairs(n),
            ACK_OK,
            "repeated VQ_PAIRS_SET({n})"
        );
        expect_host_queues(self.tap, n, &format!("repeated VQ_PAIRS_SET({n})"));
        let line = format!(
            "  VQ_PAIRS_SET 0, {}, 0x8001 -> ERR with the host count staying {n}; VQ_PAIRS_SET({n}) again -> OK",
            PAIRS + 1
        );
        self.say(&line);
    }

    /// A burst from the host and frames from the guest with `n` pairs enabled; one summary line.
    fn traffic(&mut self, n: u16, what: String) {
        self.step += 1;
        let (per_queue, dropped) = self.burst(n);
        let (tx_ok, parked) = self.transmit(n);
        let host = host_queues(self.tap);
        let line = format!(
            "step {} n={n}: {what}; host: netlink {} attached/{} disabled, sysfs tx-*={}; rx burst {}/{BURST} (dropped {dropped}) per rx queue {per_queue:?}; tx {tx_ok} frames from pairs 0..{n} reached the host{}",
            self.step,
            host.0,
            host.1,
            host.2,
            per_queue.iter().sum::<u64>(),
            parked.map_or(String::new(), |p| format!(", 1 sent on parked pair {p} left through pair 0")),
        );
        self.say(&line);
    }

    /// Sends [`BURST`] UDP flows into the tap and collects them from the rx queues. Returns
    /// the burst frames per rx queue and the drops accounted by the tap and the device.
    fn burst(&mut self, n: u16) -> (Vec<u64>, u64) {
        let step = self.step;
        let tag = format!("mqvmm-cn s{step} f");
        let pairs = usize::from(PAIRS);
        let used_before: Vec<u16> = (0..PAIRS)
            .map(|p| self.drv.device_used_idx(2 * p))
            .collect();
        let rx_before: Vec<u64> = (0..pairs)
            .map(|p| get(&self.metrics.pairs[p].rx.packets))
            .collect();
        let metrics = self.metrics.clone();
        let tap = self.tap;
        let drops_before = rx_drops(tap, &metrics);

        for i in 0..BURST {
            let payload = format!("{tag}{i:03}");
            let to = SocketAddrV4::new(BROADCAST, BURST_PORT + i);
            let sent = self
                .sender
                .send_to(payload.as_bytes(), to)
                .unwrap_or_else(|e| panic!("send burst frame {i} to {to}: {e}"));
            assert_eq!(sent, payload.len());
        }

        let mut seen = vec![None::<u16>; usize::from(BURST)];
        let mut ours = vec![0u64; pairs];
        let mut others = vec![0u64; pairs];
        let mut dropped = 0;
        self.drv.wait_until(ARRIVAL, |d| {
            for pair in 0..PAIRS {
                let frames = d.reap_rx(pair);
                if frames.is_empty() {
                    continue;
                }
                for f in &frames {
                    match burst_index(&f.data, &tag) {
                        Some(i) => {
                            let first = seen[usize::from(i)].replace(pair);
                            assert!(
                                first.is_none(),
                                "burst frame {i} arrived twice (rx queues of pairs {first:?} and {pair})"
                            );
                            ours[usize::from(pair)] += 1;
                        }
                        None => others[usize::from(pair)] += 1,
                    }
                }
                d.post_rx(pair, frames.len());
            }
            dropped = rx_drops(tap, &metrics) - drops_before;
            ours.iter().sum::<u64>() + dropped == u64::from(BURST)
        });
        let arrived = ours.iter().sum::<u64>();
        let missing: Vec<usize> = (0..usize::from(BURST))
            .filter(|&i| seen[i].is_none())
            .collect();
        assert_eq!(
            arrived + dropped,
            u64::from(BURST),
            "step {step}, n={n}: {arrived} of {BURST} burst frames arrived (per rx queue {ours:?}), {dropped} dropped by tap or device; missing {missing:?}"
        );
        assert!(arrived > 0, "step {step}: every burst frame was dropped");

        for p in 0..pairs {
            let index = 2 * p as u16;
            let used = self.drv.device_used_idx(index).wrapping_sub(used_before[p]);
            let counted = get(&self.metrics.pairs[p].rx.packets) - rx_before[p];
            if p >= usize::from(n) {
                assert_eq!(
                    (ours[p], others[p], used, counted),
                    (0, 0, 0, 0),
                    "step {step}, n={n}: rx queue of disabled pair {p} received (burst frames, other frames, used entries, device rx packets)"
                );
            }
        }
        assert_eq!(
            others.iter().sum::<u64>(),
            0,
            "step {step}: frames other than the burst arrived: {others:?}"
        );
        if n > 1 {
            let busy = ours.iter().filter(|&&c| c > 0).count();
            assert!(
                busy >= 2,
                "step {step}, n={n}: {BURST} flows all landed on one rx queue: {ours:?}"
            );
        }
        (ours, dropped)
    }

    /// Sends [`TX_PER_PAIR`] frames on every active pair and one on the first parked pair (if
    /// any), and checks that every one of them reaches the host socket. Returns
    /// the number received and the parked pair used.
    fn transmit(&mut self, n: u16) -> (usize, Option<u16>) {
        let step = self.step;
        let link_rx_before = netns::link_stat(self.tap, "rx_packets").unwrap();
        let tx_before: Vec<(u64, u64)> = self
            .metrics
            .pairs
            .iter()
            .map(|p| (get(&p.tx.packets), get(&p.tx.drops)))
            .collect();
        let mut expected = Vec::new();
        let parked = (n < PAIRS).then_some(n);
        if let Some(p) = parked {
            // The guest raced VQ_PAIRS_SET: its frame on a disabled pair is not lost, it
            // leaves through pair 0's tap queue.
            let payload = format!("mqvmm-cn parked s{step} p{p}");
            let frame = self.guest_frame(p, 0, &payload);
            expected.push(payload);
            self.drv.send(p, &frame);
            assert!(
                self.drv.wait_tx_done(p, ARRIVAL),
                "step {step}: the device never returned the frame sent on parked pair {p}: {}",
                self.drv.describe_queue(2 * p + 1)
            );
        }
        for p in 0..n {
            for k in 0..TX_PER_PAIR {
                let payload = format!("mqvmm-cn tx s{step} p{p} k{k}");
                let frame = self.guest_frame(p, k, &payload);
                self.drv.send(p, &frame);
                expected.push(payload);
            }
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + ARRIVAL;
        let mut buf = [0u8; 2048];
        while got.len() < expected.len() && Instant::now() < deadline {
            match self.receiver.recv(&mut buf) {
                Ok(len) => got.push(String::from_utf8_lossy(&buf[..len]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("host receive: {e}"),
            }
        }
        // Anything late or unexpected shows up now.
        std::thread::sleep(Duration::from_millis(20));
        while let Ok(len) = self.receiver.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        let mut sorted = got.clone();
        sorted.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(
            sorted, want,
            "step {step}, n={n}: what the host received from the guest"
        );
        for p in 0..n {
            assert!(
                self.drv.wait_tx_done(p, ARRIVAL),
                "step {step}: tx chains of pair {p} not returned: {}",
                self.drv.describe_queue(2 * p + 1)
            );
        }
        for (p, before) in tx_before.iter().enumerate() {
            let pair = &self.metrics.pairs[p];
            let (packets, drops) = (
                get(&pair.tx.packets) - before.0,
                get(&pair.tx.drops) - before.1,
            );
            let want = if p < usize::from(n) {
                (u64::from(TX_PER_PAIR), 0)
            } else if Some(p as u16) == parked {
                (1, 0)
            } else {
                (0, 0)
            };
            assert_eq!(
                (packets, drops),
                want,
                "step {step}, n={n}: device tx (packets, drops) of pair {p}"
            );
        }
        let link_rx = netns::link_stat(self.tap, "rx_packets").unwrap() - link_rx_before;
        assert!(
            link_rx >= expected.len() as u64,
            "step {step}: the tap counted {link_rx} received frames, {} sent",
            expected.len()
        );
        (got.len(), parked)
    }

    /// An Ethernet/IPv4/UDP frame from the guest (10.88.0.2) to the host socket.
    fn guest_frame(&self, pair: u16, k: u16, payload: &str) -> Vec<u8> {
        udp_frame(
            self.tap_mac,
            self.guest_mac,
            GUEST_IP,
            HOST_IP,
            30_000 + pair * 100 + k,
            HOST_RX_PORT,
            payload.as_bytes(),
        )
    }

    /// Device reset: only pair 0 stays attached; a new bring-up starts at one pair again and
    /// VQ_PAIRS_SET works as before.
    fn reset_and_restart(&mut self) {
        self.drv.reset();
        expect_host_queues(self.tap, 1, "device reset");
        self.drv.init();
        expect_host_queues(self.tap, 1, "bring-up after reset");
        for pair in 0..PAIRS {
            self.drv.fill_rx(pair);
        }
        self.traffic(1, "after device reset and a new bring-up".to_owned());
        assert_eq!(self.drv.set_queue_pairs(2), ACK_OK);
        expect_host_queues(self.tap, 2, "VQ_PAIRS_SET(2) after reset");
        self.expect_device_pairs(2);
        self.traffic(2, "VQ_PAIRS_SET(2) after reset acked OK".to_owned());
    }
}

/// The index of a burst frame (broadcast UDP to BURST_PORT + i, payload `tag` + 3 digits).
fn burst_index(frame: &[u8], tag: &str) -> Option<u16> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let udp = 14 + ihl;
    let payload = frame.get(udp + 8..)?;
    let digits = payload.strip_prefix(tag.as_bytes())?;
    let i: u16 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let port = u16::from_be_bytes([frame[udp + 2], frame[udp + 3]]);
    (i < BURST && port == BURST_PORT + i).then_some(i)
}

/// Ethernet + IPv4 (checksummed) + UDP (no checksum) + `payload`.
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(ip_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

#[test]
fn burst_frames_are_recognised_by_tag_and_port() {
    let f = udp_frame(
        [0xff; 6],
        [2, 0, 0, 0, 0, 1],
        HOST_IP,
        BROADCAST,
        5555,
        BURST_PORT + 7,
        b"mqvmm-cn s3 f007",
    );
    assert_eq!(burst_index(&f, "mqvmm-cn s3 f"), Some(7));
    assert_eq!(burst_index(&f, "mqvmm-cn s4 f"), None, "other step");
    let f = udp_frame(
        [0xff; 6],
        [2, 0, 0, 0, 0, 1],
        HOST_IP,
        BROADCAST,
        5555,
        BURST_PORT + 8,
        b"mqvmm-cn s3 f007",
    );
    assert_eq!(
        burst_index(&f, "mqvmm-cn s3 f"),
        None,
        "port and index disagree"
    );
    // The IPv4 header checksum verifies to zero.
    let sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
}
