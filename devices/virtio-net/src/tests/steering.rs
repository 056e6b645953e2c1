// SPDX-License-Identifier: Apache-2.0
//! Steering through the tap's program (a recording fake here): the order of steering and
//! backend operations on VQ_PAIRS_SET, the drain that makes a shrink lossless, RSS_CONFIG.

use std::io;
use std::sync::atomic::Ordering;

use tap::steering::SteerConfig;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_RSS,
};

use super::device::{f_mq, rig_over_with, Rig, QSIZE};
use super::*;
use crate::ctrl::{ACK_ERR, ACK_OK};
use crate::features::bit;
use crate::steer::Steering;
use crate::NetConfig;

/// Records every configuration written, in the backends' journal (so its order against
/// attach / detach shows), and keeps the live one.
struct FakeSteering {
    journal: Arc<Journal>,
    live: Mutex<Option<SteerConfig>>,
}

impl Steering for FakeSteering {
    fn publish(&self, cfg: &SteerConfig) -> io::Result<()> {
        self.journal.record(Op::Steer(cfg.table.clone()));
        *self.live.lock().unwrap() = Some(cfg.clone());
        Ok(())
    }
}

fn steered_rig(mem: &GuestMemoryMmap, pairs: u16) -> (Rig<'_>, Arc<FakeSteering>) {
    steered_rig_with(mem, pairs, f_mq() | bit(VIRTIO_NET_F_RSS))
}

fn steered_rig_with(mem: &GuestMemoryMmap, pairs: u16, acked: u64) -> (Rig<'_>, Arc<FakeSteering>) {
    let (b, peers, journal) = backends(pairs);
    // A known MTU: receive buffers are sized by it, not for 64 KiB frames.
    for backend in &b {
        backend.mtu.store(1500, Ordering::SeqCst);
    }
    let steering = Arc::new(FakeSteering {
        journal: journal.clone(),
        live: Mutex::new(None),
    });
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    let mut rig =
        rig_over_with(mem, b, cfg, acked, |_| true, Some(steering.clone()), None).unwrap();
    rig.peers = peers;
    rig.journal = journal;
    (rig, steering)
}

/// The distinct tap queues a table names.
fn queues_named(table: &[u16]) -> Vec<u16> {
    let mut q: Vec<u16> = table.to_vec();
    q.sort_unstable();
    q.dedup();
    q
}

fn live_table(s: &FakeSteering) -> Vec<u16> {
    s.live.lock().unwrap().as_ref().unwrap().table.clone()
}

/// `struct virtio_net_rss_config`.
fn rss(hash_types: u32, table: &[u16], unclassified: u16, max_tx_vq: u16) -> Vec<u8> {
    let mut b = hash_types.to_le_bytes().to_vec();
    b.extend((table.len() as u16 - 1).to_le_bytes());
    b.extend(unclassified.to_le_bytes());
    table.iter().for_each(|q| b.extend(q.to_le_bytes()));
    b.extend(max_tx_vq.to_le_bytes());
    b.push(40);
    b.extend([0x5a; 40]);
    b
}

#[test]
fn with_steering_the_device_offers_rss_and_its_limits_in_the_config_space() {
    let mem = guest_memory();
    let (rig, _) = steered_rig(&mem, 4);
    assert_ne!(rig.net.avail_features() & bit(VIRTIO_NET_F_RSS), 0);
    let mut cfg = [0u8; 7];
    rig.net.read_config(17, &mut cfg);
    assert_eq!(cfg[0], 40, "rss_max_key_size");
    assert_eq!(u16::from_le_bytes([cfg[1], cfg[2]]), 128, "table length");
    assert_eq!(
        u32::from_le_bytes([cfg[3], cfg[4], cfg[5], cfg[6]]),
        0x3f,
        "IPv4, TCPv4, UDPv4, IPv6, TCPv6, UDPv6"
    );
    // Without steering: no RSS, and the fields read zero.
    let (b, _, _) = backends(4);
    let net = crate::Net::new(NetConfig::default(), b).unwrap();
    assert_eq!(net.avail_features() & bit(VIRTIO_NET_F_RSS), 0);
    let mut cfg = [0xffu8; 7];
    net.read_config(17, &mut cfg);
    assert_eq!(cfg, [0; 7]);
}

