//! Request bookkeeping between the device and its backend: every request gets an id; user
//! page reads complete into a ready queue, internal requests (log batches, checkpoints,
//! headers, flushes) are waited for by id. Completions arrive in any order and are routed
//! whoever is waiting.

use std::collections::{HashMap, VecDeque};

use super::read::{PageRead, RunRead, RunRequest, UserRead};
use super::SwapDevice;
use crate::backend::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use crate::error::Result;
use crate::AlignedBuf;

/// Most internal requests kept in flight at once.
const INTERNAL_WINDOW: usize = 64;
/// Largest single internal write (checkpoint chunks).
const CHUNK: usize = 1 << 20;

type IoResult = std::result::Result<Option<AlignedBuf>, BackendError>;

#[derive(Default)]
pub(super) struct IoState {
    next_id: u64,
    user_reads: HashMap<u64, UserRead>,
    internal_done: HashMap<u64, IoResult>,
    internal_waiting: usize,
    pub(super) ready: VecDeque<PageRead>,
    /// Reads of runs of back-to-back raw pages (one I/O each), by request id.
    run_reads: HashMap<u64, RunRequest>,
    pub(super) ready_runs: VecDeque<RunRead>,
    completions: Vec<IoCompletion>,
}

impl IoState {
    /// Internal requests submitted whose completion has not been reaped yet.
    pub(super) fn internal_waiting(&self) -> usize {
        self.internal_waiting
    }

    /// When every request in `tags` has completed: their results in order (or the first
    /// error), removed from the done set. `None` while any is still in flight.
    pub(super) fn take_done(&mut self, tags: &[u64]) -> Option<Result<Vec<Option<AlignedBuf>>>> {
        if !tags.iter().all(|t| self.internal_done.contains_key(t)) {
            return None;
        }
        let mut first_err = None;
        let mut out = Vec::with_capacity(tags.len());
        for t in tags {
            match self.internal_done.remove(t).expect("checked above") {
                Ok(b) => out.push(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                    out.push(None);
                }
            }
        }
        Some(match first_err {
            Some(e) => Err(e.into()),
            None => Ok(out),
        })
    }

    /// Page reads and run reads in flight (both point into the log: a checkpoint waits for
    /// them before it frees segments).
    pub(super) fn user_reads_in_flight(&self) -> usize {
        self.user_reads.len() + self.run_reads.len()
    }

    pub(super) fn run_reads_in_flight(&self) -> usize {
        self.run_reads.len()
    }
}

impl SwapDevice {
    fn next_id(&mut self) -> u64 {
        self.io.next_id += 1;
        self.io.next_id
    }

    /// Submit a read into `buf`; returns its tag for the caller to route the completion.
    fn submit_read_into(&mut self, offset: u64, buf: AlignedBuf) -> Result<u64> {
        let tag = self.next_id();
        self.backend.submit(IoRequest {
            tag,
            offset,
            op: IoOp::Read { buf },
        })?;
        Ok(tag)
    }

    pub(super) fn submit_user_read(
        &mut self,
        offset: u64,
        buf: AlignedBuf,
        r: UserRead,
    ) -> Result<()> {
        let tag = self.submit_read_into(offset, buf)?;
        self.io.user_reads.insert(tag, r);
        Ok(())
    }

    pub(super) fn submit_run_read(
        &mut self,
        offset: u64,
        buf: AlignedBuf,
        r: RunRequest,
    ) -> Result<()> {
        let tag = self.submit_read_into(offset, buf)?;
        self.io.run_reads.insert(tag, r);
        Ok(())
    }

    fn submit_internal(&mut self, offset: u64, op: IoOp) -> Result<u64> {
        let tag = self.next_id();
        self.backend.submit(IoRequest { tag, offset, op })?;
        self.io.internal_waiting += 1;
        Ok(tag)
    }

    /// Collect completions (waiting for at least `min`) and route them.
    pub(super) fn pump(&mut self, min: usize) -> Result<()> {
        let mut out = std::mem::take(&mut self.io.completions);
        out.clear();
        self.backend.complete(&mut out, min)?;
        for c in out.drain(..) {
            if let Some(r) = self.io.user_reads.remove(&c.tag) {
                let done = self.finish_user_read(r, c.result);
                self.io.ready.push_back(done);
            } else if let Some(r) = self.io.run_reads.remove(&c.tag) {
                let done = self.finish_run_read(r, c.result);
                self.io.ready_runs.push_back(done);
            } else {
                self.io.internal_waiting = self.io.internal_waiting.saturating_sub(1);
                self.io.internal_done.insert(c.tag, c.result);
            }
        }
        self.io.completions = out;
        Ok(())
    }

