//! XBZRLE (Svärd et al., VEE'11): a page sent again is encoded as its difference from the
//! copy sent before, as runs.
//!
//! ```text
//! body := pair*
//! pair := skip:varint  len:varint  xor:[u8; len]
//! ```
//! `skip` bytes are unchanged, then `len` bytes change: each is the old byte XOR the new one.
//! Varints are LEB128, at most 4 bytes (a page is at most 2 MiB), never overlong. `len` is
//! at least 1; only the first pair may have `skip` 0. Bytes after the last pair are
//! unchanged, so an empty body says "the same page". The decoder refuses anything else,
//! and anything that runs past the page.
//!
//! The encoder merges two changed runs separated by a gap of at most [`MERGE_GAP`] unchanged
//! bytes (a new pair would cost at least two varint bytes, so merging is never longer).

/// Unchanged gaps this short are sent inside the changed run around them.
const MERGE_GAP: usize = 2;
/// The longest varint (4 x 7 = 28 bits, above any page size).
const MAX_VARINT: usize = 4;

/// A delta that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("the delta ends inside a run length at byte {at}")]
    TruncatedLength { at: usize },
    #[error("the run length at byte {at} is longer than {MAX_VARINT} bytes or overlong")]
    BadLength { at: usize },
    #[error("the delta's run at byte {at} has length 0")]
    EmptyRun { at: usize },
    #[error("the delta's pair at byte {at} skips 0 bytes after another pair")]
    EmptySkip { at: usize },
    #[error("the delta runs to page byte {end}, past the {page}-byte page")]
    PastPage { end: u64, page: usize },
    #[error("the delta ends inside a changed run ({missing} bytes missing)")]
    TruncatedRun { missing: usize },
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Read a varint at `*at`; refuses more than [`MAX_VARINT`] bytes and overlong forms.
fn get_varint(body: &[u8], at: &mut usize) -> Result<usize, DeltaError> {
    let start = *at;
    let mut v = 0usize;
    for i in 0..MAX_VARINT {
        let Some(&b) = body.get(*at) else {
            return Err(DeltaError::TruncatedLength { at: start });
        };
        *at += 1;
        v |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // A last byte of 0 after others would be an overlong form of a shorter varint.
            if i > 0 && b == 0 {
                return Err(DeltaError::BadLength { at: start });
            }
            return Ok(v);
        }
    }
    Err(DeltaError::BadLength { at: start })
}

/// Where the bytes of `old` and `new` differ next, from `from`.
fn next_change(old: &[u8], new: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    // Whole words first: most of a sparsely written page is unchanged.
    while i + 8 <= old.len() {
        let a = u64::from_ne_bytes(old[i..i + 8].try_into().expect("8 bytes"));
        let b = u64::from_ne_bytes(new[i..i + 8].try_into().expect("8 bytes"));
        if a != b {
            break;
        }
        i += 8;
    }
    (i..old.len()).find(|&j| old[j] != new[j])
}

/// Encode `new` against `old` (same length) into `out` (cleared first). Gives up and returns
/// `false` as soon as the body would be `limit` bytes or longer (then send the page whole).
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    assert_eq!(old.len(), new.len(), "a delta needs two pages of one size");
    out.clear();
    let mut pos = 0;
    while let Some(start) = next_change(old, new, pos) {
        // The changed run, extended over gaps of at most MERGE_GAP unchanged bytes.
        let mut end = start + 1;
        loop {
            while end < new.len() && old[end] != new[end] {
                end += 1;
            }
            let gap_end = (end + MERGE_GAP + 1).min(new.len());
            match (end..gap_end).find(|&j| old[j] != new[j]) {
                Some(j) => end = j,
                None => break,
            }
        }
        put_varint(out, start - pos);
        put_varint(out, end - start);
        if out.len() + (end - start) >= limit {
            return false;
        }
        out.extend(
            old[start..end]
                .iter()
                .zip(&new[start..end])
                .map(|(a, b)| a ^ b),
        );
        pos = end;
    }
    out.len() < limit
}

