//! Eviction must never lose a write.
//!
//! A memfd mapped shared and registered MISSING|WP with a real userfaultfd stands in for a
//! VMM's guest RAM; a fault-handler thread serves it the way the daemon's fault loop does
//! (write-protect faults through `dirty::resolve_write_fault`, MISSING faults from the page
//! store). Writer threads each own a set of pages and, before every write, check that the
//! page still holds the last value they wrote there, while the evictor evicts those same
//! pages in a loop and the working-set sampler re-protects everything periodically.
//!
//! `evicting_without_write_protect_loses_writes` runs the same loop with an eviction that
//! skips only the write-protect step, and requires the checker to catch lost writes: proof
//! that the first test can fail.
//!
//! The `real_fault_loop_*` pair runs the same race with the pager's real
//! `pager::fault_loop::FaultLoop` serving the faults (WP faults through the fault loop's own
//! `write_fault`, MISSING faults read back from the image the evictor stores into), again
//! with its negative control.

mod evict_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evict_common::real_loop::LoopGuest;
use evict_common::{Guest, Handler};
use pager::evict::PageStore;
use pager::page_state::PageState;
use pager::wss::{WorkingSetTracker, WssConfig};
use rand::seq::SliceRandom;
use rand::Rng;

const WRITERS: usize = 2;
const PAGES_PER_WRITER: u64 = 48;

struct WriterResult {
    writes: u64,
    lost: u64,
    last: Vec<u64>,
}

/// Word 0 of a guest page, whichever guest serves it.
trait Words: Send + Sync + 'static {
    fn word0(&self, page: u64) -> &AtomicU64;
}

impl Words for Guest {
    fn word0(&self, page: u64) -> &AtomicU64 {
        self.word(page)
    }
}

impl Words for LoopGuest {
    fn word0(&self, page: u64) -> &AtomicU64 {
        self.word(page, 0)
    }
}

/// Check-before-write on the writer's own pages until `stop`.
fn writer<G: Words>(
    guest: Arc<G>,
    first: u64,
    stop: Arc<AtomicBool>,
    lost_seen: Arc<AtomicU64>,
) -> WriterResult {
    let mut last = vec![0u64; PAGES_PER_WRITER as usize];
    let (mut writes, mut lost) = (0u64, 0u64);
    let mut rng = rand::rng();
    while !stop.load(Ordering::Relaxed) {
        let i = rng.random_range(0..PAGES_PER_WRITER) as usize;
        let word = guest.word0(first + i as u64);
        let seen = word.load(Ordering::SeqCst);
        if seen != last[i] {
            lost += 1;
            lost_seen.fetch_add(1, Ordering::Relaxed);
        }
        let next = last[i].max(seen) + 1;
        word.store(next, Ordering::SeqCst);
        last[i] = next;
        writes += 1;
    }
    WriterResult { writes, lost, last }
}

/// The writer threads of one race and what they saw.
struct Writers {
    stop: Arc<AtomicBool>,
    lost_seen: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<WriterResult>>,
}

impl Writers {
    fn spawn<G: Words>(guest: &Arc<G>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lost_seen = Arc::new(AtomicU64::new(0));
        let threads = (0..WRITERS)
            .map(|w| {
                let (g, s, l) = (guest.clone(), stop.clone(), lost_seen.clone());
                std::thread::spawn(move || writer(g, w as u64 * PAGES_PER_WRITER, s, l))
            })
            .collect();
        Self {
            stop,
            lost_seen,
            threads,
        }
    }

    /// Stop and join the writers; returns (writes, lost writes seen, pages whose final
    /// content is not the last value written). Reading the final state refaults evicted
    /// pages through whatever serves the guest.
    fn finish<G: Words>(self, guest: &G) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut writes, mut lost, mut final_mismatches) = (0, 0, 0);
        for (w, h) in self.threads.into_iter().enumerate() {
            let r = h.join().expect("writer panicked");
            writes += r.writes;
            lost += r.lost;
            let first = w as u64 * PAGES_PER_WRITER;
            for (i, v) in r.last.iter().enumerate() {
                if guest.word0(first + i as u64).load(Ordering::SeqCst) != *v {
                    final_mismatches += 1;
                }
            }
        }
        (writes, lost, final_mismatches)
    }
}

