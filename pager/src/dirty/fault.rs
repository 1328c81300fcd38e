//! The write-fault protocol: what the fault loop does with a synchronous write-protect fault.
//! It lives with write tracking (not with the evictor) so the fault loop depends on this
//! module only; the evictor relies on the claim it makes (see [`resolve_write_fault`]).

use uffd::{Uffd, UffdError};

use super::WriteTracker;
use crate::page_state::{PageState, PageStateTable};

/// What [`resolve_write_fault`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFaultAction {
    /// Write tracking: the page was marked written in every subscription and un-protected
    /// (the writer is woken).
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
    writes: &WriteTracker,
    page: u64,
    page_addr: u64,
    page_size: u64,
) -> Result<WriteFaultAction, UffdError> {
    match states.transition(page, PageState::Present, PageState::InFlight) {
        Ok(()) => {
            writes.mark_written(page);
            let r = uffd.write_protect(page_addr, page_size, false, false);
            states.set(page, PageState::Present);
            r.map(|()| WriteFaultAction::Tracked)
        }
        Err(PageState::Evicting) => Ok(WriteFaultAction::HeldForEviction),
        Err(other) => {
            // Writable again without a recorded write: its device copy is no longer known
            // to be current.
            writes.forget_device_copy(page, 1);
            uffd.write_protect(page_addr, page_size, false, false)?;
            Ok(WriteFaultAction::Released(other))
        }
    }
}
