//! A VM's guest memory layout: its regions as the VMM sent them in the attach handshake,
//! guest page index (memory-file offset / page size) <-> host virtual address in the VMM's
//! mapping, and grouping of page lists into runs contiguous in both, so each syscall covers
//! as many pages as possible.
//!
//! Every value here comes from the VMM. The constructor checks all the arithmetic the
//! lookups do later (address + size, offset + size), so the lookups cannot overflow.

use std::ops::Range;

use crate::attach::protocol::{validate_regions, GuestRegionUffdMapping, HandshakeError};

/// One guest memory region: `size` bytes at memory-file offset `offset`, mapped at
/// `host_addr` in the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Host virtual address in the VMM's address space.
    pub host_addr: u64,
    pub size: u64,
    /// Byte offset in the guest memory file / swap device.
    pub offset: u64,
}

impl Region {
    /// End of the region in the VMM's address space (checked at construction).
    fn host_end(&self) -> u64 {
        self.host_addr + self.size
    }

    /// End of the region in the memory file (checked at construction).
    fn file_end(&self) -> u64 {
        self.offset + self.size
    }
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

    pub fn page_range(&self) -> Range<u64> {
        self.first_page..self.first_page + self.pages
    }
}

/// Problems with a VM's memory layout. Regions are named by their index in the handshake.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Region(#[from] HandshakeError),
    #[error("no guest memory regions")]
    NoRegions,
    #[error("page size {0} is not a power of two >= 4096")]
    BadPageSize(usize),
    #[error("regions use different page sizes ({first} and {other}); one page size per VM")]
    MixedPageSizes { first: usize, other: usize },
    #[error(
        "region {index} (address {host_addr:#x}, offset {offset:#x}, {size} bytes) is empty or \
         not aligned to the page size {page_size}"
    )]
    Unaligned {
        index: usize,
        host_addr: u64,
        offset: u64,
        size: u64,
        page_size: usize,
    },
    #[error("region {index}: {what} {start:#x} + size {size:#x} overflows u64")]
    Overflow {
        index: usize,
        /// "address" or "offset".
        what: &'static str,
        start: u64,
        size: u64,
    },
    #[error("region {index} at offset {offset:#x} overlaps another region's offsets")]
    OverlappingOffsets { index: usize, offset: u64 },
    #[error("region {index} at address {host_addr:#x} overlaps another region's addresses")]
    OverlappingAddresses { index: usize, host_addr: u64 },
    #[error(
        "guest memory region {index} (offset {offset:#x}, {size} bytes) ends at byte {end}, past \
         the end of {store} ({capacity} bytes)"
    )]
    PastStoreEnd {
        index: usize,
        offset: u64,
        size: u64,
        end: u64,
        store: String,
        capacity: u64,
    },
    #[error("guest page {page} is outside every guest memory region")]
    PageOutOfRange { page: u64 },
}

/// The guest's regions and the mappings guest page <-> host address <-> file offset.
///
/// Guest page index = memory-file offset / page size, the same index the swap device and the
/// page-state table use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    /// In handshake order (errors name regions by this index).
    regions: Vec<Region>,
    /// Indices into `regions`, sorted by host address.
    by_addr: Vec<usize>,
    /// Indices into `regions`, sorted by file offset.
    by_offset: Vec<usize>,
    page_size: usize,
    pages: u64,
}

impl GuestLayout {
    /// Validate handshake regions (alignment, overflow, overlap, page size) and build the
    /// layout.
    pub fn from_mappings(mappings: &[GuestRegionUffdMapping]) -> Result<Self, LayoutError> {
        validate_regions(mappings)?;
        let first = mappings[0].effective_page_size();
        if let Some(m) = mappings.iter().find(|m| m.effective_page_size() != first) {
            return Err(LayoutError::MixedPageSizes {
                first,
                other: m.effective_page_size(),
            });
        }
        let regions = mappings
            .iter()
            .map(|m| Region {
                host_addr: m.base_host_virt_addr,
                size: m.size as u64,
                offset: m.offset,
            })
            .collect();
        Self::new(first, regions)
    }

