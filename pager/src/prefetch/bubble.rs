//! Bubbling (Hines et al., "Post-copy based live VM migration", VEE'09).
//!
//! Each recent fault is a *pivot*; a bubble grows outward from it, one page down, one page
//! up, alternately. Several bubbles live at once (the latest [`MAX_PIVOTS`] faults far from
//! each other); spare capacity is shared round-robin across them, most recent first. A fault
//! inside a bubble's span promotes that bubble instead of starting a new one. A bubble that
//! reaches another bubble's span jumps over it, so bubbles merge and no page is offered twice
//! in one call. When every bubble has covered the whole range, a sweep cursor offers any
//! page still absent (pages in the span of a retired bubble, pages the fetcher declined), so
//! `on_idle` eventually brings in every absent page.

use std::collections::VecDeque;

use super::{wanted, PrefetchPolicy};
use crate::page_state::PageStateTable;

/// Most bubbles alive at once; a new far fault retires the oldest.
pub const MAX_PIVOTS: usize = 4;
/// Most pages one call examines (wanted or not), to bound the time spent per call.
pub const MAX_EXAMINED_PER_CALL: u64 = 16 * 1024;

/// One bubble: it has covered `[down + 1, up)` (all of `[0, up)` when `down` is `None`).
#[derive(Debug, Clone)]
struct Span {
    /// Next page to consider below the span; `None` once page 0 is covered.
    down: Option<u64>,
    /// Next page to consider above the span; `pages` once the top is covered.
    up: u64,
    /// Which direction the next step takes (alternates while both are open).
    step_up: bool,
}

impl Span {
    fn around(page: u64) -> Self {
        Self {
            down: page.checked_sub(1),
            up: page + 1,
            step_up: true,
        }
    }

    fn start(&self) -> u64 {
        self.down.map_or(0, |d| d + 1)
    }

    fn contains(&self, page: u64) -> bool {
        self.start() <= page && page < self.up
    }

    fn exhausted(&self, pages: u64) -> bool {
        self.down.is_none() && self.up >= pages
    }
}

/// What one step of a bubble found.
enum Step {
    Emit(u64),
    Skipped,
    Exhausted,
}

/// The background sweep that guarantees coverage once the bubbles are done.
#[derive(Debug, Clone, Default)]
struct Sweep {
    cursor: u64,
    /// Pages examined since the sweep last found a wanted page.
    clean_run: u64,
}

/// Hines' bubbling with several pivots and a coverage sweep.
#[derive(Debug, Clone)]
pub struct Bubble {
    pages: u64,
    /// Front = most recent pivot.
    spans: VecDeque<Span>,
    /// Round-robin position for `on_idle`.
    next: usize,
    sweep: Sweep,
}

impl Bubble {
    /// A policy for a VM of `pages` guest pages.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            spans: VecDeque::with_capacity(MAX_PIVOTS + 1),
            next: 0,
            // Nothing is known to be absent until the first fault.
            sweep: Sweep {
                cursor: 0,
                clean_run: pages,
            },
        }
    }

    /// The span (other than `skip`) containing `page`, if any.
    fn covering(&self, page: u64, skip: usize) -> Option<usize> {
        (0..self.spans.len()).find(|&j| j != skip && self.spans[j].contains(page))
    }

    /// Advance bubble `i` by one page in its next direction.
    fn step(&mut self, i: usize, states: &PageStateTable) -> Step {
        let pages = self.pages;
        let span = &self.spans[i];
        if span.exhausted(pages) {
            return Step::Exhausted;
        }
        let go_up = span.up < pages && (span.step_up || span.down.is_none());
        if go_up {
            let p = span.up;
            if let Some(j) = self.covering(p, i) {
                let end = self.spans[j].up;
                let span = &mut self.spans[i];
                span.up = end;
                span.step_up = false;
                return Step::Skipped;
            }
            let span = &mut self.spans[i];
            span.up = p + 1;
            span.step_up = false;
            if wanted(states, p) {
                Step::Emit(p)
            } else {
                Step::Skipped
            }
        } else {
            let p = span.down.expect("down open when not going up");
            if let Some(j) = self.covering(p, i) {
                let below = self.spans[j].down;
                let span = &mut self.spans[i];
                span.down = below;
                span.step_up = true;
                return Step::Skipped;
            }
            let span = &mut self.spans[i];
            span.down = p.checked_sub(1);
            span.step_up = true;
            if wanted(states, p) {
                Step::Emit(p)
            } else {
                Step::Skipped
            }
        }
    }

    /// Offer absent pages from the sweep cursor onward (at most one wrap per call).
    fn sweep(&mut self, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        let limit = MAX_EXAMINED_PER_CALL.min(self.pages);
        let mut emitted = 0;
        let mut examined = 0;
        while emitted < budget && examined < limit && self.sweep.clean_run < self.pages {
            let p = self.sweep.cursor;
            self.sweep.cursor = if p + 1 == self.pages { 0 } else { p + 1 };
            examined += 1;
            if wanted(states, p) {
                out.push(p);
                emitted += 1;
                self.sweep.clean_run = 0;
            } else {
                self.sweep.clean_run += 1;
            }
        }
    }
}

