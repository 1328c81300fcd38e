//! Write tracking with several consumers (issue 7): the fault loop records guest writes seen
//! through synchronous uffd write-protect faults, and each consumer (the working-set
//! sampler and victim selection of the evictor, a live migration's pre-copy, ...) reads its
//! own view of them.
//!
//! - [`WriteTracker`]: one per VM (`Vm::dirty`). The fault path calls
//!   [`WriteTracker::mark_written`] (and the placement path [`WriteTracker::mark_placed`]);
//!   consumers call [`WriteTracker::subscribe`].
//! - [`Subscription`]: a consumer's own bitmap: [`Subscription::harvest`] takes and clears
//!   only this consumer's bits. Dropping it unsubscribes.
//! - [`fault`]: the write-fault protocol itself ([`resolve_write_fault`]), which the fault
//!   loop runs for every WP fault and which keeps eviction race-free.
//!
//! Design (cost on the WP-fault path): a fixed table of [`MAX_SUBSCRIBERS`] slots, each with
//! a lock-free bitmap allocated on the slot's first use. Marking a page is one acquire load
//! per slot plus one `fetch_or` per active subscriber; no lock, no allocation, no list to
//! walk that could change under the fault loop. The alternative, a per-page write epoch
//! compared with each consumer's cursor, marks with one store but costs 4-8 bytes per page
//! for every VM (a bitmap costs 1 bit per page per active subscriber, nothing without one),
//! needs a store-then-recheck of the global epoch on every mark to be exact, and makes
//! harvest scan 32-64x more memory. With at most a few consumers the slot table is cheaper
//! in memory and just as cheap on the fault path (both are nanoseconds against a WP fault
//! round trip of ~10-20 us).

pub mod fault;

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

pub use fault::{resolve_write_fault, WriteFaultAction};

/// Most consumers tracking writes of one VM at the same time.
pub const MAX_SUBSCRIBERS: usize = 8;

const FREE: u8 = 0;
/// Claimed by a subscribe/unsubscribe in progress: the fault path skips it.
const BUSY: u8 = 1;
const ACTIVE: u8 = 2;

/// Errors of write tracking.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyError {
    #[error("{max} consumers already track this VM's writes; drop one first")]
    TooManySubscribers { max: usize },
}

/// What a consumer wants counted as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Pages that become resident through a MISSING fault (placed by `UFFDIO_COPY` or
    /// `UFFDIO_ZEROPAGE`) count as written. A migration's pre-copy needs this: a page placed
    /// writable after its round's write-protect would otherwise take later writes unseen.
    pub placed_counts_as_written: bool,
}

struct Slot {
    state: AtomicU8,
    placed: std::sync::atomic::AtomicBool,
    bits: OnceLock<Box<[AtomicU64]>>,
}

struct Inner {
    pages: usize,
    slots: [Slot; MAX_SUBSCRIBERS],
    /// Active subscribers with `placed_counts_as_written`: the placement path does nothing
    /// while this is 0.
    placed_subscribers: AtomicUsize,
    /// Pages whose copy in the VM's own swap device is what guest memory holds: placed from
    /// the device write-protected and not written since (allocated on first use).
    device_copy: OnceLock<Box<[AtomicU64]>>,
}

impl Inner {
    fn words(&self) -> usize {
        self.pages.div_ceil(64)
    }

    /// The bitmap of slot `i` if a subscriber is active there (and wants placements, when
    /// `placed` is set).
    fn active(&self, i: usize, placed: bool) -> Option<&[AtomicU64]> {
        let slot = &self.slots[i];
        if slot.state.load(Ordering::Acquire) != ACTIVE {
            return None;
        }
        if placed && !slot.placed.load(Ordering::Relaxed) {
            return None;
        }
        slot.bits.get().map(|b| &b[..])
    }
}

/// A VM's write log: marks from the fault loop, one bitmap per subscribed consumer. Cheap to
/// clone (shared).
#[derive(Clone)]
pub struct WriteTracker {
    inner: Arc<Inner>,
}

