// SPDX-License-Identifier: Apache-2.0
//! Receive path, with and without MRG_RXBUF: frames land in guest buffers intact,
//! num_buffers is right, unused chains are given back, lack of buffers pauses reading.

use super::*;
use crate::rxtx::{RxState, RX_BUDGET};
use crate::test_utils::ring::USED_F_NO_NOTIFY;

/// num_buffers of the header at `addr`.
fn num_buffers(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    let b = read_guest(mem, addr + 10, 2);
    u16::from_le_bytes([b[0], b[1]])
}

/// The frame as the guest must see it: the sent header with num_buffers filled in.
fn expected(f: &[u8], n: u16) -> Vec<u8> {
    let mut e = f.to_vec();
    e[10..12].copy_from_slice(&n.to_le_bytes());
    e
}

#[test]
fn without_mrg_each_frame_takes_one_chain() {
    for features in [F_BASE, F_BASE | F_EVENT_IDX] {
        let mem = guest_memory();
        let mut rig = PairRig::new(&mem, features, false, 16);
        let h0 = rig.rxq.add(&[w(BUF, 2048)]);
        let h1 = rig.rxq.add(&[w(BUF + 0x1000, 2048)]);
        rig.rxq.add(&[w(BUF + 0x2000, 2048)]); // spare: reading stops at EAGAIN
        let f0 = frame(&payload(1500, 1));
        let f1 = frame(&payload(64, 2));
        rig.peer.send(&f0);
        rig.peer.send(&f1);

        assert_eq!(rig.rx(), RxState::Drained);

        assert_eq!(rig.rxq.used_idx(), 2);
        assert_eq!(rig.rxq.used(0), (h0, f0.len() as u32));
        assert_eq!(rig.rxq.used(1), (h1, f1.len() as u32));
        assert_eq!(read_guest(&mem, BUF, f0.len()), expected(&f0, 1));
        assert_eq!(read_guest(&mem, BUF + 0x1000, f1.len()), expected(&f1, 1));
        assert_eq!(get(&rig.rx_m().packets), 2);
        assert_eq!(get(&rig.rx_m().bytes), 1564);
        assert_eq!(rig.irq.count(0), 1, "one interrupt for the batch on rx0");
    }
}

#[test]
fn header_in_its_own_descriptor_and_indirect_chains() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    rig.rxq.add(&[w(BUF, 12), w(BUF + 0x100, 1600)]);
    rig.rxq
        .add_indirect(BUF + 0x8000, &[w(BUF + 0x2000, 6), w(BUF + 0x3000, 1600)]);
    let f0 = frame(&payload(1000, 3));
    let f1 = frame(&payload(1000, 4));
    rig.peer.send(&f0);
    rig.peer.send(&f1);

    rig.rx();

    assert_eq!(rig.rxq.used_idx(), 2);
    let mut got0 = read_guest(&mem, BUF, 12);
    got0.extend(read_guest(&mem, BUF + 0x100, 1000));
    assert_eq!(got0, expected(&f0, 1));
    // Header split 6 + 6 across the indirect descriptors.
    let mut got1 = read_guest(&mem, BUF + 0x2000, 6);
    got1.extend(read_guest(&mem, BUF + 0x3000, 1006));
    assert_eq!(got1, expected(&f1, 1));
}

#[test]
fn no_buffers_pauses_reading_until_the_guest_adds_some() {
    for features in [F_BASE, F_BASE | F_EVENT_IDX, F_MRG, F_MRG | F_EVENT_IDX] {
        let mem = guest_memory();
        let mut rig = PairRig::new(&mem, features, false, 16);
        let f = frame(&payload(500, 5));
        rig.peer.send(&f);

        assert_eq!(rig.rx(), RxState::WaitingForBuffers);
        assert!(rig.qp.rx_waiting());
        assert_eq!(rig.rxq.used_idx(), 0);
        if features & F_EVENT_IDX != 0 {
            assert_eq!(
                rig.rxq.avail_event(),
                0,
                "kick wanted on the first new buffer"
            );
        } else {
            assert_eq!(rig.rxq.used_flags() & USED_F_NO_NOTIFY, 0);
        }

        // The guest adds buffers and kicks: the pending frame arrives.
        let head = rig.rxq.add(&[w(BUF, 2048)]);
        rig.rxq.add(&[w(BUF + 0x1000, 2048)]);
        assert_eq!(rig.rx(), RxState::Drained);
        assert!(!rig.qp.rx_waiting());
        assert_eq!(rig.rxq.used(0), (head, f.len() as u32));
        assert_eq!(read_guest(&mem, BUF, f.len()), expected(&f, 1));
    }
}

