//! Prefetch policies: given a demand fault (or spare fetch capacity) and the page-state
//! table, which other pages are worth fetching now.
//!
//! Policies are pure state machines over their inputs: they never touch guest memory or the
//! swap device, so they are unit-tested, property-tested and replayed against access traces
//! ([`sim`]) without a VM. The fault loop owns the contract around them: it fetches the
//! faulting page itself, marks every page a policy returns `InFlight` before the next call,
//! and calls [`PrefetchPolicy::on_idle`] whenever the fetcher has spare capacity.
//!
//! Module map:
//! * [`adaptive`] — the default: stride when faults stride, bubbling otherwise, idle push.
//! * [`bubble`] — Hines' bubbling (VEE'09): bubbles grow outward from recent fault pivots.
//! * [`stride`] — sequential / strided stream detection with a doubling window.
//! * [`combined`] — stride first, bubbling with what is left of the budget.
//! * [`sim`] — a pure trace simulator reporting demand faults and pages fetched.

pub mod adaptive;
pub mod bubble;
pub mod combined;
pub mod sim;
pub mod stride;

use crate::page_state::{PageState, PageStateTable};

pub use adaptive::Adaptive;
pub use bubble::Bubble;
pub use combined::BubbleStride;
pub use stride::Stride;

/// A prefetch policy. Implementations are deterministic functions of the calls they saw
/// and the states passed in.
pub trait PrefetchPolicy: Send {
    /// A demand fault on `page` (guest page index) was just seen. Push extra pages worth
    /// fetching now into `out` (at most `budget`); skip pages not absent in `states`.
    fn on_fault(&mut self, page: u64, states: &PageStateTable, budget: usize, out: &mut Vec<u64>);
    /// The fetcher has spare capacity: push background pages (bubbling continues outward).
    fn on_idle(&mut self, states: &PageStateTable, budget: usize, out: &mut Vec<u64>);
    fn name(&self) -> &'static str;
}

/// The names [`by_name`] accepts.
pub const POLICY_NAMES: [&str; 5] = ["adaptive", "none", "bubble", "stride", "bubble+stride"];

/// The policy `pagewise serve` uses when none is named.
pub const DEFAULT_POLICY: &str = "adaptive";

/// A policy name that [`by_name`] does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown prefetch policy {name:?}: expected one of adaptive, none, bubble, stride, bubble+stride")]
pub struct UnknownPolicy {
    pub name: String,
}

/// Build the policy called `name` for a VM of `pages` guest pages.
pub fn by_name(name: &str, pages: u64) -> Result<Box<dyn PrefetchPolicy>, UnknownPolicy> {
    match name {
        "adaptive" => Ok(Box::new(Adaptive::new(pages))),
        "none" => Ok(Box::new(NoPrefetch)),
        "bubble" => Ok(Box::new(Bubble::new(pages))),
        "stride" => Ok(Box::new(Stride::new(pages))),
        "bubble+stride" => Ok(Box::new(BubbleStride::new(pages))),
        other => Err(UnknownPolicy {
            name: other.to_string(),
        }),
    }
}

/// One page per fault: the faulting page only, nothing in the background.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPrefetch;

impl PrefetchPolicy for NoPrefetch {
    fn on_fault(&mut self, _: u64, _: &PageStateTable, _: usize, _: &mut Vec<u64>) {}
    fn on_idle(&mut self, _: &PageStateTable, _: usize, _: &mut Vec<u64>) {}
    fn name(&self) -> &'static str {
        "none"
    }
}

/// Whether prefetching `page` is worthwhile: it is absent and its content must be read
/// from the page source. Pages the guest removed stay out (they read as zero when touched,
/// and filling them ahead would undo a balloon's work); known-zero pages cost no I/O when
/// they fault, so fetching them ahead gains nothing.
pub(crate) fn wanted(states: &PageStateTable, page: u64) -> bool {
    matches!(states.get(page), PageState::Missing | PageState::Evicted)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Invariant checks shared by the policies' unit and property tests.
    use super::*;
    use std::collections::HashSet;

    /// Check what a policy pushed in one call: within budget, in range, wanted, no
    /// duplicates, not the faulting page.
    pub fn check_emitted(
        emitted: &[u64],
        states: &PageStateTable,
        budget: usize,
        fault: Option<u64>,
    ) {
        assert!(
            emitted.len() <= budget,
            "{} pages over budget {budget}",
            emitted.len()
        );
        let mut seen = HashSet::new();
        for &p in emitted {
            assert!(
                p < states.len() as u64,
                "page {p} out of range {}",
                states.len()
            );
            assert!(wanted(states, p), "page {p} is {:?}", states.get(p));
            assert!(seen.insert(p), "page {p} emitted twice");
            assert_ne!(Some(p), fault, "faulting page {p} emitted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_name_knows_every_listed_policy() {
        for name in POLICY_NAMES {
            assert_eq!(by_name(name, 16).unwrap().name(), name);
        }
        let err = by_name("readahead", 16).err().unwrap();
        assert_eq!(err.name, "readahead");
        assert!(err.to_string().contains("bubble+stride"));
    }

    #[test]
    fn none_emits_nothing() {
        let states = PageStateTable::new(8, PageState::Missing);
        let mut out = Vec::new();
        let mut p = NoPrefetch;
        p.on_fault(3, &states, 8, &mut out);
        p.on_idle(&states, 8, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn wanted_states() {
        let states = PageStateTable::new(7, PageState::Missing);
        for (i, s) in PageState::ALL.iter().enumerate() {
            states.set(i as u64, *s);
        }
        let w: Vec<bool> = (0..7).map(|p| wanted(&states, p)).collect();
        // Missing, Present, InFlight, Evicting, Evicted, Removed, Zero
        assert_eq!(w, [true, false, false, false, true, false, false]);
    }
}
