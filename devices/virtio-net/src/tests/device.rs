// SPDX-License-Identifier: Apache-2.0
//! The whole device with its threads: activation, VQ_PAIRS_SET through the control queue
//! (order, ack timing, rollback), offloads, link, reset.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MQ, VIRTIO_NET_F_STATUS,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::ctrl::{ACK_ERR, ACK_OK};
use crate::features::bit;
use crate::{Error, Net, NetConfig};

pub(super) const QSIZE: u16 = 16;
const CTRL_BUF: u64 = 0x20_0000;
pub(super) const RX_BUF: u64 = 0x30_0000;
const TX_BUF: u64 = 0x50_0000;

pub(super) fn f_mq() -> u64 {
    F_MRG
        | F_EVENT_IDX
        | bit(VIRTIO_NET_F_MQ)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
}

pub(super) struct Rig<'a, B: Backend + 'static = SockBackend> {
    pub mem: &'a GuestMemoryMmap,
    pub net: Net<B>,
    pub peers: Vec<Peer>,
    pub journal: Arc<Journal>,
    pub irq: Arc<RecordingInterrupt>,
    /// Driver side of every queue the device has, by index.
    pub q: Vec<TestQueue<'a>>,
    pub kicks: Vec<EventFd>,
    pub ctrl_index: usize,
    cmds: u64,
}

fn base(index: usize) -> u64 {
    index as u64 * 0x4000
}

/// A device over `backends` with features `acked`, and the queues in `ready` set up.
pub(super) fn rig_over<B: Backend + 'static>(
    mem: &GuestMemoryMmap,
    backends: Vec<B>,
    cfg: NetConfig,
    acked: u64,
    ready: impl Fn(usize) -> bool,
) -> Result<Rig<'_, B>, Error> {
    rig_over_with(mem, backends, cfg, acked, ready, None, None)
}

/// The same, with the tap's steering written through `steering` and the pairs on
/// `io_threads` worker threads (`None`: one per pair).
pub(super) fn rig_over_with<B: Backend + 'static>(
    mem: &GuestMemoryMmap,
    backends: Vec<B>,
    cfg: NetConfig,
    acked: u64,
    ready: impl Fn(usize) -> bool,
    steering: Option<Arc<dyn crate::steer::Steering>>,
    io_threads: Option<usize>,
) -> Result<Rig<'_, B>, Error> {
    let mut net = Net::with_steering(cfg, backends, steering)?;
    if let Some(threads) = io_threads {
        net.set_io_threads(threads);
    }
    net.set_acked_features(acked);
    let count = net.queue_max_sizes().len();
    let ctrl_index = usize::from(net.ctrl_queue_index());
    let q: Vec<TestQueue> = (0..count)
        .map(|i| TestQueue::new(mem, base(i), QSIZE))
        .collect();
    let kicks: Vec<EventFd> = (0..count)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let event_idx = acked & F_EVENT_IDX != 0;
    let queues = (0..count)
        .filter(|&i| ready(i))
        .map(|i| {
            (
                i as u16,
                q[i].queue(event_idx),
                kicks[i].try_clone().unwrap(),
            )
        })
        .collect();
    let irq = Arc::new(RecordingInterrupt::default());
    net.activate(mem.clone(), irq.clone(), queues)?;
    Ok(Rig {
        mem,
        net,
        peers: Vec::new(),
        journal: Arc::new(Journal::default()),
        irq,
        q,
        kicks,
        ctrl_index,
        cmds: 0,
    })
}

/// A device over `pairs` socket backends that report `mtu` (0: unknown), with `acked`
/// features and every queue set up.
pub(super) fn socket_rig(mem: &GuestMemoryMmap, pairs: u16, mtu: u32, acked: u64) -> Rig<'_> {
    let (b, peers, journal) = backends(pairs);
    for backend in &b {
        backend.mtu.store(mtu, Ordering::SeqCst);
    }
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    let mut rig = rig_over(mem, b, cfg, acked, |_| true).unwrap();
    rig.peers = peers;
    rig.journal = journal;
    rig
}

/// A device over socket backends with `pairs` pairs.
fn rig_with(
    mem: &GuestMemoryMmap,
    pairs: u16,
    cfg: NetConfig,
    acked: u64,
    ready: impl Fn(usize) -> bool,
) -> Result<Rig<'_>, Error> {
    let (b, peers, journal) = backends(pairs);
    let mut rig = rig_over(mem, b, cfg, acked, ready)?;
    rig.peers = peers;
    rig.journal = journal;
    Ok(rig)
}

