// SPDX-License-Identifier: Apache-2.0
//! Threads: one worker per queue pair, each pair's worker alone on a thread (`net-pairN`) or
//! several on one (`net-pair0+2`: one epoll loop, each worker its own subscriber), and the
//! control-queue thread (`net-ctrl`), each thread an event-manager epoll loop.
//!
//! A worker polls its rx kick, tx kick, a reschedule eventfd (work left over after a
//! budget), its control eventfd, and — only while running — its backend fd, edge-triggered.
//! The control thread changes a worker's state through [`PairControl::request`], which
//! returns once the worker has confirmed the change from its own loop: after a confirmed
//! park the worker no longer has the backend fd in its epoll set and never reads or writes
//! it, so the backend can be detached safely.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::Backend;
use crate::control::{QueueOp, RunState};
use crate::ctrl::{CtrlQueue, CtrlTarget};
use crate::rxtx::{QueuePair, RxState, Work};
use crate::state::Shared;

/// How long stopping the device waits for each of its threads to end.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A device thread that can be waited for with a bound.
#[derive(Debug)]
pub struct DeviceThreadHandle {
    handle: std::thread::JoinHandle<()>,
    /// Disconnected when the thread's body has returned (or was dropped unrun).
    exited: std::sync::mpsc::Receiver<()>,
}

impl DeviceThreadHandle {
    /// Joins the thread if it ends within `timeout`; otherwise leaves it detached (it holds
    /// only shared references and ends on its own once it sees its stop request) and says so.
    pub fn join_within(self, timeout: Duration) -> bool {
        match self.exited.recv_timeout(timeout) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let name = self.handle.thread().name().unwrap_or("?").to_owned();
                error!(
                    "virtio-net: thread {name} did not end within {} ms; left detached",
                    timeout.as_millis()
                );
                false
            }
            _ => {
                let _ = self.handle.join();
                true
            }
        }
    }
}

/// What a worker needs besides its queue pair.
pub struct WorkerFds {
    /// Kick of the receive queue.
    pub rx_kick: EventFd,
    /// Kick of the transmit queue.
    pub tx_kick: EventFd,
}

struct PairWorker<B: Backend> {
    qp: QueuePair,
    shared: Arc<Shared<B>>,
    pair: usize,
    fds: WorkerFds,
    resched: EventFd,
    running: bool,
    stop: Arc<AtomicBool>,
    pending_tx: bool,
    pending_rx: bool,
    offloads_seen: u64,
    /// The generation of the receive filter and coalescing the queue pair applies.
    settings_seen: u64,
    /// Fires when a held (coalesced) notification falls due; `None` if it could not be
    /// created, and then notifications are not held.
    timer: Option<TimerFd>,
    /// The due time the timer is armed for.
    timer_due: Option<Instant>,
    features: crate::features::Negotiated,
    warned_err: bool,
    /// The backend failed (an error event, or a read error) since the last check.
    backend_error: bool,
    /// The backend is gone for good (tap deleted): never polled or read again.
    lost: bool,
}

impl<B: Backend> PairWorker<B> {
    fn backend_fd(&self) -> RawFd {
        self.shared.backends[self.pair].as_raw_fd()
    }

    fn backend_events(&self) -> Events {
        Events::new_raw(self.backend_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED)
    }

