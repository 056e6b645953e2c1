// SPDX-License-Identifier: Apache-2.0
//! The channel between the control thread and the workers: the control thread asks a
//! worker to run, park or stop ([`PairControl::request`]) and waits, bounded, for the worker
//! to confirm from its own loop; a [`StopSignal`] ends every such wait when the device is
//! being stopped.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ctrl::SwitchError;

/// How long the control thread waits for a worker to confirm a state change.
pub const WORKER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// The state a worker is asked to be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Polls and uses its backend.
    Running,
    /// Serves kicks but never touches its backend (tx frames leave through pair 0).
    Parked,
    /// Leaves its loop.
    Stopped,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Parked => "parked",
            RunState::Stopped => "stopped",
        }
    }
}

/// A change to one virtqueue of the pair while the device runs (VIRTIO_F_RING_RESET).
#[derive(Debug)]
pub(crate) enum QueueOp {
    /// Stop using the receive (`rx`) or transmit queue and forget its state.
    Reset { rx: bool },
    /// Use the receive (`rx`) or transmit queue again, with this ring.
    Enable {
        rx: bool,
        queue: virtio_queue::Queue,
    },
    /// Hand what waits on the backend to the receive queue now, and say whether the backend
    /// was left empty; with `discard`, read and count as dropped what the guest had no
    /// buffers for (the queue is about to be detached, which would purge it unseen).
    Drain { discard: bool },
}

#[derive(Debug)]
struct ControlState {
    requested: RunState,
    /// A queue change to carry out with the next confirmation.
    queue_op: Option<QueueOp>,
    seq: u64,
    confirmed_seq: u64,
    result: Option<io::ErrorKind>,
}

/// The channel between the control thread and one worker.
#[derive(Debug)]
pub struct PairControl {
    evt: EventFd,
    state: Mutex<ControlState>,
    cond: Condvar,
    /// The last [`QueueOp::Drain`] left the backend empty.
    drained: AtomicBool,
}

