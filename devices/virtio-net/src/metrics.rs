// SPDX-License-Identifier: Apache-2.0
//! Counters of the device, exported in one place: a [`NetSnapshot`], rendered as a text line
//! or serialised (serde, JSON).
//!
//! Every queue counter has exactly one writer (the thread that serves the queue), so the
//! writers use relaxed loads and stores in batches; readers may see a batch late, never torn.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtqueue.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Frames (rx, tx) or commands (ctrl) completed.
    pub packets: AtomicU64,
    /// Frame bytes without the vnet header.
    pub bytes: AtomicU64,
    /// Frames dropped: tap write errors, link down, pair parked, frames larger than the
    /// buffers the guest offered.
    pub drops: AtomicU64,
    /// Malformed descriptor chains returned with length 0.
    pub bad_chains: AtomicU64,
    /// Frames the receive filter kept from the guest (not for its addresses or VLANs).
    pub filtered: AtomicU64,
    /// Kicks from the driver (eventfd counts).
    pub notifications: AtomicU64,
    /// Used-buffer interrupts sent to the driver.
    pub interrupts: AtomicU64,
}

/// A per-batch accumulator for one queue's counters, flushed with one store each.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub bad_chains: u64,
    pub filtered: u64,
    pub interrupts: u64,
}

fn bump(counter: &AtomicU64, by: u64) {
    if by != 0 {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

impl QueueMetrics {
    pub(crate) fn add(&self, t: &Tally) {
        bump(&self.packets, t.packets);
        bump(&self.bytes, t.bytes);
        bump(&self.drops, t.drops);
        bump(&self.bad_chains, t.bad_chains);
        bump(&self.filtered, t.filtered);
        bump(&self.interrupts, t.interrupts);
    }

    pub(crate) fn add_notifications(&self, n: u64) {
        bump(&self.notifications, n);
    }

    /// The counters now (each read on its own: a batch may show in one and not yet in another).
    pub fn snapshot(&self) -> QueueSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueSnapshot {
            packets: load(&self.packets),
            bytes: load(&self.bytes),
            drops: load(&self.drops),
            bad_chains: load(&self.bad_chains),
            filtered: load(&self.filtered),
            notifications: load(&self.notifications),
            interrupts: load(&self.interrupts),
        }
    }
}

/// The counters of one queue at one moment; what the text line and the JSON show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueSnapshot {
    /// See [`QueueMetrics::packets`].
    pub packets: u64,
    /// See [`QueueMetrics::bytes`].
    pub bytes: u64,
    /// See [`QueueMetrics::drops`].
    pub drops: u64,
    /// See [`QueueMetrics::bad_chains`].
    pub bad_chains: u64,
    /// See [`QueueMetrics::filtered`].
    pub filtered: u64,
    /// See [`QueueMetrics::notifications`].
    pub notifications: u64,
    /// See [`QueueMetrics::interrupts`].
    pub interrupts: u64,
}

impl QueueSnapshot {
    /// `(name, value)` in declaration order, the order of the text line.
    fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("packets", self.packets),
            ("bytes", self.bytes),
            ("drops", self.drops),
            ("bad_chains", self.bad_chains),
            ("filtered", self.filtered),
            ("notifications", self.notifications),
            ("interrupts", self.interrupts),
        ]
    }
}

/// Counters and state of one queue pair.
#[derive(Debug, Default)]
pub struct PairMetrics {
    /// Receive queue (guest-bound frames).
    pub rx: QueueMetrics,
    /// Transmit queue (host-bound frames).
    pub tx: QueueMetrics,
    /// The backend queue is attached (the host may queue frames on it).
    pub attached: AtomicBool,
    /// The worker confirmed it does not touch the backend.
    pub parked: AtomicBool,
}

/// All counters of one device. Shared with the VMM via [`crate::Net::metrics`].
#[derive(Debug)]
pub struct NetMetrics {
    /// One entry per queue pair.
    pub pairs: Vec<PairMetrics>,
    /// Control queue: packets = commands handled, drops = commands answered with ERR.
    pub ctrl: QueueMetrics,
    /// VQ_PAIRS_SET commands received.
    pub vq_pairs_set: AtomicU64,
    /// VQ_PAIRS_SET commands answered with ERR.
    pub vq_pairs_set_errors: AtomicU64,
    /// Time from the control kick to the used entry of the last VQ_PAIRS_SET, in ns.
    pub last_vq_pairs_set_ns: AtomicU64,
    /// Queue pairs currently enabled.
    pub active_pairs: AtomicU64,
    /// Undo steps that failed during a rollback (the pair is left as `attached`/`parked` say).
    pub rollback_failures: AtomicU64,
    /// Link state shown to the guest.
    pub link_up: AtomicBool,
    /// Host operations (TUNSETQUEUE, TUNSETOFFLOAD, TUNSETVNETHDRSZ) the control queue's
    /// commands caused; rate-limited per device.
    pub host_reconfigs: AtomicU64,
    /// Control commands that had to wait for the rate limit.
    pub throttled_commands: AtomicU64,
    /// Frames that were on a tap queue being disabled with steering and that the guest had
    /// no receive buffers for (read and dropped; without steering such frames are purged by
    /// the kernel unseen).
    pub steer_dropped: AtomicU64,
    /// VIRTIO_NET_CTRL_MQ_RSS_CONFIG commands received.
    pub rss_configs: AtomicU64,
    /// RSS_CONFIG commands answered with ERR.
    pub rss_config_errors: AtomicU64,
}

