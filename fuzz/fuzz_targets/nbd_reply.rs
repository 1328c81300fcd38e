//! NBD simple reply headers (`decode_simple_reply`) on any 16 bytes: accepted exactly when
//! the magic is the simple reply's, and the reply's fields are the bytes' (big-endian).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swapdev::backend::nbd::proto::{decode_simple_reply, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..SIMPLE_REPLY_LEN) else {
        return;
    };
    let h: &[u8; SIMPLE_REPLY_LEN] = bytes.try_into().expect("16 bytes");
    let magic_ok = h[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes();
    match decode_simple_reply(h) {
        Ok(r) => {
            assert!(magic_ok);
            let mut again = Vec::with_capacity(SIMPLE_REPLY_LEN);
            again.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            again.extend_from_slice(&r.error.to_be_bytes());
            again.extend_from_slice(&r.cookie.to_be_bytes());
            assert_eq!(&again[..], &h[..]);
        }
        Err(e) => {
            assert!(!magic_ok);
            assert!(e.to_string().contains("bad magic"));
        }
    }
});