#[test]
fn frame_larger_than_the_chain_is_dropped_and_the_chain_reused() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let head = rig.rxq.add(&[w(BUF, 300)]);
    rig.peer.send(&frame(&payload(1000, 6)));
    let small = frame(&payload(100, 7));
    rig.peer.send(&small);

    rig.rx();

    assert_eq!(get(&rig.rx_m().drops), 1);
    assert_eq!(rig.rxq.used_idx(), 1);
    assert_eq!(rig.rxq.used(0), (head, small.len() as u32));
    assert_eq!(read_guest(&mem, BUF, small.len()), expected(&small, 1));
}

#[test]
fn mergeable_frame_spans_chains_and_unused_chains_are_given_back() {
    for features in [F_MRG, F_MRG | F_EVENT_IDX] {
        let mem = guest_memory();
        let mut rig = PairRig::new(&mem, features, false, 16);
        let heads: Vec<u16> = (0..6)
            .map(|i| rig.rxq.add(&[w(BUF + i * 0x1000, 1000)]))
            .collect();
        let big = frame(&payload(1500, 8)); // 1512 bytes: two chains
        let small = frame(&payload(100, 9)); // one chain
        rig.peer.send(&big);
        rig.peer.send(&small);

        assert_eq!(rig.rx(), RxState::Drained);

        assert_eq!(rig.rxq.used_idx(), 3);
        assert_eq!(rig.rxq.used(0), (heads[0], 1000));
        assert_eq!(rig.rxq.used(1), (heads[1], 512));
        assert_eq!(rig.rxq.used(2), (heads[2], small.len() as u32));
        assert_eq!(num_buffers(&mem, BUF), 2);
        let mut got = read_guest(&mem, BUF, 1000);
        got.extend(read_guest(&mem, BUF + 0x1000, 512));
        assert_eq!(got, expected(&big, 2));
        assert_eq!(
            read_guest(&mem, BUF + 0x2000, small.len()),
            expected(&small, 1)
        );

        // Chain 3 was popped ahead but not used: it takes the next frame.
        let third = frame(&payload(10, 10));
        rig.peer.send(&third);
        rig.rx();
        assert_eq!(rig.rxq.used(3), (heads[3], third.len() as u32));
        assert_eq!(rig.qp.rx_queue().next_avail(), 4);
    }
}

#[test]
fn mergeable_with_gso_waits_for_room_for_a_64k_frame() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_MRG | F_EVENT_IDX, true, 256);
    for i in 0..4 {
        rig.rxq.add(&[w(BUF + i * 0x1000, 1000)]);
    }
    let f = frame(&payload(1500, 11));
    rig.peer.send(&f);

    assert_eq!(rig.rx(), RxState::WaitingForBuffers);
    assert_eq!(
        rig.rxq.used_idx(),
        0,
        "4000 bytes cannot hold a GSO frame yet"
    );
    assert_eq!(rig.qp.rx_queue().next_avail(), 0, "chains given back");
    assert_eq!(
        rig.rxq.avail_event(),
        4,
        "kick wanted on the next buffer, past those already seen"
    );

    for i in 4..70 {
        rig.rxq.add(&[w(BUF + i * 0x1000, 1000)]);
    }
    assert_eq!(rig.rx(), RxState::Drained);
    assert_eq!(rig.rxq.used_idx(), 2);
    assert_eq!(num_buffers(&mem, BUF), 2);
    assert_eq!(rig.qp.rx_queue().next_avail(), 2);
}

#[test]
fn mergeable_reads_anyway_when_the_whole_ring_is_short() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_MRG, true, 16);
    for i in 0..16 {
        rig.rxq.add(&[w(BUF + i * 0x1000, 100)]);
    }
    let f = frame(&payload(988, 12)); // 1000 bytes: ten chains
    rig.peer.send(&f);

    // Six chains (600 bytes) are left: not enough for another frame, so it waits.
    assert_eq!(rig.rx(), RxState::WaitingForBuffers);
    assert_eq!(rig.rxq.used_idx(), 10);
    assert_eq!(num_buffers(&mem, BUF), 10);
    let got: Vec<u8> = (0..10)
        .flat_map(|i| read_guest(&mem, BUF + i * 0x1000, 100))
        .collect();
    assert_eq!(got, expected(&f, 10));
}

