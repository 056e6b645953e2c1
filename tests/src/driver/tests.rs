//! The driver against a scripted fake device (no tap, no threads except a control responder):
//! the handshake, the queue programming, tx and mergeable rx layouts, the control chain, and
//! the panics a broken device must cause.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm::virtio::Interrupt;

use super::*;

const PAIRS: u16 = 2;
const QSIZE: u16 = 16;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

#[derive(Default)]
struct Seen {
    acked: Option<u64>,
    queues: Vec<(u16, Queue)>,
    interrupt: Option<Arc<dyn Interrupt>>,
    ctrl_data: Vec<Vec<u8>>,
}

struct FakeNet {
    offered: u64,
    answer_ctrl: bool,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    ctrl: Option<JoinHandle<()>>,
}

impl FakeNet {
    fn new(offered: u64, answer_ctrl: bool) -> (FakeNet, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let dev = FakeNet {
            offered,
            answer_ctrl,
            seen: seen.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            ctrl: None,
        };
        (dev, seen)
    }
}

impl Drop for FakeNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.ctrl.take() {
            h.join().unwrap();
        }
    }
}

/// Answers VQ_PAIRS_SET(n) with OK for 1 <= n <= PAIRS, everything else with ERR.
fn serve_ctrl(
    mem: GuestMemoryMmap,
    mut q: Queue,
    kick: EventFd,
    irq: Arc<dyn Interrupt>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        if kick.read().is_err() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let chains: Vec<_> = q.iter(&mem).unwrap().collect();
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let mut cmd = Vec::new();
            for d in descs.iter().filter(|d| !d.is_write_only()) {
                let mut b = vec![0u8; d.len() as usize];
                mem.read_slice(&mut b, d.addr()).unwrap();
                cmd.extend_from_slice(&b);
            }
            let ack_desc = descs.last().unwrap();
            assert!(ack_desc.is_write_only() && ack_desc.len() == 1);
            let ok = cmd.len() == 4 && cmd[0] == 4 && cmd[1] == 0 && {
                let n = u16::from_le_bytes([cmd[2], cmd[3]]);
                (1..=PAIRS).contains(&n)
            };
            seen.lock().unwrap().ctrl_data.push(cmd);
            mem.write_obj(if ok { ACK_OK } else { ACK_ERR }, ack_desc.addr())
                .unwrap();
            q.add_used(&mem, head, 1).unwrap();
            irq.signal_used_queue(2 * PAIRS).unwrap();
        }
    }
}

impl VirtioDevice for FakeNet {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QSIZE; 2 * usize::from(PAIRS) + 1]
    }
    fn features(&self) -> u64 {
        self.offered
    }
    fn set_acked_features(&mut self, features: u64) {
        self.seen.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; 12];
        space[..6].copy_from_slice(&MAC);
        space[6] = 1; // link up
        space[8] = PAIRS as u8;
        space[10..12].copy_from_slice(&1500u16.to_le_bytes());
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = space.get(offset as usize + i) {
                *b = *v;
            }
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut seen = self.seen.lock().unwrap();
        seen.interrupt = Some(interrupt.clone());
        for (index, queue, kick) in queues {
            if index == 2 * PAIRS && self.answer_ctrl {
                let (seen, stop, irq, mem) = (
                    self.seen.clone(),
                    self.stop.clone(),
                    interrupt.clone(),
                    mem.clone(),
                );
                self.ctrl = Some(std::thread::spawn(move || {
                    serve_ctrl(mem, queue, kick, irq, seen, stop)
                }));
            } else {
                seen.queues.push((index, queue));
            }
        }
        Ok(())
    }
    fn reset(&mut self) {}
}

fn offered() -> u64 {
    DEFAULT_FEATURES | EVENT_IDX | CSUM_FEATURES
}

fn driver(cfg: DriverConfig, answer_ctrl: bool) -> (NetDriver, Arc<Mutex<Seen>>) {
    let (dev, seen) = FakeNet::new(offered(), answer_ctrl);
    let cfg = DriverConfig {
        mem_size: 8 << 20,
        ..cfg
    };
    (NetDriver::new(Box::new(dev), cfg), seen)
}

