// SPDX-License-Identifier: Apache-2.0
//! What a hostile guest can make the host do: long chains, bad chains, control-command
//! storms, and the settings a guest changes under a running data path.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MTU,
};

use super::device::{f_mq, socket_rig, Rig};
use super::*;
use crate::chain::{walk, ChainError, DescTable};
use crate::ctrl::ACK_OK;
use crate::features::bit;
use crate::limit::{RECONFIG_BURST_MIN, RECONFIG_RATE};
use crate::rxtx::{RxState, Work, DESC_BUDGET, RX_BUDGET};
use crate::test_utils::ring::{DESC_F_INDIRECT, DESC_F_NEXT};

/// `len` linked one-byte readable descriptors as an indirect table at `table`.
fn long_indirect_table(mem: &GuestMemoryMmap, table: u64, len: u16) {
    let descs: Vec<Segment> = (0..u64::from(len)).map(|i| r(BUF + i, 1)).collect();
    write_table(mem, GuestAddress(table), &descs).unwrap();
}

#[test]
fn an_indirect_table_cannot_make_a_chain_longer_than_the_queue() {
    let mem = guest_memory();
    let q = TestQueue::new(&mem, 0, 16);
    let table = DescTable {
        addr: GuestAddress(0),
        size: 16,
        indirect: true,
    };
    let indirect = BUF + 0x1_0000;
    long_indirect_table(&mem, indirect, 64);
    q.store(0, indirect, 64 * 16, DESC_F_INDIRECT, 0);
    let mut visited = 0;
    let result = walk(&mem, table, 0, |_| {
        visited += 1;
        Ok(())
    });
    assert_eq!(result, Err(ChainError::TooLong { limit: 16 }));
    assert_eq!(visited, 16, "the walk stops at the queue size");

    // A chain of exactly the queue size is fine, split between the ring and a table.
    long_indirect_table(&mem, indirect, 14);
    q.store(1, BUF, 1, DESC_F_NEXT, 2);
    q.store(2, BUF, 1, DESC_F_NEXT, 3);
    q.store(3, indirect, 14 * 16, DESC_F_INDIRECT, 0);
    let mut visited = 0;
    walk(&mem, table, 1, |_| {
        visited += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(visited, 16);
    // One more descriptor in the table is one too many.
    long_indirect_table(&mem, indirect, 15);
    q.store(3, indirect, 15 * 16, DESC_F_INDIRECT, 0);
    assert_eq!(
        walk(&mem, table, 1, |_| Ok(())),
        Err(ChainError::TooLong { limit: 16 })
    );
}

#[test]
fn transmit_work_per_call_is_bounded_in_descriptors() {
    let mem = guest_memory();
    let size = 256u16;
    let mut rig = PairRig::new(&mem, F_MRG, false, size);
    let frames = 64u16;
    let tables = BUF + 0x10_0000;
    for f in 0..frames {
        let table = tables + u64::from(f) * 16 * u64::from(size);
        let descs: Vec<Segment> = (0..u64::from(size)).map(|i| r(BUF + i, 1)).collect();
        rig.txq.add_indirect(table, &descs);
    }
    let per_call = DESC_BUDGET.div_ceil(usize::from(size));
    assert_eq!(rig.tx(), Work::More, "the descriptor budget ends the call");
    let first = usize::from(rig.txq.used_idx());
    assert!(
        first > 0 && first <= per_call,
        "{first} chains of {size} descriptors in one call (budget {DESC_BUDGET} descriptors)"
    );
    let mut calls = 1;
    loop {
        calls += 1;
        if rig.tx() == Work::Done {
            break;
        }
        assert!(calls < 100);
    }
    assert_eq!(rig.txq.used_idx(), frames, "every frame is sent in the end");
    assert_eq!(get(&rig.tx_m().packets), u64::from(frames));
    assert!(calls >= usize::from(frames) / per_call);
    for _ in 0..frames {
        assert_eq!(rig.peer.recv().map(|f| f.len()), Some(usize::from(size)));
    }
}

#[test]
fn malformed_receive_chains_count_against_the_budget() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_MRG, false, 512);
    let bad = 400u16;
    for _ in 0..bad {
        // Device-readable: unusable for receiving.
        rig.rxq.add(&[r(BUF, 2048)]);
    }
    rig.peer.send(&frame(&payload(100, 1)));
    assert_eq!(rig.rx(), RxState::More, "bad chains spend the budget");
    assert_eq!(get(&rig.rx_m().bad_chains), RX_BUDGET as u64);
    assert_eq!(rig.rx(), RxState::WaitingForBuffers);
    assert_eq!(get(&rig.rx_m().bad_chains), u64::from(bad));
    assert_eq!(rig.rxq.used_idx(), bad);
    // The frame waits for a good buffer.
    rig.rxq.add(&[w(BUF, 2048)]);
    assert_eq!(rig.rx(), RxState::WaitingForBuffers);
    assert_eq!(get(&rig.rx_m().packets), 1);
}

