//! A small stderr logger for the `log` facade: "mqvmm: LEVEL message".
//!
//! Errors and warnings pass a token bucket (`Budget`): many of them are caused by the guest
//! (a driver that keeps offering bad rings, a queue reset in a loop), and a guest must not be
//! able to fill the host's log. What the bucket holds back is counted and said with the next
//! line that passes. Info and lower are what the operator asked for with `--log-level`, and
//! pass unlimited. A failed write to stderr is ignored rather than panicking the logging thread.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines a burst may have before the bucket starts holding lines back.
const BURST: f64 = 50.0;
/// Lines per second the bucket lets through once the burst is spent.
const RATE: f64 = 5.0;

/// A token bucket of log lines.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Budget {
    fn new(now: Instant) -> Budget {
        Budget {
            tokens: BURST,
            last: now,
            suppressed: 0,
        }
    }

    /// Whether a line may go out at `now`; `Ok(n)` with the lines held back before it.
    fn take(&mut self, now: Instant) -> Result<u64, ()> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            Err(())
        }
    }
}

struct StderrLogger {
    prefix: &'static str,
    budget: Mutex<Budget>,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        let mut held_back = 0;
        if record.level() <= Level::Warn {
            let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            match budget.take(Instant::now()) {
                Ok(n) => held_back = n,
                Err(()) => return,
            }
        }
        let mut stderr = std::io::stderr().lock();
        if held_back > 0 {
            let _ = writeln!(
                stderr,
                "{}: warning: {held_back} error/warning lines held back (at most {RATE} per second after a burst of {BURST})",
                self.prefix
            );
        }
        let _ = writeln!(stderr, "{}: {level}: {}", self.prefix, record.args());
    }

    fn flush(&self) {}
}

/// Parses "error", "warn", "info", "debug", "trace" or "off".
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.trim().parse().ok()
}

/// Installs the logger once; later calls only change the level.
pub fn init(prefix: &'static str, level: LevelFilter) {
    static LOGGER: std::sync::OnceLock<StderrLogger> = std::sync::OnceLock::new();
    let logger = LOGGER.get_or_init(|| StderrLogger {
        prefix,
        budget: Mutex::new(Budget::new(Instant::now())),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("WARN"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn a_flood_is_held_back_counted_and_refilled_over_time() {
        use std::time::Duration;
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for _ in 0..BURST as usize {
            assert_eq!(b.take(t0), Ok(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.take(t0), Err(()));
        }
        // One second later RATE lines pass; the first says how many were held back.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(t1), Ok(1000));
        for _ in 1..RATE as usize {
            assert_eq!(b.take(t1), Ok(0));
        }
        assert_eq!(b.take(t1), Err(()));
        // A long quiet spell refills the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..BURST as usize {
            assert!(b.take(t2).is_ok());
        }
        assert_eq!(b.take(t2), Err(()));
    }
}
