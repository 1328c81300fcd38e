//! `FrameHeader::decode` on any 16 bytes: an error or a header that encodes back to exactly
//! those bytes (version 1 defines no flags, so a decoded header is the whole story).
#![no_main]

use agent::migrate::frame::{FrameHeader, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..HEADER_LEN) else {
        return;
    };
    let bytes: &[u8; HEADER_LEN] = bytes.try_into().expect("16 bytes");
    if let Ok(h) = FrameHeader::decode(bytes) {
        assert!(h.length as usize <= h.command.max_len());
        assert_eq!(
            &h.encode(),
            bytes,
            "{h:?} does not encode back to its bytes"
        );
    }
});
