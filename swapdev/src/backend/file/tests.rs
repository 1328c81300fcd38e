use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

pub(super) const PAGE: usize = 4096;

/// tmpfs (O_DIRECT works there since Linux 6.6; buffered before).
pub(super) const TMPFS_DIR: &str = "/dev/shm";
/// A disk filesystem (ext4 here) where O_DIRECT works.
pub(super) const DISK_DIR: &str = "/var/tmp";

pub(super) fn open_in(dir: &str, direct: DirectMode, qd: u32) -> (tempfile::TempDir, FileBackend) {
    let tmp = tempfile::tempdir_in(dir).expect("tempdir");
    let opts = OpenOptions {
        create: true,
        read_only: false,
        direct,
        queue_depth: qd,
    };
    let backend = FileBackend::open(tmp.path().join("dev.swap"), opts).expect("open");
    (tmp, backend)
}

pub(super) fn page_of(seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(PAGE);
    StdRng::seed_from_u64(seed).fill(buf.as_mut_slice());
    buf
}

pub(super) fn wait_one(b: &mut FileBackend) -> IoCompletion {
    let mut out = Vec::new();
    assert_eq!(b.complete(&mut out, 1).expect("complete"), 1);
    out.pop().unwrap()
}

pub(super) fn run_one(
    b: &mut FileBackend,
    offset: u64,
    op: IoOp,
) -> Result<Option<AlignedBuf>, BackendError> {
    b.submit(IoRequest { tag: 7, offset, op })?;
    let c = wait_one(b);
    assert_eq!(c.tag, 7);
    c.result
}

/// 256 random 4 KiB writes then reads of the same pages, at most `qd_limit` in flight.
pub(super) fn random_round_trip(b: &mut FileBackend, qd_limit: usize) {
    let pages = 1024u64;
    b.grow(pages * PAGE as u64).unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut targets: Vec<u64> = (0..pages).collect();
    for i in 0..256 {
        let j = rng.random_range(i..targets.len());
        targets.swap(i, j);
    }
    targets.truncate(256);
    let mut out = Vec::new();
    for (i, &page) in targets.iter().enumerate() {
        if b.in_flight() >= qd_limit {
            b.complete(&mut out, 1).unwrap();
        }
        let buf = page_of(page);
        b.submit(IoRequest {
            tag: i as u64,
            offset: page * PAGE as u64,
            op: IoOp::Write { buf },
        })
        .unwrap();
    }
    b.complete(&mut out, b.in_flight()).unwrap();
    assert_eq!(out.len(), 256);
    assert!(out.iter().all(|c| c.result.is_ok()));
    assert_eq!(b.in_flight(), 0);

    out.clear();
    for (i, &page) in targets.iter().enumerate() {
        if b.in_flight() >= qd_limit {
            b.complete(&mut out, 1).unwrap();
        }
        b.submit(IoRequest {
            tag: page,
            offset: page * PAGE as u64,
            op: IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        })
        .unwrap();
        let _ = i;
    }
    b.complete(&mut out, b.in_flight()).unwrap();
    assert_eq!(out.len(), 256);
    for c in out {
        let buf = c.result.unwrap().expect("read returns its buffer");
        assert!(
            buf.as_slice() == page_of(c.tag).as_slice(),
            "page {} read back wrong",
            c.tag
        );
    }
}

#[test]
fn round_trip_qd32_disk_direct() {
    let (_tmp, mut b) = open_in(DISK_DIR, DirectMode::Always, 32);
    assert!(b.is_direct());
    assert!(
        b.alignment() >= 512 && b.alignment() <= 4096,
        "{}",
        b.alignment()
    );
    assert!(b.describe().contains("O_DIRECT"), "{}", b.describe());
    random_round_trip(&mut b, 32);
}

