//! [`ImageFileSource`]: pages of a raw guest-memory image (page `i` at byte `i * page_size`),
//! e.g. a Firecracker snapshot memory file, read through a [`swapdev::backend::Backend`]: a
//! file through the io_uring file backend (buffered: the page cache serves repeated reads),
//! or an NBD export (`nbd://...`, `nbd+unix://...`) through the NBD client on an I/O thread
//! ([`swapdev::backend::threaded::Threaded`]) so it has a completion fd. Bytes past the end
//! of the image read as zero (pages wholly past it complete without I/O); all-zero pages are
//! reported as [`PageContent::Zero`]; a short read is [`SourceError::Io`].
//!
//! Requests are queued and given to the backend at the next `flush`/`poll`, sorted by tag
//! (the fault loop's demand reads first) then page; consecutive pages with the same tag go
//! out as **one read** of up to [`MAX_RUN_PAGES`] pages, whose buffer the fault loop places
//! from directly ([`PageContent::Shared`]). The file is opened read-only: the source never
//! writes it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use swapdev::backend::file::{DirectMode, FileBackend, OpenOptions as FileOptions};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::threaded::Threaded;
use swapdev::backend::{Backend, IoCompletion, IoOp, IoRequest};
use swapdev::AlignedBuf;

use super::{PageCompletion, PageContent, PageSource, SourceError};

/// io_uring queue depth of an image file: the most reads in flight in the kernel at once.
const QUEUE_DEPTH: u32 = 256;

/// Most pages merged into one read (1 MiB of 4 KiB pages).
pub const MAX_RUN_PAGES: usize = 256;

/// A read in flight: its first page, how many pages, the caller's tag, how many bytes of
/// them the image holds.
struct PendingRead {
    first: u64,
    count: u64,
    tag: u64,
    len: usize,
}

/// A raw memory image served page by page.
pub struct ImageFileSource {
    backend: Box<dyn Backend>,
    /// A duplicate of the backend's completion fd, also set for completions that need no I/O.
    wake: OwnedFd,
    description: String,
    image_len: u64,
    page_size: usize,
    capacity_pages: u64,
    pending: HashMap<u64, PendingRead>,
    /// Pages of the reads in `pending`.
    pending_pages: usize,
    /// Requests (page, tag) not yet given to the backend.
    queued: Vec<(u64, u64)>,
    /// Completions reaped or made without I/O, not handed out yet.
    ready: VecDeque<PageCompletion>,
    completions: Vec<IoCompletion>,
    next_id: u64,
}

impl ImageFileSource {
    /// Open the image file `path`; the source answers for `capacity_pages` pages of
    /// `page_size` bytes.
    pub fn open(
        path: impl AsRef<Path>,
        page_size: usize,
        capacity_pages: u64,
    ) -> Result<Self, SourceError> {
        let path = path.as_ref();
        let description = format!("image {}", path.display());
        let opts = FileOptions {
            create: false,
            read_only: true,
            direct: DirectMode::Never,
            queue_depth: QUEUE_DEPTH,
        };
        let backend = FileBackend::open(path, opts)
            .map_err(|e| SourceError::unavailable(description.clone(), e))?;
        Self::from_backend(Box::new(backend), description, page_size, capacity_pages)
    }

    /// Open an image named by a backend spec: a path, `nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH` (see `swapdev::backend::spec`).
    pub fn open_spec(
        spec: &str,
        page_size: usize,
        capacity_pages: u64,
    ) -> Result<Self, SourceError> {
        let description = format!("image {spec}");
        let opts = SpecOptions {
            create: false,
            read_only: true,
            direct: DirectMode::Never,
            queue_depth: QUEUE_DEPTH,
            ..SpecOptions::default()
        };
        let backend = open_backend(spec, &opts)
            .map_err(|e| SourceError::unavailable(description.clone(), e))?;
        Self::from_backend(backend, description, page_size, capacity_pages)
    }