#[test]
fn mergeable_over_indirect_and_split_chains() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_MRG, false, 16);
    rig.rxq
        .add_indirect(BUF + 0x8000, &[w(BUF, 8), w(BUF + 0x100, 800)]);
    rig.rxq.add(&[w(BUF + 0x1000, 400), w(BUF + 0x2000, 400)]);
    rig.rxq.add(&[w(BUF + 0x3000, 2000)]);
    let f = frame(&payload(1500, 13));
    rig.peer.send(&f);

    rig.rx();

    assert_eq!(rig.rxq.used_idx(), 2);
    assert_eq!(rig.rxq.used(0).1, 808);
    assert_eq!(rig.rxq.used(1).1, 1512 - 808);
    let mut got = read_guest(&mem, BUF, 8);
    got.extend(read_guest(&mem, BUF + 0x100, 800));
    got.extend(read_guest(&mem, BUF + 0x1000, 400));
    got.extend(read_guest(&mem, BUF + 0x2000, 304));
    assert_eq!(got, expected(&f, 2));
}

#[test]
fn bad_chain_between_good_ones_is_returned_empty_in_order() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_MRG, false, 16);
    let h0 = rig.rxq.add(&[w(BUF, 2000)]);
    let bad = rig.rxq.add(&[r(BUF + 0x1000, 2000)]);
    let h2 = rig.rxq.add(&[w(BUF + 0x2000, 2000)]);
    let f0 = frame(&payload(1500, 14));
    let f1 = frame(&payload(1500, 15));
    rig.peer.send(&f0);
    rig.peer.send(&f1);

    rig.rx();

    assert_eq!(rig.rxq.used_idx(), 3);
    assert_eq!(rig.rxq.used(0), (h0, f0.len() as u32));
    assert_eq!(rig.rxq.used(1), (bad, 0));
    assert_eq!(rig.rxq.used(2), (h2, f1.len() as u32));
    assert_eq!(get(&rig.rx_m().bad_chains), 1);
    assert_eq!(get(&rig.rx_m().packets), 2);
}

#[test]
fn event_idx_suppresses_rx_interrupts() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE | F_EVENT_IDX, false, 16);
    for i in 0..4 {
        rig.rxq.add(&[w(BUF + i * 0x1000, 2048)]);
    }
    rig.rxq.set_used_event(1); // interrupt once used idx passes 1
    rig.peer.send(&frame(&payload(60, 16)));
    rig.rx();
    assert_eq!(rig.irq.count(0), 0);
    rig.peer.send(&frame(&payload(60, 17)));
    rig.rx();
    assert_eq!(rig.irq.count(0), 1);
}

#[test]
fn budget_stops_reading_with_frames_left() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 512);
    let total = RX_BUDGET + 20;
    for i in 0..total as u64 + 1 {
        rig.rxq.add(&[w(BUF + i * 0x100, 0x100)]);
    }
    for i in 0..total {
        rig.peer.send(&frame(&payload(50, i as u8)));
    }
    assert_eq!(rig.rx(), RxState::More);
    assert_eq!(usize::from(rig.rxq.used_idx()), RX_BUDGET);
    assert_eq!(rig.rx(), RxState::Drained);
    assert_eq!(usize::from(rig.rxq.used_idx()), total);
}

#[test]
fn backend_error_gives_the_chain_back() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE, false, 16);
    let head = rig.rxq.add(&[w(BUF, 2048)]);
    rig.backend.detach().unwrap();
    assert_eq!(rig.rx(), RxState::BackendError);
    assert_eq!(rig.rxq.used_idx(), 0);
    assert_eq!(rig.qp.rx_queue().next_avail(), 0);

    rig.backend.attach().unwrap();
    let f = frame(&payload(60, 18));
    rig.peer.send(&f);
    rig.rx();
    assert_eq!(rig.rxq.used(0), (head, f.len() as u32));
}
