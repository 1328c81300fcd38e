//! The destination's migration journal decoder (`agent/src/migrate/session/incoming/
//! journal.rs`, which a restarted destination daemon reads from disk before it takes a VM
//! back): any input either fails with an error or is a journal that encodes and decodes back
//! to itself, whose runs of routes cover its pages exactly. The heap held is bounded by the
//! input. The first byte chooses whether the rest is taken as it is or with its last four
//! bytes replaced by the right checksum, so the fuzzer reaches the header and the map.
#![no_main]

use agent::migrate::session::incoming::journal::Journal;
use libfuzzer_sys::fuzz_target;
use pagewise_fuzz::{journal_round_trip, Counting};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|input: &[u8]| {
    let Some(journal) = journal_round_trip(input, Journal::decode, Journal::encode) else {
        return;
    };
    assert_eq!(journal.map.len() as u64, journal.header.pages);
    if journal.header.pages <= 1 << 16 {
        let runs = journal.runs();
        let mut next = 0;
        for (first, count, route) in runs {
            assert_eq!(first, next, "runs leave no gap");
            assert!(count > 0);
            assert_eq!(journal.route(first), route);
            next = first + count;
        }
        assert_eq!(next, journal.header.pages, "runs cover every page");
    }
});
