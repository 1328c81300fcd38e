//! Writes and checkpoints as steps, so a caller sharing the device (the evictor next to the
//! fault loop's reads, all behind one mutex) holds it only to submit each step's I/O and to
//! apply its result, not for the whole I/O.
//!
//! A write job: for each piece (at most half a segment), make room (a checkpoint step if
//! free segments run short; cleaning, rare, runs synchronously), seal and submit the piece's
//! batches, and when all of them completed update the index; after the last piece, a
//! checkpoint step when the log has grown by the checkpoint interval. A checkpoint step is the
//! documented sequence: flush, write the slot, flush, write the header copy, flush, then free
//! segments. Nothing about crash safety changes: the index changes only after a piece's
//! batches all completed, the write is acknowledged ([`SwapDevice::poll_write`] returns
//! `true`) only after every piece (and the checkpoint, if one was due) finished, and there is
//! at most one job per device: every other write-path call (write, remove, flush, checkpoint,
//! release, close) first finishes a pending job, so a later call's batches are never submitted
//! before an earlier call's completed. Reads go on meanwhile against the index as it was:
//! it changes only under the caller's lock, and segments are freed only at the end of a
//! checkpoint step, after reads in flight have landed.

use super::write::Submitted;
use super::{EncodedPages, SwapDevice};
use crate::backend::IoOp;
use crate::error::{Result, SwapError};
use crate::format::checkpoint::{self, CheckpointMeta};
use crate::format::header::DeviceHeader;
use crate::format::BLOCK;
use crate::AlignedBuf;

/// Names a write started with [`SwapDevice::begin_write`].
#[derive(Debug)]
pub struct WriteTicket {
    id: u64,
}

/// A write in progress (the device holds at most one).
pub(super) struct Job {
    /// 0 for the synchronous write paths (nobody polls for their result).
    id: u64,
    enc: EncodedPages,
    /// First record not yet appended.
    next: usize,
    step: Step,
    /// A checkpoint was taken for the current piece's space already.
    space_checkpointed: bool,
    /// The checkpoint after the last piece was taken already.
    final_checkpointed: bool,
}

enum Step {
    /// Decide what comes next.
    Idle,
    /// A piece's batches in flight; `end` is the record after the piece.
    Append {
        sub: Submitted,
        end: usize,
    },
    Checkpoint(Ckpt),
}

/// Where a checkpoint step is: the requests of the current stage are in flight.
pub(super) struct Ckpt {
    stage: Stage,
    pub(super) tags: Vec<u64>,
    meta: CheckpointMeta,
    slot: u8,
    header: Option<(DeviceHeader, u8)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    FlushLog,
    WriteSlot,
    FlushSlot,
    WriteHeader,
    FlushHeader,
}

impl Job {
    pub(super) fn new(id: u64, enc: EncodedPages) -> Self {
        Self {
            id,
            enc,
            next: 0,
            step: Step::Idle,
            space_checkpointed: false,
            final_checkpointed: false,
        }
    }
}

impl SwapDevice {
    /// Start writing encoded pages (see [`super::PageEncoder`]) and return at once; the
    /// write is acknowledged when [`SwapDevice::poll_write`] returns `true` for the ticket.
    /// Between calls the caller may release its lock on the device: reads can be submitted
    /// and completed meanwhile. A pending write of another caller is finished first.
    pub fn begin_write(&mut self, enc: EncodedPages) -> Result<WriteTicket> {
        self.finish_job()?;
        self.check_writable()?;
        self.check_encoded(&enc)?;
        self.fence_check(false)?;
        self.next_job_id += 1;
        let id = self.next_job_id;
        let mut job = Job::new(id, enc);
        if self.advance(&mut job)? {
            self.job_results.push((id, Ok(())));
        } else {
            self.job = Some(job);
        }
        Ok(WriteTicket { id })
    }

