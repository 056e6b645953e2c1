// SPDX-License-Identifier: Apache-2.0
//! What a guest may make the host do per second: a token bucket over host operations.
//!
//! Every TUNSETQUEUE, TUNSETOFFLOAD and TUNSETVNETHDRSZ a control command causes takes the
//! host-wide RTNL lock, and a detach also waits for an RCU grace period (synchronize_net)
//! and sends udev events. A guest alternating VQ_PAIRS_SET(max) and VQ_PAIRS_SET(1) would
//! otherwise make the host do that as fast as it can, slowing every other tenant's network
//! configuration. The control thread asks the bucket before each command; a command whose
//! cost is not covered waits (the guest's driver waits for its ack), then runs and is
//! answered as it would have been.

use std::time::{Duration, Instant};

/// Host operations a device may do at once after a quiet period, at least.
pub const RECONFIG_BURST_MIN: u32 = 64;
/// Host operations per second a device may do in the long run.
pub const RECONFIG_RATE: u32 = 32;

/// A token bucket: `capacity` tokens at most, `rate` tokens added per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, rate: u32, now: Instant) -> Self {
        let capacity = f64::from(capacity.max(1));
        TokenBucket {
            capacity,
            rate: f64::from(rate.max(1)),
            tokens: capacity,
            last: now,
        }
    }

    /// The bucket for tap reconfigurations of a device with `pairs` queue pairs: its burst
    /// covers the most expensive single command (growing from 1 to `pairs` pairs costs three
    /// operations per pair), so any one command can run after a pause.
    pub fn for_reconfig(pairs: usize, now: Instant) -> Self {
        let burst = u32::try_from(pairs.saturating_mul(3))
            .unwrap_or(u32::MAX)
            .max(RECONFIG_BURST_MIN);
        TokenBucket::new(burst, RECONFIG_RATE, now)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes `cost` tokens if there are enough and returns zero; otherwise takes nothing and
    /// returns how long to wait until there will be. A cost above the capacity is charged as
    /// the capacity (it could never be covered otherwise).
    pub fn take(&mut self, cost: u32, now: Instant) -> Duration {
        self.refill(now);
        let cost = f64::from(cost).min(self.capacity);
        if self.tokens >= cost {
            self.tokens -= cost;
            return Duration::ZERO;
        }
        Duration::from_secs_f64((cost - self.tokens) / self.rate)
    }
}

/// Lets a log line through at most once per `interval`, and counts the ones held back.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            last: None,
            held: 0,
        }
    }

    /// `Some(n)` if a line may be written now, `n` being how many were held back since the
    /// last one; `None` (and counted) otherwise.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_bucket_takes_a_burst_then_meters_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 100, t0);
        for _ in 0..10 {
            assert_eq!(b.take(1, t0), Duration::ZERO);
        }
        // Empty: one token comes every 10 ms.
        let wait = b.take(1, t0);
        assert!(wait > 9 * MS && wait <= 10 * MS, "{wait:?}");
        assert_eq!(b.take(1, t0 + 10 * MS), Duration::ZERO);
        // Refill never exceeds the capacity.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(b.take(1, later), Duration::ZERO);
        }
        assert!(b.take(1, later) > Duration::ZERO);
    }

    #[test]
    fn a_refused_take_costs_nothing_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(8, 4, t0);
        assert_eq!(b.take(6, t0), Duration::ZERO);
        // 2 left, 6 needed: 4 tokens at 4/s.
        let wait = b.take(6, t0);
        assert!(wait > 999 * MS && wait <= 1000 * MS, "{wait:?}");
        assert_eq!(b.take(2, t0), Duration::ZERO, "the refusal took nothing");
        assert_eq!(b.take(6, t0 + Duration::from_millis(1500)), Duration::ZERO);
    }

    #[test]
    fn a_cost_above_the_capacity_is_charged_as_the_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, 1, t0);
        assert_eq!(b.take(50, t0), Duration::ZERO);
        let wait = b.take(50, t0);
        assert!(wait > Duration::from_millis(4999), "{wait:?}");
    }

    #[test]
    fn the_reconfig_burst_covers_the_largest_single_command() {
        let t0 = Instant::now();
        let mut b = TokenBucket::for_reconfig(64, t0);
        assert_eq!(b.take(3 * 63, t0), Duration::ZERO);
        let mut small = TokenBucket::for_reconfig(2, t0);
        for _ in 0..RECONFIG_BURST_MIN {
            assert_eq!(small.take(1, t0), Duration::ZERO);
        }
        assert!(small.take(1, t0) > Duration::ZERO);
    }

    #[test]
    fn log_lines_pass_once_per_interval_and_count_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + 10 * MS), None);
        assert_eq!(l.allow(t0 + 999 * MS), None);
        assert_eq!(l.allow(t0 + 1000 * MS), Some(2));
        assert_eq!(l.allow(t0 + 1001 * MS), None);
        assert_eq!(l.allow(t0 + 5000 * MS), Some(1));
    }
}