impl PrefetchPolicy for Bubble {
    fn on_fault(&mut self, page: u64, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        if page >= self.pages {
            return;
        }
        // A fault means absent pages exist again: let the sweep look once more.
        self.sweep.clean_run = 0;
        match self.covering(page, usize::MAX) {
            Some(j) => {
                let span = self.spans.remove(j).expect("index from covering");
                self.spans.push_front(span);
            }
            None => {
                self.spans.push_front(Span::around(page));
                self.spans.truncate(MAX_PIVOTS);
            }
        }
        let mut emitted = 0;
        let mut examined = 0;
        while emitted < budget && examined < MAX_EXAMINED_PER_CALL {
            examined += 1;
            match self.step(0, states) {
                Step::Emit(p) => {
                    out.push(p);
                    emitted += 1;
                }
                Step::Skipped => {}
                Step::Exhausted => break,
            }
        }
    }

    fn on_idle(&mut self, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        // Drop finished bubbles first (never mid-call: their spans keep this call's
        // offers unique).
        let pages = self.pages;
        self.spans.retain(|s| !s.exhausted(pages));
        if self.spans.is_empty() {
            // Only the sweep offers pages in this call, so it cannot repeat a bubble's.
            self.sweep(states, budget, out);
            return;
        }
        let mut emitted = 0;
        let mut examined = 0;
        while emitted < budget && examined < MAX_EXAMINED_PER_CALL {
            if self.spans.iter().all(|s| s.exhausted(pages)) {
                break;
            }
            let i = self.next % self.spans.len();
            examined += 1;
            match self.step(i, states) {
                Step::Emit(p) => {
                    out.push(p);
                    emitted += 1;
                    self.next = i + 1;
                }
                Step::Exhausted => self.next = i + 1,
                // Keep stepping the same bubble until it offers a page: round-robin is
                // over offers, not over pages examined.
                Step::Skipped => {}
            }
        }
    }

    fn name(&self) -> &'static str {
        "bubble"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_state::PageState;
    use crate::prefetch::testutil::check_emitted;
    use proptest::prelude::*;

    fn mark(states: &PageStateTable, pages: &[u64]) {
        for &p in pages {
            states.set(p, PageState::Present);
        }
    }

    #[test]
    fn burst_grows_around_the_fault() {
        let states = PageStateTable::new(100, PageState::Missing);
        let mut b = Bubble::new(100);
        let mut out = Vec::new();
        states.set(50, PageState::InFlight);
        b.on_fault(50, &states, 4, &mut out);
        assert_eq!(out, [51, 49, 52, 48]);
    }

    #[test]
    fn skips_present_inflight_and_removed() {
        let states = PageStateTable::new(20, PageState::Missing);
        states.set(11, PageState::Present);
        states.set(9, PageState::Removed);
        states.set(12, PageState::InFlight);
        states.set(8, PageState::Evicted);
        let mut b = Bubble::new(20);
        let mut out = Vec::new();
        b.on_fault(10, &states, 3, &mut out);
        assert_eq!(out, [8, 13, 7]);
    }

    #[test]
    fn idle_round_robins_across_pivots() {
        let states = PageStateTable::new(1000, PageState::Missing);
        let mut b = Bubble::new(1000);
        let mut out = Vec::new();
        b.on_fault(100, &states, 0, &mut out);
        b.on_fault(800, &states, 0, &mut out);
        assert!(out.is_empty());
        b.on_idle(&states, 4, &mut out);
        // Most recent pivot first, alternating pivots.
        assert_eq!(out, [801, 101, 799, 99]);
    }