fn rig(mem: &GuestMemoryMmap, pairs: u16) -> Rig<'_> {
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    rig_with(mem, pairs, cfg, f_mq(), |_| true).unwrap()
}

impl<B: Backend + 'static> Rig<'_, B> {
    pub fn kick(&self, index: usize) {
        self.kicks[index].write(1).unwrap();
    }

    /// Sends a control command and returns the ack byte.
    pub fn command(&mut self, class: u32, cmd: u32, data: &[u8]) -> u8 {
        // Room for the largest command (RSS_CONFIG: 309 bytes) before the ack.
        let at = CTRL_BUF + self.cmds * 0x400;
        let ack = at + 0x3f0;
        self.cmds += 1;
        let mut bytes = vec![class as u8, cmd as u8];
        bytes.extend_from_slice(data);
        assert!(bytes.len() <= 0x3f0, "command too long for the rig");
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(ack)).unwrap();
        let ci = self.ctrl_index;
        let before = self.q[ci].used_idx();
        self.q[ci].add(&[r(at, bytes.len() as u32), w(ack, 1)]);
        self.kick(ci);
        assert!(
            self.q[ci].wait_used(before.wrapping_add(1)),
            "control command answered"
        );
        read_guest(self.mem, ack, 1)[0]
    }

    pub fn set_pairs(&mut self, n: u16) -> u8 {
        self.command(VIRTIO_NET_CTRL_MQ, 0, &n.to_le_bytes())
    }

    /// Attach state as the backends report it (TUNGETIFF for a tap).
    pub fn attached(&self) -> Vec<bool> {
        self.net
            .backends()
            .iter()
            .map(|b| b.is_attached().unwrap())
            .collect()
    }

    pub fn parked(&self) -> Vec<bool> {
        let m = self.net.metrics();
        m.pairs
            .iter()
            .map(|p| p.parked.load(Ordering::SeqCst))
            .collect()
    }

    /// Fills rx queue `p` with 2 KiB buffers. With MRG_RXBUF and GSO the device reads only
    /// once it holds room for a 64 KiB frame or the whole ring.
    pub fn fill_rx(&mut self, p: usize) {
        for slot in 0..u64::from(QSIZE) {
            self.q[2 * p].add(&[w(RX_BUF + p as u64 * 0x10000 + slot * 0x1000, 2048)]);
        }
    }

    /// Sends `f` from the host side of pair `p` and waits until rx `p` used it.
    pub fn deliver(&mut self, p: usize, f: &[u8]) -> bool {
        let before = self.q[2 * p].used_idx();
        self.peers[p].send(f);
        self.q[2 * p].wait_used(before.wrapping_add(1))
    }

    /// Transmits `f` on pair `p`.
    pub fn transmit(&mut self, p: usize, f: &[u8]) {
        let at = TX_BUF + p as u64 * 0x10000;
        self.mem.write_slice(f, GuestAddress(at)).unwrap();
        self.q[2 * p + 1].add(&[r(at, f.len() as u32)]);
        self.kick(2 * p + 1);
    }
}

#[test]
fn the_device_can_move_to_the_transport_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Net<tap::TapQueue>>();
    assert_send::<Net<SockBackend>>();
}

#[test]
fn backend_count_is_checked() {
    let (b, _, _) = backends(0);
    assert!(matches!(
        Net::new(NetConfig::default(), b),
        Err(Error::Config(_))
    ));
    let (b, _, _) = backends(65);
    assert!(Net::new(NetConfig::default(), b).is_err());
    let (b, _, _) = backends(16);
    let net = Net::new(NetConfig::default(), b).unwrap();
    assert_eq!(net.queue_max_sizes(), vec![256; 33]);
    assert_eq!(Net::<SockBackend>::DEVICE_TYPE, 1);
}

#[test]
fn activation_enables_pair_0_only_and_configures_the_backend() {
    let mem = guest_memory();
    let rig = rig(&mem, 4);
    assert_eq!(rig.attached(), [true, false, false, false]);
    assert_eq!(rig.parked(), [false, true, true, true]);
    assert_eq!(rig.net.active_queue_pairs(), 1);
    let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(
        rig.journal.ops(),
        [
            Op::Detach(1),
            Op::Detach(2),
            Op::Detach(3),
            Op::VnetHdr(0, 12),
            Op::Offload(0, flags)
        ]
    );
}

