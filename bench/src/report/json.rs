// SPDX-License-Identifier: Apache-2.0
//! A JSON value and its pretty printer (writing only; no serde: the dependency rule).

use std::fmt::Write as _;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// A number (non-finite numbers are written as `null`).
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in insertion order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An empty object.
    pub fn obj() -> Json {
        Json::Obj(Vec::new())
    }

    /// Adds `key: value` to an object (no-op on other values).
    pub fn set(mut self, key: &str, value: impl Into<Json>) -> Json {
        if let Json::Obj(fields) = &mut self {
            fields.push((key.to_string(), value.into()));
        }
        self
    }

    /// The pretty-printed document, two-space indentation, trailing newline.
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s.push('\n');
        s
    }

    fn write(&self, s: &mut String, depth: usize) {
        let pad = |s: &mut String, d: usize| {
            for _ in 0..d {
                s.push_str("  ");
            }
        };
        match self {
            Json::Null => s.push_str("null"),
            Json::Num(v) if !v.is_finite() => s.push_str("null"),
            Json::Num(v) if v.fract() == 0.0 && v.abs() < 1e15 => {
                let _ = write!(s, "{}", *v as i64);
            }
            Json::Num(v) => {
                let _ = write!(s, "{v}");
            }
            Json::Str(v) => quote(s, v),
            Json::Arr(items) if items.is_empty() => s.push_str("[]"),
            Json::Arr(items) => {
                // Arrays of scalars stay on one line.
                let flat = items
                    .iter()
                    .all(|i| !matches!(i, Json::Arr(_) | Json::Obj(_)));
                s.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                        if flat {
                            s.push(' ');
                        }
                    }
                    if !flat {
                        s.push('\n');
                        pad(s, depth + 1);
                    }
                    item.write(s, depth + 1);
                }
                if !flat {
                    s.push('\n');
                    pad(s, depth);
                }
                s.push(']');
            }
            Json::Obj(fields) if fields.is_empty() => s.push_str("{}"),
            Json::Obj(fields) => {
                s.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push('\n');
                    pad(s, depth + 1);
                    quote(s, k);
                    s.push_str(": ");
                    v.write(s, depth + 1);
                }
                s.push('\n');
                pad(s, depth);
                s.push('}');
            }
        }
    }
}

fn quote(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

impl From<f64> for Json {
    fn from(v: f64) -> Json {
        Json::Num(v)
    }
}

impl From<u64> for Json {
    fn from(v: u64) -> Json {
        Json::Num(v as f64)
    }
}

impl From<usize> for Json {
    fn from(v: usize) -> Json {
        Json::Num(v as f64)
    }
}

impl From<&str> for Json {
    fn from(v: &str) -> Json {
        Json::Str(v.to_string())
    }
}

impl From<String> for Json {
    fn from(v: String) -> Json {
        Json::Str(v)
    }
}

impl From<Vec<Json>> for Json {
    fn from(v: Vec<Json>) -> Json {
        Json::Arr(v)
    }
}

impl<T: Into<Json>> From<Option<T>> for Json {
    fn from(v: Option<T>) -> Json {
        v.map_or(Json::Null, Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_prints_nested_values() {
        let j = Json::obj()
            .set("a", 1u64)
            .set("b", "x\"y\n")
            .set("c", vec![Json::Num(1.5), Json::Null])
            .set("d", Json::obj().set("e", f64::NAN))
            .set("f", vec![Json::obj()]);
        assert_eq!(
            j.pretty(),
            "{\n  \"a\": 1,\n  \"b\": \"x\\\"y\\n\",\n  \"c\": [1.5, null],\n  \"d\": {\n    \"e\": null\n  },\n  \"f\": [\n    {}\n  ]\n}\n"
        );
    }
}
