//! Page content: every 4 KiB page holds its index, its generation and 510 words of a
//! pseudo-random stream derived from (seed, index, generation). A zero page, a stale
//! generation, a page from another index or a torn page all fail the check.
//!
//! Sparse rewrites (`memverify.sparse_words=N`, what databases and caches do): a page keeps
//! its generation-0 stream and generation g > 0 changes only word 1 (the generation) and a
//! window of N words that moves with g, each the stream's word XOR a stamp of (seed, index,
//! g). Going from g to g+1 restores g's window and stamps g+1's: N*2 + 1 words written.

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

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `word` (2..WORDS) of page `index` at generation 0, without the words before it.
fn base_word(seed: u64, index: u64, word: usize) -> u64 {
    let start = stream_start(seed, index, 0);
    mix(start.wrapping_add((word as u64 - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// The window of `n` words generation `generation` (> 0) stamps, within 2..WORDS.
fn window(generation: u32, n: usize) -> std::ops::Range<usize> {
    let starts = WORDS - 2 - n + 1;
    let first = 2 + (generation as usize * n) % starts;
    first..first + n
}

fn stamp(seed: u64, index: u64, generation: u32, word: usize) -> u64 {
    mix(seed ^ index.rotate_left(17) ^ (u64::from(generation) << 32) ^ word as u64) | 1
}

/// The most words a sparse rewrite may change.
pub const MAX_SPARSE_WORDS: usize = 64;

/// What word `word` of page `index` holds at `generation` with sparse rewrites of `n`.
fn sparse_word(seed: u64, index: u64, generation: u32, n: usize, word: usize) -> u64 {
    let base = base_word(seed, index, word);
    if generation > 0 && window(generation, n).contains(&word) {
        base ^ stamp(seed, index, generation, word)
    } else {
        base
    }
}

/// Take page `index` from generation `from` to `to`: whole (`n` = 0) or sparsely.
pub fn rewrite(page: &mut Page, seed: u64, index: u64, from: u32, to: u32, n: usize) {
    if n == 0 {
        return fill(page, seed, index, to);
    }
    if from > 0 {
        for w in window(from, n) {
            page.0[w] = base_word(seed, index, w);
        }
    }
    if to > 0 {
        for w in window(to, n) {
            page.0[w] = sparse_word(seed, index, to, n, w);
        }
    }
    page.0[1] = u64::from(to);
}

/// Check page `index` against `generation`, written whole (`n` = 0) or sparsely.
pub fn check_with(
    page: &Page,
    seed: u64,
    index: u64,
    generation: u32,
    n: usize,
) -> Result<(), Mismatch> {
    if n == 0 || generation == 0 {
        return check(page, seed, index, generation);
    }
    let head = [index, u64::from(generation)];
    for (word, &found) in page.0.iter().enumerate() {
        let expected = match head.get(word) {
            Some(&h) => h,
            None => sparse_word(seed, index, generation, n, word),
        };
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
    fn sparse_rewrites_change_a_few_words_and_check_like_whole_ones() {
        let mut p = Page([0; WORDS]);
        fill(&mut p, 4, 77, 0);
        assert_eq!(
            check_with(&p, 4, 77, 0, 8),
            Ok(()),
            "generation 0 is the plain fill"
        );
        for g in 1..200u32 {
            let before = p;
            rewrite(&mut p, 4, 77, g - 1, g, 8);
            let changed = before.0.iter().zip(&p.0).filter(|(a, b)| a != b).count();
            assert!(
                changed <= 2 * 8 + 1,
                "generation {g}: {changed} words changed"
            );
            assert_eq!(check_with(&p, 4, 77, g, 8), Ok(()), "generation {g}");
            assert!(check_with(&p, 4, 77, g - 1, 8).is_err(), "stale {g}");
        }
        let mut torn = p;
        torn.0[300] ^= 1;
        assert_eq!(check_with(&torn, 4, 77, 199, 8).unwrap_err().word, 300);
        // Whole rewrites through the same call.
        rewrite(&mut p, 4, 78, 0, 3, 0);
        assert_eq!(check(&p, 4, 78, 3), Ok(()));
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
