//! The workload: fill, rewrite the hot set at a chosen rate (checking each hot page before
//! rewriting it, which catches lost writes), verify every page periodically, report.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::free_phase::FreePhase;
use crate::hot_pass::HotPassClock;
use crate::pattern::{self, Page, WORDS};

const PAGES_PER_MIB: u64 = (1 << 20) / (WORDS as u64 * 8);
/// Mismatch details printed per pass at most (the counts are always complete).
const DETAILS_PER_PASS: u32 = 5;

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub passes: u64,
    /// Distinct pages found bad at least once (by a pass or by a check before a rewrite).
    pub bad_pages: u64,
    pub hot_rewrites: u64,
}

/// Guest memory under test plus what each page must hold.
pub struct Workload<W: Write> {
    cfg: Config,
    pages: Box<[Page]>,
    /// Generation of each hot page (cold pages stay at generation 0).
    generations: Vec<u32>,
    ever_bad: Vec<bool>,
    bad_pages: u64,
    hot_rewrites: u64,
    cursor: usize,
    /// Skewed hot set: rewrites so far, and the next page of the hottest eighth.
    skew_step: u64,
    hottest_cursor: usize,
    hot_clock: HotPassClock,
    out: W,
}

fn zeroed_pages(count: usize) -> Box<[Page]> {
    let uninit = Box::<[Page]>::new_zeroed_slice(count);
    // SAFETY: `Page` is an array of u64, for which all-zero bytes are a valid value.
    unsafe { uninit.assume_init() }
}

impl<W: Write> Workload<W> {
    /// Allocate (lazily: the kernel hands out zero pages on first touch) the memory.
    pub fn new(cfg: Config, out: W) -> Self {
        let count = (cfg.mib * PAGES_PER_MIB) as usize;
        let hot = (cfg.hot_mib * PAGES_PER_MIB) as usize;
        Workload {
            pages: zeroed_pages(count),
            generations: vec![0; hot],
            ever_bad: vec![false; count],
            bad_pages: 0,
            hot_rewrites: 0,
            cursor: 0,
            skew_step: 0,
            hottest_cursor: 0,
            hot_clock: HotPassClock::default(),
            cfg,
            out,
        }
    }

    fn say(&mut self, line: String) {
        // The serial console is the only reader; a failed write cannot be reported anywhere.
        let _ = writeln!(self.out, "memverify: {line}");
        let _ = self.out.flush();
    }

    fn mark_bad(&mut self, index: usize) {
        if !self.ever_bad[index] {
            self.ever_bad[index] = true;
            self.bad_pages += 1;
        }
    }

    /// Write every page once (generation 0), printing progress.
    pub fn fill(&mut self) {
        let started = Instant::now();
        let count = self.pages.len();
        let step = (count / 8).max(1);
        for index in 0..count {
            pattern::fill(&mut self.pages[index], self.cfg.seed, index as u64, 0);
            if (index + 1) % step == 0 && index + 1 < count {
                let done = (index + 1) as u64 / PAGES_PER_MIB;
                self.say(format!("fill {done}/{} MiB", self.cfg.mib));
            }
        }
        let secs = started.elapsed().as_secs_f64();
        self.say(format!("filled {} MiB in {secs:.1} s", self.cfg.mib));
    }

    /// Check the next hot page against its last generation, then rewrite it.
    fn rewrite_next_hot(&mut self) {
        let index = self.cursor;
        self.cursor = (self.cursor + 1) % self.generations.len();
        self.rewrite_hot(index);
    }

    /// Check hot page `index` against its last generation, then rewrite it.
    fn rewrite_hot(&mut self, index: usize) {
        let generation = self.generations[index];
        let sparse = self.cfg.sparse_words as usize;
        let checked = pattern::check_with(
            &self.pages[index],
            self.cfg.seed,
            index as u64,
            generation,
            sparse,
        );
        if let Err(m) = checked {
            self.mark_bad(index);
            self.say(format!(
                "BAD hot page {index} before rewrite (generation {generation}): word {} expected {:#x} found {:#x}",
                m.word, m.expected, m.found
            ));
        }
        let next = generation.wrapping_add(1);
        let (seed, page) = (self.cfg.seed, &mut self.pages[index]);
        if sparse > 0 && checked.is_err() {
            // Rebuilt whole: a sparse rewrite assumes the page held its generation.
            pattern::fill(page, seed, index as u64, 0);
            pattern::rewrite(page, seed, index as u64, 0, next, sparse);
        } else {
            pattern::rewrite(page, seed, index as u64, generation, next, sparse);
        }
        self.generations[index] = next;
        self.hot_rewrites += 1;
    }

