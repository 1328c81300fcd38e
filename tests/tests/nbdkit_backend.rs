//! The NBD client against a second real NBD server, nbdkit (memory and file plugins), with
//! the same conformance checks as the NFS backend (tests/tests/nfs_conformance), plus what
//! nbdkit's filters make testable on a real server: advertised block sizes, per-request
//! server errors, and structured replies (nbdkit offers them; our client does not ask).
//!
//! Run: `cargo test -p pagewise-tests --test nbdkit_backend`

#[path = "nfs_conformance/mod.rs"]
mod conformance;
#[path = "common/nbdkit_server.rs"]
mod nbdkit_server;

use std::os::unix::fs::{FileExt, MetadataExt};

use conformance::*;
use nbdkit_server::{require_nbdkit, NbdkitServer, Plugin, Setup};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use swapdev::AlignedBuf;
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, PageData, SwapDevice};

fn connect(server: &NbdkitServer) -> Box<dyn Backend> {
    open_backend(&server.spec(), &SpecOptions::default())
        .unwrap_or_else(|e| panic!("connect to nbdkit: {e}\n{}", server.log_text()))
}

fn unix(dir: &tempfile::TempDir, setup: &Setup<'_>) -> NbdkitServer {
    NbdkitServer::unix(
        setup,
        &dir.path().join("nbdkit.sock"),
        &dir.path().join("nbdkit.log"),
    )
}

#[test]
fn nbdkit_is_installed() {
    let v = require_nbdkit();
    assert!(v.starts_with("nbdkit 1."), "{v}");
}

#[test]
fn memory_plugin_conformance_over_unix() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let server = unix(&dir, &Setup::new(Plugin::Memory(size), "swap"));
    let mut b = connect(&server);
    assert_eq!(b.size().unwrap(), size);
    let d = b.describe();
    assert!(
        d.contains("nbd export 'swap'") && d.contains("flush") && d.contains("trim"),
        "{d}"
    );
    let targets = random_pages(size / PAGE as u64, 512, 11);
    let max_seen = pipelined_round_trip(b.as_mut(), &targets, 64);
    assert!(max_seen >= 32, "{max_seen}");
    // 40 MiB: more than nbdkit's 32 MiB maximum request, so the client splits it.
    large_unaligned_request(b.as_mut(), 4097, 40 << 20);
    flush_covers_earlier_writes(b.as_mut(), &[1, 9, 4000, 77]);
    trim_is_safe(b.as_mut(), 300);
    many_before_complete(b.as_mut(), 300);
    // The memory plugin's trim really discards: the page reads back as zeros.
    assert!(read_at(b.as_mut(), 300 * PAGE as u64, PAGE)
        .as_slice()
        .iter()
        .all(|&x| x == 0));
    // Past the end: refused at submit, naming the export.
    let err = b
        .submit(IoRequest {
            tag: 1,
            offset: size - 100,
            op: IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        })
        .unwrap_err();
    assert!(
        swapdev::error_chain(&err).contains("past the end of NBD export 'swap'"),
        "{err}"
    );
    drop(b);
    // Our client never asks for structured replies (nbdkit would grant them: it replies ACK
    // to qemu's NBD_OPT_STRUCTURED_REPLY), so it gets simple replies.
    let log = server.log_text();
    assert!(
        log.contains("NBD_OPT_GO: client requested export 'swap'"),
        "{log}"
    );
    assert!(
        !log.contains("client requested structured replies"),
        "{log}"
    );
}

#[test]
fn file_plugin_over_tcp_data_reaches_the_file_and_trim_punches_holes() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("export.img");
    let pages = 4096u64;
    std::fs::File::create(&img)
        .unwrap()
        .set_len(pages * PAGE as u64)
        .unwrap();
    let server = NbdkitServer::tcp(
        &Setup::new(Plugin::File(img.clone()), "vm1"),
        &dir.path().join("nbdkit.log"),
    );
    assert!(server.spec().starts_with("nbd://127.0.0.1:"));
    let mut b = connect(&server);
    let targets = random_pages(pages, 256, 5);
    pipelined_round_trip(b.as_mut(), &targets, 32);
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let mut raw = vec![0u8; PAGE];
    for &p in &targets {
        f.read_exact_at(&mut raw, p * PAGE as u64).unwrap();
        assert!(raw == page_of(p).as_slice(), "page {p} in the file");
    }
    // Fill 1 MiB, then trim it: the file's allocation shrinks (the file plugin punches).
    run_one(
        b.as_mut(),
        8 << 20,
        IoOp::Write {
            buf: AlignedBuf::from_slice(&vec![0xabu8; 1 << 20]),
        },
    )
    .unwrap();
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
    let before = std::fs::metadata(&img).unwrap().blocks();
    run_one(b.as_mut(), 8 << 20, IoOp::Trim { len: 1 << 20 }).unwrap();
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        after + 1024 < before,
        "trim freed no space: {before} -> {after} blocks"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), pages * PAGE as u64);
}

