//! Placing fetched pages into guest memory: UFFDIO_COPY per contiguous run of pages,
//! UFFDIO_ZEROPAGE for zero pages, with the EEXIST / EAGAIN rules of the kernel.

use std::time::Instant;

use uffd::{CopyError, PlaceMode};

use super::{FaultLoop, FaultLoopError};
use crate::metrics::VmMetrics;
use crate::page_state::PageState;
use crate::source::{PageCompletion, PageContent};

/// The base page size: guests with larger pages live on hugetlbfs.
const BASE_PAGE_SIZE: u64 = 4096;

/// Whether `next` can be page `n` (0-based) of a run that starts with `first` and is placed
/// with one COPY: the next slice of the same shared buffer, or another separate page buffer
/// (gathered through the staging buffer).
fn continues(first: &PageContent, n: usize, next: &PageContent, ps: usize) -> bool {
    match (first, next) {
        (PageContent::Shared { buf, at }, PageContent::Shared { buf: b, at: a }) => {
            std::sync::Arc::ptr_eq(buf, b) && *a == at + n * ps
        }
        (PageContent::Data(_), PageContent::Data(_)) => true,
        _ => false,
    }
}

/// How a run of pages is filled.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Zero,
    /// The bytes of the whole run, back to back.
    Bytes(&'a [u8]),
}

impl FaultLoop {
    pub(super) fn page_addr(&self, page: u64) -> u64 {
        self.vm
            .layout
            .addr_of_page(page)
            .expect("pages handled by the fault loop lie inside a region")
    }

    pub(super) fn record_latency(&self, since: Instant) {
        let ns = since.elapsed().as_nanos() as u64;
        self.vm.metrics.fault_latency.record_ns(ns);
        VmMetrics::add(&self.vm.metrics.blocktime_ns, ns);
    }

    pub(super) fn wake_page(&self, page: u64) -> Result<(), FaultLoopError> {
        self.vm
            .uffd
            .wake(self.page_addr(page), self.vm.page_size())?;
        Ok(())
    }

    /// `pages` are now in guest memory: mark Present, record their waiters' latency.
    fn finish(&mut self, first: u64, count: u64, zero: bool) {
        for page in first..first + count {
            self.vm.states.set(page, PageState::Present);
            self.prefetched.remove(&page);
            self.retries.remove(&page);
            if let Some(waiters) = self.waiters.remove(&page) {
                for t in waiters {
                    self.record_latency(t);
                }
            }
        }
        self.vm.dirty.mark_placed(first, count);
        if zero {
            self.vm.dirty.forget_device_copy(first, count);
        }
        let counter = if zero {
            &self.vm.metrics.pages_zeroed
        } else {
            &self.vm.metrics.pages_copied
        };
        VmMetrics::add(counter, count);
    }

    /// Zero-fill one page (Removed/Zero state) for a waiting fault.
    pub(super) fn place_zero(&mut self, page: u64) -> Result<(), FaultLoopError> {
        self.place_run(page, 1, Fill::Zero)
    }

