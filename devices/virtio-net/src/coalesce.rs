// SPDX-License-Identifier: Apache-2.0
//! Notification coalescing (VIRTIO_NET_F_NOTF_COAL): the driver asks the device to hold a
//! queue's used-buffer notification until `max_packets` buffers are used or `usecs` have
//! passed since the first of them (`ethtool -C eth0 rx-frames N rx-usecs M ...`).
//!
//! Both zero (the reset state) means no coalescing: a notification goes out as soon as the
//! driver wants one. A notification the driver wanted is never lost, only held: once owed
//! it goes out when either limit is reached, however many more buffers follow.

use std::time::{Duration, Instant};

/// The coalescing parameters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coalesce {
    /// Used buffers after which a held notification goes out (0: no packet limit).
    pub max_packets: u32,
    /// Microseconds after which a held notification goes out (0: no time limit).
    pub usecs: u32,
}

impl Coalesce {
    /// Whether notifications go out at once.
    pub fn is_off(self) -> bool {
        self.max_packets == 0 && self.usecs == 0
    }
}

/// Decides when one queue's used-buffer notification goes out.
#[derive(Debug, Default)]
pub struct Coalescer {
    cfg: Coalesce,
    /// Used buffers since the last notification.
    pending: u32,
    /// The driver wants a notification that has not gone out yet, since this moment.
    owed_since: Option<Instant>,
}

impl Coalescer {
    /// Applies new parameters; a notification already owed is re-judged by them at the next
    /// [`Coalescer::publish`] or [`Coalescer::poll`].
    pub fn set(&mut self, cfg: Coalesce) {
        self.cfg = cfg;
    }

    /// The parameters in force.
    pub fn get(&self) -> Coalesce {
        self.cfg
    }

    /// `used` buffers were published and the driver does (`wanted`) or does not want a
    /// notification for them; returns whether to send one now. The clock is read only when
    /// coalescing is on (the data path publishes once per batch).
    pub fn publish(&mut self, used: u32, wanted: bool, now: impl FnOnce() -> Instant) -> bool {
        if self.cfg.is_off() {
            self.pending = 0;
            return wanted;
        }
        let now = now();
        self.pending = self.pending.saturating_add(used);
        if wanted && self.owed_since.is_none() {
            self.owed_since = Some(now);
        }
        self.poll(now)
    }

    /// Whether a held notification is due now (the caller then sends it).
    pub fn poll(&mut self, now: Instant) -> bool {
        let Some(since) = self.owed_since else {
            return false;
        };
        let by_count = self.cfg.max_packets > 0 && self.pending >= self.cfg.max_packets;
        let by_time = self.cfg.usecs > 0 && now >= since + self.usecs();
        // With both limits zero (coalescing turned off while one was held) it goes now.
        if by_count || by_time || self.cfg.is_off() {
            self.owed_since = None;
            self.pending = 0;
            return true;
        }
        false
    }

    /// When a held notification falls due by time, if one is held with a time limit.
    pub fn due(&self) -> Option<Instant> {
        match self.owed_since {
            Some(since) if self.cfg.usecs > 0 => Some(since + self.usecs()),
            _ => None,
        }
    }

    fn usecs(&self) -> Duration {
        Duration::from_micros(u64::from(self.cfg.usecs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn off_means_every_wanted_notification_goes_out_at_once() {
        let t = Instant::now();
        let mut c = Coalescer::default();
        assert!(c.publish(1, true, || t));
        assert!(!c.publish(5, false, || t));
        assert_eq!(c.due(), None);
    }

    #[test]
    fn the_packet_limit_holds_notifications_until_enough_buffers_are_used() {
        let t = Instant::now();
        let mut c = Coalescer::default();
        c.set(Coalesce {
            max_packets: 8,
            usecs: 0,
        });
        assert!(!c.publish(3, true, || t));
        assert!(!c.publish(4, false, || t), "still owed, 7 of 8");
        assert!(c.publish(1, false, || t), "the 8th buffer releases it");
        assert!(
            !c.publish(8, false, || t),
            "nothing owed: the driver did not ask"
        );
    }

    #[test]
    fn the_time_limit_releases_a_held_notification() {
        let t = Instant::now();
        let mut c = Coalescer::default();
        c.set(Coalesce {
            max_packets: 64,
            usecs: 100,
        });
        assert!(!c.publish(1, true, || t));
        assert_eq!(c.due(), Some(t + 100 * US));
        assert!(!c.poll(t + 99 * US));
        assert!(c.poll(t + 100 * US));
        assert_eq!(c.due(), None);
        assert!(!c.poll(t + 200 * US), "sent once");
        // The clock starts at the first owed notification, not at later buffers.
        assert!(!c.publish(1, true, || t + 300 * US));
        assert!(!c.publish(1, true, || t + 350 * US));
        assert!(c.publish(1, false, || t + 400 * US));
    }

    #[test]
    fn turning_coalescing_off_releases_what_is_held() {
        let t = Instant::now();
        let mut c = Coalescer::default();
        c.set(Coalesce {
            max_packets: 100,
            usecs: 0,
        });
        assert!(!c.publish(1, true, || t));
        c.set(Coalesce::default());
        assert!(c.poll(t));
    }
}
