//! The fallback read driver for swap devices whose backend has no completion fd (NBD): a
//! small I/O thread takes page requests from a channel, submits them to the device (many in
//! flight), waits for completions and hands them back through a channel plus an eventfd that
//! wakes the fault loop.
//!
//! While the thread waits for a completion it holds the device lock; the wait is one device
//! read, which bounds how long a writer (the evictor) waits.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use swapdev::SwapDevice;

use super::{convert, lock};
use crate::source::PageCompletion;

/// The I/O thread and its channels.
pub(super) struct IoThread {
    requests: Option<Sender<(u64, u64)>>,
    completions: Receiver<PageCompletion>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The I/O thread is gone (it logged why).
#[derive(Debug)]
pub(super) struct ThreadStopped;

impl IoThread {
    pub(super) fn spawn(device: Arc<Mutex<SwapDevice>>) -> Result<Self, String> {
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let (req_tx, req_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let fd = wake.clone();
        let thread = std::thread::Builder::new()
            .name("swapdev-io".into())
            .spawn(move || run(device, req_rx, done_tx, fd))
            .map_err(|e| format!("spawning the I/O thread: {e}"))?;
        Ok(Self {
            requests: Some(req_tx),
            completions: done_rx,
            wake,
            thread: Some(thread),
        })
    }

    pub(super) fn submit(&self, page: u64, tag: u64) -> Result<(), ThreadStopped> {
        match &self.requests {
            Some(tx) if tx.send((page, tag)).is_ok() => Ok(()),
            _ => Err(ThreadStopped),
        }
    }

    /// Append completions to `out` until at least `min` arrived (at most `in_flight`).
    pub(super) fn poll(
        &self,
        out: &mut Vec<PageCompletion>,
        min: usize,
        in_flight: usize,
    ) -> Result<usize, ThreadStopped> {
        let _ = self.wake.read();
        let mut n = 0;
        while let Ok(c) = self.completions.try_recv() {
            out.push(c);
            n += 1;
        }
        while n < min && in_flight > n {
            out.push(self.completions.recv().map_err(|_| ThreadStopped)?);
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn completion_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
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
            tracing::error!(error = %crate::error_chain(&e), "swap device read path failed");
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
            let _ = done.send(super::failed(page, tag, std::sync::Arc::new(e)));
        }
    }
}
