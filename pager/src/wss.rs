//! Working-set estimation without soft-dirty or idle-page tracking (neither exists for
//! these mappings on this kernel).
//!
//! Two signals feed the estimate:
//! - **writes**: every sampling interval the whole guest range is write-protected (synchronous
//!   uffd-WP); the first write to a page in the interval faults, the fault loop marks the
//!   page in the VM's write tracker and un-protects it. [`WorkingSetTracker::sample`]
//!   harvests the tracker's own [`Subscription`] (other consumers, e.g. a migration, keep
//!   their own views).
//! - **fault-ins**: a page that was absent at the previous sample and is resident now was
//!   touched (first touch, or a *refault* when it was one we had evicted). Reads of resident
//!   pages are invisible; they show up once the page has been evicted and is read again.
//!
//! Each page remembers when it was last seen accessed (a 100 ms tick since the tracker
//! started; 0 = not seen since). The estimate is the number of distinct pages accessed in the
//! last `window` intervals. The evictor orders victims by the same timestamps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dirty::Subscription;
use crate::page_state::{PageState, PageStateTable};

/// Length of one timestamp tick.
const TICK: Duration = Duration::from_millis(100);

/// How many intervals the estimate spans and how many samples are kept for `stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WssConfig {
    /// The estimate counts pages accessed in the last `window` intervals (>= 1).
    pub window: usize,
    /// Number of samples kept in the history (>= window).
    pub history: usize,
}

impl Default for WssConfig {
    fn default() -> Self {
        Self {
            window: 4,
            history: 64,
        }
    }
}

/// What one sampling interval saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WssSample {
    /// End of the interval, milliseconds since the tracker started.
    pub at_ms: u64,
    /// Length of the interval in milliseconds.
    pub interval_ms: u64,
    /// Distinct pages written during the interval.
    pub written: usize,
    /// Pages that became resident during the interval (first touches and refaults).
    pub faulted_in: usize,
    /// Of those, pages we had evicted (reads or writes of cold pages).
    pub refaulted: usize,
    /// Pages evicted during the interval.
    pub evicted: usize,
    /// Estimated working set: distinct pages accessed in the last `window` intervals.
    pub wss_pages: usize,
    /// Pages in guest memory at the end of the interval.
    pub resident_pages: usize,
}

impl WssSample {
    /// Refaults per second during this interval.
    pub fn refault_rate(&self) -> f64 {
        if self.interval_ms == 0 {
            return 0.0;
        }
        self.refaulted as f64 * 1000.0 / self.interval_ms as f64
    }
}

/// A summary for `stats`: the latest estimate plus totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WssSummary {
    pub samples: u64,
    pub tracking_for_ms: u64,
    pub window_intervals: usize,
    pub wss_pages: Option<usize>,
    pub refault_rate_per_s: f64,
    pub refaults_total: u64,
    pub evictions_total: u64,
    pub history: Vec<WssSample>,
}

/// Whether a page counts as in guest memory for fault-in detection.
fn resident(state: PageState) -> bool {
    matches!(
        state,
        PageState::Present | PageState::InFlight | PageState::Evicting
    )
}

fn bit(map: &[u64], page: usize) -> bool {
    map[page / 64] & (1u64 << (page % 64)) != 0
}

fn set_bit(map: &mut [u64], page: usize, on: bool) {
    let mask = 1u64 << (page % 64);
    if on {
        map[page / 64] |= mask;
    } else {
        map[page / 64] &= !mask;
    }
}

struct Inner {
    /// Resident at the previous sample (or made absent by us since).
    resident_last: Vec<u64>,
    /// Evicted by us and not seen back yet.
    evicted: Vec<u64>,
    /// Tick of each kept sample, oldest first (strictly increasing).
    ticks: VecDeque<u32>,
    history: VecDeque<WssSample>,
    last_sample_at: Instant,
    samples: u64,
    refaults_total: u64,
    evictions_total: u64,
    // Seen by `note_evicted` since the last sample, folded into the next one.
    pending_faulted_in: usize,
    pending_refaulted: usize,
    pending_evicted: usize,
}

/// Per-VM working-set tracker. Shared behind an `Arc`; every method takes `&self`.
pub struct WorkingSetTracker {
    config: WssConfig,
    started: Instant,
    last_access: Box<[AtomicU32]>,
    inner: Mutex<Inner>,
}

