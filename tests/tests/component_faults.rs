//! Component tests of issue 6 (host trouble): the multiqueue virtio-net device over a real
//! 4-queue tap, driven through the virtio-mmio registers by the in-process driver model, in a
//! network namespace of its own. No KVM.
//!
//! - TUNSETQUEUE fails in the middle of VQ_PAIRS_SET (a fault-injecting backend fails the k-th
//!   detach, or the k-th attach, of the real tap queues): the device answers VIRTIO_NET_ERR and
//!   the host's attached queue count (netlink and sysfs) is back to the previous n, every pair
//!   still carrying traffic.
//! - The tap is deleted under the running device (`ip link del`): link down in the config space
//!   with a config interrupt, transmitted frames returned and counted as dropped, the device's
//!   threads idle, the next VQ_PAIRS_SET answered ERR.
//!
//! Needs root and /dev/net/tun; skips with one line otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvmm_tests::driver::{DriverConfig, NetDriver, ACK_ERR, ACK_OK, DEFAULT_FEATURES};
use mqvmm_tests::{netns, skip};
use tap::{MultiQueueTap, TapConfig, TapQueue};
use virtio_net::test_utils::fakes::{Fault, FaultPlan, FaultyBackend};
use virtio_net::{Backend, Net, NetConfig, NetControl, NetMetrics};

const PAIRS: u16 = 4;
const QUEUE_SIZE: u16 = 256;
/// InterruptStatus bit of a configuration change.
const INT_CONFIG: u32 = 2;

/// A 4-queue tap, up, with IPv6 off (no stray frames).
fn make_tap(name: &str) -> Vec<TapQueue> {
    let tap = MultiQueueTap::create(&TapConfig {
        name: Some(name.into()),
        queues: PAIRS,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("create tap {name}: {e}"));
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    netns::set_link_up(name).unwrap_or_else(|e| panic!("set {name} up: {e}"));
    tap.into_queues()
}

/// (netlink attached, netlink disabled, sysfs tx-* count) of the tap.
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

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::SeqCst)
}

fn driver<B: Backend + 'static>(backends: Vec<B>) -> (NetDriver, Arc<NetMetrics>) {
    let (drv, metrics, _) = driver_with_control(backends);
    (drv, metrics)
}

/// [`driver`], and the device's operator handle (what mqvmm's API socket uses).
fn driver_with_control<B: Backend + 'static>(
    backends: Vec<B>,
) -> (NetDriver, Arc<NetMetrics>, NetControl<B>) {
    let net = Net::new(
        NetConfig {
            queue_size: QUEUE_SIZE,
            ..NetConfig::default()
        },
        backends,
    )
    .unwrap_or_else(|e| panic!("create the device: {e}"));
    let metrics = net.metrics();
    let control = net.control();
    let mut drv = NetDriver::new(
        Box::new(net),
        DriverConfig {
            features: DEFAULT_FEATURES,
            queue_size: Some(QUEUE_SIZE),
            ..DriverConfig::default()
        },
    );
    assert_eq!(drv.init(), DEFAULT_FEATURES);
    (drv, metrics, control)
}

/// Waits up to 5 s for a configuration-change interrupt.
fn config_interrupt(drv: &mut NetDriver) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if drv.wait_interrupt(Duration::from_millis(100)) & INT_CONFIG != 0 {
            return true;
        }
    }
    false
}

/// A broadcast frame from the guest side on `pair` reaches the host's tap.
fn guest_frame_reaches_host(drv: &mut NetDriver, tap: &str, pair: u16) -> bool {
    let before = netns::link_stat(tap, "rx_packets").unwrap();
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&NetConfig::DEFAULT_MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(&[pair as u8; 64]);
    drv.send(pair, &frame);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if netns::link_stat(tap, "rx_packets").unwrap() > before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn kth_tunsetqueue_failure_rolls_back_to_the_previous_host_queue_count_and_replies_err() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "kth_tunsetqueue_failure_rolls_back_to_the_previous_host_queue_count_and_replies_err",
        || {
            let tap = "mqcf0";
            let plan = Arc::new(FaultPlan::default());
            // The fault injection point: real tap queues whose k-th detach or attach (counted
            // across all queues) fails with an errno the kernel could give.
            let backends = make_tap(tap)
                .into_iter()
                .map(|q| FaultyBackend::new(q.queue(), q, plan.clone()))
                .collect();
            let (mut drv, metrics) = driver(backends);
            expect_host_queues(tap, 1, "activation");
            assert_eq!(drv.set_queue_pairs(4), ACK_OK);
            expect_host_queues(tap, 4, "VQ_PAIRS_SET(4)");

            // 4 -> 1 detaches pairs 3, 2, 1: fail the first, second and third in turn.
            for k in 1..=3 {
                plan.fail_kth_with(Fault::Detach, k, libc::EBUSY);
                assert_eq!(drv.set_queue_pairs(1), ACK_ERR, "detach #{k} failed");
                expect_host_queues(tap, 4, &format!("after detach #{k} failed"));
                assert_eq!(get(&metrics.active_pairs), 4);
                for (pair, p) in metrics.pairs.iter().enumerate() {
                    assert!(
                        !p.parked.load(Ordering::SeqCst),
                        "pair {pair} left parked after detach #{k} failed"
                    );
                }
                eprintln!("rollback: detach #{k} of 4 -> 1 failed: ERR, host queues back to 4");
            }
            for pair in 0..PAIRS {
                assert!(
                    guest_frame_reaches_host(&mut drv, tap, pair),
                    "pair {pair} carries traffic after the rollbacks"
                );
            }
            assert_eq!(drv.set_queue_pairs(1), ACK_OK, "without a fault");
            expect_host_queues(tap, 1, "VQ_PAIRS_SET(1)");

            // 1 -> 4 attaches pairs 1, 2, 3: the k-th attach fails, the ones before it are
            // detached again.
            for k in 1..=3 {
                plan.fail_kth_with(Fault::Attach, k, libc::ENOMEM);
                assert_eq!(drv.set_queue_pairs(4), ACK_ERR, "attach #{k} failed");
                expect_host_queues(tap, 1, &format!("after attach #{k} failed"));
                assert_eq!(get(&metrics.active_pairs), 1);
                eprintln!("rollback: attach #{k} of 1 -> 4 failed: ERR, host queues back to 1");
            }
            assert!(guest_frame_reaches_host(&mut drv, tap, 0));
            assert_eq!(drv.set_queue_pairs(3), ACK_OK);
            expect_host_queues(tap, 3, "VQ_PAIRS_SET(3)");
            assert!(guest_frame_reaches_host(&mut drv, tap, 2));
            assert_eq!(get(&metrics.vq_pairs_set_errors), 6);
            assert_eq!(get(&metrics.rollback_failures), 0);
        },
    );
}

