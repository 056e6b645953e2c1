// SPDX-License-Identifier: Apache-2.0
//! The small statistics every figure is reported with: median, min, max and the spread
//! `(max - min) / median` over repeated samples (warm-up samples are never passed in), and the
//! same of ratios of samples taken together.
//!
//! Kept here, not taken from a crate: it is a sort and three lookups over a handful of
//! samples. statrs 0.19, the well-kept crate with a median, would replace only the median
//! (through its quantile estimator), brings nalgebra and rand by default and needs a newer
//! Rust than the workspace's; criterion times its own closures and cannot summarise samples
//! taken elsewhere (a tap, a guest).

use serde::Serialize;

/// Summary of repeated samples of one quantity (in `latest.json` in this field order).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Median (mean of the two middle samples for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub n: usize,
    /// `(max - min) / median`, as a fraction (0.05 = 5 %); 0 when the median is 0.
    pub spread: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none or one is not finite.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let (min, max) = (sorted[0], sorted[n - 1]);
        let spread = if median == 0.0 {
            0.0
        } else {
            (max - min) / median.abs()
        };
        Some(Summary {
            median,
            min,
            max,
            n,
            spread,
        })
    }
}

/// The ratio of two summaries' medians, with the range of ratios that paired samples gave.
/// `pairs` are (numerator, denominator) samples taken together (same repetition).
pub fn paired_ratio(pairs: &[(f64, f64)]) -> Option<Summary> {
    let ratios: Vec<f64> = pairs
        .iter()
        .filter(|(_, d)| *d != 0.0)
        .map(|(n, d)| n / d)
        .collect();
    Summary::of(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 3.0, 1.0, 5.0));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn spread_is_range_over_median() {
        let s = Summary::of(&[9.0, 10.0, 11.0]).unwrap();
        assert!((s.spread - 0.2).abs() < 1e-12);
        assert_eq!(Summary::of(&[0.0, 0.0]).unwrap().spread, 0.0);
    }

    #[test]
    fn nothing_to_summarise() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn paired_ratio_skips_zero_denominators() {
        let r = paired_ratio(&[(8.0, 10.0), (9.0, 10.0), (1.0, 0.0)]).unwrap();
        assert_eq!(r.n, 2);
        assert!((r.median - 0.85).abs() < 1e-12);
    }
}
