//! Per-VM state shared (behind an `Arc`) by the fault loop, the control socket and other
//! components (evictor, working-set tracker, migration).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use uffd::Uffd;

use crate::attach::protocol::{validate_regions, GuestRegionUffdMapping, HandshakeError};
use crate::dirty::DirtyBitmap;
use crate::metrics::VmMetrics;
use crate::page_state::{PageState, PageStateTable};
use crate::route::{Route, RouteTable};

/// One guest memory region as the pager sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Host virtual address in the VMM's address space.
    pub host_addr: u64,
    pub size: u64,
    /// Byte offset in the guest memory file / swap device.
    pub offset: u64,
}

/// Problems with a VM's memory layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Region(#[from] HandshakeError),
    #[error("regions use different page sizes ({first} and {other}); one page size per VM")]
    MixedPageSizes { first: usize, other: usize },
    #[error("region {index} at offset {offset:#x} overlaps another region's offsets")]
    OverlappingOffsets { index: usize, offset: u64 },
}

/// The guest's regions and the mapping host address <-> guest page index.
///
/// Guest page index = memory-file offset / page size, the same index the swap device and the
/// page-state table use.
#[derive(Debug, Clone)]
pub struct GuestLayout {
    /// Sorted by host address.
    by_addr: Vec<Region>,
    /// Sorted by file offset.
    by_offset: Vec<Region>,
    page_size: u64,
    pages: u64,
}

impl GuestLayout {
    /// Validate handshake regions (alignment, overlap, page size) and build the layout.
    pub fn from_mappings(mappings: &[GuestRegionUffdMapping]) -> Result<Self, LayoutError> {
        validate_regions(mappings)?;
        let first = mappings[0].effective_page_size();
        if let Some(m) = mappings.iter().find(|m| m.effective_page_size() != first) {
            return Err(LayoutError::MixedPageSizes {
                first,
                other: m.effective_page_size(),
            });
        }
        let regions: Vec<Region> = mappings
            .iter()
            .map(|m| Region {
                host_addr: m.base_host_virt_addr,
                size: m.size as u64,
                offset: m.offset,
            })
            .collect();
        let mut by_offset = regions.clone();
        by_offset.sort_by_key(|r| r.offset);
        for (i, w) in by_offset.windows(2).enumerate() {
            if w[0].offset + w[0].size > w[1].offset {
                return Err(LayoutError::OverlappingOffsets {
                    index: i + 1,
                    offset: w[1].offset,
                });
            }
        }
        let mut by_addr = regions;
        by_addr.sort_by_key(|r| r.host_addr);
        let page_size = first as u64;
        let pages = by_offset
            .iter()
            .map(|r| (r.offset + r.size) / page_size)
            .max()
            .unwrap_or(0);
        Ok(Self {
            by_addr,
            by_offset,
            page_size,
            pages,
        })
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Number of guest pages (highest region end offset / page size).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of guest address space the regions cover (end of the last region's offsets).
    pub fn span_bytes(&self) -> u64 {
        self.pages * self.page_size
    }

    pub fn regions(&self) -> &[Region] {
        &self.by_addr
    }

    fn region_of_addr(&self, addr: u64) -> Option<&Region> {
        let i = self.by_addr.partition_point(|r| r.host_addr <= addr);
        let r = self.by_addr.get(i.checked_sub(1)?)?;
        (addr < r.host_addr + r.size).then_some(r)
    }

    /// Guest page index of host address `addr`, if it lies in a region.
    pub fn page_of_addr(&self, addr: u64) -> Option<u64> {
        let r = self.region_of_addr(addr)?;
        Some((r.offset + (addr - r.host_addr)) / self.page_size)
    }

    /// Host address of guest page `page`, if a region covers it.
    pub fn addr_of_page(&self, page: u64) -> Option<u64> {
        let off = page.checked_mul(self.page_size)?;
        let i = self.by_offset.partition_point(|r| r.offset <= off);
        let r = self.by_offset.get(i.checked_sub(1)?)?;
        (off < r.offset + r.size).then(|| r.host_addr + (off - r.offset))
    }

    /// Byte offset of `page` in the memory file / swap device.
    pub fn file_offset(&self, page: u64) -> u64 {
        page * self.page_size
    }

    /// Guest pages whose host pages lie entirely inside `[start, end)`, as index ranges
    /// (one per region touched).
    pub fn pages_in_host_range(&self, start: u64, end: u64) -> Vec<std::ops::Range<u64>> {
        let mut out = Vec::new();
        for r in &self.by_addr {
            let lo = start.max(r.host_addr);
            let hi = end.min(r.host_addr + r.size);
            if lo >= hi {
                continue;
            }
            let first = (r.offset + (lo - r.host_addr)).div_ceil(self.page_size);
            let last = (r.offset + (hi - r.host_addr)) / self.page_size;
            if first < last {
                out.push(first..last);
            }
        }
        out
    }
}

/// Who attached the VM (SO_PEERCRED of the attach connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    pub pid: i32,
    pub uid: u32,
}

/// Everything other components need about one attached VM.
pub struct Vm {
    pub name: String,
    /// The VM's userfaultfd (write_protect / wake from other threads is fine: ioctls on one
    /// uffd may run concurrently).
    pub uffd: Uffd,
    pub layout: GuestLayout,
    /// The guest memory file (shmem/hugetlbfs), when the VMM sent one.
    pub memory_file: Option<OwnedFd>,
    pub states: PageStateTable,
    /// Who answers for each absent page (every page `Route::Swapdev` unless a migration
    /// agent's `prepare`/`seed` routed it elsewhere).
    pub routes: RouteTable,
    pub dirty: DirtyBitmap,
    pub metrics: VmMetrics,
    pub peer: PeerInfo,
    /// Whether the VMM registered the memory with WP too (write tracking/eviction possible).
    pub wp_registered: bool,
    /// Human description of the page source (swap device path).
    pub source_description: String,
    /// The VM's swap device, shared with the evictor (write_pages/flush while faults are
    /// served). `None` when the source is not a swap device.
    pub swapdev: Option<Arc<Mutex<swapdev::SwapDevice>>>,
    pub attached_at: SystemTime,
}

impl Vm {
    /// A fresh VM: every page `Missing`, nothing dirty.
    pub fn new(
        name: String,
        uffd: Uffd,
        layout: GuestLayout,
        memory_file: Option<OwnedFd>,
        peer: PeerInfo,
    ) -> Self {
        let pages = layout.pages() as usize;
        Self {
            name,
            uffd,
            layout,
            memory_file,
            states: PageStateTable::new(pages, PageState::Missing),
            routes: RouteTable::new(pages, Route::Swapdev),
            dirty: DirtyBitmap::new(pages),
            metrics: VmMetrics::default(),
            peer,
            wp_registered: false,
            source_description: String::new(),
            swapdev: None,
            attached_at: SystemTime::now(),
        }
    }

    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(addr: u64, size: usize, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: addr,
            size,
            offset,
            page_size: 4096,
            page_size_kib: 4096,
        }
    }