/// A device over `pairs` socket backends reporting `mtu`, everything negotiated.
fn rig_with_mtu(mem: &GuestMemoryMmap, pairs: u16, mtu: u32) -> Rig<'_> {
    socket_rig(mem, pairs, mtu, f_mq())
}

#[test]
fn a_guest_hammering_vq_pairs_set_is_held_to_the_host_operation_rate() {
    let mem = guest_memory();
    let mut rig = rig_with_mtu(&mem, 4, 1500);
    let m = rig.net.metrics();
    let start = Instant::now();
    let cycles = 10u64;
    for _ in 0..cycles {
        assert_eq!(rig.set_pairs(4), ACK_OK);
        assert_eq!(rig.set_pairs(1), ACK_OK);
    }
    let elapsed = start.elapsed().as_secs_f64();
    // 1 -> 4: three queues attached (TUNSETQUEUE, TUNSETVNETHDRSZ, TUNSETOFFLOAD each);
    // 4 -> 1: three detached. Every command was carried out and answered OK.
    let ops = get(&m.host_reconfigs);
    assert_eq!(ops, cycles * (9 + 3));
    assert_eq!(rig.attached(), [true, false, false, false]);
    assert_eq!(get(&m.vq_pairs_set), 2 * cycles);
    assert!(get(&m.throttled_commands) > 0);
    let allowed = f64::from(RECONFIG_BURST_MIN) + f64::from(RECONFIG_RATE) * elapsed;
    println!(
        "timing: {} VQ_PAIRS_SET, {ops} host operations in {elapsed:.2} s = {:.0}/s \
         (limit: burst {RECONFIG_BURST_MIN}, then {RECONFIG_RATE}/s)",
        2 * cycles,
        ops as f64 / elapsed
    );
    assert!(
        ops as f64 <= allowed + 1.0,
        "{ops} operations in {elapsed:.2} s exceed burst + rate ({allowed:.0})"
    );
}

#[test]
fn a_reset_does_not_wait_for_a_throttled_command() {
    let mem = guest_memory();
    let mut rig = rig_with_mtu(&mem, 4, 1500);
    let m = rig.net.metrics();
    // Spend the burst.
    while get(&m.throttled_commands) == 0 {
        assert_eq!(rig.set_pairs(4), ACK_OK);
        assert_eq!(rig.set_pairs(1), ACK_OK);
    }
    // A command that must wait for the limit, not waited for here.
    let ci = rig.ctrl_index;
    let at = 0x20_f000;
    mem.write_slice(&[VIRTIO_NET_CTRL_MQ as u8, 0, 4, 0], GuestAddress(at))
        .unwrap();
    mem.write_obj(0xaau8, GuestAddress(at + 0x80)).unwrap();
    let before = rig.q[ci].used_idx();
    let throttled = get(&m.throttled_commands);
    rig.q[ci].add(&[r(at, 4), w(at + 0x80, 1)]);
    rig.kick(ci);
    assert!(wait_for(|| get(&m.throttled_commands) > throttled));
    let t = Instant::now();
    rig.net.reset();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "reset took {took:?}");
    assert_eq!(rig.q[ci].used_idx(), before, "the command was not answered");
    assert_eq!(read_guest(&mem, at + 0x80, 1), [0xaa]);
    assert_eq!(rig.attached(), [true, false, false, false]);
}

