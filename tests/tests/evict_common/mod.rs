//! Shared harness of the `evict_*` tests: a memfd-backed "guest" registered MISSING|WP with
//! a real userfaultfd, a fault-handler thread that serves it like the daemon's fault loop,
//! and a durable file page store.

#![allow(dead_code)]

pub mod real_loop;
pub mod write_flavours;

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pager::dirty::{resolve_write_fault, Subscription, WriteFaultAction, WriteTracker};
use pager::evict::{forget_removed, EvictionTarget, PageStore, StoreError};
use pager::layout::{GuestLayout, Region};
use pager::page_state::{PageState, PageStateTable};
use pager::wss::{WorkingSetTracker, WssConfig, WssSample};
use uffd::{CopyError, Event, Features, PlaceMode, RegisterMode, Uffd, UffdFlags};

pub const PAGE: usize = 4096;

/// A page store in a plain file: page `p` at offset `p * PAGE`, `fdatasync` before
/// acknowledging. Forgotten pages are punched out of the file.
pub struct FileStore {
    _dir: tempfile::TempDir,
    inner: Mutex<(File, HashSet<u64>)>,
}

impl FileStore {
    pub fn new() -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("store"))?;
        Ok(Self {
            _dir: dir,
            inner: Mutex::new((file, HashSet::new())),
        })
    }

    pub fn holds(&self, page: u64) -> bool {
        self.inner.lock().unwrap().1.contains(&page)
    }

    /// The stored content of `page`, or None if it was never stored (or forgotten).
    pub fn read_page(&self, page: u64, out: &mut [u8]) -> std::io::Result<bool> {
        let inner = self.inner.lock().unwrap();
        if !inner.1.contains(&page) {
            return Ok(false);
        }
        inner.0.read_exact_at(out, page * PAGE as u64)?;
        Ok(true)
    }
}

impl PageStore for FileStore {
    fn store_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap();
        for (p, data) in pages {
            inner.0.write_all_at(data, p * PAGE as u64)?;
        }
        inner.0.sync_data()?;
        inner.1.extend(pages.iter().map(|(p, _)| *p));
        Ok(())
    }

    fn forget_pages(&self, pages: &[u64]) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap();
        for &p in pages {
            if inner.1.remove(&p) {
                fallocate(
                    inner.0.as_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    (p * PAGE as u64) as i64,
                    PAGE as i64,
                )?;
            }
        }
        Ok(())
    }
}

/// Guest RAM: a memfd mapped shared, registered MISSING|WP.
pub struct Guest {
    pub memfd: File,
    map: memmap2::MmapRaw,
    pub uffd: Uffd,
    pub layout: GuestLayout,
    pub states: PageStateTable,
    /// The VM's write log (the handler marks it on WP faults).
    pub writes: WriteTracker,
    /// The working-set tracker's (and victim selection's) subscription to it.
    pub wss_writes: Subscription,
    pub tracker: WorkingSetTracker,
    pub store: FileStore,
}

impl Guest {
    /// `pages` pages; word 0 of each page is 0, word 1 is `page + 1`, the rest 0xA5.
    pub fn new(pages: u64) -> anyhow::Result<Self> {
        Self::with_features(pages, Features::empty())
    }