impl WorkingSetTracker {
    /// A tracker for `pages` guest pages, taking `states` as the starting residency.
    pub fn new(states: &PageStateTable, config: WssConfig) -> Self {
        let config = WssConfig {
            window: config.window.max(1),
            history: config.history.max(config.window.max(1)),
        };
        let pages = states.len();
        let words = pages.div_ceil(64);
        let mut resident_last = vec![0u64; words];
        for p in 0..pages {
            if resident(states.get(p as u64)) {
                set_bit(&mut resident_last, p, true);
            }
        }
        let now = Instant::now();
        Self {
            config,
            started: now,
            last_access: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            inner: Mutex::new(Inner {
                resident_last,
                evicted: vec![0u64; words],
                ticks: VecDeque::new(),
                history: VecDeque::new(),
                last_sample_at: now,
                samples: 0,
                refaults_total: 0,
                evictions_total: 0,
                pending_faulted_in: 0,
                pending_refaulted: 0,
                pending_evicted: 0,
            }),
        }
    }

    pub fn pages(&self) -> usize {
        self.last_access.len()
    }

    pub fn config(&self) -> WssConfig {
        self.config
    }

    /// How long the tracker has been observing.
    pub fn tracking_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// The tick for `t` (>= 1; 0 means "never seen").
    fn tick(&self, t: Instant) -> u32 {
        let ticks = t.saturating_duration_since(self.started).as_millis() / TICK.as_millis();
        u32::try_from(ticks.saturating_add(1)).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters half-updated: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tick at which `page` was last seen accessed (0 = not since tracking started).
    pub fn last_access(&self, page: u64) -> u32 {
        self.last_access[page as usize].load(Ordering::Relaxed)
    }

    /// The tick threshold for "not accessed for at least `cold_for`": pages whose
    /// [`last_access`](Self::last_access) is below it qualify. `None` while the tracker has
    /// observed for less than `cold_for` (no page can be proven that cold yet).
    pub fn cold_threshold(&self, cold_for: Duration, now: Instant) -> Option<u32> {
        let since = now.checked_sub(cold_for)?;
        if since < self.started {
            return None;
        }
        Some(self.tick(since))
    }

    /// Pages seen accessed (written, or made resident) within the last `within` before
    /// `now`, in ascending order. Reads of resident pages are invisible, so these are the
    /// pages the guest is writing (or bringing in) now: the ones a migration is better off
    /// moving once, after its switchover, than before it and again.
    pub fn accessed_within(&self, within: Duration, now: Instant) -> Vec<u64> {
        let since = self.tick(
            now.checked_sub(within)
                .unwrap_or(self.started)
                .max(self.started),
        );
        self.last_access
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                let t = t.load(Ordering::Relaxed);
                t != 0 && t >= since
            })
            .map(|(p, _)| p as u64)
            .collect()
    }

    /// Record that the evictor has just made `pages` absent. A page that became resident
    /// since the last sample counts as accessed (and as a refault if we had evicted it), so
    /// an evict-refault-evict cycle inside one interval is not missed.
    pub fn note_evicted(&self, pages: &[u64]) {
        let now_tick = self.tick(Instant::now());
        let mut inner = self.lock();
        for &p in pages {
            let i = p as usize;
            if !bit(&inner.resident_last, i) {
                self.last_access[i].store(now_tick, Ordering::Relaxed);
                inner.pending_faulted_in += 1;
                if bit(&inner.evicted, i) {
                    inner.pending_refaulted += 1;
                }
            }
            set_bit(&mut inner.evicted, i, true);
            set_bit(&mut inner.resident_last, i, false);
        }
        inner.pending_evicted += pages.len();
        inner.evictions_total += pages.len() as u64;
    }

    /// Close the current interval. Call it right AFTER write-protecting the guest range for
    /// the next interval (so no write escapes both intervals): harvests `dirty`, detects
    /// fault-ins from `states`, updates per-page timestamps and returns the sample.
    pub fn sample(&self, states: &PageStateTable, dirty: &Subscription, now: Instant) -> WssSample {
        let mut inner = self.lock();
        let mut tick = self.tick(now);
        if let Some(&last) = inner.ticks.back() {
            tick = tick.max(last.saturating_add(1));
        }
        let written = dirty.harvest();
        for &p in &written {
            if let Some(slot) = self.last_access.get(p as usize) {
                slot.store(tick, Ordering::Relaxed);
            }
        }
        let mut faulted_in = std::mem::take(&mut inner.pending_faulted_in);
        let mut refaulted = std::mem::take(&mut inner.pending_refaulted);
        let evicted = std::mem::take(&mut inner.pending_evicted);
        let mut resident_pages = 0;
        for p in 0..self.pages() {
            let state = states.get(p as u64);
            let now_resident = resident(state);
            if now_resident {
                resident_pages += 1;
                if !bit(&inner.resident_last, p) {
                    faulted_in += 1;
                    self.last_access[p].store(tick, Ordering::Relaxed);
                    if bit(&inner.evicted, p) {
                        refaulted += 1;
                        set_bit(&mut inner.evicted, p, false);
                    }
                }
            } else if state == PageState::Removed {
                // The guest freed it: not ours to count as a refault later.
                set_bit(&mut inner.evicted, p, false);
            }
            set_bit(&mut inner.resident_last, p, now_resident);
        }
        inner.ticks.push_back(tick);
        while inner.ticks.len() > self.config.history + 1 {
            inner.ticks.pop_front();
        }
        // Pages accessed in the last `window` intervals have a timestamp above the tick that
        // closed the interval before the window.
        let n = inner.ticks.len();
        let boundary = if n > self.config.window {
            inner.ticks[n - self.config.window - 1]
        } else {
            0
        };
        let wss_pages = self
            .last_access
            .iter()
            .filter(|t| t.load(Ordering::Relaxed) > boundary)
            .count();
        let sample = WssSample {
            at_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            interval_ms: now
                .saturating_duration_since(inner.last_sample_at)
                .as_millis() as u64,
            written: written.len(),
            faulted_in,
            refaulted,
            evicted,
            wss_pages,
            resident_pages,
        };
        inner.last_sample_at = now;
        inner.samples += 1;
        inner.refaults_total += refaulted as u64;
        inner.history.push_back(sample);
        while inner.history.len() > self.config.history {
            inner.history.pop_front();
        }
        sample
    }

    /// The latest estimate (None before the first sample).
    pub fn estimate(&self) -> Option<usize> {
        self.lock().history.back().map(|s| s.wss_pages)
    }

    /// Latest estimate, refault rate over the window, totals and the kept history.
    pub fn summary(&self, now: Instant) -> WssSummary {
        let inner = self.lock();
        let window: Vec<&WssSample> = inner
            .history
            .iter()
            .rev()
            .take(self.config.window)
            .collect();
        let ms: u64 = window.iter().map(|s| s.interval_ms).sum();
        let refaults: usize = window.iter().map(|s| s.refaulted).sum();
        WssSummary {
            samples: inner.samples,
            tracking_for_ms: self.tracking_for(now).as_millis() as u64,
            window_intervals: self.config.window,
            wss_pages: inner.history.back().map(|s| s.wss_pages),
            refault_rate_per_s: if ms == 0 {
                0.0
            } else {
                refaults as f64 * 1000.0 / ms as f64
            },
            refaults_total: inner.refaults_total,
            evictions_total: inner.evictions_total,
            history: inner.history.iter().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &WorkingSetTracker, ms: u64) -> Instant {
        t.started + Duration::from_millis(ms)
    }

    #[test]
    fn writes_and_fault_ins_make_the_working_set() {
        let states = PageStateTable::new(256, PageState::Present);
        let dirty = crate::dirty::WriteTracker::new(256)
            .subscribe(Default::default())
            .unwrap();
        let t = WorkingSetTracker::new(
            &states,
            WssConfig {
                window: 2,
                history: 8,
            },
        );
        for p in 0..10 {
            dirty.mark(p);
        }
        let s1 = t.sample(&states, &dirty, at(&t, 1000));
        assert_eq!((s1.written, s1.faulted_in, s1.wss_pages), (10, 0, 10));
        assert_eq!(s1.resident_pages, 256);

        // Interval 2: pages 10..15 written; the first 10 idle but still inside the window.
        for p in 10..15 {
            dirty.mark(p);
        }
        let s2 = t.sample(&states, &dirty, at(&t, 2000));
        assert_eq!((s2.written, s2.wss_pages), (5, 15));

        // Interval 3: nothing written: the first 10 fall out of the 2-interval window.
        let s3 = t.sample(&states, &dirty, at(&t, 3000));
        assert_eq!((s3.written, s3.wss_pages), (0, 5));
        assert_eq!(t.estimate(), Some(5));
    }

    #[test]
    fn refaults_of_evicted_pages_are_counted_once() {
        let states = PageStateTable::new(128, PageState::Present);
        let dirty = crate::dirty::WriteTracker::new(128)
            .subscribe(Default::default())
            .unwrap();
        let t = WorkingSetTracker::new(&states, WssConfig::default());
        states.set_range(0..20, PageState::Evicted);
        t.note_evicted(&(0..20).collect::<Vec<_>>());
        let s1 = t.sample(&states, &dirty, at(&t, 500));
        assert_eq!((s1.evicted, s1.refaulted, s1.faulted_in), (20, 0, 0));
        assert_eq!(s1.resident_pages, 108);

        // 5 come back (reads of cold pages); a page that was never ours (Missing -> Present)
        // is a fault-in but not a refault.
        states.set_range(0..5, PageState::Present);
        let s2 = t.sample(&states, &dirty, at(&t, 1500));
        assert_eq!((s2.refaulted, s2.faulted_in), (5, 5));
        assert!((s2.refault_rate() - 5.0).abs() < 1e-9);
        let s3 = t.sample(&states, &dirty, at(&t, 2500));
        assert_eq!((s3.refaulted, s3.faulted_in), (0, 0));
        let sum = t.summary(at(&t, 2500));
        assert_eq!(sum.refaults_total, 5);
        assert_eq!(sum.evictions_total, 20);
        assert_eq!(sum.history.len(), 3);
    }

    #[test]
    fn evict_refault_evict_inside_one_interval_is_seen() {
        let states = PageStateTable::new(64, PageState::Present);
        let dirty = crate::dirty::WriteTracker::new(64)
            .subscribe(Default::default())
            .unwrap();
        let t = WorkingSetTracker::new(&states, WssConfig::default());
        t.note_evicted(&[7]);
        // Page 7 refaulted (fault loop made it Present) and is evicted again before a sample.
        t.note_evicted(&[7]);
        states.set(7, PageState::Evicted);
        let s = t.sample(&states, &dirty, at(&t, 300));
        assert_eq!((s.evicted, s.refaulted, s.faulted_in), (2, 1, 1));
        assert!(t.last_access(7) > 0);
    }

    #[test]
    fn removed_pages_are_not_refaults() {
        let states = PageStateTable::new(64, PageState::Present);
        let dirty = crate::dirty::WriteTracker::new(64)
            .subscribe(Default::default())
            .unwrap();
        let t = WorkingSetTracker::new(&states, WssConfig::default());
        states.set(3, PageState::Evicted);
        t.note_evicted(&[3]);
        states.set(3, PageState::Removed);
        t.sample(&states, &dirty, at(&t, 200));
        // The guest reuses the freed page: a first touch, not a refault.
        states.set(3, PageState::Present);
        let s = t.sample(&states, &dirty, at(&t, 400));
        assert_eq!((s.faulted_in, s.refaulted), (1, 0));
    }

    #[test]
    fn cold_threshold_needs_enough_history() {
        let states = PageStateTable::new(8, PageState::Present);
        let t = WorkingSetTracker::new(&states, WssConfig::default());
        assert_eq!(t.cold_threshold(Duration::from_secs(5), at(&t, 1000)), None);
        let th = t
            .cold_threshold(Duration::from_secs(5), at(&t, 7000))
            .unwrap();
        // 2 s after start -> tick 21; a page never seen (0) and one seen at 1.5 s qualify.
        assert_eq!(th, 21);
        let dirty = crate::dirty::WriteTracker::new(8)
            .subscribe(Default::default())
            .unwrap();
        dirty.mark(1);
        t.sample(&states, &dirty, at(&t, 1500));
        dirty.mark(2);
        t.sample(&states, &dirty, at(&t, 6000));
        assert!(t.last_access(0) < th);
        assert!(t.last_access(1) < th);
        assert!(t.last_access(2) >= th);
    }

    proptest::proptest! {
        /// Against a model: the estimate is the number of distinct pages written or faulted
        /// in during the last `window` intervals.
        #[test]
        fn estimate_matches_the_union_of_the_last_window_intervals(
            window in 1usize..5,
            intervals in proptest::collection::vec(
                (proptest::collection::vec(0u64..64, 0..20),
                 proptest::collection::vec(0u64..64, 0..4)),
                1..12,
            ),
        ) {
            let states = PageStateTable::new(64, PageState::Present);
            let dirty = crate::dirty::WriteTracker::new(64).subscribe(Default::default()).unwrap();
            let t = WorkingSetTracker::new(&states, WssConfig { window, history: 16 });
            let mut accessed: Vec<std::collections::BTreeSet<u64>> = Vec::new();
            for (i, (writes, refaults)) in intervals.iter().enumerate() {
                let mut set = std::collections::BTreeSet::new();
                for &p in writes {
                    dirty.mark(p);
                    set.insert(p);
                }
                // Pages evicted in an earlier interval that come back now.
                for &p in refaults {
                    if states.get(p) == PageState::Evicted {
                        states.set(p, PageState::Present);
                        set.insert(p);
                    }
                }
                let s = t.sample(&states, &dirty, at(&t, 1000 * (i as u64 + 1)));
                accessed.push(set);
                let model: std::collections::BTreeSet<u64> = accessed
                    .iter()
                    .rev()
                    .take(window)
                    .flatten()
                    .copied()
                    .collect();
                proptest::prop_assert_eq!(s.wss_pages, model.len());
                // Evict every refault candidate of the next interval that is resident now.
                let evict: Vec<u64> = intervals
                    .get(i + 1)
                    .map(|(_, r)| r.iter().copied().filter(|&p| states.get(p) == PageState::Present).collect())
                    .unwrap_or_default();
                let mut evict = evict;
                evict.sort_unstable();
                evict.dedup();
                for &p in &evict {
                    states.set(p, PageState::Evicted);
                }
                t.note_evicted(&evict);
            }
        }
    }
}
