//! The NBD backend against a real qemu-nbd (Unix socket and TCP on loopback).
//!
//! Run: `cargo test -p pagewise-tests --test nbd_backend`
//! Bench (ignored by default): `cargo test --release -p pagewise-tests --test nbd_backend
//! -- --ignored --nocapture`

#[path = "common/backend_conformance.rs"]
mod backend_conformance;
#[path = "common/nbd_server.rs"]
mod nbd_server;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

// Round trips over Unix and TCP, flush ordering, many requests in flight, past-the-end
// reads: the conformance suite (swapdev_backend_conformance.rs) runs them on qemu-nbd too.
use backend_conformance::{page_of, pipelined_round_trip, run_one};
use nbd_server::{free_port, require_qemu_nbd, NbdServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapdev::backend::nbd::{NbdAddress, NbdBackend, NbdOptions};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::{Backend, IoOp, IoRequest};
use swapdev::AlignedBuf;

const PAGE: usize = 4096;

/// A temporary directory holding a sparse backing file of `size` bytes.
fn backing(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("export.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .expect("backing file");
    (dir, file)
}

fn unix_server(dir: &Path, file: &Path, extra: &[&str]) -> NbdServer {
    NbdServer::unix(file, &dir.join("nbd.sock"), "swap", extra)
}

fn connect(server: &NbdServer) -> Box<dyn Backend> {
    open_backend(&server.spec(), &SpecOptions::default()).expect("connect to qemu-nbd")
}

fn read_page(b: &mut dyn Backend, page: u64) -> AlignedBuf {
    let op = IoOp::Read {
        buf: AlignedBuf::new(PAGE),
    };
    run_one(b, page * PAGE as u64, op).unwrap().unwrap()
}

#[test]
fn qemu_nbd_is_installed_and_recent() {
    let version = require_qemu_nbd();
    assert!(version.starts_with("qemu-nbd "), "{version}");
}

#[test]
fn unix_pipelined_round_trip_and_data_reaches_the_file() {
    let pages = 1024u64;
    let (dir, file) = backing(pages * PAGE as u64);
    let server = unix_server(dir.path(), &file, &[]);
    let mut b = connect(&server);
    assert_eq!(b.size().unwrap(), pages * PAGE as u64);
    assert!(
        b.describe().contains("nbd export 'swap'"),
        "{}",
        b.describe()
    );
    pipelined_round_trip(b.as_mut(), pages, 512, 64);
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
    // After the flush, the backing file itself holds the data.
    let mut raw = vec![0u8; PAGE];
    let f = std::fs::File::open(&file).unwrap();
    let written: Vec<u64> = (0..pages)
        .filter(|&p| {
            f.read_exact_at(&mut raw, p * PAGE as u64).unwrap();
            raw.iter().any(|&x| x != 0)
        })
        .collect();
    assert_eq!(written.len(), 512);
    for p in written {
        f.read_exact_at(&mut raw, p * PAGE as u64).unwrap();
        assert!(raw == page_of(p).as_slice(), "file page {p}");
    }
}

#[test]
fn large_requests_are_split_and_bounded() {
    // 40 MiB in one request exceeds qemu-nbd's 32 MiB payload limit: it must be split.
    let size = 64u64 << 20;
    let (dir, file) = backing(size);
    let server = unix_server(dir.path(), &file, &[]);
    let mut b = connect(&server);
    let mut big = AlignedBuf::new(40 << 20);
    StdRng::seed_from_u64(3).fill(big.as_mut_slice());
    let expect = big.as_slice().to_vec();
    let back = run_one(b.as_mut(), 8 << 20, IoOp::Write { buf: big })
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), 40 << 20);
    let got = run_one(
        b.as_mut(),
        8 << 20,
        IoOp::Read {
            buf: AlignedBuf::new(40 << 20),
        },
    )
    .unwrap()
    .unwrap();
    assert!(got.as_slice() == expect.as_slice());
    // Many 1 MiB writes queued at once exceed the 8 MiB in-flight bound.
    for i in 0..48u64 {
        let buf = AlignedBuf::from_slice(&vec![i as u8; 1 << 20]);
        let op = IoOp::Write { buf };
        b.submit(IoRequest {
            tag: i,
            offset: i << 20,
            op,
        })
        .unwrap();
    }
    let mut out = Vec::new();
    b.complete(&mut out, b.in_flight()).unwrap();
    assert_eq!(out.len(), 48);
    assert!(out.iter().all(|c| c.result.is_ok()));
    let p = read_page(b.as_mut(), (47 << 20) / PAGE as u64);
    assert!(p.iter().all(|&x| x == 47));
}

