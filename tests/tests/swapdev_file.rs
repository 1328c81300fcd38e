//! Swap devices on real files (io_uring, O_DIRECT) and on a real qemu-nbd export: damage
//! detection, bad input, two-host hand-off with fencing.
//!
//! Run: `cargo test -p pagewise-tests --test swapdev_file`

#[path = "common/nbd_server.rs"]
mod nbd_server;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use nbd_server::{require_qemu_nbd, NbdServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapdev::backend::file::{FileBackend, OpenOptions as FileOpts};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::Backend;
use swapdev::{
    ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, PageData, SwapDevice, SwapError,
};

const PS: usize = 4096;

fn file(path: &Path, create: bool) -> Box<dyn Backend> {
    let opts = FileOpts {
        create,
        ..FileOpts::default()
    };
    Box::new(FileBackend::open(path, opts).expect("open file backend"))
}

fn create_opts(pages: u64, host: &str) -> CreateOptions {
    CreateOptions {
        vm_uuid: swapdev::Uuid::from_u128(7),
        page_size: PS as u32,
        capacity_pages: pages,
        host_id: host.into(),
        codec: CodecPolicy::Lz4,
        checksum: ChecksumKind::Xxh3,
        force: false,
    }
}

fn random_page(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; PS];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

fn read(dev: &mut SwapDevice, page: u64) -> Option<Vec<u8>> {
    match dev.read_page(page).unwrap() {
        PageData::NotStored => None,
        d => d.to_vec(PS),
    }
}

#[test]
fn flipped_byte_is_detected_by_fsck_and_reads() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("flip.swap");
    let mut dev = SwapDevice::create(file(&path, true), create_opts(256, "h")).unwrap();
    let target = random_page(99);
    let other = random_page(100);
    dev.write_pages(&[(17, &target), (18, &other)]).unwrap();
    dev.close().unwrap();
    // Find the page's bytes in the file and flip one in the middle.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; PS];
    let mut at = None;
    let mut off = 0;
    while off + PS as u64 <= len {
        f.read_exact_at(&mut buf, off).unwrap();
        if buf == target {
            at = Some(off);
            break;
        }
        off += PS as u64;
    }
    let at = at.expect("raw page found in the file");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at + 2000).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at + 2000).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let report = SwapDevice::fsck_backend(file(&path, false)).unwrap();
    assert_eq!(report.errors.len(), 1, "{report:#?}");
    assert!(
        report.errors[0].starts_with("page 17 is corrupt"),
        "{}",
        report.errors[0]
    );
    let mut dev = SwapDevice::open(file(&path, false), OpenOptions::read_only("h")).unwrap();
    let err = dev.read_page(17).unwrap_err();
    assert!(
        matches!(err, SwapError::PageCorrupt { page: 17, .. }),
        "{err}"
    );
    dev.submit_read(17, 1).unwrap();
    dev.submit_read(18, 2).unwrap();
    let mut out = Vec::new();
    dev.poll_reads(&mut out, 2).unwrap();
    for r in out {
        match r.tag {
            1 => assert!(r.result.is_err()),
            _ => assert_eq!(r.result.unwrap().to_vec(PS).unwrap(), other),
        }
    }
}

