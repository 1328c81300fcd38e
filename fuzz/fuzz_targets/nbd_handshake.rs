//! The NBD client's fixed-newstyle negotiation (`handshake::negotiate`) against a server
//! whose bytes are the input, delivered in reads of 1..=63 bytes or whole (first byte): an
//! error or an export whose block sizes are consistent; never more heap held than a small
//! multiple of what the server sent (a reply announcing 64 KiB and sending 10 bytes costs no
//! 64 KiB).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewise_fuzz::{peak_during, Counting, Peer};
use swapdev::backend::nbd::handshake::{negotiate, DEFAULT_MAX_PAYLOAD};
use swapdev::backend::nbd::proto::{CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, IHAVEOPT};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let mut peer = Peer::new(ctl, stream);
    let (result, peak) = peak_during(|| negotiate(&mut peer, "swap", "fuzz-server"));
    let bound = 16 * stream.len() + 16 * 1024;
    assert!(
        peak <= bound,
        "{peak} bytes held for {} bytes sent",
        stream.len()
    );
    match result {
        Ok(info) => {
            assert_eq!(info.name, "swap");
            assert!(info.min_block.is_power_of_two() && info.min_block <= 64 * 1024);
            assert!(info.preferred_block >= info.min_block);
            assert!(info.max_block >= info.min_block && info.max_block <= DEFAULT_MAX_PAYLOAD);
            // The client spoke: its flags, then an option.
            let flags = u32::from_be_bytes(peer.written[..4].try_into().expect("4 bytes"));
            assert_eq!(flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES), 0);
            assert_eq!(&peer.written[4..12], &IHAVEOPT.to_be_bytes());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
