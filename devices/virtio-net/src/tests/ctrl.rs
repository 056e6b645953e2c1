// SPDX-License-Identifier: Apache-2.0
//! Control queue: parsing odd buffer layouts, feature gating, range checks, and the reply.

use std::time::Instant;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MQ,
};

use super::*;
use crate::ctrl::{execute, CtrlQueue, CtrlTarget, ACK_ERR, ACK_OK, CTRL_BUDGET};
use crate::features::{bit, Negotiated};
use crate::rxtx::Work;

const MQ: u8 = VIRTIO_NET_CTRL_MQ as u8;
const SET: u8 = 0;

#[derive(Default)]
struct FakeTarget {
    max: u16,
    pairs: Vec<u16>,
    offloads: Vec<u64>,
    macs: Vec<[u8; 6]>,
    refuse: bool,
    stopping: bool,
}

impl CtrlTarget for FakeTarget {
    fn max_pairs(&self) -> u16 {
        self.max
    }
    fn set_queue_pairs(&mut self, n: u16) -> bool {
        self.pairs.push(n);
        !self.refuse
    }
    fn set_guest_offloads(&mut self, offloads: u64) -> bool {
        self.offloads.push(offloads);
        !self.refuse
    }
    fn set_mac(&mut self, mac: [u8; 6]) -> bool {
        self.macs.push(mac);
        true
    }
    fn stopping(&self) -> bool {
        self.stopping
    }
}

fn target() -> FakeTarget {
    FakeTarget {
        max: 4,
        ..Default::default()
    }
}

fn all_ctrl() -> Negotiated {
    Negotiated(
        F_BASE
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_MQ)
            | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
            | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4),
    )
}

#[test]
fn vq_pairs_set_range_is_checked_before_anything_happens() {
    let f = all_ctrl();
    for (n, ok) in [
        (0u16, false),
        (1, true),
        (4, true),
        (5, false),
        (0x8001, false),
    ] {
        let mut t = target();
        let ack = execute(f, MQ, SET, &n.to_le_bytes(), &mut t);
        assert_eq!(ack == ACK_OK, ok, "n = {n}");
        assert_eq!(t.pairs, if ok { vec![n] } else { vec![] }, "n = {n}");
    }
}

#[test]
fn short_data_and_trailing_bytes() {
    let f = all_ctrl();
    let mut t = target();
    assert_eq!(
        execute(f, MQ, SET, &[2], &mut t),
        ACK_ERR,
        "one byte of a u16"
    );
    assert_eq!(execute(f, MQ, SET, &[], &mut t), ACK_ERR);
    assert_eq!(
        execute(f, MQ, SET, &[3, 0, 0xff, 0xff, 7], &mut t),
        ACK_OK,
        "trailing bytes ignored"
    );
    assert_eq!(t.pairs, vec![3]);
}

#[test]
fn commands_of_features_not_negotiated_are_refused() {
    let mut t = target();
    let none = Negotiated(F_BASE | bit(VIRTIO_NET_F_CTRL_VQ));
    assert_eq!(execute(none, MQ, SET, &2u16.to_le_bytes(), &mut t), ACK_ERR);
    let offl = VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
    assert_eq!(execute(none, offl, 0, &[0; 8], &mut t), ACK_ERR);
    let mac = VIRTIO_NET_CTRL_MAC as u8;
    let set = VIRTIO_NET_CTRL_MAC_ADDR_SET as u8;
    assert_eq!(
        execute(none, mac, set, &[2, 0, 0, 0, 0, 1], &mut t),
        ACK_ERR
    );
    assert!(t.pairs.is_empty() && t.offloads.is_empty() && t.macs.is_empty());

    // CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE and RSS are never offered.
    let f = all_ctrl();
    let refused = [
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, vec![1u8]),
        (
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_TABLE_SET,
            vec![0u8; 8],
        ),
        (VIRTIO_NET_CTRL_VLAN, 0, vec![0u8; 2]),
        (VIRTIO_NET_CTRL_ANNOUNCE, 0, vec![]),
        (
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
            vec![0u8; 64],
        ),
    ];
    for (class, cmd, data) in refused {
        assert_eq!(
            execute(f, class as u8, cmd as u8, &data, &mut t),
            ACK_ERR,
            "{class}/{cmd}"
        );
    }
}

