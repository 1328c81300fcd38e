//! Page sources: "give me these pages" -> completions.
//!
//! The fault loop asks a [`PageSource`] for guest pages by index and collects the answers when
//! the source's [`PageSource::completion_fd`] becomes readable. It never knows which
//! implementation answers: a swap device ([`swapdev_source`]), a raw memory image
//! ([`image`], e.g. a Firecracker snapshot memory file), later a migration source host.

pub mod image;
pub mod swapdev_source;

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use swapdev::AlignedBuf;

use crate::page_state::PageStateTable;
use crate::route::Route;

pub use image::ImageFileSource;
pub use swapdev_source::SwapdevSource;

/// The content of one guest page.
#[derive(Debug)]
pub enum PageContent {
    /// All zero: placed with UFFDIO_ZEROPAGE, no bytes move.
    Zero,
    /// Exactly one page of bytes.
    Data(AlignedBuf),
    /// One page at byte `at` of a buffer shared by a run of pages fetched with one read
    /// (consecutive pages sit back to back in it, so a run is placed straight from it).
    Shared { buf: Arc<AlignedBuf>, at: usize },
}

impl PageContent {
    /// The page's bytes (`page_size` of them); `None` for a zero page.
    pub fn bytes(&self, page_size: usize) -> Option<&[u8]> {
        match self {
            PageContent::Zero => None,
            PageContent::Data(buf) => Some(&buf.as_slice()[..page_size]),
            PageContent::Shared { buf, at } => Some(&buf.as_slice()[*at..*at + page_size]),
        }
    }
}

/// The answer to one [`PageSource::submit`].
#[derive(Debug)]
pub struct PageCompletion {
    pub page: u64,
    pub tag: u64,
    pub result: Result<PageContent, SourceError>,
}

/// Any error a store behind a source can report, kept as the cause of a [`SourceError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A page source failed. Variants say what the fault loop may do next: an I/O error is
/// retried, a damaged page is never retried nor placed, a gone host pauses the pages it routes
/// (a remote source) instead of tearing the VM down. No variant prints its cause inline: the
/// binary prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("page {page} is beyond the source's {capacity} pages")]
    OutOfRange { page: u64, capacity: u64 },
    /// A transient failure reading one page (worth retrying).
    #[error("reading page {page} failed")]
    Io {
        page: u64,
        #[source]
        source: BoxError,
    },
    /// The store answered, but the page's content is wrong (checksum mismatch, undecodable):
    /// retrying cannot help and the bytes must never reach the guest.
    #[error("page {page} from {source_name} is damaged")]
    Damaged {
        page: u64,
        source_name: String,
        #[source]
        source: BoxError,
    },
    /// The host that serves this source is unreachable (connection lost or refused). Pages it
    /// routes wait; the rest of the VM is served.
    #[error("the host behind {source_name} is gone")]
    HostGone {
        source_name: String,
        #[source]
        source: BoxError,
    },
    /// The page is on its way by another path (a migration source pushed it on its bulk
    /// channel before the request arrived): the page stays in flight, its waiters keep
    /// waiting, and the pushed copy is placed when it arrives. Not a failure.
    #[error("page {page} comes by another path")]
    Elsewhere { page: u64 },
    /// The source answered for a page it was not asked for, or one outside the guest.
    #[error("{source_name} answered page {page}, which was not requested")]
    Unrequested { page: u64, source_name: String },
    /// The source as a whole cannot serve (set-up failed, its I/O thread stopped).
    #[error("page source {source_name} failed")]
    Unavailable {
        source_name: String,
        #[source]
        source: BoxError,
    },
}

impl SourceError {
    /// Whether another attempt at the same page may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Io { .. })
    }

    /// Wrap any error as [`SourceError::Unavailable`] of `source_name`.
    pub fn unavailable(source_name: impl Into<String>, source: impl Into<BoxError>) -> Self {
        SourceError::Unavailable {
            source_name: source_name.into(),
            source: source.into(),
        }
    }
}

/// Something that fetches guest pages asynchronously.
pub trait PageSource: Send {
    /// Bytes per page (the guest page size this source serves).
    fn page_size(&self) -> usize;
    /// How many guest pages the source can answer for.
    fn capacity_pages(&self) -> u64;
    /// Start fetching `page`; its completion carries `tag`. A source may queue the request
    /// until [`PageSource::flush`].
    fn submit(&mut self, page: u64, tag: u64) -> Result<(), SourceError>;
    /// Push queued requests to the device. The fault loop calls it before it blocks.
    fn flush(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    /// Append completed fetches to `out`, waiting until at least `min` arrived (`0`: only
    /// what is ready). Returns how many were appended.
    fn poll(&mut self, out: &mut Vec<PageCompletion>, min: usize) -> Result<usize, SourceError>;
    /// Submitted but not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// Readable when `poll(.., 0)` may return completions (an eventfd; the caller does not
    /// read it, `poll` resets it).
    fn completion_fd(&self) -> BorrowedFd<'_>;
    /// A short description for logs and stats, e.g. "swapdev /var/lib/pw/vm1.swap".
    fn describe(&self) -> String;
    /// The route this source answers for in a routed fault loop.
    fn route(&self) -> Route;
    /// Before serving starts: mark pages the source knows to be all-zero (or never stored)
    /// as [`crate::page_state::PageState::Zero`] in `states`, when they are still `Missing`
    /// and `routed_here` says this source answers for them, so their faults are answered with
    /// UFFDIO_ZEROPAGE without any I/O. Returns how many were marked.
    fn seed_zero_pages(
        &mut self,
        states: &PageStateTable,
        routed_here: &dyn Fn(u64) -> bool,
    ) -> u64 {
        let _ = (states, routed_here);
        0
    }
}
