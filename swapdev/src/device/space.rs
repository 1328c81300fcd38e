//! Space: per-segment live bytes, the free-segment set, checkpoints and cleaning.
//!
//! A segment is reused only after a checkpoint that no longer references it has been made
//! durable (the checkpoint's head lies beyond it and no entry points into it), so a crash at
//! any point can always find every acknowledged page either through the checkpoint or
//! through the log chain after it. Cleaning copies the live pages of mostly-dead segments to
//! the log head, then checkpoints, which frees them.

use std::collections::BTreeSet;

use super::write::Rec;
use super::SwapDevice;
use crate::backend::IoOp;
use crate::error::{Result, SwapError};
use crate::format::entry::IndexEntry;
use crate::format::header::Layout;
use crate::format::wire::{align_down, align_up};
use crate::format::BLOCK;
use crate::AlignedBuf;

/// Free segments the write path leaves untouched, for cleaning to copy into.
pub(super) const RESERVE: usize = 3;

pub(super) struct SpaceMap {
    live: Vec<u64>,
    free: BTreeSet<u64>,
}

impl SpaceMap {
    pub(super) fn new(segments: u64) -> Self {
        Self {
            live: vec![0; segments as usize],
            free: BTreeSet::new(),
        }
    }

    pub(super) fn free_all_except(&mut self, seg: u64) {
        self.free = (0..self.live.len() as u64).filter(|&s| s != seg).collect();
    }

    pub(super) fn free_empty_except(&mut self, seg: u64) {
        self.free = (0..self.live.len() as u64)
            .filter(|&s| s != seg && self.live[s as usize] == 0)
            .collect();
    }

    pub(super) fn rebuild(&mut self, index: &[IndexEntry], l: &Layout) {
        self.live.iter_mut().for_each(|v| *v = 0);
        for e in index {
            self.add(e, l);
        }
    }

    pub(super) fn add(&mut self, e: &IndexEntry, l: &Layout) {
        if e.len > 0 {
            self.live[l.segment_of(e.offset()) as usize] += e.len as u64;
        }
    }

    pub(super) fn remove(&mut self, e: &IndexEntry, l: &Layout) {
        if e.len > 0 {
            let s = &mut self.live[l.segment_of(e.offset()) as usize];
            *s = s.saturating_sub(e.len as u64);
        }
    }

    pub(super) fn pop_free(&mut self) -> Option<u64> {
        self.free.pop_first()
    }

    pub(super) fn free_count(&self) -> usize {
        self.free.len()
    }

    pub(super) fn live_bytes(&self) -> u64 {
        self.live.iter().sum()
    }

    pub(super) fn segments_in_use(&self) -> usize {
        self.live.len() - self.free.len()
    }
}

impl SwapDevice {
    /// Make the index durable: flush the log, write the index to the other checkpoint slot,
    /// flush, switch the header to it, flush. Then segments with no live data become free.
    /// (The same steps a write job runs without holding its caller's lock: `job.rs`.)
    pub fn checkpoint(&mut self) -> Result<()> {
        self.finish_job()?;
        let mut c = self.ckpt_start()?;
        loop {
            let r = self.wait_all(&c.tags).and_then(|_| self.ckpt_step(&mut c));
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        }
    }

    /// After a durable checkpoint: segments it no longer references (no live data, not the
    /// head) become free and are trimmed. Reads in flight may point into them (submitted
    /// before the index moved on): they land first.
    pub(super) fn free_unreferenced(&mut self) -> Result<()> {
        while self.io.user_reads_in_flight() > 0 {
            self.pump(1)?;
        }
        let l = self.hdr.layout;
        let head_seg = l.segment_of(self.log.head);
        let mut newly_free = Vec::new();
        for (s, &live) in self.space.live.iter().enumerate() {
            let s = s as u64;
            if live == 0 && s != head_seg && !self.space.free.contains(&s) {
                newly_free.push(s);
            }
        }
        if !newly_free.is_empty() {
            tracing::debug!(count = newly_free.len(), "segments freed by checkpoint");
            let trims = newly_free
                .iter()
                .map(|&s| {
                    (
                        l.segment_start(s),
                        IoOp::Trim {
                            len: l.segment_size,
                        },
                    )
                })
                .collect();
            if let Err(e) = self.run_internal(trims) {
                tracing::warn!(error = %crate::error_chain(&e), "trimming freed segments failed (space is still reused)");
            }
            self.space.free.extend(newly_free);
        }
        self.log_since_ckpt = 0;
        Ok(())
    }