    /// Serve the image held by `backend` (one without a completion fd gets an I/O thread).
    pub fn from_backend(
        backend: Box<dyn Backend>,
        description: String,
        page_size: usize,
        capacity_pages: u64,
    ) -> Result<Self, SourceError> {
        let fail = |e: &dyn std::fmt::Display| {
            SourceError::unavailable(description.clone(), e.to_string())
        };
        let backend: Box<dyn Backend> = if backend.completion_fd().is_some() {
            backend
        } else {
            Box::new(Threaded::spawn(backend).map_err(|e| fail(&e))?)
        };
        let image_len = backend.size().map_err(|e| fail(&e))?;
        let wake = backend
            .completion_fd()
            .expect("a completion fd (threaded otherwise)")
            .try_clone_to_owned()
            .map_err(|e| fail(&format!("duplicating the completion fd: {e}")))?;
        Ok(Self {
            backend,
            wake,
            description,
            image_len,
            page_size,
            capacity_pages,
            pending: HashMap::new(),
            pending_pages: 0,
            queued: Vec::new(),
            ready: VecDeque::new(),
            completions: Vec::new(),
            next_id: 0,
        })
    }

    /// Reap what the backend finished (waiting for at least `min`) into `ready`.
    /// Bytes in the image (its file's or export's size).
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    fn reap(&mut self, min: usize) -> Result<(), SourceError> {
        let mut done = std::mem::take(&mut self.completions);
        done.clear();
        let r = self.backend.complete(&mut done, min);
        for c in done.drain(..) {
            if let Some(read) = self.pending.remove(&c.tag) {
                self.pending_pages -= read.count as usize;
                self.finish(read, c);
            }
        }
        self.completions = done;
        r.map(|_| ())
            .map_err(|e| SourceError::unavailable(self.description.clone(), e))
    }

    /// Turn a finished read into one completion per page.
    fn finish(&mut self, read: PendingRead, c: IoCompletion) {
        let ps = self.page_size;
        let whole = read.count as usize * ps;
        match c.result {
            Ok(Some(buf)) if buf.len() == read.len => {
                let buf = if read.len < whole {
                    // The last page straddles the end of the image: the rest reads as zero.
                    let mut padded = AlignedBuf::new(whole);
                    padded[..read.len].copy_from_slice(&buf);
                    padded
                } else {
                    buf
                };
                if read.count == 1 {
                    let content = if swapdev::is_zero_page(&buf) {
                        PageContent::Zero
                    } else {
                        PageContent::Data(buf)
                    };
                    self.ready.push_back(PageCompletion {
                        page: read.first,
                        tag: read.tag,
                        result: Ok(content),
                    });
                    return;
                }
                let buf = std::sync::Arc::new(buf);
                for i in 0..read.count {
                    let at = i as usize * ps;
                    let content = if swapdev::is_zero_page(&buf[at..at + ps]) {
                        PageContent::Zero
                    } else {
                        PageContent::Shared {
                            buf: buf.clone(),
                            at,
                        }
                    };
                    self.ready.push_back(PageCompletion {
                        page: read.first + i,
                        tag: read.tag,
                        result: Ok(content),
                    });
                }
            }
            other => {
                let what = match &other {
                    Ok(b) => format!(
                        "read of {} bytes returned {:?} bytes",
                        read.len,
                        b.as_ref().map(|b| b.len())
                    ),
                    Err(e) => e.to_string(),
                };
                for page in read.first..read.first + read.count {
                    self.ready.push_back(PageCompletion {
                        page,
                        tag: read.tag,
                        result: Err(SourceError::Io {
                            page,
                            source: what.clone().into(),
                        }),
                    });
                }
            }
        }
    }

