//! `pager` — pages in motion into a live address space, through userfaultfd.

pub mod attach;
pub mod conventions;
pub mod dirty;
pub mod evict;
pub mod fault_loop;
pub mod layout;
pub mod metrics;
pub mod page_state;
pub mod prefetch;
pub mod route;
pub mod server;
pub mod source;
pub mod stats;
pub mod vm;
pub mod wss;

/// The userfaultfd layer, re-exported for users of the pager.
pub use uffd;
