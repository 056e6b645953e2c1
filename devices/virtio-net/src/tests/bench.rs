// SPDX-License-Identifier: Apache-2.0
//! Data-path cost against a raw loop doing the same syscalls on the same socketpair
//! (`cargo test --release -p virtio-net bench -- --ignored --nocapture`). Not a pass/fail test
//! of speed: it prints the ratio; the assertions only check the frames went through.

use std::time::Instant;

use super::*;

const FRAME: usize = 1500;
const ROUNDS: usize = 2000;
const BATCH: u16 = 64;

fn raw_tx(peer: &Peer, backend: &SockBackend, f: &[u8]) -> f64 {
    let iov = [libc::iovec {
        iov_base: f.as_ptr() as *mut libc::c_void,
        iov_len: f.len(),
    }];
    let start = Instant::now();
    for _ in 0..ROUNDS {
        for _ in 0..BATCH {
            // SAFETY: `iov` points to `f`, alive for the call.
            unsafe { backend.writev(&iov) }.unwrap();
        }
        for _ in 0..BATCH {
            peer.recv().unwrap();
        }
    }
    (ROUNDS * BATCH as usize) as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "benchmark"]
fn bench_tx_against_raw_writev() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_MRG | F_EVENT_IDX, true, 256);
    let f = frame(&payload(FRAME, 1));
    for i in 0..u64::from(BATCH) {
        rig.put(BUF + i * 0x1000, &f);
    }
    let raw = raw_tx(&rig.peer, &rig.backend, &f);
    let start = Instant::now();
    for _ in 0..ROUNDS {
        for i in 0..u64::from(BATCH) {
            rig.txq.add(&[r(BUF + i * 0x1000, f.len() as u32)]);
        }
        rig.tx();
        for _ in 0..BATCH {
            rig.peer.recv().unwrap();
        }
    }
    let dev = (ROUNDS * BATCH as usize) as f64 / start.elapsed().as_secs_f64();
    println!(
        "tx {FRAME} B: device {dev:.0} fps, raw writev {raw:.0} fps, ratio {:.2}",
        dev / raw
    );
    assert_eq!(get(&rig.tx_m().packets), (ROUNDS * BATCH as usize) as u64);
}

#[test]
#[ignore = "benchmark"]
fn bench_rx_against_raw_readv() {
    for (features, name) in [
        (F_BASE | F_EVENT_IDX, "no MRG"),
        (F_MRG | F_EVENT_IDX, "MRG"),
    ] {
        let mem = guest_memory();
        let mut rig = PairRig::new(&mem, features, false, 256);
        let f = frame(&payload(FRAME, 2));
        // Raw: read each frame into one buffer.
        let mut buf = vec![0u8; 2048];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            for _ in 0..BATCH {
                rig.peer.send(&f);
            }
            for _ in 0..BATCH {
                // SAFETY: `iov` points to `buf`, alive and writable for the call.
                unsafe { rig.backend.readv(&iov) }.unwrap();
            }
        }
        let raw = (ROUNDS * BATCH as usize) as f64 / start.elapsed().as_secs_f64();

        let start = Instant::now();
        for _ in 0..ROUNDS {
            for i in 0..u64::from(BATCH) {
                rig.rxq.add(&[w(BUF + i * 0x1000, 2048)]);
            }
            for _ in 0..BATCH {
                rig.peer.send(&f);
            }
            rig.rx();
        }
        let dev = (ROUNDS * BATCH as usize) as f64 / start.elapsed().as_secs_f64();
        println!(
            "rx {FRAME} B {name}: device {dev:.0} fps, raw readv {raw:.0} fps, ratio {:.2}",
            dev / raw
        );
        assert_eq!(get(&rig.rx_m().packets), (ROUNDS * BATCH as usize) as u64);
    }
}

/// CPU time of this thread (other load on the machine does not count).
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A backend that "receives" `left` frames of `len` bytes without touching the buffers: what
/// is left of `process_rx` is the device's own work per frame and per buffer.
struct NullBackend {
    len: usize,
    left: std::sync::atomic::AtomicUsize,
}

impl std::os::fd::AsRawFd for NullBackend {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        -1
    }
}

impl Backend for NullBackend {
    unsafe fn readv(&self, _iov: &[libc::iovec]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.left.load(Relaxed) == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.left.fetch_sub(1, Relaxed);
        Ok(self.len)
    }
    unsafe fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        Ok(iov.iter().map(|v| v.iov_len).sum())
    }
    fn attach(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn detach(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn is_attached(&self) -> Result<bool, BackendError> {
        Ok(true)
    }
    fn set_vnet_hdr_size(&self, _size: i32) -> Result<(), BackendError> {
        Ok(())
    }
    fn set_offload(&self, _tun_flags: u32) -> Result<(), BackendError> {
        Ok(())
    }
}

#[test]
#[ignore = "benchmark"]
fn bench_rx_device_work_per_frame() {
    for frame in [64usize, 1514, 65535] {
        let mem = guest_memory();
        let size = 256u16;
        let mut q = TestQueue::new(&mem, 0, size);
        let txq = TestQueue::new(&mem, queue_footprint(size).next_multiple_of(0x1000), size);
        for i in 0..size {
            let write = crate::test_utils::ring::DESC_F_WRITE;
            q.store(i, BUF + u64::from(i) * 0x1000, 0x1000, write, 0);
        }
        let f = crate::features::Negotiated(F_MRG | F_EVENT_IDX);
        let mut qp = crate::rxtx::QueuePair::new(
            0,
            q.queue(true),
            txq.queue(true),
            mem.clone(),
            Arc::new(RecordingInterrupt::default()),
            metrics(1),
            crate::rxtx::PathConfig::new(f, true, None),
        );
        let backend = NullBackend {
            len: 12 + frame,
            left: std::sync::atomic::AtomicUsize::new(0),
        };
        let per_frame = (12 + frame).div_ceil(0x1000) as u16;
        let mut posted = 0u16;
        let mut primed = false;
        let mut used_seen = 0u16;
        let mut spent = std::time::Duration::ZERO;
        let frames = 2_000_000 / usize::from(per_frame).max(1);
        let mut done = 0;
        while done < frames {
            // Re-post what the device used, in slot order.
            let used = q.used_idx();
            let n = used.wrapping_sub(used_seen);
            used_seen = used;
            let fresh = if primed { n } else { size };
            primed = true;
            for _ in 0..fresh {
                q.publish(posted % size);
                posted = posted.wrapping_add(1);
            }
            let batch = 64.min(frames - done);
            backend
                .left
                .store(batch, std::sync::atomic::Ordering::Relaxed);
            let start = thread_cpu();
            let state = qp.process_rx(&backend);
            spent += thread_cpu() - start;
            assert!(
                !matches!(state, crate::rxtx::RxState::QueueBroken),
                "{state:?}"
            );
            done += batch - backend.left.load(std::sync::atomic::Ordering::Relaxed);
        }
        println!(
            "rx {frame} B: {:.1} ns per frame, {:.1} ns per buffer",
            spent.as_nanos() as f64 / done as f64,
            spent.as_nanos() as f64 / (done * usize::from(per_frame)) as f64
        );
    }
}