#[test]
fn frames_flow_through_pair_0() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 2);
    rig.fill_rx(0);
    let f = frame(&payload(1000, 1));
    assert!(rig.deliver(0, &f));
    assert_eq!(read_guest(&mem, RX_BUF + 12, 1000), f[12..]);

    let t = frame(&payload(700, 2));
    rig.transmit(0, &t);
    assert_eq!(rig.peers[0].recv_wait().unwrap(), t);
    let m = rig.net.metrics();
    assert!(wait_for(|| get(&m.pairs[0].tx.packets) == 1));
    assert_eq!(get(&m.pairs[0].tx.notifications), 1);
    assert_eq!(get(&m.pairs[0].rx.packets), 1);
    assert!(rig.irq.count(0) >= 1 && rig.irq.count(1) >= 1);
}

#[test]
fn rx_resumes_when_the_guest_adds_buffers() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 1);
    let f = frame(&payload(300, 3));
    rig.peers[0].send(&f);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.q[0].used_idx(), 0);
    rig.fill_rx(0);
    rig.kick(0);
    assert!(rig.q[0].wait_used(1));
    assert_eq!(read_guest(&mem, RX_BUF + 12, 300), f[12..]);
}

#[test]
fn vq_pairs_set_switches_backends_and_workers_and_acks_last() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 4);
    let metrics = rig.net.metrics();

    // At every backend operation: a detached pair's worker has already parked, an attached
    // pair's worker has not resumed yet, and the command is not answered yet.
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let used_at_op = Arc::new(Mutex::new(Vec::<u16>::new()));
    {
        let m = metrics.clone();
        let mem = mem.clone();
        let v = violations.clone();
        let u = used_at_op.clone();
        let used_idx_addr = rig.q[rig.ctrl_index].queue(false).used_ring() + 2;
        *rig.journal.probe.lock().unwrap() = Some(Box::new(move |op| {
            let parked = |p: u16| m.pairs[usize::from(p)].parked.load(Ordering::SeqCst);
            match op {
                Op::Detach(p) if !parked(*p) => v.lock().unwrap().push(format!("{op:?} unparked")),
                Op::Attach(p) if !parked(*p) => v.lock().unwrap().push(format!("{op:?} running")),
                _ => {}
            }
            let idx: u16 = mem.read_obj(GuestAddress(used_idx_addr)).unwrap();
            u.lock().unwrap().push(idx);
        }));
    }
    rig.journal.clear();

    assert_eq!(rig.set_pairs(4), ACK_OK);
    assert_eq!(rig.attached(), [true; 4]);
    assert_eq!(rig.parked(), [false; 4]);
    assert_eq!(rig.net.active_queue_pairs(), 4);
    // Frames sent to pair 3's host queue arrive on rx3.
    rig.fill_rx(3);
    let f = frame(&payload(500, 4));
    assert!(rig.deliver(3, &f));
    assert_eq!(read_guest(&mem, RX_BUF + 3 * 0x10000 + 12, 500), f[12..]);

    assert_eq!(rig.set_pairs(1), ACK_OK);
    assert_eq!(rig.attached(), [true, false, false, false]);
    assert_eq!(rig.parked(), [false, true, true, true]);
    let ops = rig.journal.ops();
    let detaches: Vec<&Op> = ops.iter().filter(|o| matches!(o, Op::Detach(_))).collect();
    assert_eq!(detaches, [&Op::Detach(3), &Op::Detach(2), &Op::Detach(1)]);
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    // Every backend operation of command k happened while the used index was still k - 1.
    let used = used_at_op.lock().unwrap().clone();
    assert!(used.iter().take(9).all(|&i| i == 0), "{used:?}");
    assert!(used.iter().skip(9).all(|&i| i == 1), "{used:?}");

    // Same n again: no backend operation at all.
    let n_ops = rig.journal.ops().len();
    assert_eq!(rig.set_pairs(1), ACK_OK);
    assert_eq!(rig.journal.ops().len(), n_ops);

    // Parked pairs never touch their backends, whatever the guest or host does; a frame the
    // guest still queues on a parked pair leaves through pair 0's backend instead of being lost.
    let late = frame(&payload(60, 5));
    rig.transmit(2, &late);
    rig.peers[3].send(&frame(&payload(60, 6)));
    rig.kick(6);
    assert!(
        rig.q[5].wait_used(1),
        "tx chain of a parked pair is returned"
    );
    assert!(rig.peers[2].recv().is_none());
    assert_eq!(
        rig.peers[0].recv().as_deref(),
        Some(&late[..]),
        "the parked pair's frame went out through pair 0"
    );
    for b in rig.net.backends() {
        assert_eq!(b.state.touched_detached(), 0);
    }
    assert_eq!(get(&metrics.pairs[2].tx.drops), 0);
    assert_eq!(get(&metrics.pairs[2].tx.packets), 1);
    assert_eq!(get(&metrics.vq_pairs_set), 3);
    assert!(get(&metrics.last_vq_pairs_set_ns) > 0);
}

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn pairs_sharing_worker_threads_each_carry_frames_and_switch() {
    for (threads, names) in [
        (1, vec!["net-pair0+1+2+3"]),
        (2, vec!["net-pair0+2", "net-pair1+3"]),
    ] {
        let mem = guest_memory();
        let (b, peers, journal) = backends(4);
        let cfg = NetConfig {
            queue_size: QSIZE,
            ..Default::default()
        };
        let mut rig = rig_over_with(&mem, b, cfg, f_mq(), |_| true, None, Some(threads)).unwrap();
        rig.peers = peers;
        rig.journal = journal;
        let running = thread_names();
        for name in &names {
            assert!(running.iter().any(|n| n == name), "{name} in {running:?}");
        }
        // Every pair of a shared thread parks, resumes and carries frames both ways.
        for round in 0..2u8 {
            assert_eq!(rig.set_pairs(4), ACK_OK);
            assert_eq!(rig.parked(), [false; 4]);
            for p in 0..4 {
                if round == 0 {
                    rig.fill_rx(p);
                } else {
                    // Gives back the buffer the last frame used: with mergeable buffers the
                    // device reads once it holds the whole ring (or room for 64 KiB).
                    rig.q[2 * p].add(&[w(RX_BUF + p as u64 * 0x10000, 2048)]);
                }
                rig.kick(2 * p);
                let f = frame(&payload(300 + p, round * 4 + p as u8));
                assert!(rig.deliver(p, &f), "threads {threads}: rx on pair {p}");
                let out = frame(&payload(200 + p, 100 + round * 4 + p as u8));
                rig.transmit(p, &out);
                assert!(
                    rig.q[2 * p + 1].wait_used(u16::from(round) + 1),
                    "threads {threads}: tx on pair {p}"
                );
                assert_eq!(rig.peers[p].recv().as_deref(), Some(&out[..]));
            }
            assert_eq!(rig.set_pairs(1), ACK_OK);
            assert_eq!(rig.parked(), [false, true, true, true]);
            assert_eq!(rig.attached(), [true, false, false, false]);
        }
        for b in rig.net.backends() {
            assert_eq!(b.state.touched_detached(), 0);
        }
        // Stopping the device ends every shared thread.
        drop(rig);
        let left = thread_names();
        for name in &names {
            assert!(!left.iter().any(|n| n == name), "{name} still in {left:?}");
        }
    }
}

