// SPDX-License-Identifier: Apache-2.0
//! The device: feature negotiation, config space, activation and reset, and the state the
//! worker and control threads share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{Backend, BackendError};
use crate::config::{ConfigError, ConfigSpace, NetConfig};
use crate::ctrl::{switch_pairs, Command, CtrlQueue, CtrlTarget, PairSwitch, SwitchError};
use crate::features::{bit, offered_features, tun_offload_flags, Negotiated};
use crate::limit::{LogLimit, TokenBucket};
use crate::metrics::NetMetrics;
use crate::rxtx::PathConfig;
use crate::worker::{
    spawn_ctrl, spawn_worker, DeviceThreadHandle, PairControl, RunState, StdSpawner, StopSignal,
    ThreadSpawner, WorkerFds, WorkerStart, JOIN_TIMEOUT, WORKER_CONFIRM_TIMEOUT,
};
use crate::Interrupt;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

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

/// Serialised pair state: changed by activation, reset and the control thread only.
#[derive(Debug)]
pub(crate) struct PairsState {
    /// Pairs `0..active` are enabled.
    pub active: usize,
    /// Backend attach state as we last set it.
    pub attached: Vec<bool>,
    /// Pairs with a worker thread (their queues were set up).
    pub has_worker: Vec<bool>,
    /// Vnet header size set on the backends.
    pub hdr_len: i32,
    /// TUN_F_* flags set on the backends.
    pub tun_flags: u32,
}

/// State shared by the device, its workers and its control thread.
pub struct Shared<B> {
    pub(crate) backends: Vec<B>,
    pub(crate) pairs: Vec<PairControl>,
    pub(crate) metrics: Arc<NetMetrics>,
    pub(crate) config: Mutex<ConfigSpace>,
    pub(crate) link_up: AtomicBool,
    /// A backend was found gone (its tap deleted); the link stays down from then on.
    pub(crate) backend_gone: AtomicBool,
    /// Guest receive offloads in force (VIRTIO_NET_F_GUEST_* bits).
    pub(crate) guest_offloads: AtomicU64,
    pub(crate) interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    pub(crate) state: Mutex<PairsState>,
    /// Raised while the threads are being stopped.
    pub(crate) stop: StopSignal,
    /// Host operations the guest's control commands may cause (kept across resets, so a
    /// reset does not refill it).
    reconfig_limit: Mutex<TokenBucket>,
    /// The info line of a queue-pair switch, at most once a second.
    switch_log: Mutex<LogLimit>,
    /// The MTU in the config space, when one is advertised.
    mtu: Option<u16>,
}

