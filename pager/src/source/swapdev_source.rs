//! [`SwapdevSource`]: pages from a [`swapdev::SwapDevice`].
//!
//! The device is shared (`Arc<Mutex<SwapDevice>>`) with other components: the evictor writes
//! and flushes pages while faults are being served. A small I/O thread owns the read side:
//! it takes page requests from a channel, submits them to the device (many in flight),
//! waits for completions and hands them back through a channel plus an eventfd that wakes
//! the fault loop. A page the device never stored reads as a zero page (a fresh VM).
//!
//! While the I/O thread waits for a completion it holds the device lock; the wait is one
//! device read (tens of µs on a local file), which bounds how long a writer waits.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use swapdev::{PageData, PageRead, PageState as DevicePageState, SwapDevice};

use crate::page_state::{PageState, PageStateTable};

use super::{PageCompletion, PageContent, PageSource, SourceError};

/// Pages of one VM's swap device.
pub struct SwapdevSource {
    device: Arc<Mutex<SwapDevice>>,
    requests: Option<Sender<(u64, u64)>>,
    completions: Receiver<PageCompletion>,
    completion_fd: Arc<EventFd>,
    in_flight: usize,
    page_size: usize,
    capacity_pages: u64,
    description: String,
    thread: Option<JoinHandle<()>>,
}

fn lock(dev: &Mutex<SwapDevice>) -> std::sync::MutexGuard<'_, SwapDevice> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

impl SwapdevSource {
    /// Serve reads from `device` (shared with whoever else needs it).
    pub fn new(device: Arc<Mutex<SwapDevice>>, description: String) -> Result<Self, SourceError> {
        let (page_size, capacity_pages) = {
            let d = lock(&device);
            (d.page_size(), d.capacity_pages())
        };
        let fail = |why: String| SourceError::Source {
            name: description.clone(),
            why,
        };
        let completion_fd = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| fail(format!("eventfd: {e}")))?,
        );
        let (req_tx, req_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let fd = completion_fd.clone();
        let thread = std::thread::Builder::new()
            .name("swapdev-io".into())
            .spawn({
                let device = device.clone();
                move || io_thread(device, req_rx, done_tx, fd)
            })
            .map_err(|e| fail(format!("spawning the I/O thread: {e}")))?;
        Ok(Self {
            device,
            requests: Some(req_tx),
            completions: done_rx,
            completion_fd,
            in_flight: 0,
            page_size,
            capacity_pages,
            description,
            thread: Some(thread),
        })
    }
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

fn io_thread(
    device: Arc<Mutex<SwapDevice>>,
    requests: Receiver<(u64, u64)>,
    done: Sender<PageCompletion>,
    wake: Arc<EventFd>,
) {
    let mut reads = Vec::new();
    let mut pending = 0usize;
    let mut open = true;
    while open || pending > 0 {
        // Block for work only when nothing is in flight.
        if pending == 0 {
            match requests.recv() {
                Ok(r) => submit(&device, r, &done, &mut pending),
                Err(_) => break,
            }
        }
        loop {
            match requests.try_recv() {
                Ok(r) => submit(&device, r, &done, &mut pending),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        reads.clear();
        let polled = lock(&device).poll_reads(&mut reads, usize::from(pending > 0));
        if let Err(e) = polled {
            // The device cannot complete anything any more: fail everything in flight.
            tracing::error!(%e, "swap device read path failed");
            return;
        }
        pending = pending.saturating_sub(reads.len());
        let mut sent = false;
        for r in reads.drain(..) {
            sent |= done.send(convert(r)).is_ok();
        }
        if sent {
            let _ = wake.write(1);
        }
    }
}

fn submit(
    device: &Mutex<SwapDevice>,
    (page, tag): (u64, u64),
    done: &Sender<PageCompletion>,
    pending: &mut usize,
) {
    match lock(device).submit_read(page, tag) {
        Ok(()) => *pending += 1,
        Err(e) => {
            let _ = done.send(PageCompletion {
                page,
                tag,
                result: Err(SourceError::Page {
                    page,
                    why: e.to_string(),
                }),
            });
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
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|tx| tx.send((page, tag)).is_ok());
        if !sent {
            return Err(SourceError::Source {
                name: self.description.clone(),
                why: "the swap device I/O thread has stopped (see the log)".into(),
            });
        }
        self.in_flight += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<PageCompletion>, min: usize) -> Result<usize, SourceError> {
        let _ = self.completion_fd.read();
        let mut n = 0;
        while let Ok(c) = self.completions.try_recv() {
            out.push(c);
            n += 1;
        }
        while n < min && self.in_flight > n {
            match self.completions.recv() {
                Ok(c) => {
                    out.push(c);
                    n += 1;
                }
                Err(_) => {
                    return Err(SourceError::Source {
                        name: self.description.clone(),
                        why: "the swap device I/O thread has stopped (see the log)".into(),
                    })
                }
            }
        }
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.completion_fd.as_fd()
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

impl Drop for SwapdevSource {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
