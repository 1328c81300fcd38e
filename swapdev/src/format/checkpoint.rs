//! Index checkpoints: the whole index, dense (16 bytes per page), in one of two alternating
//! slots. A checkpoint also records where the log continues (head offset, next batch
//! sequence, crc of the last batch before it), so recovery = load checkpoint + replay the
//! chain from there.

use super::entry::{IndexEntry, ENTRY_LEN};
use super::wire::{FieldReader, FieldWriter};
use super::BLOCK;
use crate::AlignedBuf;

pub const CKPT_MAGIC: [u8; 8] = *b"PWCKPT01";
/// Offset of the entries crc in the header block.
pub const ENTRIES_CRC_AT: usize = 56;
/// Offset of the header crc (over every header byte before it) in the header block.
pub const META_CRC_AT: usize = 60;

/// Why a checkpoint slot does not hold a checkpoint this code wrote for this device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint header is {len} bytes, shorter than the {} a header takes", META_CRC_AT + 4)]
    Short { len: usize },
    #[error("bad checkpoint magic \"{found}\" (expected \"PWCKPT01\")")]
    BadMagic { found: String },
    #[error("checkpoint header crc mismatch (stored {stored:#x}, computed {computed:#x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("checkpoint header's reserved field is {0:#x}, not 0")]
    Reserved(u32),
    #[error("checkpoint is for {found} pages, the device header says {expected}")]
    Capacity { found: u64, expected: u64 },
    #[error(
        "checkpoint slot is {len} bytes, shorter than its header block and an index of \
         {capacity} pages"
    )]
    SlotTooShort { len: usize, capacity: u64 },
    #[error("checkpoint entries crc mismatch (stored {stored:#x}, computed {computed:#x})")]
    EntriesCrc { stored: u32, computed: u32 },
}

/// Where the log continues after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointMeta {
    pub ckpt_seq: u64,
    pub generation: u64,
    /// Device offset where the next batch goes.
    pub head: u64,
    pub next_seq: u64,
    pub prev_crc: u32,
    pub capacity: u64,
}

