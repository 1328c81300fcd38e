//! `pager` — pages in motion into a live address space, through userfaultfd.

pub mod attach;
pub mod dirty;
pub mod fault_loop;
pub mod evict;
pub mod page_state;
pub mod wss;
pub mod prefetch;
pub mod metrics;
pub mod server;
pub mod source;
pub mod stats;
pub mod vm;

/// The userfaultfd layer, re-exported for users of the pager.
pub use uffd;
