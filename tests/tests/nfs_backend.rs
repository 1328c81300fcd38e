//! The NFS backend (`nfs://`, libnfs, NFSv3) against a real NFS-Ganesha started by each test.
//!
//! Run: `cargo test -p pagewise-tests --test nfs_backend`
//! Bench (ignored by default): `cargo test --release -p pagewise-tests --test nfs_backend
//! bench -- --ignored --nocapture`

#[path = "nfs_conformance/mod.rs"]
mod conformance;
#[path = "common/nfs_server.rs"]
mod nfs_server;

use std::os::unix::fs::FileExt;
use std::time::Instant;

use conformance::*;
use nfs_server::NfsServer;
use swapdev::backend::nfs::{NfsBackend, NfsError, NfsOptions};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use swapdev::AlignedBuf;

fn create(spec: &str) -> Box<dyn Backend> {
    let opts = SpecOptions {
        create: true,
        ..SpecOptions::default()
    };
    open_backend(spec, &opts).unwrap_or_else(|e| panic!("open {spec}: {e}"))
}

#[test]
fn conformance_read_write_flush_trim() {
    let server = NfsServer::start();
    let spec = server.spec("conf.img");
    let mut b = create(&spec);
    let pages = 1024u64;
    b.grow(pages * PAGE as u64).unwrap();
    assert_eq!(b.size().unwrap(), pages * PAGE as u64);
    assert_eq!(
        std::fs::metadata(server.file("conf.img")).unwrap().len(),
        pages * PAGE as u64,
        "grow is a SETATTR on the server"
    );
    assert!(b.describe().contains("NFSv3"), "{}", b.describe());
    assert_eq!(b.alignment(), 1);

    // 512 random pages at QD 64: the backend really keeps many requests in flight.
    let targets = random_pages(pages, 512, 7);
    let max_seen = pipelined_round_trip(b.as_mut(), &targets, 64);
    assert!(max_seen >= 32, "only {max_seen} requests were in flight");
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
    // The server's file holds the data.
    let f = std::fs::File::open(server.file("conf.img")).unwrap();
    let mut raw = vec![0u8; PAGE];
    for &p in targets.iter().take(64) {
        f.read_exact_at(&mut raw, p * PAGE as u64).unwrap();
        assert!(raw == page_of(p).as_slice(), "page {p} on the server");
    }

    // Larger than rtmax/wtmax, unaligned: libnfs splits it into many RPCs.
    large_unaligned_request(b.as_mut(), 12345, 3 << 20);
    flush_covers_earlier_writes(b.as_mut(), &[3, 900, 17, 4]);
    let mut raw = vec![0u8; PAGE];
    f.read_exact_at(&mut raw, 900 * PAGE as u64).unwrap();
    assert!(raw == page_of(900 ^ 0xf1).as_slice());
    trim_is_safe(b.as_mut(), 500);
    many_before_complete(b.as_mut(), 300);

    // Reading past the end is Short, never zero-filled.
    let end = b.size().unwrap();
    let err = run_one(
        b.as_mut(),
        end - 100,
        IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, BackendError::Short { done: 100, .. }),
        "{err:?}"
    );
    // Over the 1 GiB request limit: refused at submit, nothing sent (the buffer is never
    // touched, so it costs no memory).
    let err = b
        .submit(IoRequest {
            tag: 5,
            offset: 0,
            op: IoOp::Read {
                buf: AlignedBuf::new(swapdev::backend::nfs::MAX_REQUEST + PAGE),
            },
        })
        .unwrap_err();
    assert!(swapdev::error_chain(&err).contains("limit"), "{err}");
    assert_eq!(b.in_flight(), 0);
    // Zero-length requests complete at once.
    run_one(
        b.as_mut(),
        0,
        IoOp::Read {
            buf: AlignedBuf::new(0),
        },
    )
    .unwrap();
}

#[test]
fn two_clients_see_each_others_writes_without_reopening() {
    let server = NfsServer::start();
    let spec = server.spec("shared.img");
    let mut a = create(&spec);
    a.grow(64 * PAGE as u64).unwrap();
    let mut b = open_backend(&spec, &SpecOptions::default()).unwrap();
    assert_eq!(b.size().unwrap(), 64 * PAGE as u64);
    for round in 0..3u64 {
        run_one(
            a.as_mut(),
            5 * PAGE as u64,
            IoOp::Write {
                buf: page_of(round),
            },
        )
        .unwrap();
        run_one(a.as_mut(), 0, IoOp::Flush).unwrap();
        // No client cache: B reads A's latest write at once.
        assert!(read_at(b.as_mut(), 5 * PAGE as u64, PAGE).as_slice() == page_of(round).as_slice());
    }
}

