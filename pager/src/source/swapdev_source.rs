//! [`SwapdevSource`]: pages from a [`swapdev::SwapDevice`].
//!
//! The device is shared (`Arc<Mutex<SwapDevice>>`) with other components: the evictor writes
//! and flushes pages while faults are being served. The lock is taken briefly for each
//! submit and poll. A page the device never stored reads as a zero page (a fresh VM).
//!
//! Two read drivers:
//! - **direct** (the device's backend has a completion fd, e.g. the io_uring file backend
//!   with its registered eventfd): the fault loop itself submits reads and reaps
//!   completions; the backend's fd is the source's completion fd. No thread, no channel.
//!   Buffered reads that hit the page cache complete inline when the ring is entered, so
//!   `flush` reaps once right after submitting and the page is placed in the same loop turn.
//! - **threaded** (no completion fd, e.g. NBD): see [`io_thread`].

mod io_thread;

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use swapdev::{PageData, PageRead, PageState as DevicePageState, SwapDevice};

use crate::page_state::{PageState, PageStateTable};

use super::{PageCompletion, PageContent, PageSource, SourceError};
use io_thread::IoThread;

/// Pages of one VM's swap device.
pub struct SwapdevSource {
    device: Arc<Mutex<SwapDevice>>,
    driver: Driver,
    in_flight: usize,
    page_size: usize,
    capacity_pages: u64,
    description: String,
}

enum Driver {
    Direct(DirectReads),
    Threaded(IoThread),
}

/// State of the direct driver.
struct DirectReads {
    /// A duplicate of the backend's completion fd (an eventfd the ring signals).
    completion_fd: OwnedFd,
    /// Completions reaped by `flush` (or failed submits), not yet handed out.
    ready: VecDeque<PageCompletion>,
    reads: Vec<PageRead>,
}

fn lock(dev: &Mutex<SwapDevice>) -> std::sync::MutexGuard<'_, SwapDevice> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

fn convert(read: PageRead) -> PageCompletion {
    let result = match read.result {
        Ok(PageData::Data(buf)) => Ok(PageContent::Data(buf)),
        Ok(PageData::Zero | PageData::NotStored) => Ok(PageContent::Zero),
        Err(e) => Err(SourceError::Page {
            page: read.page,
            why: e.to_string(),
        }),
    };
    PageCompletion {
        page: read.page,
        tag: read.tag,
        result,
    }
}

fn failed(page: u64, tag: u64, why: String) -> PageCompletion {
    PageCompletion {
        page,
        tag,
        result: Err(SourceError::Page { page, why }),
    }
}

/// Set an eventfd (8-byte add of 1). EAGAIN (counter at its maximum) still leaves it readable.
fn signal(fd: &OwnedFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// Reset an eventfd: read its counter (non-blocking; EAGAIN when already zero).
fn reset(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    let _ = nix::unistd::read(fd, &mut buf);
}

impl SwapdevSource {
    /// Serve reads from `device` (shared with whoever else needs it).
    pub fn new(device: Arc<Mutex<SwapDevice>>, description: String) -> Result<Self, SourceError> {
        let fail = |why: String| SourceError::Source {
            name: description.clone(),
            why,
        };
        let (page_size, capacity_pages, completion_fd) = {
            let d = lock(&device);
            let fd = match d.completion_fd() {
                Some(fd) => Some(
                    fd.try_clone_to_owned()
                        .map_err(|e| fail(format!("duplicating the completion fd: {e}")))?,
                ),
                None => None,
            };
            (d.page_size(), d.capacity_pages(), fd)
        };
        let driver = match completion_fd {
            Some(completion_fd) => Driver::Direct(DirectReads {
                completion_fd,
                ready: VecDeque::new(),
                reads: Vec::new(),
            }),
            None => Driver::Threaded(IoThread::spawn(device.clone()).map_err(fail)?),
        };
        Ok(Self {
            device,
            driver,
            in_flight: 0,
            page_size,
            capacity_pages,
            description,
        })
    }

    /// Whether the fault loop drives the device itself (no I/O thread).
    pub fn is_direct(&self) -> bool {
        matches!(self.driver, Driver::Direct(_))
    }

    fn thread_stopped(&self) -> SourceError {
        SourceError::Source {
            name: self.description.clone(),
            why: "the swap device I/O thread has stopped (see the log)".into(),
        }
    }

    fn device_failed(&self, e: swapdev::SwapError) -> SourceError {
        SourceError::Source {
            name: self.description.clone(),
            why: format!("the swap device read path failed: {e}"),
        }
    }
}

impl PageSource for SwapdevSource {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn capacity_pages(&self) -> u64 {
        self.capacity_pages
    }

    fn submit(&mut self, page: u64, tag: u64) -> Result<(), SourceError> {
        if page >= self.capacity_pages {
            return Err(SourceError::OutOfRange {
                page,
                capacity: self.capacity_pages,
            });
        }
        match &mut self.driver {
            Driver::Direct(d) => {
                if let Err(e) = lock(&self.device).submit_read(page, tag) {
                    d.ready.push_back(failed(page, tag, e.to_string()));
                }
            }
            Driver::Threaded(t) => {
                if t.submit(page, tag).is_err() {
                    return Err(self.thread_stopped());
                }
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Direct driver: enter the ring (submits what `submit` queued) and reap what finished
    /// inline (page-cache hits, zero pages); if anything is ready, set the completion fd so
    /// the loop does not sleep on it.
    fn flush(&mut self) -> Result<(), SourceError> {
        let Driver::Direct(d) = &mut self.driver else {
            return Ok(());
        };
        if self.in_flight == d.ready.len() {
            return Ok(());
        }
        d.reads.clear();
        let polled = lock(&self.device).poll_reads(&mut d.reads, 0);
        if let Err(e) = polled {
            return Err(self.device_failed(e));
        }
        d.ready.extend(d.reads.drain(..).map(convert));
        if !d.ready.is_empty() {
            signal(&d.completion_fd);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<PageCompletion>, min: usize) -> Result<usize, SourceError> {
        let n = match &mut self.driver {
            Driver::Direct(d) => {
                // Reset before reaping: a completion posted after this sets the fd again.
                reset(&d.completion_fd);
                let mut n = d.ready.len();
                out.extend(d.ready.drain(..));
                if self.in_flight > n {
                    d.reads.clear();
                    let polled = lock(&self.device).poll_reads(&mut d.reads, min.saturating_sub(n));
                    n += d.reads.len();
                    out.extend(d.reads.drain(..).map(convert));
                    if let Err(e) = polled {
                        self.in_flight -= n;
                        return Err(self.device_failed(e));
                    }
                }
                n
            }
            Driver::Threaded(t) => t
                .poll(out, min, self.in_flight)
                .map_err(|_| self.thread_stopped())?,
        };
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        match &self.driver {
            Driver::Direct(d) => d.completion_fd.as_fd(),
            Driver::Threaded(t) => t.completion_fd(),
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn seed_zero_pages(&mut self, states: &PageStateTable) -> u64 {
        let dev = lock(&self.device);
        let pages = (states.len() as u64).min(self.capacity_pages);
        let mut marked = 0;
        for page in 0..pages {
            if dev.page_state(page) != DevicePageState::Stored
                && states
                    .transition(page, PageState::Missing, PageState::Zero)
                    .is_ok()
            {
                marked += 1;
            }
        }
        marked
    }
}

#[cfg(test)]
mod tests;
