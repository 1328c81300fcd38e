//! One conformance suite for every `swapdev::backend::Backend`: what the swap device and the
//! image source rely on, checked the same way for the file backend, the in-memory backend,
//! the I/O-thread adapter and qemu-nbd. A new backend (e.g. NFS) runs it with one line:
//!
//! ```ignore
//! backend_conformance::conformance(&|| Box::new(MyBackend::open(...)));
//! ```
//!
//! The factory opens a handle onto **the same store** every time it is called (data written
//! and flushed through one handle must be read back through the next). The store holds at
//! least [`STORE_BYTES`] bytes, or can grow to that.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapdev::backend::{Backend, IoCompletion, IoOp, IoRequest};
use swapdev::AlignedBuf;

pub const PAGE: usize = 4096;
/// The suite uses the first 4 MiB of the store.
pub const STORE_BYTES: u64 = 4 << 20;
const PAGES: u64 = STORE_BYTES / PAGE as u64;

pub type Factory<'a> = &'a dyn Fn() -> Box<dyn Backend>;

/// Run every check on handles from `open`.
pub fn conformance(open: Factory) {
    let mut b = open();
    prepare(b.as_mut());
    describes_itself_and_reports_sane_limits(b.as_mut());
    nothing_in_flight_completes_nothing_without_waiting(b.as_mut());
    pipelined_round_trip(b.as_mut(), PAGES, 512, 64);
    many_requests_before_any_completion(b.as_mut());
    completion_fd_signals_when_it_exists(b.as_mut());
    a_flush_completes_after_the_writes_before_it(b.as_mut());
    drop(b);
    flushed_writes_are_seen_by_the_next_handle(open);
    let mut b = open();
    trim_keeps_the_rest_intact(b.as_mut());
    reads_past_the_end_fail_and_are_never_zero_filled(b.as_mut());
    grow_never_shrinks(b.as_mut());
}

pub fn page_of(seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(PAGE);
    StdRng::seed_from_u64(seed).fill(buf.as_mut_slice());
    buf
}

/// Submit one request and wait for its completion.
pub fn run_one(
    b: &mut dyn Backend,
    offset: u64,
    op: IoOp,
) -> Result<Option<AlignedBuf>, swapdev::backend::BackendError> {
    b.submit(IoRequest { tag: 1, offset, op })?;
    let mut out = Vec::new();
    b.complete(&mut out, 1)?;
    assert_eq!(out.len(), 1, "one request, one completion");
    out.pop().unwrap().result
}

fn read_at(b: &mut dyn Backend, page: u64) -> AlignedBuf {
    let op = IoOp::Read {
        buf: AlignedBuf::new(PAGE),
    };
    run_one(b, page * PAGE as u64, op)
        .unwrap_or_else(|e| panic!("{}: read of page {page}: {e}", b.describe()))
        .expect("a read returns its buffer")
}

fn write_at(b: &mut dyn Backend, page: u64, buf: AlignedBuf) {
    run_one(b, page * PAGE as u64, IoOp::Write { buf })
        .unwrap_or_else(|e| panic!("{}: write of page {page}: {e}", b.describe()));
}

fn prepare(b: &mut dyn Backend) {
    if b.size().unwrap() < STORE_BYTES {
        b.grow(STORE_BYTES)
            .unwrap_or_else(|e| panic!("{}: store smaller than 4 MiB: {e}", b.describe()));
    }
    assert!(b.size().unwrap() >= STORE_BYTES);
}

fn describes_itself_and_reports_sane_limits(b: &mut dyn Backend) {
    assert!(!b.describe().is_empty());
    let a = b.alignment();
    assert!(
        a.is_power_of_two() && a <= swapdev::BUF_ALIGN,
        "{}: alignment {a}",
        b.describe()
    );
}

fn nothing_in_flight_completes_nothing_without_waiting(b: &mut dyn Backend) {
    assert_eq!(b.in_flight(), 0);
    let mut out = Vec::new();
    let t = std::time::Instant::now();
    assert_eq!(b.complete(&mut out, 0).unwrap(), 0);
    assert!(out.is_empty());
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
}

/// `count` random distinct pages of `pages` written then read back with up to `qd` in
/// flight; every completion carries its own tag.
pub fn pipelined_round_trip(b: &mut dyn Backend, pages: u64, count: usize, qd: usize) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut targets: Vec<u64> = (0..pages).collect();
    for i in 0..count {
        let j = rng.random_range(i..targets.len());
        targets.swap(i, j);
    }
    targets.truncate(count);
    for write in [true, false] {
        let mut out: Vec<IoCompletion> = Vec::new();
        for &page in &targets {
            if b.in_flight() >= qd {
                b.complete(&mut out, 1).unwrap();
            }
            let op = if write {
                IoOp::Write { buf: page_of(page) }
            } else {
                IoOp::Read {
                    buf: AlignedBuf::new(PAGE),
                }
            };
            b.submit(IoRequest {
                tag: page,
                offset: page * PAGE as u64,
                op,
            })
            .unwrap();
        }
        let left = b.in_flight();
        b.complete(&mut out, left).unwrap();
        assert_eq!(b.in_flight(), 0);
        assert_eq!(out.len(), count);
        for c in out {
            let r = c.result.unwrap_or_else(|e| panic!("page {}: {e}", c.tag));
            if !write {
                let buf = r.expect("a read returns its buffer");
                assert!(
                    buf.as_slice() == page_of(c.tag).as_slice(),
                    "{}: page {} differs",
                    b.describe(),
                    c.tag
                );
            }
        }
    }
}

