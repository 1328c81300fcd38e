//! The Firecracker attach handshake (`read_handshake` on a stream starting with `[`): the
//! JSON array of regions in chunks of 1..=63 bytes or whole, with 0..=3 fds (first byte).
//! Accepted only with exactly one fd; the regions survive a JSON round trip; regions that
//! make a `GuestLayout` map each first and last page to its address and back; and no more
//! heap is held than the receive buffer and a small multiple of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pager::attach::protocol::{
    read_handshake, GuestRegionUffdMapping, Handshake, MAX_HANDSHAKE_BYTES,
};
use pager::layout::GuestLayout;
use pagewise_fuzz::attach::{check_layout, Chunks};
use pagewise_fuzz::{peak_during, Counting, Peer};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::with_capacity(rest.len() + 1);
    stream.push(b'[');
    stream.extend_from_slice(rest);
    let mut src = Chunks {
        peer: Peer::new(ctl, &stream),
        fds: (ctl >> 6) as usize,
    };
    let (result, peak) = peak_during(|| read_handshake(&mut src));
    let bound = MAX_HANDSHAKE_BYTES + 1 + 16 * stream.len() + 4096;
    assert!(
        peak <= bound,
        "{peak} bytes held for {} bytes",
        stream.len()
    );
    let Ok(handshake) = result else {
        return;
    };
    let Handshake::Firecracker { regions, .. } = handshake else {
        panic!("a stream starting with [ is a Firecracker handshake");
    };
    assert_eq!(ctl >> 6, 1, "accepted with {} fds", ctl >> 6);
    let json = serde_json::to_vec(&regions).expect("regions serialize");
    let back: Vec<GuestRegionUffdMapping> = serde_json::from_slice(&json).expect("and parse");
    assert_eq!(back, regions);
    if let Ok(layout) = GuestLayout::from_mappings(&regions) {
        check_layout(&layout);
    }
});
