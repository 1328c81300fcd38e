//! Where the source reads one guest page: the memory file for resident pages (in agile, a
//! resident page that still holds its copy in the shared swap device is `Stored`); for
//! absent ones the store its state and route name: an evicted page is in the VM's own swap
//! device, a never-faulted page in the store its route names (the VM's own swap device, or
//! on a former agile destination the shared device handed over to it); nothing for pages no
//! store holds (zero) or the guest freed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use pager::page_state::PageState;
use pager::route::Route;
use pager::vm::Vm;
use swapdev::{PageData, SwapDevice};

use super::source::journal::Where;
use crate::migrate::bulk::SourcePage;

/// Longest wait for an in-flight placement before a page is read ([`SourcePages::read`]).
const PLACEMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub type SharedDevice = Arc<Mutex<SwapDevice>>;

pub(super) struct SourcePages {
    vm: Arc<Vm>,
    memory: File,
    /// The VM's own swap device (where its evictions go).
    own: Option<SharedDevice>,
    /// The device handed over to this host by an earlier agile migration (`Route::Local`).
    handed_over: Option<SharedDevice>,
    /// The device the destination will read (agile): pages whose copy is there are
    /// [`SourcePage::Stored`], never sent.
    shared: Option<SharedDevice>,
}

fn io_error(e: swapdev::SwapError) -> std::io::Error {
    std::io::Error::other(e)
}