    /// [`Guest::new`] with `extra` uffd features (e.g. `WP_ASYNC`, which makes the kernel
    /// resolve write-protect faults itself).
    pub fn with_features(pages: u64, extra: Features) -> anyhow::Result<Self> {
        let fd = nix::sys::memfd::memfd_create(
            c"pw-evict-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        let memfd = File::from(fd);
        let len = pages * PAGE as u64;
        memfd.set_len(len)?;
        let mut page = vec![0xA5u8; PAGE];
        for p in 0..pages {
            page[..8].copy_from_slice(&0u64.to_ne_bytes());
            page[8..16].copy_from_slice(&(p + 1).to_ne_bytes());
            memfd.write_all_at(&page, p * PAGE as u64)?;
        }
        let map = memmap2::MmapOptions::new()
            .len(len as usize)
            .map_raw(&memfd)?;
        let uffd = Uffd::new(UffdFlags {
            nonblocking: true,
            ..Default::default()
        })?;
        uffd.api(
            Features::EVENT_REMOVE
                | Features::MISSING_SHMEM
                | Features::WP_HUGETLBFS_SHMEM
                | Features::WP_UNPOPULATED
                | extra,
        )?;
        let base = map.as_ptr() as u64;
        uffd.register(base, len, RegisterMode::MISSING | RegisterMode::WP)?;
        let layout = GuestLayout::new(
            PAGE,
            vec![Region {
                host_addr: base,
                size: len,
                offset: 0,
            }],
        )?;
        let states = PageStateTable::new(pages as usize, PageState::Present);
        let tracker = WorkingSetTracker::new(&states, WssConfig::default());
        let writes = WriteTracker::new(pages as usize);
        let wss_writes = writes.subscribe(Default::default())?;
        Ok(Self {
            memfd,
            map,
            uffd,
            layout,
            states,
            writes,
            wss_writes,
            tracker,
            store: FileStore::new()?,
        })
    }

    fn addr(&self, page: u64) -> u64 {
        self.map.as_ptr() as u64 + page * PAGE as u64
    }

    /// Word 0 of `page`, through the registered mapping.
    pub fn word(&self, page: u64) -> &AtomicU64 {
        assert!((page as usize) < self.states.len());
        // SAFETY: the address is inside our live shared mapping, 8-byte aligned (page
        // aligned), and only ever accessed atomically by these tests.
        unsafe { &*(self.addr(page) as *const AtomicU64) }
    }

    /// Word 1 of `page` (its tag: page + 1 as created).
    pub fn tag(&self, page: u64) -> u64 {
        // SAFETY: as in `word`, one word further into the same page.
        unsafe { &*((self.addr(page) + 8) as *const AtomicU64) }.load(Ordering::SeqCst)
    }

    pub fn eviction_target(&self) -> EvictionTarget<'_> {
        EvictionTarget {
            uffd: &self.uffd,
            memory_file: self.memfd.as_fd(),
            layout: &self.layout,
            states: &self.states,
            store: &self.store,
            tracker: Some(&self.tracker),
            writes: Some(&self.writes),
        }
    }

    pub fn protect_and_sample(&self) -> anyhow::Result<WssSample> {
        Ok(pager::evict::protect_and_sample(
            &self.uffd,
            &self.layout,
            &self.states,
            &self.wss_writes,
            &self.tracker,
        )?)
    }

