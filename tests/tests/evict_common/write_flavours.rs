//! The two write-tracking flavours the kernel offers, measured on the same writer:
//! - **sync WP** (what pagewise ships): the guest range is write-protected every interval;
//!   each first write per interval is a WP fault the pager's real fault loop resolves
//!   (`dirty::resolve_write_fault`: claim, mark every subscription, un-protect, wake);
//!   harvest = what `evict::protect_and_sample` does before the tracker's bookkeeping: one
//!   WRITEPROTECT ioctl per run, then the subscription's bitmap.
//! - **WP_ASYNC + PAGEMAP_SCAN**: the uffd has `UFFD_FEATURE_WP_ASYNC`, so the kernel resolves
//!   write faults itself (clears the uffd-wp bit, sets "written"); harvest = one PAGEMAP_SCAN
//!   over the range with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` for `PAGE_IS_WRITTEN`
//!   pages (get-and-clear: the scan re-protects what it reports).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uffd::{Features, PageCategories, PageRegion, Pagemap, RegisterMode, ScanQuery, Uffd};

use super::real_loop::LoopGuest;
use super::PAGE;

/// Which flavour a measurement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    SyncWp,
    AsyncWp,
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub flavour: Flavour,
    pub interval: Option<Duration>,
    /// Writes per second over the whole run (wall clock: moves with the machine's load).
    pub writes_per_s: f64,
    pub samples: u64,
    /// Median wall time of one harvest (protect + collect the written pages).
    pub harvest_us: f64,
    /// Mean pages reported written per harvest.
    pub written_per_sample: f64,
    /// WP faults the pager handled (sync WP only; the kernel handles async ones).
    pub wp_faults: u64,
    /// Median latency of one write in a sweep with no tracking in it (includes the timing).
    pub clean_write_ns: f64,
    /// Median / 90th percentile latency of a page's first write after a harvest: what
    /// tracking one written page costs the writer.
    pub first_write_us: f64,
    pub first_write_p90_us: f64,
}

/// A memfd guest whose uffd has WP_ASYNC: written pages are found with PAGEMAP_SCAN.
pub struct AsyncGuest {
    _memfd: File,
    map: memmap2::MmapRaw,
    _uffd: Uffd,
    pages: u64,
}

impl AsyncGuest {
    /// `pages` pages, all resident (written into the memfd first), registered WP with
    /// WP_ASYNC and write-protected once.
    pub fn new(pages: u64) -> anyhow::Result<Self> {
        let fd =
            nix::sys::memfd::memfd_create(c"pw-wp-async", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let memfd = File::from(fd);
        let len = pages * PAGE as u64;
        memfd.set_len(len)?;
        let page = vec![0x5Au8; PAGE];
        for p in 0..pages {
            memfd.write_all_at(&page, p * PAGE as u64)?;
        }
        let map = memmap2::MmapOptions::new()
            .len(len as usize)
            .map_raw(&memfd)?;
        let uffd = Uffd::new(Default::default())?;
        uffd.api(Features::WP_ASYNC | Features::WP_HUGETLBFS_SHMEM | Features::WP_UNPOPULATED)?;
        let base = map.as_ptr() as u64;
        uffd.register(base, len, RegisterMode::WP)?;
        uffd.write_protect(base, len, true, false)?;
        Ok(Self {
            _memfd: memfd,
            map,
            _uffd: uffd,
            pages,
        })
    }

    pub fn word(&self, page: u64) -> &AtomicU64 {
        assert!(page < self.pages);
        // SAFETY: inside our live shared mapping, 8-byte aligned, only accessed atomically.
        unsafe { &*((self.map.as_ptr() as u64 + page * PAGE as u64) as *const AtomicU64) }
    }
}

/// Something a writer sweeps: word 0 of each hot page.
trait HotWords: Send + Sync + 'static {
    fn hot_word(&self, page: u64) -> &AtomicU64;
}

impl HotWords for LoopGuest {
    fn hot_word(&self, page: u64) -> &AtomicU64 {
        self.word(page, 0)
    }
}

impl HotWords for AsyncGuest {
    fn hot_word(&self, page: u64) -> &AtomicU64 {
        self.word(page)
    }
}

/// What the writer measured.
#[derive(Default)]
struct Sweeps {
    writes: u64,
    samples: u64,
    written: u64,
    harvests: Vec<Duration>,
    clean: Vec<Duration>,
    first: Vec<Duration>,
}

