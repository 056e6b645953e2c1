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