impl WriteTracker {
    /// Tracking for `pages` guest pages; no memory is allocated until a consumer subscribes.
    pub fn new(pages: usize) -> Self {
        let slot = || Slot {
            state: AtomicU8::new(FREE),
            placed: std::sync::atomic::AtomicBool::new(false),
            bits: OnceLock::new(),
        };
        Self {
            inner: Arc::new(Inner {
                pages,
                slots: std::array::from_fn(|_| slot()),
                placed_subscribers: AtomicUsize::new(0),
                device_copy: OnceLock::new(),
            }),
        }
    }

    pub fn pages(&self) -> usize {
        self.inner.pages
    }

    /// Start tracking writes for one consumer. Writes marked after this returns are in the
    /// subscription (a write racing with the call may or may not be: protect the guest
    /// after subscribing). Fails when [`MAX_SUBSCRIBERS`] are active.
    pub fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, DirtyError> {
        let inner = &self.inner;
        let slot = (0..MAX_SUBSCRIBERS)
            .find(|&i| {
                inner.slots[i]
                    .state
                    .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
            .ok_or(DirtyError::TooManySubscribers {
                max: MAX_SUBSCRIBERS,
            })?;
        let s = &inner.slots[slot];
        let words = inner.words();
        let bits = s
            .bits
            .get_or_init(|| (0..words).map(|_| AtomicU64::new(0)).collect());
        // A mark that loaded a previous subscriber's ACTIVE may still land after this clear:
        // at worst one spurious dirty page, never a missed one.
        for w in bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
        s.placed
            .store(options.placed_counts_as_written, Ordering::Relaxed);
        if options.placed_counts_as_written {
            inner.placed_subscribers.fetch_add(1, Ordering::SeqCst);
        }
        s.state.store(ACTIVE, Ordering::SeqCst);
        Ok(Subscription {
            inner: inner.clone(),
            slot,
            options,
        })
    }

    /// Number of active subscriptions.
    pub fn subscribers(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) == ACTIVE)
            .count()
    }

    /// The fault loop saw a write to `page` (a WP fault it resolves): mark it in every active
    /// subscription. Lock-free; returns false for a page outside the VM (nothing marked).
    pub fn mark_written(&self, page: u64) -> bool {
        let inner = &*self.inner;
        let Some(i) = usize::try_from(page).ok().filter(|&p| p < inner.pages) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        for s in 0..MAX_SUBSCRIBERS {
            if let Some(bits) = inner.active(s, false) {
                bits[i / 64].fetch_or(bit, Ordering::AcqRel);
            }
        }
        if let Some(copies) = inner.device_copy.get() {
            copies[i / 64].fetch_and(!bit, Ordering::AcqRel);
        }
        true
    }

    /// `count` pages from `first` are about to be placed write-protected with the bytes of
    /// their copy in the VM's own swap device: until one is written (a WP fault, which
    /// [`mark_written`](Self::mark_written) records) its device copy stays current. Call it
    /// before the placement, so a write right after it cannot be missed. Clamped to the VM.
    pub fn note_device_copy(&self, first: u64, count: u64) {
        let inner = &*self.inner;
        let copies = inner
            .device_copy
            .get_or_init(|| (0..inner.words()).map(|_| AtomicU64::new(0)).collect());
        let pages = inner.pages as u64;
        let (start, end) = (first.min(pages), first.saturating_add(count).min(pages));
        set_range(copies, start as usize, end as usize);
    }

    /// The bytes of `count` pages from `first` are no longer (or not known to be) their
    /// device copy: placed from elsewhere, zero-filled, or made writable without a write
    /// being recorded. Clamped to the VM.
    pub fn forget_device_copy(&self, first: u64, count: u64) {
        let inner = &*self.inner;
        let Some(copies) = inner.device_copy.get() else {
            return;
        };
        let pages = inner.pages as u64;
        let (start, end) = (first.min(pages), first.saturating_add(count).min(pages));
        clear_range(copies, start as usize, end as usize);
    }

    /// Whether resident page `page` still holds exactly its copy in the VM's own swap
    /// device (false outside the VM). A migration need not send such a page to a host that
    /// reads the same device.
    pub fn device_copy_current(&self, page: u64) -> bool {
        let inner = &*self.inner;
        match (
            usize::try_from(page).ok().filter(|&p| p < inner.pages),
            inner.device_copy.get(),
        ) {
            (Some(i), Some(copies)) => {
                copies[i / 64].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
            }
            _ => false,
        }
    }

