//! The REMOVE half of eviction: the guest freed memory, so the store must forget it. (The
//! write-fault protocol moved to `crate::dirty::fault`, which the fault loop calls.)

use super::{PageStore, StoreError};
use crate::page_state::{PageState, PageStateTable};

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
