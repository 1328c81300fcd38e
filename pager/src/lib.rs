//! `pager` — pages in motion into a live address space, through userfaultfd.

pub mod attach;
pub mod conventions;
pub mod damage;
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

/// An error and its causes on one line, `outer: cause: root cause` (for log fields; the
/// variants themselves never print their source inline): the swap device's, shared.
pub use swapdev::error_chain;

/// The userfaultfd layer, re-exported for users of the pager.
pub use uffd;
