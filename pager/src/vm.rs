//! Per-VM state shared (behind an `Arc`) by the fault loop, the control socket and other
//! components (evictor, working-set tracker, migration).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use uffd::Uffd;

use crate::dirty::WriteTracker;
/// The layout types, re-exported here because every [`Vm`] carries one.
pub use crate::layout::{GuestLayout, LayoutError, Region};
use crate::metrics::VmMetrics;
use crate::page_state::{PageState, PageStateTable};
use crate::route::{Route, RouteTable};

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
    /// Which source answers each absent page (see [`crate::route`]).
    pub routes: RouteTable,
    pub dirty: WriteTracker,
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
    /// The first damaged page a guest thread waited on (see [`crate::damage`]).
    pub damage: crate::damage::DamageRecord,
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
            dirty: WriteTracker::new(pages),
            metrics: VmMetrics::default(),
            peer,
            wp_registered: false,
            source_description: String::new(),
            swapdev: None,
            attached_at: SystemTime::now(),
            damage: Default::default(),
        }
    }

    /// Write-protect the whole guest, one `UFFDIO_WRITEPROTECT` per region.
    pub fn write_protect_all(&self) -> Result<(), uffd::UffdError> {
        protect_all(&self.uffd, &self.layout)
    }

    /// Write-protect `pages` (those with a host address; others are skipped), one
    /// `UFFDIO_WRITEPROTECT` per contiguous run. Every later write to them faults to the loop
    /// and is recorded by write tracking.
    pub fn write_protect_pages(&self, pages: &[u64]) -> Result<(), uffd::UffdError> {
        let mapped: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&p| self.layout.addr_of_page(p).is_some())
            .collect();
        let runs = self
            .layout
            .runs(&mapped)
            .expect("only pages with a host address are left");
        let ps = self.layout.page_size();
        for run in runs {
            self.uffd
                .write_protect(run.host_addr, run.byte_len(ps), true, false)?;
        }
        Ok(())
    }

    pub fn page_size(&self) -> u64 {
        self.layout.page_size() as u64
    }
}

/// Write-protect every region of `layout` through `uffd`.
pub fn protect_all(uffd: &Uffd, layout: &GuestLayout) -> Result<(), uffd::UffdError> {
    let ps = layout.page_size();
    for run in layout.all_runs() {
        uffd.write_protect(run.host_addr, run.byte_len(ps), true, false)?;
    }
    Ok(())
}