#[test]
fn out_of_range_counts_are_refused_without_side_effects() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 4);
    assert_eq!(rig.set_pairs(2), ACK_OK);
    rig.journal.clear();
    for n in [0u16, 5, 0x8001, 0xffff] {
        assert_eq!(rig.set_pairs(n), ACK_ERR, "n = {n}");
        assert_eq!(rig.net.active_queue_pairs(), 2);
    }
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_MQ, 0, &[3]),
        ACK_ERR,
        "short data"
    );
    assert!(rig.journal.ops().is_empty());
    assert_eq!(rig.attached(), [true, true, false, false]);
    assert_eq!(get(&rig.net.metrics().vq_pairs_set_errors), 5);
}

#[test]
fn shrink_rolls_back_when_the_kth_detach_fails() {
    for k in 1..=3 {
        let mem = guest_memory();
        let mut rig = rig(&mem, 4);
        assert_eq!(rig.set_pairs(4), ACK_OK);
        rig.journal.plan.fail_kth(Fault::Detach, k);
        assert_eq!(rig.set_pairs(1), ACK_ERR, "k = {k}");
        assert_eq!(rig.attached(), [true; 4], "k = {k}");
        assert_eq!(rig.parked(), [false; 4], "k = {k}");
        assert_eq!(rig.net.active_queue_pairs(), 4);
        let m = rig.net.metrics();
        assert_eq!(get(&m.rollback_failures), 0);
        // Still usable: pair 3 receives, and the next attempt succeeds.
        rig.fill_rx(3);
        assert!(rig.deliver(3, &frame(&payload(80, 7))), "k = {k}");
        assert_eq!(rig.set_pairs(1), ACK_OK, "k = {k}");
        assert_eq!(rig.attached(), [true, false, false, false]);
    }
}