    #[test]
    fn fault_inside_a_bubble_promotes_it() {
        let states = PageStateTable::new(1000, PageState::Missing);
        let mut b = Bubble::new(1000);
        let mut out = Vec::new();
        b.on_fault(100, &states, 4, &mut out);
        mark(&states, &out);
        b.on_fault(800, &states, 0, &mut out);
        out.clear();
        // 101 was offered by the first bubble: a fault there continues that bubble.
        b.on_fault(101, &states, 2, &mut out);
        assert_eq!(out, [103, 97]);
        assert_eq!(b.spans.len(), 2);
    }

    #[test]
    fn old_pivots_retire() {
        let states = PageStateTable::new(10_000, PageState::Missing);
        let mut b = Bubble::new(10_000);
        let mut out = Vec::new();
        for i in 0..10 {
            b.on_fault(i * 1000, &states, 1, &mut out);
        }
        assert_eq!(b.spans.len(), MAX_PIVOTS);
    }

    #[test]
    fn bubbles_merge_without_duplicates() {
        let states = PageStateTable::new(30, PageState::Missing);
        let mut b = Bubble::new(30);
        let mut out = Vec::new();
        b.on_fault(10, &states, 0, &mut out);
        b.on_fault(14, &states, 0, &mut out);
        b.on_idle(&states, 30, &mut out);
        check_emitted(&out, &states, 30, None);
        let mut all: Vec<u64> = out.clone();
        all.extend([10, 14]);
        all.sort_unstable();
        assert_eq!(all, (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn sweep_finds_pages_left_behind() {
        let states = PageStateTable::new(64, PageState::Missing);
        let mut b = Bubble::new(64);
        let mut out = Vec::new();
        b.on_fault(0, &states, 64, &mut out);
        assert_eq!(out.len(), 63);
        // The fetcher declined two of them: they are still Missing.
        for &p in &out {
            if p != 5 && p != 40 {
                states.set(p, PageState::Present);
            }
        }
        states.set(0, PageState::Present);
        out.clear();
        b.on_idle(&states, 8, &mut out);
        assert_eq!(out, [5, 40]);
        mark(&states, &out);
        out.clear();
        b.on_idle(&states, 8, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn idle_before_any_fault_offers_nothing() {
        let states = PageStateTable::new(16, PageState::Missing);
        let mut b = Bubble::new(16);
        let mut out = Vec::new();
        b.on_idle(&states, 8, &mut out);
        assert!(out.is_empty());
    }

    fn arb_states(pages: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(0u8..7, pages)
    }

    fn table(bytes: &[u8]) -> PageStateTable {
        let t = PageStateTable::new(bytes.len(), PageState::Missing);
        for (i, &b) in bytes.iter().enumerate() {
            t.set(i as u64, PageState::ALL[b as usize]);
        }
        t
    }

    proptest! {
        #[test]
        fn offers_are_valid(
            init in arb_states(300),
            faults in prop::collection::vec((0u64..300, 0usize..40, 0usize..40), 1..30),
        ) {
            let states = table(&init);
            let mut b = Bubble::new(300);
            for (page, fb, ib) in faults {
                let mut out = Vec::new();
                b.on_fault(page, &states, fb, &mut out);
                check_emitted(&out, &states, fb, Some(page));
                states.set(page, PageState::Present);
                for &p in &out { states.set(p, PageState::InFlight); }
                let mut idle = Vec::new();
                b.on_idle(&states, ib, &mut idle);
                check_emitted(&idle, &states, ib, None);
                for &p in &idle { states.set(p, PageState::Present); }
            }
        }

        #[test]
        fn idle_eventually_covers_every_absent_page(
            init in arb_states(500),
            faults in prop::collection::vec(0u64..500, 1..6),
            budget in 1usize..50,
        ) {
            let states = table(&init);
            let mut b = Bubble::new(500);
            for page in faults {
                let mut out = Vec::new();
                b.on_fault(page, &states, budget, &mut out);
                // The fetcher may decline: leave every other offer absent.
                for (k, &p) in out.iter().enumerate() {
                    if k % 2 == 0 { states.set(p, PageState::Present); }
                }
                states.set(page, PageState::Present);
            }
            for _ in 0..(2 * 500 / budget + 50) {
                let mut out = Vec::new();
                b.on_idle(&states, budget, &mut out);
                check_emitted(&out, &states, budget, None);
                for &p in &out { states.set(p, PageState::Present); }
            }
            for p in 0..500 {
                prop_assert!(!wanted(&states, p), "page {} still {:?}", p, states.get(p));
            }
        }
    }
}
