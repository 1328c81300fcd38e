//! The source's migration journal decoder (`agent/src/migrate/session/source/journal.rs`,
//! which a restarted daemon reads from disk): any input either fails with an error or is a
//! journal that encodes and decodes back to itself, with one known place per page. The
//! heap held is bounded by the input (the page map's declared size cannot exceed what lz4
//! could pack into the bytes given). The first byte chooses whether the rest is taken as it
//! is or with its last four bytes replaced by the right checksum, so the fuzzer reaches the
//! header and the page map behind the crc32c.
#![no_main]

use agent::migrate::session::source::journal::Journal;
use libfuzzer_sys::fuzz_target;
use pagewise_fuzz::{journal_round_trip, Counting};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|input: &[u8]| {
    let Some(journal) = journal_round_trip(input, Journal::decode, Journal::encode) else {
        return;
    };
    assert_eq!(journal.map.len() as u64, journal.header.pages);
    for p in 0..journal.header.pages.min(64) {
        let _ = journal.place(p);
    }
});
