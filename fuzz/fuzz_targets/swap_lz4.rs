//! Stored lz4 payloads (`decode_lz4`): any bytes into a page of 4096 bytes (or 64, 512,
//! 8192, by the first byte) decode or fail without allocating; and (bit 2 of the first byte)
//! a page made of the input stored with `encode_page` under the lz4 policy decodes back to
//! exactly that page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewise_fuzz::{peak_during, Counting};
use swapdev::format::{decode_lz4, encode_page, lz4_scratch_len, Codec, CodecPolicy};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, payload)) = data.split_first() else {
        return;
    };
    let size = [4096, 64, 512, 8192][ctl as usize % 4];
    let mut out = vec![0u8; size];
    let (result, peak) = peak_during(|| decode_lz4(payload, &mut out));
    assert_eq!(peak, 0, "decode_lz4 allocated {peak} bytes");
    if let Err(e) = result {
        let _ = e.to_string();
    }

    if ctl & 4 == 0 {
        return;
    }
    let mut page = payload.to_vec();
    page.resize(4096, ctl);
    let mut scratch = vec![0u8; lz4_scratch_len(4096)];
    let (codec, n) = encode_page(CodecPolicy::Lz4, &page, &mut scratch);
    if codec == Codec::Lz4 {
        assert!(n < 4096);
        let mut back = vec![0u8; 4096];
        decode_lz4(&scratch[..n], &mut back).expect("own lz4 output decodes");
        assert_eq!(back, page);
    }
});
