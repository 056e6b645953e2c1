// SPDX-License-Identifier: Apache-2.0
//! The VQ_PAIRS_SET sequence over a model switch: order of steps and rollback on the k-th
//! failure of each kind.

use crate::ctrl::{switch_pairs, PairSwitch, SwitchError};
use crate::BackendError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Park(usize),
    Resume(usize),
    Attach(usize),
    Detach(usize),
}

/// Which kind of step fails, and on which call of that kind (1-based).
type FailPlan = Option<(fn(usize) -> Step, usize)>;

/// A model of workers and backends that enforces the safety rules: a backend is detached
/// only while its worker is parked, and a worker resumes only on an attached backend.
struct Model {
    running: Vec<bool>,
    attached: Vec<bool>,
    steps: Vec<Step>,
    /// Fail the k-th call (1-based) of this kind.
    fail: FailPlan,
    calls: usize,
    undo_failures: usize,
}

impl Model {
    fn new(max: usize, active: usize) -> Self {
        Model {
            running: (0..max).map(|p| p < active).collect(),
            attached: (0..max).map(|p| p < active).collect(),
            steps: Vec::new(),
            fail: None,
            calls: 0,
            undo_failures: 0,
        }
    }

    fn failing(mut self, kind: fn(usize) -> Step, k: usize) -> Self {
        self.fail = Some((kind, k));
        self
    }

    fn should_fail(&mut self, step: Step) -> bool {
        match self.fail {
            Some((kind, k)) if kind(0) == zero(step) => {
                self.calls += 1;
                self.calls == k
            }
            _ => false,
        }
    }

    fn enabled(&self) -> usize {
        let n = self.running.iter().take_while(|&&r| r).count();
        assert!(self.running[n..].iter().all(|&r| !r), "{:?}", self.running);
        assert_eq!(self.running, self.attached, "running and attached agree");
        n
    }

    fn err(pair: usize) -> SwitchError {
        SwitchError::Backend {
            pair,
            source: BackendError::new(crate::BackendOp::Attach, pair as u16, "injected"),
        }
    }
}

fn zero(step: Step) -> Step {
    match step {
        Step::Park(_) => Step::Park(0),
        Step::Resume(_) => Step::Resume(0),
        Step::Attach(_) => Step::Attach(0),
        Step::Detach(_) => Step::Detach(0),
    }
}

impl PairSwitch for Model {
    fn park(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.steps.push(Step::Park(pair));
        if self.should_fail(Step::Park(pair)) {
            return Err(Model::err(pair));
        }
        self.running[pair] = false;
        Ok(())
    }

    fn resume(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.steps.push(Step::Resume(pair));
        assert!(
            self.attached[pair],
            "resume of pair {pair} on a detached backend"
        );
        if self.should_fail(Step::Resume(pair)) {
            return Err(Model::err(pair));
        }
        self.running[pair] = true;
        Ok(())
    }

    fn attach(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.steps.push(Step::Attach(pair));
        if self.should_fail(Step::Attach(pair)) {
            return Err(Model::err(pair));
        }
        assert!(!self.attached[pair], "attach of attached pair {pair}");
        self.attached[pair] = true;
        Ok(())
    }

    fn detach(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.steps.push(Step::Detach(pair));
        assert!(
            !self.running[pair],
            "detach of pair {pair} while its worker runs"
        );
        if self.should_fail(Step::Detach(pair)) {
            return Err(Model::err(pair));
        }
        assert!(self.attached[pair], "detach of detached pair {pair}");
        self.attached[pair] = false;
        Ok(())
    }

    fn undo_failed(&mut self, _pair: usize, _err: &SwitchError) {
        self.undo_failures += 1;
    }
}

#[test]
fn shrink_parks_before_detaching_highest_first() {
    let mut m = Model::new(4, 4);
    switch_pairs(&mut m, 4, 1).unwrap();
    use Step::*;
    assert_eq!(
        m.steps,
        [Park(3), Detach(3), Park(2), Detach(2), Park(1), Detach(1)]
    );
    assert_eq!(m.enabled(), 1);
}