    /// Arms the timer for the next held notification, if its due time changed.
    fn arm_timer(&mut self) {
        let due = self.qp.next_due();
        if due == self.timer_due {
            return;
        }
        let Some(timer) = self.timer.as_mut() else {
            return;
        };
        let result = match due {
            // A zero duration would disarm the timer: fire as soon as possible instead.
            Some(at) => timer.reset(
                at.saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1)),
                None,
            ),
            None => timer.clear(),
        };
        match result {
            Ok(()) => self.timer_due = due,
            Err(e) => error!("virtio-net: pair {} cannot arm its timer: {e}", self.pair),
        }
    }

    /// The timer fired (or fired and was re-armed since: epoll may report it late). Disarming
    /// it resets its count, so it stops polling readable without a (blocking) read; what is
    /// due goes out, and the end of the event re-arms it for what is still held.
    fn on_timer(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            if let Err(e) = timer.clear() {
                error!(
                    "virtio-net: pair {} cannot disarm its timer: {e}",
                    self.pair
                );
            }
        }
        self.timer_due = None;
        self.qp.notify_due(Instant::now());
    }

    fn schedule(&mut self) {
        if let Err(e) = self.resched.write(1) {
            error!("virtio-net: pair {} cannot reschedule: {e}", self.pair);
        }
    }

    fn run_tx(&mut self) {
        let link_up = self.shared.link_up.load(Ordering::Relaxed);
        let shared = Arc::clone(&self.shared);
        let backend = tx_backend(&shared, self.pair, self.running, self.lost);
        self.pending_tx = self.qp.process_tx(backend, link_up) == Work::More;
        if self.pending_tx {
            self.schedule();
        }
    }

    /// Before parking: everything the guest queued so far leaves on this pair's own queue,
    /// while it is still attached (bounded: a few ring's worth).
    fn flush_tx(&mut self) {
        for _ in 0..8 {
            self.run_tx();
            if !self.pending_tx {
                break;
            }
        }
    }

    /// Sizes receive buffers for the guest offloads in force, and takes the receive filter
    /// and notification coalescing in force.
    fn refresh_path(&mut self) {
        let offloads = self.shared.guest_offloads.load(Ordering::Acquire);
        if offloads != self.offloads_seen {
            self.offloads_seen = offloads;
            self.qp
                .set_path(self.shared.path_config(self.features, offloads));
        }
        let settings_gen = self.shared.settings_gen.load(Ordering::Acquire);
        if settings_gen != self.settings_seen {
            self.settings_seen = settings_gen;
            self.qp.set_filter(self.shared.rx_filter());
            let (rx, tx) = self.shared.coalescing(self.pair);
            if self.timer.is_some() {
                self.qp.set_coalescing(rx, tx);
            }
        }
    }

    fn run_rx(&mut self) {
        if !self.running || self.lost {
            return;
        }
        self.refresh_path();
        let state = self.qp.process_rx(&self.shared.backends[self.pair]);
        self.pending_rx = state == RxState::More;
        if state == RxState::BackendError {
            self.backend_error = true;
        }
        if self.pending_rx {
            self.schedule();
        }
    }

    /// Hands what waits on the backend to the receive queue (bounded: a few budgets' worth);
    /// returns true if the backend was left empty. With `discard`, what the guest has no
    /// buffers for is read and counted as dropped (`steer_dropped`), so that the backend is
    /// empty when it is detached: a detached tap queue is purged unseen.
    fn drain_rx(&mut self, discard: bool) -> bool {
        if !self.running || self.lost {
            return true;
        }
        self.refresh_path();
        for _ in 0..DRAIN_ROUNDS {
            match self.qp.process_rx(&self.shared.backends[self.pair]) {
                RxState::More => {}
                RxState::Drained => return true,
                _ => break,
            }
        }
        if !discard {
            return false;
        }
        let dropped = discard_frames(&self.shared.backends[self.pair]);
        if dropped > 0 {
            self.shared
                .metrics
                .steer_dropped
                .fetch_add(dropped, Ordering::Relaxed);
            warn!(
                "virtio-net: pair {}: {dropped} received frames dropped while disabling it \
                 (the guest gave no receive buffers for them)",
                self.pair
            );
        }
        true
    }

    /// After a backend error: a backend that is gone (its tap deleted) reports an error on
    /// every poll and read from now on, so stop polling it (no busy loop) and let the device
    /// take the link down. Any other error is left to the next event (edge-triggered).
    fn check_backend(&mut self, ops: &mut EventOps) {
        self.backend_error = false;
        if self.lost || !self.shared.backends[self.pair].is_gone() {
            return;
        }
        if self.running {
            let _ = ops.remove(self.backend_events());
        }
        self.lost = true;
        self.pending_rx = false;
        self.shared.backend_lost(self.pair);
    }

    fn handle_control(&mut self, ops: &mut EventOps) {
        let ctl = &self.shared.pairs[self.pair];
        let _ = ctl.event().read();
        let Some((seq, state)) = ctl.pending() else {
            return;
        };
        // Every confirmation vouches for the settings in force when it was asked for
        // (GUEST_OFFLOADS_SET waits for it before the tap may send larger frames).
        self.refresh_path();
        let queue_op = self.shared.pairs[self.pair].take_queue_op();
        let enabled_queue = match queue_op {
            Some(QueueOp::Reset { rx }) => {
                self.qp.reset_queue(rx);
                if rx {
                    self.pending_rx = false;
                } else {
                    self.pending_tx = false;
                }
                false
            }
            Some(QueueOp::Enable { rx, queue }) => {
                self.qp.enable_queue(rx, queue);
                true
            }
            Some(QueueOp::Drain { discard }) => {
                let empty = self.drain_rx(discard);
                self.shared.pairs[self.pair].set_drained(empty);
                false
            }
            None => false,
        };
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics.pairs[self.pair];
        let mut result = None;
        match state {
            RunState::Parked | RunState::Stopped => {
                if self.running && state == RunState::Parked && !self.lost {
                    self.flush_tx();
                }
                if self.running {
                    // The fd may already be gone from the set; either way it is not polled.
                    let _ = ops.remove(self.backend_events());
                    self.running = false;
                }
                metrics.parked.store(true, Ordering::Relaxed);
                if state == RunState::Stopped {
                    self.stop.store(true, Ordering::Relaxed);
                }
            }
            RunState::Running => {
                if !self.running && self.lost {
                    // Nothing to poll; tx chains are still served (and dropped: link down).
                    self.running = true;
                    metrics.parked.store(false, Ordering::Relaxed);
                } else if !self.running {
                    match ops.add(self.backend_events()) {
                        Ok(()) => {
                            self.running = true;
                            metrics.parked.store(false, Ordering::Relaxed);
                        }
                        Err(e) => {
                            error!(
                                "virtio-net: pair {} cannot poll its backend: {e}",
                                self.pair
                            );
                            result = Some(io::ErrorKind::Other);
                        }
                    }
                }
            }
        }
        self.shared.pairs[self.pair].confirm(seq, result);
        if enabled_queue || (self.running && state == RunState::Running) {
            // Frames may have queued before the fd was polled (edge-triggered).
            self.run_rx();
            self.run_tx();
        }
    }
}

