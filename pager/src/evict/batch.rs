//! Evicting one batch of pages without ever losing a write.
//!
//! Order (LAB.md "Eviction must be race-free"):
//! 1. claim: CAS each page `Present -> Evicting` (pages in any other state are skipped; a
//!    fault-loop thread that is un-protecting a page holds it as `InFlight`, so we never
//!    claim a page someone is about to make writable);
//! 2. write-protect the claimed runs (synchronous uffd-WP: a writer now blocks in a WP fault,
//!    which the fault loop leaves alone for `Evicting` pages);
//! 3. read the pages from the memory file (`pread`: page cache, no fault);
//! 4. store them (acknowledged on return);
//! 5. punch the file ranges (`fallocate(PUNCH_HOLE|KEEP_SIZE)`): the pages are absent in
//!    every mapping;
//! 6. CAS `Evicting -> Evicted` (or `Zero`); a page the guest discarded meanwhile
//!    (`Removed` by a REMOVE event) is forgotten in the store instead;
//! 7. wake the runs: blocked writers re-fault as MISSING and the fault loop serves the stored
//!    content; their write then proceeds on the right data.
//!
//! Any failure before the punch abandons the run: un-protect (which wakes writers) and move
//! `Evicting -> Present`; memory stays authoritative and nothing is lost.

use std::os::fd::BorrowedFd;

use nix::fcntl::{fallocate, FallocateFlags};
use uffd::Uffd;

use super::{EvictError, PageStore};
use crate::dirty::WriteTracker;
use crate::layout::{GuestLayout, Run};
use crate::page_state::{PageState, PageStateTable};
use crate::wss::WorkingSetTracker;

/// Everything one VM's eviction touches.
pub struct EvictionTarget<'a> {
    pub uffd: &'a Uffd,
    /// The guest memory file (shmem/hugetlbfs) the VMM maps shared.
    pub memory_file: BorrowedFd<'a>,
    pub layout: &'a GuestLayout,
    pub states: &'a PageStateTable,
    pub store: &'a dyn PageStore,
    pub tracker: Option<&'a WorkingSetTracker>,
    /// The VM's write log: a writer held by an abandoned run proceeds without a WP fault of
    /// its own, so the run's pages are marked written for every consumer.
    pub writes: Option<&'a WriteTracker>,
}

/// What happened to one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Pages now `Evicted` (content in the store, absent from memory).
    pub evicted: usize,
    /// Pages now `Zero` (all-zero content; also recorded in the store).
    pub zero: usize,
    /// Pages not claimed because they were not `Present` any more.
    pub skipped: usize,
    /// Pages the guest discarded while we evicted them: forgotten in the store.
    pub removed_meanwhile: usize,
    /// Pages left in memory because a step failed (the error is returned too).
    pub abandoned: usize,
}

use swapdev::is_zero_page as is_zero;

