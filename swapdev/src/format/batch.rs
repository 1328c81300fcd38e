//! Log batches: the unit of writing. One batch is one 4 KiB-aligned write holding a header
//! block (batch header + record descriptors) followed by the payloads: raw pages first, each
//! on a 4 KiB boundary (so a raw page is read with exactly one aligned I/O), then lz4
//! payloads packed back to back, then zero padding to the next 4 KiB.
//!
//! Batches form a chain: each names the sequence number, the crc of the previous batch and
//! the device offset of the next batch. Recovery follows the chain from the checkpoint's
//! head and stops at the first batch that does not continue it (torn, stale or never
//! written).

use super::wire::{align_up, FieldReader, FieldWriter};
use super::{Codec, BLOCK};
use crate::AlignedBuf;

pub const BATCH_MAGIC: [u8; 8] = *b"PWBATCH1";
/// Bytes of the fixed batch header; the record descriptors follow it.
pub const HEADER_LEN: usize = 64;
const DESC_LEN: usize = 24;
/// Offset of the batch crc in the header block (the crc covers every other byte of the
/// batch).
pub const CRC_AT: usize = 56;
/// Records that fit in one header block.
pub const MAX_RECORDS: usize = (BLOCK as usize - HEADER_LEN) / DESC_LEN;

/// One page record inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordDesc {
    pub page: u64,
    /// Offset of the payload from the start of the batch (0 when there is none).
    pub payload_off: u32,
    pub stored_len: u32,
    pub checksum: u32,
    pub codec: Codec,
}

/// The fixed part of a batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub seq: u64,
    pub generation: u64,
    /// Random per writing session: two sessions never write byte-identical batches, so a
    /// stale batch left behind by a crashed session cannot pass the crc chain.
    pub nonce: u64,
    pub prev_crc: u32,
    pub n_records: u32,
    pub total_len: u32,
    pub next_offset: u64,
    /// Last batch of one append (all of whose batches complete before the next append
    /// starts). Lets fsck tell a torn tail from damage inside acknowledged history.
    pub call_end: bool,
}

const FLAG_CALL_END: u32 = 1;

/// Accumulates records for one batch.
pub struct BatchBuilder<'a> {
    page_size: usize,
    max_batch: usize,
    records: Vec<(RecordDesc, Payload<'a>)>,
    raw_count: usize,
    packed: Vec<u8>,
}

enum Payload<'a> {
    None,
    Raw(&'a [u8]),
    Packed { at: usize },
}

impl<'a> BatchBuilder<'a> {
    pub fn new(page_size: usize, max_batch: usize) -> Self {
        Self {
            page_size,
            max_batch,
            records: Vec::new(),
            raw_count: 0,
            packed: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes the batch takes on the device with what it holds now.
    pub fn total_len(&self) -> usize {
        Self::len_for(self.page_size, self.raw_count, self.packed.len())
    }

    fn len_for(page_size: usize, raw: usize, packed: usize) -> usize {
        BLOCK as usize + raw * page_size + align_up(packed as u64, BLOCK) as usize
    }

    /// Whether a record of this codec and payload length still fits.
    pub fn fits(&self, codec: Codec, len: usize) -> bool {
        if self.records.len() >= MAX_RECORDS {
            return false;
        }
        let (raw, packed) = match codec {
            Codec::Raw => (self.raw_count + 1, self.packed.len()),
            Codec::Lz4 => (self.raw_count, self.packed.len() + len),
            _ => (self.raw_count, self.packed.len()),
        };
        Self::len_for(self.page_size, raw, packed) <= self.max_batch
    }

    /// Add a record. `payload` is the raw page (Raw), the lz4 bytes (Lz4) or empty.
    pub fn push(&mut self, page: u64, codec: Codec, payload: &'a [u8], checksum: u32) {
        let (stored_len, p) = match codec {
            Codec::Raw => {
                self.raw_count += 1;
                (payload.len(), Payload::Raw(payload))
            }
            Codec::Lz4 => {
                let at = self.packed.len();
                self.packed.extend_from_slice(payload);
                (payload.len(), Payload::Packed { at })
            }
            Codec::Zero | Codec::Absent => (0, Payload::None),
        };
        self.records.push((
            RecordDesc {
                page,
                payload_off: 0,
                stored_len: stored_len as u32,
                checksum,
                codec,
            },
            p,
        ));
    }

    /// Lay the batch out in one aligned buffer. Returns the buffer, the batch crc and the
    /// records with their payload offsets filled in.
    pub fn finish(self, mut hdr: BatchHeader) -> (AlignedBuf, u32, Vec<RecordDesc>) {
        let total = self.total_len();
        let mut buf = AlignedBuf::new(total);
        let packed_start = BLOCK as usize + self.raw_count * self.page_size;
        buf[packed_start..packed_start + self.packed.len()].copy_from_slice(&self.packed);
        let mut next_raw = BLOCK as usize;
        let mut descs = Vec::with_capacity(self.records.len());
        for (mut d, p) in self.records {
            match p {
                Payload::None => {}
                Payload::Raw(data) => {
                    buf[next_raw..next_raw + data.len()].copy_from_slice(data);
                    d.payload_off = next_raw as u32;
                    next_raw += self.page_size;
                }
                Payload::Packed { at } => d.payload_off = (packed_start + at) as u32,
            }
            descs.push(d);
        }
        hdr.n_records = descs.len() as u32;
        hdr.total_len = total as u32;
        let crc = encode_header(&mut buf, &hdr, &descs);
        (buf, crc, descs)
    }
}

fn encode_header(buf: &mut [u8], hdr: &BatchHeader, descs: &[RecordDesc]) -> u32 {
    {
        let mut w = FieldWriter::new(&mut buf[..BLOCK as usize]);
        w.bytes(&BATCH_MAGIC);
        w.u64(hdr.seq);
        w.u64(hdr.generation);
        w.u64(hdr.nonce);
        w.u32(hdr.prev_crc);
        w.u32(hdr.n_records);
        w.u32(hdr.total_len);
        w.u32(if hdr.call_end { FLAG_CALL_END } else { 0 });
        w.u64(hdr.next_offset);
        debug_assert_eq!(w.pos(), CRC_AT);
        w.u32(0);
        w.u32(0);
        for d in descs {
            w.u64(d.page);
            w.u32(d.payload_off);
            w.u32(d.stored_len);
            w.u32(d.checksum);
            w.u8(d.codec as u8);
            w.bytes(&[0, 0, 0]);
        }
    }
    let crc = batch_crc(buf);
    buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// Why a batch read from the device is not one this code wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch buffer is {len} bytes, its header says {total_len}")]
    Length { len: usize, total_len: u32 },
    #[error("batch header says {n_records} records, at most {MAX_RECORDS} fit a header block")]
    TooManyRecords { n_records: u32 },
    #[error("batch crc mismatch (stored {stored:#x}, computed {computed:#x})")]
    Crc { stored: u32, computed: u32 },
    #[error("record {record}: unknown codec {codec}")]
    UnknownCodec { record: u32, codec: u8 },
    #[error(
        "record {record} (page {page}): payload of {stored_len} bytes at offset {payload_off} \
         lies outside the batch's payload area ({BLOCK}..{total_len})"
    )]
    PayloadOutside {
        record: u32,
        page: u64,
        payload_off: u32,
        stored_len: u32,
        total_len: usize,
    },
}

