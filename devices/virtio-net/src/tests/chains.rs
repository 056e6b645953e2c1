// SPDX-License-Identifier: Apache-2.0
//! Malformed chains: each is returned with length 0, counted, and the queue goes on serving
//! the next (good) chain.

use super::*;
use crate::chain::{walk, ChainError, DescTable};
use crate::test_utils::ring::{DESC_F_INDIRECT as IND, DESC_F_NEXT as NEXT, DESC_F_WRITE as WRITE};

/// One malformed chain, built by the test in the queue (descriptor slots 8.. are free).
struct Case {
    name: &'static str,
    build: fn(&mut TestQueue, bool) -> u16,
    /// Whether the head is in range, so that the chain can be returned at all.
    returnable: bool,
}

fn flags(write: bool) -> u16 {
    if write {
        WRITE
    } else {
        0
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "shorter than the vnet header",
            build: |q, wr| q.write_chain(&[d(BUF, 11, wr)]),
            returnable: true,
        },
        Case {
            name: "wrong direction",
            build: |q, wr| q.write_chain(&[d(BUF, 100, !wr)]),
            returnable: true,
        },
        Case {
            name: "mixed directions",
            build: |q, wr| q.write_chain(&[d(BUF, 100, wr), d(BUF + 0x100, 100, !wr)]),
            returnable: true,
        },
        Case {
            name: "buffer outside guest memory",
            build: |q, wr| q.write_chain(&[d(MEM_END + 0x1000, 100, wr)]),
            returnable: true,
        },
        Case {
            name: "buffer running past the end of guest memory",
            build: |q, wr| q.write_chain(&[d(MEM_END - 50, 100, wr)]),
            returnable: true,
        },
        Case {
            name: "address wrapping around",
            build: |q, wr| q.write_chain(&[d(u64::MAX - 10, 100, wr)]),
            returnable: true,
        },
        Case {
            name: "next index out of range",
            build: |q, wr| {
                q.store(8, BUF, 100, flags(wr) | NEXT, 200);
                8
            },
            returnable: true,
        },
        Case {
            name: "loop",
            build: |q, wr| {
                q.store(8, BUF, 100, flags(wr) | NEXT, 9);
                q.store(9, BUF, 100, flags(wr) | NEXT, 8);
                8
            },
            returnable: true,
        },
        Case {
            name: "indirect table length not a multiple of 16",
            build: |q, _| {
                q.store(8, BUF + 0x8000, 20, IND, 0);
                8
            },
            returnable: true,
        },
        Case {
            name: "indirect table of length 0",
            build: |q, _| {
                q.store(8, BUF + 0x8000, 0, IND, 0);
                8
            },
            returnable: true,
        },
        Case {
            name: "indirect table outside guest memory",
            build: |q, _| {
                q.store(8, MEM_END + 0x1000, 32, IND, 0);
                8
            },
            returnable: true,
        },
        Case {
            name: "indirect descriptor with NEXT",
            build: |q, wr| {
                q.store(8, BUF + 0x8000, 16, IND | NEXT, 9);
                q.store(9, BUF, 100, flags(wr), 0);
                8
            },
            returnable: true,
        },
        Case {
            name: "indirect table next index out of range",
            build: |q, wr| {
                let raw = Descriptor::new(BUF, 100, flags(wr) | NEXT, 5);
                q.mem.write_obj(raw, GuestAddress(BUF + 0x8000)).unwrap();
                q.store(8, BUF + 0x8000, 16, IND, 0);
                8
            },
            returnable: true,
        },
        Case {
            name: "nested indirect table",
            build: |q, _| {
                let raw = Descriptor::new(BUF + 0x9000, 16, IND, 0);
                q.mem.write_obj(raw, GuestAddress(BUF + 0x8000)).unwrap();
                q.store(8, BUF + 0x8000, 16, IND, 0);
                8
            },
            returnable: true,
        },
        Case {
            name: "head index out of range",
            build: |_, _| 99,
            returnable: false,
        },
    ]
}

