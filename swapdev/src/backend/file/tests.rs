use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;

const PAGE: usize = 4096;

/// tmpfs (O_DIRECT works there since Linux 6.6; buffered before).
const TMPFS_DIR: &str = "/dev/shm";
/// A disk filesystem (ext4 here) where O_DIRECT works.
const DISK_DIR: &str = "/var/tmp";

fn open_in(dir: &str, direct: DirectMode, qd: u32) -> (tempfile::TempDir, FileBackend) {
    let tmp = tempfile::tempdir_in(dir).expect("tempdir");
    let opts = OpenOptions {
        create: true,
        direct,
        queue_depth: qd,
    };
    let backend = FileBackend::open(tmp.path().join("dev.swap"), opts).expect("open");
    (tmp, backend)
}

fn page_of(seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(PAGE);
    StdRng::seed_from_u64(seed).fill(buf.as_mut_slice());
    buf
}

fn wait_one(b: &mut FileBackend) -> IoCompletion {
    let mut out = Vec::new();
    assert_eq!(b.complete(&mut out, 1).expect("complete"), 1);
    out.pop().unwrap()
}

fn run_one(b: &mut FileBackend, offset: u64, op: IoOp) -> Result<Option<AlignedBuf>, BackendError> {
    b.submit(IoRequest { tag: 7, offset, op })?;
    let c = wait_one(b);
    assert_eq!(c.tag, 7);
    c.result
}

