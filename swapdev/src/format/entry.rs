//! One index entry: where page N lives. 16 bytes, the same in memory and in a checkpoint.

use super::Codec;

/// Location, length, codec and checksum of one stored page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// Codec in the top 8 bits, device offset of the payload in the low 56.
    loc_codec: u64,
    pub len: u32,
    pub checksum: u32,
}

pub const ENTRY_LEN: usize = 16;
const OFFSET_MASK: u64 = (1 << 56) - 1;

impl IndexEntry {
    pub const ABSENT: IndexEntry = IndexEntry {
        loc_codec: 0,
        len: 0,
        checksum: 0,
    };
    pub const ZERO: IndexEntry = IndexEntry {
        loc_codec: (Codec::Zero as u64) << 56,
        len: 0,
        checksum: 0,
    };

    pub fn stored(codec: Codec, offset: u64, len: u32, checksum: u32) -> Self {
        debug_assert!(codec.has_payload() && offset <= OFFSET_MASK);
        Self {
            loc_codec: ((codec as u64) << 56) | offset,
            len,
            checksum,
        }
    }

    /// The codec, or `None` for a byte pattern no writer produces.
    pub fn codec(&self) -> Option<Codec> {
        Codec::from_u8((self.loc_codec >> 56) as u8)
    }

    pub fn offset(&self) -> u64 {
        self.loc_codec & OFFSET_MASK
    }

    /// Write the entry into the first [`ENTRY_LEN`] bytes of `out` (at least that long).
    pub fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.loc_codec.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.checksum.to_le_bytes());
    }

    /// Any 16 bytes are an entry (whether its codec is known is [`IndexEntry::codec`]).
    pub fn decode(b: &[u8; ENTRY_LEN]) -> Self {
        Self {
            loc_codec: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            checksum: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(off in 0u64..(1 << 50), len in 1u32..5000, ck in any::<u32>(), lz in any::<bool>()) {
            let codec = if lz { Codec::Lz4 } else { Codec::Raw };
            let e = IndexEntry::stored(codec, off, len, ck);
            let mut b = [0u8; ENTRY_LEN];
            e.encode(&mut b);
            let d = IndexEntry::decode(&b);
            prop_assert_eq!(d, e);
            prop_assert_eq!(d.codec(), Some(codec));
            prop_assert_eq!(d.offset(), off);
        }
    }

    #[test]
    fn absent_and_zero() {
        assert_eq!(IndexEntry::ABSENT.codec(), Some(Codec::Absent));
        assert_eq!(IndexEntry::ZERO.codec(), Some(Codec::Zero));
        assert_eq!(IndexEntry::default(), IndexEntry::ABSENT);
    }
}
