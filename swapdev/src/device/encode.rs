//! Encoding pages into records without the device: zero detection, lz4 and checksums are
//! the expensive part of a write and need nothing but the device's format choices, so a
//! caller that shares the device (the evictor next to the fault loop's reads) encodes with a
//! [`PageEncoder`] first and holds the device only to append the [`EncodedPages`].

use super::write::Rec;
use super::SwapDevice;
use crate::error::{Result, SwapError};
use crate::format::{encode_page, lz4_scratch_len, ChecksumKind, Codec, CodecPolicy};

/// The format choices of one device that encoding depends on. Cheap to clone; `Send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageEncoder {
    page_size: usize,
    capacity_pages: u64,
    codec: CodecPolicy,
    checksum: ChecksumKind,
}

/// One encoded record: where its payload sits in the arena.
#[derive(Debug, Clone)]
struct EncodedRec {
    page: u64,
    codec: Codec,
    payload: std::ops::Range<usize>,
    checksum: u32,
}

/// Pages in their stored form (payloads owned), ready for [`SwapDevice::write_encoded`] or
/// [`SwapDevice::begin_write`].
#[derive(Debug, Clone)]
pub struct EncodedPages {
    format: PageEncoder,
    recs: Vec<EncodedRec>,
    arena: Vec<u8>,
}

impl EncodedPages {
    /// Pages in this set (a page listed twice counts twice).
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Payload bytes that will be written (before batch headers and padding).
    pub fn payload_bytes(&self) -> usize {
        self.arena.len()
    }

    /// Tombstones for `pages` (they read back as not stored once written).
    pub(super) fn tombstones(format: PageEncoder, pages: impl Iterator<Item = u64>) -> Self {
        let recs = pages
            .map(|page| EncodedRec {
                page,
                codec: Codec::Absent,
                payload: 0..0,
                checksum: 0,
            })
            .collect();
        Self {
            format,
            recs,
            arena: Vec::new(),
        }
    }

    pub(super) fn format(&self) -> &PageEncoder {
        &self.format
    }

    /// The records, borrowing the payloads.
    pub(super) fn recs(&self) -> Vec<Rec<'_>> {
        self.recs
            .iter()
            .map(|r| Rec {
                page: r.page,
                codec: r.codec,
                payload: &self.arena[r.payload.clone()],
                checksum: r.checksum,
            })
            .collect()
    }
}

impl PageEncoder {
    /// Encode `(page index, content)` pairs; content is exactly one page, every index below
    /// the device's capacity.
    pub fn encode(&self, pages: &[(u64, &[u8])]) -> Result<EncodedPages> {
        for &(page, data) in pages {
            if page >= self.capacity_pages {
                return Err(SwapError::PageOutOfRange {
                    page,
                    capacity: self.capacity_pages,
                });
            }
            if data.len() != self.page_size {
                return Err(SwapError::WrongPageLength {
                    page,
                    len: data.len(),
                    page_size: self.page_size,
                });
            }
        }
        let mut scratch = vec![0; lz4_scratch_len(self.page_size)];
        let mut arena = Vec::new();
        let mut recs = Vec::with_capacity(pages.len());
        for &(page, data) in pages {
            let (codec, n) = encode_page(self.codec, data, &mut scratch);
            let bytes: &[u8] = match codec {
                Codec::Lz4 => &scratch[..n],
                Codec::Raw => data,
                _ => &[],
            };
            let at = arena.len();
            arena.extend_from_slice(bytes);
            recs.push(EncodedRec {
                page,
                codec,
                payload: at..arena.len(),
                checksum: if codec.has_payload() {
                    self.checksum.compute(bytes)
                } else {
                    0
                },
            });
        }
        Ok(EncodedPages {
            format: self.clone(),
            recs,
            arena,
        })
    }
}

impl SwapDevice {
    /// What encoding pages for this device needs, for use without holding the device.
    pub fn encoder(&self) -> PageEncoder {
        PageEncoder {
            page_size: self.page_size(),
            capacity_pages: self.capacity_pages(),
            codec: self.hdr.codec,
            checksum: self.hdr.checksum,
        }
    }

    /// Refuse pages encoded for a device with other format choices.
    pub(super) fn check_encoded(&self, enc: &EncodedPages) -> Result<()> {
        let ours = self.encoder();
        if *enc.format() != ours {
            return Err(SwapError::InvalidOption(format!(
                "pages were encoded for another device format ({:?}), this device is {ours:?}",
                enc.format()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder() -> PageEncoder {
        PageEncoder {
            page_size: 4096,
            capacity_pages: 8,
            codec: CodecPolicy::Lz4,
            checksum: ChecksumKind::Crc32c,
        }
    }

    #[test]
    fn encodes_zero_lz4_and_raw_and_checks_input() {
        let zero = vec![0u8; 4096];
        let text: Vec<u8> = (0..4096).map(|i| b'a' + (i % 7) as u8).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let enc = encoder()
            .encode(&[(0, &zero), (1, &text), (2, &random)])
            .unwrap();
        let recs = enc.recs();
        assert_eq!(recs[0].codec, Codec::Zero);
        assert_eq!(recs[1].codec, Codec::Lz4);
        assert!(recs[1].payload.len() < 4096);
        assert_eq!(recs[1].checksum, crc32c::crc32c(recs[1].payload));
        assert_eq!(recs[2].codec, Codec::Raw);
        assert_eq!(recs[2].payload, &random[..]);
        assert_eq!(enc.payload_bytes(), recs[1].payload.len() + 4096);
        let err = encoder().encode(&[(8, &zero)]).unwrap_err();
        assert!(
            matches!(err, SwapError::PageOutOfRange { page: 8, .. }),
            "{err}"
        );
        let err = encoder().encode(&[(1, &zero[..100])]).unwrap_err();
        assert!(
            matches!(err, SwapError::WrongPageLength { len: 100, .. }),
            "{err}"
        );
    }
}
