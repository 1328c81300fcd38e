//! Stride detection: sequential and strided streams, with a window that doubles while the
//! stream holds.
//!
//! A stream is born when three recent faults are evenly spaced (`a, a+d, a+2d`, any order of
//! arrival among other faults, `0 < |d| <= MAX_STRIDE`). It then offers the next `window`
//! pages along the stride. A later fault that lands on the stream's path, at most one step
//! past what was already offered (the guest outran the prefetch), confirms it: the window
//! doubles up to [`MAX_WINDOW`]. A stream that stops being confirmed ages out (least recently
//! confirmed is replaced first). Idle capacity reads further ahead, up to
//! [`IDLE_LOOKAHEAD_WINDOWS`] windows past the last fault of each stream.

use std::collections::{HashSet, VecDeque};

use super::{wanted, PrefetchPolicy};
use crate::page_state::PageStateTable;

/// Faults remembered for detecting new streams.
pub const HISTORY: usize = 8;
/// Streams tracked at once (one per sequential reader, roughly).
pub const MAX_STREAMS: usize = 4;
/// Largest stride (in pages, either direction) recognised as a stream.
pub const MAX_STRIDE: i64 = 64;
/// Pages offered when a stream is first detected.
pub const INITIAL_WINDOW: u64 = 8;
/// Largest window a confirmed stream grows to.
pub const MAX_WINDOW: u64 = 1024;
/// How far ahead (in windows) idle capacity reads along a stream.
pub const IDLE_LOOKAHEAD_WINDOWS: u64 = 4;

#[derive(Debug, Clone)]
struct Stream {
    /// Last fault on this stream.
    last: u64,
    /// Pages between consecutive accesses (negative: descending).
    stride: i64,
    window: u64,
    /// Steps `1..=ahead` past `last` have been considered already.
    ahead: u64,
    /// Logical time of the last confirmation (for replacement).
    touched: u64,
}

/// Sequential / strided stream prefetch.
#[derive(Debug, Clone)]
pub struct Stride {
    pages: u64,
    history: VecDeque<u64>,
    streams: Vec<Stream>,
    clock: u64,
    /// Pages offered in the current call (dedup across streams).
    offered: HashSet<u64>,
}

impl Stride {
    /// A policy for a VM of `pages` guest pages.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            history: VecDeque::with_capacity(HISTORY),
            streams: Vec::with_capacity(MAX_STREAMS),
            clock: 0,
            offered: HashSet::new(),
        }
    }

    /// Whether some stream is live (for the combined policy's bookkeeping and tests).
    pub fn has_stream(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Index of the stream `page` continues, with the number of steps it moved.
    fn matching_stream(&self, page: u64) -> Option<(usize, u64)> {
        self.streams
            .iter()
            .position(|s| {
                let d = page as i64 - s.last as i64;
                d != 0 && d % s.stride == 0 && {
                    let k = d / s.stride;
                    k >= 1 && k as u64 <= s.ahead + 1
                }
            })
            .map(|i| {
                let s = &self.streams[i];
                (i, ((page as i64 - s.last as i64) / s.stride) as u64)
            })
    }

    /// A stride `d` such that `page - d` and `page - 2d` are both in the history.
    fn detect(&self, page: u64) -> Option<i64> {
        let p = page as i64;
        self.history.iter().rev().find_map(|&h| {
            let d = p - h as i64;
            let ok = d != 0
                && d.abs() <= MAX_STRIDE
                && self.history.iter().any(|&g| g as i64 == h as i64 - d);
            ok.then_some(d)
        })
    }

    /// Offer steps `ahead+1..=limit` of stream `i`, within `budget` pushes.
    fn extend(
        &mut self,
        i: usize,
        limit: u64,
        states: &PageStateTable,
        budget: usize,
        out: &mut Vec<u64>,
    ) -> usize {
        let pages = self.pages as i64;
        let mut pushed = 0;
        let s = &mut self.streams[i];
        while s.ahead < limit && pushed < budget {
            let k = s.ahead + 1;
            let target = s.last as i64 + k as i64 * s.stride;
            if target < 0 || target >= pages {
                // The stream ran off the range: nothing more along it.
                s.ahead = limit;
                break;
            }
            s.ahead = k;
            let page = target as u64;
            if wanted(states, page) && self.offered.insert(page) {
                out.push(page);
                pushed += 1;
            }
        }
        pushed
    }
}