/// The device-side queue `index` the fake device was activated with.
fn device_queue(seen: &Arc<Mutex<Seen>>, index: u16) -> Queue {
    let s = seen.lock().unwrap();
    s.queues
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, q)| Queue::try_from(q.state()).unwrap())
        .unwrap()
}

#[test]
fn handshake_programs_every_queue_and_reads_the_config() {
    let (mut d, seen) = driver(
        DriverConfig {
            features: DEFAULT_FEATURES | EVENT_IDX,
            ..DriverConfig::default()
        },
        true,
    );
    assert_eq!(d.init(), DEFAULT_FEATURES | EVENT_IDX);
    assert_eq!(d.status(), 0xf);
    assert_eq!(d.offered_features(), offered());
    assert_eq!(
        seen.lock().unwrap().acked,
        Some(DEFAULT_FEATURES | EVENT_IDX)
    );
    assert_eq!(d.mac(), MAC);
    assert_eq!(d.link_status(), 1);
    assert_eq!(d.max_virtqueue_pairs(), PAIRS);
    assert_eq!(d.mtu(), 1500);
    assert_eq!(d.max_pairs(), PAIRS);
    assert_eq!(d.ctrl_queue_index(), Some(4));
    let s = seen.lock().unwrap();
    let indices: Vec<u16> = s.queues.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indices,
        [0, 1, 2, 3],
        "data queues (ctrl went to its thread)"
    );
    for (index, q) in &s.queues {
        let layout = d.queue(*index).ring.layout();
        assert_eq!(q.size(), QSIZE);
        assert!(q.ready());
        assert!(q.event_idx_enabled(), "EVENT_IDX negotiated");
        assert_eq!(q.desc_table(), layout.desc.0);
        assert_eq!(q.avail_ring(), layout.avail.0);
        assert_eq!(q.used_ring(), layout.used.0);
    }
    // No two queues or buffer areas overlap.
    let mut areas: Vec<(u64, u64)> = (0..5)
        .flat_map(|i| {
            let q = d.queue(i);
            let l = q.ring.layout();
            [
                (l.desc.0, l.desc.0 + l.footprint()),
                (q.buf_base, q.buf_base + q.slot * u64::from(l.size)),
            ]
        })
        .collect();
    areas.sort();
    for w in areas.windows(2) {
        assert!(w[0].1 <= w[1].0, "{w:x?} overlap");
    }
}