#[test]
fn setup_errors_name_server_export_and_path() {
    let mut server = NfsServer::start();
    let export = server.export_path().display().to_string();

    // Not under any export.
    let err = NfsBackend::connect("127.0.0.1", "/no/such/export/x.img", NfsOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, NfsError::NoExport { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.1") && msg.contains("/no/such/export/x.img") && msg.contains(&export),
        "{msg}"
    );
    eprintln!("outside every export: {msg}");

    // A missing file without create.
    let err = open_backend(&server.spec("missing.img"), &SpecOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cannot open /missing.img in export") && err.contains(&export),
        "{err}"
    );
    eprintln!("missing file: {err}");
    // A missing directory even with create.
    let err = NfsBackend::connect(
        "127.0.0.1",
        &format!("{export}/nodir/x.img"),
        NfsOptions {
            create: true,
            ..NfsOptions::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, NfsError::Open { .. }), "{err:?}");

    // The server is down (rpcbind still answers with Ganesha's stale registration).
    server.kill();
    let t = Instant::now();
    let err = open_backend(&server.spec("x.img"), &SpecOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("NFS server 127.0.0.1 did not answer") && err.contains(&export),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    eprintln!("server down: {err}");

    // Nothing answers at all (no rpcbind either): only when the helper owns rpcbind (on a
    // machine whose system rpcbind runs, stopping it is not ours to do).
    if server.kill_rpcbind() {
        let err = open_backend(&server.spec("x.img"), &SpecOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("NFS server 127.0.0.1 did not answer") && err.contains(&export),
            "{err}"
        );
        eprintln!("with no rpcbind: {err}");
    }
}

#[test]
fn server_dying_fails_outstanding_and_later_requests_clearly() {
    let mut server = NfsServer::start();
    let spec = server.spec("dies.img");
    let mut b = create(&spec);
    b.grow(256 * PAGE as u64).unwrap();
    run_one(b.as_mut(), 0, IoOp::Write { buf: page_of(1) }).unwrap();
    server.kill();
    let mut failed = 0;
    for i in 0..32u64 {
        let op = IoOp::Write { buf: page_of(i) };
        match b.submit(IoRequest {
            tag: i,
            offset: i * PAGE as u64,
            op,
        }) {
            Ok(()) => {}
            Err(e) => {
                failed += 1;
                assert!(swapdev::error_chain(&e).contains("127.0.0.1"), "{e}");
            }
        }
    }
    let mut out: Vec<IoCompletion> = Vec::new();
    while b.in_flight() > 0 {
        b.complete(&mut out, 1).unwrap();
    }
    for c in &out {
        let e = c
            .result
            .as_ref()
            .expect_err("nothing succeeds on a dead server");
        let msg = swapdev::error_chain(e);
        assert!(
            msg.contains("127.0.0.1") && msg.contains("dies.img"),
            "{msg}"
        );
        failed += 1;
    }
    assert_eq!(failed, 32);
    let err = b
        .submit(IoRequest {
            tag: 99,
            offset: 0,
            op: IoOp::Flush,
        })
        .unwrap_err();
    assert!(err.to_string().contains("is broken"), "{err}");
}

/// 4 KiB random reads and writes over a 64 MiB file at QD 1 and QD 32.
#[test]
#[ignore]
fn bench_random_4k() {
    let server = NfsServer::start();
    let mut b = create(&server.spec("bench.img"));
    let pages = 16384u64;
    b.grow(pages * PAGE as u64).unwrap();
    // Fill so reads hit data.
    let chunk = 1 << 20;
    for off in (0..pages * PAGE as u64).step_by(chunk) {
        run_one(
            b.as_mut(),
            off,
            IoOp::Write {
                buf: AlignedBuf::new(chunk),
            },
        )
        .unwrap();
    }
    for (write, qd, n) in [
        (false, 1, 2000),
        (false, 32, 16000),
        (true, 1, 1000),
        (true, 32, 8000),
    ] {
        let targets = random_pages(pages, n, 3);
        let mut out = Vec::new();
        let t = Instant::now();
        for &p in &targets {
            if b.in_flight() >= qd {
                b.complete(&mut out, 1).unwrap();
            }
            let op = if write {
                IoOp::Write { buf: page_of(p) }
            } else {
                IoOp::Read {
                    buf: AlignedBuf::new(PAGE),
                }
            };
            b.submit(IoRequest {
                tag: p,
                offset: p * PAGE as u64,
                op,
            })
            .unwrap();
        }
        b.complete(&mut out, b.in_flight()).unwrap();
        assert!(out.iter().all(|c| c.result.is_ok()));
        let secs = t.elapsed().as_secs_f64();
        println!(
            "NFS (Ganesha VFS on /var/tmp, FILE_SYNC) random 4 KiB {} QD{qd}: {:.0} IOPS, {:.1} us mean",
            if write { "write" } else { "read" },
            n as f64 / secs,
            secs * 1e6 / n as f64 * qd as f64
        );
    }
}
