//! The fault-loop side of eviction and write tracking: what to do with a write-protect fault,
//! and with a REMOVE event (the guest freed memory). Kept here, next to the evictor, so the
//! protocol lives in one place; the fault loop calls these.

use uffd::{Uffd, UffdError};

use super::{PageStore, StoreError};
use crate::dirty::DirtyBitmap;
use crate::page_state::{PageState, PageStateTable};

/// What [`resolve_write_fault`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFaultAction {
    /// Write tracking: the page was marked dirty and un-protected (the writer is woken).
    Tracked,
    /// The page is being evicted: the writer stays blocked; the evictor wakes it after the
    /// punch (it then re-faults as MISSING) or un-protects it when abandoning.
    HeldForEviction,
    /// Any other state (a stale message, a page the table does not know as present): the
    /// range was un-protected and woken.
    Released(PageState),
}

/// Handle a write-protect fault on guest page `page`, mapped at `page_addr`.
///
/// The `Present` case claims the page (`Present -> InFlight`) around the un-protect, so the
/// evictor (which only claims `Present` pages) can never write-protect and read a page that
/// this call is about to make writable again: that interleaving would lose the write.
/// Precondition: only the caller moves pages from other states to `Present` (one fault-loop
/// thread per VM), so a state read as neither `Present` nor `Evicting` cannot become
/// `Evicting` before the un-protect lands.
pub fn resolve_write_fault(
    uffd: &Uffd,
    states: &PageStateTable,
    dirty: &DirtyBitmap,
    page: u64,
    page_addr: u64,
    page_size: u64,
) -> Result<WriteFaultAction, UffdError> {
    match states.transition(page, PageState::Present, PageState::InFlight) {
        Ok(()) => {
            dirty.mark(page);
            let r = uffd.write_protect(page_addr, page_size, false, false);
            states.set(page, PageState::Present);
            r.map(|()| WriteFaultAction::Tracked)
        }
        Err(PageState::Evicting) => Ok(WriteFaultAction::HeldForEviction),
        Err(other) => {
            uffd.write_protect(page_addr, page_size, false, false)?;
            Ok(WriteFaultAction::Released(other))
        }
    }
}

/// The guest discarded `pages` (UFFD_EVENT_REMOVE, e.g. virtio-balloon free page reporting):
/// mark them `Removed` (later faults get zero pages) and forget them in the store, so they
/// are never stored or served again. An eviction in progress on one of them notices the
/// state change and forgets its copy too. Returns how many pages were not already removed.
pub fn forget_removed(
    states: &PageStateTable,
    store: &dyn PageStore,
    pages: std::ops::Range<u64>,
) -> Result<usize, StoreError> {
    let mut changed = 0;
    let mut batch: Vec<u64> = Vec::with_capacity(256);
    for p in pages {
        if states.get(p) != PageState::Removed {
            changed += 1;
        }
        states.set(p, PageState::Removed);
        batch.push(p);
        if batch.len() == 256 {
            store.forget_pages(&batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.forget_pages(&batch)?;
    }
    Ok(changed)
}
