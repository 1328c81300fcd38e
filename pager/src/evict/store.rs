//! Page stores the evictor writes to.
//!
//! - [`ImageFileStore`]: a raw memory image (page `p` at offset `p * page_size`), the format
//!   [`crate::source::ImageFileSource`] serves faults from. Writes are `pwrite` + `fdatasync`
//!   before acknowledging; forgotten pages are punched out (they read back as zero).
//! - [`SwapdevStore`]: the VM's swap device, shared with the fault loop's reads. A
//!   `write_pages` call returns when acknowledged (it survives a crash of this process);
//!   `forget_pages` writes tombstones so discarded pages read back as not stored.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

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
///
/// The fault loop's reads share the device's lock, so a write holds it only briefly: pages
/// are encoded (zero check, lz4, checksums) without it, then `begin_write` seals and submits
/// the batches under it, and the wait for their completion (and for any checkpoint the write
/// takes) happens with the lock released, taking it again only to reap and submit the next
/// step. With a completion fd (io_uring file backend) the wait is a `poll` on a duplicate of
/// it; without one (NBD) each step holds the lock for one completion, like the reads' I/O
/// thread does.
pub struct SwapdevStore {
    device: Arc<Mutex<swapdev::SwapDevice>>,
    encoder: swapdev::PageEncoder,
    /// The backend's completion eventfd (a duplicate), if it has one.
    wake: Option<OwnedFd>,
}

/// Longest a writer sleeps on the completion fd before reaping anyway: the fault loop may
/// have reset the fd (and reaped our completion) between our look and our `poll`.
const WAKE_SLICE_MS: u8 = 1;

impl SwapdevStore {
    pub fn new(device: Arc<Mutex<swapdev::SwapDevice>>) -> Self {
        let (encoder, wake) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            let wake = d.completion_fd().and_then(|fd| match fd.try_clone_to_owned() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(%e, "duplicating the swap device's completion fd; writes wait under the lock");
                    None
                }
            });
            (d.encoder(), wake)
        };
        Self {
            device,
            encoder,
            wake,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, swapdev::SwapDevice> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drive a begun write to its acknowledgement, holding the lock only per step.
    fn wait(&self, t: swapdev::WriteTicket) -> Result<(), StoreError> {
        let Some(wake) = &self.wake else {
            while !self.lock().poll_write(&t, true)? {}
            return Ok(());
        };
        loop {
            {
                // The fd is shared with the fault loop, which also sets it for completions it
                // queued itself: never reset it here (that could swallow its wakeup). If our
                // reaping parked page reads the fault loop waits for, set it for them.
                let mut d = self.lock();
                let done = d.poll_write(&t, false);
                if d.reads_parked() {
                    let _ = nix::unistd::write(wake, &1u64.to_ne_bytes());
                }
                if done? {
                    return Ok(());
                }
            }
            let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(WAKE_SLICE_MS)) {
                // Readable: a completion may be ours, but the fd stays set until the fault
                // loop resets it; do not spin on it.
                Ok(n) if n > 0 => std::thread::sleep(std::time::Duration::from_micros(50)),
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(Box::new(std::io::Error::from(e))),
            }
        }
    }
}

impl PageStore for SwapdevStore {
    fn store_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), StoreError> {
        // The expensive part, without the device.
        let enc = self.encoder.encode(pages)?;
        let ticket = self.lock().begin_write(enc)?;
        self.wait(ticket)
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

    fn device_on(backend: Box<dyn swapdev::backend::Backend>) -> Arc<Mutex<swapdev::SwapDevice>> {
        let dev = swapdev::SwapDevice::create(
            backend,
            swapdev::CreateOptions {
                vm_uuid: swapdev::Uuid::from_u128(7),
                page_size: 4096,
                capacity_pages: 2048,
                host_id: "h".into(),
                codec: swapdev::CodecPolicy::Lz4,
                checksum: swapdev::ChecksumKind::Crc32c,
                force: false,
            },
        )
        .unwrap();
        Arc::new(Mutex::new(dev))
    }

    fn content(p: u64, round: u64) -> Vec<u8> {
        format!("page {p} round {round}; ")
            .bytes()
            .cycle()
            .take(4096)
            .collect()
    }

    /// The store's writes (encode outside the lock, wait with the lock released) while
    /// another thread keeps reading through the same lock: every read sees a complete
    /// acknowledged version, everything reads back after.
    fn store_while_reading(device: Arc<Mutex<swapdev::SwapDevice>>) {
        let store = SwapdevStore::new(device.clone());
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u64;
                let mut out = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let p = reads % 512;
                    out.clear();
                    {
                        let mut d = device.lock().unwrap();
                        d.submit_read(p, p).unwrap();
                        d.poll_reads(&mut out, 1).unwrap();
                    }
                    if let Some(bytes) = out[0].result.as_ref().unwrap().to_vec(4096) {
                        let text = String::from_utf8_lossy(&bytes[..32]).to_string();
                        assert!(text.starts_with(&format!("page {p} round ")), "{text}");
                    }
                    reads += 1;
                }
                reads
            });
            for round in 0..20u64 {
                let pages: Vec<(u64, Vec<u8>)> = (0..512).map(|p| (p, content(p, round))).collect();
                let refs: Vec<(u64, &[u8])> = pages.iter().map(|(p, d)| (*p, &d[..])).collect();
                store.store_pages(&refs).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        store.forget_pages(&[3]).unwrap();
        let mut d = device.lock().unwrap();
        for p in 0..512 {
            let got = d.read_page(p).unwrap().to_vec(4096);
            let want = (p != 3).then(|| content(p, 19));
            assert_eq!(got, want, "page {p}");
        }
        assert!(d.fsck().unwrap().is_clean());
    }

    #[test]
    fn swapdev_store_on_a_file_with_a_completion_fd_and_reads_alongside() {
        let dir = tempfile::tempdir().unwrap();
        let be = swapdev::backend::spec::open_backend(
            dir.path().join("dev").to_str().unwrap(),
            &swapdev::backend::spec::SpecOptions {
                create: true,
                ..Default::default()
            },
        )
        .unwrap();
        let device = device_on(be);
        assert!(device.lock().unwrap().completion_fd().is_some());
        store_while_reading(device);
    }

    #[test]
    fn swapdev_store_on_a_backend_without_a_completion_fd() {
        let be = swapdev::backend::mem::MemBackend::new(swapdev::backend::mem::MemStore::new());
        let device = device_on(Box::new(be));
        assert!(device.lock().unwrap().completion_fd().is_none());
        store_while_reading(device);
    }
}
