//! Verifiable page content: every page's bytes derive from (page index, seed, version).
//!
//! Layout of a 4 KiB page of version `v` (little endian):
//! * bytes `0..8`: the page index; `8..16`: the seed; `16..24`: the version;
//! * bytes `24..4096`: an xorshift64* stream keyed by (index, seed, version).
//!
//! Version 0 is the RAM image `gen-image` writes (and `pagewise swapdev import` turns into a
//! swap device); with `zero_every = K > 0`, every page whose index is `K - 1 (mod K)` is all
//! zeros in the image instead. Versions `>= 1` are writes made later by memhog.
//!
//! A mismatch is decoded into what was found (another page, an older version, zeros,
//! garbage) so a failure names the page and what differed.

use std::io::Write;
use std::path::Path;

/// Page size of the images and of memhog's accesses.
pub const PAGE_SIZE: usize = 4096;
const WORDS: usize = PAGE_SIZE / 8;
const HEADER_WORDS: usize = 3;

/// What a page holds, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// All zero bytes (a zero page of the image, or a page the guest removed).
    Zero,
    /// The pattern of this version.
    Version(u64),
}

/// The image a run is based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpec {
    pub seed: u64,
    /// Every page with `index % zero_every == zero_every - 1` is zero (0: none).
    pub zero_every: u64,
}