/// The writer: sweep `hot` pages (one 8-byte write per page per sweep) for `run`. Every
/// `interval` it stops and harvests itself (so no harvest overlaps a sweep). The first sweep
/// after a harvest (and after the initial protect) times each write: every one is a page's
/// first write since the protect. The second sweep is timed too, as the clean reference.
fn writer(
    g: &dyn HotWords,
    hot: u64,
    run: Duration,
    interval: Option<Duration>,
    harvest: &mut dyn FnMut(&mut Vec<u64>) -> anyhow::Result<()>,
) -> anyhow::Result<Sweeps> {
    let mut m = Sweeps::default();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut next = interval.map(|i| started + i);
    let (mut gen, mut since_harvest) = (1u64, 0u64);
    while started.elapsed() < run {
        let timed = match since_harvest {
            0 => Some(&mut m.first),
            1 => Some(&mut m.clean),
            _ => None,
        };
        match timed {
            Some(into) => {
                for p in 0..hot {
                    let t = Instant::now();
                    g.hot_word(p).store(gen, Ordering::Relaxed);
                    into.push(t.elapsed());
                }
            }
            None => {
                for p in 0..hot {
                    g.hot_word(p).store(gen, Ordering::Relaxed);
                }
            }
        }
        m.writes += hot;
        gen += 1;
        since_harvest += 1;
        if let (Some(at), Some(every)) = (next, interval) {
            let now = Instant::now();
            if now >= at {
                out.clear();
                harvest(&mut out)?;
                m.harvests.push(now.elapsed());
                m.samples += 1;
                m.written += out.len() as u64;
                since_harvest = 0;
                next = Some(at.max(now) + every);
            }
        }
    }
    Ok(m)
}

fn percentile(v: &mut [Duration], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q) as usize;
    v[i].as_secs_f64() * 1e6
}

/// Measure one flavour: a writer sweeping `hot` of `pages` pages for `run`, harvesting every
/// `interval` (None: no tracking after the initial protect).
pub fn measure(
    flavour: Flavour,
    pages: u64,
    hot: u64,
    interval: Option<Duration>,
    run: Duration,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let (mut m, wp_faults) = match flavour {
        Flavour::SyncWp => {
            let guest = LoopGuest::start(pages, false)?;
            // Fault every page in (MISSING through the fault loop) before measuring.
            for p in 0..pages {
                guest.word(p, 0).store(0, Ordering::Relaxed);
            }
            let layout = guest.layout();
            let subs = guest.vm.dirty.subscribe(Default::default())?;
            let mut harvest = |out: &mut Vec<u64>| -> anyhow::Result<()> {
                for run in layout.all_runs() {
                    guest
                        .vm
                        .uffd
                        .write_protect(run.host_addr, run.byte_len(PAGE), true, false)?;
                }
                subs.harvest_into(out);
                Ok(())
            };
            harvest(&mut Vec::new())?;
            let wp0 = guest.vm.metrics.snapshot().wp_faults;
            let m = writer(&guest, hot, run, interval, &mut harvest)?;
            (m, guest.vm.metrics.snapshot().wp_faults - wp0)
        }
        Flavour::AsyncWp => {
            let g = AsyncGuest::new(pages)?;
            let mut scanner = ScanHandle::new(&g)?;
            scanner.harvest(&mut Vec::new())?;
            let m = writer(&g, hot, run, interval, &mut |out| scanner.harvest(out))?;
            (m, 0)
        }
    };
    let elapsed = started.elapsed().min(run.max(Duration::from_millis(1)));
    Ok(Row {
        flavour,
        interval,
        writes_per_s: m.writes as f64 / elapsed.as_secs_f64(),
        samples: m.samples,
        harvest_us: percentile(&mut m.harvests, 0.5),
        written_per_sample: if m.samples == 0 {
            0.0
        } else {
            m.written as f64 / m.samples as f64
        },
        wp_faults,
        clean_write_ns: percentile(&mut m.clean, 0.5) * 1e3,
        first_write_us: percentile(&mut m.first, 0.5),
        first_write_p90_us: percentile(&mut m.first, 0.9),
    })
}

/// The WP_ASYNC harvest over an [`AsyncGuest`]'s range: get-and-clear the written pages
/// (the scan write-protects them again), appending their indices.
pub struct ScanHandle {
    pagemap: Pagemap,
    base: u64,
    pages: u64,
    regions: Vec<PageRegion>,
}

impl ScanHandle {
    pub fn new(g: &AsyncGuest) -> anyhow::Result<Self> {
        Ok(Self {
            pagemap: Pagemap::open_self()?,
            base: g.map.as_ptr() as u64,
            pages: g.pages,
            regions: Vec::new(),
        })
    }

    pub fn harvest(&mut self, out: &mut Vec<u64>) -> anyhow::Result<()> {
        let end = self.base + self.pages * PAGE as u64;
        let q = ScanQuery {
            required: PageCategories::WRITTEN,
            report: PageCategories::WRITTEN,
            write_protect_matching: true,
            check_wp_async: true,
            ..Default::default()
        };
        let mut at = self.base;
        while at < end {
            self.regions.clear();
            at = self.pagemap.scan(at, end, &q, &mut self.regions, 1024)?;
            for r in &self.regions {
                out.extend((r.start - self.base) / PAGE as u64..(r.end - self.base) / PAGE as u64);
            }
        }
        Ok(())
    }
}
