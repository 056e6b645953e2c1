// SPDX-License-Identifier: Apache-2.0
//! Hand-made seed inputs: well-formed driver conversations in each target's input format,
//! so the fuzzer starts from valid rings and commands and mutates from there.
//! `cargo run --example make_seeds` writes them to `corpus/<target>/seed-*`.

/// `Input::addr` encoding of `DATA_AREA + 16 * slot`.
fn data(slot: u8) -> [u8; 2] {
    [7, slot]
}

/// `Input::len` encodings.
fn len8(v: u8) -> [u8; 2] {
    [0, v]
}

fn len16(v: u16) -> [u8; 3] {
    let [lo, hi] = v.to_le_bytes();
    [2, lo, hi]
}

/// `Ring::read` encoding: size 1 << shift, then the three ring addresses.
fn ring(shift: u8, desc: u16, avail: u16, used: u16) -> Vec<u8> {
    let mut v = vec![shift];
    for a in [desc, avail, used] {
        v.extend_from_slice(&a.to_le_bytes());
    }
    v
}

/// `ring_op` 0: descriptor `index` of the ring's table.
fn desc(tag: u8, index: u8, addr: [u8; 2], len: &[u8], flags: u8, next: u8) -> Vec<u8> {
    let mut v = vec![tag, index];
    v.extend_from_slice(&addr);
    v.extend_from_slice(len);
    v.extend_from_slice(&[flags, next]);
    v
}

/// `ring_op` 1: descriptor `i` of a table at `DATA_AREA + 16 * slot`.
fn table_desc(tag: u8, slot: u8, i: u8, addr: [u8; 2], len: &[u8], flags: u8, next: u8) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&data(slot));
    v.push(i);
    v.extend_from_slice(&addr);
    v.extend_from_slice(len);
    v.extend_from_slice(&[flags, next]);
    v
}

const NEXT: u8 = 1;
const WRITE: u8 = 2;
const INDIRECT: u8 = 4;

/// queue_pair: tag = op << 1 | queue (0 rx, 1 tx).
fn qp(op: u8, tx: bool) -> u8 {
    op << 1 | u8::from(tx)
}

pub fn queue_pair() -> Vec<(&'static str, Vec<u8>)> {
    let rings = |v: &mut Vec<u8>| {
        v.extend(ring(4, 0x0000, 0x1000, 0x2000));
        v.extend(ring(4, 0x3000, 0x3800, 0x3c00));
    };
    // VERSION_1 + MRG_RXBUF: one tx frame, two rx frames over two buffers.
    let mut mrg = vec![0x09];
    rings(&mut mrg);
    mrg.extend(desc(qp(0, true), 0, data(0), &len8(80), 0, 0));
    mrg.extend([qp(2, true), 0, qp(6, true)]);
    for i in 0..4u8 {
        mrg.extend(desc(
            qp(0, false),
            i,
            data(16 + 32 * i),
            &len16(512),
            WRITE,
            0,
        ));
        mrg.extend([qp(2, false), i]);
    }
    mrg.extend([qp(9, false), 1, 3, 200, 0, 0, 60]);
    mrg.extend([qp(8, false)]);
    // EVENT_IDX + INDIRECT + VERSION_1: tx through an indirect table, rx chained.
    let mut indirect = vec![0x0e];
    rings(&mut indirect);
    indirect.extend(table_desc(qp(1, true), 64, 0, data(0), &len8(12), NEXT, 1));
    indirect.extend(table_desc(qp(1, true), 64, 1, data(1), &len8(64), 0, 0));
    indirect.extend(desc(qp(0, true), 3, data(64), &len8(32), INDIRECT, 0));
    indirect.extend([qp(2, true), 3, qp(4, true), 0, 0, 1, 0, qp(6, true)]);
    indirect.extend(desc(qp(0, false), 0, data(80), &len8(12), WRITE | NEXT, 1));
    indirect.extend(desc(qp(0, false), 1, data(81), &len16(1500), WRITE, 0));
    indirect.extend([qp(2, false), 0, qp(9, false), 0, 3, 100, 2, qp(8, false)]);
    // Legacy header, GSO, a looping tx chain and a parked tx.
    let mut legacy = vec![0x10];
    rings(&mut legacy);
    legacy.extend(desc(qp(0, true), 0, data(0), &len8(10), NEXT, 1));
    legacy.extend(desc(qp(0, true), 1, data(1), &len8(10), NEXT, 0));
    legacy.extend([qp(2, true), 0, qp(6, true), qp(7, true), 1]);
    legacy.extend(desc(qp(0, false), 0, data(80), &len16(4000), WRITE, 0));
    legacy.extend([
        qp(2, false),
        0,
        qp(9, false),
        0,
        5,
        0x40,
        0x1f,
        0,
        0,
        qp(8, false),
    ]);
    legacy.extend([qp(10, false), 0, qp(8, false)]);
    vec![
        ("mrg", mrg),
        ("indirect-event-idx", indirect),
        ("legacy-loop", legacy),
    ]
}