#[test]
fn bad_input_gives_clear_errors_and_overwrites_nothing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("bad.swap");
    let dev = SwapDevice::create(file(&path, true), create_opts(64, "h")).unwrap();
    dev.close().unwrap();
    let open_err = |p: &Path| {
        SwapDevice::open(file(p, false), OpenOptions::read_only("h"))
            .err()
            .expect("open must fail")
            .to_string()
    };
    // Newer format version in both header copies (the crc is checked after the version).
    let newer = dir.path().join("newer.swap");
    std::fs::copy(&path, &newer).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newer)
        .unwrap();
    for copy in [0u64, 4096] {
        f.write_all_at(&9u32.to_le_bytes(), copy + 8).unwrap();
    }
    drop(f);
    assert_eq!(
        open_err(&newer),
        "format version 9 is newer than this pagewise supports (1)"
    );
    // Truncated file.
    let short = dir.path().join("short.swap");
    std::fs::copy(&path, &short).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    let msg = open_err(&short);
    assert!(
        msg.starts_with("device is truncated: it holds 1048576 bytes"),
        "{msg}"
    );
    // Not a swap device; formatting it is refused and leaves it alone.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, vec![0xabu8; 8192]).unwrap();
    assert!(open_err(&other).contains("bad magic"));
    let err = SwapDevice::create(file(&other, false), create_opts(64, "h"))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("already holds 8192 bytes of other data"),
        "{err}"
    );
    assert_eq!(std::fs::read(&other).unwrap(), vec![0xabu8; 8192]);
    // Import of an image of the wrong size writes nothing.
    let mut dev = SwapDevice::open(
        file(&path, false),
        OpenOptions::read_write("h", true, false),
    )
    .unwrap();
    let img = vec![1u8; 1000];
    let err = dev
        .import_image(&mut &img[..], img.len() as u64)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "image is 1000 bytes but the device holds 64 pages of 4096 bytes (262144 bytes)"
    );
    assert_eq!(dev.inspect().pages_stored, 0);
}

#[test]
fn import_export_round_trip_on_file() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("img.swap");
    let pages = 2048u64;
    let mut image = vec![0u8; pages as usize * PS];
    for p in 0..pages as usize {
        let page = &mut image[p * PS..(p + 1) * PS];
        match p % 4 {
            0 => {}
            1 => page.copy_from_slice(&random_page(p as u64)),
            _ => {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = b"memory of a guest "[(i + p) % 18];
                }
            }
        }
    }
    let mut dev = SwapDevice::create(file(&path, true), create_opts(pages, "h")).unwrap();
    let stats = dev
        .import_image(&mut &image[..], image.len() as u64)
        .unwrap();
    assert_eq!((stats.pages, stats.zero_pages), (pages, pages / 4));
    let s = dev.inspect();
    assert_eq!(s.pages_zero, pages / 4);
    assert_eq!(s.pages_compressed, pages / 2);
    dev.close().unwrap();
    let out_path = dir.path().join("out.img");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut dev = SwapDevice::open(file(&path, false), OpenOptions::read_only("h")).unwrap();
    dev.export_image(&out).unwrap();
    drop(out);
    assert!(
        std::fs::read(&out_path).unwrap() == image,
        "exported image differs"
    );
}

/// Host A and host B share one device (a file, or one qemu-nbd export with two clients).
fn hand_off(open: &dyn Fn() -> Box<dyn Backend>) {
    let a_page = random_page(1);
    let b_page = random_page(2);
    let mut a = SwapDevice::create(open(), create_opts(512, "host-a")).unwrap();
    a.write_pages(&[(10, &a_page)]).unwrap();
    // B is refused while A owns the device, with a message naming A.
    let err = SwapDevice::open(open(), OpenOptions::read_write("host-b", true, false))
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "swap device is owned by host host-a (generation 1); release it there first or use --force"
    );
    a.release().unwrap();
    let mut b = SwapDevice::open(open(), OpenOptions::read_write("host-b", true, false)).unwrap();
    assert_eq!(read(&mut b, 10), Some(a_page.clone()));
    b.write_pages(&[(11, &b_page)]).unwrap();
    b.flush().unwrap();
    // A stale owner comes back: it reopens with its old view... and is refused, because
    // the device is owned by B now.
    let err = SwapDevice::open(open(), OpenOptions::read_write("host-a", false, false))
        .err()
        .unwrap();
    assert!(err.to_string().contains("owned by host host-b"), "{err}");
    // A force-takes it; B, still holding its handle, is fenced on its next write and can
    // neither checkpoint nor release over A's newer generation.
    let mut a2 = SwapDevice::open(open(), OpenOptions::read_write("host-a", true, true)).unwrap();
    std::thread::sleep(swapdev::DEFAULT_FENCE_INTERVAL + Duration::from_millis(50));
    let err = b.write_pages(&[(12, &b_page)]).unwrap_err();
    assert!(matches!(err, SwapError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("now at generation"), "{err}");
    assert!(b.flush().is_err());
    assert!(b.release().is_err());
    assert_eq!(read(&mut a2, 11), Some(b_page.clone()));
    assert_eq!(read(&mut a2, 12), None);
    a2.write_pages(&[(13, &a_page)]).unwrap();
    a2.release().unwrap();
    let report = SwapDevice::fsck_backend(open()).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let mut r = SwapDevice::open(open(), OpenOptions::read_only("reader")).unwrap();
    assert_eq!(r.owner(), ("host-a", false));
    assert_eq!(read(&mut r, 13), Some(a_page));
}