struct RaceOutcome {
    writes: u64,
    lost: u64,
    evicted: u64,
    samples: u64,
    handler: evict_common::HandlerCounts,
    final_mismatches: u64,
}

/// Run writers against an evictor for at most `max`, until `enough` pages were evicted (and,
/// when `stop_on_loss`, as soon as a lost write is seen).
fn race(
    protected: bool,
    max: Duration,
    enough: u64,
    stop_on_loss: bool,
) -> anyhow::Result<RaceOutcome> {
    race_on(
        Guest::new(WRITERS as u64 * PAGES_PER_WRITER)?,
        protected,
        max,
        enough,
        stop_on_loss,
    )
}

fn race_on(
    guest: Guest,
    protected: bool,
    max: Duration,
    enough: u64,
    stop_on_loss: bool,
) -> anyhow::Result<RaceOutcome> {
    let pages = WRITERS as u64 * PAGES_PER_WRITER;
    let guest = Arc::new(guest);
    let handler = Handler::spawn(guest.clone());
    let writers = Writers::spawn(&guest);
    let lost_seen = writers.lost_seen.clone();

    let started = Instant::now();
    let mut evicted = 0u64;
    let mut samples = 0u64;
    let mut last_sample = Instant::now();
    let mut all: Vec<u64> = (0..pages).collect();
    let mut rng = rand::rng();
    let mut buf = Vec::new();
    while started.elapsed() < max && evicted < enough {
        all.shuffle(&mut rng);
        let n = rng.random_range(1..=32);
        let mut batch = all[..n].to_vec();
        batch.sort_unstable();
        if protected {
            let target = guest.eviction_target();
            match target.evict_batch(&batch, &mut buf) {
                Ok(o) => evicted += (o.evicted + o.zero) as u64,
                Err((_, e)) => anyhow::bail!("eviction failed: {e}"),
            }
            if stop_on_loss && lost_seen.load(Ordering::Relaxed) > 0 {
                break;
            }
            if last_sample.elapsed() > Duration::from_millis(30) {
                guest.protect_and_sample()?;
                samples += 1;
                last_sample = Instant::now();
            }
        } else {
            evicted += guest.evict_without_write_protect(&batch, &mut buf)?;
            if stop_on_loss && lost_seen.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        std::thread::yield_now();
    }
    let (writes, lost, final_mismatches) = writers.finish(&*guest);
    let handler = handler.stop();
    Ok(RaceOutcome {
        writes,
        lost,
        evicted,
        samples,
        handler,
        final_mismatches,
    })
}

#[test]
fn eviction_with_write_protect_loses_no_write() -> anyhow::Result<()> {
    let o = race(true, Duration::from_secs(20), 6000, false)?;
    eprintln!(
        "protected: {} evictions, {} writes, {} lost, {} samples, handler {:?}",
        o.evicted, o.writes, o.lost, o.samples, o.handler
    );
    assert_eq!(o.lost, 0, "a writer found its last write gone");
    assert_eq!(o.final_mismatches, 0, "final page contents differ");
    assert!(o.evicted >= 2000, "only {} evictions ran", o.evicted);
    assert!(o.writes >= 10_000, "only {} writes ran", o.writes);
    // The race window was really exercised: writers blocked on pages being evicted, came
    // back through refaults, and write tracking un-protected pages concurrently.
    assert!(
        o.handler.held_for_eviction > 0,
        "no writer hit a page being evicted"
    );
    assert!(o.handler.refaults > 0, "no evicted page was faulted back");
    assert!(o.handler.tracked > 0, "write tracking never fired");
    Ok(())
}

#[test]
fn evicting_without_write_protect_loses_writes() -> anyhow::Result<()> {
    let o = race(false, Duration::from_secs(20), u64::MAX, true)?;
    eprintln!(
        "unprotected: {} evictions, {} writes, {} lost, handler {:?}",
        o.evicted, o.writes, o.lost, o.handler
    );
    assert!(
        o.lost + o.final_mismatches > 0,
        "the checker saw no lost write in {} unprotected evictions",
        o.evicted
    );
    Ok(())
}

/// The other write-tracking flavour, `UFFD_FEATURE_WP_ASYNC`, under the full real protocol
/// (claim, write-protect, read, store, punch, wake): the kernel resolves the writers' WP
/// faults itself, so nothing holds a write between the read and the punch and writes are
/// lost. Why pagewise keeps synchronous WP (docs/evict.md, "Write tracking").
#[test]
fn eviction_on_a_wp_async_uffd_loses_writes() -> anyhow::Result<()> {
    let guest = Guest::with_features(WRITERS as u64 * PAGES_PER_WRITER, uffd::Features::WP_ASYNC)?;
    let o = race_on(guest, true, Duration::from_secs(20), u64::MAX, true)?;
    eprintln!(
        "WP_ASYNC, full protocol: {} evictions, {} writes, {} lost, {} final mismatches, \
         handler {:?}",
        o.evicted, o.writes, o.lost, o.final_mismatches, o.handler
    );
    assert_eq!(
        o.handler.tracked + o.handler.held_for_eviction,
        0,
        "WP faults reached the pager"
    );
    assert!(
        o.lost + o.final_mismatches > 0,
        "no write lost in {} evictions with WP_ASYNC",
        o.evicted
    );
    Ok(())
}

#[test]
fn removed_pages_are_forgotten_and_read_as_zero() -> anyhow::Result<()> {
    let guest = Arc::new(Guest::new(16)?);
    let handler = Handler::spawn(guest.clone());
    let target = guest.eviction_target();
    let mut buf = Vec::new();
    let o = target
        .evict_batch(&[2, 3, 4], &mut buf)
        .map_err(|(_, e)| e)?;
    assert_eq!(o.evicted, 3);
    assert!(guest.store.holds(3));
    // The guest frees pages 3..5 (what QEMU does for a reported free page).
    guest.discard(3..5)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while guest.states.get(4) != PageState::Removed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(guest.states.get(3), PageState::Removed);
    assert!(!guest.store.holds(3), "a removed page is still stored");
    assert!(!guest.store.holds(4));
    assert!(guest.store.holds(2));
    // Touching them gives zero pages, not the evicted content; page 2 comes back intact.
    assert_eq!(guest.word(3).load(Ordering::SeqCst), 0);
    assert_eq!(guest.word(4).load(Ordering::SeqCst), 0);
    assert_eq!(guest.word(2).load(Ordering::SeqCst), 0);
    assert_eq!(guest.tag(2), 3, "page 2 lost its content");
    assert_eq!(guest.tag(3), 0);
    let counts = handler.stop();
    assert!(counts.removes > 0);
    assert_eq!(guest.store.forget_pages(&[]).ok(), Some(()));
    Ok(())
}

#[test]
fn a_victim_written_after_selection_stays_resident() -> anyhow::Result<()> {
    let guest = Arc::new(Guest::new(64)?);
    let handler = Handler::spawn(guest.clone());
    let target = guest.eviction_target();
    let cancel = AtomicBool::new(false);
    let mut first = true;
    // The first progress report comes after victim selection, before the first batch.
    let r = pager::evict::run_eviction(
        &target,
        &guest.wss_writes,
        pager::evict::EvictGoal::TargetResidentPages(0),
        16,
        &cancel,
        &mut |_| {
            if std::mem::take(&mut first) {
                guest.writes.mark_written(40);
            }
        },
    )?;
    assert_eq!(r.progress.planned, 64);
    assert_eq!(r.progress.evicted, 63, "{r:?}");
    assert_eq!(r.progress.skipped, 1, "{r:?}");
    assert_eq!(guest.states.get(40), PageState::Present);
    assert_eq!(guest.states.get(41), PageState::Evicted);
    assert_eq!(guest.tag(41), 42);
    handler.stop();
    Ok(())
}

/// What a race on the real fault loop did.
struct LoopRaceOutcome {
    writes: u64,
    lost: u64,
    evicted: u64,
    samples: u64,
    final_mismatches: u64,
    metrics: pager::metrics::MetricsSnapshot,
}

/// [`race`] with the pager's real `FaultLoop` serving the guest from the image the evictor
/// stores into.
fn race_real_loop(
    protected: bool,
    max: Duration,
    enough: u64,
    stop_on_loss: bool,
) -> anyhow::Result<LoopRaceOutcome> {
    let pages = WRITERS as u64 * PAGES_PER_WRITER;
    let guest = Arc::new(LoopGuest::start(pages, true)?);
    let (layout, store) = (guest.layout(), guest.store()?);
    let tracker = WorkingSetTracker::new(guest.states(), WssConfig::default());
    let wss_writes = guest.vm.dirty.subscribe(Default::default())?;
    let writers = Writers::spawn(&guest);
    let lost_seen = writers.lost_seen.clone();

    let started = Instant::now();
    let (mut evicted, mut samples) = (0u64, 0u64);
    let mut last_sample = Instant::now();
    let mut all: Vec<u64> = (0..pages).collect();
    let mut rng = rand::rng();
    let mut buf = Vec::new();
    let target = guest.eviction_target(&layout, &store, &tracker);
    while started.elapsed() < max && evicted < enough {
        all.shuffle(&mut rng);
        let n = rng.random_range(1..=32);
        let mut batch = all[..n].to_vec();
        batch.sort_unstable();
        if protected {
            match target.evict_batch(&batch, &mut buf) {
                Ok(o) => evicted += (o.evicted + o.zero) as u64,
                Err((_, e)) => anyhow::bail!("eviction failed: {e}"),
            }
            if last_sample.elapsed() > Duration::from_millis(30) {
                pager::evict::protect_and_sample(
                    &guest.vm.uffd,
                    &layout,
                    guest.states(),
                    &wss_writes,
                    &tracker,
                )?;
                samples += 1;
                last_sample = Instant::now();
            }
        } else {
            let file = guest.vm.memory_file.as_ref().expect("memory file");
            evicted += evict_common::evict_without_write_protect(
                guest.states(),
                std::os::fd::AsFd::as_fd(file),
                &store,
                &guest.vm.uffd,
                &|p| guest.host_addr(p),
                &batch,
                &mut buf,
            )?;
            if stop_on_loss && lost_seen.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        std::thread::yield_now();
    }
    let (writes, lost, final_mismatches) = writers.finish(&*guest);
    // Every page still holds its tag (word 1), served back by the fault loop.
    for p in 0..pages {
        anyhow::ensure!(
            guest.word(p, 1).load(Ordering::SeqCst) == p + 1,
            "page {p} lost its tag"
        );
    }
    let mut guest = Arc::try_unwrap(guest).ok().expect("the writers are gone");
    assert_eq!(guest.stop(), pager::fault_loop::LoopExit::Stopped);
    Ok(LoopRaceOutcome {
        writes,
        lost,
        evicted,
        samples,
        final_mismatches,
        metrics: guest.vm.metrics.snapshot(),
    })
}

#[test]
fn real_fault_loop_eviction_with_write_protect_loses_no_write() -> anyhow::Result<()> {
    let o = race_real_loop(true, Duration::from_secs(20), 6000, false)?;
    let m = &o.metrics;
    eprintln!(
        "real fault loop, protected: {} evictions, {} writes, {} lost, {} samples, {} WP faults, \
         {} faults ({} read from the image)",
        o.evicted, o.writes, o.lost, o.samples, m.wp_faults, m.faults, m.faults_to_source
    );
    assert_eq!(o.lost, 0, "a writer found its last write gone");
    assert_eq!(o.final_mismatches, 0, "final page contents differ");
    assert!(o.evicted >= 2000, "only {} evictions ran", o.evicted);
    assert!(o.writes >= 10_000, "only {} writes ran", o.writes);
    // Evicted pages came back through the real fault loop, and its WP path ran.
    assert!(m.faults_to_source > o.evicted / 2, "refaults {m:?}");
    assert!(
        m.wp_faults > 0,
        "the fault loop never saw a write-protect fault"
    );
    Ok(())
}

#[test]
fn real_fault_loop_evicting_without_write_protect_loses_writes() -> anyhow::Result<()> {
    let o = race_real_loop(false, Duration::from_secs(20), u64::MAX, true)?;
    eprintln!(
        "real fault loop, unprotected: {} evictions, {} writes, {} lost, {} final mismatches",
        o.evicted, o.writes, o.lost, o.final_mismatches
    );
    assert!(
        o.lost + o.final_mismatches > 0,
        "the checker saw no lost write in {} unprotected evictions",
        o.evicted
    );
    Ok(())
}