    /// Place a sorted batch of completions, coalescing contiguous runs.
    pub(super) fn place_completions(
        &mut self,
        done: &mut [PageCompletion],
    ) -> Result<(), FaultLoopError> {
        done.sort_unstable_by_key(|c| c.page);
        let ps = self.vm.page_size() as usize;
        let mut i = 0;
        while i < done.len() {
            let (page, tag) = (done[i].page, done[i].tag);
            let result = std::mem::replace(&mut done[i].result, Ok(PageContent::Zero));
            i += 1;
            let content = match result {
                Ok(c) => c,
                Err(e) => {
                    // Failed reads are settled before placement (`drain_completions`).
                    tracing::error!(vm = %self.vm.name, page, tag, error = %crate::error_chain(&e), "failed read reached placement; dropped");
                    continue;
                }
            };
            match self.vm.states.get(page) {
                PageState::InFlight => {}
                PageState::Removed => {
                    // Discarded while the read was in flight: never place the stale bytes.
                    self.prefetched.remove(&page);
                    self.retries.remove(&page);
                    if self.waiters.contains_key(&page) {
                        self.place_run(page, 1, Fill::Zero)?;
                    }
                    continue;
                }
                other => {
                    tracing::debug!(vm = %self.vm.name, page, ?other, "fetched page no longer wanted");
                    continue;
                }
            }
            match content {
                PageContent::Zero => {
                    // Extend over following zero pages of the same contiguous run.
                    let mut n = 1;
                    while i < done.len() && self.extends_run(page, n, &done[i]) {
                        if !matches!(done[i].result, Ok(PageContent::Zero)) {
                            break;
                        }
                        n += 1;
                        i += 1;
                    }
                    self.place_run(page, n, Fill::Zero)?;
                }
                data => {
                    // Extend over the following pages of the same contiguous run that come
                    // from the same kind of buffer: slices of one shared run read are placed
                    // straight from it; separate page buffers are gathered into one COPY.
                    let from = i;
                    let mut n = 1;
                    let device_copy = self.vm.dirty.device_copy_current(page);
                    while i < done.len()
                        && self.extends_run(page, n, &done[i])
                        && self.vm.dirty.device_copy_current(done[i].page) == device_copy
                        && matches!(&done[i].result, Ok(next) if continues(&data, n as usize, next, ps))
                    {
                        n += 1;
                        i += 1;
                    }
                    match &data {
                        PageContent::Shared { buf, at } => {
                            let bytes = &buf.as_slice()[*at..*at + n as usize * ps];
                            self.place_run(page, n, Fill::Bytes(bytes))?;
                        }
                        _ if n == 1 => {
                            let bytes = data.bytes(ps).expect("a page with bytes");
                            self.place_run(page, 1, Fill::Bytes(bytes))?;
                        }
                        _ => {
                            let mut staging = std::mem::take(&mut self.staging);
                            staging.clear();
                            staging.extend_from_slice(data.bytes(ps).expect("a page with bytes"));
                            for c in &done[from..i] {
                                if let Ok(next) = &c.result {
                                    staging.extend_from_slice(
                                        next.bytes(ps).expect("a page with bytes"),
                                    );
                                }
                            }
                            let r = self.place_run(page, n, Fill::Bytes(&staging));
                            self.staging = staging;
                            r?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `next` is page `first + n`, in flight, and host-contiguous with the run.
    fn extends_run(&self, first: u64, n: u64, next: &PageCompletion) -> bool {
        next.page == first + n
            && self.vm.states.get(next.page) == PageState::InFlight
            && self.vm.layout.addr_of_page(next.page)
                == Some(self.page_addr(first) + n * self.vm.page_size())
    }

    /// Place `count` pages from `first`. EEXIST: that page is there already (wake its
    /// waiters, continue after it). EAGAIN: keep what was placed, drain events (a REMOVE
    /// may have discarded part of the run), then place the rest page by page.
    fn place_run(&mut self, first: u64, count: u64, fill: Fill<'_>) -> Result<(), FaultLoopError> {
        let ps = self.vm.page_size();
        let base = self.page_addr(first);
        let mut done = 0u64;
        while done < count {
            let addr = base + done * ps;
            let len = (count - done) * ps;
            let result = match fill {
                Fill::Zero if ps > BASE_PAGE_SIZE => {
                    // hugetlbfs has no UFFDIO_ZEROPAGE (EINVAL): copy one zeroed huge page
                    // at a time instead.
                    if self.zero_huge_page.len() != ps as usize {
                        self.zero_huge_page = vec![0u8; ps as usize];
                    }
                    self.vm
                        .uffd
                        .copy_from(addr, &self.zero_huge_page, PlaceMode::default())
                }
                Fill::Zero => self.vm.uffd.zeropage(addr, len, false),
                Fill::Bytes(bytes) => {
                    let from = (done * ps) as usize;
                    // A device copy is placed write-protected: the guest's first write
                    // faults and ends its being current (`WriteTracker::mark_written`).
                    let mode = PlaceMode {
                        wp: self.vm.dirty.device_copy_current(first + done),
                        ..PlaceMode::default()
                    };
                    self.vm
                        .uffd
                        .copy_from(addr, &bytes[from..from + len as usize], mode)
                }
            };
            let zero = matches!(fill, Fill::Zero);
            match result {
                Ok(bytes) => {
                    self.finish(first + done, bytes / ps, zero);
                    done += bytes / ps;
                }
                Err(CopyError::Exists { placed, .. }) => {
                    let k = placed / ps;
                    self.finish(first + done, k, zero);
                    let existing = first + done + k;
                    self.vm.dirty.forget_device_copy(existing, 1);
                    self.wake_page(existing)?;
                    self.finish(existing, 1, zero);
                    done += k + 1;
                }
                Err(CopyError::Again { placed, .. }) => {
                    VmMetrics::add(&self.vm.metrics.copy_retries, 1);
                    let k = placed / ps;
                    self.finish(first + done, k, zero);
                    done += k;
                    self.drain_events()?;
                    return self.place_rest_singly(first, done, count, fill);
                }
                Err(CopyError::Unmapped { .. }) => {
                    tracing::debug!(vm = %self.vm.name, page = first + done, "placing into an unmapped range; dropped");
                    self.vm.dirty.forget_device_copy(first + done, count - done);
                    for p in first + done..first + count {
                        self.vm.states.set(p, PageState::Removed);
                        self.waiters.remove(&p);
                    }
                    return Ok(());
                }
                Err(source) => {
                    return Err(FaultLoopError::Place {
                        page: first + done,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// After EAGAIN: re-check each remaining page's state, then place it alone.
    fn place_rest_singly(
        &mut self,
        first: u64,
        from: u64,
        count: u64,
        fill: Fill<'_>,
    ) -> Result<(), FaultLoopError> {
        let ps = self.vm.page_size() as usize;
        for i in from..count {
            let page = first + i;
            let state = self.vm.states.get(page);
            let single = match (state, fill) {
                (PageState::Removed, _) | (_, Fill::Zero) => Fill::Zero,
                (PageState::InFlight, Fill::Bytes(b)) => {
                    Fill::Bytes(&b[i as usize * ps..(i as usize + 1) * ps])
                }
                _ => continue,
            };
            if state == PageState::Removed && !self.waiters.contains_key(&page) {
                continue;
            }
            self.place_run(page, 1, single)?;
        }
        Ok(())
    }
}
