//! `adaptive`, the default: stride when the faults stride, bubbling around them otherwise,
//! and a background push of every page still absent while the loop is idle.
//!
//! * On a demand fault the stride detector looks first. When the fault continues (or
//!   starts) a stream, the whole budget goes along it: bubbling around a sequential reader
//!   would mostly offer pages behind it. Otherwise the budget bubbles around the fault.
//!   Either way the bubble learns the fault as a pivot, so idle push grows from where the
//!   guest is working.
//! * When idle, live streams read ahead first, then the bubbles grow outward, and once they
//!   cover the range the bubble's sweep offers any page still absent: the whole image is
//!   pushed while the guest does not ask for something else.
//!
//! Demand reads always go out first: the fault loop tags them ahead of prefetch and push
//! (see `FetchReason`), and a demand fault is handled before the next idle round.

use super::{Bubble, PrefetchPolicy, Stride};
use crate::page_state::PageStateTable;

/// Stride or bubble on faults, read-ahead + bubble + sweep when idle.
#[derive(Debug, Clone)]
pub struct Adaptive {
    stride: Stride,
    bubble: Bubble,
    scratch: Vec<u64>,
    /// Demand faults that continued a stream / that bubbled (for tests and logs).
    streamed: u64,
    bubbled: u64,
}

impl Adaptive {
    /// A policy for a VM of `pages` guest pages.
    pub fn new(pages: u64) -> Self {
        Self {
            stride: Stride::new(pages),
            bubble: Bubble::new(pages),
            scratch: Vec::new(),
            streamed: 0,
            bubbled: 0,
        }
    }

    /// Faults answered along a stream and faults answered by bubbling, so far.
    pub fn decisions(&self) -> (u64, u64) {
        (self.streamed, self.bubbled)
    }

    /// Append the bubble's offers in `scratch` that `out[from..]` does not already hold.
    fn merge(&mut self, out: &mut Vec<u64>, from: usize) {
        let end = out.len();
        for &p in &self.scratch {
            if !out[from..end].contains(&p) {
                out.push(p);
            }
        }
        self.scratch.clear();
    }
}

impl PrefetchPolicy for Adaptive {
    fn on_fault(&mut self, page: u64, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        let start = out.len();
        self.stride.on_fault(page, states, budget, out);
        let along_stream = out.len() > start;
        // A budget of 0 still records the fault as a pivot for idle push.
        let left = if along_stream { 0 } else { budget };
        if along_stream {
            self.streamed += 1;
        } else {
            self.bubbled += 1;
        }
        self.scratch.clear();
        self.bubble.on_fault(page, states, left, &mut self.scratch);
        self.merge(out, start);
    }

    fn on_idle(&mut self, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        let start = out.len();
        self.stride.on_idle(states, budget, out);
        let left = budget - (out.len() - start);
        self.scratch.clear();
        self.bubble.on_idle(states, left, &mut self.scratch);
        self.merge(out, start);
    }

    fn name(&self) -> &'static str {
        "adaptive"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_state::PageState;
    use crate::prefetch::sim::{simulate, SimConfig};
    use crate::prefetch::testutil::check_emitted;
    use crate::prefetch::NoPrefetch;
    use proptest::prelude::*;

    fn fault(p: &mut Adaptive, states: &PageStateTable, page: u64, budget: usize) -> Vec<u64> {
        let mut out = Vec::new();
        p.on_fault(page, states, budget, &mut out);
        check_emitted(&out, states, budget, Some(page));
        states.set(page, PageState::Present);
        for &q in &out {
            states.set(q, PageState::Present);
        }
        out
    }

    #[test]
    fn a_stream_gets_the_whole_budget_ahead() {
        let states = PageStateTable::new(10_000, PageState::Missing);
        let mut p = Adaptive::new(10_000);
        // Two faults before a stream exists: they bubble.
        let first = fault(&mut p, &states, 100, 4);
        assert_eq!(first.len(), 4);
        // 98..=102 are present now; 103, 104, 105 are evenly spaced: a stream from 105 on.
        fault(&mut p, &states, 103, 0);
        fault(&mut p, &states, 104, 0);
        let out = fault(&mut p, &states, 105, 16);
        assert!(!out.is_empty());
        assert!(
            out.iter().all(|&q| q > 105),
            "a stream offers only pages ahead: {out:?}"
        );
        assert!(p.decisions().0 >= 1, "{:?}", p.decisions());
    }

    #[test]
    fn scattered_faults_bubble() {
        let states = PageStateTable::new(100_000, PageState::Missing);
        let mut p = Adaptive::new(100_000);
        for page in [5u64, 9000, 123, 77_000, 4242, 31_337] {
            let out = fault(&mut p, &states, page, 8);
            assert_eq!(out.len(), 8, "bubbling around {page}");
            assert!(out.iter().all(|&q| q.abs_diff(page) <= 8), "{out:?}");
        }
        assert_eq!(p.decisions(), (0, 6));
    }

    #[test]
    fn fewer_waits_than_one_page_per_fault_on_every_pattern() {
        let pages = 20_000u64;
        let sequential: Vec<u64> = (0..pages).collect();
        // A fixed LCG: uniform random first touches, reproducible.
        let mut x = 12345u64;
        let random: Vec<u64> = (0..pages)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) % pages
            })
            .collect();
        for (name, trace) in [("sequential", sequential), ("random", random)] {
            let cfg = SimConfig::default();
            let none = simulate(&mut NoPrefetch, pages, trace.iter().copied(), cfg);
            let ours = simulate(&mut Adaptive::new(pages), pages, trace.iter().copied(), cfg);
            assert!(
                ours.demand_faults * 3 < none.demand_faults,
                "{name}: adaptive {} waits vs none {}",
                ours.demand_faults,
                none.demand_faults
            );
        }
    }

    proptest! {
        #[test]
        fn offers_are_valid_and_idle_pushes_everything(
            faults in prop::collection::vec((0u64..300, 0usize..40), 1..40),
            budget in 1usize..40,
        ) {
            let states = PageStateTable::new(300, PageState::Missing);
            let mut p = Adaptive::new(300);
            for (page, fb) in faults {
                fault(&mut p, &states, page, fb);
            }
            for _ in 0..(2 * 300 / budget + 50) {
                let mut out = Vec::new();
                p.on_idle(&states, budget, &mut out);
                check_emitted(&out, &states, budget, None);
                for &q in &out { states.set(q, PageState::Present); }
            }
            prop_assert_eq!(states.count(PageState::Missing), 0);
        }
    }
}
