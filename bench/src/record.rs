// SPDX-License-Identifier: Apache-2.0
//! Raw results as records, one JSON object a line (`{"kind":"device","dir":"tx",...}`).
//!
//! The device and guest runs write these (the guest run from inside the nested rig's L1, into
//! the shared scratch directory); the report is rendered from them, so `mqvmm-bench report`
//! can re-render without measuring again. Files written before the records were JSON, one
//! `kind<TAB>key=value<TAB>...` line a record, are still read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Reading or writing a records file failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written.
    #[error("cannot access records file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a record.
    #[error("records file {path} line {line} is not a record")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A tab-separated line has a field without `=`.
    #[error("records file {path} line {line}: malformed field {field:?}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The field that has no `=`.
        field: String,
    },
}

/// One sample or fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    /// A fact about the run (date, commit, machine, kernels, retried boots).
    Meta {
        /// What the fact is (`commit`, `kvm_host_kernel`, ...).
        key: String,
        /// Its value.
        value: String,
    },
    /// One device-path sample.
    Device(DevSample),
    /// One guest sample.
    Guest(GuestSample),
}

impl Record {
    /// The fact `key` = `value`.
    pub fn meta(key: impl Into<String>, value: impl Into<String>) -> Record {
        Record::Meta {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// One device-path sample: `units` units of one path in one configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevSample {
    /// tx or rx.
    pub dir: String,
    /// Pair count.
    pub pairs: u64,
    /// Ethernet frame length.
    #[serde(rename = "frame_bytes")]
    pub frame: u64,
    /// device or ceiling.
    pub path: String,
    /// Sample index.
    pub sample: u64,
    /// Units per sample.
    pub units: u64,
    /// Frames moved.
    pub frames: u64,
    /// Frame bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub wall_ns: u64,
    /// CPU time of the pair threads.
    pub cpu_ns: u64,
    /// Interrupts signalled.
    #[serde(rename = "interrupts")]
    pub irqs: u64,
}

impl DevSample {
    /// Frames per second of wall time.
    pub fn pps(&self) -> f64 {
        self.frames as f64 * 1e9 / self.wall_ns.max(1) as f64
    }

    /// Frame bits per nanosecond of wall time.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.wall_ns.max(1) as f64
    }

    /// CPU time per frame, in ns.
    pub fn cpu_per_frame(&self) -> f64 {
        self.cpu_ns as f64 / self.frames.max(1) as f64
    }
}

/// One guest sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSample {
    /// VMM key.
    pub vmm: String,
    /// Repetition.
    pub rep: u64,
    /// Metric name.
    pub metric: String,
    /// Active pairs, for per-step metrics.
    pub pairs: Option<u64>,
    /// Value. JSON has no NaN or infinity: serde_json writes them as `null`, read back as NaN,
    /// which keeps the summary of the metric empty as the value itself would.
    #[serde(deserialize_with = "null_as_nan")]
    pub value: f64,
}

fn null_as_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Writes `records` to `path`, one per line.
pub fn write_all(path: &Path, records: &[Record]) -> Result<(), Error> {
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut text = Vec::new();
    for r in records {
        serde_json::to_writer(&mut text, r).map_err(|e| io(e.into()))?;
        text.push(b'\n');
    }
    std::fs::write(path, text).map_err(io)
}

/// Parses records text; `path` only names the source in errors. Blank lines are skipped.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Record>, Error> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = if line.trim_start().starts_with('{') {
            serde_json::from_str(line)
        } else {
            let object = tab_separated(line).map_err(|field| Error::Malformed {
                path: path.to_path_buf(),
                line: i + 1,
                field,
            })?;
            serde_json::from_value(object)
        };
        out.push(record.map_err(|source| Error::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?);
    }
    Ok(out)
}

