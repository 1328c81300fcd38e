//! Cold-page offload while the VM runs: eviction that never loses a write, plus the
//! working-set sampler that tells which pages are cold.
//!
//! - [`crate::layout`] (not in this module): guest page <-> host address, contiguous runs.
//! - [`batch`]: the race-free protocol for one batch (claim, write-protect, read, store,
//!   punch, publish, wake).
//! - [`victims`]: which pages to evict for a goal (target RSS, cold for S, auto).
//! - [`faults`]: REMOVE events (the write-fault protocol is `crate::dirty::fault`).
//! - [`sampler`]: periodic re-protection + working-set samples.
//! - [`store`]: page stores (raw memory image); the swap device implements [`PageStore`] too.
//! - [`service`]: one daemon VM's eviction service (tracker, sampler thread, requests, stats).
//! - [`control`]: the daemon's control-socket commands (`evict`, `evict_status`, `wss`, ...).

pub mod batch;
pub mod control;
pub mod faults;
pub mod heap;
pub mod sampler;
pub mod service;
pub mod store;
pub mod victims;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::dirty::{resolve_write_fault, WriteFaultAction};
pub use crate::layout::Run;
pub use batch::{BatchOutcome, EvictionTarget};
pub use faults::forget_removed;
pub use sampler::{protect_and_sample, Sampler, SamplerTarget};
pub use service::{EvictConfig, EvictStats, VmEviction};
pub use store::{ImageFileStore, SwapdevStore};
pub use victims::{resident_pages, select_victims, EvictGoal};

use crate::dirty::{DirtyError, Subscription};

/// An error from the page store (the swap device), boxed so any store fits.
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// Where evicted pages go. Implemented for the swap device; `store_pages` must return only
/// once the pages are acknowledged (readable back after a crash of this process).
pub trait PageStore: Send + Sync {
    /// Store `(guest page, content)` pairs; returns when acknowledged.
    fn store_pages(&self, pages: &[(u64, &[u8])]) -> Result<(), StoreError>;
    /// The guest freed these pages: never serve their stored content again.
    fn forget_pages(&self, pages: &[u64]) -> Result<(), StoreError>;
}

/// Errors of eviction and working-set tracking. Each names what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error("guest page {page} is outside every guest memory region")]
    PageOutOfRange { page: u64 },
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    #[error("reading the guest memory file at offset {offset:#x}")]
    ReadMemoryFile {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest memory file ends before offset {offset:#x} (+{len} bytes)")]
    MemoryFileTooShort { offset: u64, len: u64 },
    #[error("storing evicted pages in the swap device: {0}")]
    Store(StoreError),
    #[error("punching the guest memory file at offset {offset:#x} (+{len} bytes)")]
    PunchHole {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "working-set tracking has run for {tracked_ms} ms; \"cold for {wanted_ms} ms\" needs at \
         least that much history"
    )]
    NotEnoughHistory { wanted_ms: u64, tracked_ms: u64 },
    #[error("no working-set estimate yet (the sampler has not completed an interval)")]
    NoEstimateYet,
    #[error("this VM cannot be evicted: {0}")]
    Unsupported(String),
    #[error("write tracking for the evictor")]
    Tracking(#[from] DirtyError),
    #[error("eviction cancelled after {evicted} pages")]
    Cancelled { evicted: u64 },
}

/// Progress of an eviction run, reported after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EvictProgress {
    /// Victims chosen for this run.
    pub planned: u64,
    /// Victims handled so far (evicted, zero, skipped or abandoned).
    pub done: u64,
    pub evicted: u64,
    pub zero: u64,
    pub skipped: u64,
    pub abandoned: u64,
    pub removed_meanwhile: u64,
    /// Pages resident after the latest batch.
    pub resident: u64,
    /// The resident target, when the goal has one.
    pub target: Option<u64>,
}

/// The result of [`run_eviction`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvictReport {
    pub goal: EvictGoal,
    pub progress: EvictProgress,
    pub elapsed_ms: u64,
    /// Evicted bytes per second (page content read, stored and punched).
    pub mb_per_s: f64,
    /// Batch errors that abandoned pages (the run continued past them).
    pub errors: Vec<String>,
}

/// Batch size used when none is given.
pub const DEFAULT_BATCH_PAGES: usize = 256;

/// Most bytes one batch stages in memory.
pub const MAX_BATCH_BYTES: usize = 8 << 20;

/// Evict toward `goal`, `batch_pages` at a time (victims not written since `dirty`'s last
/// harvest; the working-set sampler's subscription), calling `progress` after each batch.
/// Stops early when `cancel` is set, when the resident target is reached, or after a batch
/// where every page failed (an error the next batch would hit again).
pub fn run_eviction(
    target: &EvictionTarget<'_>,
    dirty: &Subscription,
    goal: EvictGoal,
    batch_pages: usize,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&EvictProgress),
) -> Result<EvictReport, EvictError> {
    let tracker = target.tracker.ok_or_else(|| {
        EvictError::Unsupported("no working-set tracker: victims cannot be ordered".into())
    })?;
    let started = Instant::now();
    let (victims, resident_target) = select_victims(target.states, dirty, tracker, goal, started)?;
    let mut p = EvictProgress {
        planned: victims.len() as u64,
        resident: resident_pages(target.states) as u64,
        target: resident_target.map(|t| t as u64),
        ..Default::default()
    };
    progress(&p);
    let mut errors = Vec::new();
    let mut buf = Vec::new();
    // Bound the staging buffer (2 MiB pages would make 256-page batches 512 MiB).
    let page_size = target.layout.page_size();
    let batch_pages = batch_pages.clamp(1, (MAX_BATCH_BYTES / page_size).max(1));
    for chunk in victims.chunks(batch_pages) {
        if cancel.load(Ordering::Relaxed) {
            return Err(EvictError::Cancelled {
                evicted: p.evicted + p.zero,
            });
        }
        if resident_target.is_some_and(|t| resident_pages(target.states) <= t) {
            break;
        }
        // A victim written since it was chosen is hot after all: leave it.
        let mut sorted: Vec<u64> = chunk
            .iter()
            .copied()
            .filter(|&pg| !dirty.is_dirty(pg))
            .collect();
        p.skipped += (chunk.len() - sorted.len()) as u64;
        p.done += (chunk.len() - sorted.len()) as u64;
        sorted.sort_unstable();
        let (outcome, err) = match target.evict_batch(&sorted, &mut buf) {
            Ok(o) => (o, None),
            Err((o, e)) => (o, Some(e)),
        };
        p.done += sorted.len() as u64;
        p.evicted += outcome.evicted as u64;
        p.zero += outcome.zero as u64;
        p.skipped += outcome.skipped as u64;
        p.abandoned += outcome.abandoned as u64;
        p.removed_meanwhile += outcome.removed_meanwhile as u64;
        p.resident = resident_pages(target.states) as u64;
        progress(&p);
        if let Some(e) = err {
            tracing::warn!(error = %crate::error_chain(&e), "eviction batch failed");
            let nothing_done = outcome.evicted + outcome.zero + outcome.skipped == 0;
            errors.push(e.to_string());
            if nothing_done {
                return Err(e);
            }
        }
    }
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    let bytes = (p.evicted + p.zero) * page_size as u64;
    Ok(EvictReport {
        goal,
        progress: p,
        elapsed_ms: elapsed.as_millis() as u64,
        mb_per_s: bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        errors,
    })
}