/// Runs every case through tx (`rx == false`) or rx, each followed by a good chain.
fn run(rx: bool, features: u64) {
    for case in cases() {
        let mem = guest_memory();
        let mut rig = PairRig::new(&mem, features, false, 16);
        let q = if rx { &mut rig.rxq } else { &mut rig.txq };
        let bad = (case.build)(q, rx);
        q.publish(bad);
        let good_buf = BUF + 0x4000;
        let f = frame(&payload(100, 1));
        let len = if rx { 2048 } else { f.len() as u32 };
        let good = q.add(&[d(good_buf, len, rx)]);
        if rx {
            rig.peer.send(&f);
            rig.rx();
        } else {
            rig.put(good_buf, &f);
            rig.tx();
        }
        let (q, m) = if rx {
            (&rig.rxq, rig.rx_m())
        } else {
            (&rig.txq, rig.tx_m())
        };
        assert_eq!(get(&m.bad_chains), 1, "{}: counted", case.name);
        if case.returnable {
            assert_eq!(q.used_idx(), 2, "{}: both chains returned", case.name);
            assert_eq!(q.used(0), (bad, 0), "{}: returned with length 0", case.name);
            assert_eq!(q.used(1).0, good, "{}: next chain served", case.name);
        } else {
            assert_eq!(q.used_idx(), 1, "{}: good chain returned", case.name);
            assert_eq!(q.used(0).0, good, "{}: next chain served", case.name);
        }
        assert_eq!(
            get(&m.packets),
            1,
            "{}: the good frame went through",
            case.name
        );
        if rx {
            assert_eq!(
                read_guest(&mem, good_buf + 12, 100),
                f[12..],
                "{}",
                case.name
            );
        } else {
            assert_eq!(rig.peer.recv().unwrap(), f, "{}", case.name);
        }
    }
}

#[test]
fn malformed_tx_chains_are_returned_and_counted() {
    run(false, F_BASE);
}

#[test]
fn malformed_rx_chains_are_returned_and_counted() {
    run(true, F_BASE);
}

#[test]
fn malformed_rx_chains_with_mergeable_buffers() {
    run(true, F_MRG);
}

#[test]
fn indirect_without_the_feature_is_malformed() {
    let mem = guest_memory();
    let mut rig = PairRig::new(&mem, F_BASE & !crate::features::bit(28), false, 16);
    let f = frame(&payload(50, 2));
    rig.put(BUF, &f);
    let head = rig
        .txq
        .add_indirect(BUF + 0x8000, &[r(BUF, f.len() as u32)]);
    rig.tx();
    assert_eq!(rig.txq.used(0), (head, 0));
    assert_eq!(get(&rig.tx_m().bad_chains), 1);
    assert!(rig.peer.recv().is_none());
}

#[test]
fn walker_reports_the_precise_error() {
    let mem = guest_memory();
    let mut q = TestQueue::new(&mem, 0, 16);
    let table = DescTable {
        addr: GuestAddress(0),
        size: 16,
        indirect: true,
    };
    q.store(0, BUF, 10, NEXT, 1);
    q.store(1, BUF, 10, NEXT, 0);
    assert_eq!(
        walk(&mem, table, 0, |_| Ok(())),
        Err(ChainError::TooLong { limit: 16 })
    );
    q.store(0, BUF, 10, NEXT, 16);
    assert_eq!(
        walk(&mem, table, 0, |_| Ok(())),
        Err(ChainError::IndexOutOfRange {
            index: 16,
            size: 16
        })
    );
    q.store(0, BUF, 24, IND, 0);
    assert_eq!(
        walk(&mem, table, 0, |_| Ok(())),
        Err(ChainError::IndirectTableLen { len: 24 })
    );
    let head = q.write_chain(&[r(BUF, 10), r(BUF + 10, 20), w(BUF + 30, 30)]);
    let mut lens = Vec::new();
    walk(&mem, table, head, |d| {
        lens.push(d.len());
        Ok(())
    })
    .unwrap();
    assert_eq!(lens, [10, 20, 30]);
}

