// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio register interface (`vmm::virtio::mmio::MmioTransport` through
//! `BusDevice::read`/`write`) fed arbitrary read/write sequences — register and config-space
//! offsets, widths 1/2/4/8, any value — with the real `Net` behind it (fake backends), so
//! that feature negotiation, queue setup, activation (worker and control threads), kicks
//! and reset all run.
//!
//! Input: device byte (pairs, MQ, MTU), queue-size byte, initially attached backends,
//! then operations (tag % 8): 0 read, 1/2 write, 3 handshake up to FEATURES_OK with an
//! input-chosen feature mask, 4 set up one queue, 5 shape the memory of a set-up queue
//! (`ring_op`), 6 notify a queue, 7 queue a frame or an error in a backend.
//!
//! Checks: identification registers never change, the status register only ever holds a
//! prefix of the handshake plus NEEDS_RESET/FAILED, and dropping the transport leaves no
//! thread and no fd behind.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mqvmm_fuzz::{
    assert_status_prefix, guest_memory, net_from_input, ring_op, thread_and_fd_count, trace,
    FuzzNet, Input, Ring, RxEvent,
};
use vmm::bus::BusDevice;
use vmm::virtio::mmio::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const REGS: [u64; 25] = [
    REG_MAGIC,
    REG_VERSION,
    REG_DEVICE_ID,
    REG_VENDOR_ID,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_STATUS,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_CONFIG_GENERATION,
    REG_CONFIG,
    REG_CONFIG + 8,
];

fn offset(inp: &mut Input) -> u64 {
    let b = inp.u8();
    match b >> 6 {
        0 | 1 => REGS[usize::from(b) % REGS.len()],
        2 => REG_CONFIG + u64::from(b & 0x3f),
        _ => match b & 3 {
            0 => u64::from(inp.u16()),
            1 => REGS[usize::from(inp.u8()) % REGS.len()] + u64::from(b >> 2 & 3),
            _ => inp.u64(),
        },
    }
}

fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(offset, &mut d);
    u32::from_le_bytes(d)
}

fn check_status(t: &MmioTransport) {
    assert_status_prefix(t.status());
}

fn run(data: &[u8]) {
    mqvmm_fuzz::tracing();
    let mut inp = Input::new(data);
    let Some(FuzzNet {
        net,
        handles,
        queue_size,
        ..
    }) = net_from_input(&mut inp)
    else {
        return;
    };
    let pairs = handles.len();
    let mem = guest_memory();
    let mut t = MmioTransport::new(
        Box::new(net),
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    )
    .expect("transport over a valid device");
    let queues = t.device().queue_max_sizes().len();
    let mut rings: Vec<Option<Ring>> = vec![None; queues];

    let mut last_status = 0;
    while !inp.is_empty() {
        match inp.u8() % 8 {
            0 => {
                let off = offset(&mut inp);
                let width = 1usize << (inp.u8() & 3);
                let mut buf = [0u8; 8];
                t.read(off, &mut buf[..width]);
                if width == 4 {
                    let v = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    match off {
                        REG_MAGIC => assert_eq!(v, MMIO_MAGIC),
                        REG_VERSION => assert_eq!(v, MMIO_VERSION),
                        REG_DEVICE_ID => assert_eq!(v, 1),
                        REG_VENDOR_ID => assert_eq!(v, VENDOR_ID),
                        REG_STATUS => assert_eq!(v, t.status()),
                        _ => {}
                    }
                }
            }
            1 | 2 => {
                let off = offset(&mut inp);
                let width = 1usize << (inp.u8() & 3);
                let v = inp.value().to_le_bytes();
                t.write(off, &v[..width]);
            }
            3 => {
                let mask = inp.u64();
                w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
                w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                w32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
                let lo = r32(&mut t, REG_DEVICE_FEATURES);
                w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
                let hi = r32(&mut t, REG_DEVICE_FEATURES);
                let offered = u64::from(lo) | u64::from(hi) << 32;
                // Bit 32 (VERSION_1) is needed for FEATURES_OK; keep it unless the mask's
                // top bit asks for a legacy-only driver.
                let version = if mask >> 63 == 0 { 1 << 32 } else { 0 };
                let acked = offered & (mask | version);
                w32(&mut t, REG_DRIVER_FEATURES_SEL, 0);
                w32(&mut t, REG_DRIVER_FEATURES, acked as u32);
                w32(&mut t, REG_DRIVER_FEATURES_SEL, 1);
                w32(&mut t, REG_DRIVER_FEATURES, (acked >> 32) as u32);
                w32(
                    &mut t,
                    REG_STATUS,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                );
            }
            4 => {
                let q = usize::from(inp.u8()) % (queues + 1);
                let ring = Ring::read(&mut inp, queue_size);
                w32(&mut t, REG_QUEUE_SEL, q as u32);
                let layout = ring.layout;
                w32(&mut t, REG_QUEUE_NUM, u32::from(layout.size));
                w32(&mut t, REG_QUEUE_DESC_LOW, layout.desc.0 as u32);
                w32(&mut t, REG_QUEUE_DESC_HIGH, 0);
                w32(&mut t, REG_QUEUE_DRIVER_LOW, layout.avail.0 as u32);
                w32(&mut t, REG_QUEUE_DRIVER_HIGH, 0);
                w32(&mut t, REG_QUEUE_DEVICE_LOW, layout.used.0 as u32);
                w32(&mut t, REG_QUEUE_DEVICE_HIGH, 0);
                w32(&mut t, REG_QUEUE_READY, 1);
                if let Some(slot) = rings.get_mut(q) {
                    *slot = Some(ring);
                }
            }
            5 => {
                let q = usize::from(inp.u8()) % queues;
                let op = inp.u8() % 6;
                if let Some(ring) = rings[q].as_mut() {
                    ring_op(op, &mut inp, &mem, ring);
                }
            }
            6 => {
                let q = u32::from(inp.u8()) % (queues as u32 + 1);
                w32(&mut t, REG_QUEUE_NOTIFY, q);
            }
            _ => {
                let b = inp.u8();
                let backend = &handles[usize::from(b) % pairs];
                let len = usize::from(inp.u16());
                backend.push(if b & 0x80 != 0 {
                    RxEvent::Error(libc::EIO)
                } else {
                    RxEvent::Frame { len, fill: b }
                });
            }
        }
        check_status(&t);
        if t.status() != last_status {
            last_status = t.status();
            trace!("mmio: status {last_status:#x}");
        }
    }
    drop(t);
    for (p, b) in handles.iter().enumerate() {
        trace!(
            "mmio: backend {p}: tx {} rx {} attached {}",
            b.tx_frames.load(std::sync::atomic::Ordering::SeqCst),
            b.rx_frames.load(std::sync::atomic::Ordering::SeqCst),
            b.attached_now()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let before = thread_and_fd_count();
    run(data);
    // Dropping the transport dropped the device, which joins its threads.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = thread_and_fd_count();
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads/fds left behind: {now:?}, was {before:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
});
