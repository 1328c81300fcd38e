//! [`Threaded`]: any backend driven by a thread of its own, so that it has a completion fd
//! (an eventfd the thread sets whenever it hands back completions). For backends without
//! one (NBD) whose caller waits in `poll(2)` together with other fds (the pager's fault
//! loop).
//!
//! The thread owns the inner backend: it submits requests as they arrive, waits for one
//! completion at a time while any is in flight, and sends completions back over a channel.
//! A request arriving while the thread waits goes out with the next completion.
//! `size` and `alignment` are taken once at spawn; `grow` is refused (the inner backend is
//! owned by the thread; grow it before wrapping).

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Backend, BackendError, IoCompletion, IoRequest};

/// A backend behind an I/O thread, with a completion fd.
pub struct Threaded {
    requests: Option<Sender<IoRequest>>,
    done: Receiver<IoCompletion>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
    size: u64,
    alignment: usize,
    description: String,
}

impl Threaded {
    /// Move `inner` onto a new thread.
    pub fn spawn(inner: Box<dyn Backend>) -> Result<Self, BackendError> {
        let size = inner.size()?;
        let alignment = inner.alignment();
        let description = format!("{} (through an I/O thread)", inner.describe());
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| BackendError::Setup(format!("eventfd: {e}")))?,
        );
        let (req_tx, req_rx) = channel();
        let (done_tx, done_rx) = channel();
        let fd = wake.clone();
        let thread = std::thread::Builder::new()
            .name("backend-io".into())
            .spawn(move || run(inner, req_rx, done_tx, fd))
            .map_err(|e| BackendError::Setup(format!("spawning the backend I/O thread: {e}")))?;
        Ok(Self {
            requests: Some(req_tx),
            done: done_rx,
            wake,
            thread: Some(thread),
            in_flight: 0,
            size,
            alignment,
            description,
        })
    }

    fn stopped(&self) -> BackendError {
        BackendError::Protocol(format!(
            "the I/O thread of {} has stopped",
            self.description
        ))
    }
}

impl Backend for Threaded {
    fn submit(&mut self, req: IoRequest) -> Result<(), BackendError> {
        match &self.requests {
            Some(tx) if tx.send(req).is_ok() => {
                self.in_flight += 1;
                Ok(())
            }
            _ => Err(self.stopped()),
        }
    }

    fn complete(&mut self, out: &mut Vec<IoCompletion>, min: usize) -> Result<usize, BackendError> {
        let mut n = 0;
        while let Ok(c) = self.done.try_recv() {
            out.push(c);
            n += 1;
        }
        while n < min && self.in_flight > n {
            match self.done.recv() {
                Ok(c) => {
                    out.push(c);
                    n += 1;
                }
                Err(_) => {
                    self.in_flight -= n;
                    return Err(self.stopped());
                }
            }
        }
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn size(&self) -> Result<u64, BackendError> {
        Ok(self.size)
    }

    fn grow(&mut self, len: u64) -> Result<(), BackendError> {
        if len <= self.size {
            return Ok(());
        }
        Err(BackendError::Setup(format!(
            "{} cannot grow to {len} bytes: grow the backend before moving it to its thread",
            self.description
        )))
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.wake.as_fd())
    }
}

impl Drop for Threaded {
    fn drop(&mut self) {
        // Closing the request channel ends the thread once everything in flight completed.
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut inner: Box<dyn Backend>,
    requests: Receiver<IoRequest>,
    done: Sender<IoCompletion>,
    wake: Arc<EventFd>,
) {
    let mut pending: HashSet<u64> = HashSet::new();
    let mut out = Vec::new();
    let mut open = true;
    let submit = |inner: &mut Box<dyn Backend>, pending: &mut HashSet<u64>, req: IoRequest| {
        let tag = req.tag;
        match inner.submit(req) {
            Ok(()) => {
                pending.insert(tag);
            }
            Err(e) => {
                let _ = done.send(IoCompletion {
                    tag,
                    result: Err(e),
                });
                let _ = wake.write(1);
            }
        }
    };
    while open || !pending.is_empty() {
        if pending.is_empty() {
            match requests.recv() {
                Ok(r) => submit(&mut inner, &mut pending, r),
                Err(_) => break,
            }
        }
        loop {
            match requests.try_recv() {
                Ok(r) => submit(&mut inner, &mut pending, r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        out.clear();
        if let Err(e) = inner.complete(&mut out, usize::from(!pending.is_empty())) {
            // The backend cannot complete anything any more: fail what is in flight.
            let cause = crate::error_chain(&e);
            for tag in pending.drain() {
                let _ = done.send(IoCompletion {
                    tag,
                    result: Err(BackendError::Protocol(cause.clone())),
                });
            }
            let _ = wake.write(1);
            return;
        }
        let mut sent = false;
        for c in out.drain(..) {
            pending.remove(&c.tag);
            sent |= done.send(c).is_ok();
        }
        if sent {
            let _ = wake.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::{MemBackend, MemStore};
    use crate::backend::IoOp;
    use crate::AlignedBuf;

    #[test]
    fn completes_through_the_thread_and_signals_its_fd() {
        let store = MemStore::new();
        let mut inner = MemBackend::new(store.clone());
        inner.grow(1 << 20).unwrap();
        let mut b = Threaded::spawn(Box::new(inner)).unwrap();
        assert!(b.describe().contains("I/O thread"));
        assert!(b.grow(2 << 20).is_err());
        let mut data = AlignedBuf::new(8192);
        data.fill(0x5a);
        b.submit(IoRequest {
            tag: 1,
            offset: 4096,
            op: IoOp::Write { buf: data },
        })
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(b.complete(&mut out, 1).unwrap(), 1);
        assert!(out.pop().unwrap().result.is_ok());
        for tag in 2..40u64 {
            b.submit(IoRequest {
                tag,
                offset: 4096,
                op: IoOp::Read {
                    buf: AlignedBuf::new(4096),
                },
            })
            .unwrap();
        }
        let mut fds = [nix::poll::PollFd::new(
            b.completion_fd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert_eq!(ready, 1, "completion fd never became readable");
        while out.len() < 38 {
            b.complete(&mut out, 1).unwrap();
        }
        assert_eq!(b.in_flight(), 0);
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (2..40).collect::<Vec<_>>());
        for c in out {
            let buf = c.result.unwrap().unwrap();
            assert!(buf.iter().all(|&x| x == 0x5a));
        }
        // A refused request comes back as a failed completion.
        b.submit(IoRequest {
            tag: 99,
            offset: 1 << 30,
            op: IoOp::Read {
                buf: AlignedBuf::new(4096),
            },
        })
        .unwrap();
        let mut out = Vec::new();
        b.complete(&mut out, 1).unwrap();
        assert_eq!(out[0].tag, 99);
        assert!(out[0].result.is_err());
    }
}