/// A `kind<TAB>key=value...` line as the JSON object of the same record: kind `fact` is
/// `meta`, fields `frame` and `irqs` are `frame_bytes` and `interrupts`, and values that are
/// numbers are numbers (meta values stay strings). Errs with the field that has no `=`.
fn tab_separated(line: &str) -> Result<Value, String> {
    let mut parts = line.split('\t');
    let kind = match parts.next().unwrap_or_default() {
        "fact" => "meta",
        kind => kind,
    };
    let mut object = Map::new();
    object.insert("kind".into(), kind.into());
    for field in parts {
        let (key, value) = field.split_once('=').ok_or_else(|| field.to_string())?;
        let key = match key {
            "frame" => "frame_bytes",
            "irqs" => "interrupts",
            key => key,
        };
        let value = if kind == "meta" {
            value.into()
        } else if let Ok(n) = value.parse::<u64>() {
            n.into()
        } else if let Ok(x) = value.parse::<f64>() {
            x.into()
        } else {
            value.into()
        };
        object.insert(key.into(), value);
    }
    Ok(Value::Object(object))
}

/// Reads every record of `path`.
pub fn read_all(path: &Path) -> Result<Vec<Record>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> DevSample {
        DevSample {
            dir: "tx".into(),
            pairs: 2,
            frame: 1514,
            path: "device".into(),
            sample: 0,
            units: 4,
            frames: 8192,
            bytes: 8192 * 1514,
            wall_ns: 1_000_000,
            cpu_ns: 1_500_000,
            irqs: 32,
        }
    }

    #[test]
    fn records_round_trip_one_json_object_a_line() {
        let records = vec![
            Record::meta("note", "a\tb\nc=d"),
            Record::Device(device()),
            Record::Guest(GuestSample {
                vmm: "mqvmm".into(),
                rep: 1,
                metric: "iperf_up_mbps".into(),
                pairs: Some(2),
                value: 1873.25,
            }),
        ];
        let path = std::env::temp_dir().join(format!("mqvmm-bench-{}.rec", std::process::id()));
        write_all(&path, &records).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.starts_with(r#"{"kind":"meta","key":"note","value":"a\tb\nc=d"}"#));
        assert!(text.contains(r#""frame_bytes":1514,"#), "{text}");
        assert_eq!(parse(&path, &text).unwrap(), records);
    }

    #[test]
    fn tab_separated_lines_of_older_files_are_read() {
        let text = "meta\tkey=cores\tvalue=2\n\n\
                    fact\tkey=cmd\tvalue=a=b\n\
                    device\tdir=tx\tpairs=2\tframe=1514\tpath=device\tsample=0\tunits=4\tframes=8192\tbytes=12402688\twall_ns=1000000\tcpu_ns=1500000\tirqs=32\n\
                    guest\tvmm=mqvmm\trep=1\tmetric=boot_wall_s\tvalue=3.320000\n";
        let records = parse(Path::new("old.rec"), text).unwrap();
        assert_eq!(
            records,
            vec![
                Record::meta("cores", "2"),
                Record::meta("cmd", "a=b"),
                Record::Device(device()),
                Record::Guest(GuestSample {
                    vmm: "mqvmm".into(),
                    rep: 1,
                    metric: "boot_wall_s".into(),
                    pairs: None,
                    value: 3.32,
                }),
            ]
        );
    }

    #[test]
    fn a_value_json_cannot_hold_reads_back_as_nan() {
        let sample = Record::Guest(GuestSample {
            vmm: "mqvmm".into(),
            rep: 1,
            metric: "boot_wall_s".into(),
            pairs: None,
            value: f64::INFINITY,
        });
        let line = serde_json::to_string(&sample).unwrap();
        assert!(line.ends_with(r#""value":null}"#), "{line}");
        let back = parse(Path::new("x"), &line).unwrap();
        assert!(
            matches!(&back[0], Record::Guest(s) if s.value.is_nan()),
            "{back:?}"
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse(Path::new("f"), "meta\tkey=a\tvalue=1\nmeta\tbroken").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("\"broken\""), "{err}");
        let err = parse(Path::new("f"), "{\"kind\":\"device\",\"dir\":\"tx\"}").unwrap_err();
        assert!(err.to_string().contains("f line 1"), "{err}");
        let err = parse(Path::new("f"), "sample\tx=1").unwrap_err();
        assert!(err.to_string().contains("line 1 is not a record"), "{err}");
    }
}
