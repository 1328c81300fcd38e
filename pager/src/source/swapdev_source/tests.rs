//! Both read drivers against real devices: the direct driver on io_uring files (O_DIRECT on
//! disk, buffered on tmpfs), the threaded driver on the in-memory backend (no completion fd).

use std::sync::{Arc, Mutex};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use swapdev::backend::file::{FileBackend, OpenOptions as FileOpenOptions};
use swapdev::backend::mem::{MemBackend, MemStore};
use swapdev::backend::Backend;
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, SwapDevice};

use super::SwapdevSource;
use crate::source::{PageCompletion, PageContent, PageSource};

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

/// Submit every page (shuffled order), wait on the completion fd, check every answer.
fn read_all(mut src: SwapdevSource) {
    let order: Vec<u64> = (0..PAGES).map(|i| (i * 97) % PAGES).collect();
    for (i, &p) in order.iter().enumerate() {
        src.submit(p, i as u64).expect("submit");
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
    for (p, c) in got.iter().enumerate() {
        let p = p as u64;
        assert_eq!(c.page, p);
        assert_eq!(order[c.tag as usize], p, "tag of page {p}");
        match c.result.as_ref().expect("read ok") {
            PageContent::Zero => assert!(p >= 200 || p % 10 == 9, "page {p} read as zero"),
            PageContent::Data(buf) => assert_eq!(&buf.as_slice()[..PAGE], &content(p)[..]),
        }
    }
    // Out of range is refused at submit.
    assert!(src.submit(PAGES, 0).is_err());
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
        read_all(src);
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
    read_all(src);
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