    /// A layout from regions (any order): each must be non-empty and page aligned, neither
    /// its address range nor its file range may overflow or overlap another region's.
    pub fn new(page_size: usize, regions: Vec<Region>) -> Result<Self, LayoutError> {
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(LayoutError::BadPageSize(page_size));
        }
        if regions.is_empty() {
            return Err(LayoutError::NoRegions);
        }
        let ps = page_size as u64;
        for (index, r) in regions.iter().enumerate() {
            if r.size == 0 || r.size % ps != 0 || r.offset % ps != 0 || r.host_addr % ps != 0 {
                return Err(LayoutError::Unaligned {
                    index,
                    host_addr: r.host_addr,
                    offset: r.offset,
                    size: r.size,
                    page_size,
                });
            }
            for (what, start) in [("address", r.host_addr), ("offset", r.offset)] {
                if start.checked_add(r.size).is_none() {
                    return Err(LayoutError::Overflow {
                        index,
                        what,
                        start,
                        size: r.size,
                    });
                }
            }
        }
        let mut by_offset: Vec<usize> = (0..regions.len()).collect();
        by_offset.sort_by_key(|&i| regions[i].offset);
        for w in by_offset.windows(2) {
            if regions[w[0]].file_end() > regions[w[1]].offset {
                return Err(LayoutError::OverlappingOffsets {
                    index: w[1],
                    offset: regions[w[1]].offset,
                });
            }
        }
        let mut by_addr: Vec<usize> = (0..regions.len()).collect();
        by_addr.sort_by_key(|&i| regions[i].host_addr);
        for w in by_addr.windows(2) {
            if regions[w[0]].host_end() > regions[w[1]].host_addr {
                return Err(LayoutError::OverlappingAddresses {
                    index: w[1],
                    host_addr: regions[w[1]].host_addr,
                });
            }
        }
        let pages = by_offset.last().map_or(0, |&i| regions[i].file_end() / ps);
        Ok(Self {
            regions,
            by_addr,
            by_offset,
            page_size,
            pages,
        })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Number of guest page indices (the page-state table's length): up to the end of the
    /// last region's offsets.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of guest address space the regions cover (end of the last region's offsets).
    pub fn span_bytes(&self) -> u64 {
        self.pages * self.page_size as u64
    }

    /// The regions, in handshake order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Refuse a layout whose regions do not all fit a store (swap device, memory file) of
    /// `capacity` bytes, naming the first region (in handshake order) that ends past it.
    pub fn check_fits(&self, store: &str, capacity: u64) -> Result<(), LayoutError> {
        match self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.file_end() > capacity)
        {
            None => Ok(()),
            Some((index, r)) => Err(LayoutError::PastStoreEnd {
                index,
                offset: r.offset,
                size: r.size,
                end: r.file_end(),
                store: store.to_string(),
                capacity,
            }),
        }
    }

    fn region_of_addr(&self, addr: u64) -> Option<&Region> {
        let i = self
            .by_addr
            .partition_point(|&i| self.regions[i].host_addr <= addr);
        let r = &self.regions[*self.by_addr.get(i.checked_sub(1)?)?];
        (addr < r.host_end()).then_some(r)
    }

    fn region_of_page(&self, page: u64) -> Option<&Region> {
        let off = page.checked_mul(self.page_size as u64)?;
        let i = self
            .by_offset
            .partition_point(|&i| self.regions[i].offset <= off);
        let r = &self.regions[*self.by_offset.get(i.checked_sub(1)?)?];
        (off < r.file_end()).then_some(r)
    }

    /// Guest page index of host address `addr` (e.g. a fault address), if a region maps it.
    pub fn page_of_addr(&self, addr: u64) -> Option<u64> {
        let r = self.region_of_addr(addr)?;
        Some((r.offset + (addr - r.host_addr)) / self.page_size as u64)
    }

    /// Host address of guest page `page`, if a region maps it.
    pub fn addr_of_page(&self, page: u64) -> Option<u64> {
        let r = self.region_of_page(page)?;
        Some(r.host_addr + (page * self.page_size as u64 - r.offset))
    }

    /// Byte offset of `page` in the memory file / swap device, if a region maps it.
    pub fn file_offset(&self, page: u64) -> Option<u64> {
        self.region_of_page(page)
            .map(|_| page * self.page_size as u64)
    }

    /// Guest pages whose host pages lie entirely inside `[start, end)`, as index ranges
    /// (one per region touched).
    pub fn pages_in_host_range(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let ps = self.page_size as u64;
        let mut out = Vec::new();
        for &i in &self.by_addr {
            let r = &self.regions[i];
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_end());
            if lo >= hi {
                continue;
            }
            let first = (r.offset + (lo - r.host_addr)).div_ceil(ps);
            let last = (r.offset + (hi - r.host_addr)) / ps;
            if first < last {
                out.push(first..last);
            }
        }
        out
    }

    /// Group ascending `pages` into runs contiguous in file and address space.
    pub fn runs(&self, pages: &[u64]) -> Result<Vec<Run>, LayoutError> {
        let ps = self.page_size as u64;
        let mut runs: Vec<Run> = Vec::new();
        for &page in pages {
            let host_addr = self
                .addr_of_page(page)
                .ok_or(LayoutError::PageOutOfRange { page })?;
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
                file_offset: page * ps,
            });
        }
        Ok(runs)
    }

    /// Every region as one run, in file order (for write-protecting the whole guest).
    pub fn all_runs(&self) -> Vec<Run> {
        let ps = self.page_size as u64;
        self.by_offset
            .iter()
            .map(|&i| {
                let r = &self.regions[i];
                Run {
                    first_page: r.offset / ps,
                    pages: r.size / ps,
                    host_addr: r.host_addr,
                    file_offset: r.offset,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
