//! Opening a device: pick the header copy, load the checkpoint it names, check every index
//! entry, then replay the log chain from the checkpoint's head until it ends.

use super::io::read_direct;
use super::{LogHead, SwapDevice};
use crate::backend::Backend;
use crate::error::{Result, SwapError};
use crate::format::batch::{decode_batch, decode_header, stored_crc, BatchHeader};
use crate::format::entry::IndexEntry;
use crate::format::header::DeviceHeader;
use crate::format::{checkpoint, Codec, BLOCK};

/// What replaying the log found.
#[derive(Debug, Clone, Default)]
pub(super) struct ReplayOutcome {
    pub batches: u64,
    pub records: u64,
    /// Why replay stopped (the normal end of the log, or a torn/stale batch after a crash).
    pub end: String,
    /// Set when it stopped on something that cannot come from a crash.
    pub damage: Option<String>,
}

/// Load a device read-only. With `issues`, damaged index entries are recorded there and
/// dropped (fsck) instead of failing the load.
pub(super) fn load(
    mut backend: Box<dyn Backend>,
    host_id: &str,
    mut issues: Option<&mut Vec<String>>,
) -> Result<SwapDevice> {
    let size = backend.size()?;
    if size < 2 * BLOCK {
        return Err(SwapError::Truncated {
            size,
            needed: 2 * BLOCK,
            what: "the two header copies",
        });
    }
    let hb = read_direct(backend.as_mut(), 0, 2 * BLOCK)?;
    let (hdr, copy) = DeviceHeader::choose(&hb[..BLOCK as usize], &hb[BLOCK as usize..])?;
    let l = hdr.layout;
    if size < l.data_start {
        return Err(SwapError::Truncated {
            size,
            needed: l.data_start,
            what: "the checkpoint area",
        });
    }
    if size < l.data_end() {
        return Err(SwapError::Truncated {
            size,
            needed: l.data_end(),
            what: "the data area",
        });
    }
    let cap = hdr.capacity_pages;
    let slot = hdr.ckpt_slot;
    let expect_seq = hdr.ckpt_seq;
    let mut dev = SwapDevice::blank(backend, hdr, host_id);
    dev.hdr_copy = copy;
    let slot_off = l.ckpt_offset(slot);
    let raw = dev.read_chunked(slot_off, l.ckpt_slot_size)?;
    let corrupt = |reason: String| SwapError::CheckpointCorrupt {
        slot,
        offset: slot_off,
        reason,
    };
    let (meta, entries) = checkpoint::decode(&raw, cap).map_err(|e| corrupt(e.to_string()))?;
    if meta.ckpt_seq != expect_seq {
        return Err(corrupt(format!(
            "it holds checkpoint {}, the header expects {expect_seq}",
            meta.ckpt_seq
        )));
    }
    if meta.head % BLOCK != 0 || meta.head < l.data_start || meta.head + BLOCK > l.data_end() {
        return Err(corrupt(format!(
            "log head {} is outside the data area",
            meta.head
        )));
    }
    dev.index = entries;
    for page in 0..cap {
        let e = dev.index[page as usize];
        if let Err(err) = dev.validate_entry(page, &e) {
            match issues.as_deref_mut() {
                Some(list) => {
                    list.push(crate::error_chain(&err));
                    dev.index[page as usize] = IndexEntry::ABSENT;
                }
                None => return Err(err),
            }
        }
    }
    dev.log = LogHead {
        head: meta.head,
        next_seq: meta.next_seq,
        last_crc: meta.prev_crc,
        nonce: dev.log.nonce,
    };
    let outcome = dev.replay(meta.generation)?;
    if let Some(d) = &outcome.damage {
        match issues {
            Some(list) => list.push(d.clone()),
            None => return Err(SwapError::LogDamaged { detail: d.clone() }),
        }
    }
    tracing::info!(
        batches = outcome.batches,
        records = outcome.records,
        end = %outcome.end,
        "log replayed"
    );
    dev.replayed = outcome;
    dev.space.rebuild(&dev.index, &l);
    // Segments with nothing live are free. Safe before any write: a read-write open
    // checkpoints the recovered index before it appends anything.
    let head_seg = l.segment_of(dev.log.head);
    dev.space.free_empty_except(head_seg);
    Ok(dev)
}

impl SwapDevice {
    /// An index entry must name a known codec and, with a payload, lie inside one segment
    /// of the data area with a plausible length.
    pub(super) fn validate_entry(&self, page: u64, e: &IndexEntry) -> Result<()> {
        let l = &self.hdr.layout;
        let invalid = |reason: String| Err(SwapError::IndexInvalid { page, reason });
        let Some(codec) = e.codec() else {
            return invalid("unknown codec tag".into());
        };
        let ps = self.hdr.page_size;
        match codec {
            Codec::Absent | Codec::Zero => {
                if e.offset() != 0 || e.len != 0 {
                    return invalid(format!(
                        "{codec:?} entry carries offset {} length {}",
                        e.offset(),
                        e.len
                    ));
                }
                Ok(())
            }
            Codec::Raw | Codec::Lz4 => {
                if (codec == Codec::Raw && e.len != ps)
                    || (codec == Codec::Lz4 && (e.len == 0 || e.len >= ps))
                {
                    return invalid(format!(
                        "{codec:?} payload length {} for a {ps}-byte page",
                        e.len
                    ));
                }
                let (off, end) = (e.offset(), e.offset() + e.len as u64);
                if off < l.data_start
                    || end > l.data_end()
                    || l.segment_of(off) != l.segment_of(end - 1)
                {
                    return Err(SwapError::IndexOutOfRange {
                        page,
                        offset: off,
                        len: e.len,
                        start: l.data_start,
                        end: l.data_end(),
                    });
                }
                Ok(())
            }
        }
    }