#[test]
fn grow_rolls_back_when_the_kth_attach_fails() {
    for k in 1..=3 {
        let mem = guest_memory();
        let mut rig = rig(&mem, 4);
        rig.journal.plan.fail_kth(Fault::Attach, k);
        assert_eq!(rig.set_pairs(4), ACK_ERR, "k = {k}");
        assert_eq!(rig.attached(), [true, false, false, false], "k = {k}");
        assert_eq!(rig.parked(), [false, true, true, true], "k = {k}");
        assert_eq!(rig.net.active_queue_pairs(), 1);
        assert_eq!(rig.set_pairs(4), ACK_OK, "k = {k}");
        assert_eq!(rig.attached(), [true; 4]);
    }
}

#[test]
fn pairs_whose_queues_were_not_set_up_cannot_be_enabled() {
    let mem = guest_memory();
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    // Queues of pairs 0 and 1 plus the control queue (index 6).
    let mut rig = rig_with(&mem, 3, cfg, f_mq(), |i| i < 4 || i == 6).unwrap();
    assert_eq!(rig.set_pairs(3), ACK_ERR);
    assert_eq!(rig.attached(), [true, false, false]);
    assert_eq!(rig.set_pairs(2), ACK_OK);
    assert_eq!(rig.attached(), [true, true, false]);
}

#[test]
fn without_mq_only_pair_0_runs() {
    let mem = guest_memory();
    let cfg = NetConfig {
        queue_size: QSIZE,
        mq: false,
        ..Default::default()
    };
    let (b, _, _) = backends(4);
    let net = Net::new(cfg.clone(), b).unwrap();
    assert_eq!(net.avail_features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_eq!(net.avail_features() & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(net.queue_max_sizes().len(), 8, "no control queue");
    drop(net);

    let acked = F_MRG | F_EVENT_IDX;
    let mut rig = rig_with(&mem, 4, cfg, acked, |_| true).unwrap();
    assert_eq!(rig.attached(), [true, false, false, false]);
    assert_eq!(rig.parked(), [false, true, true, true]);
    rig.fill_rx(0);
    assert!(rig.deliver(0, &frame(&payload(100, 8))));
}

#[test]
fn control_queue_without_mq_is_queue_2_and_refuses_vq_pairs_set() {
    let mem = guest_memory();
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    let acked = F_BASE | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
    let mut rig = rig_with(&mem, 4, cfg, acked, |i| i < 3).unwrap();
    assert_eq!(rig.ctrl_index, 2);
    assert_eq!(rig.set_pairs(2), ACK_ERR);
    assert_eq!(rig.attached(), [true, false, false, false]);
    let mac = [2, 9, 8, 7, 6, 5];
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &mac),
        ACK_OK
    );
    let mut got = [0u8; 6];
    rig.net.read_config(0, &mut got);
    assert_eq!(got, mac);
    rig.net.reset();
    rig.net.read_config(0, &mut got);
    assert_eq!(got, NetConfig::DEFAULT_MAC, "reset restores the MAC");
}

#[test]
fn guest_offloads_set_reaches_attached_backends() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 4);
    assert_eq!(rig.set_pairs(2), ACK_OK);
    rig.journal.clear();
    let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &csum.to_le_bytes()),
        ACK_OK
    );
    assert_eq!(
        rig.journal.ops(),
        [
            Op::Offload(0, libc::TUN_F_CSUM),
            Op::Offload(1, libc::TUN_F_CSUM)
        ]
    );
    // A pair enabled later gets the current offloads.
    rig.journal.clear();
    assert_eq!(rig.set_pairs(3), ACK_OK);
    assert_eq!(
        rig.journal.ops(),
        [
            Op::Attach(2),
            Op::VnetHdr(2, 12),
            Op::Offload(2, libc::TUN_F_CSUM)
        ]
    );
    // A failing backend: ERR and the offloads already changed are restored.
    rig.journal.clear();
    rig.journal.plan.fail_kth(Fault::Offload, 2);
    assert_eq!(
        rig.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &0u64.to_le_bytes()),
        ACK_ERR
    );
    assert_eq!(
        rig.journal.ops(),
        [Op::Offload(0, 0), Op::Offload(0, libc::TUN_F_CSUM)]
    );
}