#[test]
fn grow_attaches_before_resuming() {
    let mut m = Model::new(4, 1);
    switch_pairs(&mut m, 1, 3).unwrap();
    use Step::*;
    assert_eq!(m.steps, [Attach(1), Resume(1), Attach(2), Resume(2)]);
    assert_eq!(m.enabled(), 3);
}

#[test]
fn same_count_does_nothing() {
    let mut m = Model::new(4, 2);
    switch_pairs(&mut m, 2, 2).unwrap();
    assert!(m.steps.is_empty());
}

#[test]
fn shrink_rolls_back_on_the_kth_failure_of_any_step() {
    for (kind, name) in [
        (Step::Detach as fn(usize) -> Step, "detach"),
        (Step::Park as fn(usize) -> Step, "park"),
    ] {
        for k in 1..=3 {
            let mut m = Model::new(4, 4).failing(kind, k);
            assert!(switch_pairs(&mut m, 4, 1).is_err(), "{name} #{k}");
            assert_eq!(
                m.enabled(),
                4,
                "{name} #{k}: back to 4 pairs: {:?}",
                m.steps
            );
            assert_eq!(m.undo_failures, 0);
        }
    }
}

#[test]
fn grow_rolls_back_on_the_kth_failure_of_any_step() {
    for (kind, name) in [
        (Step::Attach as fn(usize) -> Step, "attach"),
        (Step::Resume as fn(usize) -> Step, "resume"),
    ] {
        for k in 1..=3 {
            let mut m = Model::new(4, 1).failing(kind, k);
            assert!(switch_pairs(&mut m, 1, 4).is_err(), "{name} #{k}");
            assert_eq!(m.enabled(), 1, "{name} #{k}: back to 1 pair: {:?}", m.steps);
            assert_eq!(m.undo_failures, 0);
        }
    }
}

#[test]
fn rollback_order_is_the_reverse_of_what_was_done() {
    use Step::*;
    // 4 -> 1 with the 3rd detach failing: pairs 3 and 2 were detached.
    let mut m = Model::new(4, 4).failing(Detach, 3);
    switch_pairs(&mut m, 4, 1).unwrap_err();
    assert_eq!(
        m.steps,
        [
            Park(3),
            Detach(3),
            Park(2),
            Detach(2),
            Park(1),
            Detach(1),
            Resume(1),
            Attach(2),
            Resume(2),
            Attach(3),
            Resume(3)
        ]
    );
    // 1 -> 4 with the 2nd attach failing: pair 1 was enabled.
    let mut m = Model::new(4, 1).failing(Attach, 2);
    switch_pairs(&mut m, 1, 4).unwrap_err();
    assert_eq!(
        m.steps,
        [Attach(1), Resume(1), Attach(2), Park(1), Detach(1)]
    );
}

#[test]
fn a_failing_undo_is_reported() {
    use Step::*;
    // 4 -> 2 with the 2nd detach failing, and the undo's re-attach of pair 3 failing too.
    let mut m = Model::new(4, 4);
    m.fail = Some((Detach, 2));
    struct Both(Model);
    impl PairSwitch for Both {
        fn park(&mut self, p: usize) -> Result<(), SwitchError> {
            self.0.park(p)
        }
        fn resume(&mut self, p: usize) -> Result<(), SwitchError> {
            self.0.resume(p)
        }
        fn attach(&mut self, p: usize) -> Result<(), SwitchError> {
            self.0.steps.push(Attach(p));
            Err(Model::err(p))
        }
        fn detach(&mut self, p: usize) -> Result<(), SwitchError> {
            self.0.detach(p)
        }
        fn undo_failed(&mut self, p: usize, e: &SwitchError) {
            self.0.undo_failed(p, e)
        }
    }
    let mut b = Both(m);
    switch_pairs(&mut b, 4, 2).unwrap_err();
    assert_eq!(
        b.0.undo_failures, 1,
        "re-attaching pair 3 failed: {:?}",
        b.0.steps
    );
    assert!(
        !b.0.running[3] && !b.0.attached[3],
        "pair 3 left parked and detached"
    );
    assert!(
        b.0.running[2] && b.0.attached[2],
        "pair 2 itself was restored"
    );
}
