// SPDX-License-Identifier: Apache-2.0
//! Cases the fuzz targets (fuzz/, `make fuzz`) found, reproduced without the fuzzer.

use super::device::f_mq;
use super::*;
use crate::ctrl::ACK_ERR;
use crate::NetConfig;

/// fuzz target `ctrl`: growing 1 -> 2 where pair 1 attaches, its offloads fail, and the
/// detach that should undo the attach fails too. Pair 1 stays attached while disabled; that
/// failed undo must be counted in `rollback_failures` like every other one.
#[test]
fn failed_re_detach_after_failed_attach_setup_counts_as_rollback_failure() {
    let mem = guest_memory();
    let (b, _peers, journal) = backends(2);
    let cfg = NetConfig {
        queue_size: super::device::QSIZE,
        ..Default::default()
    };
    let mut rig = super::device::rig_over(&mem, b, cfg, f_mq(), |_| true).unwrap();
    rig.journal = journal;
    rig.journal.fail_offload_after(1);
    rig.journal.fail_detach_after(1);
    assert_eq!(rig.set_pairs(2), ACK_ERR);
    assert_eq!(rig.net.active_queue_pairs(), 1);
    assert_eq!(
        rig.attached(),
        [true, true],
        "pair 1 could not be detached again"
    );
    let m = rig.net.metrics();
    assert_eq!(m.attached_pairs(), 2, "metrics show the real state");
    assert_eq!(get(&m.rollback_failures), 1, "the failed undo is counted");
}
