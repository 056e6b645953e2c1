// SPDX-License-Identifier: Apache-2.0
//! Cases the fuzz targets (fuzz/, `make fuzz`) found, reproduced without the fuzzer.

use super::device::f_mq;
use super::*;
use crate::ctrl::ACK_ERR;
use crate::NetConfig;
use std::time::Duration;

/// fuzz target `ctrl`: growing 1 -> 2 where pair 1 attaches, its offloads fail, and the
/// detach that should undo the attach fails too. Pair 1 stays attached while disabled; that
/// failed undo must be counted in `rollback_failures` like every other one.
#[test]
fn failed_re_detach_after_failed_attach_setup_counts_as_rollback_failure() {
    let mem = guest_memory();
    let (b, _peers, journal) = backends(2);
    let cfg = NetConfig {
        queue_size: super::device::QSIZE,
        ..Default::default()
    };
    let mut rig = super::device::rig_over(&mem, b, cfg, f_mq(), |_| true).unwrap();
    rig.journal = journal;
    rig.journal.plan.fail_kth(Fault::Offload, 1);
    rig.journal.plan.fail_kth(Fault::Detach, 1);
    assert_eq!(rig.set_pairs(2), ACK_ERR);
    assert_eq!(rig.net.active_queue_pairs(), 1);
    assert_eq!(
        rig.attached(),
        [true, true],
        "pair 1 could not be detached again"
    );
    let m = rig.net.metrics();
    assert_eq!(m.attached_pairs(), 2, "metrics show the real state");
    assert_eq!(get(&m.rollback_failures), 1, "the failed undo is counted");
}

/// A ready queue with its rings where the test says (a hostile driver may overlap them).
fn queue_at(desc: u64, avail: u64, used: u64, size: u16) -> Queue {
    let mut q = Queue::new(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    q
}

/// Runs `f` on a thread of its own; false when it has not returned after 5 s (it is left
/// spinning, the test fails).
fn returns(f: impl FnOnce() + Send + 'static) -> bool {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    wait.recv_timeout(Duration::from_secs(5)).is_ok()
}

/// fuzz target `queue_pair`: the tx used ring starts 2 bytes into the avail ring, so the
/// used flags are the avail index. Without EVENT_IDX, process_tx writes the flags to
/// suppress and re-enable kicks; each write changed the avail index, enable_notification
/// kept saying "more available", nothing could be popped, and the worker spun forever.
#[test]
fn tx_returns_when_used_flags_overlap_the_avail_index() {
    let mem = guest_memory();
    let metrics = metrics(1);
    let m = metrics.clone();
    assert!(
        returns(move || {
            let rx = queue_at(0x1000, 0x2000, 0x3000, 16);
            let tx = queue_at(0x4000, 0x5002, 0x5004, 16);
            let path =
                crate::rxtx::PathConfig::new(crate::features::Negotiated(F_BASE), false, None);
            let irq = Arc::new(RecordingInterrupt::default());
            let mut qp = crate::rxtx::QueuePair::new(0, rx, tx, mem, irq, m, path);
            let (backend, _peer) = SockBackend::new(0, Arc::new(Journal::default()));
            qp.process_tx(Some(&backend), true);
        }),
        "process_tx spins"
    );
    // The one "chain" its own flag write made available was empty: a bad chain.
    assert_eq!(get(&metrics.pairs[0].tx.bad_chains), 1);
}
