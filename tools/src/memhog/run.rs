//! The access run: N threads touch pages in a pattern, verifying what they read and writing
//! new verifiable versions, pass after pass (or for a duration).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use super::memory::GuestMemory;
use super::pages::PageTable;
use crate::image::{check_page, fill_page, Expected, PAGE_SIZE};
use crate::pattern::{PageStream, Pattern, Rng64, ZipfTable};

/// Discard a range of pages between two passes (exercises UFFD_EVENT_REMOVE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoveSpec {
    pub first: u64,
    pub count: u64,
    /// Discard after this many passes (>= 1).
    pub after_pass: u64,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub pattern: Pattern,
    pub threads: usize,
    /// Passes to run (ignored with `duration`).
    pub passes: u64,
    /// Run for this long instead of a number of passes.
    pub duration: Option<Duration>,
    /// Share of accesses that rewrite the page (after verifying it).
    pub write_ratio: f64,
    /// Seed of the access streams (not of the page content).
    pub access_seed: u64,
    /// Check page content on every access.
    pub verify: bool,
    /// Count first touches that found the page non-resident (mincore before touching).
    pub count_faults: bool,
    pub remove: Option<RemoveSpec>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            pattern: Pattern::Sequential,
            threads: 1,
            passes: 1,
            duration: None,
            write_ratio: 0.0,
            access_seed: 1,
            verify: true,
            count_faults: true,
            remove: None,
        }
    }
}

/// One pass.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    pub seconds: f64,
    pub accesses: u64,
    /// Bytes of pages accessed per second (4 KiB per access).
    pub mib_per_s: f64,
}

/// What a run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pattern: String,
    pub threads: usize,
    pub pages: u64,
    pub passes: Vec<PassReport>,
    pub seconds: f64,
    pub accesses: u64,
    pub writes: u64,
    pub pages_touched: u64,
    /// First touches that found the page absent (they waited for the pager).
    pub first_touch_faults: u64,
    /// Time to resolve those faults, from the faulting thread (first byte read).
    pub fault_latency: Latency,
    pub removed_pages: u64,
    /// Accesses whose check failed.
    pub mismatches: u64,
    pub mismatched_pages: u64,
    /// The first few mismatches, described.
    pub mismatch_examples: Vec<String>,
}

/// Fault latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from_ns(mut ns: Vec<u32>) -> Self {
        if ns.is_empty() {
            return Self::default();
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Self {
            count: ns.len() as u64,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: at(1.0),
        }
    }
}

impl Report {
    pub fn ok(&self) -> bool {
        self.mismatches == 0
    }
}

#[derive(Default)]
struct ThreadTotals {
    accesses: u64,
    writes: u64,
    faults: u64,
    /// Nanoseconds each counted fault took to resolve (first byte read).
    fault_ns: Vec<u32>,
    mismatches: u64,
    examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 8;

struct Worker<'a> {
    mem: &'a GuestMemory,
    table: &'a PageTable,
    cfg: &'a RunConfig,
    rng: Rng64,
    totals: ThreadTotals,
}

impl Worker<'_> {
    fn access(&mut self, page: u64) {
        let g = self.table.lock(page);
        let expected = self.table.expected(&g);
        let seed = self.table.spec().seed;
        // SAFETY: we hold the page's lock, so no other thread touches it.
        let data = unsafe { self.mem.page(page) };
        if g.first_touch() && self.cfg.count_faults && !self.mem.resident(page).unwrap_or(true) {
            self.totals.faults += 1;
            let t = Instant::now();
            // SAFETY: reading one byte of the locked page through a raw pointer, so the
            // compiler cannot elide or move the faulting access.
            unsafe { std::ptr::read_volatile(data.as_ptr()) };
            let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
            self.totals.fault_ns.push(ns);
        }
        let mismatch = if self.cfg.verify {
            check_page(data, page, seed, expected)
        } else {
            // Touch it anyway: the access is the point.
            std::hint::black_box(data[0]);
            None
        };
        if let Some(m) = &mismatch {
            self.totals.mismatches += 1;
            if self.totals.examples.len() < MAX_EXAMPLES {
                self.totals.examples.push(m.to_string());
            }
        }
        self.totals.accesses += 1;
        let write = self.cfg.write_ratio > 0.0 && self.rng.unit() < self.cfg.write_ratio;
        let wrote = write.then(|| {
            let v = self.table.next_version(&g);
            // SAFETY: we hold the page's lock, so this is the only access to it.
            let data = unsafe { self.mem.page_mut(page) };
            fill_page(data, page, seed, Expected::Version(v as u64));
            self.totals.writes += 1;
            v
        });
        self.table.unlock(g, wrote, mismatch.is_some());
    }
}

/// Discard `spec`'s pages and mark them zero (all other threads wait at a barrier).
fn discard(mem: &GuestMemory, table: &PageTable, spec: RemoveSpec) -> anyhow::Result<()> {
    let guards: Vec<_> = (spec.first..spec.first + spec.count)
        .map(|p| table.lock(p))
        .collect();
    // SAFETY: we hold the locks of every page in the range.
    let r = unsafe { mem.discard(spec.first, spec.count) };
    for g in guards {
        if r.is_ok() {
            table.unlock_zeroed(g);
        } else {
            table.unlock(g, None, false);
        }
    }
    r
}

