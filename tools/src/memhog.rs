//! memhog: a process that attaches memory to a pager like a VMM and then works it with a
//! verifiable access pattern.
//!
//! * [`memory`] — the mapping (anonymous or shared memory file), madvise, mincore.
//! * [`attach`] — uffd creation/registration and both handshakes.
//! * [`pages`] — per-page expected content and locks.
//! * [`run`] — the threads, patterns, verification and the report.

pub mod attach;
pub mod memory;
pub mod pages;
pub mod run;

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};

use crate::image::PAGE_SIZE;
use memory::GuestMemory;

/// Fill `mem` from a raw image file without any pager: the baseline where every page is
/// already resident. Returns the seconds it took.
pub fn prefill(mem: &GuestMemory, image: &Path) -> anyhow::Result<f64> {
    let mut f =
        std::fs::File::open(image).with_context(|| format!("opening image {}", image.display()))?;
    let len = f.metadata()?.len();
    if len != mem.len() as u64 {
        bail!(
            "image {} has {len} bytes but the memory has {} ({} pages)",
            image.display(),
            mem.len(),
            mem.pages()
        );
    }
    let t = std::time::Instant::now();
    const CHUNK: u64 = 256;
    let mut index = 0;
    while index < mem.pages() {
        let n = CHUNK.min(mem.pages() - index);
        for p in index..index + n {
            // SAFETY: prefill runs before any worker thread exists.
            let page = unsafe { mem.page_mut(p) };
            f.read_exact(page)
                .with_context(|| format!("reading page {p} of {}", image.display()))?;
        }
        index += n;
    }
    debug_assert_eq!(index as usize * PAGE_SIZE, mem.len());
    Ok(t.elapsed().as_secs_f64())
}
