//! Index checkpoints: the whole index, dense (16 bytes per page), in one of two alternating
//! slots. A checkpoint also records where the log continues (head offset, next batch
//! sequence, crc of the last batch before it), so recovery = load checkpoint + replay the
//! chain from there.

use super::entry::{IndexEntry, ENTRY_LEN};
use super::wire::{FieldReader, FieldWriter};
use super::BLOCK;
use crate::AlignedBuf;

pub const CKPT_MAGIC: [u8; 8] = *b"PWCKPT01";

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
    w.u32(entries_crc);
    let end = w.pos();
    let crc = crc32c::crc32c(&buf[..end]);
    buf[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Parse the first block of a checkpoint slot.
pub fn decode_meta(block: &[u8]) -> Result<(CheckpointMeta, u32), String> {
    let mut r = FieldReader::new(block);
    if r.bytes::<8>() != CKPT_MAGIC {
        return Err("bad checkpoint magic".into());
    }
    let meta = CheckpointMeta {
        ckpt_seq: r.u64(),
        generation: r.u64(),
        head: r.u64(),
        next_seq: r.u64(),
        prev_crc: r.u32(),
        capacity: {
            let _ = r.u32();
            r.u64()
        },
    };
    let entries_crc = r.u32();
    let end = r.pos();
    let crc = u32::from_le_bytes(block[end..end + 4].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&block[..end]) {
        return Err("checkpoint header crc mismatch".into());
    }
    Ok((meta, entries_crc))
}

/// Parse a whole slot (header block + entries).
pub fn decode(slot: &[u8], capacity: u64) -> Result<(CheckpointMeta, Vec<IndexEntry>), String> {
    let (meta, entries_crc) = decode_meta(&slot[..BLOCK as usize])?;
    if meta.capacity != capacity {
        return Err(format!(
            "checkpoint is for {} pages, header says {capacity}",
            meta.capacity
        ));
    }
    let n = capacity as usize * ENTRY_LEN;
    let body = slot
        .get(BLOCK as usize..BLOCK as usize + n)
        .ok_or("checkpoint slot is shorter than the index")?;
    if crc32c::crc32c(body) != entries_crc {
        return Err("checkpoint entries crc mismatch".into());
    }
    Ok((
        meta,
        body.chunks_exact(ENTRY_LEN)
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
        assert!(decode(&buf, 301).is_err());
        buf[BLOCK as usize + 299 * 16] ^= 1;
        assert!(decode(&buf, 300).unwrap_err().contains("entries crc"));
        buf[9] ^= 1;
        assert!(decode(&buf, 300).unwrap_err().contains("header crc"));
    }
}