    /// A batch that fails its crc ends the log. That is normal for the tail of a crash
    /// (an append in flight), impossible once a later append exists: appends run one after
    /// the other, each waiting for all of its batches. Follow the chain past the bad batch
    /// (trusting its header block) and return the offset of a batch that belongs to a later
    /// append, if there is one.
    fn later_append_after(&mut self, bad: &BatchHeader, bad_crc: u32) -> Result<Option<u64>> {
        let l = self.hdr.layout;
        let (mut next, mut seq, mut prev) = (bad.next_offset, bad.seq + 1, bad_crc);
        let mut call_ended = bad.call_end;
        for _ in 0..1024 {
            if !next.is_multiple_of(BLOCK) || next < l.data_start || next + BLOCK > l.data_end() {
                return Ok(None);
            }
            let block = self.read_sync(next, BLOCK)?;
            let Some(h) = decode_header(&block) else {
                return Ok(None);
            };
            if h.seq != seq
                || h.prev_crc != prev
                || h.nonce != bad.nonce
                || h.total_len as u64 > l.max_batch
            {
                return Ok(None);
            }
            let seg_end = l.segment_start(l.segment_of(next)) + l.segment_size;
            if next + h.total_len as u64 > seg_end {
                return Ok(None);
            }
            let buf = self.read_sync(next, h.total_len as u64)?;
            let Ok((crc, _)) = decode_batch(&buf, &h) else {
                return Ok(None);
            };
            if call_ended {
                return Ok(Some(next));
            }
            call_ended = h.call_end;
            (next, seq, prev) = (h.next_offset, seq + 1, crc);
        }
        Ok(None)
    }

    /// Follow the batch chain from `self.log`, applying records, until it ends. Batches
    /// must continue the sequence and the crc chain and carry a generation between the
    /// checkpoint's and the header's.
    fn replay(&mut self, min_gen: u64) -> Result<ReplayOutcome> {
        let l = self.hdr.layout;
        let max_gen = self.hdr.generation;
        let mut out = ReplayOutcome::default();
        loop {
            let pos = self.log.head;
            if !pos.is_multiple_of(BLOCK) || pos < l.data_start || pos + BLOCK > l.data_end() {
                out.damage = Some(format!(
                    "log chain points outside the data area (offset {pos})"
                ));
                out.end = "chain left the data area".into();
                break;
            }
            let block = self.read_sync(pos, BLOCK)?;
            let Some(h) = decode_header(&block) else {
                out.end = format!("no batch at offset {pos} (end of log)");
                break;
            };
            if h.seq != self.log.next_seq || h.prev_crc != self.log.last_crc {
                out.end = format!(
                    "batch at offset {pos} (seq {}) does not continue the chain (want seq {}); end of log",
                    h.seq, self.log.next_seq
                );
                break;
            }
            if h.generation < min_gen || h.generation > max_gen {
                out.end = format!(
                    "batch at offset {pos} is from generation {} outside {min_gen}..={max_gen} (fenced writer); ignored",
                    h.generation
                );
                break;
            }
            let seg_end = l.segment_start(l.segment_of(pos)) + l.segment_size;
            if h.total_len as u64 > l.max_batch || pos + h.total_len as u64 > seg_end {
                out.end = format!(
                    "batch at offset {pos} has an impossible length {}; end of log",
                    h.total_len
                );
                break;
            }
            let buf = if h.total_len as u64 == BLOCK {
                block
            } else {
                self.read_sync(pos, h.total_len as u64)?
            };
            let (crc, recs) = match decode_batch(&buf, &h) {
                Ok(x) => x,
                Err(reason) => {
                    out.end = format!(
                        "torn batch at offset {pos} (seq {}): {reason}; end of log",
                        h.seq
                    );
                    let Some(later) = self.later_append_after(&h, stored_crc(&buf))? else {
                        break;
                    };
                    // A live writer (we may be a read-only observer) can have finished
                    // this batch and started the next append while we looked: read again.
                    let again = self.read_sync(pos, h.total_len as u64)?;
                    match decode_batch(&again, &h) {
                        Ok(x) => x,
                        Err(_) => {
                            out.damage = Some(format!(
                                "batch at offset {pos} (seq {}) is damaged ({reason}) but the \
                                 log continues with a later acknowledged append at offset \
                                 {later}: writes after it would be lost",
                                h.seq
                            ));
                            break;
                        }
                    }
                }
            };
            let next = h.next_offset;
            let same_seg_next = pos + h.total_len as u64;
            let next_ok = next % BLOCK == 0
                && next >= l.data_start
                && next + l.max_batch <= l.data_end()
                && (next == same_seg_next || next == l.segment_start(l.segment_of(next)));
            if !next_ok || recs.iter().any(|r| r.page >= self.hdr.capacity_pages) {
                out.damage = Some(format!(
                    "batch at offset {pos} (seq {}) has a valid crc but names a page or next offset out of range",
                    h.seq
                ));
                out.end = "damaged batch".into();
                break;
            }
            for r in &recs {
                self.index[r.page as usize] = match r.codec {
                    Codec::Absent => IndexEntry::ABSENT,
                    Codec::Zero => IndexEntry::ZERO,
                    c => {
                        IndexEntry::stored(c, pos + r.payload_off as u64, r.stored_len, r.checksum)
                    }
                };
            }
            out.batches += 1;
            out.records += recs.len() as u64;
            self.log.head = next;
            self.log.next_seq += 1;
            self.log.last_crc = crc;
        }
        Ok(out)
    }
}