impl EvictionTarget<'_> {
    fn page_size(&self) -> usize {
        self.layout.page_size()
    }

    /// Undo a claim: un-protect the run (wakes blocked writers) and hand the pages back.
    fn abandon(&self, run: &Run) -> usize {
        if let Err(e) =
            self.uffd
                .write_protect(run.host_addr, run.byte_len(self.page_size()), false, false)
        {
            // The VMM's mm is gone or the range was unmapped: nobody can write any more.
            tracing::warn!(error = %crate::error_chain(&e), first_page = run.first_page, "un-protect on abandon failed");
        }
        let mut n = 0;
        for p in run.page_range() {
            if self
                .states
                .transition(p, PageState::Evicting, PageState::Present)
                .is_ok()
            {
                if let Some(writes) = self.writes {
                    writes.mark_written(p);
                }
                n += 1;
            }
        }
        n
    }

    fn read_run(&self, run: &Run, out: &mut [u8]) -> Result<(), EvictError> {
        let mut done = 0;
        while done < out.len() {
            let off = run.file_offset + done as u64;
            let n = nix::sys::uio::pread(self.memory_file, &mut out[done..], off as libc::off_t)
                .map_err(|e| EvictError::ReadMemoryFile {
                    offset: off,
                    source: e.into(),
                })?;
            if n == 0 {
                return Err(EvictError::MemoryFileTooShort {
                    offset: off,
                    len: (out.len() - done) as u64,
                });
            }
            done += n;
        }
        Ok(())
    }

    fn punch(&self, run: &Run) -> Result<(), EvictError> {
        let len = run.byte_len(self.page_size());
        fallocate(
            self.memory_file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            run.file_offset as libc::off_t,
            len as libc::off_t,
        )
        .map_err(|e| EvictError::PunchHole {
            offset: run.file_offset,
            len,
            source: e.into(),
        })
    }

    /// Evict `pages` (ascending, distinct). `buf` is scratch space reused across batches.
    /// On error, every claimed page is back to `Present` or fully evicted; the returned
    /// outcome (inside the error's context) is logged, and the first error returned.
    pub fn evict_batch(
        &self,
        pages: &[u64],
        buf: &mut Vec<u8>,
    ) -> Result<BatchOutcome, (BatchOutcome, EvictError)> {
        let ps = self.page_size();
        let mut outcome = BatchOutcome::default();

        // 1. Claim.
        let mut claimed = Vec::with_capacity(pages.len());
        for &p in pages {
            if (p as usize) >= self.states.len() {
                return Err((outcome, EvictError::PageOutOfRange { page: p }));
            }
            match self
                .states
                .transition(p, PageState::Present, PageState::Evicting)
            {
                Ok(()) => claimed.push(p),
                Err(_) => outcome.skipped += 1,
            }
        }
        if claimed.is_empty() {
            return Ok(outcome);
        }
        let runs = match self.layout.runs(&claimed) {
            Ok(r) => r,
            Err(e) => {
                for &p in &claimed {
                    let _ = self
                        .states
                        .transition(p, PageState::Evicting, PageState::Present);
                }
                outcome.abandoned += claimed.len();
                return Err((outcome, e.into()));
            }
        };

        // 2. Write-protect (protecting never wakes; the kernel rejects WP|DONTWAKE with
        // EINVAL). A run that cannot be protected is abandoned right away.
        let mut first_error: Option<EvictError> = None;
        let mut live: Vec<Run> = Vec::with_capacity(runs.len());
        for run in runs {
            match self
                .uffd
                .write_protect(run.host_addr, run.byte_len(ps), true, false)
            {
                Ok(()) => live.push(run),
                Err(e) => {
                    outcome.abandoned += self.abandon(&run);
                    first_error.get_or_insert(EvictError::Uffd(e));
                }
            }
        }

        // 3. Read.
        let total: usize = live.iter().map(|r| r.pages as usize * ps).sum();
        buf.clear();
        buf.resize(total, 0);
        let mut readable: Vec<(Run, usize)> = Vec::with_capacity(live.len());
        let mut at = 0;
        for run in live {
            let len = run.byte_len(ps) as usize;
            match self.read_run(&run, &mut buf[at..at + len]) {
                Ok(()) => {
                    readable.push((run, at));
                    at += len;
                }
                Err(e) => {
                    outcome.abandoned += self.abandon(&run);
                    first_error.get_or_insert(e);
                }
            }
        }

        // 4. Store (acknowledged on return).
        let mut items: Vec<(u64, &[u8])> = Vec::with_capacity(claimed.len());
        for (run, start) in &readable {
            for (i, p) in run.page_range().enumerate() {
                let s = start + i * ps;
                items.push((p, &buf[s..s + ps]));
            }
        }
        if !items.is_empty() {
            if let Err(e) = self.store.store_pages(&items) {
                for (run, _) in &readable {
                    outcome.abandoned += self.abandon(run);
                }
                return Err((outcome, first_error.unwrap_or(EvictError::Store(e))));
            }
        }

        // 5.-7. Punch, publish the new state, wake.
        let mut gone: Vec<u64> = Vec::new();
        let mut evicted: Vec<u64> = Vec::with_capacity(items.len());
        for (run, start) in &readable {
            if let Err(e) = self.punch(run) {
                outcome.abandoned += self.abandon(run);
                first_error.get_or_insert(e);
                continue;
            }
            for (i, p) in run.page_range().enumerate() {
                let s = start + i * ps;
                let to = if is_zero(&buf[s..s + ps]) {
                    PageState::Zero
                } else {
                    PageState::Evicted
                };
                match self.states.transition(p, PageState::Evicting, to) {
                    Ok(()) if to == PageState::Zero => {
                        outcome.zero += 1;
                        evicted.push(p);
                    }
                    Ok(()) => {
                        outcome.evicted += 1;
                        evicted.push(p);
                    }
                    Err(_) => gone.push(p),
                }
            }
            if let Err(e) = self.uffd.wake(run.host_addr, run.byte_len(ps)) {
                tracing::warn!(error = %crate::error_chain(&e), first_page = run.first_page, "wake after eviction failed");
                first_error.get_or_insert(EvictError::Uffd(e));
            }
        }
        if let Some(t) = self.tracker {
            t.note_evicted(&evicted);
        }
        if !gone.is_empty() {
            outcome.removed_meanwhile += gone.len();
            if let Err(e) = self.store.forget_pages(&gone) {
                first_error.get_or_insert(EvictError::Store(e));
            }
        }
        match first_error {
            None => Ok(outcome),
            Some(e) => Err((outcome, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_scan() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[1] = 9;
        assert!(!is_zero(&page[1..]));
        assert!(is_zero(&page[2..]));
    }
}
