//! [`ImageFileSource`]: pages of a raw guest-memory image (page `i` at byte `i * page_size`),
//! e.g. a Firecracker snapshot memory file, read with io_uring. Bytes past the end of the
//! file read as zero pages; all-zero pages are reported as [`PageContent::Zero`].

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};
use swapdev::AlignedBuf;

use super::{PageCompletion, PageContent, PageSource, SourceError};

/// Ring size: the most reads in flight at once.
const RING_ENTRIES: u32 = 256;

struct PendingRead {
    page: u64,
    tag: u64,
    buf: AlignedBuf,
}

/// A raw memory image served page by page through io_uring.
pub struct ImageFileSource {
    file: File,
    path: PathBuf,
    file_len: u64,
    page_size: usize,
    capacity_pages: u64,
    ring: IoUring,
    completion: EventFd,
    pending: HashMap<u64, PendingRead>,
    next_id: u64,
    /// Requests pushed to the submission queue but not yet submitted to the kernel.
    unsubmitted: usize,
}

impl ImageFileSource {
    /// Open `path`; the source answers for `capacity_pages` pages of `page_size` bytes.
    pub fn open(
        path: impl AsRef<Path>,
        page_size: usize,
        capacity_pages: u64,
    ) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        let fail = |why: String| SourceError::unavailable(path.display().to_string(), why);
        let file = File::open(&path).map_err(|e| fail(format!("open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| fail(format!("stat: {e}")))?
            .len();
        let ring = IoUring::new(RING_ENTRIES).map_err(|e| fail(format!("io_uring setup: {e}")))?;
        let completion =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| fail(format!("eventfd: {e}")))?;
        ring.submitter()
            .register_eventfd(completion.as_fd().as_raw_fd())
            .map_err(|e| fail(format!("io_uring eventfd registration: {e}")))?;
        Ok(Self {
            file,
            path,
            file_len,
            page_size,
            capacity_pages,
            ring,
            completion,
            pending: HashMap::new(),
            next_id: 0,
            unsubmitted: 0,
        })
    }

    fn flush_submissions(&mut self, wait: usize) -> Result<(), SourceError> {
        if self.unsubmitted == 0 && wait == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(SourceError::unavailable(self.describe(), e)),
            }
        }
        self.unsubmitted = 0;
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<PageCompletion>) -> usize {
        let mut n = 0;
        let page_size = self.page_size;
        for cqe in self.ring.completion() {
            let Some(read) = self.pending.remove(&cqe.user_data()) else {
                continue;
            };
            let res = cqe.result();
            let result = if res < 0 {
                Err(SourceError::Io {
                    page: read.page,
                    source: std::io::Error::from_raw_os_error(-res).into(),
                })
            } else if (res as usize) < page_size
                && read.page * page_size as u64 + (res as u64) < self.file_len
            {
                Err(SourceError::Io {
                    page: read.page,
                    source: format!("short read: {res} of {page_size} bytes").into(),
                })
            } else if swapdev::is_zero_page(read.buf.as_slice()) {
                // A read ending at EOF leaves the rest of the zeroed buffer as zeros.
                Ok(PageContent::Zero)
            } else {
                Ok(PageContent::Data(read.buf))
            };
            out.push(PageCompletion {
                page: read.page,
                tag: read.tag,
                result,
            });
            n += 1;
        }
        n
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
        if self.ring.submission().is_full() {
            self.flush_submissions(0)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut buf = AlignedBuf::new(self.page_size);
        let entry = opcode::Read::new(
            types::Fd(self.file.as_raw_fd()),
            buf.as_mut_ptr(),
            self.page_size as u32,
        )
        .offset(page * self.page_size as u64)
        .build()
        .user_data(id);
        // SAFETY: the buffer is heap-allocated and moved into `pending` (its address does not
        // change) until the completion for `id` is reaped; the fd outlives the ring's use.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(SourceError::unavailable(
                self.describe(),
                "submission queue full after flushing",
            ));
        }
        self.pending.insert(id, PendingRead { page, tag, buf });
        self.unsubmitted += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<PageCompletion>, min: usize) -> Result<usize, SourceError> {
        // Reset the eventfd before reaping, so a completion arriving after the reap re-arms it.
        let _ = self.completion.read();
        self.flush_submissions(0)?;
        let mut got = self.reap(out);
        while got < min && !self.pending.is_empty() {
            self.flush_submissions(1)?;
            got += self.reap(out);
        }
        Ok(got)
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        self.flush_submissions(0)
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.completion.as_fd()
    }

    fn describe(&self) -> String {
        format!("image {}", self.path.display())
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
}
