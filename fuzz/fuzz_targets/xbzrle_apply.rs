//! The XBZRLE decoder (`agent::migrate::delta`): any body applied to a page of any size
//! 1..=8161 bytes, and any body decoded as an encoded page (XBZRLE or lz4) against a 4 KiB
//! base. Besides "no panic": a body that applies gives a page that re-encodes (against the
//! same base) to a body that applies to exactly that page; the page never changes length.
#![no_main]

use agent::migrate::delta::{decode_into, xbzrle, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, body)) = data.split_first() else {
        return;
    };
    let size = 1 + usize::from(head) * 32;
    let base: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
    let mut page = base.clone();
    if xbzrle::apply(&mut page, body).is_ok() {
        assert_eq!(page.len(), size);
        let mut out = Vec::new();
        assert!(xbzrle::encode(&base, &page, &mut out, usize::MAX));
        let mut again = base.clone();
        xbzrle::apply(&mut again, &out).expect("a body the encoder made applies");
        assert_eq!(again, page);
    }
    let encoding = if head & 1 == 0 {
        Encoding::Xbzrle
    } else {
        Encoding::Lz4
    };
    let mut page = vec![0u8; 4096];
    let _ = decode_into(encoding, body, 0x1234_5678, &mut page);
    assert_eq!(page.len(), 4096);
});
