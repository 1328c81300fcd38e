//! Eviction and working-set tracking for one attached VM of the daemon: owns the tracker and
//! its sampler thread, runs eviction requests (one at a time), and reports stats.

use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uffd::Uffd;

use super::sampler::{Sampler, SamplerTarget};
use super::{
    forget_removed, run_eviction, EvictError, EvictGoal, EvictProgress, EvictReport,
    EvictionTarget, PageStore, StoreError,
};
use crate::dirty::{SubscribeOptions, Subscription};
use crate::layout::GuestLayout;
use crate::page_state::{PageState, PageStateTable};
use crate::vm::Vm;
use crate::wss::{WorkingSetTracker, WssConfig, WssSummary};

/// Tunables of a VM's eviction service.
#[derive(Debug, Clone, Copy)]
pub struct EvictConfig {
    /// Working-set sampling interval (write-protect everything, harvest).
    pub sample_interval: Duration,
    pub wss: WssConfig,
    /// Pages per eviction batch.
    pub batch_pages: usize,
}

impl Default for EvictConfig {
    fn default() -> Self {
        Self {
            sample_interval: Duration::from_secs(1),
            wss: WssConfig::default(),
            batch_pages: super::DEFAULT_BATCH_PAGES,
        }
    }
}

struct Shared {
    vm: Arc<Vm>,
    tracker: WorkingSetTracker,
    /// The working-set tracker's and victim selection's view of the VM's writes.
    writes: Subscription,
    store: Arc<dyn PageStore>,
    /// Pages seen `Removed` and already forgotten in the store (cleared when they leave
    /// `Removed`, so a later discard is forgotten again).
    forgotten: Mutex<Vec<u64>>,
}

impl Shared {
    /// Forget in the store every page the fault loop marked `Removed` (UFFD_EVENT_REMOVE)
    /// since the last sweep, so a discarded page's old content is never kept or served.
    fn sweep_removed(&self) -> Result<usize, StoreError> {
        let mut forgotten = self.forgotten.lock().unwrap_or_else(|e| e.into_inner());
        let mut newly = Vec::new();
        for p in 0..self.vm.states.len() {
            let (w, bit) = (p / 64, 1u64 << (p % 64));
            if self.vm.states.get(p as u64) == PageState::Removed {
                if forgotten[w] & bit == 0 {
                    newly.push(p as u64);
                }
            } else {
                forgotten[w] &= !bit;
            }
        }
        for chunk in newly.chunks(1024) {
            self.store.forget_pages(chunk)?;
            for &p in chunk {
                forgotten[p as usize / 64] |= 1u64 << (p % 64);
            }
        }
        Ok(newly.len())
    }
}

impl SamplerTarget for Shared {
    fn uffd(&self) -> &Uffd {
        &self.vm.uffd
    }
    fn layout(&self) -> &GuestLayout {
        &self.vm.layout
    }
    fn states(&self) -> &PageStateTable {
        &self.vm.states
    }
    fn writes(&self) -> &Subscription {
        &self.writes
    }
    fn tracker(&self) -> &WorkingSetTracker {
        &self.tracker
    }
    fn after_sample(&self) {
        match self.sweep_removed() {
            Ok(0) => {}
            Ok(n) => tracing::debug!(vm = %self.vm.name, pages = n, "discarded pages forgotten"),
            Err(e) => {
                tracing::warn!(vm = %self.vm.name, error = %crate::error_chain(&*e), "forgetting discarded pages failed")
            }
        }
    }
}

/// Page counts and working-set figures for `stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvictStats {
    pub resident_pages: u64,
    pub evicted_pages: u64,
    pub zero_pages: u64,
    pub removed_pages: u64,
    pub missing_pages: u64,
    pub page_size: u64,
    pub sampler_running: bool,
    pub wss: WssSummary,
    pub last_eviction: Option<EvictReport>,
}

/// One VM's eviction service.
pub struct VmEviction {
    shared: Arc<Shared>,
    config: EvictConfig,
    sampler: Mutex<Option<Sampler>>,
    /// Held while an eviction runs: one at a time per VM.
    running: Mutex<Option<EvictReport>>,
}