/// Where a pair's transmit frames go. A running pair writes to its own tap queue. A parked
/// pair never touches its own (detached) queue, but the guest may still queue frames on it —
/// VQ_PAIRS_SET races with transmits on other vCPUs until the driver has shrunk its real
/// queue count — and the host stack does not care which queue of the tap a frame was written
/// to: they leave through pair 0's queue, attached whenever the device runs, so nothing the
/// guest sent is lost. Without any attached queue (reset, tap gone) the frames are dropped.
fn tx_backend<B: Backend>(
    shared: &Shared<B>,
    pair: usize,
    running: bool,
    lost: bool,
) -> Option<&B> {
    if running {
        Some(&shared.backends[pair])
    } else if pair != 0 && !lost && shared.metrics.pairs[0].attached.load(Ordering::Acquire) {
        Some(&shared.backends[0])
    } else {
        None
    }
}

/// Budgets of frames a drain hands to the guest before it reports the backend not empty.
const DRAIN_ROUNDS: usize = 8;
/// Frames a discarding drain reads at most (a tap queue holds 500 by default).
const DISCARD_MAX: u64 = 4096;

/// Reads and drops up to [`DISCARD_MAX`] frames from `backend`; returns how many.
fn discard_frames<B: Backend>(backend: &B) -> u64 {
    let mut buf = vec![0u8; 65536 + 64];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let mut n = 0;
    while n < DISCARD_MAX {
        // SAFETY: the iovec describes `buf`, which is alive and writable for the call.
        match unsafe { backend.readv(&iov) } {
            Ok(_) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    n
}

fn drain(evt: &EventFd) -> u64 {
    evt.read().unwrap_or(0)
}

impl<B: Backend> MutEventSubscriber for PairWorker<B> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.fds.tx_kick.as_raw_fd() {
            let n = drain(&self.fds.tx_kick);
            self.shared.metrics.pairs[self.pair].tx.add_notifications(n);
            self.run_tx();
        } else if fd == self.fds.rx_kick.as_raw_fd() {
            let n = drain(&self.fds.rx_kick);
            self.shared.metrics.pairs[self.pair].rx.add_notifications(n);
            self.run_rx();
        } else if fd == self.resched.as_raw_fd() {
            let _ = drain(&self.resched);
            if self.pending_tx {
                self.run_tx();
            }
            if self.pending_rx {
                self.run_rx();
            }
        } else if fd == self.shared.pairs[self.pair].event().as_raw_fd() {
            self.handle_control(ops);
        } else if self.timer.as_ref().is_some_and(|t| t.as_raw_fd() == fd) {
            self.on_timer();
        } else if self.running && fd == self.backend_fd() {
            let set = events.event_set();
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                if !self.warned_err {
                    warn!("virtio-net: backend of pair {} reports {set:?}", self.pair);
                    self.warned_err = true;
                }
                self.backend_error = true;
            }
            self.run_rx();
        }
        if self.backend_error {
            self.check_backend(ops);
        }
        self.arm_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            self.fds.rx_kick.as_raw_fd(),
            self.fds.tx_kick.as_raw_fd(),
            self.resched.as_raw_fd(),
            self.shared.pairs[self.pair].event().as_raw_fd(),
        ];
        fds.extend(self.timer.as_ref().map(|t| t.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!("virtio-net: pair {} cannot poll fd {fd}: {e}", self.pair);
            }
        }
        if self.running {
            if let Err(e) = ops.add(self.backend_events()) {
                error!(
                    "virtio-net: pair {} cannot poll its backend: {e}",
                    self.pair
                );
            }
        }
        self.shared.metrics.pairs[self.pair]
            .parked
            .store(!self.running, Ordering::Relaxed);
    }
}

