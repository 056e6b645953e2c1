// SPDX-License-Identifier: Apache-2.0
//! The state the device, its workers and its control thread share, and what the control
//! thread does with it: [`Shared`] (backends, per-pair control channels, counters, config
//! space, pair state), [`DevicePairs`] (the four steps of a queue-pair switch over the real
//! workers and backends) and [`DeviceCtrl`] (the control commands, rate-limited).
//!
//! `device.rs` (activation, reset) and `worker.rs` (the threads) both build on this module;
//! neither imports the other's internals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::backend::{Backend, BackendError};
use crate::coalesce::Coalesce;
use crate::config::ConfigSpace;
use crate::control::{PairControl, RunState, StopSignal, WORKER_CONFIRM_TIMEOUT};
use crate::ctrl::{switch_pairs, Command, CtrlTarget, PairSwitch, SwitchError};
use crate::features::{tun_offload_flags, Negotiated, GUEST_GSO_MASK};
use crate::filter::{MacTable, RxFilter, RxMode};
use crate::limit::{LogLimit, TokenBucket};
use crate::metrics::NetMetrics;
use crate::rxtx::PathConfig;
use crate::steer::{random_key, RssConfig, Steering, TunOrder};
use crate::Interrupt;

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
    /// The tap's numbering of the attached queues (for the steering program).
    pub tun_order: TunOrder,
    /// The steering in force, in pairs (automatic steering or the driver's RSS); what the
    /// program gets after translation through `tun_order`.
    pub steer: RssConfig,
    /// The driver configured RSS (else steering is automatic, over the enabled pairs).
    pub rss: bool,
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
    /// The receive filter and the notification coalescing (rx, tx) the driver configured;
    /// `settings_gen` counts their changes, so the workers copy them only when they changed.
    rx_filter: Mutex<RxFilter>,
    /// Per data queue, by queue index (rx of pair p at 2p, tx at 2p + 1).
    coalescing: Mutex<Vec<Coalesce>>,
    pub(crate) settings_gen: AtomicU64,
    /// Host operations the guest's control commands may cause (kept across resets, so a
    /// reset does not refill it).
    reconfig_limit: Mutex<TokenBucket>,
    /// The info line of a queue-pair switch, at most once a second.
    switch_log: Mutex<LogLimit>,
    /// The MTU in the config space, when one is advertised.
    mtu: Option<u16>,
    /// The tap's steering program's configuration, when the launcher set one up.
    steering: Option<Arc<dyn Steering>>,
    /// The key of automatic steering.
    auto_key: [u8; tap::steering::KEY_LEN],
}

/// Host operations of one step of a queue-pair switch: detaching a queue is one
/// TUNSETQUEUE; attaching one is TUNSETQUEUE, TUNSETVNETHDRSZ and TUNSETOFFLOAD.
const DETACH_OPS: u32 = 1;
const ATTACH_OPS: u32 = 3;

pub(crate) fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only records that a holder panicked; the data is plain values.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A backend that could not be put into the reset state (pair 0 attached, others detached).
pub(crate) struct ResetFailed {
    pub pair: usize,
    pub source: BackendError,
}

