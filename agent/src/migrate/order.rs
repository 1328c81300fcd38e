//! The order of a pre-copy round's pages. `address`: ascending page number. `microwiper`
//! (Du et al., ICPP'10): memory in stripes of [`STRIPE_PAGES`] pages, each with a rewrite
//! rate learnt from the rounds so far (pages of the stripe written during a round / the
//! round's seconds, smoothed over rounds); a round sends its pages in ascending rate and
//! ends as soon as the summed rate of the stripes it sent exceeds the measured bandwidth:
//! what it sent is then being rewritten faster than the link moves pages, so the hotter
//! rest waits (still dirty) for the next round or for the pause, and crosses once.

use std::collections::HashMap;

/// Pages per stripe (the paper's choice for small guests: 32 pages for 128 MiB).
pub const STRIPE_PAGES: u64 = 32;
/// Weight of the newest round in a stripe's rate.
const ALPHA: f64 = 0.5;

/// How a round orders its pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Address,
    Microwiper,
}

impl std::str::FromStr for Order {
    type Err = UnknownOrder;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "address" => Ok(Order::Address),
            "microwiper" => Ok(Order::Microwiper),
            other => Err(UnknownOrder(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown page order {0:?} (known: address, microwiper)")]
pub struct UnknownOrder(pub String);

/// Rewrite rates per stripe, in pages per second.
#[derive(Debug, Default)]
pub struct StripeRates {
    rates: HashMap<u64, f64>,
}

impl StripeRates {
    /// A round of `secs` ended; `dirty` are the pages written during it.
    pub fn learn(&mut self, dirty: &[u64], secs: f64) {
        if secs <= 0.0 {
            return;
        }
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for &p in dirty {
            *counts.entry(p / STRIPE_PAGES).or_default() += 1;
        }
        // Stripes not written this round cool down.
        for (stripe, rate) in self.rates.iter_mut() {
            if !counts.contains_key(stripe) {
                *rate *= 1.0 - ALPHA;
            }
        }
        self.rates.retain(|_, r| *r > 1e-3);
        for (stripe, n) in counts {
            let now = n as f64 / secs;
            let r = self.rates.entry(stripe).or_insert(now);
            *r += ALPHA * (now - *r);
        }
    }

    pub fn rate(&self, page: u64) -> f64 {
        self.rates
            .get(&(page / STRIPE_PAGES))
            .copied()
            .unwrap_or(0.0)
    }

    /// Order `pages` coolest stripe first (address order within a rate) and say how many of
    /// them the round sends: it stops before the page whose stripe takes the summed rate
    /// of the stripes sent past `bandwidth` (bytes/s). At least one page is sent.
    pub fn plan(&self, pages: &mut [u64], page_size: usize, bandwidth: f64) -> usize {
        pages.sort_by(|a, b| self.rate(*a).total_cmp(&self.rate(*b)).then(a.cmp(b)));
        if bandwidth <= 0.0 {
            return pages.len();
        }
        let mut summed = 0.0;
        let mut last_stripe = None;
        for (i, &p) in pages.iter().enumerate() {
            let stripe = p / STRIPE_PAGES;
            if last_stripe != Some(stripe) {
                summed += self.rate(p) * page_size as f64;
                last_stripe = Some(stripe);
                if summed > bandwidth && i > 0 {
                    return i;
                }
            }
        }
        pages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_cool_stripes_first_and_stops_where_the_sent_ones_outrun_the_link() {
        let mut r = StripeRates::default();
        // Stripe 0: 32 pages per second; stripe 2: 4; stripe 5: never written.
        let mut dirty: Vec<u64> = (0..32).collect();
        dirty.extend(64..68);
        r.learn(&dirty, 1.0);
        assert_eq!(r.rate(3), 32.0);
        assert_eq!(r.rate(65), 4.0);
        assert_eq!(r.rate(160), 0.0);
        let mut pages = vec![1, 2, 65, 160, 66];
        // 4 KiB pages: stripe 2 is 16 KiB/s, stripe 0 128 KiB/s; the link 100 KiB/s.
        let n = r.plan(&mut pages, 4096, 100.0 * 1024.0);
        assert_eq!(pages, vec![160, 65, 66, 1, 2]);
        assert_eq!(n, 3, "stripe 0 would take the sum past the bandwidth");
        assert_eq!(r.plan(&mut pages, 4096, 1e9), 5, "a fast link sends all");
        // A round without writes to stripe 0 halves its rate.
        r.learn(&[64], 1.0);
        assert_eq!(r.rate(0), 16.0);
        assert_eq!("microwiper".parse::<Order>().unwrap(), Order::Microwiper);
        assert!("random"
            .parse::<Order>()
            .unwrap_err()
            .to_string()
            .contains("address, microwiper"));
    }
}
