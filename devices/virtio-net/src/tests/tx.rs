// SPDX-License-Identifier: Apache-2.0
//! Transmit path: frames leave exactly as the driver laid them out, chains come back with
//! length 0, counters and notifications follow.

use std::sync::atomic::Ordering;

use super::*;
use crate::rxtx::{Work, TX_BUDGET};
use crate::test_utils::ring::{AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY};

#[test]
fn single_descriptor_frame_reaches_backend_unchanged() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let f = frame(&payload(1500, 1));
    rig.put(BUF, &f);
    let head = rig.txq.add(&[r(BUF, f.len() as u32)]);

    assert_eq!(rig.tx(), Work::Done);

    assert_eq!(rig.peer.recv().unwrap(), f);
    assert_eq!(rig.txq.used_idx(), 1);
    assert_eq!(rig.txq.used(0), (head, 0));
    assert_eq!(get(&rig.tx_m().packets), 1);
    assert_eq!(get(&rig.tx_m().bytes), 1500);
    assert_eq!(
        rig.irq.count(1),
        1,
        "one used-buffer interrupt for tx0 (queue 1)"
    );
}

#[test]
fn header_and_payload_split_over_descriptors_and_memory_regions() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let f = frame(&payload(3000, 2));
    // Header alone, then the payload in two pieces, the second straddling the boundary
    // between the two guest memory regions.
    let hdr_at = BUF;
    let a_at = BUF + 0x1000;
    let b_at = REGION_SPLIT - 700;
    rig.put(hdr_at, &f[..12]);
    rig.put(a_at, &f[12..1012]);
    rig.put(b_at, &f[1012..]);
    rig.txq.add(&[
        r(hdr_at, 12),
        r(a_at, 1000),
        r(b_at, (f.len() - 1012) as u32),
    ]);

    rig.tx();

    assert_eq!(rig.peer.recv().unwrap(), f);
    assert_eq!(get(&rig.tx_m().bad_chains), 0);
}

#[test]
fn indirect_chain_is_transmitted() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let f = frame(&payload(200, 3));
    rig.put(BUF, &f[..50]);
    rig.put(BUF + 0x100, &f[50..]);
    let head = rig
        .txq
        .add_indirect(BUF + 0x8000, &[r(BUF, 50), r(BUF + 0x100, 162)]);

    rig.tx();

    assert_eq!(rig.peer.recv().unwrap(), f);
    assert_eq!(rig.txq.used(0), (head, 0));
}

#[test]
fn write_error_drops_the_frame_but_returns_the_chain() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    rig.backend.fail_writes.store(true, Ordering::SeqCst);
    let f = frame(&payload(100, 4));
    rig.put(BUF, &f);
    let head = rig.txq.add(&[r(BUF, f.len() as u32)]);

    rig.tx();

    assert_eq!(rig.txq.used_idx(), 1);
    assert_eq!(rig.txq.used(0), (head, 0));
    assert_eq!(get(&rig.tx_m().drops), 1);
    assert_eq!(get(&rig.tx_m().packets), 0);

    // The queue keeps working once the backend does.
    rig.backend.fail_writes.store(false, Ordering::SeqCst);
    rig.txq.add(&[r(BUF, f.len() as u32)]);
    rig.tx();
    assert_eq!(rig.peer.recv().unwrap(), f);
}

#[test]
fn link_down_or_parked_drops_without_touching_the_backend() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let f = frame(&payload(60, 5));
    rig.put(BUF, &f);
    rig.txq.add(&[r(BUF, f.len() as u32)]);
    rig.qp.process_tx(Some(&rig.backend), false);
    rig.txq.add(&[r(BUF, f.len() as u32)]);
    rig.qp.process_tx::<SockBackend>(None, true);

    assert_eq!(rig.txq.used_idx(), 2);
    assert_eq!(get(&rig.tx_m().drops), 2);
    assert!(rig.peer.recv().is_none(), "nothing may reach the backend");
}

#[test]
fn budget_leaves_work_for_the_next_call() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 512);
    let f = frame(&payload(40, 6));
    rig.put(BUF, &f);
    let total = TX_BUDGET + 44;
    for _ in 0..total {
        rig.txq.add(&[r(BUF, f.len() as u32)]);
    }

    let mut got = 0;
    assert_eq!(rig.tx(), Work::More);
    assert_eq!(usize::from(rig.txq.used_idx()), TX_BUDGET);
    while rig.peer.recv().is_some() {
        got += 1;
    }
    assert_eq!(rig.tx(), Work::Done);
    assert_eq!(usize::from(rig.txq.used_idx()), total);
    while rig.peer.recv().is_some() {
        got += 1;
    }
    assert_eq!(got, total);
    assert_eq!(get(&rig.tx_m().drops), 0);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event_is_passed() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE | F_EVENT_IDX, false, 16);
    let f = frame(&payload(60, 7));
    rig.put(BUF, &f);
    // The driver wants an interrupt once entry 5 is used (used idx goes past 5).
    rig.txq.set_used_event(5);
    for _ in 0..3 {
        rig.txq.add(&[r(BUF, f.len() as u32)]);
    }
    rig.tx();
    assert_eq!(rig.txq.used_idx(), 3);
    assert_eq!(
        rig.irq.count(1),
        0,
        "used idx 3 has not passed used_event 5"
    );
    assert_eq!(
        rig.txq.avail_event(),
        3,
        "device asks for a kick on the next chain"
    );

    for _ in 0..3 {
        rig.txq.add(&[r(BUF, f.len() as u32)]);
    }
    rig.tx();
    assert_eq!(rig.txq.used_idx(), 6);
    assert_eq!(rig.irq.count(1), 1);
    assert_eq!(rig.txq.avail_event(), 6);
}

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let f = frame(&payload(60, 8));
    rig.put(BUF, &f);
    rig.txq.set_avail_flags(AVAIL_F_NO_INTERRUPT);
    rig.txq.add(&[r(BUF, f.len() as u32)]);
    rig.tx();
    assert_eq!(rig.txq.used_idx(), 1);
    assert_eq!(rig.irq.count(1), 0);
    assert_eq!(
        rig.txq.used_flags() & USED_F_NO_NOTIFY,
        0,
        "kicks are re-enabled once the queue is drained"
    );

    rig.txq.set_avail_flags(0);
    rig.txq.add(&[r(BUF, f.len() as u32)]);
    rig.tx();
    assert_eq!(rig.irq.count(1), 1);
}
