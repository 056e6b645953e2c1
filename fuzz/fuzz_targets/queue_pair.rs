// SPDX-License-Identifier: Apache-2.0
//! One queue pair's rx and tx processing (`QueuePair::process_tx` / `process_rx`) over guest
//! memory, descriptor tables (direct, indirect, looping, out of range) and ring indices that
//! the input writes, with and without MRG_RXBUF / EVENT_IDX / INDIRECT_DESC, against an
//! in-memory backend whose frames and errors also come from the input.
//!
//! Input: flags byte, rx ring, tx ring (see `Ring::read`), then operations:
//! tag = op << 1 | queue (0 = rx, 1 = tx); op 0..=5 shape memory (`ring_op`), 6 = tx with
//! the backend, 7 = tx parked or link down, 8 = rx, 9 = queue frames/errors in the backend,
//! 10 = change the receive path (GSO on/off), 11 = attach/detach the backend.
//!
//! After every process call: the device returned no more chains than it took, took no more
//! than the budget allows, and its counters match what the backend saw.
#![no_main]

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mqvmm_fuzz::{
    guest_memory, ring_op, trace, CountingInterrupt, FakeBackend, Input, Ring, RxEvent,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_net::features::{bit, Negotiated};
use virtio_net::rxtx::{PathConfig, QueuePair, RX_BUDGET, TX_BUDGET};
use virtio_net::NetMetrics;
use virtio_queue::QueueT;

const MAX_QUEUE: u16 = 256;

fn delta(after: u16, before: u16) -> u16 {
    (Wrapping(after) - Wrapping(before)).0
}

struct Snapshot {
    next_avail: u16,
    next_used: u16,
    packets: u64,
    bytes: u64,
    frames: u64,
    frame_bytes: u64,
}

fn snapshot(
    q: &virtio_queue::Queue,
    m: &virtio_net::QueueMetrics,
    frames: u64,
    frame_bytes: u64,
) -> Snapshot {
    Snapshot {
        next_avail: q.next_avail(),
        next_used: q.next_used(),
        packets: m.packets.load(Ordering::SeqCst),
        bytes: m.bytes.load(Ordering::SeqCst),
        frames,
        frame_bytes,
    }
}

fn run(data: &[u8]) {
    mqvmm_fuzz::tracing();
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let mut features = 0u64;
    if flags & 1 != 0 {
        features |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    if flags & 2 != 0 {
        features |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    if flags & 4 != 0 {
        features |= bit(VIRTIO_RING_F_INDIRECT_DESC);
    }
    if flags & 8 != 0 {
        features |= bit(VIRTIO_F_VERSION_1);
    }
    let gso = flags & 0x10 != 0;
    let mtu = (flags & 0x20 != 0).then_some(9000);
    let features = Negotiated(features);
    let hdr_len = features.vnet_hdr_len() as u64;

    let mem = guest_memory();
    let mut rings = [
        Ring::read(&mut inp, MAX_QUEUE),
        Ring::read(&mut inp, MAX_QUEUE),
    ];
    let (Some(rxq), Some(txq)) = (
        rings[0].queue(MAX_QUEUE, features.event_idx(), &mem),
        rings[1].queue(MAX_QUEUE, features.event_idx(), &mem),
    ) else {
        // The transport refuses rings outside guest memory before the device sees them.
        trace!("rings {rings:?} refused");
        return;
    };
    let irq = Arc::new(CountingInterrupt::default());
    let metrics = Arc::new(NetMetrics::new(1));
    let mut qp = QueuePair::new(
        0,
        rxq,
        txq,
        mem.clone(),
        irq,
        metrics.clone(),
        PathConfig::new(features, gso, mtu),
    );
    let backend = FakeBackend::new(0, true);
    let pm = &metrics.pairs[0];

    while !inp.is_empty() {
        let tag = inp.u8();
        let which = usize::from(tag & 1);
        match (tag >> 1) % 12 {
            op @ 0..=5 => {
                ring_op(op, &mut inp, &mem, &mut rings[which]);
            }
            op @ (6 | 7) => {
                let before = snapshot(
                    qp.tx_queue(),
                    &pm.tx,
                    backend.tx_frames.load(Ordering::SeqCst),
                    backend.tx_bytes.load(Ordering::SeqCst),
                );
                let drops_before = pm.tx.drops.load(Ordering::SeqCst);
                if op == 6 {
                    qp.process_tx(Some(&backend), true);
                } else if inp.u8() & 1 == 0 {
                    qp.process_tx(None::<&FakeBackend>, true);
                } else {
                    qp.process_tx(Some(&backend), false);
                }
                let after = snapshot(
                    qp.tx_queue(),
                    &pm.tx,
                    backend.tx_frames.load(Ordering::SeqCst),
                    backend.tx_bytes.load(Ordering::SeqCst),
                );
                let popped = delta(after.next_avail, before.next_avail);
                let used = delta(after.next_used, before.next_used);
                assert!(
                    used <= popped,
                    "tx returned {used} chains but took {popped}"
                );
                assert!(
                    usize::from(popped) <= TX_BUDGET,
                    "tx took {popped} chains in one call"
                );
                let frames = after.frames - before.frames;
                assert_eq!(
                    after.packets - before.packets,
                    frames,
                    "tx packets vs backend writes"
                );
                assert_eq!(
                    after.bytes - before.bytes,
                    (after.frame_bytes - before.frame_bytes) - frames * hdr_len,
                    "tx bytes vs backend bytes"
                );
                trace!("tx: took {popped}, returned {used}, {frames} frames to the backend");
                if op == 7 {
                    assert_eq!(
                        frames, 0,
                        "tx reached the backend while parked or link down"
                    );
                    let drops = pm.tx.drops.load(Ordering::SeqCst) - drops_before;
                    assert!(drops <= u64::from(popped));
                }
            }
            8 => {
                let before = snapshot(
                    qp.rx_queue(),
                    &pm.rx,
                    backend.rx_frames.load(Ordering::SeqCst),
                    0,
                );
                qp.process_rx(&backend);
                let after = snapshot(
                    qp.rx_queue(),
                    &pm.rx,
                    backend.rx_frames.load(Ordering::SeqCst),
                    0,
                );
                let popped = delta(after.next_avail, before.next_avail);
                let used = delta(after.next_used, before.next_used);
                assert!(
                    used <= popped,
                    "rx returned {used} chains but kept {popped}"
                );
                let frames = after.frames - before.frames;
                assert!(
                    frames <= RX_BUDGET as u64,
                    "rx read {frames} frames in one call"
                );
                let delivered = after.packets - before.packets;
                trace!("rx: kept {popped}, returned {used}, read {frames} frames, delivered {delivered}");
                assert!(
                    delivered <= frames,
                    "rx delivered {delivered} of {frames} frames"
                );
                assert!(
                    delivered <= u64::from(used),
                    "rx delivered {delivered} frames in {used} chains"
                );
            }
            9 => {
                let n = 1 + inp.u8() % 4;
                for _ in 0..n {
                    let kind = inp.u8();
                    let ev = match kind % 8 {
                        0..=2 => RxEvent::Frame {
                            len: usize::from(inp.u8()),
                            fill: kind,
                        },
                        3 | 4 => RxEvent::Frame {
                            len: usize::from(inp.u16()),
                            fill: kind,
                        },
                        5 => RxEvent::Frame {
                            len: inp.u32() as usize % 140_000,
                            fill: kind,
                        },
                        6 => RxEvent::Error(libc::EIO),
                        _ => RxEvent::Error(if kind & 0x80 != 0 {
                            libc::EINTR
                        } else {
                            libc::EAGAIN
                        }),
                    };
                    backend.push(ev);
                }
            }
            10 => {
                let gso = inp.u8() & 1 != 0;
                qp.set_path(PathConfig::new(features, gso, mtu));
            }
            _ => {
                let _ = if inp.u8() & 1 != 0 {
                    virtio_net::Backend::attach(&backend)
                } else {
                    virtio_net::Backend::detach(&backend)
                };
            }
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
