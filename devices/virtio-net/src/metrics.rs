// SPDX-License-Identifier: Apache-2.0
//! Counters of the device, exported in one place (text line or JSON).
//!
//! Every queue counter has exactly one writer (the thread that serves the queue), so the
//! writers use relaxed loads and stores in batches; readers may see a batch late, never torn.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

    fn snapshot(&self) -> [(&'static str, u64); 7] {
        [
            ("packets", self.packets.load(Ordering::Relaxed)),
            ("bytes", self.bytes.load(Ordering::Relaxed)),
            ("drops", self.drops.load(Ordering::Relaxed)),
            ("bad_chains", self.bad_chains.load(Ordering::Relaxed)),
            ("filtered", self.filtered.load(Ordering::Relaxed)),
            ("notifications", self.notifications.load(Ordering::Relaxed)),
            ("interrupts", self.interrupts.load(Ordering::Relaxed)),
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
        }
    }

    /// Number of pairs whose backend queue is attached.
    pub fn attached_pairs(&self) -> usize {
        self.pairs
            .iter()
            .filter(|p| p.attached.load(Ordering::Relaxed))
            .count()
    }

    fn device_fields(&self) -> [(&'static str, u64); 9] {
        [
            ("max_pairs", self.pairs.len() as u64),
            ("active_pairs", self.active_pairs.load(Ordering::Relaxed)),
            ("attached_pairs", self.attached_pairs() as u64),
            ("vq_pairs_set", self.vq_pairs_set.load(Ordering::Relaxed)),
            (
                "vq_pairs_set_errors",
                self.vq_pairs_set_errors.load(Ordering::Relaxed),
            ),
            (
                "last_vq_pairs_set_ns",
                self.last_vq_pairs_set_ns.load(Ordering::Relaxed),
            ),
            (
                "rollback_failures",
                self.rollback_failures.load(Ordering::Relaxed),
            ),
            (
                "host_reconfigs",
                self.host_reconfigs.load(Ordering::Relaxed),
            ),
            (
                "throttled_commands",
                self.throttled_commands.load(Ordering::Relaxed),
            ),
        ]
    }

    /// One line of `key=value` fields, e.g.
    /// `virtio-net max_pairs=2 ... link_up=1 | pair0 attached=1 parked=0 rx_packets=..`.
    pub fn to_text(&self) -> String {
        let mut s = String::from("virtio-net");
        for (k, v) in self.device_fields() {
            let _ = write!(s, " {k}={v}");
        }
        let _ = write!(
            s,
            " link_up={}",
            u8::from(self.link_up.load(Ordering::Relaxed))
        );
        for (i, p) in self.pairs.iter().enumerate() {
            let _ = write!(
                s,
                " | pair{i} attached={} parked={}",
                u8::from(p.attached.load(Ordering::Relaxed)),
                u8::from(p.parked.load(Ordering::Relaxed))
            );
            for (q, m) in [("rx", &p.rx), ("tx", &p.tx)] {
                for (k, v) in m.snapshot() {
                    let _ = write!(s, " {q}_{k}={v}");
                }
            }
        }
        s.push_str(" | ctrl");
        for (k, v) in self.ctrl.snapshot() {
            let _ = write!(s, " {k}={v}");
        }
        s
    }

    /// The same counters as a JSON object (one line).
    pub fn to_json(&self) -> String {
        fn queue(s: &mut String, m: &QueueMetrics) {
            s.push('{');
            for (i, (k, v)) in m.snapshot().into_iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(s, "{sep}\"{k}\":{v}");
            }
            s.push('}');
        }
        let mut s = String::from("{");
        for (k, v) in self.device_fields() {
            let _ = write!(s, "\"{k}\":{v},");
        }
        let _ = write!(s, "\"link_up\":{},", self.link_up.load(Ordering::Relaxed));
        s.push_str("\"pairs\":[");
        for (i, p) in self.pairs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"pair\":{i},\"attached\":{},\"parked\":{},\"rx\":",
                p.attached.load(Ordering::Relaxed),
                p.parked.load(Ordering::Relaxed)
            );
            queue(&mut s, &p.rx);
            s.push_str(",\"tx\":");
            queue(&mut s, &p.tx);
            s.push('}');
        }
        s.push_str("],\"ctrl\":");
        queue(&mut s, &self.ctrl);
        s.push('}');
        s
    }
}