impl VmEviction {
    /// Eviction for `vm`, storing pages in `store` (the same swap device the VM's fault loop
    /// reads `Evicted` pages from). Needs the guest memory file and a WP registration.
    pub fn new(
        vm: Arc<Vm>,
        store: Arc<dyn PageStore>,
        config: EvictConfig,
    ) -> Result<Self, EvictError> {
        if vm.memory_file.is_none() {
            return Err(EvictError::Unsupported(format!(
                "VM {} sent no guest memory file (eviction punches holes in it; attach with the \
                 pagewise handshake and a shared memory file)",
                vm.name
            )));
        }
        if !vm.wp_registered {
            return Err(EvictError::Unsupported(format!(
                "VM {} did not register its memory for write-protect faults (mode \"wp\"); \
                 eviction without it could lose writes",
                vm.name
            )));
        }
        let tracker = WorkingSetTracker::new(&vm.states, config.wss);
        let writes = vm.dirty.subscribe(SubscribeOptions::default())?;
        let words = vm.states.len().div_ceil(64);
        Ok(Self {
            shared: Arc::new(Shared {
                vm,
                tracker,
                writes,
                store,
                forgotten: Mutex::new(vec![0; words]),
            }),
            config,
            sampler: Mutex::new(None),
            running: Mutex::new(None),
        })
    }

    pub fn vm(&self) -> &Arc<Vm> {
        &self.shared.vm
    }

    pub fn tracker(&self) -> &WorkingSetTracker {
        &self.shared.tracker
    }

    /// Start the working-set sampler thread (idempotent).
    pub fn start_sampler(&self) -> std::io::Result<()> {
        let mut s = self.sampler.lock().unwrap_or_else(|e| e.into_inner());
        if s.as_ref().is_none_or(|s| s.failed()) {
            *s = Some(Sampler::spawn(
                self.shared.clone(),
                self.config.sample_interval,
            )?);
        }
        Ok(())
    }

    /// Stop the sampler (also happens on drop).
    pub fn stop_sampler(&self) {
        self.sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Evict toward `goal`. Blocks while another eviction of this VM runs.
    pub fn evict(
        &self,
        goal: EvictGoal,
        batch_pages: Option<usize>,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&EvictProgress),
    ) -> Result<EvictReport, EvictError> {
        let mut last = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let vm = &self.shared.vm;
        let memory_file = vm
            .memory_file
            .as_ref()
            .expect("checked in VmEviction::new")
            .as_fd();
        let target = EvictionTarget {
            uffd: &vm.uffd,
            memory_file,
            layout: &self.shared.vm.layout,
            states: &vm.states,
            store: self.shared.store.as_ref(),
            tracker: Some(&self.shared.tracker),
            writes: Some(&vm.dirty),
        };
        let report = run_eviction(
            &target,
            &self.shared.writes,
            goal,
            batch_pages.unwrap_or(self.config.batch_pages),
            cancel,
            progress,
        )?;
        tracing::info!(vm = %vm.name, evicted = report.progress.evicted, zero = report.progress.zero,
            ms = report.elapsed_ms, "eviction done");
        *last = Some(report.clone());
        Ok(report)
    }

    /// The guest discarded guest pages `pages` (REMOVE event): never store or serve them again.
    pub fn forget_removed(&self, pages: std::ops::Range<u64>) -> Result<usize, StoreError> {
        forget_removed(&self.shared.vm.states, self.shared.store.as_ref(), pages)
    }

    /// Forget in the store the pages the fault loop has marked `Removed` since the last sweep
    /// (the sampler thread does this after every sample). Returns how many were forgotten.
    pub fn sweep_removed(&self) -> Result<usize, StoreError> {
        self.shared.sweep_removed()
    }

    pub fn stats(&self) -> EvictStats {
        let states = &self.shared.vm.states;
        let c = states.census();
        let n = |s: PageState| c[s as usize] as u64;
        let last_eviction = self
            .running
            .try_lock()
            .ok()
            .and_then(|g| g.as_ref().cloned());
        EvictStats {
            resident_pages: n(PageState::Present) + n(PageState::InFlight) + n(PageState::Evicting),
            evicted_pages: n(PageState::Evicted),
            zero_pages: n(PageState::Zero),
            removed_pages: n(PageState::Removed),
            missing_pages: n(PageState::Missing),
            page_size: self.shared.vm.layout.page_size() as u64,
            sampler_running: self
                .sampler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|s| !s.failed()),
            wss: self.shared.tracker.summary(Instant::now()),
            last_eviction,
        }
    }
}
