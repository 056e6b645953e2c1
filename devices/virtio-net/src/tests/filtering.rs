// SPDX-License-Identifier: Apache-2.0
//! Receive filtering through the control queue, with the device's threads: what reaches the
//! guest after VIRTIO_NET_CTRL_RX, MAC_TABLE_SET, MAC_ADDR_SET and VLAN commands.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
};

use super::device::{f_mq, socket_rig, Rig};
use super::*;
use crate::ctrl::{ACK_ERR, ACK_OK};
use crate::features::bit;
use crate::NetConfig;

const OWN: [u8; 6] = NetConfig::DEFAULT_MAC;
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x99];

/// One pair, everything negotiated but receive GSO, over a backend with MTU 1500: each
/// frame takes one 2 KiB buffer of the 16 posted.
fn filtering_rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    let gso = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
    let acked = (f_mq() & !gso)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
        | bit(VIRTIO_NET_F_CTRL_VLAN);
    let mut rig = socket_rig(mem, 1, 1500, acked);
    rig.fill_rx(0);
    rig
}

fn eth(dest: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    if let Some(vid) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&payload(60, 3));
    frame(&f)
}

/// Sends `f` from the host; returns whether the guest got it (else the filter dropped it).
fn arrives(rig: &mut Rig<'_>, f: &[u8]) -> bool {
    let m = rig.net.metrics();
    let rx = &m.pairs[0].rx;
    let before = (get(&rx.packets), get(&rx.filtered));
    rig.peers[0].send(f);
    assert!(
        wait_for(|| (get(&rx.packets), get(&rx.filtered)) != before),
        "{}",
        m.to_text()
    );
    get(&rx.packets) > before.0
}

fn rx_mode(rig: &mut Rig<'_>, cmd: u32, on: bool) -> u8 {
    rig.command(VIRTIO_NET_CTRL_RX, cmd, &[u8::from(on)])
}

fn mac_table(unicast: &[[u8; 6]], multicast: &[[u8; 6]]) -> Vec<u8> {
    let mut d = (unicast.len() as u32).to_le_bytes().to_vec();
    unicast.iter().for_each(|m| d.extend_from_slice(m));
    d.extend_from_slice(&(multicast.len() as u32).to_le_bytes());
    multicast.iter().for_each(|m| d.extend_from_slice(m));
    d
}

#[test]
fn without_promisc_only_frames_for_the_guest_arrive_and_the_rest_are_counted() {
    let mem = guest_memory();
    let mut rig = filtering_rig(&mem);
    assert!(
        arrives(&mut rig, &eth(OTHER, None)),
        "promiscuous after reset"
    );
    assert_eq!(rx_mode(&mut rig, VIRTIO_NET_CTRL_RX_PROMISC, false), ACK_OK);
    assert!(!arrives(&mut rig, &eth(OTHER, None)));
    assert!(arrives(&mut rig, &eth(OWN, None)));
    assert!(arrives(&mut rig, &eth([0xff; 6], None)));
    assert_eq!(rx_mode(&mut rig, VIRTIO_NET_CTRL_RX_NOBCAST, true), ACK_OK);
    assert!(!arrives(&mut rig, &eth([0xff; 6], None)));

    // The MAC table lets OTHER in; MAC_ADDR_SET moves the guest's own address.
    let table = mac_table(&[OTHER], &[]);
    let ack = rig.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &table);
    assert_eq!(ack, ACK_OK);
    assert!(arrives(&mut rig, &eth(OTHER, None)));
    let ack = rig.command(
        VIRTIO_NET_CTRL_MAC,
        VIRTIO_NET_CTRL_MAC_TABLE_SET,
        &table[..7],
    );
    assert_eq!(ack, ACK_ERR, "a table shorter than its count");
    let moved = [0x02, 0, 0, 0, 0x77, 0x77];
    let ack = rig.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &moved);
    assert_eq!(ack, ACK_OK);
    assert!(arrives(&mut rig, &eth(moved, None)));
    assert!(
        !arrives(&mut rig, &eth(OWN, None)),
        "the old address no longer"
    );
    let seven = [0x02, 0, 0, 0, 0x55, 0x55, 0];
    let ack = rig.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &seven);
    assert_eq!(ack, ACK_ERR, "ADDR_SET takes exactly 6 bytes");

    assert_eq!(rx_mode(&mut rig, VIRTIO_NET_CTRL_RX_PROMISC, true), ACK_OK);
    assert!(arrives(&mut rig, &eth([0x02, 1, 2, 3, 4, 5], None)));
    let m = rig.net.metrics();
    assert_eq!(get(&m.pairs[0].rx.filtered), 3);
    assert_eq!(get(&m.pairs[0].rx.drops), 0);
}

#[test]
fn tagged_frames_pass_only_for_vlans_the_driver_added() {
    let mem = guest_memory();
    let mut rig = filtering_rig(&mem);
    assert!(arrives(&mut rig, &eth(OWN, None)));
    assert!(
        !arrives(&mut rig, &eth(OWN, Some(7))),
        "CTRL_VLAN negotiated"
    );
    let add = VIRTIO_NET_CTRL_VLAN_ADD;
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_VLAN, add, &7u16.to_le_bytes()),
        ACK_OK
    );
    assert!(arrives(&mut rig, &eth(OWN, Some(7))));
    assert!(!arrives(&mut rig, &eth(OWN, Some(8))));
    let del = VIRTIO_NET_CTRL_VLAN_DEL;
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_VLAN, del, &7u16.to_le_bytes()),
        ACK_OK
    );
    assert!(!arrives(&mut rig, &eth(OWN, Some(7))));
    let too_big = 4096u16.to_le_bytes();
    assert_eq!(rig.command(VIRTIO_NET_CTRL_VLAN, add, &too_big), ACK_ERR);
    // A reset forgets everything: promiscuous, no VLAN filter until the next activation.
    rig.net.reset();
}