impl PrefetchPolicy for Stride {
    fn on_fault(&mut self, page: u64, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        if page >= self.pages {
            return;
        }
        self.clock += 1;
        self.offered.clear();
        self.offered.insert(page);
        let hit = match self.matching_stream(page) {
            Some((i, k)) => {
                let s = &mut self.streams[i];
                s.window = (s.window * 2).min(MAX_WINDOW);
                s.ahead = s.ahead.saturating_sub(k);
                s.last = page;
                s.touched = self.clock;
                Some(i)
            }
            None => self.detect(page).map(|stride| {
                let stream = Stream {
                    last: page,
                    stride,
                    window: INITIAL_WINDOW,
                    ahead: 0,
                    touched: self.clock,
                };
                if self.streams.len() < MAX_STREAMS {
                    self.streams.push(stream);
                    self.streams.len() - 1
                } else {
                    let oldest = (0..self.streams.len())
                        .min_by_key(|&j| self.streams[j].touched)
                        .expect("streams full");
                    self.streams[oldest] = stream;
                    oldest
                }
            }),
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(page);
        if let Some(i) = hit {
            let window = self.streams[i].window;
            self.extend(i, window, states, budget, out);
        }
    }

    fn on_idle(&mut self, states: &PageStateTable, budget: usize, out: &mut Vec<u64>) {
        self.offered.clear();
        let mut order: Vec<usize> = (0..self.streams.len()).collect();
        order.sort_by_key(|&j| std::cmp::Reverse(self.streams[j].touched));
        let mut left = budget;
        for i in order {
            if left == 0 {
                break;
            }
            let limit = self.streams[i].window * IDLE_LOOKAHEAD_WINDOWS;
            left -= self.extend(i, limit, states, left, out);
        }
    }

    fn name(&self) -> &'static str {
        "stride"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_state::PageState;
    use crate::prefetch::testutil::check_emitted;
    use proptest::prelude::*;

    fn fault(s: &mut Stride, states: &PageStateTable, page: u64, budget: usize) -> Vec<u64> {
        let mut out = Vec::new();
        s.on_fault(page, states, budget, &mut out);
        check_emitted(&out, states, budget, Some(page));
        states.set(page, PageState::Present);
        for &p in &out {
            states.set(p, PageState::Present);
        }
        out
    }

    #[test]
    fn sequential_stream_doubles_its_window() {
        let states = PageStateTable::new(10_000, PageState::Missing);
        let mut s = Stride::new(10_000);
        assert!(fault(&mut s, &states, 0, 1000).is_empty());
        assert!(fault(&mut s, &states, 1, 1000).is_empty());
        assert_eq!(fault(&mut s, &states, 2, 1000), (3..11).collect::<Vec<_>>());
        // The guest reads past the window: the stream holds and the window doubles.
        assert_eq!(
            fault(&mut s, &states, 11, 1000),
            (12..28).collect::<Vec<_>>()
        );
        assert_eq!(
            fault(&mut s, &states, 28, 1000),
            (29..61).collect::<Vec<_>>()
        );
    }

    #[test]
    fn descending_strided_stream() {
        let states = PageStateTable::new(1000, PageState::Missing);
        let mut s = Stride::new(1000);
        fault(&mut s, &states, 900, 100);
        fault(&mut s, &states, 890, 100);
        let out = fault(&mut s, &states, 880, 100);
        assert_eq!(out, (1..=8).map(|k| 880 - 10 * k).collect::<Vec<_>>());
    }

    #[test]
    fn random_faults_make_no_stream() {
        let states = PageStateTable::new(100_000, PageState::Missing);
        let mut s = Stride::new(100_000);
        for p in [5u64, 9000, 123, 77_000, 4242, 31_337] {
            assert!(fault(&mut s, &states, p, 64).is_empty());
        }
        assert!(!s.has_stream());
    }

    #[test]
    fn interleaved_streams_are_both_tracked() {
        let states = PageStateTable::new(100_000, PageState::Missing);
        let mut s = Stride::new(100_000);
        for i in 0..3 {
            fault(&mut s, &states, 1000 + i, 4);
            fault(&mut s, &states, 50_000 + 2 * i, 4);
        }
        assert_eq!(s.streams.len(), 2);
    }

    #[test]
    fn stream_stops_at_the_range_end() {
        let states = PageStateTable::new(12, PageState::Missing);
        let mut s = Stride::new(12);
        fault(&mut s, &states, 7, 64);
        fault(&mut s, &states, 8, 64);
        assert_eq!(fault(&mut s, &states, 9, 64), [10, 11]);
        let mut out = Vec::new();
        s.on_idle(&states, 64, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn idle_reads_further_ahead() {
        let states = PageStateTable::new(10_000, PageState::Missing);
        let mut s = Stride::new(10_000);
        for p in 0..3 {
            fault(&mut s, &states, p, 1000);
        }
        let mut out = Vec::new();
        s.on_idle(&states, 1000, &mut out);
        // Window 8, lookahead 4 windows: steps 9..=32 past page 2.
        assert_eq!(out, (11..35).collect::<Vec<_>>());
    }

    #[test]
    fn budget_caps_the_window() {
        let states = PageStateTable::new(1000, PageState::Missing);
        let mut s = Stride::new(1000);
        fault(&mut s, &states, 0, 3);
        fault(&mut s, &states, 1, 3);
        assert_eq!(fault(&mut s, &states, 2, 3), [3, 4, 5]);
        // What the budget cut is offered on idle.
        let mut out = Vec::new();
        s.on_idle(&states, 5, &mut out);
        assert_eq!(out, [6, 7, 8, 9, 10]);
    }

    proptest! {
        #[test]
        fn offers_are_valid(
            init in prop::collection::vec(0u8..7, 400),
            faults in prop::collection::vec((0u64..400, 0usize..80, 0usize..80), 1..60),
        ) {
            let states = PageStateTable::new(400, PageState::Missing);
            for (i, &b) in init.iter().enumerate() {
                states.set(i as u64, PageState::ALL[b as usize]);
            }
            let mut s = Stride::new(400);
            for (page, fb, ib) in faults {
                let mut out = Vec::new();
                s.on_fault(page, &states, fb, &mut out);
                check_emitted(&out, &states, fb, Some(page));
                for &p in &out { states.set(p, PageState::InFlight); }
                let mut idle = Vec::new();
                s.on_idle(&states, ib, &mut idle);
                check_emitted(&idle, &states, ib, None);
            }
        }

        #[test]
        fn any_stride_is_detected(start in 0u64..1000, stride in -64i64..=64) {
            prop_assume!(stride != 0);
            let states = PageStateTable::new(2000, PageState::Missing);
            let mut s = Stride::new(2000);
            let at = |k: i64| (start as i64 + 500 + k * stride) as u64;
            fault(&mut s, &states, at(0), 64);
            fault(&mut s, &states, at(1), 64);
            let out = fault(&mut s, &states, at(2), 64);
            prop_assert_eq!(out.first().copied(), Some(at(3)));
        }
    }
}
