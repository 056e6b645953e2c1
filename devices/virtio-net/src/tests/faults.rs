// SPDX-License-Identifier: Apache-2.0
//! Host trouble over a real 4-queue tap in a private network namespace (root only; skips
//! otherwise): TUNSETQUEUE failing in the middle of VQ_PAIRS_SET, and the tap deleted under
//! the running device.

use super::device::{f_mq, rig_over, Rig, QSIZE};
use super::real_tap::{configure, in_private_netns, kernel_rx_packets, skip_reason};
use super::*;
use crate::ctrl::{ACK_ERR, ACK_OK};
use crate::test_utils::fakes::FaultyBackend;
use crate::NetConfig;

fn cfg() -> NetConfig {
    NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    }
}

fn new_tap() -> (String, Vec<tap::TapQueue>) {
    let tap = tap::MultiQueueTap::create(&tap::TapConfig {
        name: Some("vnf%d".into()),
        queues: 4,
        ..Default::default()
    })
    .unwrap();
    let name = tap.name().to_owned();
    configure(&name);
    (name, tap.into_queues())
}

/// Queues of the tap the kernel has attached: TUNGETIFF on every queue fd, the kernel's own
/// per-queue state (the sum is what the tap's `queues/tx-*` would show).
fn host_attached<B: Backend>(rig: &Rig<'_, B>) -> usize {
    rig.attached().iter().filter(|&&a| a).count()
}

/// A broadcast frame (vnet header first) from the guest side reaches the host's tap.
fn guest_frame_reaches_host<B: Backend>(rig: &mut Rig<'_, B>, name: &str, pair: usize) -> bool {
    let before = kernel_rx_packets(name);
    let mut eth = vec![0xff; 6];
    eth.extend_from_slice(&NetConfig::DEFAULT_MAC);
    eth.extend_from_slice(&[0x88, 0xb5]);
    eth.extend_from_slice(&payload(100, pair as u8));
    rig.transmit(pair, &frame(&eth));
    wait_for(|| kernel_rx_packets(name) > before)
}

fn run_in_netns(f: impl FnOnce() + Send + 'static) {
    if let Some(why) = skip_reason() {
        eprintln!("skip: {why}");
        return;
    }
    if !in_private_netns(f) {
        eprintln!("skip: cannot create a network namespace");
    }
}

#[test]
fn kth_tunsetqueue_failure_rolls_back_the_real_tap_and_answers_err() {
    run_in_netns(|| {
        let (name, queues) = new_tap();
        let plan = Arc::new(FaultPlan::default());
        // Each fails with the errno the kernel gives when it cannot do it; everything else
        // goes to the real tap queue.
        let backends = queues
            .into_iter()
            .map(|tap| FaultyBackend::new(tap.queue(), tap, plan.clone()))
            .collect();
        let mem = guest_memory();
        let mut rig = rig_over(&mem, backends, cfg(), f_mq(), |_| true).unwrap();
        assert_eq!(rig.set_pairs(4), ACK_OK);
        assert_eq!(host_attached(&rig), 4);

        // Shrinking 4 -> 1 detaches pairs 3, 2, 1 in that order: fail each in turn.
        for k in 1..=3 {
            plan.fail_kth_with(Fault::Detach, k, libc::EBUSY);
            assert_eq!(rig.set_pairs(1), ACK_ERR, "detach #{k} failed: ERR");
            assert_eq!(
                host_attached(&rig),
                4,
                "detach #{k}: the host's queue count is back to 4"
            );
            assert_eq!(rig.attached(), [true; 4]);
            assert_eq!(rig.parked(), [false; 4], "detach #{k}: every worker runs");
            assert_eq!(rig.net.active_queue_pairs(), 4);
        }
        let m = rig.net.metrics();
        assert_eq!(get(&m.vq_pairs_set_errors), 3);
        assert_eq!(get(&m.rollback_failures), 0);
        assert_eq!(get(&m.active_pairs), 4);
        for pair in 0..4 {
            assert!(
                guest_frame_reaches_host(&mut rig, &name, pair),
                "pair {pair} carries traffic after the rollbacks"
            );
        }

        // Without a fault the same request goes through.
        assert_eq!(rig.set_pairs(1), ACK_OK);
        assert_eq!(host_attached(&rig), 1);

        // Growing 1 -> 4 attaches pairs 1, 2, 3: the k-th attach fails, the ones before it
        // are detached again.
        for k in 1..=3 {
            plan.fail_kth_with(Fault::Attach, k, libc::ENOMEM);
            assert_eq!(rig.set_pairs(4), ACK_ERR, "attach #{k} failed: ERR");
            assert_eq!(host_attached(&rig), 1, "attach #{k}: back to 1 queue");
            assert_eq!(rig.parked(), [false, true, true, true]);
        }
        assert_eq!(rig.set_pairs(3), ACK_OK);
        assert_eq!(rig.attached(), [true, true, true, false]);
        assert!(guest_frame_reaches_host(&mut rig, &name, 2));
        assert_eq!(get(&rig.net.metrics().rollback_failures), 0);
    });
}

