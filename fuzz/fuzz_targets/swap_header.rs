//! A swap device's header copies (`DeviceHeader::decode`, `choose`, `validate`) on any
//! bytes, with the crc made valid when the first byte asks (so the fields behind it are
//! reached): a `Valid` copy encodes back to exactly its bytes, a header `choose` picks is
//! one of the two valid copies and passes `validate`, and a validated layout's offsets are
//! computed without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swapdev::format::header::{DeviceHeader, HeaderCopy, CRC_AT};
use swapdev::format::BLOCK;

const LEN: usize = CRC_AT + 4;

fn fix_crc(copy: &mut [u8]) {
    if copy.len() >= LEN {
        let crc = crc32c::crc32c(&copy[..CRC_AT]);
        copy[CRC_AT..LEN].copy_from_slice(&crc.to_le_bytes());
    }
}

fn check_valid(copy: &[u8]) -> Option<DeviceHeader> {
    let HeaderCopy::Valid(h) = DeviceHeader::decode(copy) else {
        return None;
    };
    let mut block = vec![0u8; BLOCK as usize];
    h.encode(&mut block);
    assert_eq!(&block[..LEN], &copy[..LEN], "{h:?} re-encodes differently");
    if h.validate().is_ok() {
        let l = h.layout;
        assert!(l.data_end() >= l.data_start);
        assert!(l.ckpt_offset(1) + l.ckpt_slot_size <= l.data_start);
        assert_eq!(
            l.segment_of(l.segment_start(l.segments - 1)),
            l.segments - 1
        );
    }
    Some(h)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    // Copy A: the first LEN bytes (or fewer); copy B: whatever follows.
    let (a, b) = rest.split_at(rest.len().min(LEN));
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    if ctl & 1 != 0 {
        fix_crc(&mut a);
    }
    if ctl & 2 != 0 {
        fix_crc(&mut b);
    }
    let valid = [check_valid(&a), check_valid(&b)];
    if let Ok((h, i)) = DeviceHeader::choose(&a, &b) {
        assert!(h.validate().is_ok());
        assert_eq!(valid[i as usize].as_ref(), Some(&h));
        if let Some(other) = &valid[1 - i as usize] {
            assert!(other.header_seq <= h.header_seq);
        }
    }
});