#[test]
fn tx_puts_header_and_frame_in_one_readable_buffer() {
    let (mut d, seen) = driver(DriverConfig::default(), true);
    d.init();
    let frame: Vec<u8> = (0..100u8).collect();
    d.send(1, &frame);
    assert_eq!(d.notifies(), 1, "a fresh queue wants notifications");
    let mut q = device_queue(&seen, 3);
    let mem = d.mem().clone();
    let chains: Vec<_> = q.iter(&mem).unwrap().collect();
    assert_eq!(chains.len(), 1);
    let head = chains[0].head_index();
    let descs: Vec<_> = chains.into_iter().next().unwrap().collect();
    assert_eq!(descs.len(), 1);
    assert!(!descs[0].is_write_only());
    assert_eq!(descs[0].len() as usize, VNET_HDR_LEN + frame.len());
    let mut bytes = vec![0u8; descs[0].len() as usize];
    mem.read_slice(&mut bytes, descs[0].addr()).unwrap();
    assert_eq!(&bytes[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&bytes[VNET_HDR_LEN..], &frame[..]);
    assert_eq!(d.tx_in_flight(1), 1);
    q.add_used(&mem, head, 0).unwrap();
    assert_eq!(d.reap_tx(1), 1);
    assert_eq!(d.tx_in_flight(1), 0);
}

#[test]
fn mergeable_rx_frames_are_reassembled_once_complete() {
    let (mut d, seen) = driver(
        DriverConfig {
            rx_buf_len: 64,
            ..DriverConfig::default()
        },
        true,
    );
    d.init();
    assert_eq!(d.post_rx(1, 5), 5);
    let mut q = device_queue(&seen, 2);
    let mem = d.mem().clone();
    let chains: Vec<(u16, GuestAddress, u32)> = q
        .iter(&mem)
        .unwrap()
        .map(|c| {
            let head = c.head_index();
            let desc: Vec<_> = c.collect();
            assert_eq!(desc.len(), 1);
            assert!(desc[0].is_write_only());
            (head, desc[0].addr(), desc[0].len())
        })
        .collect();
    assert_eq!(chains.len(), 5);
    assert!(chains.iter().all(|c| c.2 == 64));
    // A 150-byte frame over three buffers: 12 + 52, 64, 34.
    let frame: Vec<u8> = (0..150u32).map(|i| i as u8).collect();
    let hdr = {
        let mut h = vnet_hdr(0, 0, 0, 0, 0, 0);
        h[10..12].copy_from_slice(&3u16.to_le_bytes());
        h
    };
    mem.write_slice(&hdr, chains[0].1).unwrap();
    mem.write_slice(&frame[..52], GuestAddress(chains[0].1 .0 + 12))
        .unwrap();
    mem.write_slice(&frame[52..116], chains[1].1).unwrap();
    mem.write_slice(&frame[116..], chains[2].1).unwrap();
    q.add_used(&mem, chains[0].0, 64).unwrap();
    q.add_used(&mem, chains[1].0, 64).unwrap();
    assert!(d.reap_rx(1).is_empty(), "frame incomplete: 2 of 3 buffers");
    q.add_used(&mem, chains[2].0, 34).unwrap();
    let frames = d.reap_rx(1);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].data, frame);
    assert_eq!(frames[0].buffers, 3);
    assert_eq!(frames[0].pair, 1);
    assert_eq!(
        d.rx_count(1),
        RxCount {
            used: 3,
            frames: 1,
            bytes: 150
        }
    );
    assert_eq!(d.rx_count(0), RxCount::default());
    // The interrupt the device raises is seen and acknowledged.
    let irq = seen.lock().unwrap().interrupt.clone().unwrap();
    irq.signal_used_queue(2).unwrap();
    assert_eq!(d.wait_interrupt(Duration::from_secs(1)), mmio::INT_VRING);
    assert_eq!(d.interrupt_status(), 0);
    assert_eq!(d.interrupts(), 1);
    // Three buffers came back to the free list: the ring takes 16 - 2 more.
    assert_eq!(d.post_rx(1, usize::MAX), usize::from(QSIZE) - 2);
}

#[test]
fn vq_pairs_set_sends_class_command_and_data_and_returns_the_ack() {
    let (mut d, seen) = driver(DriverConfig::default(), true);
    d.init();
    assert_eq!(d.set_queue_pairs(2), ACK_OK);
    assert_eq!(d.set_queue_pairs(3), ACK_ERR);
    assert_eq!(d.set_queue_pairs(0x8001), ACK_ERR);
    assert_eq!(d.set_queue_pairs(1), ACK_OK);
    let s = seen.lock().unwrap();
    assert_eq!(
        s.ctrl_data,
        vec![
            vec![4, 0, 2, 0],
            vec![4, 0, 3, 0],
            vec![4, 0, 1, 0x80],
            vec![4, 0, 1, 0]
        ]
    );
}

#[test]
#[should_panic(expected = "no reply to control command class 4 command 0 data [02, 00]")]
fn a_control_command_without_reply_fails_in_bounded_time() {
    let (mut d, _seen) = driver(
        DriverConfig {
            timeout: Duration::from_millis(100),
            ..DriverConfig::default()
        },
        false,
    );
    d.init();
    d.set_queue_pairs(2);
}

#[test]
#[should_panic(expected = "device does not offer features 0x100000000000000")]
fn asking_for_an_unoffered_feature_panics() {
    let (mut d, _) = driver(
        DriverConfig {
            features: DEFAULT_FEATURES | 1 << 56,
            ..DriverConfig::default()
        },
        true,
    );
    d.init();
}

#[test]
#[should_panic(expected = "too small for 5 queues")]
fn memory_too_small_for_the_buffers_panics() {
    let (dev, _) = FakeNet::new(offered(), true);
    let cfg = DriverConfig {
        mem_size: 2 << 20,
        rx_buf_len: 65536,
        ..DriverConfig::default()
    };
    NetDriver::new(Box::new(dev), cfg).init();
}
