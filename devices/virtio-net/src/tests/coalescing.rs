// SPDX-License-Identifier: Apache-2.0
//! Notification coalescing through the control queue (VIRTIO_NET_F_NOTF_COAL), with the
//! device's threads: used-buffer interrupts wait for the packet count or the time limit.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_NOTF_COAL,
};

use super::device::{f_mq, socket_rig, Rig};
use super::*;
use crate::ctrl::{ACK_ERR, ACK_OK};
use crate::features::bit;

/// One pair without EVENT_IDX (the driver wants every notification) and without receive
/// GSO, over a backend with MTU 1500, NOTF_COAL negotiated, rx buffers posted.
fn coalescing_rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    let drop = F_EVENT_IDX | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
    let acked = (f_mq() & !drop) | bit(VIRTIO_NET_F_NOTF_COAL);
    let mut rig = socket_rig(mem, 1, 1500, acked);
    rig.fill_rx(0);
    rig
}

fn coal(rig: &mut Rig<'_>, cmd: u32, max_packets: u32, usecs: u32) -> u8 {
    let mut data = max_packets.to_le_bytes().to_vec();
    data.extend_from_slice(&usecs.to_le_bytes());
    rig.command(VIRTIO_NET_CTRL_NOTF_COAL, cmd, &data)
}

fn receive(rig: &mut Rig<'_>, frames: usize) {
    let m = rig.net.metrics();
    let before = get(&m.pairs[0].rx.packets);
    for i in 0..frames {
        rig.peers[0].send(&frame(&payload(100, i as u8)));
    }
    assert!(wait_for(
        || get(&m.pairs[0].rx.packets) == before + frames as u64
    ));
}

#[test]
fn receive_interrupts_wait_for_the_packet_count() {
    let mem = guest_memory();
    let mut rig = coalescing_rig(&mem);
    assert_eq!(
        coal(&mut rig, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, 4, 0),
        ACK_OK
    );
    let irqs = rig.irq.count(0);
    for _ in 0..3 {
        receive(&mut rig, 1);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.irq.count(0), irqs, "3 of 4 frames: still held");
    receive(&mut rig, 1);
    assert!(
        wait_for(|| rig.irq.count(0) == irqs + 1),
        "the 4th releases one"
    );
    // Back to no coalescing: each frame its interrupt.
    assert_eq!(
        coal(&mut rig, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, 0, 0),
        ACK_OK
    );
    receive(&mut rig, 1);
    assert!(wait_for(|| rig.irq.count(0) == irqs + 2));
}

#[test]
fn a_held_interrupt_goes_out_when_its_time_is_up() {
    let mem = guest_memory();
    let mut rig = coalescing_rig(&mem);
    assert_eq!(
        coal(&mut rig, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, 1000, 50_000),
        ACK_OK
    );
    let irqs = rig.irq.count(0);
    let sent = Instant::now();
    receive(&mut rig, 1);
    assert_eq!(rig.irq.count(0), irqs, "held at first");
    assert!(
        wait_for(|| rig.irq.count(0) == irqs + 1),
        "released in time"
    );
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(45), "released after {took:?}");
    // Transmit coalescing is set on its own; malformed data is refused.
    assert_eq!(
        coal(&mut rig, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET, 8, 100),
        ACK_OK
    );
    let short = rig.command(
        VIRTIO_NET_CTRL_NOTF_COAL,
        VIRTIO_NET_CTRL_NOTF_COAL_RX_SET,
        &[1],
    );
    assert_eq!(short, ACK_ERR);
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_NOTF_COAL, 2, &[0; 12]),
        ACK_ERR,
        "VQ_SET not offered"
    );
}

#[test]
fn a_held_interrupt_the_driver_no_longer_wants_is_not_sent() {
    // With EVENT_IDX: the first frame crosses used_event (0), so an interrupt is owed; before
    // its time is up the driver, now polling, moves used_event far ahead.
    let mem = guest_memory();
    let drop = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
    let acked = (f_mq() & !drop) | bit(VIRTIO_NET_F_NOTF_COAL);
    let mut rig = socket_rig(&mem, 1, 1500, acked);
    rig.fill_rx(0);
    assert_eq!(
        coal(&mut rig, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, 1000, 50_000),
        ACK_OK
    );
    let irqs = rig.irq.count(0);
    receive(&mut rig, 1);
    rig.q[0].set_used_event(100);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(rig.irq.count(0), irqs, "the driver polls: no interrupt");
    // Once the driver asks again, the next frame's interrupt comes (after the time limit).
    rig.q[0].set_used_event(1);
    receive(&mut rig, 1);
    assert!(wait_for(|| rig.irq.count(0) == irqs + 1));
}
