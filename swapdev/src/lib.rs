//! `swapdev` — one VM's pages at rest.
//!
//! A swap device maps guest page index -> page content, stored on a [`backend::Backend`]
//! (a local or NFS file through io_uring, or an NBD export). See ARCHITECTURE.md for the
//! on-disk format and the crash-safety argument.

pub mod backend;
mod buf;

pub use buf::{AlignedBuf, BUF_ALIGN};