#[test]
fn flush_and_trim() {
    let (dir, file) = backing(64 * PAGE as u64);
    let server = unix_server(dir.path(), &file, &[]);
    let mut b = connect(&server);
    let desc = b.describe();
    assert!(desc.contains("flush") && desc.contains("trim"), "{desc}");
    for p in 0..8u64 {
        let op = IoOp::Write { buf: page_of(p) };
        b.submit(IoRequest {
            tag: p,
            offset: p * PAGE as u64,
            op,
        })
        .unwrap();
    }
    // The flush is queued behind the writes; it must complete after all of them.
    b.submit(IoRequest {
        tag: 100,
        offset: 0,
        op: IoOp::Flush,
    })
    .unwrap();
    let mut out = Vec::new();
    b.complete(&mut out, 9).unwrap();
    assert_eq!(
        out.last().unwrap().tag,
        100,
        "flush completed before a write"
    );
    assert!(out.iter().all(|c| c.result.is_ok()));

    let trim = IoOp::Trim {
        len: 2 * PAGE as u64,
    };
    assert!(run_one(b.as_mut(), 2 * PAGE as u64, trim)
        .unwrap()
        .is_none());
    for p in 0..8u64 {
        let got = read_page(b.as_mut(), p);
        if p == 2 || p == 3 {
            assert!(got.iter().all(|&x| x == 0), "trimmed page {p} not zero");
        } else {
            assert!(got.as_slice() == page_of(p).as_slice(), "page {p}");
        }
    }
}

#[test]
fn wrong_export_name_is_a_clear_error() {
    let (dir, file) = backing(1 << 20);
    let server = unix_server(dir.path(), &file, &[]);
    let nbd_server::Listen::Unix(sock) = server.listen.clone() else {
        unreachable!()
    };
    let err = NbdBackend::connect(NbdAddress::Unix(sock), "nope", NbdOptions::default())
        .err()
        .expect("unknown export must fail");
    let msg = err.to_string();
    assert!(msg.contains("export 'nope' not found on server"), "{msg}");
    // The server still serves the right name afterwards.
    let mut b = connect(&server);
    assert_eq!(read_page(b.as_mut(), 0).len(), PAGE);
}

#[test]
fn unreachable_servers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    let spec = format!("nbd+unix:///swap?socket={}", sock.display());
    let err = open_backend(&spec, &SpecOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!(
            "cannot connect to NBD server at unix socket {}",
            sock.display()
        )),
        "{err}"
    );
    let port = free_port();
    let err = open_backend(
        &format!("nbd://127.0.0.1:{port}/swap"),
        &SpecOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains(&format!(
            "cannot connect to NBD server at tcp 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

#[test]
fn two_clients_on_a_shared_export_see_flushed_writes() {
    let (dir, file) = backing(32 * PAGE as u64);
    let server = unix_server(dir.path(), &file, &[]);
    let mut a = connect(&server);
    let mut b = connect(&server);
    for p in 0..16u64 {
        run_one(a.as_mut(), p * PAGE as u64, IoOp::Write { buf: page_of(p) }).unwrap();
    }
    run_one(a.as_mut(), 0, IoOp::Flush).unwrap();
    for p in 0..16u64 {
        assert!(
            read_page(b.as_mut(), p).as_slice() == page_of(p).as_slice(),
            "page {p}"
        );
    }
    // And the other way round.
    run_one(
        b.as_mut(),
        20 * PAGE as u64,
        IoOp::Write { buf: page_of(99) },
    )
    .unwrap();
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
    assert!(read_page(a.as_mut(), 20).as_slice() == page_of(99).as_slice());
}

#[test]
fn read_only_export_refuses_writes() {
    let (dir, file) = backing(16 * PAGE as u64);
    let server = unix_server(dir.path(), &file, &["-r"]);
    let mut b = connect(&server);
    assert!(b.describe().contains("read-only"), "{}", b.describe());
    let err = b
        .submit(IoRequest {
            tag: 1,
            offset: 0,
            op: IoOp::Write { buf: page_of(1) },
        })
        .unwrap_err();
    assert!(swapdev::error_chain(&err).contains("is read-only"), "{err}");
    assert_eq!(read_page(b.as_mut(), 3).len(), PAGE);
}

#[test]
fn export_cannot_grow_or_be_read_past_its_end() {
    let (dir, file) = backing(16 * PAGE as u64);
    let server = unix_server(dir.path(), &file, &[]);
    let mut b = connect(&server);
    b.grow(16 * PAGE as u64).unwrap();
    let err = swapdev::error_chain(&b.grow(1 << 30).unwrap_err());
    assert!(err.contains("fixed size of 65536 bytes"), "{err}");
    let err = b
        .submit(IoRequest {
            tag: 1,
            offset: 16 * PAGE as u64,
            op: IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        })
        .unwrap_err();
    assert!(
        swapdev::error_chain(&err).contains("past the end of NBD export 'swap'"),
        "{err}"
    );
}

/// 4 KiB random reads over a 256 MiB export on a Unix socket at QD 32 (IOPS) and QD 1 (mean
/// latency).
#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn bench_unix_random_read() {
    let pages = 65536u64;
    let (dir, file) = backing(pages * PAGE as u64);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        let chunk = vec![0xA5u8; 1 << 20];
        for i in 0..(pages * PAGE as u64) >> 20 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
    }
    let server = unix_server(dir.path(), &file, &[]);
    let mut b = connect(&server);
    for (qd, total) in [(32usize, 100_000u64), (1, 20_000)] {
        let mut rng = StdRng::seed_from_u64(1);
        let mut out = Vec::new();
        let start = Instant::now();
        for i in 0..total {
            if b.in_flight() >= qd {
                out.clear();
                b.complete(&mut out, 1).unwrap();
            }
            let page = rng.random_range(0..pages);
            let op = IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            };
            b.submit(IoRequest {
                tag: i,
                offset: page * PAGE as u64,
                op,
            })
            .unwrap();
        }
        b.complete(&mut out, b.in_flight()).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "nbd unix QD{qd} 4KiB random read: {total} reads in {secs:.2} s = {:.0} IOPS, \
             {:.1} us mean per read at this depth",
            total as f64 / secs,
            secs * 1e6 * qd as f64 / total as f64
        );
    }
}

