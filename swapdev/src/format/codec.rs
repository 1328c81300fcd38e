//! How a page is stored: zero pages take no space, lz4 when it shrinks the page, raw
//! otherwise.

use serde::Serialize;

/// The codec policy chosen at create time for new writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecPolicy {
    /// Store non-zero pages as they are.
    Raw,
    /// Compress with lz4; fall back to raw when lz4 does not shrink the page.
    Lz4,
}

impl CodecPolicy {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            CodecPolicy::Raw => 1,
            CodecPolicy::Lz4 => 2,
        }
    }
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(CodecPolicy::Raw),
            2 => Some(CodecPolicy::Lz4),
            _ => None,
        }
    }
}

impl std::str::FromStr for CodecPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(CodecPolicy::Raw),
            "lz4" => Ok(CodecPolicy::Lz4),
            other => Err(format!("unknown codec {other:?} (expected raw or lz4)")),
        }
    }
}

/// The tag stored with each page record and index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Never stored, or removed (tombstone in the log).
    Absent = 0,
    /// All-zero page: no payload.
    Zero = 1,
    /// Payload is the page as is.
    Raw = 2,
    /// Payload is an lz4 block that decompresses to exactly one page.
    Lz4 = 3,
}

impl Codec {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Codec::Absent),
            1 => Some(Codec::Zero),
            2 => Some(Codec::Raw),
            3 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// True when records of this codec carry payload bytes.
    pub fn has_payload(self) -> bool {
        matches!(self, Codec::Raw | Codec::Lz4)
    }
}

/// True when every byte of `page` is zero (word-at-a-time scan).
pub fn is_zero_page(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Choose the codec for one page under `policy`. For `Lz4`, `scratch` receives the
/// compressed bytes and the returned length says how many are valid; it must be at least
/// [`lz4_scratch_len`] bytes.
pub fn encode_page(policy: CodecPolicy, page: &[u8], scratch: &mut [u8]) -> (Codec, usize) {
    if is_zero_page(page) {
        return (Codec::Zero, 0);
    }
    if policy == CodecPolicy::Lz4 {
        if let Ok(n) = lz4_flex::block::compress_into(page, scratch) {
            if n < page.len() {
                return (Codec::Lz4, n);
            }
        }
    }
    (Codec::Raw, page.len())
}

/// Scratch space `encode_page` needs for pages of `page_size` bytes.
pub fn lz4_scratch_len(page_size: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(page_size)
}

/// Why a stored lz4 payload is not one page.
#[derive(Debug, thiserror::Error)]
pub enum Lz4Error {
    #[error("lz4 payload decompresses to {got} bytes, not {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("lz4 payload does not decode into {expected} bytes")]
    Invalid {
        expected: usize,
        #[source]
        source: lz4_flex::block::DecompressError,
    },
}

/// Decompress an lz4 payload into `out`, which must be exactly one page long. Writes only
/// inside `out` and allocates nothing.
pub fn decode_lz4(payload: &[u8], out: &mut [u8]) -> Result<(), Lz4Error> {
    let expected = out.len();
    match lz4_flex::block::decompress_into(payload, out) {
        Ok(got) if got == expected => Ok(()),
        Ok(got) => Err(Lz4Error::WrongLength { got, expected }),
        Err(source) => Err(Lz4Error::Invalid { expected, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The one zero scan (the pager's eviction and image source use it too): any length,
    /// any alignment, a non-zero byte anywhere is seen.
    #[test]
    fn zero_scan_any_length_and_alignment() {
        let mut b = vec![0u8; 4099];
        for start in 0..9 {
            assert!(is_zero_page(&b[start..]));
        }
        for at in [0, 1, 7, 8, 63, 64, 4095, 4098] {
            b[at] = 1;
            assert!(!is_zero_page(&b), "byte {at}");
            assert!(!is_zero_page(&b[at..]), "from byte {at}");
            assert!(is_zero_page(&b[..at]), "before byte {at}");
            b[at] = 0;
        }
        assert!(is_zero_page(&[]));
    }

    #[test]
    fn zero_text_random() {
        let mut scratch = vec![0u8; lz4_scratch_len(4096)];
        let zero = vec![0u8; 4096];
        assert_eq!(
            encode_page(CodecPolicy::Lz4, &zero, &mut scratch),
            (Codec::Zero, 0)
        );
        let text: Vec<u8> = b"the quick brown fox "
            .iter()
            .cycle()
            .take(4096)
            .copied()
            .collect();
        let (c, n) = encode_page(CodecPolicy::Lz4, &text, &mut scratch);
        assert_eq!(c, Codec::Lz4);
        assert!(n < 512);
        let mut out = vec![0u8; 4096];
        decode_lz4(&scratch[..n], &mut out).unwrap();
        assert_eq!(out, text);
        assert_eq!(
            encode_page(CodecPolicy::Raw, &text, &mut scratch),
            (Codec::Raw, 4096)
        );
        let mut x = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(
            encode_page(CodecPolicy::Lz4, &random, &mut scratch),
            (Codec::Raw, 4096)
        );
        let err = decode_lz4(&[0xff, 1, 2], &mut out).unwrap_err();
        assert!(
            matches!(err, Lz4Error::Invalid { expected: 4096, .. }),
            "{err}"
        );
        // The cause is chained, not printed inline.
        assert_eq!(
            err.to_string(),
            "lz4 payload does not decode into 4096 bytes"
        );
        assert!(std::error::Error::source(&err).is_some());
        let err = decode_lz4(&scratch[..n], &mut out[..100]).unwrap_err();
        assert!(matches!(err, Lz4Error::Invalid { .. }), "{err}");
        // A block of three literals is valid lz4, but not a page.
        let err = decode_lz4(&[0x30, b'a', b'b', b'c'], &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                Lz4Error::WrongLength {
                    got: 3,
                    expected: 4096
                }
            ),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn lz4_round_trip(seed in any::<u64>(), runs in 1usize..64) {
            let mut page = vec![0u8; 4096];
            let mut x = seed | 1;
            for _ in 0..runs {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                let start = (x % 4096) as usize;
                let len = ((x >> 16) % 200) as usize;
                let end = (start + len).min(4096);
                page[start..end].fill((x >> 40) as u8);
            }
            let mut scratch = vec![0u8; lz4_scratch_len(4096)];
            let (codec, n) = encode_page(CodecPolicy::Lz4, &page, &mut scratch);
            match codec {
                Codec::Zero => prop_assert!(is_zero_page(&page)),
                Codec::Raw => prop_assert_eq!(n, 4096),
                Codec::Lz4 => {
                    let mut out = vec![0u8; 4096];
                    decode_lz4(&scratch[..n], &mut out).unwrap();
                    prop_assert_eq!(out, page);
                }
                Codec::Absent => prop_assert!(false),
            }
        }
    }
}