/// crc32c over the whole batch except the crc field itself (`buf` is at least a header).
fn batch_crc(buf: &[u8]) -> u32 {
    let c = crc32c::crc32c(&buf[..CRC_AT]);
    crc32c::crc32c_append(c, &buf[CRC_AT + 4..])
}

/// Parse the header block of a batch. `None` when it is not a batch header at all (or
/// `block` is shorter than a batch header).
pub fn decode_header(block: &[u8]) -> Option<BatchHeader> {
    let mut r = FieldReader::new(block.get(..HEADER_LEN)?);
    if r.bytes::<8>() != BATCH_MAGIC {
        return None;
    }
    let seq = r.u64();
    let generation = r.u64();
    let nonce = r.u64();
    let prev_crc = r.u32();
    let n_records = r.u32();
    let total_len = r.u32();
    let flags = r.u32();
    let next_offset = r.u64();
    if n_records as usize > MAX_RECORDS
        || (total_len as u64) < BLOCK
        || !(total_len as u64).is_multiple_of(BLOCK)
    {
        return None;
    }
    Some(BatchHeader {
        seq,
        generation,
        nonce,
        prev_crc,
        n_records,
        total_len,
        next_offset,
        call_end: flags & FLAG_CALL_END != 0,
    })
}

/// The crc a batch was written with (from its header block), whether or not the batch
/// still matches it. `block` is at least a batch header (as [`decode_header`] accepted).
pub fn stored_crc(block: &[u8]) -> u32 {
    u32::from_le_bytes(block[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"))
}

/// Check a whole batch (`buf` must be exactly `hdr.total_len` bytes) and return its crc and
/// records. Every record must lie inside the batch and carry a known codec.
pub fn decode_batch(buf: &[u8], hdr: &BatchHeader) -> Result<(u32, Vec<RecordDesc>), BatchError> {
    if buf.len() != hdr.total_len as usize || buf.len() < BLOCK as usize {
        return Err(BatchError::Length {
            len: buf.len(),
            total_len: hdr.total_len,
        });
    }
    if hdr.n_records as usize > MAX_RECORDS {
        return Err(BatchError::TooManyRecords {
            n_records: hdr.n_records,
        });
    }
    let stored = stored_crc(buf);
    let crc = batch_crc(buf);
    if stored != crc {
        return Err(BatchError::Crc {
            stored,
            computed: crc,
        });
    }
    let mut r = FieldReader::new(&buf[HEADER_LEN..BLOCK as usize]);
    let mut out = Vec::with_capacity(hdr.n_records as usize);
    for i in 0..hdr.n_records {
        let page = r.u64();
        let payload_off = r.u32();
        let stored_len = r.u32();
        let checksum = r.u32();
        let codec = r.u8();
        let _: [u8; 3] = r.bytes();
        let codec = Codec::from_u8(codec).ok_or(BatchError::UnknownCodec { record: i, codec })?;
        if codec.has_payload()
            && (payload_off < BLOCK as u32
                || payload_off as u64 + stored_len as u64 > buf.len() as u64)
        {
            return Err(BatchError::PayloadOutside {
                record: i,
                page,
                payload_off,
                stored_len,
                total_len: buf.len(),
            });
        }
        out.push(RecordDesc {
            page,
            payload_off,
            stored_len,
            checksum,
            codec,
        });
    }
    Ok((crc, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> BatchHeader {
        BatchHeader {
            seq: 5,
            generation: 2,
            nonce: 99,
            prev_crc: 7,
            n_records: 0,
            total_len: 0,
            next_offset: 1 << 20,
            call_end: true,
        }
    }

    #[test]
    fn layout_and_round_trip() {
        let raw = vec![0xabu8; 4096];
        let packed = vec![1u8, 2, 3];
        let mut b = BatchBuilder::new(4096, 256 * 1024);
        b.push(10, Codec::Lz4, &packed, 111);
        b.push(11, Codec::Raw, &raw, 222);
        b.push(12, Codec::Zero, &[], 0);
        b.push(13, Codec::Absent, &[], 0);
        assert_eq!(b.total_len(), 3 * 4096);
        let (buf, crc, descs) = b.finish(hdr());
        assert_eq!(buf.len(), 3 * 4096);
        assert_eq!(descs[1].payload_off, 4096);
        assert_eq!(descs[0].payload_off, 8192);
        assert_eq!(&buf[8192..8195], &[1, 2, 3]);
        let h = decode_header(&buf[..4096]).unwrap();
        assert_eq!(h.n_records, 4);
        assert_eq!(h.seq, 5);
        assert!(h.call_end);
        assert_eq!(stored_crc(&buf), crc);
        let (crc2, d2) = decode_batch(&buf, &h).unwrap();
        assert_eq!(crc, crc2);
        assert_eq!(d2, descs);
        let mut torn = AlignedBuf::from_slice(&buf);
        torn[5000] ^= 1;
        assert!(matches!(
            decode_batch(&torn, &h),
            Err(BatchError::Crc { .. })
        ));
    }

    #[test]
    fn capacity_limits() {
        let raw = vec![1u8; 4096];
        let mut b = BatchBuilder::new(4096, 256 * 1024);
        let mut n = 0;
        while b.fits(Codec::Raw, 4096) {
            b.push(n, Codec::Raw, &raw, 0);
            n += 1;
        }
        assert_eq!(n, 63);
        let mut z = BatchBuilder::new(4096, 256 * 1024);
        let mut m = 0;
        while z.fits(Codec::Zero, 0) {
            z.push(m, Codec::Zero, &[], 0);
            m += 1;
        }
        assert_eq!(m as usize, MAX_RECORDS);
        assert!(decode_header(&[0u8; 4096]).is_none());
    }

    /// A header block shorter than a batch header is no batch (it panicked in the reader).
    #[test]
    fn short_header_block_is_no_batch() {
        let mut b = BatchBuilder::new(4096, 256 * 1024);
        b.push(1, Codec::Zero, &[], 0);
        let (buf, _, _) = b.finish(hdr());
        assert!(decode_header(&buf[..HEADER_LEN]).is_some());
        for len in [0, 8, HEADER_LEN - 1] {
            assert!(decode_header(&buf[..len]).is_none(), "{len} bytes");
        }
    }

    /// `decode_batch` takes any header and buffer: a buffer that is not the header's
    /// `total_len`, shorter than a block, or a header claiming more records than fit in a
    /// block, is an error, not a panic (each indexed past the buffer before).
    #[test]
    fn batch_whose_header_does_not_fit_the_buffer_is_refused() {
        let mut b = BatchBuilder::new(4096, 256 * 1024);
        b.push(1, Codec::Zero, &[], 0);
        let (buf, _, _) = b.finish(hdr());
        let h = decode_header(&buf).unwrap();
        assert!(decode_batch(&buf, &h).is_ok());
        assert_eq!(
            decode_batch(&buf[..100], &h),
            Err(BatchError::Length {
                len: 100,
                total_len: 4096
            })
        );
        let short = BatchHeader {
            total_len: 100,
            ..h
        };
        assert!(matches!(
            decode_batch(&buf[..100], &short),
            Err(BatchError::Length { len: 100, .. })
        ));
        let many = BatchHeader {
            n_records: MAX_RECORDS as u32 + 1,
            ..h
        };
        assert_eq!(
            decode_batch(&buf, &many),
            Err(BatchError::TooManyRecords {
                n_records: MAX_RECORDS as u32 + 1
            })
        );
        let err = decode_batch(&buf, &many).unwrap_err().to_string();
        assert!(err.contains("169 records, at most 168"), "{err}");
    }
}