    /// `rewrite_next_hot`, timed; prints a `hot pass` line after each sweep of the hot set.
    /// With `hot_skew` K > 1, K-1 of every K rewrites go to the hottest eighth of the hot
    /// set instead (untimed: the sweeps time the whole hot set).
    fn rewrite_next_hot_timed(&mut self) {
        let skew = self.cfg.hot_skew.max(1);
        self.skew_step += 1;
        if skew > 1 && !self.skew_step.is_multiple_of(skew) {
            let hottest = (self.generations.len() / 8).max(1);
            let index = self.hottest_cursor % hottest;
            self.hottest_cursor = (index + 1) % hottest;
            self.rewrite_hot(index);
            return;
        }
        let wrapped = self.cursor + 1 == self.generations.len();
        let mut clock = std::mem::take(&mut self.hot_clock);
        let pass = clock.time(|| self.rewrite_next_hot(), wrapped);
        self.hot_clock = clock;
        if let Some(pass) = pass {
            self.say(pass.line(self.generations.len()));
        }
    }

    /// Check every page; returns the number of bad pages in this pass.
    pub fn verify_pass(&mut self, pass: u64, since: Instant) -> u64 {
        let started = Instant::now();
        let mut bad = 0u64;
        let mut details = 0;
        for index in 0..self.pages.len() {
            let generation = self.generations.get(index).copied().unwrap_or(0);
            if let Err(m) = pattern::check_with(
                &self.pages[index],
                self.cfg.seed,
                index as u64,
                generation,
                self.cfg.sparse_words as usize,
            ) {
                bad += 1;
                self.mark_bad(index);
                if details < DETAILS_PER_PASS {
                    details += 1;
                    self.say(format!(
                        "BAD page {index} (generation {generation}): word {} expected {:#x} found {:#x}",
                        m.word, m.expected, m.found
                    ));
                }
            }
        }
        self.say(format!(
            "pass {pass} t={:.1}s pages={} bad={bad} hot_rewrites={} pass_ms={}",
            since.elapsed().as_secs_f64(),
            self.pages.len(),
            self.hot_rewrites,
            started.elapsed().as_millis()
        ));
        bad
    }