impl NetMetrics {
    /// Counters for a device with `pairs` queue pairs.
    pub fn new(pairs: usize) -> Self {
        NetMetrics {
            pairs: (0..pairs).map(|_| PairMetrics::default()).collect(),
            ctrl: QueueMetrics::default(),
            vq_pairs_set: AtomicU64::new(0),
            vq_pairs_set_errors: AtomicU64::new(0),
            last_vq_pairs_set_ns: AtomicU64::new(0),
            active_pairs: AtomicU64::new(1),
            rollback_failures: AtomicU64::new(0),
            link_up: AtomicBool::new(true),
            host_reconfigs: AtomicU64::new(0),
            throttled_commands: AtomicU64::new(0),
            steer_dropped: AtomicU64::new(0),
            rss_configs: AtomicU64::new(0),
            rss_config_errors: AtomicU64::new(0),
        }
    }

    /// Number of pairs whose backend queue is attached.
    pub fn attached_pairs(&self) -> usize {
        self.pairs
            .iter()
            .filter(|p| p.attached.load(Ordering::Relaxed))
            .count()
    }

    /// Every counter now, per pair and per queue (each read on its own).
    pub fn snapshot(&self) -> NetSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetSnapshot {
            max_pairs: self.pairs.len() as u64,
            active_pairs: load(&self.active_pairs),
            attached_pairs: self.attached_pairs() as u64,
            vq_pairs_set: load(&self.vq_pairs_set),
            vq_pairs_set_errors: load(&self.vq_pairs_set_errors),
            last_vq_pairs_set_ns: load(&self.last_vq_pairs_set_ns),
            rollback_failures: load(&self.rollback_failures),
            host_reconfigs: load(&self.host_reconfigs),
            throttled_commands: load(&self.throttled_commands),
            steer_dropped: load(&self.steer_dropped),
            rss_configs: load(&self.rss_configs),
            rss_config_errors: load(&self.rss_config_errors),
            link_up: self.link_up.load(Ordering::Relaxed),
            pairs: self
                .pairs
                .iter()
                .enumerate()
                .map(|(pair, p)| PairSnapshot {
                    pair,
                    attached: p.attached.load(Ordering::Relaxed),
                    parked: p.parked.load(Ordering::Relaxed),
                    rx: p.rx.snapshot(),
                    tx: p.tx.snapshot(),
                })
                .collect(),
            ctrl: self.ctrl.snapshot(),
        }
    }

    /// One line of `key=value` fields, e.g.
    /// `virtio-net max_pairs=2 ... link_up=1 | pair0 attached=1 parked=0 rx_packets=..`.
    pub fn to_text(&self) -> String {
        self.snapshot().to_text()
    }

    /// The same counters as a JSON object (one line).
    pub fn to_json(&self) -> String {
        self.snapshot().to_json()
    }
}

/// The counters of one queue pair at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairSnapshot {
    /// The pair's index.
    pub pair: usize,
    /// See [`PairMetrics::attached`].
    pub attached: bool,
    /// See [`PairMetrics::parked`].
    pub parked: bool,
    /// Receive queue.
    pub rx: QueueSnapshot,
    /// Transmit queue.
    pub tx: QueueSnapshot,
}

/// Every counter of a device at one moment ([`NetMetrics::snapshot`]): rendered as the
/// SIGUSR1 line ([`NetSnapshot::to_text`]) or serialised (JSON, for mqvmm's API socket), in
/// the order of the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetSnapshot {
    /// Queue pairs the device has.
    pub max_pairs: u64,
    /// See [`NetMetrics::active_pairs`].
    pub active_pairs: u64,
    /// Pairs whose backend queue is attached.
    pub attached_pairs: u64,
    /// See [`NetMetrics::vq_pairs_set`].
    pub vq_pairs_set: u64,
    /// See [`NetMetrics::vq_pairs_set_errors`].
    pub vq_pairs_set_errors: u64,
    /// See [`NetMetrics::last_vq_pairs_set_ns`].
    pub last_vq_pairs_set_ns: u64,
    /// See [`NetMetrics::rollback_failures`].
    pub rollback_failures: u64,
    /// See [`NetMetrics::host_reconfigs`].
    pub host_reconfigs: u64,
    /// See [`NetMetrics::throttled_commands`].
    pub throttled_commands: u64,
    /// See [`NetMetrics::steer_dropped`].
    pub steer_dropped: u64,
    /// See [`NetMetrics::rss_configs`].
    pub rss_configs: u64,
    /// See [`NetMetrics::rss_config_errors`].
    pub rss_config_errors: u64,
    /// See [`NetMetrics::link_up`].
    pub link_up: bool,
    /// One entry per queue pair.
    pub pairs: Vec<PairSnapshot>,
    /// The control queue: packets = commands handled, drops = commands answered with ERR.
    pub ctrl: QueueSnapshot,
}

