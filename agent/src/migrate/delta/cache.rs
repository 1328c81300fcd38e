//! The sender's XBZRLE cache: the bytes last sent of each page, least recently sent evicted
//! first, in one arena of fixed size (allocated once; the kernel backs it lazily).

use std::num::NonZeroUsize;

use lru::LruCache;

/// The last bytes sent per page, for at most `slots` pages.
pub struct SentCache {
    page_size: usize,
    arena: Vec<u8>,
    /// Page -> its slot in the arena, least recently sent first out.
    slots: LruCache<u64, usize>,
    free: Vec<usize>,
}

impl SentCache {
    /// A cache of `bytes` (rounded down to whole pages; `None` when that is no page).
    pub fn new(bytes: u64, page_size: usize) -> Option<Self> {
        let slots = usize::try_from(bytes / page_size as u64).ok()?;
        let cap = NonZeroUsize::new(slots)?;
        Some(Self {
            page_size,
            arena: vec![0; slots.checked_mul(page_size)?],
            slots: LruCache::new(cap),
            free: (0..slots).rev().collect(),
        })
    }

    /// Bytes the cache holds at most.
    pub fn capacity_bytes(&self) -> u64 {
        self.arena.len() as u64
    }

    fn slot(&self, slot: usize) -> std::ops::Range<usize> {
        slot * self.page_size..(slot + 1) * self.page_size
    }

    /// What was last sent of `page`, if still cached.
    pub fn get(&mut self, page: u64) -> Option<&[u8]> {
        let slot = *self.slots.get(&page)?;
        let range = self.slot(slot);
        Some(&self.arena[range])
    }

    /// `page` was sent as `data`: remember exactly that if it is cached or a slot is free,
    /// evicting nothing (a first pass over all memory would only churn the cache); forget
    /// it otherwise. Returns whether it is cached now.
    pub fn put_if_room(&mut self, page: u64, data: &[u8]) -> bool {
        if self.slots.contains(&page) || !self.free.is_empty() {
            self.put(page, data);
            true
        } else {
            false
        }
    }

    /// `page` was sent as `data`: remember exactly that.
    pub fn put(&mut self, page: u64, data: &[u8]) {
        assert_eq!(data.len(), self.page_size, "one page");
        let slot = match self.slots.get(&page) {
            Some(&slot) => slot,
            None => {
                let slot = match self.free.pop() {
                    Some(slot) => slot,
                    None => {
                        let (_, slot) = self.slots.pop_lru().expect("a full cache has an entry");
                        slot
                    }
                };
                self.slots.put(page, slot);
                slot
            }
        };
        let range = self.slot(slot);
        self.arena[range].copy_from_slice(data);
    }

    /// The destination no longer holds what was sent of `page` (it went as zero, stale,
    /// or its delta failed there): the next send is whole.
    pub fn forget(&mut self, page: u64) {
        if let Some(slot) = self.slots.pop(&page) {
            self.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_last_bytes_sent_and_evicts_the_least_recently_sent() {
        let mut c = SentCache::new(2 * 16, 16).unwrap();
        assert_eq!(c.capacity_bytes(), 32);
        c.put(1, &[1; 16]);
        c.put(2, &[2; 16]);
        c.put(1, &[11; 16]);
        assert_eq!(c.get(1), Some(&[11u8; 16][..]));
        c.put(3, &[3; 16]); // evicts 2: page 1 was sent (and read) more recently
        assert_eq!(c.get(2), None);
        assert_eq!(c.get(3), Some(&[3u8; 16][..]));
        c.forget(3);
        assert_eq!(c.get(3), None);
        c.put(4, &[4; 16]); // into the freed slot, page 1 stays
        assert_eq!(c.get(1), Some(&[11u8; 16][..]));
        assert_eq!(c.get(4), Some(&[4u8; 16][..]));
        assert!(SentCache::new(15, 16).is_none(), "less than a page");
        assert!(!c.put_if_room(5, &[5; 16]), "full: nothing evicted");
        assert!(c.put_if_room(4, &[44; 16]), "cached: updated");
        assert_eq!(c.get(4), Some(&[44u8; 16][..]));
        assert_eq!(c.get(5), None);
    }
}
