//! Index entries (`IndexEntry::decode`) on any 16 bytes: the entry encodes back to exactly
//! those bytes, its codec is the top byte's (when known), its offset the low 56 bits, and an
//! entry with a payload codec is the one `IndexEntry::stored` builds from its parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swapdev::format::entry::{IndexEntry, ENTRY_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..ENTRY_LEN) else {
        return;
    };
    let bytes: &[u8; ENTRY_LEN] = bytes.try_into().expect("16 bytes");
    let e = IndexEntry::decode(bytes);
    let mut again = [0u8; ENTRY_LEN];
    e.encode(&mut again);
    assert_eq!(&again, bytes);
    let loc = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    assert_eq!(e.offset(), loc & ((1 << 56) - 1));
    match e.codec() {
        Some(c) => {
            assert_eq!(c as u8, bytes[7]);
            if c.has_payload() {
                assert_eq!(IndexEntry::stored(c, e.offset(), e.len, e.checksum), e);
            }
        }
        None => assert!(bytes[7] > 3, "codec tag {} refused", bytes[7]),
    }
});
