//! Backend conformance checks written against `dyn Backend` only, so a generic backend suite
//! can fold them in: used by nfs_backend.rs (NFS-Ganesha) and nbdkit_backend.rs (nbdkit).
//!
//! Use with `#[path = "nfs_conformance/mod.rs"] mod conformance;`.

#![allow(dead_code)] // Each test binary uses a different subset.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapdev::backend::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use swapdev::AlignedBuf;

pub const PAGE: usize = 4096;

pub fn page_of(seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(PAGE);
    StdRng::seed_from_u64(seed).fill(buf.as_mut_slice());
    buf
}

pub fn run_one(
    b: &mut dyn Backend,
    offset: u64,
    op: IoOp,
) -> Result<Option<AlignedBuf>, BackendError> {
    b.submit(IoRequest { tag: 1, offset, op })?;
    let mut out = Vec::new();
    b.complete(&mut out, 1)?;
    assert_eq!(out.len(), 1);
    out.pop().unwrap().result
}

pub fn read_at(b: &mut dyn Backend, offset: u64, len: usize) -> AlignedBuf {
    let op = IoOp::Read {
        buf: AlignedBuf::new(len),
    };
    run_one(b, offset, op)
        .unwrap()
        .expect("read returns its buffer")
}

/// `count` distinct random pages of `pages`.
pub fn random_pages(pages: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut targets: Vec<u64> = (0..pages).collect();
    for i in 0..count {
        let j = rng.random_range(i..targets.len());
        targets.swap(i, j);
    }
    targets.truncate(count);
    targets
}

/// Write `targets` (content `page_of(page)`) with up to `qd` in flight, then read them back
/// with up to `qd` in flight and compare. Returns the greatest number in flight seen.
pub fn pipelined_round_trip(b: &mut dyn Backend, targets: &[u64], qd: usize) -> usize {
    let mut out: Vec<IoCompletion> = Vec::new();
    let mut max_seen = 0;
    for &page in targets {
        if b.in_flight() >= qd {
            b.complete(&mut out, 1).unwrap();
        }
        let op = IoOp::Write { buf: page_of(page) };
        b.submit(IoRequest {
            tag: page,
            offset: page * PAGE as u64,
            op,
        })
        .unwrap();
        max_seen = max_seen.max(b.in_flight());
    }
    b.complete(&mut out, b.in_flight()).unwrap();
    assert_eq!(out.len(), targets.len());
    for c in &out {
        let buf = c
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("write {}: {e}", c.tag));
        assert!(buf.is_some(), "a write gives its buffer back");
    }
    out.clear();
    for &page in targets {
        if b.in_flight() >= qd {
            b.complete(&mut out, 1).unwrap();
        }
        let op = IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        };
        b.submit(IoRequest {
            tag: page,
            offset: page * PAGE as u64,
            op,
        })
        .unwrap();
    }
    b.complete(&mut out, b.in_flight()).unwrap();
    assert_eq!(out.len(), targets.len());
    for c in out {
        let buf = c.result.unwrap().unwrap();
        assert!(
            buf.as_slice() == page_of(c.tag).as_slice(),
            "page {} differs",
            c.tag
        );
    }
    max_seen
}

/// One request much larger than any server's per-RPC maximum, unaligned offset, read back.
pub fn large_unaligned_request(b: &mut dyn Backend, offset: u64, len: usize) {
    let mut data = AlignedBuf::new(len);
    StdRng::seed_from_u64(99).fill(data.as_mut_slice());
    let want = data.as_slice().to_vec();
    run_one(b, offset, IoOp::Write { buf: data }).unwrap();
    let got = read_at(b, offset, len);
    assert!(got.as_slice() == &want[..], "large request round trip");
}

/// Writes submitted without waiting, then a flush: when the flush completes, every write
/// before it has completed too (its completion is returned no later than the flush's).
/// Returns after checking; the caller may then check the server's copy.
pub fn flush_covers_earlier_writes(b: &mut dyn Backend, pages: &[u64]) {
    for &p in pages {
        let op = IoOp::Write {
            buf: page_of(p ^ 0xf1),
        };
        b.submit(IoRequest {
            tag: p,
            offset: p * PAGE as u64,
            op,
        })
        .unwrap();
    }
    b.submit(IoRequest {
        tag: u64::MAX,
        offset: 0,
        op: IoOp::Flush,
    })
    .unwrap();
    let mut out = Vec::new();
    let mut seen_writes = 0;
    while b.in_flight() > 0 {
        out.clear();
        b.complete(&mut out, 1).unwrap();
        for c in &out {
            assert!(c.result.is_ok(), "{}: {:?}", c.tag, c.result);
            if c.tag == u64::MAX {
                assert_eq!(
                    seen_writes,
                    pages.len(),
                    "flush completed before its writes"
                );
            } else {
                seen_writes += 1;
            }
        }
    }
    assert_eq!(seen_writes, pages.len());
}

/// Trim completes, keeps the size, and leaves the data next to it intact.
pub fn trim_is_safe(b: &mut dyn Backend, page: u64) {
    let size = b.size().unwrap();
    for p in [page - 1, page, page + 1] {
        run_one(b, p * PAGE as u64, IoOp::Write { buf: page_of(p) }).unwrap();
    }
    let trim = IoOp::Trim { len: PAGE as u64 };
    run_one(b, page * PAGE as u64, trim).unwrap();
    assert_eq!(b.size().unwrap(), size, "trim keeps the size");
    for p in [page - 1, page + 1] {
        assert!(
            read_at(b, p * PAGE as u64, PAGE).as_slice() == page_of(p).as_slice(),
            "trim of page {page} damaged page {p}"
        );
    }
}

/// Many requests submitted before the first `complete` (no artificial limit).
pub fn many_before_complete(b: &mut dyn Backend, n: u64) {
    for i in 0..n {
        let op = IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        };
        b.submit(IoRequest {
            tag: i,
            offset: i * PAGE as u64,
            op,
        })
        .unwrap();
    }
    assert_eq!(b.in_flight(), n as usize);
    let mut out = Vec::new();
    b.complete(&mut out, n as usize).unwrap();
    assert_eq!(out.len(), n as usize);
    assert!(out.iter().all(|c| c.result.is_ok()));
    assert_eq!(b.in_flight(), 0);
}