    /// `count` pages from `first` were just placed by a MISSING fault: mark them in the
    /// subscriptions that asked for it ([`SubscribeOptions::placed_counts_as_written`]). One
    /// atomic load when nobody did. The range is clamped to the VM.
    pub fn mark_placed(&self, first: u64, count: u64) {
        let inner = &*self.inner;
        if inner.placed_subscribers.load(Ordering::Acquire) == 0 {
            return;
        }
        let pages = inner.pages as u64;
        let (start, end) = (first.min(pages), first.saturating_add(count).min(pages));
        for s in 0..MAX_SUBSCRIBERS {
            if let Some(bits) = inner.active(s, true) {
                set_range(bits, start as usize, end as usize);
            }
        }
    }

    /// Distinct pages dirty in at least one active subscription (for `stats`).
    pub fn count(&self) -> usize {
        let inner = &*self.inner;
        (0..inner.words())
            .map(|w| {
                (0..MAX_SUBSCRIBERS)
                    .filter_map(|s| inner.active(s, false))
                    .fold(0u64, |acc, b| acc | b[w].load(Ordering::Relaxed))
                    .count_ones() as usize
            })
            .sum()
    }
}

/// The mask of bits `lo..hi` (`hi <= 64`) of one word.
fn word_mask(lo: usize, hi: usize) -> u64 {
    if hi - lo == 64 {
        u64::MAX
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

fn clear_range(bits: &[AtomicU64], start: usize, end: usize) {
    let mut p = start;
    while p < end {
        let w = p / 64;
        let hi = (end - w * 64).min(64);
        bits[w].fetch_and(!word_mask(p % 64, hi), Ordering::AcqRel);
        p = w * 64 + hi;
    }
}

fn set_range(bits: &[AtomicU64], start: usize, end: usize) {
    let mut p = start;
    while p < end {
        let w = p / 64;
        let hi = (end - w * 64).min(64);
        bits[w].fetch_or(word_mask(p % 64, hi), Ordering::AcqRel);
        p = w * 64 + hi;
    }
}

/// One consumer's view of the VM's writes. Dropping it unsubscribes (the slot and its bitmap
/// are reused by the next subscriber, so nothing leaks).
pub struct Subscription {
    inner: Arc<Inner>,
    slot: usize,
    options: SubscribeOptions,
}

impl Subscription {
    fn bits(&self) -> &[AtomicU64] {
        self.inner.slots[self.slot]
            .bits
            .get()
            .expect("allocated by subscribe")
    }

    pub fn options(&self) -> SubscribeOptions {
        self.options
    }

    pub fn pages(&self) -> usize {
        self.inner.pages
    }

    /// Mark `page` in this subscription only (e.g. a consumer re-queueing a page it could
    /// not handle). Returns true if it was clean before; false too for a page outside the VM.
    pub fn mark(&self, page: u64) -> bool {
        let Some(i) = usize::try_from(page).ok().filter(|&p| p < self.inner.pages) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        self.bits()[i / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Whether `page` was written since this subscription's last harvest (false outside the
    /// VM).
    pub fn is_dirty(&self, page: u64) -> bool {
        match usize::try_from(page).ok().filter(|&p| p < self.inner.pages) {
            Some(i) => self.bits()[i / 64].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0,
            None => false,
        }
    }

    /// Take this subscription's dirty pages (clearing them; other subscriptions keep
    /// theirs), in ascending order.
    pub fn harvest(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.harvest_into(&mut out);
        out
    }

    /// [`harvest`](Self::harvest) appending to `out` (reuses its allocation).
    pub fn harvest_into(&self, out: &mut Vec<u64>) {
        for (i, w) in self.bits().iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
    }

    /// Number of pages dirty in this subscription right now.
    pub fn count(&self) -> usize {
        self.bits()
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let s = &self.inner.slots[self.slot];
        s.state.store(BUSY, Ordering::SeqCst);
        if self.options.placed_counts_as_written {
            self.inner.placed_subscribers.fetch_sub(1, Ordering::SeqCst);
        }
        s.state.store(FREE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
