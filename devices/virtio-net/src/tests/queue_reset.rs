// SPDX-License-Identifier: Apache-2.0
//! One queue reset alone while the device runs (VIRTIO_F_RING_RESET): its worker forgets
//! it, the rest of the device runs on, and it comes back with the driver's new ring.

use super::device::{f_mq, socket_rig, Rig, QSIZE};
use super::*;

fn rig_2_pairs(mem: &GuestMemoryMmap) -> Rig<'_> {
    socket_rig(mem, 2, 1500, f_mq())
}

#[test]
fn a_receive_queue_reset_alone_comes_back_with_its_new_ring() {
    let mem = guest_memory();
    let mut rig = rig_2_pairs(&mem);
    let m = rig.net.metrics();
    rig.net.reset_queue(0).unwrap();
    // The reset queue takes nothing; the frame waits in the backend.
    rig.fill_rx(0);
    rig.kick(0);
    rig.peers[0].send(&frame(&payload(100, 1)));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(get(&m.pairs[0].rx.packets), 0);
    assert_eq!(rig.q[0].used_idx(), 0);
    // Transmit on the same pair runs on.
    rig.transmit(0, &frame(&payload(80, 2)));
    assert!(
        rig.peers[0].recv_wait().is_some(),
        "tx of the pair still works"
    );

    // The driver sets the queue up again elsewhere, half the size, and enables it.
    let mut fresh = TestQueue::new(&mem, 0x60_0000, QSIZE / 2);
    for slot in 0..u64::from(QSIZE / 2) {
        fresh.add(&[w(0x70_0000 + slot * 0x1000, 2048)]);
    }
    rig.net.enable_queue(0, fresh.queue(true)).unwrap();
    assert!(
        fresh.wait_used(1),
        "the waiting frame lands in the new ring"
    );
    assert_eq!(get(&m.pairs[0].rx.packets), 1);
    assert_eq!(rig.q[0].used_idx(), 0, "nothing went to the old ring");
}

#[test]
fn only_data_queues_of_a_running_device_can_be_reset() {
    let mem = guest_memory();
    let mut rig = rig_2_pairs(&mem);
    let ctrl = rig.ctrl_index as u16;
    assert!(rig.net.reset_queue(ctrl).is_err(), "the control queue");
    assert!(rig.net.reset_queue(99).is_err());
    assert!(
        rig.net.reset_queue(3).is_ok(),
        "tx of pair 1 (parked) can be reset"
    );
    rig.net.reset();
    assert!(rig.net.reset_queue(0).is_err(), "not running");
}