#[test]
fn guest_offloads_set_resizes_receive_buffers_before_the_tap_may_send_gso() {
    let mem = guest_memory();
    let mut rig = rig_with_mtu(&mem, 1, 1500);
    let m = rig.net.metrics();
    let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
    let tso = csum | bit(VIRTIO_NET_F_GUEST_TSO4);
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &csum.to_le_bytes()),
        ACK_OK
    );
    rig.fill_rx(0);
    // The moment TUNSETOFFLOAD takes effect the tap may hand over a GSO frame: send one
    // right then, and let the worker take it before the command goes on.
    let peer = rig.peers.remove(0);
    let probe_metrics = m.clone();
    *rig.journal.probe.lock().unwrap() = Some(Box::new(move |op| {
        if let Op::Offload(_, flags) = op {
            if flags & libc::TUN_F_TSO4 != 0 {
                let seen = |m: &NetMetrics| get(&m.pairs[0].rx.packets) + get(&m.pairs[0].rx.drops);
                let before = seen(&probe_metrics);
                peer.send(&frame(&payload(20_000, 9)));
                wait_for(|| seen(&probe_metrics) > before);
            }
        }
    }));
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &tso.to_le_bytes()),
        ACK_OK
    );
    assert_eq!(
        get(&m.pairs[0].rx.drops),
        0,
        "the GSO frame was not dropped"
    );
    assert_eq!(get(&m.pairs[0].rx.packets), 1);
    assert_eq!(get(&m.pairs[0].rx.bytes), 20_000);
}

/// With receive GSO off, sends a frame of `len` bytes from the host side of a device whose
/// backend reports `mtu` (0: unknown) and returns (rx packets, rx drops, rx bytes).
fn receive_without_gso(rig: &mut Rig<'_>, len: usize) -> (u64, u64, u64) {
    let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &csum.to_le_bytes()),
        ACK_OK
    );
    rig.fill_rx(0);
    let m = rig.net.metrics();
    let rx = &m.pairs[0].rx;
    rig.peers[0].send(&frame(&payload(len, 5)));
    assert!(wait_for(|| get(&rx.packets) + get(&rx.drops) == 1));
    (get(&rx.packets), get(&rx.drops), get(&rx.bytes))
}

#[test]
fn without_an_mtu_option_the_tap_mtu_is_advertised_and_sizes_receive_buffers() {
    let mem = guest_memory();
    let mut rig = rig_with_mtu(&mem, 1, 9000);
    assert_ne!(rig.net.avail_features() & bit(VIRTIO_NET_F_MTU), 0);
    let mut mtu = [0u8; 2];
    rig.net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    // A jumbo frame without GSO arrives whole.
    assert_eq!(receive_without_gso(&mut rig, 8900), (1, 0, 8900));
}

#[test]
fn with_no_mtu_known_receive_buffers_take_the_largest_frame() {
    let mem = guest_memory();
    let mut rig = rig_with_mtu(&mem, 1, 0);
    assert_eq!(rig.net.avail_features() & bit(VIRTIO_NET_F_MTU), 0);
    // The guest may have raised its MTU: a 9000-byte frame without GSO still fits.
    assert_eq!(receive_without_gso(&mut rig, 9000), (1, 0, 9000));
}

#[test]
fn a_device_thread_that_does_not_end_is_left_behind_after_the_bound() {
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let stuck = crate::worker::spawn_loop(
        &crate::StdSpawner,
        crate::DeviceThread::Control,
        "stuck".into(),
        move |ready| {
            let _ = ready.send(Ok(()));
            let _ = blocked.recv_timeout(Duration::from_secs(30));
        },
    )
    .unwrap();
    let t = Instant::now();
    assert!(!stuck.join_within(Duration::from_millis(200)));
    assert!(t.elapsed() < Duration::from_secs(2));
    drop(release);

    let done = crate::worker::spawn_loop(
        &crate::StdSpawner,
        crate::DeviceThread::Control,
        "done".into(),
        |ready| {
            let _ = ready.send(Ok(()));
        },
    )
    .unwrap();
    assert!(done.join_within(Duration::from_secs(5)));
}