    /// Give the queued requests to the backend: demand tags first, consecutive pages with
    /// the same tag merged into one read.
    fn submit_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let mut queued = std::mem::take(&mut self.queued);
        queued.sort_unstable_by_key(|&(page, tag)| (tag, page));
        let ps = self.page_size as u64;
        let mut i = 0;
        while i < queued.len() {
            let (first, tag) = queued[i];
            let offset = first * ps;
            if offset >= self.image_len {
                // Wholly past the end of the image.
                self.ready.push_back(PageCompletion {
                    page: first,
                    tag,
                    result: Ok(PageContent::Zero),
                });
                i += 1;
                continue;
            }
            let mut count = 1;
            while i + count < queued.len()
                && count < MAX_RUN_PAGES
                && queued[i + count] == (first + count as u64, tag)
                && (first + count as u64) * ps < self.image_len
            {
                count += 1;
            }
            let len = (self.image_len - offset).min(count as u64 * ps) as usize;
            self.next_id += 1;
            let id = self.next_id;
            let req = IoRequest {
                tag: id,
                offset,
                op: IoOp::Read {
                    buf: AlignedBuf::new(len),
                },
            };
            let read = PendingRead {
                first,
                count: count as u64,
                tag,
                len,
            };
            match self.backend.submit(req) {
                Ok(()) => {
                    self.pending.insert(id, read);
                    self.pending_pages += count;
                }
                Err(e) => {
                    let c = IoCompletion {
                        tag: id,
                        result: Err(e),
                    };
                    self.finish(read, c);
                }
            }
            i += count;
        }
        queued.clear();
        self.queued = queued;
    }

    fn signal(&self) {
        let _ = nix::unistd::write(&self.wake, &1u64.to_ne_bytes());
    }

    fn reset(&self) {
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&self.wake, &mut buf);
    }
}

impl PageSource for ImageFileSource {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn capacity_pages(&self) -> u64 {
        self.capacity_pages
    }

    fn submit(&mut self, page: u64, tag: u64) -> Result<(), SourceError> {
        if page >= self.capacity_pages {
            return Err(SourceError::OutOfRange {
                page,
                capacity: self.capacity_pages,
            });
        }
        self.queued.push((page, tag));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<PageCompletion>, min: usize) -> Result<usize, SourceError> {
        // Reset the fd before reaping, so a completion arriving after the reap re-arms it.
        self.reset();
        self.submit_queued();
        self.reap(0)?;
        let mut got = 0;
        loop {
            got += self.ready.len();
            out.extend(self.ready.drain(..));
            if got >= min || self.pending.is_empty() {
                return Ok(got);
            }
            self.reap(1)?;
        }
    }

