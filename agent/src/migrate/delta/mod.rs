//! Fewer bytes per page on the wire: XBZRLE deltas for pages sent again ([`xbzrle`], against
//! the sender's [`cache`] of what it sent), lz4 for pages sent whole when it pays
//! ([`compress`]), chosen page by page by the sender's [`PageEncoder`]. Every encoded page
//! carries the checksum of the page it decodes to; the destination checks it before the
//! page is used and asks for the whole page when it does not match (see
//! `session::incoming`).

pub mod cache;
pub mod compress;
mod encoder;
pub mod xbzrle;

pub use encoder::{CompressionStats, EncodeStats, EncoderConfig, PageEncoder, XbzrleStats};

/// How an `EncodedPage` frame's body encodes its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// An XBZRLE delta against the copy the destination holds.
    Xbzrle = 1,
    /// The whole page, lz4 block format.
    Lz4 = 2,
}

impl Encoding {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Encoding::Xbzrle),
            2 => Some(Encoding::Lz4),
            _ => None,
        }
    }
}

/// An encoded page that does not give its page.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the XBZRLE delta is malformed")]
    Delta(#[from] xbzrle::DeltaError),
    #[error("the lz4 page")]
    Lz4(#[from] compress::Lz4Error),
    #[error("the decoded page sums to {computed:#010x}, the frame says {expected:#010x}")]
    Checksum { expected: u32, computed: u32 },
}

/// Decode `body` into `page`, which holds the destination's copy of the page (the base of a
/// delta). On any error `page` holds no page and must not be used.
pub fn decode_into(
    encoding: Encoding,
    body: &[u8],
    checksum: u32,
    page: &mut [u8],
) -> Result<(), DecodeError> {
    match encoding {
        Encoding::Xbzrle => xbzrle::apply(page, body)?,
        Encoding::Lz4 => compress::decompress(body, page)?,
    }
    let computed = crate::migrate::message::page_checksum(page);
    if computed != checksum {
        return Err(DecodeError::Checksum {
            expected: checksum,
            computed,
        });
    }
    Ok(())
}
