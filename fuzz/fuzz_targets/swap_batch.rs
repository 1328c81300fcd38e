//! Log batches (`batch::decode_header`, `batch::decode_batch`) on any bytes: the header
//! block is the input, the batch is the input padded or cut to the header's length (up to
//! 128 KiB), its crc made valid when the first byte asks; with another bit the header fields
//! go to `decode_batch` as they are, unchecked by `decode_header`. An accepted batch has the
//! header's record count, every payload inside the batch after its header block, and
//! decoding held no more heap than one header block's worth of records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewise_fuzz::{peak_during, Counting};
use swapdev::format::batch::{
    decode_batch, decode_header, stored_crc, BatchHeader, RecordDesc, CRC_AT, HEADER_LEN,
    MAX_RECORDS,
};
use swapdev::format::BLOCK;

#[global_allocator]
static ALLOC: Counting = Counting;

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}

/// The header fields as they are in the bytes (zero past the end), unchecked.
fn raw_header(b: &[u8]) -> BatchHeader {
    BatchHeader {
        seq: u64::from_le_bytes(le(b, 8)),
        generation: u64::from_le_bytes(le(b, 16)),
        nonce: u64::from_le_bytes(le(b, 24)),
        prev_crc: u32::from_le_bytes(le(b, 32)),
        n_records: u32::from_le_bytes(le(b, 36)),
        total_len: u32::from_le_bytes(le(b, 40)),
        next_offset: u64::from_le_bytes(le(b, 48)),
        call_end: le::<1>(b, 44)[0] & 1 != 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let hdr = if ctl & 4 != 0 {
        raw_header(rest)
    } else {
        match decode_header(rest) {
            Some(h) => h,
            None => return,
        }
    };
    let mut buf = rest.to_vec();
    if ctl & 2 == 0 && hdr.total_len <= 128 * 1024 {
        buf.resize(hdr.total_len as usize, 0);
    }
    if ctl & 1 != 0 && buf.len() >= HEADER_LEN {
        let c = crc32c::crc32c(&buf[..CRC_AT]);
        let crc = crc32c::crc32c_append(c, &buf[CRC_AT + 4..]);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let (result, peak) = peak_during(|| decode_batch(&buf, &hdr));
    let Ok((crc, records)) = result else {
        return;
    };
    assert_eq!(crc, stored_crc(&buf));
    assert_eq!(buf.len(), hdr.total_len as usize);
    assert_eq!(records.len(), hdr.n_records as usize);
    assert!(records.len() <= MAX_RECORDS);
    assert!(
        peak <= MAX_RECORDS * std::mem::size_of::<RecordDesc>(),
        "{peak} bytes"
    );
    for r in &records {
        if r.codec.has_payload() {
            let (off, len) = (r.payload_off as usize, r.stored_len as usize);
            assert!(off >= BLOCK as usize && off + len <= buf.len(), "{r:?}");
        }
    }
});
