//! Access patterns over a range of pages: sequential, uniform random, Zipf, hot/cold.
//!
//! Each thread gets its own [`PageStream`]; sequential scans split the range into one
//! contiguous slice per thread. Streams are deterministic given (pattern, seed, thread).

use std::str::FromStr;
use std::sync::Arc;

/// A small, fast, deterministic generator (xorshift64* seeded through splitmix64).
#[derive(Debug, Clone)]
pub struct Rng64(u64);

impl Rng64 {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Which pages an access stream visits.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// Each thread scans its slice in order, pass after pass.
    Sequential,
    /// Uniform over the whole range.
    Random,
    /// Zipf over the range with exponent `theta` (0.99 is YCSB's), ranks scattered.
    Zipf { theta: f64 },
    /// `hot_share` of accesses go to the first `hot_pages` pages, the rest uniform.
    HotCold { hot_pages: u64, hot_share: f64 },
}

impl FromStr for Pattern {
    type Err = String;

    /// `seq`, `random`, `zipf[:THETA]`, `hotcold:HOT_PAGES[:SHARE]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or("");
        let num = |p: Option<&str>, what: &str, default: Option<f64>| -> Result<f64, String> {
            match (p, default) {
                (Some(v), _) => v
                    .parse::<f64>()
                    .map_err(|_| format!("pattern {s:?}: {what} {v:?} is not a number")),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(format!("pattern {s:?}: missing {what}")),
            }
        };
        let pat = match kind {
            "seq" | "sequential" => Pattern::Sequential,
            "random" | "uniform" => Pattern::Random,
            "zipf" => {
                let theta = num(parts.next(), "theta", Some(0.99))?;
                if !(theta > 0.0 && theta < 10.0) {
                    return Err(format!("pattern {s:?}: theta must be in (0, 10)"));
                }
                Pattern::Zipf { theta }
            }
            "hotcold" => {
                let hot = num(parts.next(), "hot page count", None)?;
                let share = num(parts.next(), "hot share", Some(0.9))?;
                if hot < 1.0 || hot.fract() != 0.0 {
                    return Err(format!("pattern {s:?}: hot page count must be a positive integer"));
                }
                if !(0.0..=1.0).contains(&share) {
                    return Err(format!("pattern {s:?}: hot share must be in [0, 1]"));
                }
                Pattern::HotCold {
                    hot_pages: hot as u64,
                    hot_share: share,
                }
            }
            _ => {
                return Err(format!(
                    "unknown pattern {s:?}: expected seq, random, zipf[:THETA] or hotcold:HOT_PAGES[:SHARE]"
                ))
            }
        };
        if parts.next().is_some() {
            return Err(format!("pattern {s:?}: too many ':' fields"));
        }
        Ok(pat)
    }
}

/// Cumulative Zipf weights over ranks `0..n`, shared by all threads.
#[derive(Debug)]
pub struct ZipfTable {
    cdf: Vec<f64>,
    /// Rank → page scattering: `page = rank * mult % n` (mult coprime with n).
    mult: u64,
}

