//! Where guest pages live: guest page index (memory-file offset / page size) -> host virtual
//! address in the VMM's mapping, and grouping of page lists into contiguous runs so each
//! syscall covers as many pages as possible.

use crate::attach::protocol::GuestRegionUffdMapping;

use super::EvictError;

/// One guest memory region: `len` bytes at memory-file offset `file_offset`, mapped at
/// `host_addr` in the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionMap {
    pub host_addr: u64,
    pub file_offset: u64,
    pub len: u64,
}

/// A contiguous stretch of pages: contiguous in the memory file and in the VMM's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first_page: u64,
    pub pages: u64,
    pub host_addr: u64,
    pub file_offset: u64,
}

impl Run {
    pub fn byte_len(&self, page_size: usize) -> u64 {
        self.pages * page_size as u64
    }

    pub fn page_range(&self) -> std::ops::Range<u64> {
        self.first_page..self.first_page + self.pages
    }
}

/// A VM's guest memory layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    page_size: usize,
    /// Sorted by `file_offset`.
    regions: Vec<RegionMap>,
}

impl MemoryLayout {
    /// A layout from regions (any order). Every region must be page aligned and non-empty.
    pub fn new(page_size: usize, mut regions: Vec<RegionMap>) -> Result<Self, EvictError> {
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(EvictError::Layout(format!(
                "page size {page_size} is not a power of two >= 4096"
            )));
        }
        let ps = page_size as u64;
        regions.sort_by_key(|r| r.file_offset);
        for (i, r) in regions.iter().enumerate() {
            if r.len == 0 || r.len % ps != 0 || r.file_offset % ps != 0 || r.host_addr % ps != 0 {
                return Err(EvictError::Layout(format!(
                    "region {i} (file offset {:#x}, address {:#x}, {} bytes) is empty or not \
                     aligned to the page size {page_size}",
                    r.file_offset, r.host_addr, r.len
                )));
            }
            if let Some(next) = regions.get(i + 1) {
                if r.file_offset + r.len > next.file_offset {
                    return Err(EvictError::Layout(format!(
                        "regions at file offsets {:#x} and {:#x} overlap",
                        r.file_offset, next.file_offset
                    )));
                }
            }
        }
        Ok(Self { page_size, regions })
    }

    /// The layout of a handshake's regions.
    pub fn from_handshake(regions: &[GuestRegionUffdMapping]) -> Result<Self, EvictError> {
        let page_size = regions
            .first()
            .map(|r| r.effective_page_size())
            .ok_or_else(|| EvictError::Layout("no guest memory regions".into()))?;
        if let Some(r) = regions
            .iter()
            .find(|r| r.effective_page_size() != page_size)
        {
            return Err(EvictError::Layout(format!(
                "mixed page sizes {page_size} and {} are not supported",
                r.effective_page_size()
            )));
        }
        Self::new(
            page_size,
            regions
                .iter()
                .map(|r| RegionMap {
                    host_addr: r.base_host_virt_addr,
                    file_offset: r.offset,
                    len: r.size as u64,
                })
                .collect(),
        )
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn regions(&self) -> &[RegionMap] {
        &self.regions
    }

    /// Number of guest page indices covered (the page-state table's length): up to the end
    /// of the last region.
    pub fn page_count(&self) -> usize {
        self.regions
            .last()
            .map(|r| ((r.file_offset + r.len) / self.page_size as u64) as usize)
            .unwrap_or(0)
    }

    fn region_of(&self, page: u64) -> Option<&RegionMap> {
        let off = page.checked_mul(self.page_size as u64)?;
        let i = self.regions.partition_point(|r| r.file_offset <= off);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (off < r.file_offset + r.len).then_some(r)
    }

    /// Host address of `page`, if a region maps it.
    pub fn host_addr(&self, page: u64) -> Option<u64> {
        let r = self.region_of(page)?;
        Some(r.host_addr + page * self.page_size as u64 - r.file_offset)
    }

    /// Guest page index of a host address (e.g. a fault address), if a region maps it.
    pub fn page_of_addr(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            (addr >= r.host_addr && addr < r.host_addr + r.len)
                .then(|| (r.file_offset + (addr - r.host_addr)) / self.page_size as u64)
        })
    }

    /// Group ascending `pages` into runs contiguous in file and address space.
    pub fn runs(&self, pages: &[u64]) -> Result<Vec<Run>, EvictError> {
        let mut runs: Vec<Run> = Vec::new();
        for &page in pages {
            let r = self
                .region_of(page)
                .ok_or(EvictError::PageOutOfRange { page })?;
            let host_addr = r.host_addr + page * self.page_size as u64 - r.file_offset;
            if let Some(last) = runs.last_mut() {
                if last.first_page + last.pages == page
                    && last.host_addr + last.byte_len(self.page_size) == host_addr
                {
                    last.pages += 1;
                    continue;
                }
            }
            runs.push(Run {
                first_page: page,
                pages: 1,
                host_addr,
                file_offset: page * self.page_size as u64,
            });
        }
        Ok(runs)
    }

    /// Every region as one run (for write-protecting the whole guest).
    pub fn all_runs(&self) -> Vec<Run> {
        let ps = self.page_size as u64;
        self.regions
            .iter()
            .map(|r| Run {
                first_page: r.file_offset / ps,
                pages: r.len / ps,
                host_addr: r.host_addr,
                file_offset: r.file_offset,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> MemoryLayout {
        MemoryLayout::new(
            4096,
            vec![
                RegionMap {
                    host_addr: 0x10_0000_0000,
                    file_offset: 8 * 4096,
                    len: 4 * 4096,
                },
                RegionMap {
                    host_addr: 0x7f00_0000_0000,
                    file_offset: 0,
                    len: 8 * 4096,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn maps_pages_and_addresses() {
        let l = two_regions();
        assert_eq!(l.page_count(), 12);
        assert_eq!(l.host_addr(0), Some(0x7f00_0000_0000));
        assert_eq!(l.host_addr(9), Some(0x10_0000_1000));
        assert_eq!(l.host_addr(12), None);
        assert_eq!(l.page_of_addr(0x10_0000_1fff), Some(9));
        assert_eq!(l.page_of_addr(0x10_0000_4000), None);
    }

    #[test]
    fn runs_split_at_gaps_and_region_edges() {
        let l = two_regions();
        let runs = l.runs(&[1, 2, 3, 7, 8, 9, 11]).unwrap();
        let shape: Vec<(u64, u64)> = runs.iter().map(|r| (r.first_page, r.pages)).collect();
        assert_eq!(shape, vec![(1, 3), (7, 1), (8, 2), (11, 1)]);
        assert_eq!(runs[2].host_addr, 0x10_0000_0000);
        assert_eq!(runs[2].file_offset, 8 * 4096);
        assert!(matches!(
            l.runs(&[12]),
            Err(EvictError::PageOutOfRange { page: 12 })
        ));
    }

    #[test]
    fn rejects_bad_regions() {
        let bad = MemoryLayout::new(
            4096,
            vec![RegionMap {
                host_addr: 0x1000,
                file_offset: 0,
                len: 100,
            }],
        );
        assert!(matches!(bad, Err(EvictError::Layout(_))));
        let overlap = MemoryLayout::new(
            4096,
            vec![
                RegionMap {
                    host_addr: 0x1000,
                    file_offset: 0,
                    len: 8192,
                },
                RegionMap {
                    host_addr: 0x10000,
                    file_offset: 4096,
                    len: 4096,
                },
            ],
        );
        assert!(matches!(overlap, Err(EvictError::Layout(_))));
    }

    proptest::proptest! {
        /// Runs cover exactly the given pages, in order, each contiguous in file and address
        /// space and inside one region, and maximal (adjacent runs cannot be merged).
        #[test]
        fn runs_cover_exactly_and_are_maximal(
            picks in proptest::collection::btree_set(0u64..12, 0..12)
        ) {
            let l = two_regions();
            let pages: Vec<u64> = picks.into_iter().collect();
            let runs = l.runs(&pages).unwrap();
            let covered: Vec<u64> = runs.iter().flat_map(|r| r.page_range()).collect();
            proptest::prop_assert_eq!(&covered, &pages);
            for r in &runs {
                proptest::prop_assert_eq!(Some(r.host_addr), l.host_addr(r.first_page));
                let last = r.first_page + r.pages - 1;
                proptest::prop_assert_eq!(
                    l.host_addr(last),
                    Some(r.host_addr + (r.pages - 1) * 4096)
                );
                proptest::prop_assert_eq!(r.file_offset, r.first_page * 4096);
            }
            for w in runs.windows(2) {
                let mergeable = w[0].first_page + w[0].pages == w[1].first_page
                    && w[0].host_addr + w[0].byte_len(4096) == w[1].host_addr;
                proptest::prop_assert!(!mergeable);
            }
        }
    }
}
