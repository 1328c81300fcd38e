//! Per-page bookkeeping: what each page must hold now, with a per-page lock so a page is
//! read-verified or rewritten by one thread at a time (no data races on guest memory).
//!
//! State word (u32): bit 31 = locked, bit 30 = zeroed (discarded, reads as zeros),
//! bit 29 = first touch done, bit 28 = mismatch seen, bits 0..28 = last version written
//! (0 = the image's content).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::image::{Expected, ImageSpec};

const LOCKED: u32 = 1 << 31;
const ZEROED: u32 = 1 << 30;
const TOUCHED: u32 = 1 << 29;
const MISMATCHED: u32 = 1 << 28;
const VERSION_MASK: u32 = MISMATCHED - 1;

/// Per-page expected-content table.
pub struct PageTable {
    words: Box<[AtomicU32]>,
    spec: ImageSpec,
}

/// A held page lock; release it with [`PageTable::unlock`].
#[derive(Debug)]
pub struct PageGuard {
    index: u64,
    word: u32,
}

impl PageGuard {
    /// Whether this is the first access to the page in this run.
    pub fn first_touch(&self) -> bool {
        self.word & TOUCHED == 0
    }

    pub fn version(&self) -> u32 {
        self.word & VERSION_MASK
    }
}

impl PageTable {
    pub fn new(pages: u64, spec: ImageSpec) -> Self {
        Self {
            words: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            spec,
        }
    }

    pub fn spec(&self) -> ImageSpec {
        self.spec
    }

    /// Take page `index`'s lock (spins, yielding, while another thread holds it).
    pub fn lock(&self, index: u64) -> PageGuard {
        let w = &self.words[index as usize];
        let mut spins = 0u32;
        loop {
            let cur = w.load(Ordering::Relaxed);
            if cur & LOCKED == 0
                && w.compare_exchange_weak(cur, cur | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return PageGuard { index, word: cur };
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// What the locked page must hold now.
    pub fn expected(&self, g: &PageGuard) -> Expected {
        if g.word & ZEROED != 0 {
            Expected::Zero
        } else if g.version() == 0 {
            self.spec.image_page(g.index)
        } else {
            Expected::Version(g.version() as u64)
        }
    }

    /// The version a write to the locked page stores next.
    pub fn next_version(&self, g: &PageGuard) -> u32 {
        let v = g.version() + 1;
        assert!(v <= VERSION_MASK, "page {} rewritten too often", g.index);
        v
    }

    /// Release the lock. `wrote` = the new version written; `mismatch` = a check failed.
    pub fn unlock(&self, g: PageGuard, wrote: Option<u32>, mismatch: bool) {
        let mut w = (g.word | TOUCHED) & !LOCKED;
        if let Some(v) = wrote {
            w = (w & !(VERSION_MASK | ZEROED)) | v;
        }
        if mismatch {
            w |= MISMATCHED;
        }
        self.words[g.index as usize].store(w, Ordering::Release);
    }

    /// Mark the locked page discarded: it reads as zeros until written again.
    pub fn unlock_zeroed(&self, g: PageGuard) {
        let w = (g.word | ZEROED) & !LOCKED;
        self.words[g.index as usize].store(w, Ordering::Release);
    }

    /// Pages whose check failed at least once.
    pub fn mismatched_pages(&self) -> u64 {
        self.words
            .iter()
            .filter(|w| w.load(Ordering::Relaxed) & MISMATCHED != 0)
            .count() as u64
    }

    /// Distinct pages touched so far.
    pub fn touched_pages(&self) -> u64 {
        self.words
            .iter()
            .filter(|w| w.load(Ordering::Relaxed) & TOUCHED != 0)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_zeroing_and_flags() {
        let t = PageTable::new(
            4,
            ImageSpec {
                seed: 1,
                zero_every: 2,
            },
        );
        let g = t.lock(1);
        assert!(g.first_touch());
        assert_eq!(t.expected(&g), Expected::Zero);
        let v = t.next_version(&g);
        t.unlock(g, Some(v), false);
        let g = t.lock(1);
        assert!(!g.first_touch());
        assert_eq!(t.expected(&g), Expected::Version(1));
        t.unlock_zeroed(g);
        let g = t.lock(1);
        assert_eq!(t.expected(&g), Expected::Zero);
        // Versions keep rising across a discard, so stale content is never accepted.
        assert_eq!(t.next_version(&g), 2);
        t.unlock(g, None, true);
        let g = t.lock(0);
        assert_eq!(t.expected(&g), Expected::Version(0));
        t.unlock(g, None, false);
        assert_eq!((t.touched_pages(), t.mismatched_pages()), (2, 1));
    }

    #[test]
    fn lock_excludes_other_threads() {
        let t = std::sync::Arc::new(PageTable::new(
            1,
            ImageSpec {
                seed: 0,
                zero_every: 0,
            },
        ));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let g = t.lock(0);
                        let v = t.next_version(&g);
                        t.unlock(g, Some(v), false);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(t.lock(0).version(), 4000);
    }
}
