//! A memfd "guest" registered MISSING|WP and served by the pager's real
//! `pager::fault_loop::FaultLoop` from a raw memory image; eviction stores into that same
//! image (`ImageFileStore`), so evicted pages come back through the real fault path.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::evict::{EvictionTarget, ImageFileStore, PageStore};
use pager::fault_loop::{FaultLoop, FaultLoopConfig, FaultLoopError, LoopExit};
use pager::page_state::PageStateTable;
use pager::source::ImageFileSource;
use pager::vm::{GuestLayout, Vm};
use pager::wss::WorkingSetTracker;
use uffd::Features;

use super::PAGE;

/// The guest, its VM state and the fault-loop thread serving it.
pub struct LoopGuest {
    pub map: memmap2::MmapRaw,
    pub vm: Arc<Vm>,
    pub pages: u64,
    stop: Arc<EventFd>,
    fault_loop: Option<JoinHandle<Result<LoopExit, FaultLoopError>>>,
    _image: tempfile::NamedTempFile,
    pub image_path: std::path::PathBuf,
}

impl LoopGuest {
    /// `pages` pages, every one `Missing` (absent from the memfd). With `tagged`, the image
    /// holds word 1 = page + 1 in every page (first touches read it from the image);
    /// otherwise the image is all zeros.
    pub fn start(pages: u64, tagged: bool) -> anyhow::Result<Self> {
        let len = pages * PAGE as u64;
        let (map, _memfd, vm) =
            pagewise_tools::lab_vm::MemfdVm::new("evict-loop", pages, PAGE, Features::empty())?
                .into_shared();
        let image = tempfile::NamedTempFile::new()?;
        image.as_file().set_len(len)?;
        if tagged {
            for p in 0..pages {
                image
                    .as_file()
                    .write_all_at(&(p + 1).to_ne_bytes(), p * PAGE as u64 + 8)?;
            }
        }
        let image_path = image.path().to_path_buf();
        let source = ImageFileSource::open(&image_path, PAGE, pages)?;
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
        let fl = FaultLoop::new(
            vm.clone(),
            Box::new(source),
            pager::prefetch::by_name("none", pages)?,
            FaultLoopConfig::default(),
            stop.clone(),
            None,
        )?;
        let fault_loop = Some(std::thread::spawn(move || fl.run()));
        Ok(Self {
            map,
            vm,
            pages,
            stop,
            fault_loop,
            _image: image,
            image_path,
        })
    }

    /// Word `w` of `page`, through the registered mapping.
    pub fn word(&self, page: u64, w: u64) -> &AtomicU64 {
        assert!(page < self.pages && w < (PAGE / 8) as u64);
        // SAFETY: inside our live shared mapping, 8-byte aligned, only accessed atomically.
        unsafe { &*((self.map.as_ptr() as u64 + page * PAGE as u64 + w * 8) as *const AtomicU64) }
    }

    pub fn host_addr(&self, page: u64) -> u64 {
        self.map.as_ptr() as u64 + page * PAGE as u64
    }

    /// The store eviction writes into: the image the fault loop reads `Evicted` pages from.
    pub fn store(&self) -> anyhow::Result<ImageFileStore> {
        ImageFileStore::open(&self.image_path, PAGE, self.pages).map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn layout(&self) -> GuestLayout {
        self.vm.layout.clone()
    }

    pub fn states(&self) -> &PageStateTable {
        &self.vm.states
    }

    /// An eviction target for this guest's VM state.
    pub fn eviction_target<'a>(
        &'a self,
        layout: &'a GuestLayout,
        store: &'a dyn PageStore,
        tracker: &'a WorkingSetTracker,
    ) -> EvictionTarget<'a> {
        EvictionTarget {
            uffd: &self.vm.uffd,
            memory_file: self
                .vm
                .memory_file
                .as_ref()
                .expect("started with a memory file")
                .as_fd(),
            layout,
            states: &self.vm.states,
            store,
            tracker: Some(tracker),
            writes: Some(&self.vm.dirty),
        }
    }

    /// Stop the fault loop and return how it ended.
    pub fn stop(&mut self) -> LoopExit {
        self.stop.write(1).expect("signal the fault loop");
        self.fault_loop
            .take()
            .expect("stopped once")
            .join()
            .expect("fault loop panicked")
            .expect("fault loop failed")
    }
}

impl Drop for LoopGuest {
    fn drop(&mut self) {
        if self.fault_loop.is_some() {
            let _ = self.stop.write(1);
            if let Some(t) = self.fault_loop.take() {
                let _ = t.join();
            }
        }
    }
}