/// Serialise `entries` into a buffer of exactly `slot_size` bytes.
pub fn encode(meta: &CheckpointMeta, entries: &[IndexEntry], slot_size: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(slot_size as usize);
    let body = &mut buf[BLOCK as usize..];
    for (i, e) in entries.iter().enumerate() {
        e.encode(&mut body[i * ENTRY_LEN..(i + 1) * ENTRY_LEN]);
    }
    let entries_crc = crc32c::crc32c(&body[..entries.len() * ENTRY_LEN]);
    let mut w = FieldWriter::new(&mut buf[..BLOCK as usize]);
    w.bytes(&CKPT_MAGIC);
    w.u64(meta.ckpt_seq);
    w.u64(meta.generation);
    w.u64(meta.head);
    w.u64(meta.next_seq);
    w.u32(meta.prev_crc);
    w.u32(0);
    w.u64(meta.capacity);
    debug_assert_eq!(w.pos(), ENTRIES_CRC_AT);
    w.u32(entries_crc);
    let end = w.pos();
    debug_assert_eq!(end, META_CRC_AT);
    let crc = crc32c::crc32c(&buf[..end]);
    buf[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Parse the first block of a checkpoint slot (at least its first `META_CRC_AT + 4`
/// bytes; the rest of the block is not read). Returns the meta and the entries crc.
pub fn decode_meta(block: &[u8]) -> Result<(CheckpointMeta, u32), CheckpointError> {
    let Some(head) = block.get(..META_CRC_AT + 4) else {
        return Err(CheckpointError::Short { len: block.len() });
    };
    let mut r = FieldReader::new(head);
    let magic: [u8; 8] = r.bytes();
    if magic != CKPT_MAGIC {
        return Err(CheckpointError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let ckpt_seq = r.u64();
    let generation = r.u64();
    let head_off = r.u64();
    let next_seq = r.u64();
    let prev_crc = r.u32();
    let reserved = r.u32();
    let capacity = r.u64();
    let entries_crc = r.u32();
    let stored = r.u32();
    let computed = crc32c::crc32c(&head[..META_CRC_AT]);
    if stored != computed {
        return Err(CheckpointError::HeaderCrc { stored, computed });
    }
    if reserved != 0 {
        return Err(CheckpointError::Reserved(reserved));
    }
    let meta = CheckpointMeta {
        ckpt_seq,
        generation,
        head: head_off,
        next_seq,
        prev_crc,
        capacity,
    };
    Ok((meta, entries_crc))
}

/// Parse a whole slot (header block + entries) of a device of `capacity` pages. The index
/// it returns has `capacity` entries, all read from `slot` (so at most `slot.len() / 16`).
pub fn decode(
    slot: &[u8],
    capacity: u64,
) -> Result<(CheckpointMeta, Vec<IndexEntry>), CheckpointError> {
    let too_short = CheckpointError::SlotTooShort {
        len: slot.len(),
        capacity,
    };
    let Some(block) = slot.get(..BLOCK as usize) else {
        return Err(too_short);
    };
    let (meta, entries_crc) = decode_meta(block)?;
    if meta.capacity != capacity {
        return Err(CheckpointError::Capacity {
            found: meta.capacity,
            expected: capacity,
        });
    }
    let body = usize::try_from(capacity)
        .ok()
        .and_then(|c| c.checked_mul(ENTRY_LEN))
        .and_then(|n| slot.get(BLOCK as usize..)?.get(..n));
    let Some(body) = body else {
        return Err(too_short);
    };
    let computed = crc32c::crc32c(body);
    if computed != entries_crc {
        return Err(CheckpointError::EntriesCrc {
            stored: entries_crc,
            computed,
        });
    }
    Ok((
        meta,
        body.as_chunks::<ENTRY_LEN>()
            .0
            .iter()
            .map(IndexEntry::decode)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Codec;

    #[test]
    fn round_trip_and_detects_damage() {
        let meta = CheckpointMeta {
            ckpt_seq: 4,
            generation: 2,
            head: 1 << 20,
            next_seq: 77,
            prev_crc: 0xdead,
            capacity: 300,
        };
        let mut entries = vec![IndexEntry::ABSENT; 300];
        entries[3] = IndexEntry::ZERO;
        entries[299] = IndexEntry::stored(Codec::Lz4, 123_456, 700, 42);
        let slot_size = BLOCK + (300 * 16u64).next_multiple_of(BLOCK);
        let mut buf = encode(&meta, &entries, slot_size);
        let (m, e) = decode(&buf, 300).unwrap();
        assert_eq!(m, meta);
        assert_eq!(e, entries);
        assert_eq!(
            decode(&buf, 301).unwrap_err(),
            CheckpointError::Capacity {
                found: 300,
                expected: 301
            }
        );
        buf[BLOCK as usize + 299 * 16] ^= 1;
        assert!(matches!(
            decode(&buf, 300),
            Err(CheckpointError::EntriesCrc { .. })
        ));
        buf[9] ^= 1;
        let err = decode(&buf, 300).unwrap_err();
        assert!(matches!(err, CheckpointError::HeaderCrc { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("checkpoint header crc mismatch"));
    }

    fn meta(capacity: u64) -> CheckpointMeta {
        CheckpointMeta {
            ckpt_seq: 1,
            generation: 1,
            head: 1 << 20,
            next_seq: 1,
            prev_crc: 0,
            capacity,
        }
    }

    /// Blocks and slots shorter than what they must hold are errors (they panicked:
    /// `decode_meta` read past a short block, `decode` sliced a first block out of a slot
    /// shorter than one).
    #[test]
    fn short_blocks_and_slots_are_refused() {
        let buf = encode(&meta(4), &[IndexEntry::ABSENT; 4], 2 * BLOCK);
        assert!(decode_meta(&buf[..META_CRC_AT + 4]).is_ok());
        for len in [0, 8, META_CRC_AT + 3] {
            assert_eq!(
                decode_meta(&buf[..len]),
                Err(CheckpointError::Short { len })
            );
        }
        for len in [0, 100, BLOCK as usize - 1, BLOCK as usize + 4 * 16 - 1] {
            assert_eq!(
                decode(&buf[..len], 4).unwrap_err(),
                CheckpointError::SlotTooShort { len, capacity: 4 }
            );
        }
        assert_eq!(decode(&buf[..BLOCK as usize + 64], 4).unwrap().1.len(), 4);
    }

    /// A capacity whose index size overflows (2^60 pages * 16 bytes wraps to 0 in release
    /// builds, and a crc over no entries matched an entries crc of 0): refused as a slot
    /// too short, never an index shorter than its capacity.
    #[test]
    fn capacity_whose_index_size_overflows_is_refused() {
        let cap = 1u64 << 60;
        let buf = encode(&meta(cap), &[], BLOCK);
        assert_eq!(
            decode(&buf, cap).unwrap_err(),
            CheckpointError::SlotTooShort {
                len: BLOCK as usize,
                capacity: cap
            }
        );
    }

    /// A crc-valid header with the reserved field set was never written by this code: its
    /// re-encoding would differ.
    #[test]
    fn reserved_field_must_be_zero() {
        let mut buf = encode(&meta(0), &[], BLOCK);
        buf[44] = 7;
        let crc = crc32c::crc32c(&buf[..META_CRC_AT]);
        buf[META_CRC_AT..META_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_meta(&buf), Err(CheckpointError::Reserved(7)));
    }
}
