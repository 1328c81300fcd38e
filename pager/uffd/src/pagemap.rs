//! PAGEMAP_SCAN (Linux 6.7+): ask the kernel which pages of a range are present, written
//! since write-protection (with `WP_ASYNC`), file-backed, swapped, ... in one ioctl on
//! `/proc/PID/pagemap`, and optionally write-protect the matching pages again.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::UffdError;

/// `PAGE_IS_*` category bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PageCategories(pub u64);

impl PageCategories {
    /// Async write-protection is enabled on the page (uffd `WP_ASYNC` + WP registration).
    pub const WPALLOWED: Self = Self(1 << 0);
    /// Written since it was last write-protected.
    pub const WRITTEN: Self = Self(1 << 1);
    pub const FILE: Self = Self(1 << 2);
    pub const PRESENT: Self = Self(1 << 3);
    pub const SWAPPED: Self = Self(1 << 4);
    pub const PFNZERO: Self = Self(1 << 5);
    pub const HUGE: Self = Self(1 << 6);
    pub const SOFT_DIRTY: Self = Self(1 << 7);

    pub const fn empty() -> Self {
        Self(0)
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for PageCategories {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// What to look for. A page matches when every `required` category is set (or clear, for
/// those also in `inverted`) and, if `any_of` is non-empty, at least one of `any_of` is.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanQuery {
    pub required: PageCategories,
    pub inverted: PageCategories,
    pub any_of: PageCategories,
    /// Categories reported in each returned region (regions split where these differ).
    pub report: PageCategories,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
    /// Write-protect the matching pages (`PM_SCAN_WP_MATCHING`; needs uffd WP_ASYNC).
    pub write_protect_matching: bool,
    /// Fail when a page without async WP is met (`PM_SCAN_CHECK_WPASYNC`).
    pub check_wp_async: bool,
}

/// A run of pages `[start, end)` with the reported categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// This process's pagemap.
    pub fn open_self() -> Result<Self, UffdError> {
        Self::open_path("/proc/self/pagemap")
    }

    /// Another process's pagemap (needs ptrace-read access to it).
    pub fn open_pid(pid: i32) -> Result<Self, UffdError> {
        Self::open_path(&format!("/proc/{pid}/pagemap"))
    }

    fn open_path(path: &str) -> Result<Self, UffdError> {
        let file = File::open(path).map_err(|source| UffdError::Range {
            op: "open pagemap",
            addr: 0,
            len: 0,
            source,
        })?;
        Ok(Self { file })
    }

    /// Scan `[start, end)`, appending matching regions to `out` (at most `capacity` regions
    /// per call). Returns where the walk stopped: `end` when the range was covered, earlier
    /// when `out`'s capacity or `max_pages` ran out (call again from there).
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        query: &ScanQuery,
        out: &mut Vec<PageRegion>,
        capacity: usize,
    ) -> Result<u64, UffdError> {
        let mut regions = vec![PageRegion::default(); capacity.max(1)];
        let mut flags = 0;
        if query.write_protect_matching {
            flags |= PM_SCAN_WP_MATCHING;
        }
        if query.check_wp_async {
            flags |= PM_SCAN_CHECK_WPASYNC;
        }
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: query.max_pages,
            category_inverted: query.inverted.0,
            category_mask: query.required.0,
            category_anyof_mask: query.any_of.0,
            return_mask: query.report.0,
        };
        // SAFETY: PAGEMAP_SCAN reads and writes one `struct pm_scan_arg` and writes at most
        // `vec_len` `struct page_region`s to `vec`, which points into `regions`.
        let n = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(UffdError::range("pagemap_scan", start, end - start));
        }
        out.extend_from_slice(&regions[..n as usize]);
        Ok(arg.walk_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Features, RegisterMode, Uffd, UffdFlags};

    const PAGE: u64 = 4096;

    fn anon(pages: u64) -> u64 {
        // SAFETY: a fresh private anonymous mapping (leaked for the test's duration).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (pages * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    fn touch(addr: u64) {
        // SAFETY: `addr` lies in a live test mapping.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 1) }
    }

    #[test]
    fn ioctl_number_matches_the_kernel_header() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn finds_present_pages() {
        let base = anon(8);
        for i in [1, 2, 5] {
            touch(base + i * PAGE);
        }
        let pm = Pagemap::open_self().unwrap();
        let q = ScanQuery {
            required: PageCategories::PRESENT,
            report: PageCategories::PRESENT,
            ..Default::default()
        };
        let mut out = Vec::new();
        let walk_end = pm.scan(base, base + 8 * PAGE, &q, &mut out, 16).unwrap();
        assert_eq!(walk_end, base + 8 * PAGE);
        let got: Vec<(u64, u64)> = out
            .iter()
            .map(|r| ((r.start - base) / PAGE, (r.end - base) / PAGE))
            .collect();
        assert_eq!(got, vec![(1, 3), (5, 6)]);
        // SAFETY: unmapping the mapping created above.
        unsafe { libc::munmap(base as *mut libc::c_void, (8 * PAGE) as usize) };
    }

    #[test]
    fn async_wp_reports_written_pages_and_reprotects() {
        let base = anon(4);
        let u = Uffd::new(UffdFlags::default()).unwrap();
        u.api(Features::WP_ASYNC | Features::WP_UNPOPULATED)
            .unwrap();
        u.register(base, 4 * PAGE, RegisterMode::WP).unwrap();
        u.write_protect(base, 4 * PAGE, true, false).unwrap();
        touch(base + 2 * PAGE);
        let pm = Pagemap::open_self().unwrap();
        let written = ScanQuery {
            required: PageCategories::WRITTEN,
            report: PageCategories::WRITTEN,
            write_protect_matching: true,
            check_wp_async: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        pm.scan(base, base + 4 * PAGE, &written, &mut out, 8)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].start, out[0].end),
            (base + 2 * PAGE, base + 3 * PAGE)
        );
        // Re-protected by the scan: nothing written now.
        out.clear();
        pm.scan(base, base + 4 * PAGE, &written, &mut out, 8)
            .unwrap();
        assert!(out.is_empty(), "{out:?}");
        touch(base);
        pm.scan(base, base + 4 * PAGE, &written, &mut out, 8)
            .unwrap();
        assert_eq!((out[0].start, out[0].end), (base, base + PAGE));
        drop(u);
        // SAFETY: unmapping the mapping created above.
        unsafe { libc::munmap(base as *mut libc::c_void, (4 * PAGE) as usize) };
    }
}
