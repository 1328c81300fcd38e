//! Pre-copy between the two lab hosts, pagewise moving the RAM: the source guest (a memfd
//! registered MISSING|WP, served by the real fault loop, its untouched pages in an image)
//! keeps rewriting a hot set while rounds of written pages cross the tc-shaped link into the
//! destination's memory file; then the writer stops (the pause), the final pass sends what
//! is left, and every page of the destination file must equal the source's: with pages sent
//! as they are, with XBZRLE deltas and wire lz4, and in microwiper order.

mod evict_common;
mod twohost;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::migrate::auth::{open_client, open_server, Psk};
use agent::migrate::bulk::SourcePage;
use agent::migrate::delta::{EncodeStats, EncoderConfig, PageEncoder};
use agent::migrate::message::Channel;
use agent::migrate::order::Order;
use agent::migrate::precopy::{
    final_pass, receive_into_file, run_rounds, PrecopyLimits, PrecopyOutcome,
};
use evict_common::real_loop::LoopGuest;
use evict_common::PAGE;
use pager::dirty::SubscribeOptions;
use pager::page_state::PageState;
use twohost::TwoHost;

const PAGES: u64 = 8192; // 32 MiB
/// Pages rewritten continuously (1 MiB: pre-copy converges over the lab's link).
const HOT: u64 = 256;
/// A hot set the link cannot keep up with (16 MiB).
const HOT_BIG: u64 = 4096;

/// One case at a time: each runs a guest, its fault loop, a writer and both ends of a link on
/// two cores, and a writer starved by a second case makes the rounds meaningless.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Hot-set sweeps the writer must make before the rounds start.
const MIN_SWEEPS: u64 = 3;

fn key() -> Psk {
    Psk::new(b"precopy-lab-test-key-01234".to_vec())
}

#[test]
fn precopy_rounds_then_a_final_pass_leave_the_destination_identical() {
    let (outcome, _) = precopy_case("pwpre", EncoderConfig::default(), Order::Address, HOT);
    let later: u64 = outcome.rounds[1..].iter().map(|r| r.pages).sum();
    assert!(
        later > 0 && later < PAGES,
        "later rounds sent {later} pages"
    );
}

#[test]
fn xbzrle_sends_the_rewritten_words_and_the_destination_is_identical() {
    // No lz4 here: this guest's pages compress so well that the whole migration would end
    // before the writer ran (lz4 is tested in migrate_xbzrle and delta/).
    let config = EncoderConfig {
        xbzrle_cache: Some(4 << 20),
        compress: false,
    };
    let (outcome, stats) = precopy_case("pwxbz", config, Order::Address, HOT);
    let x = stats.xbzrle.expect("xbzrle figures");
    assert!(
        x.pages > 0,
        "no page went as a delta: {stats:?} {outcome:?}"
    );
    // The writer changes one word per hot page between sends: a delta is a few bytes.
    assert!(
        x.bytes < x.pages * 64,
        "deltas of {} bytes for {} pages",
        x.bytes,
        x.pages
    );
    // Every page sent again after it was cached went as a delta (whole-page sends after
    // the first round are pages the first round skipped or could not cache).
    assert_eq!(x.overflow, 0, "{stats:?}");
}

#[test]
fn microwiper_sends_fewer_pages_than_address_order_and_the_destination_is_identical() {
    let plain = EncoderConfig::default();
    let (address, _) = precopy_case("pwmwa", plain, Order::Address, HOT_BIG);
    let (wiper, _) = precopy_case("pwmw", plain, Order::Microwiper, HOT_BIG);
    let deferred: u64 = wiper.rounds.iter().map(|r| r.deferred).sum();
    assert!(deferred > 0, "no round was cut: {wiper:?}");
    assert_eq!(wiper.rounds[0].deferred, 0, "the first round sends all");
    let sent =
        |o: &PrecopyOutcome| o.rounds.iter().map(|r| r.pages).sum::<u64>() + o.remaining_estimate;
    assert!(
        sent(&wiper) < sent(&address),
        "microwiper sent {} pages, address order {}",
        sent(&wiper),
        sent(&address)
    );
}