#[test]
fn unknown_class_and_command_are_refused() {
    let f = all_ctrl();
    let mut t = target();
    assert_eq!(execute(f, 99, 0, &[1, 0], &mut t), ACK_ERR);
    assert_eq!(execute(f, MQ, 7, &[1, 0], &mut t), ACK_ERR);
    assert!(t.pairs.is_empty());
}

#[test]
fn guest_offloads_must_be_negotiated_bits() {
    let f = all_ctrl();
    let mut t = target();
    let offl = VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
    let ok = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    assert_eq!(execute(f, offl, 0, &ok.to_le_bytes(), &mut t), ACK_OK);
    assert_eq!(execute(f, offl, 0, &0u64.to_le_bytes(), &mut t), ACK_OK);
    let tso6 = bit(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO6);
    assert_eq!(execute(f, offl, 0, &tso6.to_le_bytes(), &mut t), ACK_ERR);
    assert_eq!(
        execute(f, offl, 0, &[1, 0, 0], &mut t),
        ACK_ERR,
        "short u64"
    );
    assert_eq!(t.offloads, vec![ok, 0]);
}

#[test]
fn mac_addr_set_with_the_feature() {
    let f = all_ctrl();
    let mut t = target();
    let mac = VIRTIO_NET_CTRL_MAC as u8;
    let set = VIRTIO_NET_CTRL_MAC_ADDR_SET as u8;
    assert_eq!(execute(f, mac, set, &[2, 1, 2, 3, 4, 5], &mut t), ACK_OK);
    assert_eq!(execute(f, mac, set, &[2, 1, 2], &mut t), ACK_ERR);
    assert_eq!(t.macs, vec![[2, 1, 2, 3, 4, 5]]);
}

#[test]
fn refused_by_target_means_err() {
    let f = all_ctrl();
    let mut t = FakeTarget {
        max: 4,
        refuse: true,
        ..Default::default()
    };
    assert_eq!(execute(f, MQ, SET, &2u16.to_le_bytes(), &mut t), ACK_ERR);
}

/// A control queue over a test ring, with everything negotiated.
struct CtrlRig<'a> {
    q: TestQueue<'a>,
    cq: CtrlQueue,
    irq: Arc<RecordingInterrupt>,
    metrics: Arc<NetMetrics>,
}

fn ctrl_rig(mem: &GuestMemoryMmap) -> CtrlRig<'_> {
    let q = TestQueue::new(mem, 0, 16);
    let irq = Arc::new(RecordingInterrupt::default());
    let metrics = metrics(4);
    let cq = CtrlQueue::new(
        q.queue(false),
        8,
        mem.clone(),
        irq.clone(),
        metrics.clone(),
        all_ctrl(),
    );
    CtrlRig {
        q,
        cq,
        irq,
        metrics,
    }
}

impl CtrlRig<'_> {
    fn run(&mut self, t: &mut FakeTarget) {
        self.cq.process(t, Instant::now());
    }
}

/// Writes `bytes` at `addr` and returns a readable descriptor for them.
fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Segment {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    r(addr, bytes.len() as u32)
}