    #[test]
    fn maps_addresses_and_pages_both_ways() {
        let l = GuestLayout::from_mappings(&[
            m(0x9000_0000, 0x2000, 0x4000),
            m(0x1000_0000, 0x4000, 0),
        ])
        .unwrap();
        assert_eq!(l.pages(), 6);
        assert_eq!(l.page_of_addr(0x1000_0000), Some(0));
        assert_eq!(l.page_of_addr(0x1000_3fff), Some(3));
        assert_eq!(l.page_of_addr(0x1000_4000), None);
        assert_eq!(l.page_of_addr(0x9000_1000), Some(5));
        assert_eq!(l.page_of_addr(0x0fff_ffff), None);
        assert_eq!(l.addr_of_page(4), Some(0x9000_0000));
        assert_eq!(l.addr_of_page(3), Some(0x1000_3000));
        assert_eq!(l.addr_of_page(6), None);
        assert_eq!(
            l.pages_in_host_range(0x1000_1000, 0x9000_1000),
            vec![1..4, 4..5]
        );
    }

    #[test]
    fn refuses_overlapping_offsets_and_mixed_page_sizes() {
        assert!(matches!(
            GuestLayout::from_mappings(&[
                m(0x1000_0000, 0x2000, 0),
                m(0x2000_0000, 0x2000, 0x1000)
            ]),
            Err(LayoutError::OverlappingOffsets { .. })
        ));
        let mut huge = m(0x4000_0000, 2 << 20, 2 << 20);
        huge.page_size = 2 << 20;
        assert!(matches!(
            GuestLayout::from_mappings(&[m(0x1000_0000, 0x2000, 0), huge]),
            Err(LayoutError::MixedPageSizes { .. })
        ));
    }
}