/// Everything a worker thread is started with (all `Send`).
pub struct WorkerStart<B: Backend> {
    /// Shared device state.
    pub shared: Arc<Shared<B>>,
    /// Pair index.
    pub pair: usize,
    /// Receive queue.
    pub rx: virtio_queue::Queue,
    /// Transmit queue.
    pub tx: virtio_queue::Queue,
    /// Kick eventfds.
    pub fds: WorkerFds,
    /// Guest memory.
    pub mem: vm_memory::GuestMemoryMmap,
    /// Interrupt sink.
    pub interrupt: Arc<dyn crate::Interrupt>,
    /// Negotiated features.
    pub features: crate::features::Negotiated,
    /// Whether the worker starts running (pair 0) or parked.
    pub running: bool,
}

/// Runs one epoll loop for `subscribers` until every flag in `stops` is set. The event
/// manager is created on the thread itself (subscribers need not be `Send`); `ready` reports
/// whether it could be.
fn run_loop<S: MutEventSubscriber>(
    subscribers: impl FnOnce() -> Vec<S>,
    stops: &[Arc<AtomicBool>],
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let mut em = match EventManager::<S>::new() {
        Ok(em) => em,
        Err(e) => {
            let _ = ready.send(Err(io::Error::other(e)));
            return;
        }
    };
    for subscriber in subscribers() {
        em.add_subscriber(subscriber);
    }
    let _ = ready.send(Ok(()));
    while !stops.iter().all(|s| s.load(Ordering::Relaxed)) {
        if let Err(e) = em.run() {
            error!(
                "virtio-net: {:?} epoll failed: {e}",
                std::thread::current().name()
            );
            break;
        }
    }
}

