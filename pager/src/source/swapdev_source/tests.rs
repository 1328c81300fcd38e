//! Both read drivers against real devices: the direct driver on io_uring files (O_DIRECT on
//! disk, buffered on tmpfs), the threaded driver on the in-memory backend (no completion fd).

use std::sync::{Arc, Mutex};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use swapdev::backend::file::{FileBackend, OpenOptions as FileOpenOptions};
use swapdev::backend::mem::{MemBackend, MemStore};
use swapdev::backend::Backend;
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, SwapDevice};

use super::SwapdevSource;
use crate::source::{PageCompletion, PageContent, PageSource, SourceError};

const PAGE: usize = 4096;
const PAGES: u64 = 256;

fn content(page: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|j| (page as usize * 31 + j) as u8 | 1)
        .collect()
}

/// Pages 0..200 stored (every 10th all zero), 200.. never stored.
fn device(backend: Box<dyn Backend>) -> SwapDevice {
    let mut dev = SwapDevice::create(
        backend,
        CreateOptions {
            vm_uuid: uuid::Uuid::new_v4(),
            page_size: PAGE as u32,
            capacity_pages: PAGES,
            host_id: "test".into(),
            codec: CodecPolicy::Raw,
            checksum: ChecksumKind::Crc32c,
            force: false,
        },
    )
    .expect("create device");
    let data: Vec<(u64, Vec<u8>)> = (0..200)
        .map(|p| {
            (
                p,
                if p % 10 == 9 {
                    vec![0; PAGE]
                } else {
                    content(p)
                },
            )
        })
        .collect();
    let batch: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, &d[..])).collect();
    dev.write_pages(&batch).expect("write pages");
    dev
}

/// The tag `read_all` gives a page: groups of 50 share one (merging needs equal tags).
fn tag_of(page: u64) -> u64 {
    page / 50
}