impl PairControl {
    /// A control channel whose worker starts in `initial`.
    pub fn new(initial: RunState) -> io::Result<Self> {
        Ok(PairControl {
            evt: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::new(ControlState {
                requested: initial,
                queue_op: None,
                seq: 0,
                confirmed_seq: 0,
                result: None,
            }),
            cond: Condvar::new(),
            drained: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // A poisoned lock only means another thread panicked mid-update; the fields are
        // plain values and remain usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets pending requests; the next worker starts in `initial`.
    pub fn reset(&self, initial: RunState) {
        let mut s = self.lock();
        s.requested = initial;
        s.queue_op = None;
        s.confirmed_seq = s.seq;
        s.result = None;
        let _ = self.evt.read();
    }

    /// Asks the worker of `pair` to move to `state` and waits until it confirms, at most
    /// `timeout`, and no longer than `abort` stays unraised (the device is being stopped).
    pub(crate) fn request(
        &self,
        pair: usize,
        state: RunState,
        timeout: Duration,
        abort: Option<&StopSignal>,
    ) -> Result<(), SwitchError> {
        let seq = {
            let mut s = self.lock();
            s.seq += 1;
            s.requested = state;
            s.seq
        };
        if let Err(e) = self.evt.write(1) {
            return Err(SwitchError::WorkerPoll { pair, source: e });
        }
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.confirmed_seq < seq {
            if abort.is_some_and(StopSignal::is_raised) {
                return Err(SwitchError::Stopping { pair });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SwitchError::WorkerTimeout {
                    pair,
                    state: state.name(),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            s = match self.cond.wait_timeout(s, deadline - now) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        match s.result {
            None => Ok(()),
            Some(kind) => Err(SwitchError::WorkerPoll {
                pair,
                source: io::Error::from(kind),
            }),
        }
    }

    /// Asks the worker of `pair` to carry out `op` (if any) and to move to `state` (`None`:
    /// the state it was last asked for), and waits as [`Self::request`] does.
    fn request_op(
        &self,
        pair: usize,
        state: Option<RunState>,
        op: Option<QueueOp>,
        timeout: Duration,
        abort: Option<&StopSignal>,
    ) -> Result<(), SwitchError> {
        let state = {
            let mut s = self.lock();
            if op.is_some() {
                s.queue_op = op;
            }
            state.unwrap_or(s.requested)
        };
        self.request(pair, state, timeout, abort)
    }

    /// Asks the worker of `pair` to confirm the state it was last asked for: it re-reads
    /// the device settings it caches (receive buffer sizing) before it confirms.
    pub(crate) fn refresh(
        &self,
        pair: usize,
        timeout: Duration,
        abort: Option<&StopSignal>,
    ) -> Result<(), SwitchError> {
        self.request_op(pair, None, None, timeout, abort)
    }

    /// Asks the worker of `pair` to carry out `op` on one of its queues (staying in the state
    /// it was last asked for) and waits, as [`Self::request`] does, until it has.
    pub(crate) fn request_queue_op(
        &self,
        pair: usize,
        op: QueueOp,
        timeout: Duration,
    ) -> Result<(), SwitchError> {
        self.request_op(pair, None, Some(op), timeout, None)
    }

    /// Asks the worker of `pair` to drain its backend into its receive queue ([`QueueOp::Drain`]
    /// without discarding) and waits as [`Self::request`] does; true if the backend was left
    /// empty, false if the guest ran out of receive buffers first.
    pub(crate) fn request_drain(
        &self,
        pair: usize,
        timeout: Duration,
        abort: Option<&StopSignal>,
    ) -> Result<bool, SwitchError> {
        self.drained.store(false, Ordering::SeqCst);
        let op = QueueOp::Drain { discard: false };
        self.request_op(pair, None, Some(op), timeout, abort)?;
        Ok(self.drained.load(Ordering::SeqCst))
    }

    /// Asks the worker of `pair` to park after a last drain that discards (and counts) what
    /// the guest has no buffers for; waits as [`Self::request`] does.
    pub(crate) fn request_drained_park(
        &self,
        pair: usize,
        timeout: Duration,
        abort: Option<&StopSignal>,
    ) -> Result<(), SwitchError> {
        let op = QueueOp::Drain { discard: true };
        self.request_op(pair, Some(RunState::Parked), Some(op), timeout, abort)
    }

    /// Worker side: the outcome of a [`QueueOp::Drain`], before confirming.
    pub(crate) fn set_drained(&self, empty: bool) {
        self.drained.store(empty, Ordering::SeqCst);
    }

    /// Worker side: the queue change asked for, if any (taken: it is carried out once).
    pub(crate) fn take_queue_op(&self) -> Option<QueueOp> {
        self.lock().queue_op.take()
    }

    /// Wakes a waiting [`Self::request`] so that it looks at its abort signal.
    pub(crate) fn wake(&self) {
        let _s = self.lock();
        self.cond.notify_all();
    }

    /// Worker side: the eventfd that says a request is pending.
    pub(crate) fn event(&self) -> &EventFd {
        &self.evt
    }

    /// Worker side: the latest request, if unconfirmed.
    pub(crate) fn pending(&self) -> Option<(u64, RunState)> {
        let s = self.lock();
        (s.confirmed_seq < s.seq).then_some((s.seq, s.requested))
    }

    /// Worker side: confirms request `seq` (and every earlier one).
    pub(crate) fn confirm(&self, seq: u64, result: Option<io::ErrorKind>) {
        let mut s = self.lock();
        s.confirmed_seq = seq;
        s.result = result;
        self.cond.notify_all();
    }
}

/// Raised while the device stops its threads (reset): the control thread then answers no
/// further command and gives up waiting, for workers or for the rate limit.
#[derive(Debug, Default)]
pub(crate) struct StopSignal {
    raised: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
}

impl StopSignal {
    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Raises the signal and wakes [`Self::sleep`]. Waiters in [`PairControl::request`] are
    /// woken by [`PairControl::wake`].
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cond.notify_all();
    }

    pub(crate) fn clear(&self) {
        self.raised.store(false, Ordering::SeqCst);
    }

    /// Sleeps for `d`; returns false, early, if the signal is or gets raised.
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.is_raised() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            g = match self.cond.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}