impl ZipfTable {
    pub fn new(n: u64, theta: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut sum = 0.0;
        for rank in 1..=n {
            sum += 1.0 / (rank as f64).powf(theta);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let mut mult = ((n as f64 * 0.618_033_988_7) as u64) | 1;
        while n > 1 && gcd(mult, n) != 1 {
            mult += 2;
        }
        Self { cdf, mult }
    }

    fn sample(&self, rng: &mut Rng64) -> u64 {
        let u = rng.unit();
        let rank = self.cdf.partition_point(|&c| c < u) as u64;
        let n = self.cdf.len() as u64;
        (rank.min(n - 1) as u128 * self.mult as u128 % n as u128) as u64
    }
}

/// One thread's sequence of page indexes.
#[derive(Debug)]
pub struct PageStream {
    pages: u64,
    kind: StreamKind,
    rng: Rng64,
}

#[derive(Debug)]
enum StreamKind {
    Sequential { start: u64, len: u64, pos: u64 },
    Random,
    Zipf(Arc<ZipfTable>),
    HotCold { hot: u64, share: f64 },
}

impl PageStream {
    /// Thread `thread` of `threads` over `pages` pages. `zipf` must be given for Zipf.
    pub fn new(
        pattern: &Pattern,
        pages: u64,
        thread: u64,
        threads: u64,
        seed: u64,
        zipf: Option<Arc<ZipfTable>>,
    ) -> Self {
        let kind = match pattern {
            Pattern::Sequential => {
                let start = pages * thread / threads;
                let end = pages * (thread + 1) / threads;
                StreamKind::Sequential {
                    start,
                    len: end - start,
                    pos: 0,
                }
            }
            Pattern::Random => StreamKind::Random,
            Pattern::Zipf { .. } => StreamKind::Zipf(zipf.expect("zipf table for a zipf pattern")),
            Pattern::HotCold {
                hot_pages,
                hot_share,
            } => StreamKind::HotCold {
                hot: (*hot_pages).min(pages),
                share: *hot_share,
            },
        };
        Self {
            pages,
            kind,
            rng: Rng64::new(seed ^ (thread + 1).wrapping_mul(0xA24B_AED4_963E_E407)),
        }
    }

    /// Accesses in one pass for this thread (its slice for sequential, pages/threads else).
    pub fn pass_len(&self, threads: u64) -> u64 {
        match &self.kind {
            StreamKind::Sequential { len, .. } => *len,
            _ => self.pages / threads,
        }
    }

    pub fn next_page(&mut self) -> u64 {
        match &mut self.kind {
            StreamKind::Sequential { start, len, pos } => {
                let p = *start + *pos;
                *pos = if *pos + 1 >= *len { 0 } else { *pos + 1 };
                p
            }
            StreamKind::Random => self.rng.below(self.pages),
            StreamKind::Zipf(t) => t.sample(&mut self.rng),
            StreamKind::HotCold { hot, share } => {
                if *hot == self.pages || self.rng.unit() < *share {
                    self.rng.below(*hot)
                } else {
                    *hot + self.rng.below(self.pages - *hot)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_patterns_and_names_bad_ones() {
        assert_eq!("seq".parse::<Pattern>().unwrap(), Pattern::Sequential);
        assert_eq!(
            "zipf".parse::<Pattern>().unwrap(),
            Pattern::Zipf { theta: 0.99 }
        );
        assert_eq!(
            "hotcold:100:0.8".parse::<Pattern>().unwrap(),
            Pattern::HotCold {
                hot_pages: 100,
                hot_share: 0.8
            }
        );
        for bad in [
            "",
            "zipf:x",
            "zipf:-1",
            "hotcold",
            "hotcold:1.5",
            "seq:1",
            "walk",
        ] {
            let e = bad.parse::<Pattern>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn sequential_threads_split_the_range() {
        let mut seen = [0u32; 10];
        for t in 0..3 {
            let mut s = PageStream::new(&Pattern::Sequential, 10, t, 3, 1, None);
            for _ in 0..s.pass_len(3) {
                seen[s.next_page() as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let table = Arc::new(ZipfTable::new(1000, 0.99));
        let pat = Pattern::Zipf { theta: 0.99 };
        let mut s = PageStream::new(&pat, 1000, 0, 1, 5, Some(table));
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[s.next_page() as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top10: u32 = counts[..10].iter().sum();
        // Zipf 0.99 over 1000 ranks puts ~39% of accesses on the top 10.
        assert!(top10 > 30_000 && top10 < 50_000, "top10 {top10}");
    }

    #[test]
    fn hotcold_respects_the_share() {
        let pat = Pattern::HotCold {
            hot_pages: 10,
            hot_share: 0.9,
        };
        let mut s = PageStream::new(&pat, 1000, 0, 1, 5, None);
        let hot = (0..10_000).filter(|_| s.next_page() < 10).count();
        assert!((8_700..9_300).contains(&hot), "hot {hot}");
    }
}