    /// Make sure `needed` segments plus the cleaning reserve are free, checkpointing and
    /// cleaning as necessary.
    pub(super) fn ensure_free(&mut self, needed: usize) -> Result<()> {
        let want = needed + RESERVE;
        if self.space.free_count() >= want {
            return Ok(());
        }
        self.checkpoint()?;
        let l = self.hdr.layout;
        let usable = l.segment_size - l.max_batch;
        while self.space.free_count() < want {
            let before = self.space.free_count();
            let gain_target = want - before + (l.segments as usize / 16).max(2);
            let victims = self.pick_victims(gain_target, usable);
            if victims.is_empty() {
                return Err(self.no_space(needed as u64 * l.segment_size));
            }
            self.copy_live(&victims)?;
            self.cleaned_segments += victims.len() as u64;
            self.checkpoint()?;
            if self.space.free_count() <= before {
                return Err(self.no_space(needed as u64 * l.segment_size));
            }
        }
        Ok(())
    }

    fn no_space(&self, needed: u64) -> SwapError {
        let l = &self.hdr.layout;
        SwapError::NoSpace {
            needed,
            data_bytes: l.segments * l.segment_size,
            live_bytes: self.space.live_bytes(),
        }
    }

    /// Segments with the least live data, as long as copying them fits in the free segments
    /// (keeping one spare) and each frees more than it costs.
    fn pick_victims(&self, gain_target: usize, usable: u64) -> Vec<u64> {
        let head_seg = self.hdr.layout.segment_of(self.log.head);
        let mut cands: Vec<(u64, u64)> = self
            .space
            .live
            .iter()
            .enumerate()
            .map(|(s, &live)| (live, s as u64))
            .filter(|&(live, s)| {
                s != head_seg && !self.space.free.contains(&s) && live * 20 < usable * 19
            })
            .collect();
        cands.sort_unstable();
        let budget = (self.space.free_count().saturating_sub(1) as u64) * usable;
        let mut picked = Vec::new();
        let mut copied = 0u64;
        for (live, s) in cands {
            // Batch header blocks and packing slack: count 1/16 extra.
            let cost = live + live / 16 + BLOCK;
            if copied + cost > budget {
                break;
            }
            copied += cost;
            picked.push(s);
            let used = copied.div_ceil(usable) as usize;
            if picked.len().saturating_sub(used) >= gain_target {
                break;
            }
        }
        picked
    }

    /// Rewrite every live page stored in `victims` at the log head (same payload, codec and
    /// checksum; verified before it is copied).
    fn copy_live(&mut self, victims: &[u64]) -> Result<()> {
        let l = self.hdr.layout;
        let set: std::collections::HashSet<u64> = victims.iter().copied().collect();
        let pages: Vec<(u64, IndexEntry)> = self
            .index
            .iter()
            .enumerate()
            .filter(|(_, e)| e.len > 0 && set.contains(&l.segment_of(e.offset())))
            .map(|(p, e)| (p as u64, *e))
            .collect();
        tracing::debug!(
            victims = victims.len(),
            pages = pages.len(),
            "cleaning segments"
        );
        for chunk in pages.chunks(256) {
            let reqs = chunk
                .iter()
                .map(|(_, e)| {
                    let start = align_down(e.offset(), BLOCK);
                    let end = align_up(e.offset() + e.len as u64, BLOCK);
                    (
                        start,
                        IoOp::Read {
                            buf: AlignedBuf::new((end - start) as usize),
                        },
                    )
                })
                .collect();
            let bufs: Vec<AlignedBuf> = self.run_internal(reqs)?.into_iter().flatten().collect();
            let mut recs = Vec::with_capacity(chunk.len());
            for ((page, e), buf) in chunk.iter().zip(&bufs) {
                let skip = (e.offset() - align_down(e.offset(), BLOCK)) as usize;
                let payload = &buf[skip..skip + e.len as usize];
                self.verify_payload(*page, e, payload)?;
                recs.push(Rec {
                    page: *page,
                    codec: e.codec().expect("validated entry"),
                    payload,
                    checksum: e.checksum,
                });
            }
            self.append(&recs)?;
        }
        Ok(())
    }
}
