// SPDX-License-Identifier: Apache-2.0
//! The device: feature negotiation, config space, activation and reset. What its threads
//! share is in `state.rs`; the threads themselves in `worker.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, error, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{Backend, BackendError};
use crate::config::{ConfigError, ConfigSpace, NetConfig};
use crate::control::{QueueOp, RunState, WORKER_CONFIRM_TIMEOUT};
use crate::ctrl::CtrlQueue;
use crate::features::{bit, offered_features, tun_offload_flags, Negotiated, TUN_USO_PROBE};
use crate::metrics::NetMetrics;
use crate::state::{relock, DeviceCtrl, ResetFailed, Shared};
use crate::steer::Steering;
use crate::worker::{
    spawn_ctrl, spawn_workers, worker_thread_name, DeviceThreadHandle, StdSpawner, ThreadSpawner,
    WorkerFds, WorkerStart, JOIN_TIMEOUT,
};
use crate::Interrupt;

impl From<ResetFailed> for Error {
    fn from(e: ResetFailed) -> Self {
        Error::BackendSetup {
            pair: e.pair,
            source: e.source,
        }
    }
}

/// Errors of device creation and activation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options or the backend count are not acceptable.
    #[error("invalid virtio-net configuration")]
    Config(#[from] ConfigError),
    /// A backend could not be put into the reset state (pair 0 attached, others detached).
    #[error("cannot put backend of pair {pair} into the reset state")]
    BackendSetup {
        /// The pair.
        pair: usize,
        /// The backend error.
        #[source]
        source: BackendError,
    },
    /// `activate` was called twice without a reset.
    #[error("device is already active")]
    AlreadyActive,
    /// The transport passed a queue index the device does not have.
    #[error("queue index {index} does not exist (the device has {count} queues)")]
    UnknownQueue {
        /// The index passed.
        index: u16,
        /// Number of queues for the negotiated features.
        count: usize,
    },
    /// The transport passed the same queue index twice.
    #[error("queue {index} was passed twice")]
    DuplicateQueue {
        /// The index.
        index: u16,
    },
    /// A queue's size or ring addresses do not fit guest memory.
    #[error("queue {index} is not valid (size or rings outside guest memory)")]
    InvalidQueue {
        /// The index.
        index: u16,
    },
    /// A queue of pair 0 is missing: the device cannot run.
    #[error("queue {index} of the first queue pair is not ready")]
    MissingQueue {
        /// The index.
        index: u16,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A queue cannot be reset or enabled on its own (VIRTIO_F_RING_RESET).
    #[error("queue {index} cannot be {action} on its own: {reason}")]
    QueueOp {
        /// The queue index.
        index: u16,
        /// "reset" or "enabled".
        action: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The worker of a queue did not carry out a queue reset or enable.
    #[error("worker of queue {index} did not take the change")]
    QueueWorker {
        /// The queue index.
        index: u16,
        /// What the worker channel said.
        #[source]
        source: crate::ctrl::SwitchError,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Spawn {
        /// The thread name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The threads of an active device. Dropping it stops and joins them (bounded), so every
/// early return of activation, a reset and dropping the device all stop what was started.
struct Running<B: Backend> {
    shared: Arc<Shared<B>>,
    /// Each worker thread with the pairs it serves.
    workers: Vec<(Vec<usize>, DeviceThreadHandle)>,
    ctrl: Option<(EventFd, DeviceThreadHandle)>,
}

impl<B: Backend> Drop for Running<B> {
    /// Stops and joins the control thread first (it drives the workers), then the workers.
    /// Every wait is bounded: the control thread gives up any wait once the stop signal is
    /// raised, workers confirm between bounded rounds of work, and a thread that still does
    /// not end within [`JOIN_TIMEOUT`] is left detached (and said so) rather than blocking
    /// the caller, which may be a vCPU holding the bus.
    fn drop(&mut self) {
        self.shared.stop.raise();
        for ctl in &self.shared.pairs {
            ctl.wake();
        }
        if let Some((stop, handle)) = self.ctrl.take() {
            if let Err(e) = stop.write(1) {
                error!("virtio-net: cannot stop the control thread: {e}");
            }
            handle.join_within(JOIN_TIMEOUT);
        }
        for (pairs, handle) in self.workers.drain(..) {
            for pair in pairs {
                let stopped = self.shared.pairs[pair].request(
                    pair,
                    RunState::Stopped,
                    WORKER_CONFIRM_TIMEOUT,
                    None,
                );
                if let Err(e) = stopped {
                    error!("virtio-net: {e}");
                }
            }
            handle.join_within(JOIN_TIMEOUT);
        }
    }
}

/// What an operator may see and change of a running device ([`Net::control`]).
pub struct NetControl<B> {
    shared: Arc<Shared<B>>,
}

impl<B: Backend> NetControl<B> {
    /// Sets the link state shown to the guest, as [`Net::set_link_up`] does. Refused (returns
    /// false, the link stays down) for `up` once a backend is gone: the tap was deleted, and
    /// the device cannot reach the host any more.
    pub fn set_link_up(&self, up: bool) -> bool {
        if up && self.shared.backend_gone.load(Ordering::SeqCst) {
            return false;
        }
        self.shared.set_link(up);
        true
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.shared.metrics
    }

    /// The backends, one per queue pair.
    pub fn backends(&self) -> &[B] {
        &self.shared.backends
    }
}

/// A multiqueue virtio-net device; one [`Backend`] per queue pair.
pub struct Net<B: Backend> {
    cfg: NetConfig,
    avail_features: u64,
    acked_features: u64,
    shared: Arc<Shared<B>>,
    running: Option<Running<B>>,
    spawner: Arc<dyn ThreadSpawner>,
    /// Worker threads the queue pairs share; `None`: one per pair.
    io_threads: Option<usize>,
}

impl<B: Backend + 'static> Net<B> {
    /// Virtio device ID of a network card.
    pub const DEVICE_TYPE: u32 = 1;

    /// A device with one queue pair per backend. The backends are put into the reset
    /// state: pair 0 attached, all others detached.
    ///
    /// Without a configured MTU the device advertises the MTU of the host interface
    /// ([`Backend::mtu`]) when it can be learned, so that the guest's MTU, and the receive
    /// buffers, match what the host can send it.
    pub fn new(cfg: NetConfig, backends: Vec<B>) -> Result<Self, Error> {
        Self::with_steering(cfg, backends, None)
    }

    /// The same, steering received frames through the tap's steering program, whose
    /// configuration `steering` writes (see `steer.rs`): VQ_PAIRS_SET then loses no frame,
    /// and the device offers VIRTIO_NET_F_RSS (with MQ).
    pub fn with_steering(
        mut cfg: NetConfig,
        backends: Vec<B>,
        steering: Option<Arc<dyn Steering>>,
    ) -> Result<Self, Error> {
        cfg.validate(backends.len())?;
        if cfg.mtu.is_none() {
            cfg.mtu = backends
                .first()
                .and_then(Backend::mtu)
                .and_then(|m| u16::try_from(m.min(u32::from(u16::MAX))).ok())
                .filter(|&m| m >= crate::config::MIN_MTU);
            if let Some(mtu) = cfg.mtu {
                debug!("virtio-net: advertising the host interface's MTU {mtu}");
            }
        }
        let attached = backends
            .iter()
            .enumerate()
            .map(|(pair, b)| {
                b.is_attached()
                    .map_err(|source| Error::BackendSetup { pair, source })
            })
            .collect::<Result<Vec<bool>, Error>>()?;
        let rss = cfg.mq && steering.is_some();
        let config = ConfigSpace::new(cfg.mac, backends.len() as u16, cfg.mtu, true)
            .with_link(cfg.speed_mbps, cfg.duplex)
            .with_rss(rss);
        let shared = Arc::new(
            Shared::new(backends, attached, config, cfg.mtu, steering).map_err(Error::EventFd)?,
        );
        shared.enter_reset_state(&mut relock(&shared.state))?;
        // Pair 0 is attached now; activation sets the offloads the driver negotiated.
        let uso = shared.backends[0].accepts_offload(TUN_USO_PROBE);
        Ok(Net {
            avail_features: offered_features(cfg.mtu.is_some(), cfg.mq, uso, rss),
            acked_features: 0,
            cfg,
            shared,
            running: None,
            spawner: Arc::new(StdSpawner),
            io_threads: None,
        })
    }

    /// Starts the device's threads through `spawner` from now on (default: [`StdSpawner`],
    /// from the thread that activates the device).
    pub fn set_thread_spawner(&mut self, spawner: Arc<dyn ThreadSpawner>) {
        self.spawner = spawner;
    }

    /// Serves the queue pairs from at most `threads` worker threads (at least one; default:
    /// one per pair). Pair `p` goes to thread `p % threads`, so the pairs the guest enables
    /// first (0, 1, ...) land on different threads. Fewer threads than pairs suits a host
    /// with few CPUs beyond the vCPUs: one thread serving several busy queues batches their
    /// work instead of waking a thread per kick and competing with the vCPUs for a CPU.
    pub fn set_io_threads(&mut self, threads: usize) {
        self.io_threads = Some(threads);
    }

    /// Number of queue pairs (max_virtqueue_pairs).
    pub fn max_queue_pairs(&self) -> u16 {
        self.shared.backends.len() as u16
    }

    /// The backends, one per queue pair.
    pub fn backends(&self) -> &[B] {
        &self.shared.backends
    }

    /// Number of queue pairs currently enabled.
    pub fn active_queue_pairs(&self) -> u16 {
        relock(&self.shared.state).active as u16
    }

    /// Index of the control queue for the acked features: `2 * max_pairs` with MQ, 2
    /// without (virtio spec 5.1.2).
    pub fn ctrl_queue_index(&self) -> u16 {
        if Negotiated(self.acked_features).mq() {
            2 * self.max_queue_pairs()
        } else {
            2
        }
    }

    /// Maximum size of every queue, in queue-index order: rx0, tx0, rx1, tx1, ..., ctrl
    /// (ctrl only when offered). All sizes are equal, so a transport may read this before
    /// negotiation; without MQ negotiated the control queue is index 2 (see
    /// [`Self::ctrl_queue_index`]).
    pub fn queue_max_sizes(&self) -> Vec<u16> {
        let pairs = if self.acked_features != 0 && !Negotiated(self.acked_features).mq() {
            1
        } else {
            self.shared.backends.len()
        };
        let ctrl = usize::from(
            self.avail_features & bit(virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ) != 0,
        );
        vec![self.cfg.queue_size; 2 * pairs + ctrl]
    }

    /// Features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features in force (acked and offered).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's features, masked to what was offered.
    pub fn set_acked_features(&mut self, features: u64) {
        let masked = features & self.avail_features;
        if masked != features {
            debug!(
                "virtio-net: driver acked unoffered features {:#x}",
                features & !self.avail_features
            );
        }
        self.acked_features = masked;
    }

    /// Reads the config space; bytes beyond it read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        relock(&self.shared.config).read(offset, data);
    }

    /// Config writes are ignored: every field is read-only for a virtio 1.x driver (the MAC
    /// changes through VIRTIO_NET_CTRL_MAC_ADDR_SET).
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-net: ignored config write of {} bytes at {offset}",
            data.len()
        );
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.shared.metrics.clone()
    }

    /// Sets the link state shown to the guest and signals a config change if it changed.
    /// While the link is down, transmitted frames are dropped (counted).
    pub fn set_link_up(&self, up: bool) {
        self.shared.set_link(up);
    }

    /// A handle on the link, the counters and the backends for a VMM's operator interface:
    /// it stays usable, from any thread, once the device belongs to a transport.
    pub fn control(&self) -> NetControl<B> {
        NetControl {
            shared: self.shared.clone(),
        }
    }

    /// Starts the device (driver set DRIVER_OK): one worker per queue pair whose two queues
    /// are present (on [`Net::set_io_threads`] threads), and the control thread if CTRL_VQ was negotiated. Only pair 0 is
    /// attached and running; the others wait parked for VQ_PAIRS_SET.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<(), Error> {
        if self.running.is_some() {
            return Err(Error::AlreadyActive);
        }
        let features = Negotiated(self.acked_features);
        let pairs = if features.mq() {
            self.shared.backends.len()
        } else {
            1
        };
        let ctrl_index = features.ctrl_vq().then(|| self.ctrl_queue_index());
        let mut by_index = Self::queues_by_index(&mem, features, pairs, ctrl_index, queues)?;
        self.enter_activation_state(features)?;
        *relock(&self.shared.interrupt) = Some(interrupt.clone());

        // From here on, an early return drops `running`, which stops what was started.
        let mut running = Running {
            shared: self.shared.clone(),
            workers: Vec::new(),
            ctrl: None,
        };
        let threads = self.io_threads.unwrap_or(pairs).clamp(1, pairs.max(1));
        info!("virtio-net: {pairs} queue pair(s) on {threads} worker thread(s)");
        let mut groups: Vec<Vec<WorkerStart<B>>> = (0..threads).map(|_| Vec::new()).collect();
        for pair in 0..pairs {
            let rx_index = (2 * pair) as u16;
            let (Some(rx), Some(tx)) =
                (by_index.remove(&rx_index), by_index.remove(&(rx_index + 1)))
            else {
                if pair > 0 {
                    info!("virtio-net: pair {pair} queues not set up; it cannot be enabled");
                }
                continue;
            };
            let initial = if pair == 0 {
                RunState::Running
            } else {
                RunState::Parked
            };
            self.shared.pairs[pair].reset(initial);
            groups[pair % threads].push(WorkerStart {
                shared: self.shared.clone(),
                pair,
                rx: rx.0,
                tx: tx.0,
                fds: WorkerFds {
                    rx_kick: rx.1,
                    tx_kick: tx.1,
                },
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                features,
                running: pair == 0,
            });
        }
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            let served: Vec<usize> = group.iter().map(|s| s.pair).collect();
            let handle =
                spawn_workers(self.spawner.as_ref(), group).map_err(|source| Error::Spawn {
                    name: worker_thread_name(&served),
                    source,
                })?;
            {
                let mut state = relock(&self.shared.state);
                for &pair in &served {
                    state.has_worker[pair] = true;
                }
            }
            running.workers.push((served, handle));
        }
        if let Some(index) = ctrl_index {
            match by_index.remove(&index) {
                Some((queue, kick)) => {
                    let cq = CtrlQueue::new(
                        queue,
                        index,
                        mem.clone(),
                        interrupt.clone(),
                        self.shared.metrics.clone(),
                        features,
                    );
                    let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                    let stop_for_thread = stop.try_clone().map_err(Error::EventFd)?;
                    let target = DeviceCtrl::new(self.shared.clone());
                    let handle =
                        spawn_ctrl(self.spawner.as_ref(), cq, target, kick, stop_for_thread)
                            .map_err(|source| Error::Spawn {
                                name: "net-ctrl".into(),
                                source,
                            })?;
                    running.ctrl = Some((stop, handle));
                }
                None => {
                    warn!("virtio-net: CTRL_VQ negotiated but control queue {index} not set up")
                }
            }
        }
        self.running = Some(running);
        Ok(())
    }

    /// The queues the transport passed, by index, checked: known indices for the
    /// negotiated features, valid in guest memory, each once, pair 0 complete.
    fn queues_by_index(
        mem: &GuestMemoryMmap,
        features: Negotiated,
        pairs: usize,
        ctrl_index: Option<u16>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<BTreeMap<u16, (Queue, EventFd)>, Error> {
        let count = 2 * pairs + usize::from(ctrl_index.is_some());
        let mut by_index: BTreeMap<u16, (Queue, EventFd)> = BTreeMap::new();
        for (index, mut queue, kick) in queues {
            if usize::from(index) >= count {
                return Err(Error::UnknownQueue { index, count });
            }
            if !queue.is_valid(mem) {
                return Err(Error::InvalidQueue { index });
            }
            queue.set_event_idx(features.event_idx());
            if by_index.insert(index, (queue, kick)).is_some() {
                return Err(Error::DuplicateQueue { index });
            }
        }
        for index in [0u16, 1] {
            if !by_index.contains_key(&index) {
                return Err(Error::MissingQueue { index });
            }
        }
        Ok(by_index)
    }

    /// Backends in the reset state, pair 0 with the negotiated header size and offloads;
    /// the guest offloads in force are the negotiated ones, and the stop signal is cleared.
    /// A deleted tap is no error: the device runs with its link down.
    fn enter_activation_state(&self, features: Negotiated) -> Result<(), Error> {
        let hdr_len = features.vnet_hdr_len() as i32;
        let offloads = features.guest_offloads();
        let tun_flags = tun_offload_flags(offloads);
        let mut state = relock(&self.shared.state);
        match self.shared.enter_reset_state(&mut state) {
            Ok(()) => {}
            Err(e) if e.pair == 0 && !self.shared.check_backends_gone() => return Err(e.into()),
            // A surplus queue that stays attached costs the host the frames steered to it;
            // the device itself still works, so keep going (logged in enter_reset_state,
            // visible as `attached` in the metrics).
            Err(_) => {}
        }
        let b0 = &self.shared.backends[0];
        let setup = b0
            .set_vnet_hdr_size(hdr_len)
            .and_then(|()| b0.set_offload(tun_flags));
        if let Err(source) = setup {
            if !self.shared.check_backends_gone() {
                return Err(Error::BackendSetup { pair: 0, source });
            }
        }
        state.hdr_len = hdr_len;
        state.tun_flags = tun_flags;
        state.has_worker.iter_mut().for_each(|w| *w = false);
        self.shared
            .guest_offloads
            .store(offloads, Ordering::Release);
        self.shared
            .reset_settings(features.has(virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VLAN));
        self.shared.stop.clear();
        Ok(())
    }

    /// VIRTIO_F_RING_RESET: the driver resets receive or transmit queue `index` alone. Its
    /// worker stops using it and forgets its state (held buffers, a held notification); the
    /// other queues, and the pair's other queue, run on. The control queue cannot be reset.
    pub fn reset_queue(&mut self, index: u16) -> Result<(), Error> {
        self.queue_op(index, "reset", |rx| QueueOp::Reset { rx })
    }

    /// The driver enabled queue `index` again after [`Self::reset_queue`], with `queue` (its
    /// new size and rings, EVENT_IDX as negotiated).
    pub fn enable_queue(&mut self, index: u16, queue: Queue) -> Result<(), Error> {
        self.queue_op(index, "enabled", |rx| QueueOp::Enable { rx, queue })
    }

    /// Has the worker of data queue `index` carry out `op(is the receive queue)`.
    fn queue_op(
        &mut self,
        index: u16,
        what: &'static str,
        op: impl FnOnce(bool) -> QueueOp,
    ) -> Result<(), Error> {
        let pair = self.data_queue_pair(index, what)?;
        self.shared.pairs[pair]
            .request_queue_op(pair, op(index.is_multiple_of(2)), WORKER_CONFIRM_TIMEOUT)
            .map_err(|source| Error::QueueWorker { index, source })
    }

    /// The pair of data queue `index`, if the device runs and the pair has a worker.
    fn data_queue_pair(&self, index: u16, action: &'static str) -> Result<usize, Error> {
        let refuse = |reason| Error::QueueOp {
            index,
            action,
            reason,
        };
        if self.running.is_none() {
            return Err(refuse("the device is not running"));
        }
        let features = Negotiated(self.acked_features);
        let pairs = if features.mq() {
            self.shared.backends.len()
        } else {
            1
        };
        let pair = usize::from(index / 2);
        if pair >= pairs {
            return Err(refuse("not a receive or transmit queue"));
        }
        if !relock(&self.shared.state).has_worker[pair] {
            return Err(refuse("its pair was never set up"));
        }
        Ok(pair)
    }

    /// Device reset: stops and joins every thread, forgets the negotiated features, and puts
    /// the backends back into the reset state (pair 0 attached, others detached).
    pub fn reset(&mut self) {
        // Dropping the threads' handle stops them.
        self.running = None;
        self.acked_features = 0;
        self.shared.guest_offloads.store(0, Ordering::Relaxed);
        *relock(&self.shared.interrupt) = None;
        {
            let mut state = relock(&self.shared.state);
            state.has_worker.iter_mut().for_each(|w| *w = false);
            if let Err(e) = self.shared.enter_reset_state(&mut state) {
                error!("virtio-net: reset: {}", Error::from(e));
            }
        }
        let link = self.shared.link_up.load(Ordering::Relaxed);
        *relock(&self.shared.config) = ConfigSpace::new(
            self.cfg.mac,
            self.shared.backends.len() as u16,
            self.cfg.mtu,
            link,
        )
        .with_link(self.cfg.speed_mbps, self.cfg.duplex)
        .with_rss(self.cfg.mq && self.shared.steers());
        self.shared.reset_settings(false);
        for p in &self.shared.metrics.pairs {
            p.parked.store(true, Ordering::Relaxed);
        }
    }
}