/// ctrl feature word bits (see `FEATURE_BITS` in the target): MQ 0, CTRL_GUEST_OFFLOADS 1,
/// CTRL_MAC_ADDR 2, INDIRECT 3, EVENT_IDX 4, GUEST_CSUM 5, GUEST_TSO4 6, ..., VERSION_1 9,
/// MRG_RXBUF 10, CTRL_VQ 11.
fn ctrl_header(device: bool, word: u16, pairs: u8) -> Vec<u8> {
    let first = ((word & 0x7f) as u8) << 1 | u8::from(device);
    let mut v = vec![first, (word >> 7) as u8, pairs - 1];
    v.extend(ring(3, 0x0000, 0x0200, 0x0400));
    v
}

/// Writes VQ_PAIRS_SET(n) at data slot `slot` and a two-descriptor chain at `index` for it
/// (command, then a 1-byte ack in the next slot), publishes it and kicks.
fn pairs_set(slot: u8, index: u8, n: u8) -> Vec<u8> {
    let mut v = vec![9, slot, n];
    v.extend(desc(0, index, data(slot), &len8(4), NEXT, index + 1));
    v.extend(desc(0, index + 1, data(slot + 1), &len8(1), WRITE, 0));
    v.extend([2, index, 7]);
    v
}

pub fn ctrl() -> Vec<(&'static str, Vec<u8>)> {
    let mq = 1 | 1 << 9 | 1 << 11;
    let all = mq | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6;
    // Direct: walk 1 -> 4 -> 2 -> 3, then a failing detach and a failing park.
    let mut direct = ctrl_header(false, mq, 4);
    direct.extend(pairs_set(0, 0, 4));
    direct.extend(pairs_set(2, 2, 2));
    direct.extend(pairs_set(4, 4, 3));
    direct.extend([6, 1]);
    direct.extend(pairs_set(6, 6, 1));
    direct.extend([8, 0]);
    direct.extend(pairs_set(0, 0, 2));
    // Direct, every control feature: MAC_ADDR_SET and GUEST_OFFLOADS_SET in an indirect
    // table, command split over two descriptors.
    let mut split = ctrl_header(false, all, 2);
    split.extend([5, 7, 32, 2, 1, 1]);
    split.extend([5, 7, 33, 6, 0x02, 0, 0, 0, 0, 0x01]);
    split.extend(table_desc(1, 48, 0, data(32), &len8(2), NEXT, 1));
    split.extend(table_desc(1, 48, 1, data(33), &len8(6), NEXT, 2));
    split.extend(table_desc(1, 48, 2, data(34), &len8(1), WRITE, 0));
    split.extend(desc(0, 0, data(48), &len8(48), INDIRECT, 0));
    split.extend([2, 0, 7]);
    split.extend(pairs_set(8, 2, 2));
    // Device: the real Net, 3 pairs, all backends attached at start; grow, fail an
    // attach, shrink.
    let mut device = ctrl_header(true, mq, 3);
    device.extend([0x07, 0x00]);
    device.extend(pairs_set(0, 0, 3));
    device.extend(pairs_set(2, 2, 1));
    device.extend([6, 0]);
    device.extend(pairs_set(4, 4, 3));
    device.extend(pairs_set(6, 6, 2));
    vec![
        ("direct-walk", direct),
        ("direct-split-indirect", split),
        ("device-walk", device),
    ]
}

/// mmio: handshake, set up `queues` queues of 16 entries, DRIVER_OK, notify, reset.
fn mmio_conversation(device: u8, queues: u8) -> Vec<u8> {
    // Queue size 16; backends 0 and 1 attached at start.
    let mut v = vec![device, 3, 0x03];
    v.push(3);
    v.extend((u64::MAX >> 1).to_le_bytes());
    for q in 0..queues {
        let base = 0x1000 * u16::from(q);
        v.push(4);
        v.push(q);
        v.extend(ring(4, base, base + 0x100, base + 0x200));
    }
    // Status := 0xf (REGS[15] is REG_STATUS; width 4; value tag 0, u8).
    v.extend([1, 15, 2, 0, 0x0f]);
    // A tx chain on queue 1 and a notify.
    v.extend([5, 1, 0, 0]);
    v.extend(&data(0));
    v.extend(&len8(60));
    v.extend([0, 0]);
    v.extend([5, 1, 2, 0, 6, 1]);
    // An rx buffer on queue 0, a frame, a notify.
    v.extend([5, 0, 0, 0]);
    v.extend(&data(16));
    v.extend(&len16(1600));
    v.extend([WRITE, 0]);
    v.extend([5, 0, 2, 0, 7, 0, 80, 0, 6, 0]);
    // Config space reads of every width, interrupt status and ack.
    v.extend([0, 0x80, 0, 0, 0x86, 1, 0, 0x88, 3, 0, 13, 2, 1, 14, 2, 0, 3]);
    // Reset.
    v.extend([1, 15, 2, 0, 0]);
    v
}

