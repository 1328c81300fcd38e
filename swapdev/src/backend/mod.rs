//! Block backends a swap device lives on: a local/NFS file read and written with io_uring
//! (`file`), or an NBD export spoken to from userspace (`nbd`).
//!
//! A backend is a byte-addressed store with a completion-based interface: callers queue many
//! requests (`submit`), then collect completions as they arrive (`complete`). Nothing here
//! knows about pages, codecs or the index; that is `device`'s concern.

use std::os::fd::BorrowedFd;

use crate::AlignedBuf;

/// Errors raised by a backend. Each names the operation and where it failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op} at offset {offset} failed")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("short {op} at offset {offset}: {done} of {len} bytes")]
    Short {
        op: &'static str,
        offset: u64,
        done: usize,
        len: usize,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("backend setup failed: {0}")]
    Setup(String),
}

/// What a request asks of the backend.
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from `offset` (exactly `buf.len()` bytes).
    Read { buf: AlignedBuf },
    /// Write all of `buf` at `offset`.
    Write { buf: AlignedBuf },
    /// Make every completed write durable (fdatasync / NBD_CMD_FLUSH). `offset` is ignored.
    Flush,
    /// Tell the store `len` bytes at `offset` are no longer needed (punch hole / NBD_CMD_TRIM).
    Trim { len: u64 },
}

/// One queued request. `tag` is the caller's; it comes back with the completion.
#[derive(Debug)]
pub struct IoRequest {
    pub tag: u64,
    pub offset: u64,
    pub op: IoOp,
}

/// A finished request: the buffer comes back (filled, for reads) or the error.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<Option<AlignedBuf>, BackendError>,
}

/// A byte store with many requests in flight.
pub trait Backend: Send {
    /// Queue one request. May submit to the kernel/server right away or batch until `complete`.
    fn submit(&mut self, req: IoRequest) -> Result<(), BackendError>;

    /// Push out anything queued, then append completions to `out`, waiting until at least
    /// `min` have arrived (`min == 0`: only what is ready now). Returns how many were appended.
    fn complete(&mut self, out: &mut Vec<IoCompletion>, min: usize) -> Result<usize, BackendError>;

    /// Requests submitted whose completion has not been returned yet.
    fn in_flight(&self) -> usize;

    /// Current size of the store in bytes.
    fn size(&self) -> Result<u64, BackendError>;

    /// Grow the store to at least `len` bytes (files grow; an NBD export has a fixed size and
    /// returns an error naming the export's size when asked for more).
    fn grow(&mut self, len: u64) -> Result<(), BackendError>;

    /// Required alignment of offsets, lengths and buffer addresses (O_DIRECT: 512 or 4096;
    /// buffered files and NBD: 1). `AlignedBuf` is always 4096-aligned.
    fn alignment(&self) -> usize;

    /// A short human description, e.g. "file /var/lib/pw/vm1.swap (io_uring, O_DIRECT)".
    fn describe(&self) -> String;

    /// A descriptor that becomes readable when a completion may be ready, so a caller can
    /// wait for completions in `poll(2)` together with other fds and then call
    /// `complete(.., 0)`. An eventfd is reset by the caller reading it *before* it calls
    /// `complete`. `None`: the backend has no such fd; callers wait in `complete(.., 1)`.
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

pub mod file;
pub mod mem;
pub mod nbd;
pub mod nfs;
pub mod spec;
pub mod threaded;