/// utime + stime (clock ticks) of this process's threads whose name starts with `prefix`.
fn threads_cpu_ticks(prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += field(14) + field(15);
    }
    total
}

#[test]
fn deleted_tap_takes_the_link_down_drops_tx_and_refuses_vq_pairs_set() {
    if !netns::require_netns() || !skip::require_program("ip") {
        return;
    }
    netns::run_in_netns(
        "deleted_tap_takes_the_link_down_drops_tx_and_refuses_vq_pairs_set",
        || {
            let tap = "mqcf1";
            let (mut drv, metrics, control) = driver_with_control(make_tap(tap));
            assert_eq!(drv.set_queue_pairs(2), ACK_OK);
            expect_host_queues(tap, 2, "VQ_PAIRS_SET(2)");
            assert!(guest_frame_reaches_host(&mut drv, tap, 1));
            assert_eq!(drv.link_status() & 1, 1, "link up");
            // Forget earlier interrupts.
            while drv.wait_interrupt(Duration::from_millis(50)) != 0 {}
            // The operator's link switch: STATUS and a config interrupt each way.
            assert!(control.set_link_up(false));
            assert!(
                config_interrupt(&mut drv),
                "no config interrupt for link down"
            );
            assert_eq!(drv.link_status() & 1, 0, "operator's link down");
            assert!(control.set_link_up(true));
            assert!(
                config_interrupt(&mut drv),
                "no config interrupt for link up"
            );
            assert_eq!(drv.link_status() & 1, 1, "operator's link up");
            assert!(guest_frame_reaches_host(&mut drv, tap, 0));

            let out = std::process::Command::new("ip")
                .args(["link", "del", tap])
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );

            // A config interrupt, and the config space says the link is down.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut status = 0;
            while status & INT_CONFIG == 0 && Instant::now() < deadline {
                status |= drv.wait_interrupt(Duration::from_millis(100));
            }
            assert_ne!(status & INT_CONFIG, 0, "no config interrupt");
            assert_eq!(
                drv.link_status() & 1,
                0,
                "link still up in the config space"
            );
            assert!(!metrics.link_up.load(Ordering::SeqCst));

            // No busy loop.
            let before = threads_cpu_ticks("net-");
            std::thread::sleep(Duration::from_secs(2));
            let spent = threads_cpu_ticks("net-") - before;
            assert!(spent <= 4, "device threads used {spent} ticks in 2 s");

            // Transmitted frames come back, counted as dropped.
            let drops: u64 = metrics.pairs.iter().map(|p| get(&p.tx.drops)).sum();
            for pair in 0..2 {
                drv.send(pair, &[0xff; 60]);
                assert!(
                    drv.wait_tx_done(pair, Duration::from_secs(5)),
                    "tx chain of pair {pair} not returned"
                );
            }
            // The counters are flushed right after the used index is published: wait briefly.
            let tx_drops = || -> u64 { metrics.pairs.iter().map(|p| get(&p.tx.drops)).sum() };
            let deadline = Instant::now() + Duration::from_secs(5);
            while tx_drops() < drops + 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                tx_drops(),
                drops + 2,
                "frames sent after the loss counted as dropped"
            );

            // The next VQ_PAIRS_SET fails at TUNSETQUEUE: ERR, nothing changes.
            assert_eq!(drv.set_queue_pairs(4), ACK_ERR);
            assert_eq!(drv.set_queue_pairs(1), ACK_ERR);
            assert_eq!(get(&metrics.active_pairs), 2);

            // The operator cannot bring the link back up over a deleted tap.
            assert!(!control.set_link_up(true), "link up over a deleted tap");
            assert_eq!(drv.link_status() & 1, 0);
            assert!(!metrics.link_up.load(Ordering::SeqCst));
            assert!(control.set_link_up(false));
            eprintln!(
                "tap deleted: config interrupt, link down, device threads {spent} ticks in 2 s, tx dropped, VQ_PAIRS_SET ERR"
            );
        },
    );
}