/// mmio, 2 pairs: after DRIVER_OK, VQ_PAIRS_SET(2) then (1) on the control queue (index 4),
/// then the reset of `mmio_conversation` while the control thread runs.
fn mmio_ctrl() -> Vec<u8> {
    let mut v = mmio_conversation(0x01, 5);
    let reset = v.split_off(v.len() - 5);
    for (i, n) in [(0u8, 2u8), (2, 1)] {
        let slot = 40 + 2 * i;
        // Patch the command bytes: class MQ (4), VQ_PAIRS_SET (0), n.
        v.extend([5, 4, 5]);
        v.extend(&data(slot));
        v.extend([4, 4, 0, n, 0]);
        v.extend([5, 4, 0, i]);
        v.extend(&data(slot));
        v.extend(&len8(4));
        v.extend([NEXT, i + 1]);
        v.extend([5, 4, 0, i + 1]);
        v.extend(&data(slot + 1));
        v.extend(&len8(1));
        v.extend([WRITE, 0]);
        v.extend([5, 4, 2, i, 6, 4]);
    }
    v.extend(reset);
    v
}

pub fn mmio() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("two-pairs-ctrl", mmio_ctrl()),
        ("two-pairs", mmio_conversation(0x01, 5)),
        ("one-pair-no-mq", mmio_conversation(0x10, 2)),
        ("four-pairs-mtu", mmio_conversation(0x23, 9)),
    ]
}

/// pci: `Vm::vector` encoding of vector `v` (one the table has).
fn pci_vector(v: u8) -> u8 {
    v << 2 | 1
}

/// pci: a driver bringing the function up the way Linux's virtio_pci_modern does: MSI-X on
/// and every vector aimed at the LAPIC, handshake, `queues` queues of 16 entries each with its
/// own vector, DRIVER_OK, a transmitted and a received frame with their notifies, ISR,
/// status and PBA reads, a vector masked and unmasked, reset. `via` 1 goes through the
/// PCI_CFG window instead of the BAR.
fn pci_conversation(device: u8, queues: u8, via: u8) -> Vec<u8> {
    use crate::pci_op as op;
    // Queue size 16; backends 0 and 1 attached at start.
    let mut v = vec![device, 3, 0x03];
    v.extend([op::MSIX_CONTROL, 0x80]);
    for vector in 0..=queues {
        v.extend([op::MSIX_ENTRY, via, vector, 0, 0x30 + vector, 0, 0]);
    }
    v.push(op::HANDSHAKE);
    v.push(via);
    v.extend((u64::MAX >> 1).to_le_bytes());
    for q in 0..queues {
        let base = 0x1000 * u16::from(q);
        v.extend([op::QUEUE, via, q]);
        v.extend(ring(4, base, base + 0x100, base + 0x200));
        v.push(pci_vector(q));
    }
    v.extend([op::VECTOR, via | 2, pci_vector(queues)]);
    v.extend([op::STATUS, via | 1 << 1]);
    // A tx chain on queue 1 and a notify (16-bit, as Linux writes it).
    v.extend([op::RING, 1, 0, 0]);
    v.extend(data(0));
    v.extend(len8(60));
    v.extend([0, 0]);
    v.extend([op::RING, 1, 2, 0, op::NOTIFY, via | 2, 1]);
    // An rx buffer on queue 0, a frame in backend 0, a notify.
    v.extend([op::RING, 0, 0, 0]);
    v.extend(data(16));
    v.extend(len16(1600));
    v.extend([WRITE, 0]);
    v.extend([
        op::RING,
        0,
        2,
        0,
        op::BACKEND,
        0,
        0,
        80,
        0,
        op::NOTIFY,
        via | 2,
        0,
    ]);
    // ISR (class 1), device status (common field 6) and NUM_QUEUES (field 5), the PBA
    // (class 5, 8 bytes), device config (class 2, 6 bytes in: status).
    v.extend([
        op::BAR_READ,
        0x20,
        0,
        op::BAR_READ,
        6,
        0,
        op::BAR_READ,
        5,
        1,
    ]);
    v.extend([op::BAR_READ, 0xa0, 3, op::BAR_READ, 0x46, 1]);
    // Mask vector 1, more rx, unmask.
    v.extend([op::MSIX_MASK, via | 2, 1, op::BACKEND, 1, 0, 60, 0]);
    v.extend([op::MSIX_MASK, via, 1]);
    // Reset.
    v.extend([op::STATUS, via]);
    v
}

