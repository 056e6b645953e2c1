//! A guest that hammers the control queue: VQ_PAIRS_SET max / 1 as fast as the driver can,
//! over a real 4-queue tap. Each switch makes the host do TUNSETQUEUE (and, on attach,
//! TUNSETVNETHDRSZ and TUNSETOFFLOAD) under the host-wide RTNL lock, a detach also an RCU
//! grace period: the device holds the guest to a burst and then a fixed rate of those, and
//! still answers every command correctly.
//!
//! In a network namespace of its own, as root (the operations are the same unprivileged; the
//! component_net tests show that part). Needs root and /dev/net/tun; skips with one line
//! otherwise. The measured rate and the process's CPU time are printed as a timing note.

use std::time::{Duration, Instant};

use mqvmm_tests::driver::{feature, DriverConfig, NetDriver, ACK_OK, DEFAULT_FEATURES};
use mqvmm_tests::{netns, rig};
use tap::{MultiQueueTap, TapConfig};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use virtio_net::limit::{RECONFIG_BURST_MIN, RECONFIG_RATE};
use virtio_net::{Net, NetConfig};

const PAIRS: u16 = 4;
/// How long the guest hammers.
const STORM: Duration = Duration::from_secs(4);

fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::SeqCst)
}

/// User + system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to fill.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn a_vq_pairs_set_storm_is_held_to_the_host_operation_rate() {
    let test = "a_vq_pairs_set_storm_is_held_to_the_host_operation_rate";
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(test, storm);
    if !netns::in_netns() {
        if let Ok(line) = std::fs::read_to_string(summary_path()) {
            rig::note(line.trim());
        }
    }
}

fn summary_path() -> std::path::PathBuf {
    // The namespaced child and the outer test share the outer process's pid in the name.
    let outer = if netns::in_netns() {
        // SAFETY: getppid has no preconditions.
        unsafe { libc::getppid() }
    } else {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::getpid() }
    };
    std::env::temp_dir().join(format!("mqvmm-component-storm-{outer}.txt"))
}

fn storm() {
    let tap = MultiQueueTap::create(&TapConfig {
        name: Some("mqstorm0".to_owned()),
        queues: PAIRS,
        ..TapConfig::default()
    })
    .unwrap_or_else(|e| panic!("create tap: {e}"));
    let net = Net::new(NetConfig::default(), tap.into_queues())
        .unwrap_or_else(|e| panic!("create the device: {e}"));
    let metrics = net.metrics();
    let features = DEFAULT_FEATURES | feature(VIRTIO_NET_F_MQ) | feature(VIRTIO_NET_F_CTRL_VQ);
    let mut drv = NetDriver::new(
        Box::new(net),
        DriverConfig {
            features,
            ..DriverConfig::default()
        },
    );
    assert_eq!(drv.init() & features, features);

    let cpu_before = process_cpu();
    let start = Instant::now();
    let mut commands = 0u64;
    while start.elapsed() < STORM {
        let n = if commands.is_multiple_of(2) { PAIRS } else { 1 };
        assert_eq!(drv.set_queue_pairs(n), ACK_OK, "VQ_PAIRS_SET({n})");
        commands += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = process_cpu().saturating_sub(cpu_before).as_secs_f64();

    // Every command was carried out: the host's attached queues follow the last one.
    let last = if commands.is_multiple_of(2) { 1 } else { PAIRS };
    assert_eq!(
        netns::tx_queue_count("mqstorm0").unwrap(),
        usize::from(last),
        "host queues after the storm"
    );
    assert_eq!(get(&metrics.vq_pairs_set), commands);
    assert_eq!(get(&metrics.vq_pairs_set_errors), 0);
    // 1 -> 4 attaches three queues (3 operations each), 4 -> 1 detaches three (1 each).
    let grows = commands.div_ceil(2);
    let shrinks = commands / 2;
    let ops = get(&metrics.host_reconfigs);
    assert_eq!(ops, grows * 9 + shrinks * 3, "host operations counted");
    assert!(
        get(&metrics.throttled_commands) > 0,
        "the limit never acted"
    );
    let allowed = f64::from(RECONFIG_BURST_MIN) + f64::from(RECONFIG_RATE) * elapsed;
    let line = format!(
        "timing: VQ_PAIRS_SET storm {PAIRS}/1 for {elapsed:.1} s: {commands} commands \
         ({:.1}/s), {ops} tap operations under RTNL ({:.1}/s; limit burst {RECONFIG_BURST_MIN} \
         then {RECONFIG_RATE}/s), {} waited; process CPU {cpu:.2} s ({:.0}% of one core)",
        commands as f64 / elapsed,
        ops as f64 / elapsed,
        get(&metrics.throttled_commands),
        100.0 * cpu / elapsed
    );
    eprintln!("{line}");
    let _ = std::fs::write(summary_path(), &line);
    assert!(
        ops as f64 <= allowed + 9.0,
        "{ops} host operations in {elapsed:.2} s exceed burst + rate ({allowed:.0})"
    );
    drop(drv);
}
