//! The write path: pages become records, records are packed into batches, batches are
//! appended to the log with all of them in flight at once. A `write_pages` call returns
//! (is acknowledged) only when every one of its batches has completed; only then does the
//! in-memory index point at the new records.

use super::SwapDevice;
use crate::backend::IoOp;
use crate::error::{Result, SwapError};
use crate::format::batch::{BatchBuilder, BatchHeader};
use crate::format::entry::IndexEntry;
use crate::format::{encode_page, Codec};

/// One record to append: a page's stored form.
pub(super) struct Rec<'a> {
    pub page: u64,
    pub codec: Codec,
    pub payload: &'a [u8],
    pub checksum: u32,
}

impl SwapDevice {
    /// Store pages (`(page index, content)`; content is exactly one page). Returns when the
    /// writes are acknowledged: a crash after this keeps them (and `flush` makes them
    /// survive power loss). A page listed twice ends with its last content.
    pub fn write_pages(&mut self, pages: &[(u64, &[u8])]) -> Result<()> {
        self.check_writable()?;
        let ps = self.page_size();
        for &(page, data) in pages {
            self.check_page(page)?;
            if data.len() != ps {
                return Err(SwapError::WrongPageLength {
                    page,
                    len: data.len(),
                    page_size: ps,
                });
            }
        }
        self.fence_check(false)?;
        // Encode: lz4 output goes to one arena, referenced by range until the arena is final.
        let policy = self.hdr.codec;
        let kind = self.hdr.checksum;
        let mut arena: Vec<u8> = Vec::new();
        let mut plan: Vec<(u64, Codec, std::ops::Range<usize>, u32)> =
            Vec::with_capacity(pages.len());
        let mut scratch = std::mem::take(&mut self.scratch);
        for &(page, data) in pages {
            let (codec, n) = encode_page(policy, data, &mut scratch);
            let (range, sum) = match codec {
                Codec::Lz4 => {
                    let at = arena.len();
                    arena.extend_from_slice(&scratch[..n]);
                    (at..at + n, kind.compute(&scratch[..n]))
                }
                Codec::Raw => (0..0, kind.compute(data)),
                _ => (0..0, 0),
            };
            plan.push((page, codec, range, sum));
        }
        self.scratch = scratch;
        let recs: Vec<Rec> = plan
            .iter()
            .zip(pages)
            .map(|((page, codec, range, sum), &(_, data))| Rec {
                page: *page,
                codec: *codec,
                payload: match codec {
                    Codec::Lz4 => &arena[range.clone()],
                    Codec::Raw => data,
                    _ => &[],
                },
                checksum: *sum,
            })
            .collect();
        self.append_with_space(&recs)
    }

    /// Mark pages as no longer stored (the guest freed them): a tombstone record each.
    /// They read back as `NotStored`.
    pub fn remove_pages(&mut self, pages: &[u64]) -> Result<()> {
        self.check_writable()?;
        for &p in pages {
            self.check_page(p)?;
        }
        self.fence_check(false)?;
        let recs: Vec<Rec> = pages
            .iter()
            .filter(|&&p| self.index[p as usize] != IndexEntry::ABSENT)
            .map(|&page| Rec {
                page,
                codec: Codec::Absent,
                payload: &[],
                checksum: 0,
            })
            .collect();
        self.append_with_space(&recs)
    }

    /// Append in pieces of at most half a segment, making room before each piece.
    fn append_with_space(&mut self, recs: &[Rec]) -> Result<()> {
        let l = self.hdr.layout;
        let piece_limit = (l.segment_size - l.max_batch) / 2;
        let mut start = 0;
        while start < recs.len() {
            let mut bytes = 0u64;
            let mut end = start;
            while end < recs.len()
                && (end == start || bytes + recs[end].payload.len() as u64 <= piece_limit)
            {
                bytes += recs[end].payload.len() as u64 + 64;
                end += 1;
            }
            self.ensure_free(1)?;
            self.append(&recs[start..end])?;
            start = end;
        }
        if self.log_since_ckpt >= self.checkpoint_interval() {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Pack records into batches, write them all, wait, then update the index.
    pub(super) fn append(&mut self, recs: &[Rec]) -> Result<()> {
        let r = self.append_inner(recs);
        if r.is_err() {
            // The chain may now have a hole; only a reopen (recovery) makes sense.
            self.poisoned = true;
        }
        r
    }

    fn append_inner(&mut self, recs: &[Rec]) -> Result<()> {
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
        self.run_internal(writes)?;
        for (pos, descs) in placed {
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
        Ok(())
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
        self.check_writable()?;
        self.fence_check(true)?;
        self.flush_backend()
    }
}
