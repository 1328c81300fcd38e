//! The read path: submit many page reads, collect them as they complete. Zero and
//! never-stored pages complete at once without I/O. Every payload is checked against the
//! checksum in the index before it is returned; a mismatch is an error naming the page.

use std::os::fd::BorrowedFd;

use super::SwapDevice;
use crate::backend::BackendError;
use crate::error::{Result, SwapError};
use crate::format::entry::IndexEntry;
use crate::format::wire::{align_down, align_up};
use crate::format::{decode_lz4, Codec, BLOCK};
use crate::AlignedBuf;

/// A page's content as read back.
#[derive(Debug)]
pub enum PageData {
    /// The page's bytes (exactly one page).
    Data(AlignedBuf),
    /// The page is all zeros (nothing was read).
    Zero,
    /// The page was never stored (or was removed): the caller decides what it means.
    NotStored,
}

impl PageData {
    /// The page as bytes, zeros for `Zero`; `None` for `NotStored`.
    pub fn to_vec(&self, page_size: usize) -> Option<Vec<u8>> {
        match self {
            PageData::Data(b) => Some(b.to_vec()),
            PageData::Zero => Some(vec![0; page_size]),
            PageData::NotStored => None,
        }
    }
}

/// One finished read, with the caller's tag.
#[derive(Debug)]
pub struct PageRead {
    pub tag: u64,
    pub page: u64,
    pub result: Result<PageData, SwapError>,
}

/// A run of pages stored back to back as raw records, read with one I/O
/// ([`SwapDevice::submit_read_run`]).
#[derive(Debug)]
pub struct RunRead {
    pub tag: u64,
    pub first: u64,
    pub count: u64,
    /// The `count` pages back to back, or why the read failed (then every page failed).
    pub result: Result<AlignedBuf, SwapError>,
    /// Pages of the run whose checksum did not match: their bytes must not be used.
    pub corrupt: Vec<(u64, SwapError)>,
}

/// A run read in flight: the index entries when it was submitted.
pub(super) struct RunRequest {
    tag: u64,
    first: u64,
    entries: Vec<IndexEntry>,
}

/// A read in flight: what the index said when it was submitted.
pub(super) struct UserRead {
    tag: u64,
    page: u64,
    entry: IndexEntry,
    skip: usize,
}

/// The aligned span covering an entry's payload, and where the payload starts in it.
fn span(e: &IndexEntry) -> (u64, u64, usize) {
    let start = align_down(e.offset(), BLOCK);
    let end = align_up(e.offset() + e.len as u64, BLOCK);
    (start, end - start, (e.offset() - start) as usize)
}

impl SwapDevice {
    /// Queue a read of `page`; its result comes back from `poll_reads` with `tag`.
    pub fn submit_read(&mut self, page: u64, tag: u64) -> Result<()> {
        if self.poisoned {
            return Err(SwapError::Poisoned);
        }
        self.check_page(page)?;
        let entry = self.index[page as usize];
        let immediate = match entry.codec() {
            Some(Codec::Zero) => Some(PageData::Zero),
            Some(Codec::Raw | Codec::Lz4) => None,
            _ => Some(PageData::NotStored),
        };
        if let Some(data) = immediate {
            self.io.ready.push_back(PageRead {
                tag,
                page,
                result: Ok(data),
            });
            return Ok(());
        }
        let (start, len, skip) = span(&entry);
        let r = UserRead {
            tag,
            page,
            entry,
            skip,
        };
        self.submit_user_read(start, AlignedBuf::new(len as usize), r)
    }

    /// Move finished reads to `out`, waiting until at least `min` are there (or nothing is
    /// left in flight). Returns how many were added.
    /// With `min == 0` this reaps whatever the backend has finished without waiting.
    pub fn poll_reads(&mut self, out: &mut Vec<PageRead>, min: usize) -> Result<usize> {
        let mut n = 0;
        if min == 0 && self.io.user_reads_in_flight() > 0 {
            self.pump(0)?;
        }
        loop {
            while let Some(r) = self.io.ready.pop_front() {
                out.push(r);
                n += 1;
            }
            if n >= min || self.io.user_reads_in_flight() == 0 {
                return Ok(n);
            }
            self.pump(1)?;
        }
    }