impl NetSnapshot {
    fn device_fields(&self) -> [(&'static str, u64); 12] {
        [
            ("max_pairs", self.max_pairs),
            ("active_pairs", self.active_pairs),
            ("attached_pairs", self.attached_pairs),
            ("vq_pairs_set", self.vq_pairs_set),
            ("vq_pairs_set_errors", self.vq_pairs_set_errors),
            ("last_vq_pairs_set_ns", self.last_vq_pairs_set_ns),
            ("rollback_failures", self.rollback_failures),
            ("host_reconfigs", self.host_reconfigs),
            ("throttled_commands", self.throttled_commands),
            ("steer_dropped", self.steer_dropped),
            ("rss_configs", self.rss_configs),
            ("rss_config_errors", self.rss_config_errors),
        ]
    }

    /// One line of `key=value` fields, e.g.
    /// `virtio-net max_pairs=2 ... link_up=1 | pair0 attached=1 parked=0 rx_packets=..`.
    pub fn to_text(&self) -> String {
        let mut s = String::from("virtio-net");
        for (k, v) in self.device_fields() {
            let _ = write!(s, " {k}={v}");
        }
        let _ = write!(s, " link_up={}", u8::from(self.link_up));
        for p in &self.pairs {
            let _ = write!(
                s,
                " | pair{} attached={} parked={}",
                p.pair,
                u8::from(p.attached),
                u8::from(p.parked)
            );
            for (q, m) in [("rx", &p.rx), ("tx", &p.tx)] {
                for (k, v) in m.fields() {
                    let _ = write!(s, " {q}_{k}={v}");
                }
            }
        }
        s.push_str(" | ctrl");
        for (k, v) in self.ctrl.fields() {
            let _ = write!(s, " {k}={v}");
        }
        s
    }

    /// The same counters as a JSON object (one line).
    pub fn to_json(&self) -> String {
        // Plain structs of integers and booleans: serialising them cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NetMetrics {
        let m = NetMetrics::new(2);
        m.pairs[0].attached.store(true, Ordering::Relaxed);
        m.pairs[1].parked.store(true, Ordering::Relaxed);
        m.pairs[0].rx.add(&Tally {
            packets: 3,
            bytes: 180,
            ..Tally::default()
        });
        m.pairs[1].tx.add(&Tally {
            drops: 2,
            ..Tally::default()
        });
        m.pairs[1].tx.add_notifications(5);
        m.ctrl.add(&Tally {
            packets: 1,
            ..Tally::default()
        });
        m.link_up.store(false, Ordering::Relaxed);
        m
    }

    #[test]
    fn the_text_line_is_what_sigusr1_has_always_printed() {
        let queue = |p: &str, v: [u64; 7]| {
            format!(
                "{p}_packets={} {p}_bytes={} {p}_drops={} {p}_bad_chains={} {p}_filtered={} \
                 {p}_notifications={} {p}_interrupts={}",
                v[0], v[1], v[2], v[3], v[4], v[5], v[6]
            )
        };
        let expected = format!(
            "virtio-net max_pairs=2 active_pairs=1 attached_pairs=1 vq_pairs_set=0 \
             vq_pairs_set_errors=0 last_vq_pairs_set_ns=0 rollback_failures=0 host_reconfigs=0 \
             throttled_commands=0 steer_dropped=0 rss_configs=0 rss_config_errors=0 link_up=0 | pair0 attached=1 parked=0 {} {} | pair1 attached=0 \
             parked=1 {} {} | ctrl packets=1 bytes=0 drops=0 bad_chains=0 filtered=0 \
             notifications=0 interrupts=0",
            queue("rx", [3, 180, 0, 0, 0, 0, 0]),
            queue("tx", [0; 7]),
            queue("rx", [0; 7]),
            queue("tx", [0, 0, 2, 0, 0, 5, 0]),
        );
        assert_eq!(sample().to_text(), expected);
    }

    #[test]
    fn the_json_has_every_counter_per_pair_and_per_queue() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(json["max_pairs"], 2);
        assert_eq!(json["link_up"], false);
        assert_eq!(json["pairs"][0]["pair"], 0);
        assert_eq!(json["pairs"][0]["attached"], true);
        assert_eq!(json["pairs"][0]["rx"]["packets"], 3);
        assert_eq!(json["pairs"][0]["rx"]["bytes"], 180);
        assert_eq!(json["pairs"][1]["parked"], true);
        assert_eq!(json["pairs"][1]["tx"]["drops"], 2);
        assert_eq!(json["pairs"][1]["tx"]["notifications"], 5);
        assert_eq!(json["ctrl"]["packets"], 1);
        let queue_keys: Vec<&String> = json["ctrl"].as_object().unwrap().keys().collect();
        assert_eq!(
            queue_keys,
            [
                "bad_chains",
                "bytes",
                "drops",
                "filtered",
                "interrupts",
                "notifications",
                "packets"
            ]
        );
    }
}