/// Which of the device's threads is being started; a VMM picks the thread's sandbox by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceThread {
    /// `net-pairN`: the data path of queue pair N (eventfds, epoll, readv/writev on its tap
    /// queue; on a backend error, TUNGETIFF to tell a deleted tap from a transient error).
    QueuePair(u16),
    /// `net-ctrl`: the control queue (eventfds, epoll, condvar waits, TUNSETQUEUE,
    /// TUNSETVNETHDRSZ, TUNSETOFFLOAD, TUNGETIFF).
    Control,
}

/// Starts the device's threads.
///
/// The device starts its threads at activation, which a transport runs on whatever thread
/// handled the driver's DRIVER_OK write (in mqvmm a vCPU, over either transport). A VMM that
/// confines its threads (seccomp filters are inherited by threads created afterwards and can
/// only be narrowed) provides its own spawner, so the device threads are created from a thread
/// of its choice and each can enter its own sandbox before running `body`. If the spawned
/// thread exits without running `body`, activation fails cleanly.
pub trait ThreadSpawner: Send + Sync {
    /// Starts a thread named `name` that runs `body`.
    fn spawn(
        &self,
        kind: DeviceThread,
        name: String,
        body: Box<dyn FnOnce() + Send + 'static>,
    ) -> io::Result<std::thread::JoinHandle<()>>;
}

/// Spawns device threads from the activating thread with `std::thread` (no sandbox).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdSpawner;

impl ThreadSpawner for StdSpawner {
    fn spawn(
        &self,
        _kind: DeviceThread,
        name: String,
        body: Box<dyn FnOnce() + Send + 'static>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name(name).spawn(body)
    }
}

/// Spawns `name` running `body` through `spawner`, and waits until its event loop is set up.
pub(crate) fn spawn_loop(
    spawner: &dyn ThreadSpawner,
    kind: DeviceThread,
    name: String,
    body: impl FnOnce(std::sync::mpsc::Sender<io::Result<()>>) + Send + 'static,
) -> io::Result<DeviceThreadHandle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (exit_tx, exited) = std::sync::mpsc::channel::<()>();
    let handle = spawner.spawn(
        kind,
        name,
        Box::new(move || {
            // Dropped when the body returns or unwinds: the thread is done.
            let _exit = exit_tx;
            body(tx)
        }),
    )?;
    match rx.recv() {
        Ok(Ok(())) => Ok(DeviceThreadHandle { handle, exited }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(io::Error::other("worker thread exited during setup"))
        }
    }
}

/// The name of the worker thread serving `pairs`: `net-pair0`, or `net-pair0+2` for a
/// thread that serves pairs 0 and 2 (Linux keeps the first 15 bytes).
pub fn worker_thread_name(pairs: &[usize]) -> String {
    let list: Vec<String> = pairs.iter().map(ToString::to_string).collect();
    format!("net-pair{}", list.join("+"))
}

/// Spawns one worker thread serving the queue pairs of `starts` (each pair its own epoll
/// subscriber in the thread's one loop) and waits until it polls their fds.
pub fn spawn_workers<B: Backend + 'static>(
    spawner: &dyn ThreadSpawner,
    starts: Vec<WorkerStart<B>>,
) -> io::Result<DeviceThreadHandle> {
    let pairs: Vec<usize> = starts.iter().map(|s| s.pair).collect();
    let Some(&first) = pairs.first() else {
        return Err(io::Error::other("a worker thread needs a queue pair"));
    };
    let name = worker_thread_name(&pairs);
    let kind = DeviceThread::QueuePair(first as u16);
    let mut parts = Vec::with_capacity(starts.len());
    for start in starts {
        parts.push((start, EventFd::new(EFD_NONBLOCK)?));
    }
    spawn_loop(spawner, kind, name, move |ready| {
        let stops: Vec<Arc<AtomicBool>> = parts
            .iter()
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect();
        let worker_stops = stops.clone();
        run_loop(
            move || {
                parts
                    .into_iter()
                    .zip(worker_stops)
                    .map(|((start, resched), stop)| PairWorker::new(start, resched, stop))
                    .collect()
            },
            &stops,
            ready,
        );
    })
}

