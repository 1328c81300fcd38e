//! A lock-free latency histogram with power-of-two microsecond buckets (like QEMU's
//! postcopy-latency-dist): bucket `i` counts samples in `[2^(i-1), 2^i)` µs, bucket 0 counts
//! samples under 1 µs, the last bucket everything above.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Number of buckets: up to 2^30 µs (~18 minutes) and one overflow bucket.
pub const BUCKETS: usize = 32;

#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// Bucket index for `us` microseconds.
pub fn bucket_of(us: u64) -> usize {
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

/// Upper bound (exclusive, µs) of bucket `i`; the last bucket is open-ended.
pub fn bucket_upper_us(i: usize) -> u64 {
    1u64 << i
}

impl LatencyHistogram {
    pub fn record_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns / 1000)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a histogram's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Counts per bucket (see module docs for the bounds).
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile (0..=1) as the upper bound of the bucket holding it, in µs; `None`
    /// with no samples. Bucket resolution: the true value is within a factor of 2 below.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper_us(i));
            }
        }
        None
    }

    pub fn mean_us(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns as f64 / n as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(4), 3);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.snapshot().quantile_us(0.5), None);
        for _ in 0..98 {
            h.record_ns(10_000); // 10 µs -> bucket [8,16)
        }
        h.record_ns(1_000_000); // 1 ms -> [512,1024)
        h.record_ns(1_000_000);
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile_us(0.5), Some(16));
        assert_eq!(s.quantile_us(0.98), Some(16));
        assert_eq!(s.quantile_us(0.99), Some(1024));
        assert!((s.mean_us().unwrap() - 29.8).abs() < 0.01);
    }
}
