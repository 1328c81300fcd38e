//! Guest-like memory: anonymous private (Firecracker's layout) or a shared memory file
//! (memfd or a file under /dev/shm, QEMU's `memory-backend-file share=on` layout).
//!
//! All of memhog's `unsafe` is here: mmap/munmap/madvise/mincore and raw page access.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::image::PAGE_SIZE;

/// What backs the memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// MAP_PRIVATE | MAP_ANONYMOUS (Firecracker).
    Anon,
    /// A fresh memfd, MAP_SHARED.
    Memfd,
    /// A file (e.g. under /dev/shm), created/truncated to size, MAP_SHARED.
    File(PathBuf),
}

impl std::str::FromStr for Backing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "anon" => Ok(Backing::Anon),
            "memfd" | "shm" => Ok(Backing::Memfd),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Backing::File(p.into())),
                _ => Err(format!(
                    "unknown memory backing {s:?}: expected anon, memfd or file:PATH"
                )),
            },
        }
    }
}

/// A mapping of `pages` pages. Access goes through [`GuestMemory::page`] /
/// [`GuestMemory::page_mut`], which callers serialise per page.
#[derive(Debug)]
pub struct GuestMemory {
    addr: *mut u8,
    len: usize,
    file: Option<OwnedFd>,
    backing: Backing,
}

// SAFETY: the mapping is plain memory owned by this struct for its whole life; concurrent
// users serialise access to each page themselves (memhog's per-page locks).
unsafe impl Send for GuestMemory {}
// SAFETY: as above; shared references only hand out raw page access under caller locking.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Map `pages` pages with `backing`.
    pub fn new(pages: u64, backing: Backing) -> anyhow::Result<Self> {
        if pages == 0 {
            bail!("memory size must be at least one page");
        }
        let len = pages as usize * PAGE_SIZE;
        let file = match &backing {
            Backing::Anon => None,
            Backing::Memfd => Some(memfd("memhog")?),
            Backing::File(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .with_context(|| format!("opening memory file {}", path.display()))?;
                Some(OwnedFd::from(f))
            }
        };
        if let Some(fd) = &file {
            nix::unistd::ftruncate(fd, len as i64).context("sizing the memory file")?;
        }
        let (flags, fd) = match &file {
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        };
        // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {len} bytes ({backing:?})"));
        }
        Ok(Self {
            addr: addr.cast(),
            len,
            file,
            backing,
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The memory file, for shared backings.
    pub fn file(&self) -> Option<&OwnedFd> {
        self.file.as_ref()
    }

    fn page_ptr(&self, index: u64) -> *mut u8 {
        assert!(index < self.pages(), "page {index} outside the mapping");
        // SAFETY: index is in range, so the offset stays inside the mapping.
        unsafe { self.addr.add(index as usize * PAGE_SIZE) }
    }

    /// Read access to page `index` (faults it in if absent).
    ///
    /// # Safety
    /// No other thread may write the page while the slice lives.
    pub unsafe fn page(&self, index: u64) -> &[u8] {
        // SAFETY: the page is inside the live mapping; the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.page_ptr(index), PAGE_SIZE) }
    }

    /// Write access to page `index`.
    ///
    /// # Safety
    /// No other thread may access the page while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn page_mut(&self, index: u64) -> &mut [u8] {
        // SAFETY: the page is inside the live mapping; the caller holds exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.page_ptr(index), PAGE_SIZE) }
    }

    /// Whether page `index` is resident (a touch would not fault).
    pub fn resident(&self, index: u64) -> anyhow::Result<bool> {
        let mut vec = [0u8; 1];
        // SAFETY: the range is one page inside our mapping; `vec` has room for one entry.
        let rc = unsafe { libc::mincore(self.page_ptr(index).cast(), PAGE_SIZE, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mincore");
        }
        Ok(vec[0] & 1 != 0)
    }

    /// Discard pages `[first, first + count)` the way a balloon does: MADV_DONTNEED on
    /// anonymous memory, MADV_REMOVE (frees the file's pages too) on shared memory.
    /// Afterwards they read as zeros.
    ///
    /// # Safety
    /// No other thread may access those pages during the call.
    pub unsafe fn discard(&self, first: u64, count: u64) -> anyhow::Result<()> {
        if count == 0 || first + count > self.pages() {
            bail!(
                "discard of pages {first}..{} outside 0..{}",
                first + count,
                self.pages()
            );
        }
        let advice = match self.backing {
            Backing::Anon => libc::MADV_DONTNEED,
            _ => libc::MADV_REMOVE,
        };
        // SAFETY: the range lies inside our mapping; the caller excludes concurrent access,
        // and discarding is the intended effect.
        let rc = unsafe {
            libc::madvise(
                self.page_ptr(first).cast(),
                count as usize * PAGE_SIZE,
                advice,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("madvise discard");
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this struct created and owns.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn memfd(name: &str) -> anyhow::Result<OwnedFd> {
    let cname = CString::new(name).expect("no NUL in name");
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_zeroes_both_backings() {
        for backing in [Backing::Anon, Backing::Memfd] {
            let m = GuestMemory::new(4, backing.clone()).unwrap();
            // SAFETY: single-threaded test.
            unsafe {
                m.page_mut(1).fill(7);
                assert!(m.resident(1).unwrap());
                m.discard(1, 1).unwrap();
                assert!(!m.resident(1).unwrap(), "{backing:?}");
                assert!(m.page(1).iter().all(|&b| b == 0));
                assert!(m.discard(3, 2).is_err());
            }
        }
    }

    #[test]
    fn backing_names() {
        assert_eq!("anon".parse::<Backing>().unwrap(), Backing::Anon);
        assert_eq!(
            "file:/dev/shm/x".parse::<Backing>().unwrap(),
            Backing::File("/dev/shm/x".into())
        );
        assert!("file:".parse::<Backing>().is_err());
        assert!("hugetlb"
            .parse::<Backing>()
            .unwrap_err()
            .contains("hugetlb"));
    }
}