/// 256 random 4 KiB writes then reads of the same pages, at most `qd_limit` in flight.
fn random_round_trip(b: &mut FileBackend, qd_limit: usize) {
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

/// A ramfs mounted on a fresh temporary directory (unmounted on drop). ramfs has no direct
/// I/O support, so opening with O_DIRECT fails with EINVAL there (tmpfs accepts O_DIRECT since
/// Linux 6.6). Needs root, like the rest of the lab tests.
struct Ramfs {
    dir: tempfile::TempDir,
}

impl Ramfs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: all pointers are valid NUL-terminated strings; data is null (no options).
        let rc = unsafe {
            libc::mount(
                c"ramfs".as_ptr(),
                target.as_ptr(),
                c"ramfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a ramfs on {} failed (run the tests as root): {}",
            dir.path().display(),
            io::Error::last_os_error()
        );
        Self { dir }
    }

    fn open(&self, direct: DirectMode) -> FileBackend {
        let opts = OpenOptions {
            create: true,
            direct,
            queue_depth: 32,
        };
        FileBackend::open(self.dir.path().join("dev.swap"), opts).expect("open on ramfs")
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let target =
            std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path; MNT_DETACH never blocks on busy files.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn auto_falls_back_to_buffered_where_direct_is_refused() {
    let fs = Ramfs::mount();
    let b = fs.open(DirectMode::Auto);
    assert!(!b.is_direct());
    assert_eq!(b.alignment(), 1);
    assert!(b.describe().contains("buffered"), "{}", b.describe());
}

#[test]
fn always_direct_where_refused_is_a_clear_error() {
    let fs = Ramfs::mount();
    let opts = OpenOptions {
        create: true,
        direct: DirectMode::Always,
        queue_depth: 8,
    };
    let err = FileBackend::open(fs.dir.path().join("x"), opts)
        .err()
        .expect("O_DIRECT on ramfs must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("O_DIRECT") && msg.contains("does not support"),
        "{msg}"
    );
}

#[test]
fn round_trip_qd32_buffered_fallback() {
    let fs = Ramfs::mount();
    let mut b = fs.open(DirectMode::Auto);
    assert!(!b.is_direct());
    random_round_trip(&mut b, 32);
}

#[test]
fn round_trip_qd32_tmpfs() {
    let (_tmp, mut b) = open_in(TMPFS_DIR, DirectMode::Auto, 32);
    random_round_trip(&mut b, 32);
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
    assert!(err.to_string().contains("O_DIRECT alignment"), "{err}");
    let err = b
        .submit(IoRequest {
            tag: 2,
            offset: 0,
            op: IoOp::Read {
                buf: AlignedBuf::new(100),
            },
        })
        .unwrap_err();
    assert!(err.to_string().contains("length 100"), "{err}");
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

/// QD32 4 KiB random reads over a 256 MiB file; prints IOPS for O_DIRECT and buffered I/O on
/// the disk filesystem and for tmpfs. Run:
/// `cargo test --release -p swapdev --lib bench_file_qd32 -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn bench_file_qd32_random_read() {
    let pages = 65536u64;
    for (dir, mode) in [
        (DISK_DIR, DirectMode::Always),
        (DISK_DIR, DirectMode::Never),
        (TMPFS_DIR, DirectMode::Always),
        (TMPFS_DIR, DirectMode::Never),
    ] {
        let (_tmp, mut b) = open_in(dir, mode, 64);
        {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(b.path())
                .unwrap();
            let chunk = vec![0xA5u8; 1 << 20];
            for i in 0..(pages * PAGE as u64) >> 20 {
                std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i << 20).unwrap();
            }
            f.sync_all().unwrap();
        }
        let mut rng = StdRng::seed_from_u64(1);
        let total = 200_000u64;
        let mut out = Vec::new();
        let start = std::time::Instant::now();
        for i in 0..total {
            if b.in_flight() >= 32 {
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
        out.clear();
        b.complete(&mut out, b.in_flight()).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}: QD32 4KiB random read: {total} reads in {secs:.2} s = {:.0} IOPS",
            b.describe(),
            total as f64 / secs
        );
    }
}

/// A loop block device over a sparse file, detached on drop (needs root and losetup).
struct LoopDevice {
    _dir: tempfile::TempDir,
    dev: PathBuf,
}

impl LoopDevice {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir_in(DISK_DIR).unwrap();
        let img = dir.path().join("loop.img");
        File::create(&img).unwrap().set_len(size).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "losetup failed (run the tests as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { _dir: dir, dev }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

#[test]
fn block_device_round_trip_fixed_size_and_trim() {
    let lo = LoopDevice::new(4 << 20);
    let opts = OpenOptions {
        create: false,
        direct: DirectMode::Auto,
        queue_depth: 16,
    };
    let mut b = FileBackend::open(&lo.dev, opts).unwrap();
    assert!(b.is_direct());
    assert!(b.alignment() >= 512, "{}", b.alignment());
    assert_eq!(b.size().unwrap(), 4 << 20);
    b.grow(1 << 20).unwrap();
    let err = b.grow(8 << 20).unwrap_err().to_string();
    assert!(err.contains("fixed size of 4194304 bytes"), "{err}");
    for p in 0..16u64 {
        run_one(&mut b, p * PAGE as u64, IoOp::Write { buf: page_of(p) }).unwrap();
    }
    run_one(&mut b, 0, IoOp::Flush).unwrap();
    let trim = IoOp::Trim { len: PAGE as u64 };
    run_one(&mut b, 5 * PAGE as u64, trim).unwrap();
    for p in 0..16u64 {
        let got = run_one(
            &mut b,
            p * PAGE as u64,
            IoOp::Read {
                buf: AlignedBuf::new(PAGE),
            },
        )
        .unwrap()
        .unwrap();
        let want = if p == 5 {
            AlignedBuf::new(PAGE)
        } else {
            page_of(p)
        };
        assert!(got.as_slice() == want.as_slice(), "page {p}");
    }
    let err = run_one(
        &mut b,
        4 << 20,
        IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        },
    )
    .unwrap_err();
    assert!(matches!(err, BackendError::Short { done: 0, .. }), "{err}");
}

#[derive(Debug, Clone)]
enum ModelOp {
    Write { off: u64, len: usize, seed: u64 },
    Read { off: u64, len: usize },
    Trim { off: u64, len: u64 },
    Flush,
}

fn model_op() -> impl proptest::strategy::Strategy<Value = ModelOp> {
    use proptest::prelude::*;
    const SPAN: u64 = 64 * 1024;
    prop_oneof![
        4 => (0..SPAN, 1usize..9000, any::<u64>())
            .prop_map(|(off, len, seed)| ModelOp::Write { off, len, seed }),
        4 => (0..SPAN, 1usize..9000).prop_map(|(off, len)| ModelOp::Read { off, len }),
        1 => (0..SPAN, 1u64..20000).prop_map(|(off, len)| ModelOp::Trim { off, len }),
        1 => Just(ModelOp::Flush),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Any sequence of buffered writes, reads, trims and flushes (unaligned, overlapping,
    /// each waited for before the next) leaves the file equal to a byte-array model; reads
    /// past the end are `Short` exactly when the model says so.
    #[test]
    fn buffered_file_matches_a_byte_model(ops in proptest::collection::vec(model_op(), 1..40)) {
        let (_tmp, mut b) = open_in(TMPFS_DIR, DirectMode::Never, 8);
        let mut model: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                ModelOp::Write { off, len, seed } => {
                    let mut buf = AlignedBuf::new(len);
                    StdRng::seed_from_u64(seed).fill(buf.as_mut_slice());
                    let end = off as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&buf);
                    run_one(&mut b, off, IoOp::Write { buf }).unwrap();
                }
                ModelOp::Read { off, len } => {
                    let got = run_one(&mut b, off, IoOp::Read { buf: AlignedBuf::new(len) });
                    let end = off as usize + len;
                    if end <= model.len() {
                        let got = got.unwrap().unwrap();
                        proptest::prop_assert!(got.as_slice() == &model[off as usize..end]);
                    } else {
                        let is_short = matches!(got, Err(BackendError::Short { .. }));
                        proptest::prop_assert!(is_short, "{:?}", got);
                    }
                }
                ModelOp::Trim { off, len } => {
                    let start = (off as usize).min(model.len());
                    let end = (off + len).min(model.len() as u64) as usize;
                    model[start..end].fill(0);
                    run_one(&mut b, off, IoOp::Trim { len }).unwrap();
                }
                ModelOp::Flush => {
                    run_one(&mut b, 0, IoOp::Flush).unwrap();
                }
            }
            proptest::prop_assert_eq!(b.size().unwrap(), model.len() as u64);
        }
        let on_disk = std::fs::read(b.path()).unwrap();
        proptest::prop_assert!(on_disk == model);
    }
}
