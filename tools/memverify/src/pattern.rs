//! Page content: every 4 KiB page holds its index, its generation and 510 words of a
//! pseudo-random stream derived from (seed, index, generation). A zero page, a stale
//! generation, a page from another index or a torn page all fail the check.

/// Words per 4 KiB page.
pub const WORDS: usize = 512;

/// One 4 KiB page, page-aligned.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
pub struct Page(pub [u64; WORDS]);

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn stream_start(seed: u64, index: u64, generation: u32) -> u64 {
    seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (u64::from(generation) << 40)
}

/// Write the content of page `index` at `generation`.
pub fn fill(page: &mut Page, seed: u64, index: u64, generation: u32) {
    page.0[0] = index;
    page.0[1] = u64::from(generation);
    let mut state = stream_start(seed, index, generation);
    for word in &mut page.0[2..] {
        *word = splitmix(&mut state);
    }
}

/// The first word that differs from what page `index` at `generation` must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub word: usize,
    pub expected: u64,
    pub found: u64,
}

/// Check page `index` against `generation`.
pub fn check(page: &Page, seed: u64, index: u64, generation: u32) -> Result<(), Mismatch> {
    let head = [index, u64::from(generation)];
    for (word, (&found, &expected)) in page.0.iter().zip(head.iter()).enumerate() {
        if found != expected {
            return Err(Mismatch {
                word,
                expected,
                found,
            });
        }
    }
    let mut state = stream_start(seed, index, generation);
    for (word, &found) in page.0.iter().enumerate().skip(2) {
        let expected = splitmix(&mut state);
        if found != expected {
            return Err(Mismatch {
                word,
                expected,
                found,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_passes() {
        let mut p = Page([0; WORDS]);
        for index in [0u64, 1, 4095, 1 << 40] {
            fill(&mut p, 9, index, 3);
            assert_eq!(check(&p, 9, index, 3), Ok(()));
        }
    }

    #[test]
    fn detects_zero_stale_foreign_and_torn_pages() {
        let zero = Page([0; WORDS]);
        assert!(
            check(&zero, 1, 0, 0).is_err(),
            "a zero page must fail, even page 0"
        );
        let mut p = Page([0; WORDS]);
        fill(&mut p, 1, 5, 2);
        assert_eq!(check(&p, 1, 5, 3).unwrap_err().word, 1, "stale generation");
        assert_eq!(check(&p, 1, 6, 2).unwrap_err().word, 0, "another page");
        assert!(check(&p, 2, 5, 2).is_err(), "another seed");
        p.0[300] ^= 1;
        assert_eq!(check(&p, 1, 5, 2).unwrap_err().word, 300, "torn page");
    }
}