#[test]
fn two_host_hand_off_on_a_file() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("shared.swap");
    std::fs::File::create(&path).unwrap();
    hand_off(&|| file(&path, false));
}

#[test]
fn two_host_hand_off_over_nbd() {
    require_qemu_nbd();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.img");
    // A fixed-size export: the device fits its data area into it.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let server = NbdServer::unix(&path, &dir.path().join("nbd.sock"), "swap", &[]);
    let spec = server.spec();
    hand_off(&|| open_backend(&spec, &SpecOptions::default()).expect("connect to qemu-nbd"));
}

/// A device shared behind a mutex (as the daemon, the evictor and the fault loop's source
/// hold it) is released while a reader thread keeps reading through the same handle: the
/// reads never fail, writes through the handle are refused naming the state, and another
/// host acquires the device and sees every page.
fn release_while_reading(open: &dyn Fn() -> Box<dyn Backend>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let mut a = SwapDevice::create(open(), create_opts(256, "host-a")).unwrap();
    for p in 0..64 {
        a.write_pages(&[(p, &random_page(p))]).unwrap();
    }
    let a = Arc::new(Mutex::new(a));
    let released = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let after = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut p = 0;
            while !stop.load(Ordering::Acquire) {
                let was_released = released.load(Ordering::Acquire);
                let got = read(&mut a.lock().unwrap(), p);
                assert_eq!(got, Some(random_page(p)), "page {p}");
                if was_released {
                    after.fetch_add(1, Ordering::Relaxed);
                }
                p = (p + 1) % 64;
            }
        });
        std::thread::sleep(Duration::from_millis(30));
        a.lock().unwrap().release_ownership().unwrap();
        released.store(true, Ordering::Release);
        let err = a
            .lock()
            .unwrap()
            .write_pages(&[(1, &random_page(99))])
            .unwrap_err();
        assert!(
            matches!(err, SwapError::Released { ref host, .. } if host == "host-a"),
            "{err}"
        );
        let mut b =
            SwapDevice::open(open(), OpenOptions::read_write("host-b", true, false)).unwrap();
        assert_eq!(b.owner(), ("host-b", true));
        assert_eq!(read(&mut b, 63), Some(random_page(63)));
        while after.load(Ordering::Relaxed) < 100 {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Release);
        drop(b);
    });
    assert!(after.load(Ordering::Relaxed) >= 100);
}

#[test]
fn release_while_reading_on_a_file() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("shared.swap");
    std::fs::File::create(&path).unwrap();
    release_while_reading(&|| file(&path, false));
}

#[test]
fn release_while_reading_over_nbd() {
    require_qemu_nbd();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let server = NbdServer::unix(&path, &dir.path().join("nbd.sock"), "swap", &[]);
    let spec = server.spec();
    release_while_reading(&|| open_backend(&spec, &SpecOptions::default()).expect("connect"));
}

