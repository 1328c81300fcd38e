//! The device header: two copies (A at offset 0, B at 4096), each with a sequence number
//! and a crc32c. Writers alternate between the copies, so a torn header write always
//! leaves the previous copy intact; readers take the valid copy with the higher sequence.

use super::wire::{FieldReader, FieldWriter};
use super::BLOCK;
use crate::error::{Result, SwapError};
use crate::format::{ChecksumKind, CodecPolicy};

pub const DEVICE_MAGIC: [u8; 8] = *b"PWSWAP01";
/// Format version this code writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest owner host id stored.
pub const MAX_HOST_ID: usize = 128;

/// Everything the header records. Layout fields are fixed at create time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHeader {
    pub format_version: u32,
    /// Bumped on every header write; picks the newer copy.
    pub header_seq: u64,
    pub vm_uuid: [u8; 16],
    pub page_size: u32,
    pub capacity_pages: u64,
    pub checksum: ChecksumKind,
    pub codec: CodecPolicy,
    /// Host that owns (or last owned) the device.
    pub owner: String,
    pub owned: bool,
    /// Bumped on every acquire and release; writers fence on it.
    pub generation: u64,
    /// Which checkpoint slot (0/1) holds the current index checkpoint, and its sequence.
    pub ckpt_slot: u8,
    pub ckpt_seq: u64,
    pub layout: Layout,
}

/// Where things are on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of checkpoint slot 0; slot 1 follows it.
    pub ckpt_start: u64,
    pub ckpt_slot_size: u64,
    /// First byte of segment 0.
    pub data_start: u64,
    pub segment_size: u64,
    /// Largest batch (one aligned write) in bytes.
    pub max_batch: u64,
    /// Number of segments the data area holds.
    pub segments: u64,
}

impl Layout {
    /// The layout for a device of this shape (a fixed-size backend may get fewer segments).
    pub fn plan(page_size: u32, capacity_pages: u64) -> Layout {
        let ckpt_start = 2 * BLOCK;
        let ckpt_slot_size = BLOCK + super::wire::align_up(capacity_pages * 16, BLOCK);
        let data_start = ckpt_start + 2 * ckpt_slot_size;
        let max_batch = (256 * 1024).max(BLOCK + page_size as u64);
        let segment_size = (4u64 << 20).max(16 * max_batch);
        // Room for every page stored raw, one header block per batch of pages, plus a
        // quarter of headroom for garbage between cleanings, plus the log head, the
        // cleaning reserve and a spare.
        let pages_per_batch = ((max_batch - BLOCK) / page_size as u64).max(1);
        let raw_bytes = capacity_pages * page_size as u64;
        let with_headers = raw_bytes + capacity_pages.div_ceil(pages_per_batch) * BLOCK;
        let usable_per_segment = segment_size - max_batch;
        let segments = (with_headers + with_headers / 4).div_ceil(usable_per_segment) + 5;
        Layout {
            ckpt_start,
            ckpt_slot_size,
            data_start,
            segment_size,
            max_batch,
            segments: segments.max(8),
        }
    }

    pub fn ckpt_offset(&self, slot: u8) -> u64 {
        self.ckpt_start + slot as u64 * self.ckpt_slot_size
    }

    pub fn data_end(&self) -> u64 {
        self.data_start + self.segments * self.segment_size
    }

    pub fn segment_of(&self, offset: u64) -> u64 {
        (offset - self.data_start) / self.segment_size
    }

    pub fn segment_start(&self, seg: u64) -> u64 {
        self.data_start + seg * self.segment_size
    }
}

/// What reading one header copy found.
#[derive(Debug)]
pub enum HeaderCopy {
    Valid(DeviceHeader),
    BadMagic([u8; 8]),
    Newer(u32),
    Corrupt,
}

