//! `swapdev` — one VM's pages at rest.
//!
//! A swap device maps guest page index -> page content, stored on a [`backend::Backend`]
//! (a local or NFS file through io_uring, or an NBD export). The format is log-structured:
//! writes append checksummed page records in 4 KiB-aligned batches, an index checkpoint in
//! one of two slots plus the log chain after it rebuild the index after a crash, and a
//! header in two copies records the owner host and generation. docs/swapdev.md describes
//! the format and the crash-safety argument.

pub mod backend;
mod buf;
mod device;
mod error;
pub mod format;
mod image;

pub use buf::{AlignedBuf, BUF_ALIGN};
pub use device::{
    Access, CreateOptions, EncodedPages, FsckReport, OpenOptions, PageData, PageEncoder, PageRead,
    PageState, Reclaimed, RunRead, Stats, SwapDevice, WriteTicket, DEFAULT_FENCE_INTERVAL,
};
pub use error::{error_chain, Result, SwapError};
pub use format::{is_zero_page, ChecksumKind, CodecPolicy};
pub use image::ImageStats;
pub use uuid::Uuid;