/// Host operations of one step of a queue-pair switch: detaching a queue is one
/// TUNSETQUEUE; attaching one is TUNSETQUEUE, TUNSETVNETHDRSZ and TUNSETOFFLOAD.
const DETACH_OPS: u32 = 1;
const ATTACH_OPS: u32 = 3;

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only records that a holder panicked; the data is plain values.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: Backend> Shared<B> {
    /// Data-path settings for `features` and `guest_offloads`. Takes no lock: workers call
    /// it while the control thread may hold `state` waiting for them.
    pub(crate) fn path_config(&self, features: Negotiated, guest_offloads: u64) -> PathConfig {
        PathConfig::new(features, gso(guest_offloads), self.mtu)
    }

    /// Sets the link state shown to the guest; a change raises a config interrupt while the
    /// device is active.
    pub(crate) fn set_link(&self, up: bool) {
        let changed = relock(&self.config).set_link_up(up);
        self.link_up.store(up, Ordering::Relaxed);
        self.metrics.link_up.store(up, Ordering::Relaxed);
        if !changed {
            return;
        }
        // `interrupt` is set from activation to reset: exactly while a driver listens.
        let interrupt = relock(&self.interrupt).clone();
        if let Some(irq) = interrupt {
            if let Err(e) = irq.signal_config() {
                warn!("virtio-net: config interrupt failed: {e}");
            }
        }
    }

    /// The backend of `pair` is gone for good (its tap interface was deleted: every tun
    /// ioctl fails, its fd polls as an error forever). The device cannot reach the host any
    /// more: the link goes down with a config interrupt, transmitted frames are dropped
    /// (counted), and a later VQ_PAIRS_SET is refused with ERR when its TUNSETQUEUE fails.
    /// The VM keeps running. Reported once.
    pub(crate) fn backend_lost(&self, pair: usize) {
        if self.backend_gone.swap(true, Ordering::SeqCst) {
            return;
        }
        error!(
            "virtio-net: the tap queue of pair {pair} is gone (tap interface deleted?); \
             link down, frames from the guest are dropped from now on"
        );
        self.set_link(false);
    }

    /// After a failed backend operation: reports a backend that is gone (see
    /// [`Self::backend_lost`]); returns whether one was.
    pub(crate) fn check_backends_gone(&self) -> bool {
        if self.backend_gone.load(Ordering::SeqCst) {
            return true;
        }
        match self.backends.iter().position(|b| b.is_gone()) {
            Some(pair) => {
                self.backend_lost(pair);
                true
            }
            None => false,
        }
    }

    pub(crate) fn count_reconfigs(&self, ops: u32) {
        self.metrics
            .host_reconfigs
            .fetch_add(u64::from(ops), Ordering::Relaxed);
    }

    /// Asks every worker to confirm its state, so that each has re-read the settings it
    /// caches; returns false if one did not confirm in time.
    fn refresh_workers(&self, state: &PairsState) -> bool {
        let mut all = true;
        for (pair, ctl) in self.pairs.iter().enumerate() {
            if !state.has_worker[pair] {
                continue;
            }
            if let Err(e) = ctl.refresh(pair, WORKER_CONFIRM_TIMEOUT, Some(&self.stop)) {
                warn!("virtio-net: {e}");
                all = false;
            }
        }
        all
    }

    fn set_attached(&self, state: &mut PairsState, pair: usize, attached: bool) {
        state.attached[pair] = attached;
        self.metrics.pairs[pair]
            .attached
            .store(attached, Ordering::Relaxed);
    }

    /// Attach / detach backends so that exactly pair 0 is attached (the reset state).
    fn enter_reset_state(&self, state: &mut PairsState) -> Result<(), Error> {
        if !state.attached[0] {
            self.backends[0]
                .attach()
                .map_err(|source| Error::BackendSetup { pair: 0, source })?;
            self.set_attached(state, 0, true);
        }
        let mut result = Ok(());
        for pair in 1..self.backends.len() {
            if state.attached[pair] {
                match self.backends[pair].detach() {
                    Ok(()) => self.set_attached(state, pair, false),
                    Err(source) => {
                        error!("virtio-net: cannot detach backend of pair {pair}: {source}");
                        if result.is_ok() {
                            result = Err(Error::BackendSetup { pair, source });
                        }
                    }
                }
            }
        }
        state.active = 1;
        self.metrics.active_pairs.store(1, Ordering::Relaxed);
        result
    }
}

/// [`PairSwitch`] over the real workers and backends.
struct DevicePairs<'a, B> {
    shared: &'a Shared<B>,
    state: &'a mut PairsState,
}