/// Apply `body` to `page` in place (it held the copy the delta was made against). On an
/// error `page` may be partly changed: the caller discards it.
pub fn apply(page: &mut [u8], body: &[u8]) -> Result<(), DeltaError> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < body.len() {
        let pair = at;
        let skip = get_varint(body, &mut at)?;
        if skip == 0 && pair > 0 {
            return Err(DeltaError::EmptySkip { at: pair });
        }
        let len_at = at;
        let len = get_varint(body, &mut at)?;
        if len == 0 {
            return Err(DeltaError::EmptyRun { at: len_at });
        }
        let end = pos + skip + len;
        if end > page.len() {
            return Err(DeltaError::PastPage {
                end: end as u64,
                page: page.len(),
            });
        }
        // Lazily: the shortfall is only defined when there is one.
        let xor = body
            .get(at..at + len)
            .ok_or_else(|| DeltaError::TruncatedRun {
                missing: at + len - body.len(),
            })?;
        at += len;
        for (b, x) in page[pos + skip..end].iter_mut().zip(xor) {
            *b ^= x;
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: usize = 4096;

    fn page(seed: u8) -> Vec<u8> {
        (0..PS)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn bytes_are_pinned() {
        let old = vec![0u8; 300];
        let mut new = old.clone();
        new[2] = 0x11;
        new[3] = 0x22;
        new[5] = 0x33; // a gap of 1: merged into the run
        new[200] = 0x44; // skip 194 = varint 0xc2 0x01
        let mut out = Vec::new();
        assert!(encode(&old, &new, &mut out, 100));
        assert_eq!(
            out,
            [2, 4, 0x11, 0x22, 0x00, 0x33, 0xc2, 0x01, 1, 0x44],
            "skip 2, len 4, xor; skip 194, len 1, xor"
        );
        let mut back = old.clone();
        apply(&mut back, &out).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn a_same_page_is_an_empty_delta_and_a_rewritten_one_gives_up() {
        let old = page(1);
        let mut out = vec![9];
        assert!(encode(&old, &old, &mut out, PS));
        assert!(out.is_empty());
        assert!(!encode(&old, &page(2), &mut out, PS), "every byte changed");
    }

    /// Found by the xbzrle_apply fuzz target: the shortfall was computed for every run,
    /// and underflowed (a panic with overflow checks) for one that fits.
    #[test]
    fn a_run_that_fits_computes_no_shortfall() {
        let mut p = vec![0u8; 16];
        apply(&mut p, &[1, 2, 7, 7, 3, 1, 9]).unwrap();
        assert_eq!(&p[..7], &[0, 7, 7, 0, 0, 0, 9]);
    }

    #[test]
    fn refuses_each_malformed_form() {
        let mut p = vec![0u8; 16];
        let cases: [(&[u8], DeltaError); 7] = [
            (&[0x80], DeltaError::TruncatedLength { at: 0 }),
            (&[0x80, 0x00], DeltaError::BadLength { at: 0 }),
            (
                &[0x80, 0x80, 0x80, 0x80, 0x01],
                DeltaError::BadLength { at: 0 },
            ),
            (&[1, 0], DeltaError::EmptyRun { at: 1 }),
            (&[1, 1, 7, 0, 1, 7], DeltaError::EmptySkip { at: 3 }),
            (&[15, 2, 1, 1], DeltaError::PastPage { end: 17, page: 16 }),
            (&[1, 3, 7], DeltaError::TruncatedRun { missing: 2 }),
        ];
        for (body, want) in cases {
            assert_eq!(apply(&mut p, body), Err(want), "{body:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(
            old in proptest::collection::vec(any::<u8>(), PS),
            writes in proptest::collection::vec((0..PS, any::<u8>()), 0..200),
        ) {
            let mut new = old.clone();
            for (i, b) in writes {
                new[i] = b;
            }
            let mut out = Vec::new();
            if encode(&old, &new, &mut out, PS) {
                prop_assert!(out.len() < PS);
                let mut back = old.clone();
                apply(&mut back, &out).unwrap();
                prop_assert_eq!(back, new);
            }
        }

        #[test]
        fn every_truncation_is_refused_or_decodes_short(
            old in proptest::collection::vec(any::<u8>(), PS),
            writes in proptest::collection::vec((0..PS, 1..=255u8), 1..50),
        ) {
            let mut new = old.clone();
            for (i, x) in writes {
                new[i] ^= x;
            }
            let mut out = Vec::new();
            prop_assume!(encode(&old, &new, &mut out, PS));
            for cut in 0..out.len() {
                let mut back = old.clone();
                // A cut between pairs is a valid shorter delta: it cannot give `new`.
                if apply(&mut back, &out[..cut]).is_ok() {
                    prop_assert_ne!(&back, &new, "cut at {}", cut);
                }
            }
        }

        #[test]
        fn never_panics_or_writes_past_the_page(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut p = vec![0u8; 64];
            let _ = apply(&mut p, &body);
            prop_assert_eq!(p.len(), 64);
        }
    }
}