    /// The guest frees `pages` the way QEMU discards RAM: madvise(MADV_REMOVE). Blocks until
    /// the handler has read the REMOVE event.
    pub fn discard(&self, pages: std::ops::Range<u64>) -> anyhow::Result<()> {
        // SAFETY: the range lies inside our own mapping; MADV_REMOVE frees the backing pages,
        // which later accesses see as zero pages (served by the handler).
        let rc = unsafe {
            libc::madvise(
                self.addr(pages.start) as *mut libc::c_void,
                ((pages.end - pages.start) as usize) * PAGE,
                libc::MADV_REMOVE,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "madvise(MADV_REMOVE): {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Deliberately broken eviction for the negative test: every step of the real protocol
    /// EXCEPT the write-protect. Returns pages evicted.
    pub fn evict_without_write_protect(
        &self,
        pages: &[u64],
        buf: &mut Vec<u8>,
    ) -> anyhow::Result<u64> {
        evict_without_write_protect(
            &self.states,
            self.memfd.as_fd(),
            &self.store,
            &self.uffd,
            &|p| self.addr(p),
            pages,
            buf,
        )
    }
}

/// The broken eviction of the negative controls, for any guest: claim, read, store, punch,
/// publish, wake, but no write-protect, so a write between the read and the punch is lost.
pub fn evict_without_write_protect(
    states: &PageStateTable,
    memory_file: std::os::fd::BorrowedFd<'_>,
    store: &dyn PageStore,
    uffd: &Uffd,
    host_addr: &dyn Fn(u64) -> u64,
    pages: &[u64],
    buf: &mut Vec<u8>,
) -> anyhow::Result<u64> {
    let mut n = 0;
    buf.resize(PAGE, 0);
    for &p in pages {
        if states
            .transition(p, PageState::Present, PageState::Evicting)
            .is_err()
        {
            continue;
        }
        let got = nix::sys::uio::pread(memory_file, buf, (p * PAGE as u64) as i64)?;
        anyhow::ensure!(got == PAGE, "short read of page {p}");
        store
            .store_pages(&[(p, &buf[..])])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        fallocate(
            memory_file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (p * PAGE as u64) as i64,
            PAGE as i64,
        )?;
        states.set(p, PageState::Evicted);
        uffd.wake(host_addr(p), PAGE as u64)?;
        n += 1;
    }
    Ok(n)
}

/// What the fault handler did.
#[derive(Debug, Default, Clone, Copy)]
pub struct HandlerCounts {
    pub tracked: u64,
    pub held_for_eviction: u64,
    pub released: u64,
    pub refaults: u64,
    pub zero_fills: u64,
    pub missing_held: u64,
    pub woken: u64,
    pub removes: u64,
}

/// A fault-handler thread serving a [`Guest`] the way the daemon's fault loop does.
pub struct Handler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<HandlerCounts>,
}

impl Handler {
    pub fn spawn(guest: Arc<Guest>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || serve(&guest, &s));
        Self { stop, thread }
    }

    pub fn stop(self) -> HandlerCounts {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("fault handler panicked")
    }
}

fn place(g: &Guest, page: u64, addr: u64, data: &[u8]) {
    match g.uffd.copy_from(addr, data, PlaceMode::default()) {
        Ok(_) | Err(CopyError::Exists { .. }) => {}
        Err(e) => panic!("placing page {page}: {e}"),
    }
}

fn serve(g: &Guest, stop: &AtomicBool) -> HandlerCounts {
    let mut c = HandlerCounts::default();
    let mut events = Vec::new();
    let mut buf = vec![0u8; PAGE];
    let zero = vec![0u8; PAGE];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(g.uffd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(20u16)).expect("poll uffd") == 0 {
            continue;
        }
        events.clear();
        g.uffd
            .read_events(&mut events, 64)
            .expect("read uffd events");
        for ev in events.drain(..) {
            match ev {
                Event::PageFault { addr, wp, .. } => {
                    let page = g.layout.page_of_addr(addr).expect("fault outside guest");
                    let page_addr = g.layout.addr_of_page(page).unwrap();
                    if wp {
                        match resolve_write_fault(
                            &g.uffd,
                            &g.states,
                            &g.writes,
                            page,
                            page_addr,
                            PAGE as u64,
                        )
                        .expect("write fault")
                        {
                            WriteFaultAction::Tracked => c.tracked += 1,
                            WriteFaultAction::HeldForEviction => c.held_for_eviction += 1,
                            WriteFaultAction::Released(_) => c.released += 1,
                        }
                        continue;
                    }
                    match g.states.get(page) {
                        s @ (PageState::Evicted | PageState::Zero) => {
                            g.states
                                .transition(page, s, PageState::InFlight)
                                .expect("only the handler moves absent pages");
                            let data = if s == PageState::Zero {
                                &zero[..]
                            } else if g.store.read_page(page, &mut buf).expect("store read") {
                                &buf[..]
                            } else {
                                panic!("evicted page {page} is not in the store")
                            };
                            place(g, page, page_addr, data);
                            g.states.set(page, PageState::Present);
                            c.refaults += 1;
                        }
                        s @ (PageState::Missing | PageState::Removed) => {
                            g.states
                                .transition(page, s, PageState::InFlight)
                                .expect("only the handler moves absent pages");
                            place(g, page, page_addr, &zero);
                            g.states.set(page, PageState::Present);
                            c.zero_fills += 1;
                        }
                        PageState::Evicting => c.missing_held += 1,
                        PageState::Present | PageState::InFlight => {
                            g.uffd.wake(page_addr, PAGE as u64).expect("wake");
                            c.woken += 1;
                        }
                    }
                }
                Event::Remove { start, end } => {
                    let first = g.layout.page_of_addr(start).expect("remove outside guest");
                    let last = g
                        .layout
                        .page_of_addr(end - 1)
                        .expect("remove outside guest");
                    forget_removed(&g.states, &g.store, first..last + 1).expect("forget");
                    c.removes += 1;
                }
                other => panic!("unexpected uffd event {other:?}"),
            }
        }
    }
    c
}