impl<B: Backend> PairWorker<B> {
    fn new(start: WorkerStart<B>, resched: EventFd, stop: Arc<AtomicBool>) -> Self {
        let offloads = start.shared.guest_offloads.load(Ordering::Relaxed);
        let qp = QueuePair::new(
            start.pair as u16,
            start.rx,
            start.tx,
            start.mem,
            start.interrupt,
            start.shared.metrics.clone(),
            start.shared.path_config(start.features, offloads),
        );
        PairWorker {
            qp,
            shared: start.shared,
            pair: start.pair,
            fds: start.fds,
            resched,
            running: start.running,
            stop,
            pending_tx: false,
            pending_rx: false,
            offloads_seen: offloads,
            // Differs from any generation: the first refresh takes the filter.
            settings_seen: u64::MAX,
            timer: match TimerFd::new() {
                Ok(timer) => Some(timer),
                Err(e) => {
                    warn!(
                        "virtio-net: pair {} has no timer ({e}); notifications are \
                         not coalesced",
                        start.pair
                    );
                    None
                }
            },
            timer_due: None,
            features: start.features,
            warned_err: false,
            backend_error: false,
            lost: false,
        }
    }
}

struct CtrlWorker<T: CtrlTarget> {
    cq: CtrlQueue,
    target: T,
    kick: EventFd,
    /// Written to come back after the command budget ran out.
    resched: EventFd,
    stop_evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl<T: CtrlTarget> CtrlWorker<T> {
    fn run(&mut self, kicked_at: Instant) {
        if self.cq.process(&mut self.target, kicked_at) == Work::More {
            if let Err(e) = self.resched.write(1) {
                error!("virtio-net: control thread cannot reschedule: {e}");
            }
        }
    }
}

impl<T: CtrlTarget> MutEventSubscriber for CtrlWorker<T> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.kick.as_raw_fd() {
            let kicked_at = Instant::now();
            let n = drain(&self.kick);
            self.cq.count_kicks(n);
            self.run(kicked_at);
        } else if events.fd() == self.resched.as_raw_fd() {
            let _ = drain(&self.resched);
            self.run(Instant::now());
        } else if events.fd() == self.stop_evt.as_raw_fd() {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.kick.as_raw_fd(),
            self.resched.as_raw_fd(),
            self.stop_evt.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!("virtio-net: control thread cannot poll fd {fd}: {e}");
            }
        }
    }
}

/// Spawns the control-queue thread `net-ctrl`, answering `cq`'s commands on `target`;
/// writing `stop_evt` ends it.
pub fn spawn_ctrl<T: CtrlTarget + Send + 'static>(
    spawner: &dyn ThreadSpawner,
    cq: CtrlQueue,
    target: T,
    kick: EventFd,
    stop_evt: EventFd,
) -> io::Result<DeviceThreadHandle> {
    let resched = EventFd::new(EFD_NONBLOCK)?;
    spawn_loop(
        spawner,
        DeviceThread::Control,
        "net-ctrl".into(),
        move |ready| {
            let stop = Arc::new(AtomicBool::new(false));
            let worker_stop = stop.clone();
            run_loop(
                move || {
                    vec![CtrlWorker {
                        cq,
                        target,
                        kick,
                        resched,
                        stop_evt,
                        stop: worker_stop,
                    }]
                },
                &[stop],
                ready,
            );
        },
    )
}