#[test]
fn link_down_signals_config_and_drops_tx() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 1);
    rig.net.set_link_up(false);
    assert_eq!(rig.irq.config.load(Ordering::SeqCst), 1);
    let mut status = [0u8; 2];
    rig.net.read_config(6, &mut status);
    assert_eq!(status, [0, 0]);
    rig.transmit(0, &frame(&payload(60, 9)));
    assert!(rig.q[1].wait_used(1));
    assert!(rig.peers[0].recv().is_none());
    assert_eq!(get(&rig.net.metrics().pairs[0].tx.drops), 1);

    rig.net.set_link_up(false);
    assert_eq!(
        rig.irq.config.load(Ordering::SeqCst),
        1,
        "no change, no interrupt"
    );
    rig.net.set_link_up(true);
    assert_eq!(rig.irq.config.load(Ordering::SeqCst), 2);
    let f = frame(&payload(60, 10));
    rig.transmit(0, &f);
    assert_eq!(rig.peers[0].recv_wait().unwrap(), f);
}

#[test]
fn reset_stops_everything_and_restores_the_reset_state() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 4);
    assert_eq!(rig.set_pairs(3), ACK_OK);
    rig.net.reset();
    assert_eq!(rig.attached(), [true, false, false, false]);
    assert_eq!(rig.net.acked_features(), 0);
    assert_eq!(rig.net.active_queue_pairs(), 1);
    // The workers are gone: a kick does nothing.
    rig.transmit(0, &frame(&payload(60, 11)));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.q[1].used_idx(), 0);
    assert!(rig.peers[0].recv().is_none());

    // A second activation works from scratch.
    rig.net.set_acked_features(f_mq());
    let q: Vec<TestQueue> = (0..9)
        .map(|i| TestQueue::new(&mem, base(i), QSIZE))
        .collect();
    let kicks: Vec<EventFd> = (0..9)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let queues = (0..9)
        .map(|i| (i as u16, q[i].queue(true), kicks[i].try_clone().unwrap()))
        .collect();
    rig.net
        .activate(mem.clone(), rig.irq.clone(), queues)
        .unwrap();
    rig.q = q;
    rig.kicks = kicks;
    let f = frame(&payload(60, 12));
    rig.transmit(0, &f);
    assert_eq!(rig.peers[0].recv_wait().unwrap(), f);
    assert_eq!(rig.set_pairs(4), ACK_OK);
    assert_eq!(rig.attached(), [true; 4]);
}

#[test]
fn activation_rejects_bad_queue_sets() {
    let mem = guest_memory();
    let cfg = NetConfig {
        queue_size: QSIZE,
        ..Default::default()
    };
    let missing = rig_with(&mem, 2, cfg.clone(), f_mq(), |i| i != 1);
    assert!(matches!(missing, Err(Error::MissingQueue { index: 1 })));

    let (b, _, _) = backends(2);
    let mut net = Net::new(cfg, b).unwrap();
    net.set_acked_features(f_mq());
    let q = TestQueue::new(&mem, 0, QSIZE);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    let err = net
        .activate(mem.clone(), irq.clone(), vec![(9, q.queue(false), kick)])
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownQueue { index: 9, count: 5 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "queue index 9 does not exist (the device has 5 queues)"
    );
}

#[test]
fn metrics_render_as_text_and_json() {
    let mem = guest_memory();
    let mut rig = rig(&mem, 2);
    assert_eq!(rig.set_pairs(2), ACK_OK);
    let m = rig.net.metrics();
    let text = m.to_text();
    assert!(
        text.starts_with("virtio-net max_pairs=2 active_pairs=2 attached_pairs=2"),
        "{text}"
    );
    assert!(
        text.contains("| pair1 attached=1 parked=0 rx_packets=0"),
        "{text}"
    );
    let json = m.to_json();
    assert!(
        json.starts_with("{\"max_pairs\":2,\"active_pairs\":2,"),
        "{json}"
    );
    assert!(
        json.contains(
            "\"pairs\":[{\"pair\":0,\"attached\":true,\"parked\":false,\"rx\":{\"packets\":0"
        ),
        "{json}"
    );
    assert!(json.ends_with("}}"), "{json}");
    assert_eq!(json.matches('{').count(), json.matches('}').count());
}