    /// Make progress on the write `t` names: reap what the backend finished and submit the
    /// next step. `wait`: when not done, wait for one completion first (for backends without
    /// a completion fd). `Ok(true)`: acknowledged (the ticket is used up); an error ends the
    /// write, not acknowledged.
    ///
    /// It always reaps whatever the backend finished first, page reads included (those are
    /// parked for their reader: see [`SwapDevice::reads_parked`]), so a caller that resets a
    /// completion eventfd shared with a reader before calling it leaves no completion
    /// unreaped behind the reset.
    pub fn poll_write(&mut self, t: &WriteTicket, wait: bool) -> Result<bool> {
        self.pump_for_job(false)?;
        if let Some(at) = self.job_results.iter().position(|(id, _)| *id == t.id) {
            return self.job_results.swap_remove(at).1.map(|()| true);
        }
        let mut job = match self.job.take() {
            Some(j) if j.id == t.id => j,
            other => {
                self.job = other;
                return Err(SwapError::InvalidOption(format!(
                    "write {} is not pending on this device",
                    t.id
                )));
            }
        };
        let mut r = self.advance(&mut job);
        if wait && matches!(r, Ok(false)) {
            r = self
                .pump_for_job(true)
                .and_then(|()| self.advance(&mut job));
        }
        match r {
            Ok(false) => {
                self.job = Some(job);
                Ok(false)
            }
            done => done,
        }
    }

    /// A write begun with `begin_write` is still running.
    pub fn write_pending(&self) -> bool {
        self.job.is_some()
    }

    /// Page reads completed and parked by the device (a writer's reaping moved them there)
    /// that their reader has not collected yet.
    pub fn reads_parked(&self) -> bool {
        !self.io.ready.is_empty() || !self.io.ready_runs.is_empty()
    }

    /// Reap for a job: everything the backend finished (reads too), and with `wait` at
    /// least one completion while internal requests are in flight. If completions cannot be
    /// collected any more, the job's batches may have left a hole in the chain: the device
    /// is poisoned (reopen to recover).
    fn pump_for_job(&mut self, wait: bool) -> Result<()> {
        let min = usize::from(wait && self.io.internal_waiting() > 0);
        if min > 0 || self.backend.in_flight() > 0 {
            self.pump(min).inspect_err(|_| self.poisoned = true)?;
        }
        Ok(())
    }

    /// Run a pending write (someone else's `begin_write`) to its end, under the caller's
    /// lock; its result waits for its owner's `poll_write`.
    pub(super) fn finish_job(&mut self) -> Result<()> {
        if let Some(mut job) = self.job.take() {
            let r = self.drive(&mut job);
            if job.id != 0 {
                self.job_results.push((job.id, r));
            } else {
                r?;
            }
        }
        Ok(())
    }

    /// Run a job to its end, waiting for completions.
    pub(super) fn drive(&mut self, job: &mut Job) -> Result<()> {
        while !self.advance(job)? {
            self.pump_for_job(true)?;
        }
        Ok(())
    }