/// Submit every page (shuffled order), wait on the completion fd, check every answer.
/// Returns how many pages came from a merged run read.
fn read_all(mut src: SwapdevSource) -> usize {
    let order: Vec<u64> = (0..PAGES).map(|i| (i * 97) % PAGES).collect();
    for &p in &order {
        src.submit(p, tag_of(p)).expect("submit");
    }
    src.flush().expect("flush");
    let mut got: Vec<PageCompletion> = Vec::new();
    while got.len() < PAGES as usize {
        let mut fds = [PollFd::new(src.completion_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(5000u16)).expect("poll");
        assert_eq!(
            n,
            1,
            "completion fd not readable with {} reads in flight",
            src.in_flight()
        );
        src.poll(&mut got, 0).expect("poll source");
    }
    assert_eq!(src.in_flight(), 0);
    got.sort_by_key(|c| c.page);
    let mut shared = 0;
    for (p, c) in got.iter().enumerate() {
        let p = p as u64;
        assert_eq!(c.page, p);
        assert_eq!(c.tag, tag_of(p), "tag of page {p}");
        let content_read = c.result.as_ref().expect("read ok");
        match content_read.bytes(PAGE) {
            None => assert!(p >= 200 || p % 10 == 9, "page {p} read as zero"),
            Some(bytes) => assert_eq!(bytes, &content(p)[..], "page {p}"),
        }
        shared += usize::from(matches!(content_read, PageContent::Shared { .. }));
    }
    // Out of range is refused at submit.
    assert!(src.submit(PAGES, 0).is_err());
    shared
}

#[test]
fn direct_driver_serves_io_uring_files_without_a_thread() {
    for dir in ["/var/tmp", "/dev/shm"] {
        let tmp = tempfile::tempdir_in(dir).expect("tempdir");
        let opts = FileOpenOptions {
            create: true,
            ..Default::default()
        };
        let backend = FileBackend::open(tmp.path().join("dev.swap"), opts).expect("open");
        let dev = Arc::new(Mutex::new(device(Box::new(backend))));
        let src = SwapdevSource::new(dev.clone(), "test".into()).expect("source");
        assert!(
            src.is_direct(),
            "{dir}: file backend must use the direct driver"
        );
        // Pages 0..200 were written in page order: runs of 9 raw pages between zero pages.
        let merged = read_all(src);
        assert!(
            merged >= 100,
            "{dir}: only {merged} pages came from merged reads"
        );
        // The device is still usable by others (the evictor) afterwards.
        dev.lock().unwrap().flush().expect("flush device");
    }
}

#[test]
fn threaded_driver_serves_backends_without_completion_fd() {
    let backend = MemBackend::new(MemStore::new());
    let dev = Arc::new(Mutex::new(device(Box::new(backend))));
    let src = SwapdevSource::new(dev, "test".into()).expect("source");
    assert!(!src.is_direct());
    assert_eq!(read_all(src), 0);
}

/// A run read verifies every page: a flipped byte in one page fails only that page; a run
/// over a page that is not a raw record is refused.
#[test]
fn run_reads_check_each_page_and_refuse_non_raw_pages() {
    let store = MemStore::new();
    let mut dev = device(Box::new(MemBackend::new(store.clone())));
    assert_eq!(dev.raw_run_len(0, 20), 9, "page 9 is a zero page");
    let err = dev.submit_read_run(0, 10, 1).unwrap_err().to_string();
    assert!(err.contains("only 9"), "{err}");
    let snapshot = store.snapshot();
    let needle = content(5);
    // Raw payloads sit on 4 KiB boundaries.
    let at = PAGE
        * snapshot
            .chunks_exact(PAGE)
            .position(|c| c == &needle[..])
            .expect("page 5 payload on the store");
    store.corrupt(at as u64 + 100, 0x40);
    dev.submit_read_run(0, 9, 7).unwrap();
    let (mut pages, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        dev.poll_ready(&mut pages, &mut runs).unwrap();
        if !runs.is_empty() {
            break;
        }
    }
    assert!(pages.is_empty());
    let run = runs.pop().expect("run read completed");
    assert_eq!((run.tag, run.first, run.count), (7, 0, 9));
    assert_eq!(run.corrupt.len(), 1);
    assert_eq!(run.corrupt[0].0, 5);
    assert!(run.corrupt[0].1.to_string().contains("checksum"));
    let buf = run.result.expect("read ok");
    for p in (0..9).filter(|&p| p != 5) {
        assert_eq!(&buf[p * PAGE..(p + 1) * PAGE], &content(p as u64)[..]);
    }
}

#[test]
fn direct_driver_returns_zero_pages_without_waiting_on_io() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let backend = FileBackend::open(
        tmp.path().join("dev.swap"),
        FileOpenOptions {
            create: true,
            ..Default::default()
        },
    )
    .expect("open");
    let dev = Arc::new(Mutex::new(device(Box::new(backend))));
    let mut src = SwapdevSource::new(dev, "test".into()).expect("source");
    // Zero and never-stored pages complete without I/O: flush must make the fd readable.
    src.submit(9, 1).unwrap();
    src.submit(250, 2).unwrap();
    src.flush().unwrap();
    {
        let mut fds = [PollFd::new(src.completion_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 1);
    }
    let mut got = Vec::new();
    assert_eq!(src.poll(&mut got, 0).unwrap(), 2);
    assert!(got
        .iter()
        .all(|c| matches!(c.result, Ok(PageContent::Zero))));
}

/// A checkpoint (which may free log segments) waits for run reads in flight, like for page
/// reads: the run still lands with the right bytes.
#[test]
fn checkpoint_waits_for_run_reads_in_flight() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let backend = FileBackend::open(
        tmp.path().join("dev.swap"),
        FileOpenOptions {
            create: true,
            ..Default::default()
        },
    )
    .expect("open");
    let mut dev = device(Box::new(backend));
    dev.submit_read_run(10, 9, 4).unwrap();
    dev.checkpoint().unwrap();
    let (mut pages, mut runs) = (Vec::new(), Vec::new());
    dev.poll_ready(&mut pages, &mut runs).unwrap();
    let run = runs.pop().expect("the checkpoint waited for the run read");
    assert!(run.corrupt.is_empty());
    let buf = run.result.expect("read ok");
    for i in 0..9 {
        assert_eq!(&buf[i * PAGE..(i + 1) * PAGE], &content(10 + i as u64)[..]);
    }
}

/// Submit `(page, tag)` requests, wait for all of them, sorted by (page, tag).
fn collect(src: &mut SwapdevSource, reqs: &[(u64, u64)]) -> Vec<PageCompletion> {
    for &(p, t) in reqs {
        src.submit(p, t).expect("submit");
    }
    src.flush().expect("flush");
    let mut got = Vec::new();
    while got.len() < reqs.len() {
        let mut fds = [PollFd::new(src.completion_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).expect("poll"), 1);
        src.poll(&mut got, 0).expect("poll source");
    }
    got.sort_by_key(|c| (c.page, c.tag));
    got
}

