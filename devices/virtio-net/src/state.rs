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
    ) -> std::io::Result<Self> {
        let pairs = backends.len();
        let mac = config.mac;
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
            }),
            rx_filter: Mutex::new(RxFilter::new(mac, false)),
            coalescing: Mutex::new(vec![Coalesce::default(); 2 * pairs]),
            settings_gen: AtomicU64::new(0),
            stop: StopSignal::default(),
            reconfig_limit: Mutex::new(TokenBucket::for_reconfig(pairs, Instant::now())),
            switch_log: Mutex::new(LogLimit::new(Duration::from_secs(1))),
            mtu,
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

    fn set_attached(&self, state: &mut PairsState, pair: usize, attached: bool) {
        state.attached[pair] = attached;
        self.metrics.pairs[pair]
            .attached
            .store(attached, Ordering::Relaxed);
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
        let mut state = relock(&self.shared.state);
        let current = state.active;
        let target = usize::from(n);
        if target == current {
            return true;
        }
        let result = switch_pairs(
            &mut DevicePairs {
                shared: &self.shared,
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