impl<B: Backend> PairSwitch for DevicePairs<'_, B> {
    fn park(&mut self, pair: usize) -> Result<(), SwitchError> {
        if !self.state.has_worker[pair] {
            return Ok(());
        }
        self.shared.pairs[pair].request(
            pair,
            RunState::Parked,
            WORKER_CONFIRM_TIMEOUT,
            Some(&self.shared.stop),
        )
    }

    fn resume(&mut self, pair: usize) -> Result<(), SwitchError> {
        if !self.state.has_worker[pair] {
            return Err(SwitchError::NoWorker { pair });
        }
        self.shared.pairs[pair].request(
            pair,
            RunState::Running,
            WORKER_CONFIRM_TIMEOUT,
            Some(&self.shared.stop),
        )
    }

    fn attach(&mut self, pair: usize) -> Result<(), SwitchError> {
        let backend = &self.shared.backends[pair];
        let wrap = |source| SwitchError::Backend { pair, source };
        self.shared.count_reconfigs(ATTACH_OPS);
        backend.attach().map_err(wrap)?;
        self.shared.set_attached(self.state, pair, true);
        // Header size and offloads are per tap device in Linux, but re-applying them on the
        // queue being enabled keeps other backends (and a future kernel) consistent.
        let setup = backend
            .set_vnet_hdr_size(self.state.hdr_len)
            .and_then(|()| backend.set_offload(self.state.tun_flags));
        if let Err(source) = setup {
            match backend.detach() {
                Ok(()) => self.shared.set_attached(self.state, pair, false),
                Err(e) => {
                    // An undo step like those of `switch_pairs`: the pair stays attached
                    // while disabled, so it is counted like them.
                    error!("virtio-net: cannot detach backend of pair {pair} again: {e}");
                    self.shared
                        .metrics
                        .rollback_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            return Err(wrap(source));
        }
        Ok(())
    }

    fn detach(&mut self, pair: usize) -> Result<(), SwitchError> {
        self.shared.count_reconfigs(DETACH_OPS);
        self.shared.backends[pair]
            .detach()
            .map_err(|source| SwitchError::Backend { pair, source })?;
        self.shared.set_attached(self.state, pair, false);
        Ok(())
    }

    fn undo_failed(&mut self, pair: usize, err: &SwitchError) {
        if let SwitchError::Stopping { .. } = err {
            // The reset under way puts every pair into its reset state.
            return;
        }
        error!("virtio-net: rollback of pair {pair} failed: {err}");
        self.shared
            .metrics
            .rollback_failures
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// [`CtrlTarget`] of the control thread: applies commands to the shared state.
pub struct DeviceCtrl<'a, B> {
    shared: &'a Shared<B>,
}

impl<'a, B: Backend> DeviceCtrl<'a, B> {
    pub(crate) fn new(shared: &'a Shared<B>) -> Self {
        DeviceCtrl { shared }
    }
}

impl<B: Backend> DeviceCtrl<'_, B> {
    /// Host operations `cmd` will cause.
    fn cost(&self, cmd: &Command) -> u32 {
        let state = relock(&self.shared.state);
        match *cmd {
            Command::VqPairsSet(n) => {
                let (current, target) = (state.active as u32, u32::from(n));
                if target < current {
                    (current - target) * DETACH_OPS
                } else {
                    (target - current) * ATTACH_OPS
                }
            }
            Command::GuestOffloadsSet(_) => state.attached.iter().filter(|&&a| a).count() as u32,
            Command::MacAddrSet(_) => 0,
        }
    }

    /// Sets TUN_F_* `flags` on every attached backend; on a failure restores `previous` on
    /// those done and returns false.
    fn set_offload_all(&self, state: &PairsState, flags: u32, previous: u32) -> bool {
        let attached: Vec<usize> = (0..self.shared.backends.len())
            .filter(|&p| state.attached[p])
            .collect();
        for (i, &pair) in attached.iter().enumerate() {
            self.shared.count_reconfigs(1);
            if let Err(e) = self.shared.backends[pair].set_offload(flags) {
                warn!("virtio-net: setting offloads {flags:#x} failed: {e}");
                for &done in &attached[..i] {
                    self.shared.count_reconfigs(1);
                    if let Err(e) = self.shared.backends[done].set_offload(previous) {
                        error!("virtio-net: cannot restore offloads on pair {done}: {e}");
                    }
                }
                return false;
            }
        }
        true
    }
}

impl<B: Backend> CtrlTarget for DeviceCtrl<'_, B> {
    fn max_pairs(&self) -> u16 {
        self.shared.backends.len() as u16
    }

    fn admit(&mut self, cmd: &Command) -> bool {
        let cost = self.cost(cmd);
        if cost == 0 {
            return true;
        }
        let mut throttled = false;
        loop {
            let wait = relock(&self.shared.reconfig_limit).take(cost, Instant::now());
            if wait.is_zero() {
                return true;
            }
            if !throttled {
                throttled = true;
                self.shared
                    .metrics
                    .throttled_commands
                    .fetch_add(1, Ordering::Relaxed);
                debug!("virtio-net: {cmd:?} waits {wait:?} for the host-operation limit");
            }
            if !self.shared.stop.sleep(wait) {
                return false;
            }
        }
    }

    fn stopping(&self) -> bool {
        self.shared.stop.is_raised()
    }

    fn set_queue_pairs(&mut self, n: u16) -> bool {
        let mut state = relock(&self.shared.state);
        let current = state.active;
        let target = usize::from(n);
        if target == current {
            return true;
        }
        let result = switch_pairs(
            &mut DevicePairs {
                shared: self.shared,
                state: &mut state,
            },
            current,
            target,
        );
        match result {
            Ok(()) => {
                state.active = target;
                self.shared
                    .metrics
                    .active_pairs
                    .store(target as u64, Ordering::Relaxed);
                if let Some(held) = relock(&self.shared.switch_log).allow(Instant::now()) {
                    if held == 0 {
                        info!("virtio-net: {current} -> {target} queue pairs");
                    } else {
                        info!(
                            "virtio-net: {current} -> {target} queue pairs \
                             ({held} more switches in the last second not logged)"
                        );
                    }
                }
                true
            }
            Err(e) => {
                warn!("virtio-net: VQ_PAIRS_SET({target}) refused, staying at {current}: {e}");
                drop(state);
                self.shared.check_backends_gone();
                false
            }
        }
    }

    /// Receive buffers must be large enough for what the tap may send before the tap is
    /// allowed to send it: when the new offloads take larger frames (GSO on), the workers
    /// re-size their buffers first and TUNSETOFFLOAD follows; when they take smaller ones,
    /// TUNSETOFFLOAD comes first. The ack is sent only after both.
    fn set_guest_offloads(&mut self, offloads: u64) -> bool {
        let mut state = relock(&self.shared.state);
        let flags = tun_offload_flags(offloads);
        let previous = state.tun_flags;
        let old = self.shared.guest_offloads.load(Ordering::Acquire);
        let grows = gso(offloads) && !gso(old);
        if grows {
            self.shared
                .guest_offloads
                .store(offloads, Ordering::Release);
            if !self.shared.refresh_workers(&state) {
                self.shared.guest_offloads.store(old, Ordering::Release);
                self.shared.refresh_workers(&state);
                return false;
            }
        }
        if !self.set_offload_all(&state, flags, previous) {
            if grows {
                self.shared.guest_offloads.store(old, Ordering::Release);
                self.shared.refresh_workers(&state);
            }
            return false;
        }
        state.tun_flags = flags;
        if !grows {
            self.shared
                .guest_offloads
                .store(offloads, Ordering::Release);
            // Smaller buffers are only an optimisation: a worker that is late still has
            // the larger ones.
            self.shared.refresh_workers(&state);
        }
        true
    }

    fn set_mac(&mut self, mac: [u8; 6]) -> bool {
        relock(&self.shared.config).mac = mac;
        true
    }
}

