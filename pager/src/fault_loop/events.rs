//! Handling of uffd messages: page faults (missing, minor, write-protect) and the
//! non-cooperative events (REMOVE, UNMAP, REMAP, FORK).

use std::time::Instant;

use uffd::{Event, PlaceMode};

use super::{FaultLoop, FaultLoopError, Fetch};
use crate::metrics::VmMetrics;
use crate::page_state::PageState;

impl FaultLoop {
    pub(super) fn handle_event(
        &mut self,
        ev: Event,
        read_at: Instant,
    ) -> Result<(), FaultLoopError> {
        match ev {
            Event::PageFault { .. } if self.paused => {
                // Paused: the thread stays blocked; the fault is handled on resume.
                self.deferred.push((ev, read_at));
                Ok(())
            }
            Event::PageFault {
                addr, wp, minor, ..
            } => {
                let Some(page) = self.vm.layout.page_of_addr(addr) else {
                    tracing::warn!(vm = %self.vm.name, addr = format_args!("{addr:#x}"),
                        "fault outside every guest region; ignored");
                    return Ok(());
                };
                if wp {
                    self.write_fault(page)
                } else if minor {
                    self.minor_fault(page, read_at)
                } else {
                    self.missing_fault(page, read_at)
                }
            }
            Event::Remove { start, end } => {
                VmMetrics::add(&self.metrics().remove_events, 1);
                self.mark_removed(start, end, "remove");
                Ok(())
            }
            Event::Unmap { start, end } => {
                self.mark_removed(start, end, "unmap");
                Ok(())
            }
            Event::Remap { from, to, len } => Err(FaultLoopError::Remapped { from, to, len }),
            Event::Fork { uffd } => {
                tracing::warn!(vm = %self.vm.name, "VMM forked; the child's memory is not served");
                drop(uffd);
                Ok(())
            }
            Event::Unknown { event } => {
                tracing::warn!(vm = %self.vm.name, event, "unknown userfaultfd event ignored");
                Ok(())
            }
        }
    }

    /// Discarded/unmapped range: later faults read zeros, never stale data. A fetch in
    /// flight for such a page is not placed (see `place`).
    fn mark_removed(&mut self, start: u64, end: u64, what: &str) {
        let mut pages = 0;
        for range in self.vm.layout.pages_in_host_range(start, end) {
            pages += range.end - range.start;
            self.vm.states.set_range(range, PageState::Removed);
        }
        VmMetrics::add(&self.metrics().pages_removed, pages);
        tracing::debug!(vm = %self.vm.name, what, start = format_args!("{start:#x}"),
            end = format_args!("{end:#x}"), pages, "range discarded");
    }

    pub(super) fn missing_fault(
        &mut self,
        page: u64,
        read_at: Instant,
    ) -> Result<(), FaultLoopError> {
        VmMetrics::add(&self.metrics().faults, 1);
        match self.vm.states.get(page) {
            PageState::Removed | PageState::Zero => {
                VmMetrics::add(&self.metrics().faults_avoided, 1);
                self.waiters.entry(page).or_default().push(read_at);
                self.place_zero(page)
            }
            PageState::Present => {
                // It raced with a placement (or was placed by the VMM itself): just wake.
                VmMetrics::add(&self.metrics().faults_avoided, 1);
                VmMetrics::add(&self.metrics().wakes, 1);
                self.wake_page(page)?;
                self.record_latency(read_at);
                Ok(())
            }
            PageState::InFlight => {
                VmMetrics::add(&self.metrics().faults_avoided, 1);
                if self.prefetched.remove(&page) {
                    VmMetrics::add(&self.metrics().prefetch_hits, 1);
                }
                self.waiters.entry(page).or_default().push(read_at);
                Ok(())
            }
            PageState::Evicting => {
                // The evictor wakes the range when it is done; the thread then re-faults.
                tracing::trace!(vm = %self.vm.name, page, "fault on a page being evicted");
                Ok(())
            }
            PageState::Missing | PageState::Evicted => {
                match self.fetch(page, super::FetchReason::Demand)? {
                    Fetch::Submitted => {
                        VmMetrics::add(&self.metrics().faults_to_source, 1);
                        self.waiters.entry(page).or_default().push(read_at);
                        self.prefetch_around(page)
                    }
                    // Lost a race with another component changing the state: look again.
                    Fetch::NotClaimed => self.missing_fault_retry(page, read_at),
                    Fetch::Zero => {
                        VmMetrics::add(&self.metrics().faults_avoided, 1);
                        let absent = [PageState::Missing, PageState::Evicted];
                        if super::claim_absent(&self.vm.states, page, &absent).is_none() {
                            return self.missing_fault_retry(page, read_at);
                        }
                        self.waiters.entry(page).or_default().push(read_at);
                        self.place_zero(page)
                    }
                    Fetch::NoSource => {
                        // No live source for its route (or paused): the thread waits until
                        // one is installed.
                        VmMetrics::add(&self.metrics().faults_parked, 1);
                        self.parked.push((page, read_at));
                        Ok(())
                    }
                }
            }
        }
    }

    fn missing_fault_retry(&mut self, page: u64, read_at: Instant) -> Result<(), FaultLoopError> {
        // Undo the double count of the first attempt.
        self.metrics()
            .faults
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.missing_fault(page, read_at)
    }

    /// MINOR fault (shmem page in the page cache but not mapped): map it.
    fn minor_fault(&mut self, page: u64, read_at: Instant) -> Result<(), FaultLoopError> {
        VmMetrics::add(&self.metrics().faults, 1);
        VmMetrics::add(&self.metrics().faults_avoided, 1);
        let addr = self.page_addr(page);
        match self
            .vm
            .uffd
            .continue_(addr, self.vm.page_size(), PlaceMode::default())
        {
            Ok(_) | Err(uffd::CopyError::Exists { .. }) => {
                self.vm.dirty.forget_device_copy(page, 1);
                self.vm.states.set(page, PageState::Present);
                self.record_latency(read_at);
                Ok(())
            }
            Err(uffd::CopyError::Again { .. }) => {
                // A mapping change is pending; the thread re-faults after it.
                VmMetrics::add(&self.metrics().copy_retries, 1);
                Ok(())
            }
            Err(source) => Err(FaultLoopError::Place { page, source }),
        }
    }

    /// Write-protect fault (synchronous WP; see docs/pager.md and the evictor). The protocol
    /// lives in `dirty::resolve_write_fault`: `Evicting` -> leave the writer to the evictor;
    /// `Present` -> claim it (`Present -> InFlight`) so the evictor cannot protect and read it
    /// while we make it writable, mark it dirty, un-protect (wakes the writer), `Present`
    /// again; anything else -> un-protect + wake.
    fn write_fault(&mut self, page: u64) -> Result<(), FaultLoopError> {
        VmMetrics::add(&self.metrics().wp_faults, 1);
        let addr = self.page_addr(page);
        let vm = &self.vm;
        match crate::dirty::resolve_write_fault(
            &vm.uffd,
            &vm.states,
            &vm.dirty,
            page,
            addr,
            vm.page_size(),
        ) {
            Ok(crate::dirty::WriteFaultAction::Released(other)) => {
                tracing::debug!(vm = %vm.name, page, ?other, "WP fault on a page in an unexpected state; un-protected");
            }
            Ok(_) => {}
            // The range was unmapped meanwhile: the writer, if any, is gone with its mapping.
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %crate::error_chain(&e), "un-protecting after a WP fault failed")
            }
        }
        Ok(())
    }
}
