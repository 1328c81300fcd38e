//! `inspect` (what the device holds) and `fsck` (is every byte of it right).

use serde::Serialize;

use super::recover::load;
use super::SwapDevice;
use crate::backend::{Backend, IoOp};
use crate::error::Result;
use crate::format::entry::IndexEntry;
use crate::format::header::{DeviceHeader, HeaderCopy};
use crate::format::wire::{align_down, align_up};
use crate::format::{checkpoint, ChecksumKind, Codec, CodecPolicy, BLOCK};
use crate::AlignedBuf;

/// What a device holds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub format_version: u32,
    pub vm_uuid: String,
    pub page_size: u32,
    pub capacity_pages: u64,
    pub codec: CodecPolicy,
    pub checksum: ChecksumKind,
    /// Pages with a payload (raw + compressed).
    pub pages_stored: u64,
    pub pages_compressed: u64,
    pub pages_zero: u64,
    pub pages_absent: u64,
    /// Payload bytes of the stored pages.
    pub stored_bytes: u64,
    /// Bytes those pages hold uncompressed.
    pub logical_bytes: u64,
    /// logical / stored (1.0 when nothing is stored).
    pub compression_ratio: f64,
    pub owner: String,
    pub owned: bool,
    pub generation: u64,
    pub checkpoint_seq: u64,
    pub segment_size: u64,
    pub segments_total: u64,
    pub segments_free: u64,
    /// Bytes of the data area in segments that are not free (live + garbage).
    pub data_bytes_in_use: u64,
    /// Segments emptied by cleaning since this device was opened.
    pub cleaned_segments: u64,
    pub backend: String,
}

/// What fsck found. `errors` is empty on a healthy device; `notes` are normal findings
/// (e.g. a torn batch at the log end left by a crash: unacknowledged data).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub pages_checked: u64,
    pub pages_zero: u64,
    pub batches_replayed: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

impl SwapDevice {
    pub fn inspect(&self) -> Stats {
        let mut s = Stats {
            format_version: self.hdr.format_version,
            vm_uuid: self.vm_uuid().to_string(),
            page_size: self.hdr.page_size,
            capacity_pages: self.hdr.capacity_pages,
            codec: self.hdr.codec,
            checksum: self.hdr.checksum,
            pages_stored: 0,
            pages_compressed: 0,
            pages_zero: 0,
            pages_absent: 0,
            stored_bytes: 0,
            logical_bytes: 0,
            compression_ratio: 1.0,
            owner: self.hdr.owner.clone(),
            owned: self.hdr.owned,
            generation: self.hdr.generation,
            checkpoint_seq: self.hdr.ckpt_seq,
            segment_size: self.hdr.layout.segment_size,
            segments_total: self.hdr.layout.segments,
            segments_free: self.space.free_count() as u64,
            data_bytes_in_use: self.space.segments_in_use() as u64 * self.hdr.layout.segment_size,
            cleaned_segments: self.cleaned_segments,
            backend: self.backend.describe(),
        };
        for e in &self.index {
            match e.codec() {
                Some(Codec::Zero) => s.pages_zero += 1,
                Some(c @ (Codec::Raw | Codec::Lz4)) => {
                    s.pages_stored += 1;
                    s.pages_compressed += (c == Codec::Lz4) as u64;
                    s.stored_bytes += e.len as u64;
                }
                _ => s.pages_absent += 1,
            }
        }
        s.logical_bytes = s.pages_stored * self.hdr.page_size as u64;
        if s.stored_bytes > 0 {
            s.compression_ratio = s.logical_bytes as f64 / s.stored_bytes as f64;
        }
        s
    }