#[test]
fn header_and_data_in_any_descriptor_layout() {
    let mem = guest_memory();
    let mut rig = ctrl_rig(&mem);
    let ack = BUF + 0x1000;
    let layouts: Vec<Vec<Segment>> = vec![
        // class+command, data, ack: the Linux layout.
        vec![
            put(&mem, BUF, &[MQ, SET]),
            put(&mem, BUF + 0x10, &[3, 0]),
            w(ack, 1),
        ],
        // Everything readable in one descriptor.
        vec![put(&mem, BUF + 0x20, &[MQ, SET, 3, 0]), w(ack + 1, 1)],
        // One byte per descriptor.
        vec![
            put(&mem, BUF + 0x30, &[MQ]),
            put(&mem, BUF + 0x40, &[SET]),
            put(&mem, BUF + 0x50, &[3]),
            put(&mem, BUF + 0x60, &[0]),
            w(ack + 2, 1),
        ],
        // Command and half the data together, long trailing data, two writable descriptors:
        // the ack goes into the first writable byte (a result would follow it).
        vec![
            put(&mem, BUF + 0x70, &[MQ]),
            put(&mem, BUF + 0x80, &[SET, 3]),
            put(&mem, BUF + 0x90, &[0; 100]),
            w(ack + 0x10, 4),
            w(ack + 0x20, 3),
        ],
    ];
    let ack_bytes = [ack, ack + 1, ack + 2, ack + 0x10];
    mem.write_slice(&[0xaa; 0x40], GuestAddress(ack)).unwrap();
    for l in &layouts {
        rig.q.add(l);
    }
    let mut t = target();
    rig.run(&mut t);

    assert_eq!(t.pairs, vec![3, 3, 3, 3]);
    assert_eq!(rig.q.used_idx(), 4);
    for (i, at) in ack_bytes.iter().enumerate() {
        assert_eq!(read_guest(&mem, *at, 1), [ACK_OK], "layout {i}");
        assert_eq!(rig.q.used(i as u16).1, 1, "layout {i}: one byte written");
    }
    assert_eq!(
        read_guest(&mem, ack + 0x11, 3),
        [0xaa; 3],
        "only the ack byte is written"
    );
    assert_eq!(read_guest(&mem, ack + 0x20, 3), [0xaa; 3]);
    assert_eq!(get(&rig.metrics.ctrl.packets), 4);
    assert!(rig.irq.count(8) >= 1);
    assert_eq!(get(&rig.metrics.vq_pairs_set), 4);
}

#[test]
fn short_readable_part_gets_err_and_unanswerable_chains_are_returned_empty() {
    let mem = guest_memory();
    let mut rig = ctrl_rig(&mem);
    let ack = BUF + 0x1000;
    mem.write_slice(&[0xaa; 0x10], GuestAddress(ack)).unwrap();
    rig.q.add(&[put(&mem, BUF, &[MQ]), w(ack, 1)]); // one readable byte
    rig.q.add(&[w(ack + 1, 1)]); // nothing readable
    let no_ack = rig.q.add(&[put(&mem, BUF + 0x10, &[MQ, SET, 1, 0])]);
    let backwards = rig
        .q
        .add(&[w(ack + 2, 1), put(&mem, BUF + 0x20, &[MQ, SET, 1, 0])]);
    let empty_ack = rig
        .q
        .add(&[put(&mem, BUF + 0x30, &[MQ, SET, 1, 0]), w(ack + 3, 0)]);
    let outside = rig.q.add(&[r(MEM_END + 0x100, 4), w(ack + 4, 1)]);
    let mut t = target();
    rig.run(&mut t);

    assert!(t.pairs.is_empty(), "nothing was executed");
    assert_eq!(rig.q.used_idx(), 6);
    assert_eq!(read_guest(&mem, ack, 2), [ACK_ERR, ACK_ERR]);
    assert_eq!(rig.q.used(2), (no_ack, 0));
    assert_eq!(rig.q.used(3), (backwards, 0));
    assert_eq!(rig.q.used(4), (empty_ack, 0));
    assert_eq!(rig.q.used(5), (outside, 0));
    assert_eq!(read_guest(&mem, ack + 2, 3), [0xaa; 3]);
    assert_eq!(get(&rig.metrics.ctrl.bad_chains), 4);
    assert_eq!(get(&rig.metrics.ctrl.drops), 2);
}

/// A control queue of `size` entries at 0, everything negotiated, with `irq`.
fn ctrl_queue(
    mem: &GuestMemoryMmap,
    size: u16,
    irq: Arc<dyn Interrupt>,
    metrics: Arc<NetMetrics>,
) -> (TestQueue<'_>, CtrlQueue) {
    let q = TestQueue::new(mem, 0, size);
    let cq = CtrlQueue::new(q.queue(false), 8, mem.clone(), irq, metrics, all_ctrl());
    (q, cq)
}

