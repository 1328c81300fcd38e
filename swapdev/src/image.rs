//! Raw RAM images: `import_image` fills a device from one (e.g. a QEMU /dev/shm backing
//! file), `export_image` writes one back. Both keep many I/Os in flight.

use std::io::Read;
use std::os::unix::fs::FileExt;

use serde::Serialize;

use crate::device::{PageData, SwapDevice};
use crate::error::{Result, SwapError};

/// Pages handed to one `write_pages` call during import.
const IMPORT_CHUNK_PAGES: usize = 512;
/// Reads kept in flight during export.
const EXPORT_WINDOW: u64 = 256;

/// What an import or export moved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageStats {
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages not stored in the device (exported as zeros).
    pub absent_pages: u64,
    pub bytes: u64,
}

impl SwapDevice {
    /// Store every page of a raw image of exactly `capacity_pages * page_size` bytes, then
    /// checkpoint. Fails before writing anything when `image_len` does not match.
    pub fn import_image(&mut self, reader: &mut dyn Read, image_len: u64) -> Result<ImageStats> {
        let ps = self.page_size();
        let expected = self.capacity_pages() * ps as u64;
        if image_len != expected {
            return Err(SwapError::ImageSizeMismatch {
                image_len,
                capacity: self.capacity_pages(),
                page_size: ps as u32,
                expected,
            });
        }
        let mut stats = ImageStats::default();
        let mut buf = vec![0u8; ps * IMPORT_CHUNK_PAGES];
        let mut page = 0u64;
        while page < self.capacity_pages() {
            let n = (self.capacity_pages() - page).min(IMPORT_CHUNK_PAGES as u64) as usize;
            reader
                .read_exact(&mut buf[..n * ps])
                .map_err(SwapError::Image)?;
            let batch: Vec<(u64, &[u8])> = (0..n)
                .map(|i| (page + i as u64, &buf[i * ps..(i + 1) * ps]))
                .collect();
            stats.zero_pages += batch
                .iter()
                .filter(|(_, d)| crate::format::is_zero_page(d))
                .count() as u64;
            self.write_pages(&batch)?;
            page += n as u64;
            stats.pages += n as u64;
            stats.bytes += (n * ps) as u64;
        }
        self.checkpoint()?;
        Ok(stats)
    }

    /// Write the whole device as a raw image into `out` (zero and absent pages become
    /// holes), sized to `capacity_pages * page_size`.
    pub fn export_image(&mut self, out: &std::fs::File) -> Result<ImageStats> {
        let ps = self.page_size() as u64;
        let cap = self.capacity_pages();
        let mut stats = ImageStats::default();
        let mut next = 0u64;
        let mut done = Vec::new();
        let mut in_flight = 0u64;
        while next < cap || in_flight > 0 {
            while next < cap && in_flight < EXPORT_WINDOW {
                self.submit_read(next, next)?;
                next += 1;
                in_flight += 1;
            }
            done.clear();
            self.poll_reads(&mut done, 1)?;
            for r in done.drain(..) {
                in_flight -= 1;
                stats.pages += 1;
                match r.result? {
                    PageData::Data(buf) => {
                        out.write_all_at(&buf, r.page * ps)
                            .map_err(SwapError::Image)?;
                        stats.bytes += ps;
                    }
                    PageData::Zero => stats.zero_pages += 1,
                    PageData::NotStored => stats.absent_pages += 1,
                }
            }
        }
        out.set_len(cap * ps).map_err(SwapError::Image)?;
        out.sync_data().map_err(SwapError::Image)?;
        Ok(stats)
    }
}