impl<B: Backend> Shared<B> {
    /// The shared state of a device over `backends` whose attach state is `attached`,
    /// advertising `mtu`; every worker starts parked.
    pub(crate) fn new(
        backends: Vec<B>,
        attached: Vec<bool>,
        config: ConfigSpace,
        mtu: Option<u16>,
        steering: Option<Arc<dyn Steering>>,
    ) -> std::io::Result<Self> {
        let pairs = backends.len();
        let mac = config.mac;
        let auto_key = random_key();
        let metrics = Arc::new(NetMetrics::new(pairs));
        for (pair, &a) in attached.iter().enumerate() {
            metrics.pairs[pair].attached.store(a, Ordering::Relaxed);
            metrics.pairs[pair].parked.store(true, Ordering::Relaxed);
        }
        let controls = (0..pairs)
            .map(|_| PairControl::new(RunState::Parked))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Shared {
            backends,
            pairs: controls,
            metrics,
            config: Mutex::new(config),
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
                tun_order: TunOrder::unknown(),
                steer: RssConfig::spread(1, &auto_key),
                rss: false,
            }),
            rx_filter: Mutex::new(RxFilter::new(mac, false)),
            coalescing: Mutex::new(vec![Coalesce::default(); 2 * pairs]),
            settings_gen: AtomicU64::new(0),
            stop: StopSignal::default(),
            reconfig_limit: Mutex::new(TokenBucket::for_reconfig(pairs, Instant::now())),
            switch_log: Mutex::new(LogLimit::new(Duration::from_secs(1))),
            mtu,
            steering,
            auto_key,
        })
    }

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

    /// The receive filter the workers apply: `None` when every frame passes anyway.
    pub(crate) fn rx_filter(&self) -> Option<RxFilter> {
        let f = relock(&self.rx_filter);
        (!f.passes_all()).then(|| f.clone())
    }

    /// The notification coalescing of the receive and transmit queue of `pair`.
    pub(crate) fn coalescing(&self, pair: usize) -> (Coalesce, Coalesce) {
        let c = relock(&self.coalescing);
        let get = |i: usize| c.get(i).copied().unwrap_or_default();
        (get(2 * pair), get(2 * pair + 1))
    }

    /// Puts the receive filter (for a driver that negotiated CTRL_VLAN, `vlan_filtering`,
    /// or not, with the device's current MAC) and coalescing into their reset state.
    pub(crate) fn reset_settings(&self, vlan_filtering: bool) {
        let mac = relock(&self.config).mac;
        *relock(&self.rx_filter) = RxFilter::new(mac, vlan_filtering);
        relock(&self.coalescing).fill(Coalesce::default());
        self.settings_gen.fetch_add(1, Ordering::Release);
    }

    /// Changes the coalescing with `f` and has every worker apply it before returning.
    fn change_coalescing(&self, f: impl FnOnce(&mut [Coalesce])) -> bool {
        f(&mut relock(&self.coalescing));
        self.settings_gen.fetch_add(1, Ordering::Release);
        let state = relock(&self.state);
        self.refresh_workers(&state)
    }

    /// Changes the receive filter with `f` and has every worker apply it before returning.
    fn change_rx_filter(&self, f: impl FnOnce(&mut RxFilter)) -> bool {
        f(&mut relock(&self.rx_filter));
        self.settings_gen.fetch_add(1, Ordering::Release);
        let state = relock(&self.state);
        self.refresh_workers(&state)
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

    /// Records that `pair`'s backend was attached or detached; with steering, the program's
    /// table follows the tap's renumbering at once.
    fn set_attached(&self, state: &mut PairsState, pair: usize, attached: bool) {
        state.attached[pair] = attached;
        self.metrics.pairs[pair]
            .attached
            .store(attached, Ordering::Relaxed);
        if attached {
            state.tun_order.attached(pair);
        } else {
            state.tun_order.detached(pair);
        }
        self.publish_steering(state);
    }

    /// Whether the tap's steering program is ours to configure.
    pub(crate) fn steers(&self) -> bool {
        self.steering.is_some()
    }

    /// Automatic steering over pairs `0..pairs`.
    pub(crate) fn auto_steering(&self, pairs: usize) -> RssConfig {
        RssConfig::spread(pairs as u16, &self.auto_key)
    }

    /// Writes `state.steer`, in the tap's queue numbers, into the program's map.
    pub(crate) fn publish_steering(&self, state: &PairsState) {
        let Some(steering) = &self.steering else {
            return;
        };
        let cfg = state.steer.to_tun(&state.tun_order);
        if let Err(e) = steering.publish(&cfg) {
            error!("virtio-net: cannot update the tap's steering: {e}");
        }
    }

    /// Attach / detach backends so that exactly pair 0 is attached (the reset state). On
    /// failure, the first backend that failed.
    pub(crate) fn enter_reset_state(&self, state: &mut PairsState) -> Result<(), ResetFailed> {
        if !state.attached[0] {
            self.backends[0]
                .attach()
                .map_err(|source| ResetFailed { pair: 0, source })?;
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
                            result = Err(ResetFailed { pair, source });
                        }
                    }
                }
            }
        }
        state.active = 1;
        self.metrics.active_pairs.store(1, Ordering::Relaxed);
        // Exactly pair 0 attached: the tap numbers it 0, whatever happened before.
        state.tun_order = if result.is_ok() {
            TunOrder::only(0)
        } else {
            TunOrder::unknown()
        };
        state.steer = self.auto_steering(1);
        state.rss = false;
        self.publish_steering(state);
        result
    }
}