#[test]
fn server_dying_fails_outstanding_and_later_requests_clearly() {
    let (dir, file) = backing(64 * PAGE as u64);
    let server = unix_server(dir.path(), &file, &[]);
    let mut b = connect(&server);
    run_one(b.as_mut(), 0, IoOp::Write { buf: page_of(0) }).unwrap();
    drop(server); // kills qemu-nbd
                  // Whatever was in flight and whatever comes next fails with a cause, and nothing panics
                  // or raises SIGPIPE.
    let mut failures = Vec::new();
    for p in 0..32u64 {
        match b.submit(IoRequest {
            tag: p,
            offset: p * PAGE as u64,
            op: IoOp::Write { buf: page_of(p) },
        }) {
            Ok(()) => {}
            Err(e) => failures.push(e.to_string()),
        }
    }
    let mut out = Vec::new();
    b.complete(&mut out, b.in_flight()).unwrap();
    failures.extend(
        out.into_iter()
            .filter_map(|c| c.result.err())
            .map(|e| e.to_string()),
    );
    assert_eq!(failures.len(), 32, "{failures:?}");
    for f in &failures {
        assert!(f.contains("NBD server at unix socket"), "{f}");
    }
}

/// A raw memory image served over NBD by the pager's image source (the same backend the
/// swap device uses, on an I/O thread for its completion fd): data pages come back intact,
/// all-zero pages as zero pages, pages past the end of the export as zero without I/O.
#[test]
fn image_source_reads_a_raw_image_over_nbd() {
    use pager::source::{ImageFileSource, PageContent, PageSource};
    require_qemu_nbd();
    let pages = 64u64;
    let (dir, file) = backing(pages * PAGE as u64);
    let mut rng = StdRng::seed_from_u64(5);
    let mut image = vec![0u8; pages as usize * PAGE];
    for p in (0..pages as usize).filter(|p| !p.is_multiple_of(4)) {
        rng.fill(&mut image[p * PAGE..(p + 1) * PAGE]);
    }
    std::fs::write(&file, &image).expect("write image");
    let server = unix_server(dir.path(), &file, &["-r"]);
    let mut src = ImageFileSource::open_spec(&server.spec(), PAGE, pages + 8).expect("open");
    assert!(src.describe().contains("nbd"), "{}", src.describe());
    for p in 0..pages + 8 {
        src.submit(p, p + 1000).expect("submit");
    }
    src.flush().expect("flush");
    let mut out = Vec::new();
    while out.len() < (pages + 8) as usize {
        let mut fds = [nix::poll::PollFd::new(
            src.completion_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).expect("poll");
        assert_eq!(
            n,
            1,
            "completion fd not readable, {} in flight",
            src.in_flight()
        );
        src.poll(&mut out, 0).expect("poll source");
    }
    assert_eq!(src.in_flight(), 0);
    out.sort_by_key(|c| c.page);
    for c in &out {
        assert_eq!(c.tag, c.page + 1000);
        let p = c.page as usize;
        match c.result.as_ref().expect("read") {
            PageContent::Zero => assert!(p.is_multiple_of(4) || p >= pages as usize, "page {p}"),
            got => {
                assert!(
                    p < pages as usize && !p.is_multiple_of(4),
                    "page {p} had data"
                );
                assert_eq!(
                    got.bytes(PAGE),
                    Some(&image[p * PAGE..(p + 1) * PAGE]),
                    "page {p}"
                );
            }
        }
    }
    // A server that went away fails reads as I/O errors (retryable), not as zeros.
    drop(server);
    src.submit(1, 1).expect("submit");
    let mut out = Vec::new();
    src.poll(&mut out, 1).expect("poll");
    assert!(
        matches!(
            out[0].result,
            Err(pager::source::SourceError::Io { page: 1, .. })
        ),
        "{:?}",
        out[0].result
    );
}