#[test]
fn indirect_tables_across_regions_or_past_memory_are_read_entry_by_entry() {
    let mem = guest_memory();
    let q = TestQueue::new(&mem, 0, 16);
    let table = DescTable {
        addr: GuestAddress(0),
        size: 16,
        indirect: true,
    };
    let lens = |head| {
        let mut lens = Vec::new();
        walk(&mem, table, head, |d| {
            lens.push(d.len());
            Ok(())
        })
        .map(|()| lens)
    };
    // A 4-entry table whose middle straddles the region boundary: no single host slice, so
    // every entry is read on its own, and the chain is whole.
    let straddling = REGION_SPLIT - 32;
    for (i, len) in [11u32, 22, 33, 44].iter().enumerate() {
        let next = if i < 3 { i as u16 + 1 } else { 0 };
        let flags = if i < 3 { NEXT } else { 0 };
        let desc = Descriptor::new(BUF, *len, flags, next);
        mem.write_obj(desc, GuestAddress(straddling + 16 * i as u64))
            .unwrap();
    }
    q.store(0, straddling, 64, IND, 0);
    assert_eq!(lens(0), Ok(vec![11, 22, 33, 44]));

    // A table that claims entries past the end of memory: the entries inside are read, the
    // first one outside is reported precisely.
    let at_end = MEM_END - 32;
    mem.write_obj(Descriptor::new(BUF, 5, NEXT, 1), GuestAddress(at_end))
        .unwrap();
    mem.write_obj(Descriptor::new(BUF, 6, NEXT, 2), GuestAddress(at_end + 16))
        .unwrap();
    q.store(1, at_end, 64, IND, 0);
    assert_eq!(
        lens(1),
        Err(ChainError::DescriptorUnreadable {
            table: at_end,
            index: 2
        })
    );
}

#[test]
fn host_translation_matches_vm_memory_at_every_edge() {
    use crate::chain::{chain_iov, chain_iov_host, HostMem};
    let mem = guest_memory();
    let host = HostMem::new(&mem);
    // Inside one region up to its last byte; not across the split, past the end or wrapping.
    for (addr, len, inside) in [
        (0, 1, true),
        (REGION_SPLIT - 8, 8, true),
        (REGION_SPLIT - 8, 9, false),
        (REGION_SPLIT, MEM_END - REGION_SPLIT, true),
        (MEM_END - 1, 1, true),
        (MEM_END - 1, 2, false),
        (MEM_END, 1, false),
        (u64::MAX, 2, false),
        (REGION_SPLIT + 4, u64::MAX, false),
    ] {
        let got = host.host(GuestAddress(addr), len);
        assert_eq!(got.is_some(), inside, "{addr:#x} + {len}");
        if let Some(p) = got {
            let want =
                vm_memory::GuestMemoryBackend::get_slice(&mem, GuestAddress(addr), len as usize)
                    .unwrap()
                    .ptr_guard_mut()
                    .as_ptr();
            assert_eq!(p, want, "{addr:#x}");
        }
    }

    // Whole chains: the same iovecs, lengths and errors either way, whether tables and
    // buffers lie in one region, straddle the split, sit unaligned or run past memory.
    let q = TestQueue::new(&mem, 0, 16);
    let table = DescTable {
        addr: GuestAddress(0),
        size: 16,
        indirect: true,
    };
    let chains: Vec<(u64, Vec<(u64, u32)>)> = vec![
        (0x9000, vec![(BUF, 100), (BUF + 0x1000, 4096)]),
        (REGION_SPLIT - 16, vec![(BUF, 10), (REGION_SPLIT - 10, 20)]),
        (0x9003, vec![(BUF, 10), (BUF + 0x3000, 30)]),
        (0xa000, vec![(MEM_END - 10, 20)]),
        (0xb000, vec![(BUF, 0), (BUF + 64, 64)]),
    ];
    for (i, (at, segs)) in chains.iter().enumerate() {
        for (j, (addr, len)) in segs.iter().enumerate() {
            let last = j + 1 == segs.len();
            let desc = Descriptor::new(
                *addr,
                *len,
                WRITE | if last { 0 } else { NEXT },
                if last { 0 } else { j as u16 + 1 },
            );
            mem.write_obj(desc, GuestAddress(at + 16 * j as u64))
                .unwrap();
        }
        q.store(i as u16, *at, 16 * segs.len() as u32, IND, 0);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut da, mut db) = (0, 0);
        let ra = chain_iov(&mem, table, i as u16, true, &mut a, 64, &mut da);
        let rb = chain_iov_host(&host.table(table), i as u16, true, &mut b, 64, &mut db);
        assert_eq!(ra, rb, "chain {i}");
        assert_eq!(da, db, "chain {i}");
        let pairs = |v: &[libc::iovec]| -> Vec<(usize, usize)> {
            v.iter().map(|s| (s.iov_base as usize, s.iov_len)).collect()
        };
        assert_eq!(pairs(&a), pairs(&b), "chain {i}");
    }
}
