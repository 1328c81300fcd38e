//! File backend on special places: a ramfs (O_DIRECT refused: buffered fallback) and a loop
//! block device (BLKSSZGET alignment, fixed size). Both need root.

use super::*;
use std::path::PathBuf;

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
            read_only: false,
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
        read_only: false,
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
        read_only: false,
        direct: DirectMode::Auto,
        queue_depth: 16,
    };
    let mut b = FileBackend::open(&lo.dev, opts).unwrap();
    assert!(b.is_direct());
    assert!(b.alignment() >= 512, "{}", b.alignment());
    assert_eq!(b.size().unwrap(), 4 << 20);
    b.grow(1 << 20).unwrap();
    let err = crate::error_chain(&b.grow(8 << 20).unwrap_err());
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