    /// Push out what is queued and reap what finished inline (page-cache hits); if anything
    /// is ready, set the completion fd so the caller does not sleep on it.
    fn flush(&mut self) -> Result<(), SourceError> {
        self.submit_queued();
        if !self.pending.is_empty() {
            self.reap(0)?;
        }
        if !self.ready.is_empty() {
            self.signal();
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.pending_pages + self.ready.len() + self.queued.len()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn route(&self) -> crate::route::Route {
        crate::route::Route::Local
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_pages_zero_detects_and_reads_past_eof_as_zero() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut image = vec![0u8; 3 * 4096];
        image[4096..8192].fill(0x5a);
        f.write_all(&image).unwrap();
        let mut src = ImageFileSource::open(f.path(), 4096, 5).unwrap();
        for page in 0..5 {
            src.submit(page, 100 + page).unwrap();
        }
        assert!(matches!(
            src.submit(5, 0),
            Err(SourceError::OutOfRange { page: 5, .. })
        ));
        let mut out = Vec::new();
        let mut got = 0;
        while got < 5 {
            got += src.poll(&mut out, 1).unwrap();
        }
        assert_eq!(src.in_flight(), 0);
        out.sort_by_key(|c| c.page);
        for c in &out {
            assert_eq!(c.tag, 100 + c.page);
            match (&c.result, c.page) {
                (Ok(PageContent::Data(b)), 1) => assert!(b.as_slice().iter().all(|&x| x == 0x5a)),
                (Ok(PageContent::Zero), 0 | 2 | 3 | 4) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn read_all(src: &mut ImageFileSource, pages: u64) -> Vec<PageCompletion> {
        for page in 0..pages {
            src.submit(page, page).unwrap();
        }
        src.flush().unwrap();
        let mut out = Vec::new();
        while out.len() < pages as usize {
            let mut fds = [nix::poll::PollFd::new(
                src.completion_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
            assert_eq!(
                n,
                1,
                "completion fd not readable, {} in flight",
                src.in_flight()
            );
            src.poll(&mut out, 0).unwrap();
        }
        out.sort_by_key(|c| c.page);
        out
    }

    #[test]
    fn a_page_straddling_the_end_reads_zero_past_it() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut image = vec![0x11u8; 4096 + 100];
        image[4096 + 99] = 0x22;
        f.write_all(&image).unwrap();
        let mut src = ImageFileSource::open(f.path(), 4096, 3).unwrap();
        let out = read_all(&mut src, 3);
        let PageContent::Data(b) = out[1].result.as_ref().unwrap() else {
            panic!("page 1: {:?}", out[1].result)
        };
        assert!(b[..99].iter().all(|&x| x == 0x11));
        assert_eq!(b[99], 0x22);
        assert!(
            b[100..].iter().all(|&x| x == 0),
            "past the end reads as zero"
        );
        assert!(matches!(out[2].result, Ok(PageContent::Zero)));
    }

    #[test]
    fn an_image_truncated_under_the_source_gives_io_errors_not_zeros() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0x33u8; 4 * 4096]).unwrap();
        let mut src = ImageFileSource::open(f.path(), 4096, 4).unwrap();
        f.as_file().set_len(4096 + 10).unwrap();
        let out = read_all(&mut src, 4);
        assert!(matches!(out[0].result, Ok(PageContent::Data(_))));
        for c in &out[1..] {
            match &c.result {
                Err(SourceError::Io { page, source }) => {
                    assert_eq!(*page, c.page);
                    assert!(source.to_string().contains("short read"), "{source}");
                }
                other => panic!("page {}: {other:?}", c.page),
            }
        }
    }

    #[test]
    fn consecutive_pages_with_one_tag_are_read_in_runs_and_demand_goes_first() {
        let pages = MAX_RUN_PAGES as u64 + 44;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut image = vec![0u8; pages as usize * 4096 - 100];
        for (i, page) in image.chunks_mut(4096).enumerate() {
            if i != 7 {
                page.fill((i % 251) as u8 + 1);
            }
        }
        f.write_all(&image).unwrap();
        let mut src = ImageFileSource::open(f.path(), 4096, pages + 2).unwrap();
        // Submitted out of order, one demand page among prefetches.
        for page in (0..pages + 2).rev() {
            let tag = if page == 280 { 0 } else { 1 };
            src.submit(page, tag).unwrap();
        }
        assert_eq!(src.in_flight(), pages as usize + 2);
        src.flush().unwrap();
        let mut out = Vec::new();
        while out.len() < pages as usize + 2 {
            src.poll(&mut out, 1).unwrap();
        }
        assert_eq!(src.in_flight(), 0);
        out.sort_by_key(|c| c.page);
        for c in &out {
            let page = c.page;
            let content = c.result.as_ref().unwrap();
            let want = (page % 251) as u8 + 1;
            match (page, content) {
                (7, PageContent::Zero) => {}
                (p, PageContent::Zero) if p >= pages => {}
                (p, PageContent::Shared { .. }) if p < MAX_RUN_PAGES as u64 => {
                    assert!(content.bytes(4096).unwrap().iter().all(|&x| x == want));
                }
                (p, PageContent::Data(_) | PageContent::Shared { .. }) if p < pages => {
                    let bytes = content.bytes(4096).unwrap();
                    let held = if p == pages - 1 { 4096 - 100 } else { 4096 };
                    assert!(bytes[..held].iter().all(|&x| x == want), "page {p}");
                    assert!(bytes[held..].iter().all(|&x| x == 0), "page {p}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The demand page (tag 0) was a read of its own.
        assert!(matches!(out[280].result, Ok(PageContent::Data(_))));
    }

    #[test]
    fn a_missing_image_is_unavailable_naming_it() {
        let err = ImageFileSource::open("/nonexistent/pw-image", 4096, 4)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/pw-image"), "{err}");
    }
}
