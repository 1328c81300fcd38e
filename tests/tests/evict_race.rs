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

mod evict_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evict_common::{Guest, Handler};
use pager::evict::PageStore;
use pager::page_state::PageState;
use rand::seq::SliceRandom;
use rand::Rng;

const WRITERS: usize = 2;
const PAGES_PER_WRITER: u64 = 48;

struct WriterResult {
    writes: u64,
    lost: u64,
    last: Vec<u64>,
}

/// Check-before-write on the writer's own pages until `stop`.
fn writer(
    guest: Arc<Guest>,
    first: u64,
    stop: Arc<AtomicBool>,
    lost_seen: Arc<AtomicU64>,
) -> WriterResult {
    let mut last = vec![0u64; PAGES_PER_WRITER as usize];
    let (mut writes, mut lost) = (0u64, 0u64);
    let mut rng = rand::rng();
    while !stop.load(Ordering::Relaxed) {
        let i = rng.random_range(0..PAGES_PER_WRITER) as usize;
        let word = guest.word(first + i as u64);
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
    let pages = WRITERS as u64 * PAGES_PER_WRITER;
    let guest = Arc::new(Guest::new(pages)?);
    let handler = Handler::spawn(guest.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let lost_seen = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (g, s, l) = (guest.clone(), stop.clone(), lost_seen.clone());
            std::thread::spawn(move || writer(g, w as u64 * PAGES_PER_WRITER, s, l))
        })
        .collect();

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
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    let mut lost = 0;
    let mut finals = Vec::new();
    for (w, h) in writers.into_iter().enumerate() {
        let r = h.join().expect("writer panicked");
        writes += r.writes;
        lost += r.lost;
        finals.push((w as u64 * PAGES_PER_WRITER, r.last));
    }
    // Final state: every page holds the last value its writer wrote (reading refaults
    // evicted pages through the handler).
    let mut final_mismatches = 0;
    for (first, last) in finals {
        for (i, v) in last.iter().enumerate() {
            if guest.word(first + i as u64).load(Ordering::SeqCst) != *v {
                final_mismatches += 1;
            }
        }
    }
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
