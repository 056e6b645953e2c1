// SPDX-License-Identifier: Apache-2.0
//! Raw results as records: one line per sample or fact, `kind<TAB>key=value<TAB>...`.
//!
//! The device and guest runs write these (the guest run from inside the nested rig's L1, into
//! the shared scratch directory); the report is rendered from them, so `mqvmm-bench report`
//! can re-render without measuring again. Values never contain a tab or a newline.

use std::fmt::Display;
use std::path::{Path, PathBuf};

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
    /// A line is not `kind<TAB>key=value...`.
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
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// What it is (`meta`, `device`, `guest`, ...).
    pub kind: String,
    /// Its fields, in order.
    pub fields: Vec<(String, String)>,
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

impl Record {
    /// An empty record of `kind`.
    pub fn new(kind: &str) -> Record {
        Record {
            kind: clean(kind),
            fields: Vec::new(),
        }
    }

    /// Adds `key=value`.
    pub fn with(mut self, key: &str, value: impl Display) -> Record {
        self.fields.push((clean(key), clean(&value.to_string())));
        self
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` as a number.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    /// The record as one line (no newline).
    pub fn to_line(&self) -> String {
        let mut s = self.kind.clone();
        for (k, v) in &self.fields {
            s.push('\t');
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }
}

/// Writes `records` to `path`, one per line.
pub fn write_all(path: &Path, records: &[Record]) -> Result<(), Error> {
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_line());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses records text; `path` only names the source in errors. Blank lines are skipped.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Record>, Error> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split('\t');
        let mut rec = Record::new(parts.next().unwrap_or_default());
        for field in parts {
            let Some((k, v)) = field.split_once('=') else {
                return Err(Error::Malformed {
                    path: path.to_path_buf(),
                    line: i + 1,
                    field: field.to_string(),
                });
            };
            rec.fields.push((k.to_string(), v.to_string()));
        }
        out.push(rec);
    }
    Ok(out)
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

    #[test]
    fn round_trip_and_cleaning() {
        let r = Record::new("device")
            .with("dir", "tx")
            .with("pairs", 2)
            .with("note", "a\tb\nc");
        let line = r.to_line();
        assert_eq!(line, "device\tdir=tx\tpairs=2\tnote=a b c");
        let back = parse(Path::new("x"), &format!("{line}\n\n")).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].get("dir"), Some("tx"));
        assert_eq!(back[0].num("pairs"), Some(2.0));
        assert_eq!(back[0].get("missing"), None);
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let back = parse(Path::new("x"), "meta\tcmd=a=b").unwrap();
        assert_eq!(back[0].get("cmd"), Some("a=b"));
    }

    #[test]
    fn malformed_field_names_line() {
        let err = parse(Path::new("f"), "meta\tok=1\nmeta\tbroken").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