/// Whether `offloads` lets the guest receive GSO frames (up to 64 KiB).
fn gso(offloads: u64) -> bool {
    offloads
        & (bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO))
        != 0
}

struct Running {
    workers: Vec<(usize, DeviceThreadHandle)>,
    ctrl: Option<(EventFd, DeviceThreadHandle)>,
}

/// A multiqueue virtio-net device; one [`Backend`] per queue pair.
pub struct Net<B: Backend> {
    cfg: NetConfig,
    avail_features: u64,
    acked_features: u64,
    shared: Arc<Shared<B>>,
    running: Option<Running>,
    spawner: Arc<dyn ThreadSpawner>,
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
    pub fn new(mut cfg: NetConfig, backends: Vec<B>) -> Result<Self, Error> {
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
        let pairs = backends.len();
        let metrics = Arc::new(NetMetrics::new(pairs));
        let mut attached = Vec::with_capacity(pairs);
        for (pair, b) in backends.iter().enumerate() {
            let a = b
                .is_attached()
                .map_err(|source| Error::BackendSetup { pair, source })?;
            attached.push(a);
            metrics.pairs[pair].attached.store(a, Ordering::Relaxed);
            metrics.pairs[pair].parked.store(true, Ordering::Relaxed);
        }
        let controls = (0..pairs)
            .map(|_| PairControl::new(RunState::Parked))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::EventFd)?;
        let shared = Arc::new(Shared {
            backends,
            pairs: controls,
            metrics,
            config: Mutex::new(ConfigSpace::new(cfg.mac, pairs as u16, cfg.mtu, true)),
            link_up: AtomicBool::new(true),
            backend_gone: AtomicBool::new(false),
            guest_offloads: AtomicU64::new(0),
            interrupt: Mutex::new(None),
            state: Mutex::new(PairsState {
                active: 1,
                attached,
                has_worker: vec![false; pairs],
                hdr_len: 0,
                tun_flags: 0,
            }),
            stop: StopSignal::default(),
            reconfig_limit: Mutex::new(TokenBucket::for_reconfig(pairs, Instant::now())),
            switch_log: Mutex::new(LogLimit::new(Duration::from_secs(1))),
            mtu: cfg.mtu,
        });
        shared.enter_reset_state(&mut relock(&shared.state))?;
        Ok(Net {
            avail_features: offered_features(cfg.mtu.is_some(), cfg.mq),
            acked_features: 0,
            cfg,
            shared,
            running: None,
            spawner: Arc::new(StdSpawner),
        })
    }

    /// Starts the device's threads through `spawner` from now on (default: [`StdSpawner`],
    /// from the thread that activates the device).
    pub fn set_thread_spawner(&mut self, spawner: Arc<dyn ThreadSpawner>) {
        self.spawner = spawner;
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

    /// Starts the device (driver set DRIVER_OK): one worker per queue pair whose two queues
    /// are present, and the control thread if CTRL_VQ was negotiated. Only pair 0 is
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
        let count = 2 * pairs + usize::from(ctrl_index.is_some());
        let mut by_index: BTreeMap<u16, (Queue, EventFd)> = BTreeMap::new();
        for (index, mut queue, kick) in queues {
            if usize::from(index) >= count {
                return Err(Error::UnknownQueue { index, count });
            }
            if !queue.is_valid(&mem) {
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

        let hdr_len = features.vnet_hdr_len() as i32;
        let offloads = features.guest_offloads();
        let tun_flags = tun_offload_flags(offloads);
        {
            let mut state = relock(&self.shared.state);
            match self.shared.enter_reset_state(&mut state) {
                Ok(()) => {}
                // A deleted tap: the device still runs, with its link down (below).
                Err(e @ Error::BackendSetup { pair: 0, .. })
                    if !self.shared.check_backends_gone() =>
                {
                    return Err(e)
                }
                // A surplus queue that stays attached costs the host the frames steered to
                // it; the device itself still works, so keep going (logged in
                // enter_reset_state, visible as `attached` in the metrics).
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
        }
        self.shared
            .guest_offloads
            .store(offloads, Ordering::Release);
        self.shared.stop.clear();
        *relock(&self.shared.interrupt) = Some(interrupt.clone());

        let mut running = Running {
            workers: Vec::new(),
            ctrl: None,
        };
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
            let start = WorkerStart {
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
            };
            match spawn_worker(self.spawner.as_ref(), start) {
                Ok(handle) => {
                    running.workers.push((pair, handle));
                    relock(&self.shared.state).has_worker[pair] = true;
                }
                Err(source) => {
                    self.stop_threads(running);
                    return Err(Error::Spawn {
                        name: format!("net-pair{pair}"),
                        source,
                    });
                }
            }
        }
        if let Some(index) = ctrl_index {
            if let Some((queue, kick)) = by_index.remove(&index) {
                let cq = CtrlQueue::new(
                    queue,
                    index,
                    mem.clone(),
                    interrupt.clone(),
                    self.shared.metrics.clone(),
                    features,
                );
                let stop = match EventFd::new(EFD_NONBLOCK) {
                    Ok(stop) => stop,
                    Err(e) => {
                        self.stop_threads(running);
                        return Err(Error::EventFd(e));
                    }
                };
                let stop_clone = match stop.try_clone() {
                    Ok(s) => s,
                    Err(e) => {
                        self.stop_threads(running);
                        return Err(Error::EventFd(e));
                    }
                };
                match spawn_ctrl(
                    self.spawner.as_ref(),
                    cq,
                    self.shared.clone(),
                    kick,
                    stop_clone,
                ) {
                    Ok(handle) => running.ctrl = Some((stop, handle)),
                    Err(source) => {
                        self.stop_threads(running);
                        return Err(Error::Spawn {
                            name: "net-ctrl".into(),
                            source,
                        });
                    }
                }
            } else {
                warn!("virtio-net: CTRL_VQ negotiated but control queue {index} not set up");
            }
        }
        self.running = Some(running);
        Ok(())
    }

    /// Device reset: stops and joins every thread, forgets the negotiated features, and puts
    /// the backends back into the reset state (pair 0 attached, others detached).
    pub fn reset(&mut self) {
        if let Some(running) = self.running.take() {
            self.stop_threads(running);
        }
        self.acked_features = 0;
        self.shared.guest_offloads.store(0, Ordering::Relaxed);
        *relock(&self.shared.interrupt) = None;
        {
            let mut state = relock(&self.shared.state);
            state.has_worker.iter_mut().for_each(|w| *w = false);
            if let Err(e) = self.shared.enter_reset_state(&mut state) {
                error!("virtio-net: reset: {e}");
            }
        }
        let link = self.shared.link_up.load(Ordering::Relaxed);
        *relock(&self.shared.config) = ConfigSpace::new(
            self.cfg.mac,
            self.shared.backends.len() as u16,
            self.cfg.mtu,
            link,
        );
        for p in &self.shared.metrics.pairs {
            p.parked.store(true, Ordering::Relaxed);
        }
    }
}

impl<B: Backend> Net<B> {
    /// Stops and joins the control thread first (it drives the workers), then the workers.
    /// Every wait is bounded: the control thread gives up any wait once the stop signal is
    /// raised, workers confirm between bounded rounds of work, and a thread that still does
    /// not end within [`JOIN_TIMEOUT`] is left detached (and said so) rather than blocking
    /// the caller, which may be a vCPU holding the bus.
    fn stop_threads(&self, running: Running) {
        self.shared.stop.raise();
        for ctl in &self.shared.pairs {
            ctl.wake();
        }
        if let Some((stop, handle)) = running.ctrl {
            if let Err(e) = stop.write(1) {
                error!("virtio-net: cannot stop the control thread: {e}");
            }
            handle.join_within(JOIN_TIMEOUT);
        }
        for (pair, handle) in running.workers {
            if let Err(e) = self.shared.pairs[pair].request(
                pair,
                RunState::Stopped,
                WORKER_CONFIRM_TIMEOUT,
                None,
            ) {
                error!("virtio-net: {e}");
            }
            handle.join_within(JOIN_TIMEOUT);
        }
    }
}

impl<B: Backend> Drop for Net<B> {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            self.stop_threads(running);
        }
    }
}
