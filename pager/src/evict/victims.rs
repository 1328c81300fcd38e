//! Choosing which pages to evict: the coldest first, by the working-set tracker's last-access
//! timestamps; pages written since the last harvest are never chosen.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::EvictError;
use crate::dirty::Subscription;
use crate::page_state::{PageState, PageStateTable};
use crate::wss::WorkingSetTracker;

/// What an eviction run aims for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictGoal {
    /// Evict coldest first until at most this many pages are resident.
    TargetResidentPages(u64),
    /// Evict every page not written and not faulted in for this many milliseconds.
    ColdForMs(u64),
    /// Evict down to the working-set estimate plus a margin (percent of the estimate, and
    /// at least `min_margin_pages`).
    Auto {
        margin_percent: u32,
        min_margin_pages: u64,
    },
}

impl EvictGoal {
    pub fn auto() -> Self {
        Self::Auto {
            margin_percent: 10,
            min_margin_pages: 256,
        }
    }
}

/// Pages in guest memory: present, being fetched into it, or being evicted from it.
pub fn resident_pages(states: &PageStateTable) -> usize {
    let c = states.census();
    c[PageState::Present as usize]
        + c[PageState::InFlight as usize]
        + c[PageState::Evicting as usize]
}

/// The victims for `goal`, coldest first, and the resident target they aim at (if any).
pub fn select_victims(
    states: &PageStateTable,
    dirty: &Subscription,
    tracker: &WorkingSetTracker,
    goal: EvictGoal,
    now: Instant,
) -> Result<(Vec<u64>, Option<usize>), EvictError> {
    let candidates = || {
        (0..states.len() as u64)
            .filter(|&p| states.get(p) == PageState::Present && !dirty.is_dirty(p))
    };
    let coldest = |limit: usize| {
        let mut c: Vec<(u32, u64)> = candidates().map(|p| (tracker.last_access(p), p)).collect();
        if limit < c.len() {
            c.select_nth_unstable(limit);
            c.truncate(limit);
        }
        c.sort_unstable();
        c.into_iter().map(|(_, p)| p).collect::<Vec<u64>>()
    };
    match goal {
        EvictGoal::TargetResidentPages(target) => {
            let target = usize::try_from(target).unwrap_or(usize::MAX);
            let need = resident_pages(states).saturating_sub(target);
            Ok((coldest(need), Some(target)))
        }
        EvictGoal::ColdForMs(ms) => {
            let cold_for = Duration::from_millis(ms);
            let threshold = tracker.cold_threshold(cold_for, now).ok_or_else(|| {
                EvictError::NotEnoughHistory {
                    wanted_ms: ms,
                    tracked_ms: tracker.tracking_for(now).as_millis() as u64,
                }
            })?;
            let mut c: Vec<(u32, u64)> = candidates()
                .map(|p| (tracker.last_access(p), p))
                .filter(|&(t, _)| t < threshold)
                .collect();
            c.sort_unstable();
            Ok((c.into_iter().map(|(_, p)| p).collect(), None))
        }
        EvictGoal::Auto {
            margin_percent,
            min_margin_pages,
        } => {
            let wss = tracker.estimate().ok_or(EvictError::NoEstimateYet)?;
            let margin = ((wss as u64 * margin_percent as u64) / 100).max(min_margin_pages);
            let target = wss.saturating_add(margin as usize);
            let need = resident_pages(states).saturating_sub(target);
            Ok((coldest(need), Some(target)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wss::WssConfig;

    fn setup() -> (PageStateTable, Subscription, WorkingSetTracker, Instant) {
        let states = PageStateTable::new(100, PageState::Present);
        let dirty = crate::dirty::WriteTracker::new(100)
            .subscribe(Default::default())
            .unwrap();
        let t = WorkingSetTracker::new(
            &states,
            WssConfig {
                window: 1,
                history: 4,
            },
        );
        let start = Instant::now();
        // Pages 0..10 written at ~1 s, 10..20 at ~2 s; the rest never seen.
        for p in 0..10 {
            dirty.mark(p);
        }
        t.sample(&states, &dirty, start + Duration::from_secs(1));
        for p in 10..20 {
            dirty.mark(p);
        }
        t.sample(&states, &dirty, start + Duration::from_secs(2));
        (states, dirty, t, start)
    }

    #[test]
    fn target_resident_takes_coldest_first_and_skips_dirty() {
        let (states, dirty, t, start) = setup();
        states.set_range(90..100, PageState::Evicted);
        dirty.mark(25); // written since the last harvest: hot
        let now = start + Duration::from_secs(3);
        let (v, target) =
            select_victims(&states, &dirty, &t, EvictGoal::TargetResidentPages(15), now).unwrap();
        assert_eq!(target, Some(15));
        assert_eq!(v.len(), 75);
        // The 69 never-seen clean pages (20..90 minus 25) come first, then the oldest writes.
        assert!(!v.contains(&25));
        assert!(v[..69].iter().all(|&p| (20..90).contains(&p)));
        assert!(v[69..].iter().all(|&p| p < 10));
    }

    #[test]
    fn cold_for_uses_timestamps_and_needs_history() {
        let (states, dirty, t, start) = setup();
        let err = select_victims(
            &states,
            &dirty,
            &t,
            EvictGoal::ColdForMs(10_000),
            start + Duration::from_secs(3),
        );
        assert!(matches!(err, Err(EvictError::NotEnoughHistory { .. })));
        // At 3.5 s, "cold for 2 s" = not seen since 1.5 s: never-seen pages and pages 0..10.
        let (v, _) = select_victims(
            &states,
            &dirty,
            &t,
            EvictGoal::ColdForMs(2000),
            start + Duration::from_millis(3500),
        )
        .unwrap();
        assert_eq!(v.len(), 90);
        assert!(!v.iter().any(|p| (10..20).contains(p)));
    }

    #[test]
    fn auto_evicts_down_to_estimate_plus_margin() {
        let (states, dirty, t, start) = setup();
        // window 1: the estimate is the 10 pages written in the last interval.
        assert_eq!(t.estimate(), Some(10));
        let goal = EvictGoal::Auto {
            margin_percent: 50,
            min_margin_pages: 2,
        };
        let (v, target) =
            select_victims(&states, &dirty, &t, goal, start + Duration::from_secs(3)).unwrap();
        assert_eq!(target, Some(15));
        assert_eq!(v.len(), 85);
        assert!(!v.iter().any(|p| (10..20).contains(p)));
    }
}
