//! The per-VM page-state table: a few bits per guest page, in one flat array of atomics.
//!
//! Every component (fault loop, prefetcher, evictor, migration) reads and changes pages
//! through this one table. Transitions that race (a fault and an eviction on the same page)
//! use compare-and-swap, so whoever wins owns the page until it stores the next state.

use std::sync::atomic::{AtomicU8, Ordering};

/// What the pager knows about one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Not in guest memory; content (if any) must be fetched from the page source.
    Missing = 0,
    /// In guest memory (copied, zero-filled, or found already present).
    Present = 1,
    /// A fetch is under way; faults on it wait for that fetch.
    InFlight = 2,
    /// Being evicted: write-protected, content being stored in the swap device.
    Evicting = 3,
    /// Not in guest memory; content is in the swap device.
    Evicted = 4,
    /// The guest discarded it (UFFD_EVENT_REMOVE, balloon): reads as zero, never stored.
    Removed = 5,
    /// Known all-zero and not in guest memory: served with UFFDIO_ZEROPAGE, no I/O.
    Zero = 6,
}

impl PageState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Missing,
            1 => Self::Present,
            2 => Self::InFlight,
            3 => Self::Evicting,
            4 => Self::Evicted,
            5 => Self::Removed,
            6 => Self::Zero,
            _ => unreachable!("page state byte {v} is never stored"),
        }
    }

    /// Whether the page is absent from guest memory (a touch would fault).
    pub fn is_absent(self) -> bool {
        matches!(
            self,
            Self::Missing | Self::Evicted | Self::Removed | Self::Zero
        )
    }

    pub const ALL: [PageState; 7] = [
        Self::Missing,
        Self::Present,
        Self::InFlight,
        Self::Evicting,
        Self::Evicted,
        Self::Removed,
        Self::Zero,
    ];
}

/// One state per guest page, indexed by guest page number (memory-file offset / page size).
pub struct PageStateTable {
    states: Box<[AtomicU8]>,
}

impl PageStateTable {
    /// A table of `pages` pages, all in `initial` state.
    pub fn new(pages: usize, initial: PageState) -> Self {
        let states = (0..pages).map(|_| AtomicU8::new(initial as u8)).collect();
        Self { states }
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The state of `page`. Panics if `page` is out of range (callers map addresses first).
    pub fn get(&self, page: u64) -> PageState {
        PageState::from_u8(self.states[page as usize].load(Ordering::Acquire))
    }

    /// Unconditionally set the state of `page`.
    pub fn set(&self, page: u64, state: PageState) {
        self.states[page as usize].store(state as u8, Ordering::Release);
    }

    /// Move `page` from `from` to `to` if it is still in `from`. Returns the state found.
    pub fn transition(&self, page: u64, from: PageState, to: PageState) -> Result<(), PageState> {
        self.states[page as usize]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(PageState::from_u8)
    }

    /// Set every page in `range` to `state`.
    pub fn set_range(&self, range: std::ops::Range<u64>, state: PageState) {
        for p in range {
            self.set(p, state);
        }
    }

    /// How many pages are in each state, indexed like [`PageState::ALL`].
    pub fn census(&self) -> [usize; 7] {
        let mut counts = [0usize; 7];
        for s in self.states.iter() {
            counts[s.load(Ordering::Relaxed) as usize] += 1;
        }
        counts
    }

    /// Number of pages currently in `state`.
    pub fn count(&self, state: PageState) -> usize {
        self.census()[state as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_census() {
        let t = PageStateTable::new(8, PageState::Missing);
        assert_eq!(
            t.transition(3, PageState::Missing, PageState::InFlight),
            Ok(())
        );
        assert_eq!(
            t.transition(3, PageState::Missing, PageState::InFlight),
            Err(PageState::InFlight)
        );
        t.set_range(4..6, PageState::Removed);
        let c = t.census();
        assert_eq!(c[PageState::Missing as usize], 5);
        assert_eq!(c[PageState::InFlight as usize], 1);
        assert_eq!(t.count(PageState::Removed), 2);
        assert!(t.get(4).is_absent());
        assert!(!t.get(3).is_absent());
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let t = std::sync::Arc::new(PageStateTable::new(1, PageState::Missing));
        let wins: usize = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    usize::from(
                        t.transition(0, PageState::Missing, PageState::InFlight)
                            .is_ok(),
                    )
                })
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(wins, 1);
    }
}