/// One pre-copy across the lab's link; asserts the destination ends identical.
fn precopy_case(
    prefix: &str,
    config: EncoderConfig,
    order: Order,
    hot: u64,
) -> (PrecopyOutcome, EncodeStats) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = TwoHost::up(prefix, "400mbit");
    let guest = Arc::new(LoopGuest::start(PAGES, true).unwrap());
    // Touch half the guest so both resident and never-touched pages cross.
    for p in (0..PAGES).step_by(2) {
        guest.word(p, 2).store(p * 3 + 1, Ordering::SeqCst);
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let destination = lab.on("dst", move || {
        let listener = TcpListener::bind("10.77.0.2:7500").unwrap();
        ready_tx.send(()).unwrap();
        let mut s = listener.accept().unwrap().0;
        let opened = open_server(&mut s, &key()).unwrap();
        let memory = tempfile::tempfile().unwrap();
        memory.set_len(PAGES * PAGE as u64).unwrap();
        let got = receive_into_file(&mut s, &memory, PAGE, PAGES, opened.version).unwrap();
        (memory, got)
    });
    // The guest keeps writing its hot set.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let sweeps = Arc::new(AtomicU64::new(0));
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
    let writer = {
        let (guest, stop, sweeps) = (guest.clone(), stop_writing.clone(), sweeps.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                for p in 0..hot {
                    guest.word(p, 0).store(n, Ordering::SeqCst);
                }
                n += 1;
                sweeps.store(n, Ordering::Release);
                std::thread::sleep(Duration::from_millis(1));
            }
            stopped_tx.send(()).unwrap();
            n
        })
    };
    // The writer must be going before the rounds start (on a loaded machine its first sweep
    // through freshly faulted pages can take longer than a whole fast migration).
    let waited = std::time::Instant::now();
    while sweeps.load(Ordering::Acquire) < MIN_SWEEPS {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the writer made {} sweeps in 30 s",
            sweeps.load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let source = {
        let guest = guest.clone();
        let stop_writing = stop_writing.clone();
        let sweeps = sweeps.clone();
        lab.on("src", move || {
            let mut s = TcpStream::connect("10.77.0.2:7500").unwrap();
            open_client(&mut s, &key(), Channel::Bulk, [9; 16]).unwrap();
            let writes = guest
                .vm
                .dirty
                .subscribe(SubscribeOptions {
                    placed_counts_as_written: true,
                })
                .unwrap();
            let memory = guest.vm.memory_file.as_ref().unwrap().try_clone().unwrap();
            let memory = std::fs::File::from(memory);
            let image = std::fs::File::open(&guest.image_path).unwrap();
            let read = |p: u64, buf: &mut [u8]| -> std::io::Result<SourcePage> {
                // Resident pages from the memory file; the rest from the guest's own source.
                let from = match guest.vm.states.get(p) {
                    PageState::Missing => &image,
                    _ => &memory,
                };
                from.read_exact_at(buf, p * PAGE as u64)?;
                Ok(if swapdev::is_zero_page(buf) {
                    SourcePage::Zero
                } else {
                    SourcePage::Data
                })
            };
            let limits = PrecopyLimits {
                order,
                // Never "converged": every case runs its rounds (a fast first round may leave
                // next to nothing dirty).
                downtime_limit: Duration::ZERO,
                max_rounds: 5,
                max_time: Duration::from_secs(30),
                rewrite_share: None,
            };
            let mut enc = PageEncoder::new(config, PAGE);
            let before = sweeps.load(Ordering::Acquire);
            let outcome =
                run_rounds(&guest.vm, &writes, &mut s, limits, &[], &mut enc, read).unwrap();
            let during = sweeps.load(Ordering::Acquire) - before;
            // The pause: the guest stops writing, the final pass sends what is left.
            stop_writing.store(true, Ordering::Release);
            stopped_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            let final_pages = final_pass(&guest.vm, &writes, &mut s, &mut enc, read).unwrap();
            (outcome, final_pages, enc.stats(), during)
        })
    };
    let (outcome, final_pages, stats, during) = source.join().unwrap();
    let rewrites = writer.join().unwrap();
    let (dest, got) = destination.join().unwrap();
    // Compare every page: the source's content is its memory file for resident pages and its
    // image for the pages never touched.
    let memory = std::fs::File::from(guest.vm.memory_file.as_ref().unwrap().try_clone().unwrap());
    let image = std::fs::File::open(&guest.image_path).unwrap();
    let mut want = vec![0u8; PAGE];
    let mut have = vec![0u8; PAGE];
    let mut bad = Vec::new();
    for p in 0..PAGES {
        let from = match guest.vm.states.get(p) {
            PageState::Missing => &image,
            _ => &memory,
        };
        from.read_exact_at(&mut want, p * PAGE as u64).unwrap();
        dest.read_exact_at(&mut have, p * PAGE as u64).unwrap();
        if want != have {
            bad.push(p);
        }
    }
    assert!(
        bad.is_empty(),
        "{} pages differ, first {:?}",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    assert!(outcome.rounds.len() >= 2, "no second round: {outcome:?}");
    assert!(
        during >= 1,
        "the writer made no sweep during the rounds ({rewrites} in all): {outcome:?}"
    );
    assert_eq!(got.rounds as usize, outcome.rounds.len());
    eprintln!(
        "{prefix}: precopy over 50 MB/s: {} rounds ({:?}), stop rule {:?}, final pass {final_pages} pages, hot-set sweeps {rewrites} ({during} during the rounds), bandwidth {:.1} MB/s, {stats:?}",
        outcome.rounds.len(),
        outcome.rounds.iter().map(|r| (r.pages, r.bytes, r.dirty_after, r.deferred)).collect::<Vec<_>>(),
        outcome.stop,
        outcome.bandwidth / 1e6
    );
    (outcome, stats)
}
