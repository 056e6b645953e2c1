//! A small stderr logger for the `log` facade: "mqvmm: LEVEL message".

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    prefix: &'static str,
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
        eprintln!("{}: {level}: {}", self.prefix, record.args());
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
    let logger = LOGGER.get_or_init(|| StderrLogger { prefix });
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
}