#[test]
fn shrink_steers_away_before_it_detaches_and_grow_attaches_before_it_steers() {
    let mem = guest_memory();
    let (mut rig, steering) = steered_rig(&mem, 4);
    // Reset state: everything to tap queue 0.
    assert_eq!(queues_named(&live_table(&steering)), [0]);
    rig.journal.clear();

    assert_eq!(rig.set_pairs(4), ACK_OK);
    let ops = rig.journal.ops();
    let last_attach = ops
        .iter()
        .rposition(|o| matches!(o, Op::Attach(_)))
        .unwrap();
    let widen = ops
        .iter()
        .position(|o| matches!(o, Op::Steer(t) if queues_named(t) == [0, 1, 2, 3]))
        .expect("the table is widened to every pair");
    assert!(widen > last_attach, "{ops:?}");
    assert!(
        ops[..widen]
            .iter()
            .all(|o| !matches!(o, Op::Steer(t) if queues_named(t).len() > 1)),
        "no pair is steered to before it is attached: {ops:?}"
    );
    rig.journal.clear();

    assert_eq!(rig.set_pairs(2), ACK_OK);
    let ops = rig.journal.ops();
    let first_detach = ops.iter().position(|o| matches!(o, Op::Detach(_))).unwrap();
    assert!(
        matches!(&ops[0], Op::Steer(t) if queues_named(t) == [0, 1]),
        "steered away from pairs 2 and 3 first: {ops:?}"
    );
    assert!(first_detach > 0);
    assert_eq!(queues_named(&live_table(&steering)), [0, 1]);
    assert_eq!(rig.attached(), [true, true, false, false]);
}

#[test]
fn frames_waiting_on_a_disabled_pairs_queue_reach_the_guest_or_are_counted() {
    let mem = guest_memory();
    // Without GSO, so that every 2 KiB buffer takes a frame.
    let gso = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
    let (mut rig, _) = steered_rig_with(&mem, 4, (f_mq() | bit(VIRTIO_NET_F_RSS)) & !gso);
    assert_eq!(rig.set_pairs(4), ACK_OK);
    // Pair 3's whole ring holds QSIZE buffers; QSIZE + 3 frames reach its tap queue: QSIZE
    // are delivered at once, 3 wait for buffers the guest never gives.
    rig.fill_rx(3);
    rig.kick(6);
    for i in 0..QSIZE + 3 {
        rig.peers[3].send(&frame(&payload(100, i as u8)));
    }
    assert!(rig.q[6].wait_used(QSIZE));
    let m = rig.net.metrics();
    assert_eq!(rig.set_pairs(1), ACK_OK);
    assert_eq!(get(&m.steer_dropped), 3, "what had no buffer is counted");
    assert_eq!(rig.attached(), [true, false, false, false]);
    for b in rig.net.backends() {
        assert_eq!(b.state.touched_detached(), 0);
    }
}

#[test]
fn rss_config_steers_by_the_drivers_table_and_vq_pairs_set_returns_to_automatic() {
    let mem = guest_memory();
    let (mut rig, steering) = steered_rig(&mem, 4);
    assert_eq!(rig.set_pairs(4), ACK_OK);
    let table: Vec<u16> = (0..128).map(|i| [0, 2][i % 2]).collect();
    let ack = rig.command(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        &rss(0x3f, &table, 0, 4),
    );
    assert_eq!(ack, ACK_OK);
    // Tap queues are numbered in attach order: pairs 0..4 are 0..4 here.
    assert_eq!(live_table(&steering), table);
    assert_eq!(rig.net.active_queue_pairs(), 4);
    let m = rig.net.metrics();
    assert_eq!(get(&m.rss_configs), 1);

    // Refused: a queue beyond the device; nothing changes.
    let bad = rss(0x3f, &[0, 4], 0, 4);
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, &bad),
        ACK_ERR
    );
    assert_eq!(live_table(&steering), table);
    assert_eq!(get(&m.rss_config_errors), 1);

    // A table naming pairs 0 and 1 only, max_tx_vq 2: pairs 2 and 3 are disabled.
    let ack = rig.command(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        &rss(0x3f, &[1, 0], 1, 2),
    );
    assert_eq!(ack, ACK_OK);
    assert_eq!(rig.net.active_queue_pairs(), 2);
    assert_eq!(rig.attached(), [true, true, false, false]);
    assert_eq!(live_table(&steering), [1, 0]);

    // VQ_PAIRS_SET with the same count still ends RSS: automatic steering over 2 pairs.
    assert_eq!(rig.set_pairs(2), ACK_OK);
    let t = live_table(&steering);
    assert_eq!(t.len(), 128);
    assert_eq!(&t[..4], [0, 1, 0, 1]);
}

#[test]
fn without_rss_negotiated_rss_config_is_refused() {
    let mem = guest_memory();
    let (b, _, _) = backends(2);
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    let mut rig = super::device::rig_over(&mem, b, cfg, f_mq(), |_| true).unwrap();
    let ack = rig.command(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
        &rss(0x3f, &[0, 1], 0, 2),
    );
    assert_eq!(ack, ACK_ERR);
}