/// How long frames the steering program already sent towards a queue may take to reach it:
/// between the program's choice and the tap queue's ring a frame is inside one softirq
/// (`dev_queue_xmit`); this is that with a wide margin, and it is paid once per shrink.
const STEER_SETTLE: Duration = Duration::from_millis(10);
/// How long a shrink waits for the guest to give receive buffers for frames still on a
/// queue being disabled, and how often it looks.
const DRAIN_WAIT: Duration = Duration::from_millis(200);
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// [`PairSwitch`] over the real workers and backends.
struct DevicePairs<'a, B> {
    shared: &'a Shared<B>,
    state: &'a mut PairsState,
    /// Parking hands what is on the pair's tap queue to the guest first (with steering, when
    /// nothing is steered to the pair any more).
    drain: bool,
}

impl<B: Backend> DevicePairs<'_, B> {
    /// Has the worker of `pair` deliver what its tap queue holds, waiting (up to
    /// [`DRAIN_WAIT`]) for the guest to give receive buffers while frames remain. The guest
    /// keeps consuming a receive queue until the command that disables it completes.
    fn drain(&mut self, pair: usize) -> Result<(), SwitchError> {
        let ctl = &self.shared.pairs[pair];
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            let empty = ctl.request_drain(pair, WORKER_CONFIRM_TIMEOUT, Some(&self.shared.stop))?;
            if empty || Instant::now() >= deadline {
                return Ok(());
            }
            if !self.shared.stop.sleep(DRAIN_POLL) {
                return Err(SwitchError::Stopping { pair });
            }
        }
    }
}