fn lock(d: &SharedDevice) -> std::sync::MutexGuard<'_, SwapDevice> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl SourcePages {
    pub fn new(
        vm: Arc<Vm>,
        handed_over: Option<SharedDevice>,
        shared: Option<SharedDevice>,
    ) -> std::io::Result<Self> {
        let fd = vm.memory_file.as_ref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the VM has no memory file (only file-backed guests migrate)",
            )
        })?;
        let memory = File::from(fd.try_clone()?);
        Ok(Self {
            own: vm.swapdev.clone(),
            vm,
            memory,
            handed_over,
            shared,
        })
    }

    pub fn page_size(&self) -> usize {
        self.vm.layout.page_size()
    }

    /// The store holding absent page `p`'s current copy, if any.
    fn store_of(&self, p: u64, state: PageState) -> Option<&SharedDevice> {
        if state == PageState::Evicted {
            return self.own.as_ref();
        }
        match self.vm.routes.get(p) {
            Some(Route::Local) => self.handed_over.as_ref(),
            Some(Route::Swapdev) => self.own.as_ref(),
            _ => None,
        }
    }

    /// Whether some store holds absent page `p` (else it reads as zero).
    pub fn in_a_store(&self, p: u64) -> bool {
        let state = self.vm.states.get(p);
        self.store_of(p, state).is_some_and(|d| lock(d).contains(p))
    }

    /// Whether absent page `p`'s copy is in the device the destination reads (agile).
    pub fn stored(&self, p: u64) -> bool {
        let state = self.vm.states.get(p);
        match (self.store_of(p, state), &self.shared) {
            (Some(store), Some(shared)) if Arc::ptr_eq(store, shared) => lock(store).contains(p),
            _ => false,
        }
    }

    /// Whether resident page `p` holds exactly its copy in the VM's own swap device (placed
    /// from it write-protected, not written since) and that device is the one the
    /// destination reads. A write after this answer faults first and is recorded by the
    /// migration's write tracking, so the page goes again.
    pub fn device_copy_shared(&self, p: u64) -> bool {
        match (&self.own, &self.shared) {
            (Some(own), Some(shared)) if Arc::ptr_eq(own, shared) => {
                self.vm.dirty.device_copy_current(p) && lock(own).contains(p)
            }
            _ => false,
        }
    }

    /// Read page `p` into `buf`. With `stored_ok`, an absent page whose copy is in the
    /// device the destination reads is answered [`SourcePage::Stored`] without reading it.
    pub fn read(&self, p: u64, buf: &mut [u8], stored_ok: bool) -> std::io::Result<SourcePage> {
        let offset = p * self.page_size() as u64;
        let state = self.settled_state(p)?;
        match state {
            PageState::Present if stored_ok && self.device_copy_shared(p) => {
                return Ok(SourcePage::Stored);
            }
            // (`settled_state` never answers InFlight.)
            PageState::Present | PageState::InFlight | PageState::Evicting => {
                self.memory.read_exact_at(buf, offset)?;
            }
            PageState::Removed => return Ok(SourcePage::Freed),
            PageState::Missing | PageState::Evicted | PageState::Zero => {
                let Some(store) = self.store_of(p, state) else {
                    return Ok(SourcePage::Zero);
                };
                if stored_ok && self.stored(p) {
                    return Ok(SourcePage::Stored);
                }
                let mut dev = lock(store);
                if !dev.contains(p) {
                    return Ok(SourcePage::Zero);
                }
                match dev.read_page(p).map_err(io_error)? {
                    PageData::Data(data) => buf.copy_from_slice(data.as_slice()),
                    PageData::Zero | PageData::NotStored => return Ok(SourcePage::Zero),
                }
            }
        }
        Ok(if swapdev::is_zero_page(buf) {
            SourcePage::Zero
        } else {
            SourcePage::Data
        })
    }

    /// Page `p`'s state once no placement of it is in flight: an in-flight page's bytes are
    /// not in the memory file yet (a hole there reads as zeros), so it is read once they
    /// landed. A placement that takes longer than [`PLACEMENT_WAIT`] fails the read (the
    /// migration fails) rather than send a page that is not the guest's.
    fn settled_state(&self, p: u64) -> std::io::Result<PageState> {
        let mut state = self.vm.states.get(p);
        if state != PageState::InFlight {
            return Ok(state);
        }
        let start = std::time::Instant::now();
        while state == PageState::InFlight {
            if start.elapsed() > PLACEMENT_WAIT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "page {p}'s placement has been in flight for more than {} s; not \
                         sending what its memory holds before it lands",
                        PLACEMENT_WAIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
            state = self.vm.states.get(p);
        }
        Ok(state)
    }

    /// Pages whose placement is in flight (their bytes are not in the file yet).
    pub fn in_flight(&self) -> usize {
        self.vm.states.count(PageState::InFlight)
    }

    /// Where each page's current copy is, one [`Where`] byte per page: what a restarted
    /// source reads them from (`journal.rs`). Taken with the guest paused for good (after
    /// the last harvest): no page moves between the stores any more.
    pub fn snapshot_map(&self) -> std::io::Result<Vec<u8>> {
        let pages = self.vm.layout.pages();
        let mut map = Vec::with_capacity(usize::try_from(pages).unwrap_or(0));
        for p in 0..pages {
            let place = match self.settled_state(p)? {
                PageState::Present | PageState::InFlight | PageState::Evicting => Where::Memory,
                PageState::Removed => Where::Freed,
                state @ (PageState::Missing | PageState::Evicted | PageState::Zero) => {
                    match self.store_of(p, state) {
                        Some(store) if !lock(store).contains(p) => Where::Zero,
                        Some(store)
                            if self.shared.as_ref().is_some_and(|s| Arc::ptr_eq(s, store)) =>
                        {
                            Where::Shared
                        }
                        Some(store) if self.own.as_ref().is_some_and(|o| Arc::ptr_eq(o, store)) => {
                            Where::OwnDevice
                        }
                        Some(_) => Where::HandedOver,
                        None => Where::Zero,
                    }
                }
            };
            map.push(place as u8);
        }
        Ok(map)
    }
}

/// What the push after the switchover reads pages from: the live VM's stores
/// ([`SourcePages`]), or what a restarted source found of them (`source/restarted.rs`).
pub(super) trait PushSource: Send + Sync {
    /// Read page `p` into `buf` for the destination.
    fn read_for_push(&self, p: u64, buf: &mut [u8]) -> std::io::Result<SourcePage>;
    /// The guest's RAM file (punched once the destination holds every page).
    fn memory(&self) -> &File;
}

impl PushSource for SourcePages {
    fn read_for_push(&self, p: u64, buf: &mut [u8]) -> std::io::Result<SourcePage> {
        self.read(p, buf, false)
    }
    fn memory(&self) -> &File {
        &self.memory
    }
}