/// Run `cfg` over `mem`, whose expected content `table` tracks.
pub fn run(mem: &GuestMemory, table: &PageTable, cfg: &RunConfig) -> anyhow::Result<Report> {
    if cfg.threads == 0 {
        bail!("need at least one thread");
    }
    if !(0.0..=1.0).contains(&cfg.write_ratio) {
        bail!("write ratio {} is not in [0, 1]", cfg.write_ratio);
    }
    let pages = mem.pages();
    if let Some(r) = cfg.remove {
        if cfg.duration.is_some() {
            bail!("--remove needs a pass count, not a duration");
        }
        if r.count == 0
            || r.first + r.count > pages
            || r.after_pass == 0
            || r.after_pass > cfg.passes
        {
            bail!(
                "remove range {}+{} after pass {} does not fit {pages} pages and {} passes",
                r.first,
                r.count,
                r.after_pass,
                cfg.passes
            );
        }
    }
    let zipf = match cfg.pattern {
        Pattern::Zipf { theta } => Some(Arc::new(ZipfTable::new(pages, theta))),
        _ => None,
    };
    let threads = cfg.threads as u64;
    let passes = if cfg.duration.is_some() {
        1
    } else {
        cfg.passes
    };
    let barrier = Barrier::new(cfg.threads);
    let pass_marks = std::sync::Mutex::new(Vec::<(Instant, u64)>::new());
    let remove_error = std::sync::Mutex::new(None::<anyhow::Error>);
    let start = Instant::now();
    let totals: Vec<ThreadTotals> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let zipf = zipf.clone();
                let (barrier, pass_marks, remove_error) = (&barrier, &pass_marks, &remove_error);
                s.spawn(move || {
                    let mut stream =
                        PageStream::new(&cfg.pattern, pages, t, threads, cfg.access_seed, zipf);
                    let mut w = Worker {
                        mem,
                        table,
                        cfg,
                        rng: Rng64::new(cfg.access_seed.wrapping_add(1000 + t)),
                        totals: ThreadTotals::default(),
                    };
                    let per_pass = stream.pass_len(threads);
                    for pass in 1..=passes {
                        match cfg.duration {
                            Some(d) => {
                                let deadline = start + d;
                                'timed: loop {
                                    for _ in 0..256 {
                                        w.access(stream.next_page());
                                    }
                                    if Instant::now() >= deadline {
                                        break 'timed;
                                    }
                                }
                            }
                            None => {
                                for _ in 0..per_pass {
                                    w.access(stream.next_page());
                                }
                            }
                        }
                        let acc = w.totals.accesses;
                        if barrier.wait().is_leader() {
                            let mut marks = pass_marks.lock().expect("marks lock");
                            marks.push((Instant::now(), 0));
                            if let Some(r) = cfg.remove.filter(|r| r.after_pass == pass) {
                                if let Err(e) = discard(mem, table, r) {
                                    *remove_error.lock().expect("error lock") = Some(e);
                                }
                            }
                        }
                        barrier.wait();
                        pass_marks.lock().expect("marks lock")[pass as usize - 1].1 += acc;
                    }
                    w.totals
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("memhog worker panicked"))
            .collect()
    });
    if let Some(e) = remove_error.into_inner().expect("error lock") {
        return Err(e.context("discarding pages mid-run"));
    }
    let marks = pass_marks.into_inner().expect("marks lock");
    let mut prev = (start, 0u64);
    let mut pass_reports = Vec::new();
    for &(at, cumulative) in &marks {
        let seconds = (at - prev.0).as_secs_f64();
        let accesses = cumulative - prev.1;
        pass_reports.push(PassReport {
            seconds,
            accesses,
            mib_per_s: accesses as f64 * PAGE_SIZE as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        });
        prev = (at, cumulative);
    }
    let mut examples = Vec::new();
    for t in &totals {
        examples.extend(t.examples.iter().cloned());
    }
    examples.truncate(MAX_EXAMPLES);
    Ok(Report {
        pattern: format!("{:?}", cfg.pattern),
        threads: cfg.threads,
        pages,
        passes: pass_reports,
        seconds: marks.last().map_or(0.0, |m| (m.0 - start).as_secs_f64()),
        accesses: totals.iter().map(|t| t.accesses).sum(),
        writes: totals.iter().map(|t| t.writes).sum(),
        pages_touched: table.touched_pages(),
        first_touch_faults: totals.iter().map(|t| t.faults).sum(),
        fault_latency: Latency::from_ns(
            totals
                .iter()
                .flat_map(|t| t.fault_ns.iter().copied())
                .collect(),
        ),
        removed_pages: cfg.remove.map_or(0, |r| r.count),
        mismatches: totals.iter().map(|t| t.mismatches).sum(),
        mismatched_pages: table.mismatched_pages(),
        mismatch_examples: examples,
    })
}
