//! The write path: pages become records, records are packed into batches, batches are
//! appended to the log with all of them in flight at once. A `write_pages` call returns
//! (is acknowledged) only when every one of its batches has completed; only then does the
//! in-memory index point at the new records.

use super::job::Job;
use super::{EncodedPages, SwapDevice};
use crate::backend::IoOp;
use crate::error::{Result, SwapError};
use crate::format::batch::{BatchBuilder, BatchHeader};
use crate::format::entry::IndexEntry;
use crate::format::Codec;

/// One record to append: a page's stored form.
pub(super) struct Rec<'a> {
    pub page: u64,
    pub codec: Codec,
    pub payload: &'a [u8],
    pub checksum: u32,
}

/// A piece's batches in flight: their request tags, and where each landed with its records
/// (applied to the index once all of them completed).
pub(super) struct Submitted {
    pub tags: Vec<u64>,
    placed: Vec<(u64, Vec<crate::format::batch::RecordDesc>)>,
}

impl SwapDevice {
    /// Store pages (`(page index, content)`; content is exactly one page). Returns when the
    /// writes are acknowledged: a crash after this keeps them (and `flush` makes them
    /// survive power loss). A page listed twice ends with its last content.
    ///
    /// The same as [`SwapDevice::encoder`] + [`PageEncoder::encode`](super::PageEncoder) +
    /// [`SwapDevice::write_encoded`]; a caller sharing the device encodes without it.
    pub fn write_pages(&mut self, pages: &[(u64, &[u8])]) -> Result<()> {
        self.finish_job()?;
        self.check_writable()?;
        let enc = self.encoder().encode(pages)?;
        self.write_encoded(enc)
    }

    /// Store pages encoded beforehand; returns when acknowledged (as `write_pages`).
    pub fn write_encoded(&mut self, enc: EncodedPages) -> Result<()> {
        self.finish_job()?;
        self.check_writable()?;
        self.check_encoded(&enc)?;
        self.fence_check(false)?;
        self.drive(&mut Job::new(0, enc))
    }

    /// Mark pages as no longer stored (the guest freed them): a tombstone record each.
    /// They read back as `NotStored`.
    pub fn remove_pages(&mut self, pages: &[u64]) -> Result<()> {
        self.finish_job()?;
        self.check_writable()?;
        for &p in pages {
            self.check_page(p)?;
        }
        self.fence_check(false)?;
        let stored = pages
            .iter()
            .copied()
            .filter(|&p| self.index[p as usize] != IndexEntry::ABSENT);
        let enc = EncodedPages::tombstones(self.encoder(), stored);
        self.drive(&mut Job::new(0, enc))
    }

    /// Pack records into batches, write them all, wait, then update the index.
    pub(super) fn append(&mut self, recs: &[Rec]) -> Result<()> {
        let r = self
            .append_submit(recs)
            .and_then(|sub| self.wait_all(&sub.tags).map(|_| sub));
        match r {
            Ok(sub) => {
                self.append_apply(sub);
                Ok(())
            }
            Err(e) => {
                // The chain may now have a hole; only a reopen (recovery) makes sense.
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Pack records into batches at the log head and submit them all.
    pub(super) fn append_submit(&mut self, recs: &[Rec]) -> Result<Submitted> {
        let l = self.hdr.layout;
        let ps = self.page_size();
        let mut sealed = Vec::new();
        let mut b = BatchBuilder::new(ps, l.max_batch as usize);
        for r in recs {
            if !b.fits(r.codec, r.payload.len()) {
                let full = std::mem::replace(&mut b, BatchBuilder::new(ps, l.max_batch as usize));
                sealed.push(self.seal(full, false)?);
            }
            b.push(r.page, r.codec, r.payload, r.checksum);
        }
        if !b.is_empty() {
            sealed.push(self.seal(b, true)?);
        }
        let mut writes = Vec::with_capacity(sealed.len());
        let mut placed = Vec::with_capacity(sealed.len());
        for (pos, buf, descs) in sealed {
            self.log_since_ckpt += buf.len() as u64;
            writes.push((pos, IoOp::Write { buf }));
            placed.push((pos, descs));
        }
        let tags = self.io_submit_all(writes)?;
        Ok(Submitted { tags, placed })
    }

    /// Every batch of `sub` completed: point the index at the new records.
    pub(super) fn append_apply(&mut self, sub: Submitted) {
        let l = self.hdr.layout;
        for (pos, descs) in sub.placed {
            for d in descs {
                let new = match d.codec {
                    Codec::Absent => IndexEntry::ABSENT,
                    Codec::Zero => IndexEntry::ZERO,
                    c => {
                        IndexEntry::stored(c, pos + d.payload_off as u64, d.stored_len, d.checksum)
                    }
                };
                let old = std::mem::replace(&mut self.index[d.page as usize], new);
                self.space.remove(&old, &l);
                self.space.add(&new, &l);
            }
        }
    }

    /// Place a batch at the log head and decide where the next one goes.
    fn seal(
        &mut self,
        b: BatchBuilder,
        call_end: bool,
    ) -> Result<(
        u64,
        crate::AlignedBuf,
        Vec<crate::format::batch::RecordDesc>,
    )> {
        let l = self.hdr.layout;
        let pos = self.log.head;
        let end = pos + b.total_len() as u64;
        let seg_end = l.segment_start(l.segment_of(pos)) + l.segment_size;
        debug_assert!(end <= seg_end);
        let next = if seg_end - end >= l.max_batch {
            end
        } else {
            let seg = self.space.pop_free().ok_or_else(|| SwapError::NoSpace {
                needed: l.segment_size,
                data_bytes: l.segments * l.segment_size,
                live_bytes: self.space.live_bytes(),
            })?;
            l.segment_start(seg)
        };
        let hdr = BatchHeader {
            seq: self.log.next_seq,
            generation: self.hdr.generation,
            nonce: self.log.nonce,
            prev_crc: self.log.last_crc,
            n_records: 0,
            total_len: 0,
            next_offset: next,
            call_end,
        };
        let (buf, crc, descs) = b.finish(hdr);
        self.log.head = next;
        self.log.next_seq += 1;
        self.log.last_crc = crc;
        Ok((pos, buf, descs))
    }

    /// Make every acknowledged write durable (fdatasync / NBD flush).
    pub fn flush(&mut self) -> Result<()> {
        self.finish_job()?;
        self.check_writable()?;
        self.fence_check(true)?;
        self.flush_backend()
    }
}
