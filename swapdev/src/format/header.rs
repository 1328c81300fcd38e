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
/// Offset of a header copy's crc (over every byte before it); the rest of the block is 0.
pub const CRC_AT: usize = 250;

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
        debug_assert_eq!(end, CRC_AT);
        let crc = crc32c::crc32c(&block[..end]);
        block[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode one header copy (the first `CRC_AT + 4` bytes of `block`; a shorter block is
    /// `Corrupt`). A copy is `Valid` only if [`DeviceHeader::encode`] writes exactly those
    /// bytes for it: no flags, an owner of valid UTF-8, zeros after it.
    pub fn decode(block: &[u8]) -> HeaderCopy {
        let Some(block) = block.get(..CRC_AT + 4) else {
            return HeaderCopy::Corrupt;
        };
        let mut r = FieldReader::new(block);
        let magic: [u8; 8] = r.bytes();
        if magic != DEVICE_MAGIC {
            return HeaderCopy::BadMagic(magic);
        }
        let format_version = r.u32();
        if format_version > FORMAT_VERSION {
            return HeaderCopy::Newer(format_version);
        }
        let flags = r.u32();
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
        if flags != 0 || n > MAX_HOST_ID || owned > 1 || ckpt_slot > 1 {
            return HeaderCopy::Corrupt;
        }
        let Ok(owner) = std::str::from_utf8(&host[..n]) else {
            return HeaderCopy::Corrupt;
        };
        if host[n..].iter().any(|&b| b != 0) {
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
            owner: owner.to_string(),
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
        // Every sum and product is checked: the fields come from the device (`None` is an
        // inconsistent layout, never a wrapped one that passes).
        let index = self
            .capacity_pages
            .checked_mul(16)
            .and_then(|n| n.checked_add(BLOCK));
        let ckpt_end = l
            .ckpt_slot_size
            .checked_mul(2)
            .and_then(|n| n.checked_add(l.ckpt_start));
        let data_end = l
            .segments
            .checked_mul(l.segment_size)
            .and_then(|n| n.checked_add(l.data_start));
        if index.is_none_or(|n| l.ckpt_slot_size < n)
            || l.ckpt_start < 2 * BLOCK
            || ckpt_end.is_none_or(|end| l.data_start < end)
            || l.max_batch
                .checked_mul(2)
                .is_none_or(|n| l.segment_size < n)
            || l.max_batch < BLOCK + self.page_size as u64
            || l.segments == 0
            || data_end.is_none()
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

    /// `block` with its crc recomputed (a crc-valid copy some writer could have made).
    fn recrc(mut block: Vec<u8>) -> Vec<u8> {
        let crc = crc32c::crc32c(&block[..CRC_AT]);
        block[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        block
    }

    /// A block shorter than a header copy is corrupt (the reader panicked past its end).
    #[test]
    fn short_block_is_corrupt() {
        let mut a = vec![0u8; 4096];
        sample().encode(&mut a);
        assert!(matches!(
            DeviceHeader::decode(&a[..CRC_AT + 4]),
            HeaderCopy::Valid(_)
        ));
        for len in [0, 12, 100, CRC_AT + 3] {
            assert!(
                matches!(DeviceHeader::decode(&a[..len]), HeaderCopy::Corrupt),
                "{len} bytes"
            );
        }
    }

    /// Crc-valid copies that `encode` never writes are corrupt, not accepted with their
    /// bytes silently changed: flags set, an owner that is not UTF-8 (it came back with
    /// U+FFFD in it, so re-encoded differently), bytes after the owner.
    #[test]
    fn copies_that_do_not_re_encode_to_their_bytes_are_corrupt() {
        let mut a = vec![0u8; 4096];
        sample().encode(&mut a);
        let owner_at = CRC_AT - 48 - MAX_HOST_ID;
        let mut flags = a.clone();
        flags[12] = 1;
        let mut utf8 = a.clone();
        utf8[owner_at] = 0xff;
        let mut padding = a.clone();
        padding[owner_at + 100] = b'x';
        for (what, block) in [("flags", flags), ("utf-8", utf8), ("padding", padding)] {
            assert!(
                matches!(DeviceHeader::decode(&recrc(block)), HeaderCopy::Corrupt),
                "{what}"
            );
        }
    }

    /// Layout fields whose sums or products overflow u64 made `validate` wrap (release) or
    /// panic (debug): a checkpoint slot of 2^63 bytes "fitted" below a data area at 0.
    #[test]
    fn layouts_whose_arithmetic_overflows_are_invalid() {
        let good = sample();
        assert!(good.validate().is_ok());
        let mut huge_cap = good.clone();
        huge_cap.capacity_pages = 1 << 60;
        let mut huge_slot = good.clone();
        huge_slot.layout.ckpt_slot_size = 1 << 63;
        let mut huge_batch = good.clone();
        huge_batch.layout.max_batch = 1 << 63;
        let mut huge_area = good.clone();
        huge_area.layout.segments = u64::MAX / 4096;
        let mut over_header = good.clone();
        over_header.layout.ckpt_start = 0;
        for (what, h) in [
            ("capacity", huge_cap),
            ("slot", huge_slot),
            ("batch", huge_batch),
            ("data area", huge_area),
            ("checkpoint over the header copies", over_header),
        ] {
            let err = h.validate().unwrap_err().to_string();
            assert!(err.contains("layout is inconsistent"), "{what}: {err}");
        }
    }
}