fn many_requests_before_any_completion(b: &mut dyn Backend) {
    for i in 0..300u64 {
        let op = IoOp::Write {
            buf: page_of(10_000 + i),
        };
        b.submit(IoRequest {
            tag: i,
            offset: i * PAGE as u64,
            op,
        })
        .unwrap();
    }
    assert_eq!(b.in_flight(), 300);
    let mut out = Vec::new();
    b.complete(&mut out, 300).unwrap();
    let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..300).collect::<Vec<_>>());
    assert!(out.iter().all(|c| c.result.is_ok()));
    for i in [0u64, 150, 299] {
        assert!(read_at(b, i).as_slice() == page_of(10_000 + i).as_slice());
    }
}

/// A backend with a completion fd makes it readable once a completion can be collected
/// (after `complete(.., 0)` pushed the request out).
fn completion_fd_signals_when_it_exists(b: &mut dyn Backend) {
    if b.completion_fd().is_none() {
        return;
    }
    b.submit(IoRequest {
        tag: 77,
        offset: 0,
        op: IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        },
    })
    .unwrap();
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    while out.is_empty() {
        b.complete(&mut out, 0).unwrap();
        if !out.is_empty() {
            break;
        }
        let fd = b.completion_fd().unwrap();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert_eq!(
            n,
            1,
            "{}: completion fd never became readable",
            b.describe()
        );
        if let Some(fd) = b.completion_fd() {
            // Reset an eventfd before collecting, as callers do.
            let mut v = [0u8; 8];
            let _ = nix::unistd::read(fd, &mut v);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
    assert_eq!(out[0].tag, 77);
}

fn a_flush_completes_after_the_writes_before_it(b: &mut dyn Backend) {
    for i in 0..32u64 {
        b.submit(IoRequest {
            tag: i,
            offset: (400 + i) * PAGE as u64,
            op: IoOp::Write {
                buf: page_of(20_000 + i),
            },
        })
        .unwrap();
    }
    b.submit(IoRequest {
        tag: 1000,
        offset: 0,
        op: IoOp::Flush,
    })
    .unwrap();
    let mut out = Vec::new();
    b.complete(&mut out, 33).unwrap();
    assert_eq!(out.len(), 33);
    let at = out.iter().position(|c| c.tag == 1000).unwrap();
    assert_eq!(
        at,
        32,
        "{}: the flush completed before a write",
        b.describe()
    );
    assert!(out.iter().all(|c| c.result.is_ok()));
}

fn flushed_writes_are_seen_by_the_next_handle(open: Factory) {
    let mut b = open();
    for i in 0..32u64 {
        assert!(
            read_at(b.as_mut(), 400 + i).as_slice() == page_of(20_000 + i).as_slice(),
            "{}: page {} written and flushed by the previous handle",
            b.describe(),
            400 + i
        );
    }
}

fn trim_keeps_the_rest_intact(b: &mut dyn Backend) {
    for p in 600..604 {
        write_at(b, p, page_of(p));
    }
    run_one(
        b,
        601 * PAGE as u64,
        IoOp::Trim {
            len: 2 * PAGE as u64,
        },
    )
    .unwrap_or_else(|e| panic!("{}: trim: {e}", b.describe()));
    assert!(read_at(b, 600).as_slice() == page_of(600).as_slice());
    assert!(read_at(b, 603).as_slice() == page_of(603).as_slice());
    // Trimmed bytes may read as zeros or as before (trim is advisory), nothing else.
    for p in [601, 602] {
        let got = read_at(b, p);
        assert!(
            got.iter().all(|&x| x == 0) || got.as_slice() == page_of(p).as_slice(),
            "{}: trimmed page {p} reads as something else",
            b.describe()
        );
    }
}

fn reads_past_the_end_fail_and_are_never_zero_filled(b: &mut dyn Backend) {
    let size = b.size().unwrap();
    let end = size.div_ceil(PAGE as u64) * PAGE as u64;
    let op = IoOp::Read {
        buf: AlignedBuf::new(2 * PAGE),
    };
    let r = run_one(b, end - PAGE as u64, op);
    assert!(
        r.is_err(),
        "{}: a read across the end of the store ({size} bytes) succeeded",
        b.describe()
    );
    assert_eq!(b.in_flight(), 0);
}

fn grow_never_shrinks(b: &mut dyn Backend) {
    let size = b.size().unwrap();
    b.grow(PAGE as u64).unwrap();
    assert_eq!(
        b.size().unwrap(),
        size,
        "{}: grow shrank the store",
        b.describe()
    );
    match b.grow(size + STORE_BYTES) {
        Ok(()) => assert!(b.size().unwrap() >= size + STORE_BYTES),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(
                b.size().unwrap(),
                size,
                "{}: failed grow changed the size",
                b.describe()
            );
        }
    }
}