/// pci: conf1 probing as Linux does it, BAR 0 sized and moved while the device runs
/// (ioeventfds follow), decode off and on, an MSI route that fails, and reset.
fn pci_relocation() -> Vec<u8> {
    use crate::pci_op as op;
    let mut v = vec![0x23, 3, 0x0f];
    // A byte to 0xCFB, 0x80000000 to 0xCF8 and back; the host bridge's class word (register
    // 0x0a, 16 bits).
    v.extend([op::PORT, 0x83, 0, 1]);
    v.extend([op::PORT, 0x90, 2, 0, 0, 0, 0x80]);
    v.extend([op::PORT, 0x10]);
    v.extend([op::CFG_READ, 0xc0, 0x0a, 5, 1]);
    // The second route push fails, then the first ioeventfd removal.
    v.extend([op::BACKEND, 3 | 2 << 2, 1, op::BACKEND, 3 | 4 << 2, 0]);
    v.extend([op::MSIX_CONTROL, 0xc0]);
    for vector in 0..3 {
        v.extend([op::MSIX_ENTRY, 0, vector, vector, 0x40 + vector, 0, 0]);
    }
    // Sizing with decode off, then 32 BARs further, decode on.
    v.extend([op::RELOCATE, 0x17, 32, 0]);
    v.push(op::HANDSHAKE);
    v.push(0);
    v.extend((u64::MAX >> 1).to_le_bytes());
    for q in 0..2u8 {
        let base = 0x1000 * u16::from(q);
        v.extend([op::QUEUE, 2, q]);
        v.extend(ring(4, base, base + 0x100, base + 0x200));
        v.push(pci_vector(q));
    }
    v.extend([op::STATUS, 2, op::MSIX_CONTROL, 0x80]);
    v.extend([op::RING, 1, 0, 0]);
    v.extend(data(0));
    v.extend(len8(60));
    v.extend([0, 0]);
    v.extend([op::RING, 1, 2, 0, op::NOTIFY, 2, 1]);
    // Decode off (the BAR stays programmed), a notify that reaches nothing, then the top of
    // the window with decode on, and a notify there.
    v.extend([op::RELOCATE, 0x01, op::NOTIFY, 2, 1]);
    v.extend([op::RELOCATE, 0x1c, 1, op::NOTIFY, 2, 1]);
    v.extend([op::STATUS, 0]);
    v
}

/// pci, 2 pairs: the conversation up to DRIVER_OK, then VQ_PAIRS_SET(2) and (1) on the
/// control queue (index 4), then reset while the control thread runs.
fn pci_ctrl() -> Vec<u8> {
    use crate::pci_op as op;
    let mut v = pci_conversation(0x01, 5, 0);
    let reset = v.split_off(v.len() - 2);
    for (i, n) in [(0u8, 2u8), (2, 1)] {
        let slot = 40 + 2 * i;
        // The command bytes: class MQ (4), VQ_PAIRS_SET (0), n.
        v.extend([op::RING, 4, 5]);
        v.extend(data(slot));
        v.extend([4, 4, 0, n, 0]);
        v.extend([op::RING, 4, 0, i]);
        v.extend(data(slot));
        v.extend(len8(4));
        v.extend([NEXT, i + 1]);
        v.extend([op::RING, 4, 0, i + 1]);
        v.extend(data(slot + 1));
        v.extend(len8(1));
        v.extend([WRITE, 0]);
        v.extend([op::RING, 4, 2, i, op::NOTIFY, 2, 4]);
    }
    v.extend(reset);
    v
}

pub fn pci() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("two-pairs", pci_conversation(0x01, 5, 0)),
        ("one-pair-pci-cfg", pci_conversation(0x10, 2, 1)),
        ("two-pairs-ctrl", pci_ctrl()),
        ("relocation", pci_relocation()),
    ]
}

/// `api`: a mode byte (bit 0 network device, bit 2 through a connection, bits 3..7 the
/// piece size), then a request.
pub fn api() -> Vec<(&'static str, Vec<u8>)> {
    let seed = |mode: u8, request: &str| [&[mode][..], request.as_bytes()].concat();
    vec![
        ("counters", seed(1, r#"{"command":"counters"}"#)),
        ("queues", seed(1, r#"{"command":"queues"}"#)),
        ("link-down", seed(1, r#"{"command":"link","up":false}"#)),
        (
            "link-up-tap-gone",
            seed(3, r#"{"command":"link","up":true}"#),
        ),
        ("shutdown", seed(0, r#"{"command":"shutdown"}"#)),
        (
            "connection-in-pieces",
            seed(
                1 | 4 | (2 << 3),
                "{\"command\":\"link\",\"up\":true}\n{\"command\":\"shutdown\"}\n",
            ),
        ),
        ("no-device", seed(0, r#"{"command":"counters"}"#)),
    ]
}
