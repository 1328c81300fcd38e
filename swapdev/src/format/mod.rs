//! The on-device format: header copies, index checkpoints, log batches, page codecs and
//! checksums. Pure encode/decode; no I/O.
//!
//! Device layout (all offsets 4 KiB aligned):
//! ```text
//! 0        header copy A        (4 KiB)
//! 4096     header copy B        (4 KiB)
//! 8192     checkpoint slot 0    (4 KiB meta + 16 B per page)
//! ...      checkpoint slot 1
//! data     segment 0, segment 1, ... (log batches; each batch inside one segment)
//! ```

pub mod batch;
pub mod checkpoint;
mod checksum;
mod codec;
pub mod entry;
pub mod header;
pub(crate) mod wire;

pub use checksum::ChecksumKind;
pub use codec::{
    decode_lz4, encode_page, is_zero_page, lz4_scratch_len, Codec, CodecPolicy, Lz4Error,
};

/// The unit of alignment of every structure and I/O.
pub const BLOCK: u64 = 4096;