#[test]
fn more_requests_than_the_rings_hold() {
    // QD 4 (CQ 8) with 300 requests queued before any completion is collected.
    let (_tmp, mut b) = open_in(DISK_DIR, DirectMode::Auto, 4);
    b.grow(300 * PAGE as u64).unwrap();
    for i in 0..300u64 {
        let op = IoOp::Write { buf: page_of(i) };
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
    for i in [0u64, 150, 299] {
        let got = run_one(
            &mut b,
            i * PAGE as u64,
            IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        );
        assert!(got.unwrap().unwrap().as_slice() == page_of(i).as_slice());
    }
}

#[test]
fn flush_after_writes_succeeds_and_covers_them() {
    let (_tmp, mut b) = open_in(DISK_DIR, DirectMode::Auto, 16);
    b.grow(64 * PAGE as u64).unwrap();
    for i in 0..64u64 {
        let op = IoOp::Write { buf: page_of(i) };
        b.submit(IoRequest {
            tag: i,
            offset: i * PAGE as u64,
            op,
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
    b.complete(&mut out, 65).unwrap();
    // IO_DRAIN: the flush completes after every write submitted before it.
    let flush_pos = out.iter().position(|c| c.tag == 1000).unwrap();
    assert_eq!(flush_pos, 64, "flush completed before earlier writes");
    assert!(out.iter().all(|c| c.result.is_ok()));
    // The data is in the file as seen by an independent reader.
    let mut content = vec![0u8; PAGE];
    let f = File::open(b.path()).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut content, 63 * PAGE as u64).unwrap();
    assert!(content == page_of(63).as_slice());
}

#[test]
fn trim_reads_back_as_zeros_and_keeps_size() {
    for dir in [TMPFS_DIR, DISK_DIR] {
        let (_tmp, mut b) = open_in(dir, DirectMode::Auto, 8);
        b.grow(8 * PAGE as u64).unwrap();
        for i in 0..8u64 {
            run_one(&mut b, i * PAGE as u64, IoOp::Write { buf: page_of(i) }).unwrap();
        }
        let trim = IoOp::Trim {
            len: 2 * PAGE as u64,
        };
        assert!(run_one(&mut b, 3 * PAGE as u64, trim).unwrap().is_none());
        assert_eq!(b.size().unwrap(), 8 * PAGE as u64);
        let mut expect = HashMap::new();
        for i in 0..8u64 {
            let zero = i == 3 || i == 4;
            expect.insert(
                i,
                if zero {
                    AlignedBuf::new(PAGE)
                } else {
                    page_of(i)
                },
            );
        }
        for (i, want) in expect {
            let got = run_one(
                &mut b,
                i * PAGE as u64,
                IoOp::Read {
                    buf: AlignedBuf::new(PAGE),
                },
            );
            assert!(
                got.unwrap().unwrap().as_slice() == want.as_slice(),
                "{dir} page {i}"
            );
        }
    }
}

#[test]
fn read_past_end_of_file_is_an_error() {
    for dir in [TMPFS_DIR, DISK_DIR] {
        let (_tmp, mut b) = open_in(dir, DirectMode::Auto, 8);
        b.grow(2 * PAGE as u64).unwrap();
        // Entirely past EOF.
        let err = run_one(
            &mut b,
            4 * PAGE as u64,
            IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        )
        .unwrap_err();
        match err {
            BackendError::Short {
                op: "read",
                offset,
                done: 0,
                len,
            } => {
                assert_eq!((offset, len), (4 * PAGE as u64, PAGE));
            }
            other => panic!("{dir}: unexpected {other}"),
        }
        // Straddling EOF: the first page exists, the second does not.
        let err = run_one(
            &mut b,
            PAGE as u64,
            IoOp::Read {
                buf: AlignedBuf::new(2 * PAGE),
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, BackendError::Short { done, len, .. } if done == PAGE && len == 2 * PAGE),
            "{dir}: {err}"
        );
        assert!(err.to_string().contains(&format!("offset {PAGE}")), "{err}");
    }
}

#[test]
fn misaligned_direct_request_is_a_clear_error() {
    let (_tmp, mut b) = open_in(DISK_DIR, DirectMode::Always, 8);
    b.grow(4 * PAGE as u64).unwrap();
    let err = b
        .submit(IoRequest {
            tag: 1,
            offset: 100,
            op: IoOp::Write { buf: page_of(1) },
        })
        .unwrap_err();
    let err = crate::error_chain(&err);
    assert!(err.contains("O_DIRECT alignment"), "{err}");
    let err = b
        .submit(IoRequest {
            tag: 2,
            offset: 0,
            op: IoOp::Read {
                buf: AlignedBuf::new(100),
            },
        })
        .unwrap_err();
    assert!(crate::error_chain(&err).contains("length 100"), "{err}");
    assert_eq!(b.in_flight(), 0);
}

#[test]
fn buffered_io_accepts_any_alignment() {
    let (_tmp, mut b) = open_in(DISK_DIR, DirectMode::Never, 8);
    assert!(!b.is_direct());
    b.grow(PAGE as u64).unwrap();
    let data = AlignedBuf::from_slice(b"hello, unaligned world");
    run_one(&mut b, 123, IoOp::Write { buf: data }).unwrap();
    let got = run_one(
        &mut b,
        123,
        IoOp::Read {
            buf: AlignedBuf::new(22),
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(got.as_slice(), b"hello, unaligned world");
}

#[test]
fn grow_size_and_open_errors() {
    let (tmp, mut b) = open_in(DISK_DIR, DirectMode::Auto, 8);
    assert_eq!(b.size().unwrap(), 0);
    b.grow(1 << 20).unwrap();
    assert_eq!(b.size().unwrap(), 1 << 20);
    b.grow(4096).unwrap(); // never shrinks
    assert_eq!(b.size().unwrap(), 1 << 20);

    let missing = tmp.path().join("missing");
    let err = FileBackend::open(&missing, OpenOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("missing"), "{err}");
    let opts = OpenOptions {
        queue_depth: 0,
        ..OpenOptions::default()
    };
    let err = FileBackend::open(b.path(), opts).err().unwrap();
    assert!(err.to_string().contains("queue depth 0"), "{err}");
    let err = FileBackend::open(tmp.path(), OpenOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains(&tmp.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn zero_length_requests_complete_immediately() {
    let (_tmp, mut b) = open_in(TMPFS_DIR, DirectMode::Auto, 8);
    let got = run_one(
        &mut b,
        0,
        IoOp::Read {
            buf: AlignedBuf::new(0),
        },
    )
    .unwrap();
    assert_eq!(got.unwrap().len(), 0);
    assert!(run_one(&mut b, 0, IoOp::Trim { len: 0 }).unwrap().is_none());
}

#[test]
fn drop_with_requests_in_flight_waits_for_them() {
    let (_tmp, mut b) = open_in(DISK_DIR, DirectMode::Auto, 8);
    b.grow(64 * PAGE as u64).unwrap();
    for i in 0..64u64 {
        let op = IoOp::Write { buf: page_of(i) };
        b.submit(IoRequest {
            tag: i,
            offset: i * PAGE as u64,
            op,
        })
        .unwrap();
    }
    let path = b.path().to_path_buf();
    drop(b);
    let data = std::fs::read(path).unwrap();
    assert!(data[..PAGE] == *page_of(0).as_slice());
}

#[test]
fn backend_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<FileBackend>();
}

mod devices;
mod model;

/// The completion fd is readable once a submitted read has finished, and `complete(.., 0)`
/// then returns it without waiting; with nothing in flight `complete(.., 0)` returns nothing.
#[test]
fn completion_fd_signals_finished_reads() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    for dir in [DISK_DIR, TMPFS_DIR] {
        let (_tmp, mut b) = open_in(dir, DirectMode::Auto, 8);
        b.grow(4 * PAGE as u64).unwrap();
        run_one(&mut b, PAGE as u64, IoOp::Write { buf: page_of(3) }).unwrap();
        let mut out = Vec::new();
        assert_eq!(b.complete(&mut out, 0).unwrap(), 0);
        let fd = b
            .completion_fd()
            .expect("the io_uring file backend has a completion fd");
        let fd = fd.try_clone_to_owned().unwrap();
        let mut counter = [0u8; 8];
        let _ = nix::unistd::read(&fd, &mut counter); // reset what the write signalled
        b.submit(IoRequest {
            tag: 9,
            offset: PAGE as u64,
            op: IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        })
        .unwrap();
        // The SQE is pushed but not entered until `complete`: enter without waiting.
        let mut got = Vec::new();
        b.complete(&mut got, 0).unwrap();
        if got.is_empty() {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            assert_eq!(n, 1, "{dir}: completion fd not readable within 5 s");
            b.complete(&mut got, 0).unwrap();
        }
        assert_eq!(got.len(), 1, "{dir}");
        assert_eq!(got[0].tag, 9);
        let buf = got[0].result.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(buf.as_slice(), page_of(3).as_slice(), "{dir}");
        assert_eq!(b.in_flight(), 0);
    }
}

/// On tmpfs reads are served by `pread` inside `submit`: ready at once, right bytes, and a
/// read past the end is still a short-read error. Disk files keep reading through the ring.
#[test]
fn tmpfs_reads_complete_synchronously() {
    let (_tmp, mut b) = open_in(TMPFS_DIR, DirectMode::Auto, 8);
    assert!(b.reads_synchronously(), "{}", b.describe());
    b.grow(2 * PAGE as u64).unwrap();
    run_one(&mut b, 0, IoOp::Write { buf: page_of(11) }).unwrap();
    b.submit(IoRequest {
        tag: 3,
        offset: 0,
        op: IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        },
    })
    .unwrap();
    let mut got = Vec::new();
    assert_eq!(b.complete(&mut got, 0).unwrap(), 1, "not ready at once");
    let buf = got[0].result.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(buf.as_slice(), page_of(11).as_slice());
    let past_end = run_one(
        &mut b,
        PAGE as u64,
        IoOp::Read {
            buf: AlignedBuf::new(2 * PAGE),
        },
    );
    assert!(
        matches!(past_end, Err(BackendError::Short { done, .. }) if done == PAGE),
        "{past_end:?}"
    );
    let (_tmp, disk) = open_in(DISK_DIR, DirectMode::Auto, 8);
    assert!(!disk.reads_synchronously(), "{}", disk.describe());
}

#[test]
fn read_only_reads_and_never_writes() {
    let tmp = tempfile::tempdir_in(DISK_DIR).unwrap();
    let path = tmp.path().join("image.raw");
    let content = page_of(3);
    std::fs::write(&path, content.as_slice()).unwrap();
    let opts = OpenOptions {
        read_only: true,
        direct: DirectMode::Never,
        ..OpenOptions::default()
    };
    let mut b = FileBackend::open(&path, opts).unwrap();
    let read = run_one(
        &mut b,
        0,
        IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        },
    )
    .unwrap();
    assert_eq!(read.unwrap().as_slice(), content.as_slice());
    let write = run_one(&mut b, 0, IoOp::Write { buf: page_of(4) });
    assert!(write.is_err(), "a read-only backend accepted a write");
    assert_eq!(std::fs::read(&path).unwrap(), content.as_slice());
    // A missing file is not created.
    let missing = tmp.path().join("missing.raw");
    let opts = OpenOptions {
        create: true,
        ..opts
    };
    assert!(FileBackend::open(&missing, opts).is_err());
    assert!(!missing.exists());
}