    /// Check a device without writing to it: headers, checkpoint, log chain, and every
    /// stored page's checksum and codec. Damage the loader cannot get past is reported as
    /// an error too (never as `Err`, which is kept for I/O failures).
    pub fn fsck_backend(backend: Box<dyn Backend>) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        let mut issues = Vec::new();
        let mut dev = match load(backend, "fsck", Some(&mut issues)) {
            Ok(d) => d,
            Err(crate::error::SwapError::Backend(e)) => return Err(e.into()),
            Err(e) => {
                report.errors.push(crate::error_chain(&e));
                return Ok(report);
            }
        };
        report.errors.extend(issues);
        dev.fsck_into(&mut report)?;
        Ok(report)
    }

    /// fsck an open device (its in-memory index against the stored payloads).
    pub fn fsck(&mut self) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        self.fsck_into(&mut report)?;
        Ok(report)
    }

    fn fsck_into(&mut self, report: &mut FsckReport) -> Result<()> {
        self.check_headers(report)?;
        let r = &self.replayed;
        report.batches_replayed = r.batches;
        report.notes.push(format!(
            "log replay: {} batches, {} records after the checkpoint; stopped: {}",
            r.batches, r.records, r.end
        ));
        if let Some(d) = &r.damage {
            if !report.errors.contains(d) {
                report.errors.push(d.clone());
            }
        }
        // Overlapping payloads mean two pages share bytes: an index bug or damage.
        let mut spans: Vec<(u64, u64, u64)> = self
            .index
            .iter()
            .enumerate()
            .filter(|(_, e)| e.len > 0)
            .map(|(p, e)| (e.offset(), e.offset() + e.len as u64, p as u64))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                report.errors.push(format!(
                    "pages {} and {} overlap at device offset {}",
                    w[0].2, w[1].2, w[1].0
                ));
            }
        }
        let stored: Vec<(u64, IndexEntry)> = self
            .index
            .iter()
            .enumerate()
            .filter(|(_, e)| e.len > 0)
            .map(|(p, e)| (p as u64, *e))
            .collect();
        report.pages_zero = self
            .index
            .iter()
            .filter(|e| **e == IndexEntry::ZERO)
            .count() as u64;
        for chunk in stored.chunks(256) {
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
            let bufs = self.run_internal(reqs)?;
            for ((page, e), buf) in chunk.iter().zip(bufs) {
                let buf = buf.expect("read returns its buffer");
                let skip = (e.offset() - align_down(e.offset(), BLOCK)) as usize;
                if let Err(err) = self.decode_payload_for_fsck(*page, e, buf, skip) {
                    report.errors.push(crate::error_chain(&err));
                }
                report.pages_checked += 1;
            }
        }
        Ok(())
    }

    fn decode_payload_for_fsck(
        &self,
        page: u64,
        e: &IndexEntry,
        buf: AlignedBuf,
        skip: usize,
    ) -> Result<()> {
        let payload = &buf[skip..skip + e.len as usize];
        self.verify_payload(page, e, payload)?;
        if e.codec() == Some(Codec::Lz4) {
            let mut out = vec![0u8; self.page_size()];
            crate::format::decode_lz4(payload, &mut out).map_err(|err| {
                crate::error::SwapError::PageCorrupt {
                    page,
                    offset: e.offset(),
                    reason: crate::error_chain(&err),
                }
            })?;
        }
        Ok(())
    }

    fn check_headers(&mut self, report: &mut FsckReport) -> Result<()> {
        let b = self.read_sync(0, 2 * BLOCK)?;
        for copy in 0..2u8 {
            let block = &b[copy as usize * BLOCK as usize..(copy as usize + 1) * BLOCK as usize];
            let what = match DeviceHeader::decode(block) {
                HeaderCopy::Valid(h) if copy == self.hdr_copy => {
                    format!("header copy {copy}: current (seq {})", h.header_seq)
                }
                HeaderCopy::Valid(h) => format!("header copy {copy}: older (seq {})", h.header_seq),
                HeaderCopy::BadMagic(_) => format!("header copy {copy}: empty"),
                HeaderCopy::Newer(v) => format!("header copy {copy}: newer format {v}"),
                HeaderCopy::Corrupt => {
                    format!("header copy {copy}: torn or corrupt (the other copy is used)")
                }
            };
            report.notes.push(what);
        }
        let l = self.hdr.layout;
        let other = 1 - self.hdr.ckpt_slot;
        let meta = self.read_sync(l.ckpt_offset(other), BLOCK)?;
        report.notes.push(match checkpoint::decode_meta(&meta) {
            Ok((m, _)) => format!("checkpoint slot {other}: older checkpoint {}", m.ckpt_seq),
            Err(e) => format!("checkpoint slot {other}: unused ({e})"),
        });
        Ok(())
    }
}