    /// Submit every request (no window) and return their tags. If one cannot be submitted,
    /// the ones before it are waited for and the error is returned.
    pub(super) fn io_submit_all(&mut self, reqs: Vec<(u64, IoOp)>) -> Result<Vec<u64>> {
        let mut tags = Vec::with_capacity(reqs.len());
        for (off, op) in reqs {
            match self.submit_internal(off, op) {
                Ok(t) => tags.push(t),
                Err(e) => {
                    let _ = self.wait_all(&tags);
                    return Err(e);
                }
            }
        }
        Ok(tags)
    }

    /// Wait until every request in `tags` completed; their results in order or the first
    /// error.
    pub(super) fn wait_all(&mut self, tags: &[u64]) -> Result<Vec<Option<AlignedBuf>>> {
        loop {
            if let Some(r) = self.io.take_done(tags) {
                return r;
            }
            self.pump(1)?;
        }
    }

    fn wait_internal(&mut self, tag: u64) -> Result<Option<AlignedBuf>> {
        loop {
            if let Some(r) = self.io.internal_done.remove(&tag) {
                return Ok(r?);
            }
            self.pump(1)?;
        }
    }

    /// Run requests with up to `INTERNAL_WINDOW` in flight; results in request order. All
    /// requests are waited for even when one fails; the first error is returned.
    pub(super) fn run_internal(
        &mut self,
        reqs: Vec<(u64, IoOp)>,
    ) -> Result<Vec<Option<AlignedBuf>>> {
        let n = reqs.len();
        let mut tags = Vec::with_capacity(n);
        let mut results: Vec<Option<AlignedBuf>> = Vec::with_capacity(n);
        let mut first_err = None;
        let mut reqs = reqs.into_iter();
        let mut waited = 0;
        loop {
            while tags.len() - waited < INTERNAL_WINDOW {
                let Some((off, op)) = reqs.next() else { break };
                match self.submit_internal(off, op) {
                    Ok(t) => tags.push(t),
                    Err(e) => {
                        first_err.get_or_insert(e);
                        break;
                    }
                }
            }
            if waited == tags.len() {
                break;
            }
            match self.wait_internal(tags[waited]) {
                Ok(b) => results.push(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                    results.push(None);
                }
            }
            waited += 1;
            if first_err.is_some() && waited == tags.len() {
                break;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    pub(super) fn read_sync(&mut self, offset: u64, len: u64) -> Result<AlignedBuf> {
        let buf = AlignedBuf::new(len as usize);
        let mut r = self.run_internal(vec![(offset, IoOp::Read { buf })])?;
        Ok(r.pop().flatten().expect("read returns its buffer"))
    }

    pub(super) fn write_sync(&mut self, offset: u64, buf: AlignedBuf) -> Result<()> {
        self.run_internal(vec![(offset, IoOp::Write { buf })])?;
        Ok(())
    }

    /// Write a large buffer as 1 MiB chunks in flight together.
    pub(super) fn write_chunked(&mut self, offset: u64, buf: AlignedBuf) -> Result<()> {
        self.run_internal(chunked(offset, &buf))?;
        Ok(())
    }

    /// Read a large region as 1 MiB chunks in flight together.
    pub(super) fn read_chunked(&mut self, offset: u64, len: u64) -> Result<AlignedBuf> {
        let mut reqs = Vec::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64);
            reqs.push((
                offset + at,
                IoOp::Read {
                    buf: AlignedBuf::new(n as usize),
                },
            ));
            at += n;
        }
        let parts = self.run_internal(reqs)?;
        let mut out = AlignedBuf::new(len as usize);
        let mut at = 0;
        for p in parts.into_iter().flatten() {
            out[at..at + p.len()].copy_from_slice(&p);
            at += p.len();
        }
        Ok(out)
    }

    pub(super) fn flush_backend(&mut self) -> Result<()> {
        self.run_internal(vec![(0, IoOp::Flush)])?;
        Ok(())
    }
}

/// Writes of `buf` at `offset` in 1 MiB chunks.
pub(super) fn chunked(offset: u64, buf: &[u8]) -> Vec<(u64, IoOp)> {
    buf.chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            (
                offset + (i * CHUNK) as u64,
                IoOp::Write {
                    buf: AlignedBuf::from_slice(c),
                },
            )
        })
        .collect()
}

/// A synchronous read straight on a backend with nothing else in flight (used before a
/// device exists).
pub(super) fn read_direct(backend: &mut dyn Backend, offset: u64, len: u64) -> Result<AlignedBuf> {
    backend.submit(IoRequest {
        tag: u64::MAX,
        offset,
        op: IoOp::Read {
            buf: AlignedBuf::new(len as usize),
        },
    })?;
    let mut out = Vec::new();
    loop {
        backend.complete(&mut out, 1)?;
        if let Some(c) = out.pop() {
            return Ok(c.result?.expect("read returns its buffer"));
        }
    }
}