impl<B: Backend> PairSwitch for DevicePairs<'_, B> {
    fn park(&mut self, pair: usize) -> Result<(), SwitchError> {
        if !self.state.has_worker[pair] {
            return Ok(());
        }
        if self.drain {
            self.drain(pair)?;
            return self.shared.pairs[pair].request_drained_park(
                pair,
                WORKER_CONFIRM_TIMEOUT,
                Some(&self.shared.stop),
            );
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
pub struct DeviceCtrl<B> {
    shared: Arc<Shared<B>>,
}

impl<B: Backend> DeviceCtrl<B> {
    pub(crate) fn new(shared: Arc<Shared<B>>) -> Self {
        DeviceCtrl { shared }
    }

    /// Host operations `cmd` will cause.
    fn cost(&self, cmd: &Command) -> u32 {
        let state = relock(&self.shared.state);
        let pairs_to = |n: u16| {
            let (current, target) = (state.active as u32, u32::from(n));
            if target < current {
                (current - target) * DETACH_OPS
            } else {
                (target - current) * ATTACH_OPS
            }
        };
        match cmd {
            Command::VqPairsSet(n) => pairs_to(*n),
            Command::RssConfig(cfg) => pairs_to(cfg.pairs_needed()),
            Command::GuestOffloadsSet(_) => state.attached.iter().filter(|&&a| a).count() as u32,
            Command::MacAddrSet(_)
            | Command::RxMode(..)
            | Command::MacTableSet(_)
            | Command::Vlan(..)
            | Command::NotfCoal { .. }
            | Command::VqCoalSet { .. }
            | Command::VqCoalGet { .. } => 0,
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

impl<B: Backend> DeviceCtrl<B> {
    /// Enables pairs `0..target` and, with steering, steers as `steer` says (`rss`: the
    /// driver's RSS, else automatic steering). With steering, a shrink first steers every
    /// flow away from the pairs being disabled, waits for frames already on their way, and
    /// drains those pairs' tap queues into their receive queues before they are parked and
    /// detached: nothing is lost. A grow attaches first and widens the steering after.
    /// On failure everything is rolled back, the old steering included.
    fn reconfigure(&mut self, what: &str, target: usize, steer: RssConfig, rss: bool) -> bool {
        let mut state = relock(&self.shared.state);
        let current = state.active;
        let steering = self.shared.steers();
        if target == current && (!steering || (!rss && !state.rss)) {
            return true;
        }
        let (old_steer, old_rss) = (state.steer.clone(), state.rss);
        let shrink = target < current;
        if steering && shrink {
            state.steer = steer.clone();
            self.shared.publish_steering(&state);
            if !self.shared.stop.sleep(STEER_SETTLE) {
                state.steer = old_steer;
                self.shared.publish_steering(&state);
                return false;
            }
        }
        let result = if target == current {
            Ok(())
        } else {
            switch_pairs(
                &mut DevicePairs {
                    shared: &self.shared,
                    state: &mut state,
                    drain: steering && shrink,
                },
                current,
                target,
            )
        };
        match result {
            Ok(()) => {
                if steering {
                    state.steer = steer;
                    state.rss = rss;
                    self.shared.publish_steering(&state);
                }
                if target == current {
                    return true;
                }
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
                warn!("virtio-net: {what} ({target} pairs) refused, staying at {current}: {e}");
                if steering {
                    state.steer = old_steer;
                    state.rss = old_rss;
                    self.shared.publish_steering(&state);
                }
                drop(state);
                self.shared.check_backends_gone();
                false
            }
        }
    }
}

impl<B: Backend> CtrlTarget for DeviceCtrl<B> {
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
        let steer = self.shared.auto_steering(usize::from(n));
        self.reconfigure("VQ_PAIRS_SET", usize::from(n), steer, false)
    }

    fn set_rss(&mut self, cfg: RssConfig) -> bool {
        let target = usize::from(cfg.pairs_needed());
        self.reconfigure("RSS_CONFIG", target, cfg, true)
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
        self.shared.change_rx_filter(|f| f.set_mac(mac))
    }

    fn set_rx_mode(&mut self, mode: RxMode, on: bool) -> bool {
        self.shared.change_rx_filter(|f| f.set_mode(mode, on))
    }

    fn set_mac_table(&mut self, table: MacTable) -> bool {
        self.shared.change_rx_filter(|f| f.set_table(table))
    }

    fn set_vlan(&mut self, vid: u16, allowed: bool) -> bool {
        self.shared.change_rx_filter(|f| f.set_vlan(vid, allowed))
    }

    fn set_coalescing(&mut self, tx: bool, cfg: Coalesce) -> bool {
        self.shared.change_coalescing(|queues| {
            let first = usize::from(tx);
            queues
                .iter_mut()
                .skip(first)
                .step_by(2)
                .for_each(|c| *c = cfg);
        })
    }

    fn set_queue_coalescing(&mut self, vqn: u16, cfg: Coalesce) -> bool {
        self.shared.change_coalescing(|queues| {
            if let Some(c) = queues.get_mut(usize::from(vqn)) {
                *c = cfg;
            }
        })
    }

    fn queue_coalescing(&self, vqn: u16) -> Coalesce {
        relock(&self.shared.coalescing)
            .get(usize::from(vqn))
            .copied()
            .unwrap_or_default()
    }
}

/// Whether `offloads` lets the guest receive GSO frames (up to 64 KiB).
pub(crate) fn gso(offloads: u64) -> bool {
    offloads & GUEST_GSO_MASK != 0
}
