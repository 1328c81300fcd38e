//! `pager` — pages in motion into a live address space, through userfaultfd.

pub mod attach;
pub mod dirty;
pub mod page_state;
pub mod prefetch;
