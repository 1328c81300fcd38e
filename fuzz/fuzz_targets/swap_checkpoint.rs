//! An index checkpoint slot (`checkpoint::decode_meta`, `checkpoint::decode`) on any bytes,
//! with the header and entries crcs made valid when the first byte asks and the slot padded
//! to its index: an accepted header encodes back to its bytes, an accepted slot's index has
//! exactly the capacity asked for, was read from inside the slot (and encodes back to it),
//! and decoding held no more heap than the slot's length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewise_fuzz::{peak_during, Counting};
use swapdev::format::checkpoint::{decode, decode_meta, encode, ENTRIES_CRC_AT, META_CRC_AT};
use swapdev::format::BLOCK;

#[global_allocator]
static ALLOC: Counting = Counting;

const B: usize = BLOCK as usize;

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut slot = rest.to_vec();
    let cap_field = slot.get(48..56).map_or(0, le64);
    // Bit 2: pad the slot with zeros to its index (small capacities only).
    if ctl & 4 != 0 && cap_field <= 4096 {
        let want = B + cap_field as usize * 16;
        if slot.len() < want {
            slot.resize(want, 0);
        }
    }
    // Bit 1: the entries crc of the index the capacity field names, if the slot holds it.
    if ctl & 2 != 0 && slot.len() >= META_CRC_AT {
        let body = usize::try_from(cap_field)
            .ok()
            .and_then(|c| c.checked_mul(16))
            .and_then(|n| slot.get(B..)?.get(..n));
        if let Some(body) = body {
            let crc = crc32c::crc32c(body);
            slot[ENTRIES_CRC_AT..META_CRC_AT].copy_from_slice(&crc.to_le_bytes());
        }
    }
    // Bit 0: the header crc.
    if ctl & 1 != 0 && slot.len() >= META_CRC_AT + 4 {
        let crc = crc32c::crc32c(&slot[..META_CRC_AT]);
        slot[META_CRC_AT..META_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok((meta, _)) = decode_meta(&slot) {
        let again = encode(&meta, &[], BLOCK);
        assert_eq!(
            &again[..ENTRIES_CRC_AT],
            &slot[..ENTRIES_CRC_AT],
            "{meta:?}"
        );
    }
    // Bit 3: ask for another capacity than the header's.
    let capacity = if ctl & 8 != 0 {
        cap_field ^ u64::from(ctl >> 4)
    } else {
        cap_field
    };
    let (result, peak) = peak_during(|| decode(&slot, capacity));
    if let Ok((meta, entries)) = result {
        assert_eq!(meta.capacity, capacity);
        assert_eq!(entries.len() as u64, capacity);
        let end = B + entries.len() * 16;
        assert!(end <= slot.len());
        assert!(
            peak <= slot.len(),
            "{peak} bytes held for a {}-byte slot",
            slot.len()
        );
        let slot_size = (end as u64).next_multiple_of(BLOCK);
        let again = encode(&meta, &entries, slot_size);
        assert_eq!(&again[..META_CRC_AT + 4], &slot[..META_CRC_AT + 4]);
        assert_eq!(&again[B..end], &slot[B..end]);
    }
});
