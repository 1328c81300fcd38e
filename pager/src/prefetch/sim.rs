//! A pure simulator: replay an access trace against a policy and count what reached the
//! device.
//!
//! Model: every page starts absent (`Missing`). An access to an absent page is a *demand
//! fault*: the page and the policy's `on_fault` offers (up to `fault_budget`) are fetched at
//! once. Between accesses the fetcher has background capacity: every `idle_every` accesses
//! it asks `on_idle` for up to `idle_budget` pages, which arrive at once as well. Latency is
//! not modelled; what matters here is how many accesses had to wait for the device and how
//! many fetched pages were never used.

use super::PrefetchPolicy;
use crate::page_state::{PageState, PageStateTable};

/// Fetcher capacities for [`simulate`].
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Pages offered with a demand fault (besides the faulting page).
    pub fault_budget: usize,
    /// Pages fetched in the background per idle slot.
    pub idle_budget: usize,
    /// Accesses between idle slots (0: no background fetching).
    pub idle_every: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            fault_budget: 64,
            idle_budget: 16,
            idle_every: 8,
        }
    }
}

/// What a trace cost under one policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SimReport {
    pub policy: &'static str,
    pub accesses: u64,
    /// Distinct pages the trace touched.
    pub pages_touched: u64,
    /// Accesses that found their page absent and waited for the device.
    pub demand_faults: u64,
    /// Pages fetched because a policy offered them.
    pub prefetched: u64,
    /// Prefetched pages the trace never touched afterwards.
    pub prefetched_unused: u64,
}

impl SimReport {
    /// Demand faults as a share of pages touched (1.0 = every page waited).
    pub fn fault_share(&self) -> f64 {
        if self.pages_touched == 0 {
            0.0
        } else {
            self.demand_faults as f64 / self.pages_touched as f64
        }
    }
}

/// Replay `trace` (guest page indexes, each `< pages`) against `policy`.
pub fn simulate(
    policy: &mut dyn PrefetchPolicy,
    pages: u64,
    trace: impl IntoIterator<Item = u64>,
    cfg: SimConfig,
) -> SimReport {
    let states = PageStateTable::new(pages as usize, PageState::Missing);
    // Per page: fetched by prefetch and not yet touched.
    let mut speculative = vec![false; pages as usize];
    let mut touched = vec![false; pages as usize];
    let mut report = SimReport {
        policy: policy.name(),
        accesses: 0,
        pages_touched: 0,
        demand_faults: 0,
        prefetched: 0,
        prefetched_unused: 0,
    };
    let mut offers = Vec::new();
    let fetch = |offers: &mut Vec<u64>, speculative: &mut [bool], report: &mut SimReport| {
        for &p in offers.iter() {
            states.set(p, PageState::Present);
            speculative[p as usize] = true;
        }
        report.prefetched += offers.len() as u64;
        offers.clear();
    };
    for page in trace {
        assert!(page < pages, "trace page {page} outside {pages} pages");
        report.accesses += 1;
        if !touched[page as usize] {
            touched[page as usize] = true;
            report.pages_touched += 1;
        }
        speculative[page as usize] = false;
        if states.get(page).is_absent() {
            report.demand_faults += 1;
            states.set(page, PageState::InFlight);
            policy.on_fault(page, &states, cfg.fault_budget, &mut offers);
            states.set(page, PageState::Present);
            fetch(&mut offers, &mut speculative, &mut report);
        }
        if cfg.idle_every > 0 && report.accesses.is_multiple_of(cfg.idle_every) {
            policy.on_idle(&states, cfg.idle_budget, &mut offers);
            fetch(&mut offers, &mut speculative, &mut report);
        }
    }
    report.prefetched_unused = speculative.iter().filter(|&&s| s).count() as u64;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefetch::by_name;

    fn run(name: &str, pages: u64, trace: &[u64], cfg: SimConfig) -> SimReport {
        let mut p = by_name(name, pages).unwrap();
        simulate(p.as_mut(), pages, trace.iter().copied(), cfg)
    }

    #[test]
    fn none_faults_on_every_new_page() {
        let trace: Vec<u64> = (0..100).chain(0..100).collect();
        let r = run("none", 100, &trace, SimConfig::default());
        assert_eq!(r.demand_faults, 100);
        assert_eq!(r.pages_touched, 100);
        assert_eq!(r.prefetched, 0);
        assert_eq!(r.fault_share(), 1.0);
    }

    #[test]
    fn sequential_scan_needs_few_faults_with_stride_and_bubble() {
        let trace: Vec<u64> = (0..4096).collect();
        let cfg = SimConfig::default();
        for name in ["stride", "bubble", "bubble+stride"] {
            let r = run(name, 4096, &trace, cfg);
            assert!(
                r.fault_share() < 0.05,
                "{name}: {} faults for {} pages",
                r.demand_faults,
                r.pages_touched
            );
        }
    }

    #[test]
    fn unused_prefetch_is_counted() {
        // Touch only the first page of each 100: bubbling fetches neighbours never used.
        let trace: Vec<u64> = (0..10).map(|i| i * 100).collect();
        let cfg = SimConfig {
            fault_budget: 4,
            idle_budget: 0,
            idle_every: 0,
        };
        let r = run("bubble", 1000, &trace, cfg);
        assert_eq!(r.demand_faults, 10);
        assert_eq!(r.prefetched, r.prefetched_unused);
        assert!(r.prefetched >= 36);
    }
}
