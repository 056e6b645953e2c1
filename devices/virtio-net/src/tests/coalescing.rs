// SPDX-License-Identifier: Apache-2.0
//! Notification coalescing through the control queue (VIRTIO_NET_F_NOTF_COAL), with the
//! device's threads: used-buffer interrupts wait for the packet count or the time limit.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET,
    VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_VQ_NOTF_COAL,
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

#[test]
fn per_queue_coalescing_is_set_and_read_back_through_the_control_queue() {
    let mem = guest_memory();
    let drop = F_EVENT_IDX | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
    let acked = (f_mq() & !drop) | bit(VIRTIO_NET_F_NOTF_COAL) | bit(VIRTIO_NET_F_VQ_NOTF_COAL);
    let mut rig = socket_rig(&mem, 2, 1500, acked);
    rig.fill_rx(0);
    // VQ_SET on rx queue 0 (vqn 0): like RX_SET, for that queue only.
    let vq_set = |vqn: u16, max_packets: u32, usecs: u32| {
        let mut d = vqn.to_le_bytes().to_vec();
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&max_packets.to_le_bytes());
        d.extend_from_slice(&usecs.to_le_bytes());
        d
    };
    let set = VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET;
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_NOTF_COAL, set, &vq_set(0, 4, 0)),
        ACK_OK
    );
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_NOTF_COAL, set, &vq_set(3, 7, 99)),
        ACK_OK
    );
    let ctrl = rig.ctrl_index as u16;
    let refused = rig.command(VIRTIO_NET_CTRL_NOTF_COAL, set, &vq_set(ctrl, 1, 1));
    assert_eq!(refused, ACK_ERR, "the control queue has no coalescing");
    let irqs = rig.irq.count(0);
    receive(&mut rig, 3);
    assert_eq!(rig.irq.count(0), irqs, "3 of 4 on rx 0: held");
    receive(&mut rig, 1);
    assert!(wait_for(|| rig.irq.count(0) == irqs + 1));

    // VQ_GET: the vqn in, the ack, then struct virtio_net_ctrl_coal after it.
    let ci = rig.ctrl_index;
    let get = |rig: &mut Rig<'_>, vqn: u16, room: u32| -> (u8, Vec<u8>, u32) {
        let at = 0x2f_0000;
        mem.write_slice(
            &[
                VIRTIO_NET_CTRL_NOTF_COAL as u8,
                VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET as u8,
            ],
            GuestAddress(at),
        )
        .unwrap();
        mem.write_slice(&vqn.to_le_bytes(), GuestAddress(at + 2))
            .unwrap();
        mem.write_slice(&[0xee; 16], GuestAddress(at + 0x100))
            .unwrap();
        let before = rig.q[ci].used_idx();
        rig.q[ci].add(&[r(at, 4), w(at + 0x100, room)]);
        rig.kick(ci);
        assert!(rig.q[ci].wait_used(before.wrapping_add(1)));
        let len = rig.q[ci].used(before).1;
        let bytes = read_guest(&mem, at + 0x100, 9);
        (bytes[0], bytes[1..].to_vec(), len)
    };
    let (ack, result, len) = get(&mut rig, 3, 9);
    assert_eq!(ack, ACK_OK);
    assert_eq!(
        result,
        [7, 0, 0, 0, 99, 0, 0, 0],
        "max_packets 7, max_usecs 99"
    );
    assert_eq!(len, 9, "ack and result written");
    let (ack, result, _) = get(&mut rig, 1, 9);
    assert_eq!((ack, result), (ACK_OK, vec![0; 8]), "tx 0 was never set");
    let (ack, result, len) = get(&mut rig, 3, 4);
    assert_eq!((ack, len), (ACK_ERR, 1), "no room for the result");
    assert_eq!(result, [0xee; 8]);
}