/// CPU time (utime + stime, in clock ticks) of this process's threads whose name starts with
/// `prefix`.
fn threads_cpu_ticks(prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3; utime and stime are 14, 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
        total += ticks(14).unwrap_or(0) + ticks(15).unwrap_or(0);
    }
    total
}

fn link_status(net: &crate::Net<tap::TapQueue>) -> u16 {
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    u16::from_le_bytes(status)
}

#[test]
fn deleted_tap_takes_the_link_down_without_a_busy_loop_and_refuses_vq_pairs_set() {
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skip: the ip command (iproute2) is missing");
        return;
    }
    run_in_netns(|| {
        let (name, queues) = new_tap();
        let mem = guest_memory();
        let mut rig = rig_over(&mem, queues, cfg(), f_mq(), |_| true).unwrap();
        assert_eq!(rig.set_pairs(2), ACK_OK);
        assert!(guest_frame_reaches_host(&mut rig, &name, 1));
        assert_eq!(link_status(&rig.net) & 1, 1, "link up");
        let config_irqs = rig.irq.config.load(Ordering::SeqCst);

        // The operator deletes the tap (this thread's namespace: `ip` inherits it).
        let out = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // A running worker notices: link down in config space, with a config interrupt.
        assert!(
            wait_for(|| link_status(&rig.net) & 1 == 0),
            "link status goes down"
        );
        assert_eq!(rig.irq.config.load(Ordering::SeqCst), config_irqs + 1);
        let m = rig.net.metrics();
        assert!(!m.link_up.load(Ordering::SeqCst));

        // No busy loop: the device's threads stay idle.
        let before = threads_cpu_ticks("net-");
        std::thread::sleep(Duration::from_secs(2));
        let spent = threads_cpu_ticks("net-") - before;
        assert!(spent <= 4, "device threads used {spent} ticks in 2 s");

        // Frames the guest still sends are dropped, counted, and their buffers returned.
        let drops = get(&m.pairs[0].tx.drops) + get(&m.pairs[1].tx.drops);
        let used = rig.q[1].used_idx();
        rig.transmit(0, &frame(&payload(60, 1)));
        assert!(
            rig.q[1].wait_used(used.wrapping_add(1)),
            "tx chain returned"
        );
        assert!(wait_for(|| get(&m.pairs[0].tx.drops)
            + get(&m.pairs[1].tx.drops)
            > drops));

        // The next VQ_PAIRS_SET fails at TUNSETQUEUE: rolled back, ERR, still 2 pairs.
        assert_eq!(rig.set_pairs(3), ACK_ERR);
        assert_eq!(rig.net.active_queue_pairs(), 2);
        assert_eq!(rig.set_pairs(1), ACK_ERR);
        assert_eq!(rig.net.active_queue_pairs(), 2);
        assert_eq!(get(&m.vq_pairs_set_errors), 2);
        // The control queue still answers: the same count is a no-op, OK.
        assert_eq!(rig.set_pairs(2), ACK_OK);

        // A device reset and a new activation work, and the link stays down.
        rig.net.reset();
        rig.net.set_acked_features(f_mq());
        let q: Vec<TestQueue> = (0..9)
            .map(|i| TestQueue::new(&mem, i as u64 * 0x4000, QSIZE))
            .collect();
        let kicks: Vec<vmm_sys_util::eventfd::EventFd> = (0..9)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let queues = (0..9)
            .map(|i| (i as u16, q[i].queue(true), kicks[i].try_clone().unwrap()))
            .collect();
        rig.net
            .activate(mem.clone(), rig.irq.clone(), queues)
            .unwrap();
        rig.q = q;
        rig.kicks = kicks;
        assert_eq!(link_status(&rig.net) & 1, 0, "link still down");
        rig.transmit(0, &frame(&payload(60, 2)));
        assert!(
            rig.q[1].wait_used(1),
            "tx chain returned after re-activation"
        );
    });
}
