//! Page stores the evictor writes to.
//!
//! - [`ImageFileStore`]: a raw memory image (page `p` at offset `p * page_size`), the format
//!   [`crate::source::ImageFileSource`] serves faults from. Writes are `pwrite` + `fdatasync`
//!   before acknowledging; forgotten pages are punched out (they read back as zero).
//! - [`SwapdevStore`]: the VM's swap device, shared with the fault loop's reads. A
//!   `write_pages` call returns when acknowledged (it survives a crash of this process);
//!   `forget_pages` writes tombstones so discarded pages read back as not stored.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fallocate, FallocateFlags};

use super::{PageStore, StoreError};

/// A raw memory image file used as the evicted pages' home.
pub struct ImageFileStore {
    file: Mutex<File>,
    path: PathBuf,
    page_size: u64,
    capacity_pages: u64,
}

impl ImageFileStore {
    /// Open an existing image of at least `capacity_pages` pages for writing.
    pub fn open(
        path: impl AsRef<Path>,
        page_size: usize,
        capacity_pages: u64,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("opening memory image {}: {e}", path.display()))?;
        let len = file.metadata()?.len();
        let want = capacity_pages * page_size as u64;
        if len < want {
            return Err(format!(
                "memory image {} holds {len} bytes, less than the guest's {want} bytes \
                 ({capacity_pages} pages of {page_size})",
                path.display()
            )
            .into());
        }
        Ok(Self {
            file: Mutex::new(file),
            path,
            page_size: page_size as u64,
            capacity_pages,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, page: u64, len: usize) -> Result<(), StoreError> {
        if page >= self.capacity_pages {
            return Err(format!(
                "page {page} is beyond the memory image's {} pages",
                self.capacity_pages
            )
            .into());
        }
        if len as u64 != self.page_size {
            return Err(format!(
                "page {page}: {len} bytes given, the page size is {}",
                self.page_size
            )
            .into());
        }
        Ok(())
    }
}

impl PageStore for ImageFileStore {
    fn store_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), StoreError> {
        for (p, data) in pages {
            self.check(*p, data.len())?;
        }
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // Coalesce runs of consecutive pages into one write each.
        let mut i = 0;
        let mut run = Vec::new();
        while i < pages.len() {
            let first = pages[i].0;
            let mut j = i + 1;
            while j < pages.len() && pages[j].0 == pages[j - 1].0 + 1 {
                j += 1;
            }
            if j - i == 1 {
                file.write_all_at(pages[i].1, first * self.page_size)?;
            } else {
                run.clear();
                for (_, d) in &pages[i..j] {
                    run.extend_from_slice(d);
                }
                file.write_all_at(&run, first * self.page_size)?;
            }
            i = j;
        }
        file.sync_data()
            .map_err(|e| format!("fdatasync {}: {e}", self.path.display()))?;
        Ok(())
    }

    fn forget_pages(&self, pages: &[u64]) -> Result<(), StoreError> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        for &p in pages {
            self.check(p, self.page_size as usize)?;
            fallocate(
                file.as_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (p * self.page_size) as libc::off_t,
                self.page_size as libc::off_t,
            )
            .map_err(|e| format!("punching page {p} out of {}: {e}", self.path.display()))?;
        }
        Ok(())
    }
}

/// The VM's swap device as the evictor's page store.
pub struct SwapdevStore {
    device: Arc<Mutex<swapdev::SwapDevice>>,
}

impl SwapdevStore {
    pub fn new(device: Arc<Mutex<swapdev::SwapDevice>>) -> Self {
        Self { device }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, swapdev::SwapDevice> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PageStore for SwapdevStore {
    fn store_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), StoreError> {
        Ok(self.lock().write_pages(pages)?)
    }

    fn forget_pages(&self, pages: &[u64]) -> Result<(), StoreError> {
        Ok(self.lock().remove_pages(pages)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_forgets_and_checks_bounds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 * 4096).unwrap();
        assert!(ImageFileStore::open(f.path(), 4096, 9).is_err());
        let s = ImageFileStore::open(f.path(), 4096, 8).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        s.store_pages(&[(2, &a), (3, &b), (6, &a)]).unwrap();
        let mut got = vec![0u8; 4096];
        f.as_file().read_exact_at(&mut got, 3 * 4096).unwrap();
        assert_eq!(got, b);
        s.forget_pages(&[3]).unwrap();
        f.as_file().read_exact_at(&mut got, 3 * 4096).unwrap();
        assert!(got.iter().all(|&x| x == 0));
        f.as_file().read_exact_at(&mut got, 6 * 4096).unwrap();
        assert_eq!(got, a);
        let err = s.store_pages(&[(8, &a)]).unwrap_err().to_string();
        assert!(err.contains("beyond"), "{err}");
        let err = s.store_pages(&[(1, &a[..100])]).unwrap_err().to_string();
        assert!(err.contains("100 bytes"), "{err}");
    }
}
