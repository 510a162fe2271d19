//! Summaries of repeated measurements, ratios to the baseline, and when a
//! comparison is inconclusive.

use serde::{Deserialize, Serialize};

/// Median and range of one series of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    /// `None` for an empty series or one containing NaN.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
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
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            count: n,
        })
    }

    /// Range as a fraction of the median (0.1 = ±5 % around it, roughly).
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }
}

/// How a configuration compares with the baseline on one metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Median of the configuration divided by the median of the baseline.
    pub ratio: f64,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Better,
    Worse,
    /// The two ranges overlap: the spread is too large to tell them apart.
    Inconclusive,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Better => "better",
            Self::Worse => "worse",
            Self::Inconclusive => "inconclusive (ranges overlap)",
        }
    }
}

/// Compares `candidate` with `baseline`.
///
/// The verdict is inconclusive whenever the min–max ranges overlap: with a
/// handful of repetitions that is the honest test of "the difference is
/// bigger than the noise". `None` when the baseline median is zero.
pub fn compare(
    candidate: &Summary,
    baseline: &Summary,
    higher_is_better: bool,
) -> Option<Comparison> {
    if baseline.median == 0.0 {
        return None;
    }
    let ratio = candidate.median / baseline.median;
    let overlap = candidate.min <= baseline.max && baseline.min <= candidate.max;
    let verdict = if overlap {
        Verdict::Inconclusive
    } else if (candidate.median > baseline.median) == higher_is_better {
        Verdict::Better
    } else {
        Verdict::Worse
    };
    Some(Comparison { ratio, verdict })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_series() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        let s = Summary::of(&[5.0, 1.0, 9.0]).unwrap();
        assert_eq!((s.min, s.max, s.count), (1.0, 9.0, 3));
    }

    #[test]
    fn empty_or_nan_series_has_no_summary() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn spread_is_range_over_median() {
        let s = Summary::of(&[9.0, 10.0, 11.0]).unwrap();
        assert!((s.spread() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn ratio_and_verdict_respect_direction() {
        let baseline = Summary::of(&[10.0, 10.5, 11.0]).unwrap();
        let faster = Summary::of(&[20.0, 21.0, 22.0]).unwrap();
        let c = compare(&faster, &baseline, true).unwrap();
        assert!((c.ratio - 2.0).abs() < 1e-12);
        assert_eq!(c.verdict, Verdict::Better);
        // For latency, higher is worse.
        assert_eq!(
            compare(&faster, &baseline, false).unwrap().verdict,
            Verdict::Worse
        );
    }

    #[test]
    fn overlapping_ranges_are_inconclusive() {
        let baseline = Summary::of(&[10.0, 12.0, 14.0]).unwrap();
        let similar = Summary::of(&[13.0, 15.0, 17.0]).unwrap();
        assert_eq!(
            compare(&similar, &baseline, true).unwrap().verdict,
            Verdict::Inconclusive
        );
    }

    #[test]
    fn zero_baseline_has_no_ratio() {
        let zero = Summary::of(&[0.0]).unwrap();
        let some = Summary::of(&[1.0]).unwrap();
        assert!(compare(&some, &zero, true).is_none());
    }
}