#[test]
fn a_bounded_number_of_commands_is_answered_per_call_and_none_once_stopping() {
    let mem = guest_memory();
    let irq = Arc::new(RecordingInterrupt::default());
    let (mut q, mut cq) = ctrl_queue(&mem, 128, irq, metrics(4));
    let commands = CTRL_BUDGET as u16 + 36;
    for i in 0..u64::from(commands) {
        q.add(&[
            put(&mem, BUF + 0x10 * i, &[MQ, SET, 2, 0]),
            w(BUF + 0x1000 + i, 1),
        ]);
    }
    let mut t = target();
    assert_eq!(cq.process(&mut t, Instant::now()), Work::More);
    assert_eq!(usize::from(q.used_idx()), CTRL_BUDGET);
    assert_eq!(cq.process(&mut t, Instant::now()), Work::Done);
    assert_eq!(q.used_idx(), commands);

    // Once the device is stopping, nothing more is answered or carried out.
    q.add(&[put(&mem, BUF, &[MQ, SET, 3, 0]), w(BUF + 0x1000, 1)]);
    t.stopping = true;
    cq.process(&mut t, Instant::now());
    assert_eq!(q.used_idx(), commands);
    assert_eq!(t.pairs.len(), usize::from(commands));
}

/// Records the control counters at the moment the used-buffer interrupt is raised.
#[derive(Default)]
struct CountersAtInterrupt {
    metrics: Mutex<Option<Arc<NetMetrics>>>,
    seen: Mutex<Vec<(u64, u64, u64)>>,
}

impl Interrupt for CountersAtInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> io::Result<()> {
        if let Some(m) = self.metrics.lock().unwrap().as_ref() {
            self.seen.lock().unwrap().push((
                get(&m.vq_pairs_set),
                get(&m.vq_pairs_set_errors),
                get(&m.ctrl.drops),
            ));
        }
        Ok(())
    }
    fn signal_config(&self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn counters_are_updated_before_the_answer_is_published() {
    let mem = guest_memory();
    let irq = Arc::new(CountersAtInterrupt::default());
    let m = metrics(4);
    *irq.metrics.lock().unwrap() = Some(m.clone());
    let (mut q, mut cq) = ctrl_queue(&mem, 16, irq.clone(), m);
    let mut t = target();
    // One good and one refused VQ_PAIRS_SET, answered one at a time.
    for (i, n) in [2u8, 9].into_iter().enumerate() {
        q.add(&[
            put(&mem, BUF + 0x10 * i as u64, &[MQ, SET, n, 0]),
            w(BUF + 0x1000, 1),
        ]);
        cq.process(&mut t, Instant::now());
    }
    assert_eq!(*irq.seen.lock().unwrap(), [(1, 0, 0), (2, 1, 1)]);
}

#[test]
fn receive_filter_commands_follow_their_features() {
    let rx = VIRTIO_NET_CTRL_RX as u8;
    let base = all_ctrl();
    let with_rx = Negotiated(base.0 | bit(VIRTIO_NET_F_CTRL_RX));
    let with_extra = Negotiated(with_rx.0 | bit(VIRTIO_NET_F_CTRL_RX_EXTRA));
    let mut t = target();
    // PROMISC and ALLMULTI need CTRL_RX; ALLUNI, NOMULTI, NOUNI, NOBCAST need RX_EXTRA.
    for (cmd, needs_extra) in [
        (0u8, false),
        (1, false),
        (2, true),
        (3, true),
        (4, true),
        (5, true),
    ] {
        assert_eq!(
            execute(base, rx, cmd, &[1], &mut t),
            ACK_ERR,
            "cmd {cmd} without CTRL_RX"
        );
        let expect = if needs_extra { ACK_ERR } else { ACK_OK };
        assert_eq!(execute(with_rx, rx, cmd, &[1], &mut t), expect, "cmd {cmd}");
        assert_eq!(
            execute(with_extra, rx, cmd, &[1], &mut t),
            ACK_OK,
            "cmd {cmd}"
        );
        assert_eq!(
            execute(with_extra, rx, cmd, &[], &mut t),
            ACK_ERR,
            "no on/off byte"
        );
    }
    assert_eq!(
        execute(with_extra, rx, 6, &[1], &mut t),
        ACK_ERR,
        "unknown RX command"
    );
    // MAC_TABLE_SET needs CTRL_RX too.
    let mac = VIRTIO_NET_CTRL_MAC as u8;
    let empty = [0u8; 8];
    assert_eq!(execute(base, mac, 0, &empty, &mut t), ACK_ERR);
    assert_eq!(execute(with_rx, mac, 0, &empty, &mut t), ACK_OK);
}