    /// The backend's completion fd (see [`crate::backend::Backend::completion_fd`]):
    /// readable when `poll_reads(.., 0)` may return more. Reads that finish without I/O
    /// (zero / never-stored pages) do not signal it: call `poll_reads(.., 0)` after submitting.
    pub fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        self.backend.completion_fd()
    }

    /// How many pages from `first` (at most `max`) are raw records stored back to back on
    /// 4 KiB boundaries, so that one read covers them all (0: `first` is not one).
    pub fn raw_run_len(&self, first: u64, max: u64) -> u64 {
        let ps = self.page_size() as u64;
        let end = first.saturating_add(max).min(self.capacity_pages());
        let mut next_offset = None;
        let mut n = 0;
        for page in first..end {
            let e = &self.index[page as usize];
            let raw = e.codec() == Some(Codec::Raw)
                && u64::from(e.len) == ps
                && e.offset().is_multiple_of(BLOCK);
            if !raw || next_offset.is_some_and(|o| o != e.offset()) {
                break;
            }
            next_offset = Some(e.offset() + ps);
            n += 1;
        }
        n
    }

    /// Queue one read of pages `first..first + count`, which must be raw records stored back
    /// to back ([`SwapDevice::raw_run_len`]); it comes back from
    /// [`SwapDevice::poll_ready`] as one [`RunRead`] with `tag`, every page checksum-verified.
    pub fn submit_read_run(&mut self, first: u64, count: u64, tag: u64) -> Result<()> {
        if self.poisoned {
            return Err(SwapError::Poisoned);
        }
        self.check_page(first)?;
        let stored = self.raw_run_len(first, count);
        if count == 0 || stored != count {
            return Err(SwapError::InvalidOption(format!(
                "run read of pages {first}..{}: only {stored} of them are raw records stored \
                 back to back",
                first.saturating_add(count)
            )));
        }
        let entries = self.index[first as usize..(first + count) as usize].to_vec();
        let offset = entries[0].offset();
        let buf = AlignedBuf::new(count as usize * self.page_size());
        let r = RunRequest {
            tag,
            first,
            entries,
        };
        self.submit_run_read(offset, buf, r)
    }

    /// Without waiting: reap what the backend finished, move finished page reads to `pages`
    /// and finished run reads to `runs`. Returns how many items were added.
    pub fn poll_ready(
        &mut self,
        pages: &mut Vec<PageRead>,
        runs: &mut Vec<RunRead>,
    ) -> Result<usize> {
        if self.io.user_reads_in_flight() > 0 {
            self.pump(0)?;
        }
        let n = self.io.ready.len() + self.io.ready_runs.len();
        pages.extend(self.io.ready.drain(..));
        runs.extend(self.io.ready_runs.drain(..));
        Ok(n)
    }

    /// Run reads submitted and not yet handed out by `poll_ready`.
    pub fn run_reads_pending(&self) -> usize {
        self.io.run_reads_in_flight() + self.io.ready_runs.len()
    }

    pub(super) fn finish_run_read(
        &mut self,
        r: RunRequest,
        result: std::result::Result<Option<AlignedBuf>, BackendError>,
    ) -> RunRead {
        let count = r.entries.len() as u64;
        let ps = self.page_size();
        let mut corrupt = Vec::new();
        let result = match result {
            Ok(Some(buf)) => {
                for (i, e) in r.entries.iter().enumerate() {
                    let page = r.first + i as u64;
                    if let Err(err) = self.verify_payload(page, e, &buf[i * ps..(i + 1) * ps]) {
                        corrupt.push((page, err));
                    }
                }
                Ok(buf)
            }
            Ok(None) => Err(SwapError::PageCorrupt {
                page: r.first,
                offset: r.entries[0].offset(),
                reason: "backend returned no data".into(),
            }),
            Err(e) => Err(SwapError::Backend(e)),
        };
        RunRead {
            tag: r.tag,
            first: r.first,
            count,
            result,
            corrupt,
        }
    }

    /// Reads submitted and not yet handed out by `poll_reads`.
    pub fn reads_pending(&self) -> usize {
        self.io.user_reads_in_flight() - self.io.run_reads_in_flight() + self.io.ready.len()
    }

    /// Read one page synchronously.
    pub fn read_page(&mut self, page: u64) -> Result<PageData> {
        self.check_page(page)?;
        let entry = self.index[page as usize];
        match entry.codec() {
            Some(Codec::Zero) => return Ok(PageData::Zero),
            Some(Codec::Raw | Codec::Lz4) => {}
            _ => return Ok(PageData::NotStored),
        }
        let (start, len, skip) = span(&entry);
        let buf = self.read_sync(start, len)?;
        self.decode_payload(page, &entry, buf, skip)
    }

    pub(super) fn finish_user_read(
        &mut self,
        r: UserRead,
        result: std::result::Result<Option<AlignedBuf>, BackendError>,
    ) -> PageRead {
        let result = match result {
            Ok(Some(buf)) => self.decode_payload(r.page, &r.entry, buf, r.skip),
            Ok(None) => Err(SwapError::PageCorrupt {
                page: r.page,
                offset: r.entry.offset(),
                reason: "backend returned no data".into(),
            }),
            Err(e) => Err(SwapError::Backend(e)),
        };
        PageRead {
            tag: r.tag,
            page: r.page,
            result,
        }
    }

    pub(super) fn verify_payload(&self, page: u64, e: &IndexEntry, payload: &[u8]) -> Result<()> {
        let sum = self.hdr.checksum.compute(payload);
        if sum != e.checksum {
            return Err(SwapError::PageCorrupt {
                page,
                offset: e.offset(),
                reason: format!(
                    "checksum mismatch (stored {:#010x}, computed {sum:#010x})",
                    e.checksum
                ),
            });
        }
        Ok(())
    }

    fn decode_payload(
        &self,
        page: u64,
        e: &IndexEntry,
        buf: AlignedBuf,
        skip: usize,
    ) -> Result<PageData> {
        let payload = &buf[skip..skip + e.len as usize];
        self.verify_payload(page, e, payload)?;
        let ps = self.page_size();
        match e.codec() {
            Some(Codec::Raw) if skip == 0 && buf.len() == ps => Ok(PageData::Data(buf)),
            Some(Codec::Raw) => Ok(PageData::Data(AlignedBuf::from_slice(payload))),
            Some(Codec::Lz4) => {
                let mut out = AlignedBuf::new(ps);
                decode_lz4(payload, &mut out).map_err(|err| SwapError::PageCorrupt {
                    page,
                    offset: e.offset(),
                    reason: crate::error_chain(&err),
                })?;
                Ok(PageData::Data(out))
            }
            _ => unreachable!("only entries with payload are read"),
        }
    }
}