    /// Advance `job` as far as it goes without waiting. `Ok(true)`: finished.
    fn advance(&mut self, job: &mut Job) -> Result<bool> {
        loop {
            match &mut job.step {
                Step::Idle => {
                    let recs = job.enc.recs();
                    if job.next >= recs.len() {
                        if !job.final_checkpointed
                            && self.log_since_ckpt >= self.checkpoint_interval()
                        {
                            job.final_checkpointed = true;
                            job.step = Step::Checkpoint(self.ckpt_start()?);
                            continue;
                        }
                        return Ok(true);
                    }
                    let l = self.hdr.layout;
                    let piece_limit = (l.segment_size - l.max_batch) / 2;
                    let mut bytes = 0u64;
                    let mut end = job.next;
                    while end < recs.len()
                        && (end == job.next
                            || bytes + recs[end].payload.len() as u64 <= piece_limit)
                    {
                        bytes += recs[end].payload.len() as u64 + 64;
                        end += 1;
                    }
                    if self.space.free_count() < 1 + super::space::RESERVE {
                        if !job.space_checkpointed {
                            job.space_checkpointed = true;
                            job.step = Step::Checkpoint(self.ckpt_start()?);
                            continue;
                        }
                        // Still short after a checkpoint: clean (synchronous; rare).
                        self.ensure_free(1)?;
                    }
                    job.space_checkpointed = false;
                    let sub = self.append_submit(&recs[job.next..end]).inspect_err(|_| {
                        self.poisoned = true;
                    })?;
                    job.step = Step::Append { sub, end };
                }
                Step::Append { sub, end } => {
                    match self.io.take_done(&sub.tags) {
                        None => return Ok(false),
                        Some(Err(e)) => {
                            // The chain may now have a hole; only a reopen makes sense.
                            self.poisoned = true;
                            return Err(e);
                        }
                        Some(Ok(_)) => {}
                    }
                    let end = *end;
                    let Step::Append { sub, .. } = std::mem::replace(&mut job.step, Step::Idle)
                    else {
                        unreachable!("matched above")
                    };
                    self.append_apply(sub);
                    job.next = end;
                }
                Step::Checkpoint(c) => {
                    let done = match self.io.take_done(&c.tags) {
                        None => return Ok(false),
                        Some(r) => r.and_then(|_| self.ckpt_step(c)),
                    };
                    match done {
                        Ok(false) => {}
                        Ok(true) => job.step = Step::Idle,
                        Err(e) => {
                            self.poisoned = true;
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// First stage of a checkpoint: re-check ownership, flush the log.
    pub(super) fn ckpt_start(&mut self) -> Result<Ckpt> {
        self.check_writable()?;
        self.fence_check(true)?;
        let meta = CheckpointMeta {
            ckpt_seq: self.hdr.ckpt_seq + 1,
            generation: self.hdr.generation,
            head: self.log.head,
            next_seq: self.log.next_seq,
            prev_crc: self.log.last_crc,
            capacity: self.hdr.capacity_pages,
        };
        let tags = self
            .io_submit_all(vec![(0, IoOp::Flush)])
            .inspect_err(|_| self.poisoned = true)?;
        Ok(Ckpt {
            stage: Stage::FlushLog,
            tags,
            meta,
            slot: 1 - self.hdr.ckpt_slot,
            header: None,
        })
    }

    /// The current stage's requests completed: submit the next one. `Ok(true)`: the
    /// checkpoint is durable and segments it no longer references are free.
    pub(super) fn ckpt_step(&mut self, c: &mut Ckpt) -> Result<bool> {
        let l = self.hdr.layout;
        let (next, reqs) = match c.stage {
            Stage::FlushLog => {
                let buf = checkpoint::encode(&c.meta, &self.index, l.ckpt_slot_size);
                (
                    Stage::WriteSlot,
                    super::io::chunked(l.ckpt_offset(c.slot), &buf),
                )
            }
            Stage::WriteSlot => (Stage::FlushSlot, vec![(0, IoOp::Flush)]),
            Stage::FlushSlot => {
                let mut h = self.hdr.clone();
                h.ckpt_slot = c.slot;
                h.ckpt_seq = c.meta.ckpt_seq;
                h.header_seq = self.hdr.header_seq + 1;
                let copy = 1 - self.hdr_copy;
                let mut block = AlignedBuf::new(BLOCK as usize);
                h.encode(&mut block);
                c.header = Some((h, copy));
                (
                    Stage::WriteHeader,
                    vec![(copy as u64 * BLOCK, IoOp::Write { buf: block })],
                )
            }
            Stage::WriteHeader => (Stage::FlushHeader, vec![(0, IoOp::Flush)]),
            Stage::FlushHeader => {
                let (h, copy) = c.header.take().expect("header written before its flush");
                self.hdr = h;
                self.hdr_copy = copy;
                self.free_unreferenced()?;
                return Ok(true);
            }
        };
        c.tags = self.io_submit_all(reqs)?;
        c.stage = next;
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