    /// Fill, then rewrite and verify until the configured duration is over (forever when it
    /// is 0), then a final pass.
    pub fn run(&mut self) -> Summary {
        self.say(format!("config {}", self.cfg));
        self.fill();
        let mut free_phase = self.start_free_phase();
        let t0 = Instant::now();
        let verify_every = Duration::from_secs(self.cfg.verify_secs);
        let end =
            (self.cfg.duration_secs > 0).then(|| t0 + Duration::from_secs(self.cfg.duration_secs));
        let rate = (self.cfg.hot_rate_mibs * PAGES_PER_MIB) as f64;
        let burst = ((rate / 20.0) as u64).max(1);
        let mut next_verify = t0 + verify_every;
        let mut passes = 0u64;
        let mut written = 0u64;
        let mut skipped = 0u64;
        loop {
            let now = Instant::now();
            if rate > 0.0 && !self.generations.is_empty() {
                let due = (now.duration_since(t0).as_secs_f64() * rate) as u64;
                // Never fall more than one second behind: a slow CPU (TCG) skips instead.
                if due > written + rate as u64 {
                    skipped += due - written - rate as u64;
                    written = due - rate as u64;
                }
                let mut budget = burst;
                while written < due && budget > 0 {
                    self.rewrite_next_hot_timed();
                    written += 1;
                    budget -= 1;
                }
            }
            if let Some(phase) = free_phase.as_mut().filter(|p| p.due(now)) {
                self.finish_free_phase(phase, t0);
            }
            if now >= next_verify {
                passes += 1;
                self.verify_pass(passes, t0);
                next_verify += verify_every;
                if next_verify < Instant::now() {
                    next_verify = Instant::now() + verify_every;
                }
            }
            if end.is_some_and(|end| now >= end) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(phase) = free_phase.as_mut().filter(|p| p.due(Instant::now())) {
            self.finish_free_phase(phase, t0);
        }
        passes += 1;
        self.verify_pass(passes, t0);
        let summary = Summary {
            passes,
            bad_pages: self.bad_pages,
            hot_rewrites: self.hot_rewrites,
        };
        let verdict = if summary.bad_pages == 0 {
            "PASS"
        } else {
            "FAIL"
        };
        self.say(format!(
            "DONE passes={} bad_pages={} hot_rewrites={} rewrites_skipped={skipped} RESULT={verdict}",
            summary.passes, summary.bad_pages, summary.hot_rewrites
        ));
        summary
    }

    /// The free phase's fill (`memverify.free_mib`), when configured.
    fn start_free_phase(&mut self) -> Option<FreePhase> {
        if self.cfg.free_mib == 0 {
            return None;
        }
        let started = Instant::now();
        let after = Duration::from_secs(self.cfg.free_after_secs);
        let phase = FreePhase::fill(self.cfg.free_mib, self.cfg.seed, after, started);
        self.say(format!(
            "free phase filled {} MiB in {:.1} s, freed in {} s",
            phase.mib(),
            started.elapsed().as_secs_f64(),
            self.cfg.free_after_secs
        ));
        Some(phase)
    }

    /// Verify the free phase's buffer a last time and free it; bad pages count in the run's
    /// total.
    fn finish_free_phase(&mut self, phase: &mut FreePhase, since: Instant) {
        let check = phase.check_and_free();
        for line in check.details {
            self.say(line);
        }
        self.bad_pages += check.bad;
        self.say(format!(
            "freed {} MiB t={:.1}s bad={}",
            phase.mib(),
            since.elapsed().as_secs_f64(),
            check.bad
        ));
    }

    #[cfg(test)]
    fn page_mut(&mut self, index: usize) -> &mut Page {
        &mut self.pages[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Config {
        Config {
            mib: 2,
            hot_mib: 1,
            hot_rate_mibs: 64,
            verify_secs: 1,
            duration_secs: 1,
            seed: 3,
            ..Config::default()
        }
    }

    #[test]
    fn free_phase_is_filled_verified_and_freed() {
        let cfg = Config {
            free_mib: 1,
            free_after_secs: 0,
            ..small()
        };
        let mut out = Vec::new();
        let summary = Workload::new(cfg, &mut out).run();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(summary.bad_pages, 0, "{text}");
        assert!(
            text.contains("memverify: free phase filled 1 MiB"),
            "{text}"
        );
        assert_eq!(text.matches("memverify: freed 1 MiB").count(), 1, "{text}");
        assert!(text.contains("bad=0\n"), "{text}");
    }

    #[test]
    fn clean_run_reports_zero_bad_pages() {
        let mut out = Vec::new();
        let summary = Workload::new(small(), &mut out).run();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(summary.bad_pages, 0, "{text}");
        assert!(summary.hot_rewrites > 0, "{text}");
        assert!(text.contains("RESULT=PASS"), "{text}");
        assert!(
            text.contains("memverify: hot pass 1 pages=256 hot_pass_ms="),
            "a full sweep of the 1 MiB hot set is timed: {text}"
        );
    }

    #[test]
    fn sparse_and_skewed_rewrites_verify_and_favour_the_hottest_eighth() {
        let cfg = Config {
            sparse_words: 4,
            hot_skew: 4,
            ..small()
        };
        let mut out = Vec::new();
        let mut w = Workload::new(cfg, &mut out);
        w.fill();
        for _ in 0..4000 {
            w.rewrite_next_hot_timed();
        }
        assert_eq!(w.verify_pass(1, Instant::now()), 0);
        // 256 hot pages: the first 32 take 3 of every 4 rewrites (3000), and their share
        // of the 1000 sweeping ones (3 sweeps and 232 pages more: 4 each).
        let hottest: u64 = w.generations[..32].iter().map(|&g| u64::from(g)).sum();
        let rest: u64 = w.generations[32..].iter().map(|&g| u64::from(g)).sum();
        assert_eq!(hottest + rest, 4000);
        assert_eq!(hottest, 3000 + 4 * 32, "rest {rest}");
        drop(w);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("BAD"), "{text}");
    }

    #[test]
    fn corrupted_cold_and_hot_pages_are_counted() {
        let mut out = Vec::new();
        let mut w = Workload::new(small(), &mut out);
        w.fill();
        // Page 400 is cold (the hot set is pages 0..256); page 3 is hot.
        w.page_mut(400).0[17] ^= 0xff;
        w.page_mut(3).0 = [0; WORDS];
        let t0 = Instant::now();
        assert_eq!(w.verify_pass(1, t0), 2);
        // The hot page is caught again before its rewrite, but counted once.
        for _ in 0..4 {
            w.rewrite_next_hot();
        }
        assert_eq!(w.bad_pages, 2);
        assert_eq!(
            w.verify_pass(2, t0),
            1,
            "the rewritten hot page is good again"
        );
        drop(w);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("BAD page 400"), "{text}");
        assert!(text.contains("BAD hot page 3 before rewrite"), "{text}");
    }
}
