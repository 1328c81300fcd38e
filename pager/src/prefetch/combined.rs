//! `bubble+stride`: a detected stream gets the budget first (it knows the direction the
//! guest is heading); bubbling spends what is left, around the same faults.

use super::{Bubble, PrefetchPolicy, Stride};
use crate::page_state::PageStateTable;

/// Stride first, bubbling with the rest of the budget.
#[derive(Debug, Clone)]
pub struct BubbleStride {
    stride: Stride,
    bubble: Bubble,
    scratch: Vec<u64>,
}

impl BubbleStride {
    /// A policy for a VM of `pages` guest pages.
    pub fn new(pages: u64) -> Self {
        Self {
            stride: Stride::new(pages),
            bubble: Bubble::new(pages),
            scratch: Vec::new(),
        }
    }

    /// Append the bubble's offers in `scratch` that the stride did not already make.
    fn merge(&mut self, out: &mut Vec<u64>, stride_start: usize) {
        let stride_end = out.len();
        for &p in &self.scratch {
            if !out[stride_start..stride_end].contains(&p) {
                out.push(p);
            }
        }
        self.scratch.clear();
    }
}

impl PrefetchPolicy for BubbleStride {
    fn on_fault(&mut self, page: u64, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        let start = out.len();
        self.stride.on_fault(page, states, budget, out);
        let left = budget - (out.len() - start);
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
        "bubble+stride"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_state::PageState;
    use crate::prefetch::testutil::check_emitted;
    use proptest::prelude::*;

    #[test]
    fn stream_first_then_bubble() {
        let states = PageStateTable::new(1000, PageState::Missing);
        let mut p = BubbleStride::new(1000);
        let mut out = Vec::new();
        for page in [100, 101] {
            p.on_fault(page, &states, 0, &mut out);
            states.set(page, PageState::Present);
        }
        p.on_fault(102, &states, 12, &mut out);
        check_emitted(&out, &states, 12, Some(102));
        assert_eq!(&out[..8], &(103..111).collect::<Vec<_>>()[..]);
        // The bubble around 102 goes down first since its upward pages were taken.
        assert!(out[8..].iter().all(|&p| !(103..111).contains(&p)));
    }

    proptest! {
        #[test]
        fn offers_are_valid_and_idle_covers(
            faults in prop::collection::vec((0u64..300, 0usize..40), 1..40),
            budget in 1usize..40,
        ) {
            let states = PageStateTable::new(300, PageState::Missing);
            let mut p = BubbleStride::new(300);
            for (page, fb) in faults {
                let mut out = Vec::new();
                p.on_fault(page, &states, fb, &mut out);
                check_emitted(&out, &states, fb, Some(page));
                states.set(page, PageState::Present);
                for &q in &out { states.set(q, PageState::Present); }
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
