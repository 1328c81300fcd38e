//! A lock-free bitmap of guest pages written since the last harvest (write tracking via
//! synchronous uffd write-protect faults: the fault loop marks, trackers harvest).

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per guest page.
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, pages }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Mark `page` written. Returns true if it was clean before.
    pub fn mark(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1u64 << (page % 64)) != 0
    }

    /// Take every dirty page (clearing them) and return their indices in ascending order.
    pub fn harvest(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of dirty pages right now.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_harvest() {
        let d = DirtyBitmap::new(130);
        assert!(d.mark(3));
        assert!(!d.mark(3));
        d.mark(64);
        d.mark(129);
        assert_eq!(d.count(), 3);
        assert!(d.is_dirty(129));
        assert_eq!(d.harvest(), vec![3, 64, 129]);
        assert_eq!(d.count(), 0);
    }
}