impl ImageSpec {
    /// What page `index` of the image (version 0) holds.
    pub fn image_page(&self, index: u64) -> Expected {
        if self.zero_every > 0 && index % self.zero_every == self.zero_every - 1 {
            Expected::Zero
        } else {
            Expected::Version(0)
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator state for (index, seed, version); never zero.
fn stream_key(index: u64, seed: u64, version: u64) -> u64 {
    let k = splitmix(index ^ splitmix(seed ^ splitmix(version)));
    if k == 0 {
        1
    } else {
        k
    }
}

#[inline]
fn next(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// The `word`-th little-endian u64 of page `index` at `version` (word < 512).
pub fn page_word(index: u64, seed: u64, version: u64, word: usize) -> u64 {
    match word {
        0 => index,
        1 => seed,
        2 => version,
        _ => {
            let mut st = stream_key(index, seed, version);
            let mut w = 0;
            for _ in HEADER_WORDS..=word {
                w = next(&mut st);
            }
            w
        }
    }
}

/// Fill `page` (exactly [`PAGE_SIZE`] bytes) with what `expected` says page `index` holds.
pub fn fill_page(page: &mut [u8], index: u64, seed: u64, expected: Expected) {
    assert_eq!(page.len(), PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
    let version = match expected {
        Expected::Zero => {
            page.fill(0);
            return;
        }
        Expected::Version(v) => v,
    };
    let mut st = stream_key(index, seed, version);
    for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
        let w = match i {
            0 => index,
            1 => seed,
            2 => version,
            _ => next(&mut st),
        };
        chunk.copy_from_slice(&w.to_le_bytes());
    }
}

/// How a page differed from what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub index: u64,
    pub expected: Expected,
    /// First differing byte offset.
    pub offset: usize,
    /// What the page looks like instead.
    pub found: Found,
}

/// A decoded guess at what a wrong page holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Zero,
    /// A well-formed page of this (index, seed, version), damaged at `offset` or not.
    Page {
        index: u64,
        seed: u64,
        version: u64,
        intact: bool,
    },
    Garbage,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let want = match self.expected {
            Expected::Zero => "zeros".to_string(),
            Expected::Version(v) => format!("version {v}"),
        };
        let got = match &self.found {
            Found::Zero => "all zeros".to_string(),
            Found::Page {
                index,
                seed,
                version,
                intact,
            } => format!(
                "{} page {index} (seed {seed:#x}) version {version}",
                if *intact { "intact" } else { "damaged" }
            ),
            Found::Garbage => "unrecognisable bytes".to_string(),
        };
        write!(
            f,
            "page {}: expected {want}, found {got} (first difference at byte {})",
            self.index, self.offset
        )
    }
}

fn read_word(page: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Compare `page` with what page `index` should hold. `None` when it matches.
pub fn check_page(page: &[u8], index: u64, seed: u64, expected: Expected) -> Option<Mismatch> {
    let offset = first_difference(page, index, seed, expected)?;
    Some(Mismatch {
        index,
        expected,
        offset,
        found: decode(page),
    })
}

/// The first byte offset where `page` differs from what it should hold.
fn first_difference(page: &[u8], index: u64, seed: u64, expected: Expected) -> Option<usize> {
    assert_eq!(page.len(), PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
    match expected {
        Expected::Zero => page.iter().position(|&b| b != 0),
        Expected::Version(v) => {
            let mut st = stream_key(index, seed, v);
            (0..WORDS)
                .find(|&i| {
                    let want = match i {
                        0 => index,
                        1 => seed,
                        2 => v,
                        _ => next(&mut st),
                    };
                    read_word(page, i) != want
                })
                .map(|i| {
                    let want = page_word(index, seed, v, i).to_le_bytes();
                    let have = &page[i * 8..i * 8 + 8];
                    i * 8 + (0..8).find(|&b| have[b] != want[b]).unwrap_or(0)
                })
        }
    }
}

/// What a page looks like: zeros, some (index, seed, version) page, or garbage.
pub fn decode(page: &[u8]) -> Found {
    if page.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    let (index, seed, version) = (read_word(page, 0), read_word(page, 1), read_word(page, 2));
    // A plausible header: check the first stream word before calling it a page.
    let mut st = stream_key(index, seed, version);
    if read_word(page, HEADER_WORDS) != next(&mut st) {
        return Found::Garbage;
    }
    let intact = first_difference(page, index, seed, Expected::Version(version)).is_none();
    Found::Page {
        index,
        seed,
        version,
        intact,
    }
}

/// Write the raw RAM image of `pages` pages to `out` (version 0 of every page).
pub fn write_image(out: &Path, pages: u64, spec: ImageSpec) -> std::io::Result<()> {
    let file = std::fs::File::create(out)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut page = vec![0u8; PAGE_SIZE];
    for index in 0..pages {
        fill_page(&mut page, index, spec.seed, spec.image_page(index));
        w.write_all(&page)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Check every page of a raw image file against `spec`; returns the mismatches (at most
/// `limit`) and the number of pages checked.
pub fn check_image(
    path: &Path,
    spec: ImageSpec,
    limit: usize,
) -> std::io::Result<(u64, Vec<Mismatch>)> {
    use std::io::Read;
    let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut page = vec![0u8; PAGE_SIZE];
    let mut bad = Vec::new();
    let mut index = 0u64;
    loop {
        match r.read_exact(&mut page) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if let Some(m) = check_page(&page, index, spec.seed, spec.image_page(index)) {
            if bad.len() < limit {
                bad.push(m);
            }
        }
        index += 1;
    }
    Ok((index, bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_every_marks_the_last_of_each_group() {
        let spec = ImageSpec {
            seed: 1,
            zero_every: 4,
        };
        let kinds: Vec<Expected> = (0..8).map(|i| spec.image_page(i)).collect();
        assert_eq!(kinds[3], Expected::Zero);
        assert_eq!(kinds[7], Expected::Zero);
        assert_eq!(kinds[0], Expected::Version(0));
        let none = ImageSpec {
            seed: 1,
            zero_every: 0,
        };
        assert!((0..8).all(|i| none.image_page(i) == Expected::Version(0)));
    }

    #[test]
    fn mismatches_name_what_was_found() {
        let mut page = vec![0u8; PAGE_SIZE];
        fill_page(&mut page, 7, 42, Expected::Version(2));
        assert_eq!(check_page(&page, 7, 42, Expected::Version(2)), None);
        let stale = check_page(&page, 7, 42, Expected::Version(3)).unwrap();
        assert_eq!(stale.offset, 16);
        assert_eq!(
            stale.found,
            Found::Page {
                index: 7,
                seed: 42,
                version: 2,
                intact: true
            }
        );
        assert!(stale.to_string().contains("expected version 3"));
        let wrong_page = check_page(&page, 8, 42, Expected::Version(2)).unwrap();
        assert_eq!(wrong_page.offset, 0);
        page[1000] ^= 1;
        let damaged = check_page(&page, 7, 42, Expected::Version(2)).unwrap();
        assert_eq!(damaged.offset, 1000);
        assert!(matches!(damaged.found, Found::Page { intact: false, .. }));
        let zeros = vec![0u8; PAGE_SIZE];
        assert_eq!(
            check_page(&zeros, 7, 42, Expected::Version(0))
                .unwrap()
                .found,
            Found::Zero
        );
        assert_eq!(check_page(&zeros, 7, 42, Expected::Zero), None);
        assert_eq!(check_page(&page, 7, 42, Expected::Zero).unwrap().offset, 0);
        assert_eq!(decode(&[0xAAu8; PAGE_SIZE]), Found::Garbage);
    }

    #[test]
    fn image_file_roundtrip_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let spec = ImageSpec {
            seed: 9,
            zero_every: 3,
        };
        write_image(&path, 10, spec).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            10 * PAGE_SIZE as u64
        );
        let (n, bad) = check_image(&path, spec, 10).unwrap();
        assert_eq!((n, bad.len()), (10, 0));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5 * PAGE_SIZE + 100] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let (_, bad) = check_image(&path, spec, 10).unwrap();
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].index, bad[0].offset), (5, 100));
    }

    proptest! {
        #[test]
        fn pages_are_distinct_and_words_agree(
            index in 0u64..1 << 40, seed in any::<u64>(), v in 0u64..1000, word in 0usize..512,
        ) {
            let mut a = vec![0u8; PAGE_SIZE];
            let mut b = vec![0u8; PAGE_SIZE];
            fill_page(&mut a, index, seed, Expected::Version(v));
            fill_page(&mut b, index, seed, Expected::Version(v + 1));
            prop_assert_ne!(&a[24..], &b[24..]);
            prop_assert_eq!(read_word(&a, word), page_word(index, seed, v, word));
            prop_assert!(check_page(&a, index, seed, Expected::Version(v)).is_none());
        }
    }
}