/// A steady random-rewrite workload far larger than the device: the file never grows and
/// its allocated blocks stay bounded (cleaning frees and trims segments).
#[test]
fn steady_rewrites_do_not_grow_the_file() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("steady.swap");
    let pages = 1024u64;
    let mut dev = SwapDevice::create(file(&path, true), create_opts(pages, "h")).unwrap();
    let size0 = std::fs::metadata(&path).unwrap().len();
    let mut rng = StdRng::seed_from_u64(3);
    let pool: Vec<Vec<u8>> = (0..64).map(random_page).collect();
    // 100 rounds of 256 random incompressible pages = 100 MiB onto a 4 MiB device.
    for _ in 0..100 {
        let batch: Vec<(u64, &[u8])> = (0..256)
            .map(|_| {
                let p = rng.random_range(0..pages);
                (p, &pool[(p % 64) as usize][..])
            })
            .collect();
        dev.write_pages(&batch).unwrap();
    }
    let s = dev.inspect();
    assert!(s.cleaned_segments > 0, "{s:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size0);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(allocated <= size0, "allocated {allocated} > size {size0}");
    dev.close().unwrap();
    let report = SwapDevice::fsck_backend(file(&path, false)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let mut dev = SwapDevice::open(file(&path, false), OpenOptions::read_only("h")).unwrap();
    for p in 0..pages {
        if let Some(d) = read(&mut dev, p) {
            assert_eq!(d, pool[(p % 64) as usize]);
        }
    }
}

/// 2 MiB pages: raw, lz4 and zero pages round-trip through a file and a reopen.
#[test]
fn huge_pages_round_trip() {
    const HP: usize = 2 << 20;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("huge.swap");
    let mut opts = create_opts(8, "h");
    opts.page_size = HP as u32;
    let mut dev = SwapDevice::create(file(&path, true), opts).unwrap();
    let mut random = vec![0u8; HP];
    StdRng::seed_from_u64(5).fill(&mut random[..]);
    let text: Vec<u8> = b"huge page text "
        .iter()
        .cycle()
        .take(HP)
        .copied()
        .collect();
    let zero = vec![0u8; HP];
    dev.write_pages(&[(0, &random), (3, &text), (7, &zero)])
        .unwrap();
    drop(dev); // no close: recovery replays the log
    let mut dev = SwapDevice::open(
        file(&path, false),
        OpenOptions::read_write("h", true, false),
    )
    .unwrap();
    let s = dev.inspect();
    assert_eq!(
        (s.pages_stored, s.pages_compressed, s.pages_zero),
        (2, 1, 1)
    );
    for (p, want) in [(0u64, &random), (3, &text), (7, &zero)] {
        assert!(
            dev.read_page(p).unwrap().to_vec(HP).unwrap() == *want,
            "page {p}"
        );
    }
    assert!(matches!(dev.read_page(1).unwrap(), PageData::NotStored));
    assert!(dev.fsck().unwrap().is_clean());
}

/// A fixed-size NBD export smaller than the planned data area: the device fits itself in
/// and reuses space by cleaning under rewrites.
#[test]
fn small_nbd_export_cleans_instead_of_growing() {
    require_qemu_nbd();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.img");
    // 32 MiB of pages: the plan wants 16 segments (64 MiB), the export has 48 MiB.
    let pages = 8192u64;
    std::fs::File::create(&path)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let server = NbdServer::unix(&path, &dir.path().join("nbd.sock"), "swap", &[]);
    let spec = server.spec();
    let open = || open_backend(&spec, &SpecOptions::default()).expect("connect to qemu-nbd");
    let mut dev = SwapDevice::create(open(), create_opts(pages, "h")).unwrap();
    let total = dev.inspect().segments_total;
    assert_eq!(total, 11, "segments that fit in 48 MiB");
    let mut rng = StdRng::seed_from_u64(9);
    let pool: Vec<Vec<u8>> = (0..32).map(|i| random_page(1000 + i)).collect();
    for _ in 0..40 {
        let batch: Vec<(u64, &[u8])> = (0..256)
            .map(|_| {
                // A 2048-page working set rewritten over and over.
                let p = rng.random_range(0..2048);
                (p, &pool[(p % 32) as usize][..])
            })
            .collect();
        dev.write_pages(&batch).unwrap();
    }
    assert!(dev.inspect().cleaned_segments > 0);
    dev.close().unwrap();
    let report = SwapDevice::fsck_backend(open()).unwrap();
    assert!(report.is_clean(), "{report:#?}");
}