impl DeviceHeader {
    /// Encode into one 4096-byte block.
    pub fn encode(&self, block: &mut [u8]) {
        assert_eq!(block.len() as u64, BLOCK);
        block.fill(0);
        let mut w = FieldWriter::new(block);
        w.bytes(&DEVICE_MAGIC);
        w.u32(self.format_version);
        w.u32(0); // flags, none defined
        w.u64(self.header_seq);
        w.bytes(&self.vm_uuid);
        w.u32(self.page_size);
        w.u64(self.capacity_pages);
        w.u8(self.checksum.to_u8());
        w.u8(self.codec.to_u8());
        w.u8(self.owned as u8);
        w.u8(self.ckpt_slot);
        w.u64(self.generation);
        w.u64(self.ckpt_seq);
        let owner = self.owner.as_bytes();
        let n = owner.len().min(MAX_HOST_ID);
        w.u16(n as u16);
        let mut host = [0u8; MAX_HOST_ID];
        host[..n].copy_from_slice(&owner[..n]);
        w.bytes(&host);
        let l = &self.layout;
        for v in [
            l.ckpt_start,
            l.ckpt_slot_size,
            l.data_start,
            l.segment_size,
            l.max_batch,
            l.segments,
        ] {
            w.u64(v);
        }
        let end = w.pos();
        let crc = crc32c::crc32c(&block[..end]);
        block[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode one header copy.
    pub fn decode(block: &[u8]) -> HeaderCopy {
        let mut r = FieldReader::new(block);
        let magic: [u8; 8] = r.bytes();
        if magic != DEVICE_MAGIC {
            return HeaderCopy::BadMagic(magic);
        }
        let format_version = r.u32();
        if format_version > FORMAT_VERSION {
            return HeaderCopy::Newer(format_version);
        }
        let _flags = r.u32();
        let header_seq = r.u64();
        let vm_uuid: [u8; 16] = r.bytes();
        let page_size = r.u32();
        let capacity_pages = r.u64();
        let checksum = ChecksumKind::from_u8(r.u8());
        let codec = CodecPolicy::from_u8(r.u8());
        let owned = r.u8();
        let ckpt_slot = r.u8();
        let generation = r.u64();
        let ckpt_seq = r.u64();
        let n = r.u16() as usize;
        let host: [u8; MAX_HOST_ID] = r.bytes();
        let mut lv = [0u64; 6];
        for v in lv.iter_mut() {
            *v = r.u64();
        }
        let end = r.pos();
        let crc = u32::from_le_bytes(block[end..end + 4].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&block[..end]) {
            return HeaderCopy::Corrupt;
        }
        let (Some(checksum), Some(codec)) = (checksum, codec) else {
            return HeaderCopy::Corrupt;
        };
        if n > MAX_HOST_ID || owned > 1 || ckpt_slot > 1 {
            return HeaderCopy::Corrupt;
        }
        HeaderCopy::Valid(DeviceHeader {
            format_version,
            header_seq,
            vm_uuid,
            page_size,
            capacity_pages,
            checksum,
            codec,
            owner: String::from_utf8_lossy(&host[..n]).into_owned(),
            owned: owned == 1,
            generation,
            ckpt_slot,
            ckpt_seq,
            layout: Layout {
                ckpt_start: lv[0],
                ckpt_slot_size: lv[1],
                data_start: lv[2],
                segment_size: lv[3],
                max_batch: lv[4],
                segments: lv[5],
            },
        })
    }

    /// Pick the current header from the two copies, or the error that explains why none is
    /// usable. Also returns which copy (0/1) it came from.
    pub fn choose(copy_a: &[u8], copy_b: &[u8]) -> Result<(DeviceHeader, u8)> {
        let copies = [Self::decode(copy_a), Self::decode(copy_b)];
        let mut best: Option<(DeviceHeader, u8)> = None;
        for (i, c) in copies.iter().enumerate() {
            if let HeaderCopy::Valid(h) = c {
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| h.header_seq > b.header_seq)
                {
                    best = Some((h.clone(), i as u8));
                }
            }
        }
        if let Some(b) = best {
            b.0.validate()?;
            return Ok(b);
        }
        for c in &copies {
            if let HeaderCopy::Newer(v) = c {
                return Err(SwapError::NewerVersion {
                    found: *v,
                    supported: FORMAT_VERSION,
                });
            }
        }
        if copies.iter().any(|c| matches!(c, HeaderCopy::Corrupt)) {
            return Err(SwapError::HeaderCorrupt);
        }
        match &copies[0] {
            HeaderCopy::BadMagic(m) => Err(SwapError::BadMagic {
                found: m.escape_ascii().to_string(),
            }),
            _ => Err(SwapError::HeaderCorrupt),
        }
    }

    /// Sanity of the fields a valid checksum cannot vouch for (a bug or a hand-made file).
    pub fn validate(&self) -> Result<()> {
        let bad = |r: String| {
            Err(SwapError::IndexInvalid {
                page: 0,
                reason: format!("header: {r}"),
            })
        };
        if self.page_size != 4096 && self.page_size != 2 << 20 {
            return bad(format!(
                "page size {} is neither 4096 nor 2 MiB",
                self.page_size
            ));
        }
        let l = &self.layout;
        if l.ckpt_slot_size < BLOCK + self.capacity_pages * 16
            || l.data_start < l.ckpt_start + 2 * l.ckpt_slot_size
            || l.segment_size < 2 * l.max_batch
            || l.max_batch < BLOCK + self.page_size as u64
            || l.segments == 0
            || [
                l.ckpt_start,
                l.ckpt_slot_size,
                l.data_start,
                l.segment_size,
                l.max_batch,
            ]
            .iter()
            .any(|v| v % BLOCK != 0)
        {
            return bad(format!("layout is inconsistent: {l:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceHeader {
        DeviceHeader {
            format_version: FORMAT_VERSION,
            header_seq: 3,
            vm_uuid: [5; 16],
            page_size: 4096,
            capacity_pages: 1000,
            checksum: ChecksumKind::Xxh3,
            codec: CodecPolicy::Lz4,
            owner: "host-a".into(),
            owned: true,
            generation: 7,
            ckpt_slot: 1,
            ckpt_seq: 9,
            layout: Layout::plan(4096, 1000),
        }
    }

    #[test]
    fn round_trip_and_choose_newer() {
        let h = sample();
        let mut a = vec![0u8; 4096];
        h.encode(&mut a);
        let mut h2 = h.clone();
        h2.header_seq = 4;
        h2.owned = false;
        let mut b = vec![0u8; 4096];
        h2.encode(&mut b);
        assert_eq!(DeviceHeader::choose(&a, &b).unwrap(), (h2.clone(), 1));
        // A torn newer copy falls back to the older one.
        b[40] ^= 0xff;
        assert_eq!(DeviceHeader::choose(&a, &b).unwrap(), (h.clone(), 0));
        a[41] ^= 0xff;
        assert!(matches!(
            DeviceHeader::choose(&a, &b),
            Err(SwapError::HeaderCorrupt)
        ));
    }

    #[test]
    fn bad_magic_and_newer_version() {
        let zero = vec![0u8; 4096];
        let err = DeviceHeader::choose(&zero, &zero).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
        let mut h = sample();
        h.format_version = FORMAT_VERSION + 1;
        let mut a = vec![0u8; 4096];
        h.encode(&mut a);
        let err = DeviceHeader::choose(&a, &zero).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "format version {} is newer than this pagewise supports ({})",
                FORMAT_VERSION + 1,
                FORMAT_VERSION
            )
        );
    }

    #[test]
    fn layout_holds_all_pages_raw() {
        for (ps, cap) in [(4096u32, 1u64), (4096, 262_144), (2 << 20, 512)] {
            let l = Layout::plan(ps, cap);
            let usable = (l.segment_size - l.max_batch) * (l.segments - 2);
            assert!(usable >= cap * ps as u64, "{l:?}");
            assert_eq!(l.data_start % BLOCK, 0);
        }
    }
}