/// A flipped payload byte of page 5 must come back as `Damaged` naming page 5 (never as
/// a retryable I/O error, never as data), alone and inside a merged run read; its
/// neighbours are served.
fn flipped_byte_is_damaged(mut src: SwapdevSource) {
    // Tag 1: pages 0..9 (raw, back to back) merge into one run read; tag 2: page 5 alone.
    let mut reqs: Vec<(u64, u64)> = (0..9).map(|p| (p, 1)).collect();
    reqs.push((5, 2));
    let got = collect(&mut src, &reqs);
    assert_eq!(got.len(), 10);
    for c in &got {
        match (&c.result, c.page) {
            (Err(SourceError::Damaged { page, source, .. }), 5) => {
                assert_eq!(*page, 5);
                let cause = source.to_string();
                assert!(cause.contains("page 5 is corrupt"), "{cause}");
                assert!(cause.contains("checksum mismatch"), "{cause}");
            }
            (Err(e), p) => panic!("page {p} (tag {}): {e:?}", c.tag),
            (Ok(served), 5) => panic!("damaged page 5 was served: {served:?}"),
            (Ok(served), p) => assert_eq!(served.bytes(PAGE), Some(&content(p)[..])),
        }
    }
    let damaged = got.iter().filter(|c| c.result.is_err()).count();
    assert_eq!(damaged, 2, "page 5 through the run and alone");
}

#[test]
fn flipped_payload_byte_is_damaged_through_the_direct_driver() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let path = tmp.path().join("dev.swap");
    let opts = FileOpenOptions {
        create: true,
        ..Default::default()
    };
    let dev = device(Box::new(FileBackend::open(&path, opts).expect("open")));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open device file");
    let bytes = std::fs::read(&path).expect("read device file");
    let at = PAGE
        * bytes
            .chunks_exact(PAGE)
            .position(|c| c == &content(5)[..])
            .expect("page 5 payload in the file");
    use std::os::unix::fs::FileExt;
    let flipped = [bytes[at + 100] ^ 0x40];
    file.write_all_at(&flipped, (at + 100) as u64)
        .expect("flip");
    file.sync_all().expect("sync");
    let src = SwapdevSource::new(Arc::new(Mutex::new(dev)), "test".into()).expect("source");
    assert!(src.is_direct());
    flipped_byte_is_damaged(src);
}

#[test]
fn flipped_payload_byte_is_damaged_through_the_threaded_driver() {
    let store = MemStore::new();
    let dev = device(Box::new(MemBackend::new(store.clone())));
    let at = PAGE
        * store
            .snapshot()
            .chunks_exact(PAGE)
            .position(|c| c == &content(5)[..])
            .expect("page 5 payload on the store");
    store.corrupt(at as u64 + 100, 0x40);
    let src = SwapdevSource::new(Arc::new(Mutex::new(dev)), "test".into()).expect("source");
    assert!(!src.is_direct());
    flipped_byte_is_damaged(src);
}

/// An lz4 payload whose bytes were changed fails its checksum (or its decode): `Damaged`.
#[test]
fn damaged_lz4_payload_is_damaged_not_io() {
    let store = MemStore::new();
    let mut dev = SwapDevice::create(
        Box::new(MemBackend::new(store.clone())),
        CreateOptions {
            vm_uuid: uuid::Uuid::new_v4(),
            page_size: PAGE as u32,
            capacity_pages: 16,
            host_id: "test".into(),
            codec: CodecPolicy::Lz4,
            checksum: ChecksumKind::Crc32c,
            force: false,
        },
    )
    .expect("create");
    let text: Vec<u8> = b"compressible text page "
        .iter()
        .copied()
        .cycle()
        .take(PAGE)
        .collect();
    let before = store.snapshot();
    dev.write_pages(&[(3, &text)]).expect("write");
    let after = store.snapshot();
    // The batch is the only new data area content: flip a byte in its payload block (the
    // block after the batch header block).
    let batch = (0..after.len() / PAGE)
        .rev()
        .find(|&b| {
            let block = &after[b * PAGE..(b + 1) * PAGE];
            block[..8] == *b"PWBATCH1" && before.get(b * PAGE..(b + 1) * PAGE) != Some(block)
        })
        .expect("batch header block");
    store.corrupt(((batch + 1) * PAGE + 10) as u64, 0x01);
    let mut src = SwapdevSource::new(Arc::new(Mutex::new(dev)), "test".into()).expect("source");
    let got = collect(&mut src, &[(3, 1)]);
    match &got[0].result {
        Err(SourceError::Damaged { page: 3, .. }) => {}
        other => panic!("lz4 page 3: {other:?}"),
    }
}