#[test]
fn advertised_minimum_block_size_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let filters: &[(&str, &[&str])] = &[(
        "blocksize-policy",
        &[
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1048576",
            "blocksize-error-policy=error",
        ],
    )];
    let setup = Setup {
        filters,
        ..Setup::new(Plugin::Memory(16 << 20), "swap")
    };
    let server = unix(&dir, &setup);
    let mut b = connect(&server);
    assert_eq!(b.alignment(), 4096, "{}", server.log_text());
    // Misaligned: refused by our client before nbdkit would have to refuse it.
    let err = run_one(
        b.as_mut(),
        512,
        IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        },
    )
    .unwrap_err();
    assert!(
        swapdev::error_chain(&err).contains("minimum block size 4096"),
        "{err}"
    );
    // 3 MiB is split into commands of at most the advertised 1 MiB maximum.
    large_unaligned_request(b.as_mut(), 4096, 3 << 20);
    let targets = random_pages(4096, 128, 2);
    pipelined_round_trip(b.as_mut(), &targets, 32);
}

#[test]
fn server_side_errors_fail_only_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let filters: &[(&str, &[&str])] = &[("error", &["error-pread=EIO", "error-pread-rate=100%"])];
    let setup = Setup {
        filters,
        ..Setup::new(Plugin::Memory(16 << 20), "swap")
    };
    let server = unix(&dir, &setup);
    let mut b = connect(&server);
    // Writes succeed, every read fails with the server's EIO, the connection stays usable.
    for round in 0..3u64 {
        run_one(
            b.as_mut(),
            round * PAGE as u64,
            IoOp::Write {
                buf: page_of(round),
            },
        )
        .unwrap();
        let err = run_one(
            b.as_mut(),
            round * PAGE as u64,
            IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        )
        .unwrap_err();
        match &err {
            BackendError::Io { op, source, .. } => {
                assert_eq!(*op, "read");
                assert_eq!(source.raw_os_error(), Some(libc::EIO), "{err}");
            }
            other => panic!("{other:?}"),
        }
    }
    run_one(b.as_mut(), 0, IoOp::Flush).unwrap();
}

#[test]
fn wrong_export_and_read_only_export_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        read_only: true,
        ..Setup::new(Plugin::Memory(1 << 20), "swap")
    };
    let server = unix(&dir, &setup);
    let wrong = server.spec().replace("///swap", "///nope");
    let err = open_backend(&wrong, &SpecOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("export 'nope' not found"), "{err}");
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
}

#[test]
fn nbdkit_dying_fails_outstanding_and_later_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = unix(&dir, &Setup::new(Plugin::Memory(16 << 20), "swap"));
    let mut b = connect(&server);
    run_one(b.as_mut(), 0, IoOp::Write { buf: page_of(0) }).unwrap();
    server.kill();
    let mut failed = 0;
    for i in 0..16u64 {
        let r = b.submit(IoRequest {
            tag: i,
            offset: i * PAGE as u64,
            op: IoOp::Write { buf: page_of(i) },
        });
        if r.is_err() {
            failed += 1;
        }
    }
    let mut out: Vec<IoCompletion> = Vec::new();
    while b.in_flight() > 0 {
        b.complete(&mut out, 1).unwrap();
    }
    failed += out.iter().filter(|c| c.result.is_err()).count();
    assert_eq!(failed, 16);
}

#[test]
fn swap_device_on_nbdkit_survives_reopen_and_fsck() {
    let dir = tempfile::tempdir().unwrap();
    // The device plans its data area with room to clean: 2048 pages need ~33 MB.
    let server = unix(&dir, &Setup::new(Plugin::Memory(64 << 20), "swap"));
    let opts = CreateOptions {
        vm_uuid: swapdev::Uuid::from_u128(0xdead),
        page_size: PAGE as u32,
        capacity_pages: 2048,
        host_id: "h".into(),
        codec: CodecPolicy::Lz4,
        checksum: ChecksumKind::Crc32c,
        force: false,
    };
    let mut dev = SwapDevice::create(connect(&server), opts).unwrap();
    let pages: Vec<(u64, Vec<u8>)> = (0..2048u64)
        .step_by(3)
        .map(|p| (p, page_of(p).as_slice().to_vec()))
        .collect();
    for chunk in pages.chunks(100) {
        let refs: Vec<(u64, &[u8])> = chunk.iter().map(|(p, d)| (*p, &d[..])).collect();
        dev.write_pages(&refs).unwrap();
    }
    dev.close().unwrap();
    let report = SwapDevice::fsck_backend(connect(&server)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let mut dev = SwapDevice::open(connect(&server), OpenOptions::read_only("r")).unwrap();
    for (p, d) in &pages {
        match dev.read_page(*p).unwrap() {
            PageData::NotStored => panic!("page {p} lost"),
            got => assert_eq!(got.to_vec(PAGE).as_deref(), Some(&d[..]), "page {p}"),
        }
    }
}
