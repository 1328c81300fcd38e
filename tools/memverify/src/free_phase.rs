//! The optional free phase (`memverify.free_mib=N`): a second buffer of N MiB, filled with
//! verifiable pages right after the main fill, verified again and then given back to the
//! guest kernel `free_after_secs` later. Its memory goes back to the buddy allocator as whole
//! free blocks, which virtio-balloon free page reporting (about 2 s later, pageblock order)
//! hands to the host: QEMU discards them and the pager sees UFFD_EVENT_REMOVE.
//!
//! The buffer is one allocation far above glibc's largest dynamic mmap threshold (32 MiB) for
//! the sizes the tests use, so it is its own `mmap` and freeing it is a `munmap`.

use std::time::{Duration, Instant};

use crate::pattern::{self, Page, WORDS};

const PAGES_PER_MIB: u64 = (1 << 20) / (WORDS as u64 * 8);
/// Mixed into the seed so these pages never look like the main buffer's.
const SEED_SALT: u64 = 0xF4EE_F4EE_F4EE_F4EE;
/// Mismatch details printed at most per check.
const DETAILS: usize = 5;

/// The extra buffer until it is freed.
pub struct FreePhase {
    mib: u64,
    seed: u64,
    free_at: Instant,
    pages: Option<Box<[Page]>>,
}

/// What a check of the extra buffer found.
#[derive(Debug, Default)]
pub struct Check {
    pub bad: u64,
    /// Up to `DETAILS` lines describing bad pages.
    pub details: Vec<String>,
}

fn zeroed_pages(count: usize) -> Box<[Page]> {
    let uninit = Box::<[Page]>::new_zeroed_slice(count);
    // SAFETY: `Page` is an array of u64, for which all-zero bytes are a valid value.
    unsafe { uninit.assume_init() }
}

impl FreePhase {
    /// Allocate and fill `mib` MiB; it is due to be freed `free_after` from `now`.
    pub fn fill(mib: u64, seed: u64, free_after: Duration, now: Instant) -> FreePhase {
        let count = (mib * PAGES_PER_MIB) as usize;
        let seed = seed ^ SEED_SALT;
        let mut pages = zeroed_pages(count);
        for (index, page) in pages.iter_mut().enumerate() {
            pattern::fill(page, seed, index as u64, 0);
        }
        FreePhase {
            mib,
            seed,
            free_at: now + free_after,
            pages: Some(pages),
        }
    }

    pub fn mib(&self) -> u64 {
        self.mib
    }

    /// True while the buffer is held and its time to be freed has come.
    pub fn due(&self, now: Instant) -> bool {
        self.pages.is_some() && now >= self.free_at
    }

    /// Check every page of the buffer (nothing when it was freed already).
    pub fn check(&self) -> Check {
        let mut result = Check::default();
        let Some(pages) = &self.pages else {
            return result;
        };
        for (index, page) in pages.iter().enumerate() {
            if let Err(m) = pattern::check(page, self.seed, index as u64, 0) {
                result.bad += 1;
                if result.details.len() < DETAILS {
                    result.details.push(format!(
                        "BAD freed-buffer page {index}: word {} expected {:#x} found {:#x}",
                        m.word, m.expected, m.found
                    ));
                }
            }
        }
        result
    }

    /// Verify the buffer one last time, then give it back to the kernel.
    pub fn check_and_free(&mut self) -> Check {
        let result = self.check();
        self.pages = None;
        result
    }

    #[cfg(test)]
    fn page_mut(&mut self, index: usize) -> &mut Page {
        &mut self.pages.as_mut().expect("not freed")[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_checks_frees_and_counts_damage() {
        let now = Instant::now();
        let mut phase = FreePhase::fill(1, 9, Duration::from_secs(5), now);
        assert!(!phase.due(now));
        assert!(phase.due(now + Duration::from_secs(5)));
        assert_eq!(phase.check().bad, 0);
        phase.page_mut(7).0[3] ^= 1;
        phase.page_mut(200).0 = [0; WORDS];
        let check = phase.check_and_free();
        assert_eq!(check.bad, 2);
        assert!(check.details[0].contains("page 7"), "{:?}", check.details);
        assert!(!phase.due(now + Duration::from_secs(60)), "freed once only");
        assert_eq!(phase.check().bad, 0, "nothing left to check");
    }

    #[test]
    fn pages_differ_from_the_main_buffer() {
        let phase = FreePhase::fill(1, 1, Duration::ZERO, Instant::now());
        let pages = phase.pages.as_ref().unwrap();
        assert!(pattern::check(&pages[0], 1, 0, 0).is_err());
    }
}
