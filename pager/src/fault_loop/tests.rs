//! Fault-loop tests on real memory: an anonymous mapping registered with a real uffd, pages
//! served from a real image file through io_uring, faults raised by this test's thread.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use memmap2::MmapMut;
use nix::sys::eventfd::{EfdFlags, EventFd};
use uffd::{Features, RegisterMode, Uffd, UffdFlags};

use super::{FaultLoop, FaultLoopConfig, LoopExit};
use crate::attach::protocol::GuestRegionUffdMapping;
use crate::page_state::PageState;
use crate::prefetch;
use crate::source::ImageFileSource;
use crate::vm::{GuestLayout, PeerInfo, Vm};

const PAGE: usize = 4096;

/// Page `i` of the test image: bytes `(i * 7 + j) % 251`, except every 4th page is zero.
fn image_page(i: usize) -> Vec<u8> {
    if i % 4 == 3 {
        vec![0; PAGE]
    } else {
        (0..PAGE).map(|j| ((i * 7 + j) % 251) as u8).collect()
    }
}

struct Harness {
    map: MmapMut,
    /// Further regions (guest pages after `map`'s), each its own mapping.
    extra: Vec<MmapMut>,
    vm: Arc<Vm>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<Result<LoopExit, super::FaultLoopError>>>,
    _image: tempfile::NamedTempFile,
}

impl Harness {
    fn start(pages: usize, policy: &str) -> Self {
        Self::start_regions(&[pages], policy, RegisterMode::MISSING)
    }

    /// One anonymous mapping per entry of `region_pages`; region `k` holds the guest pages
    /// after region `k-1`'s (contiguous file offsets, unrelated host addresses).
    fn start_regions(region_pages: &[usize], policy: &str, mode: RegisterMode) -> Self {
        let pages: usize = region_pages.iter().sum();
        let mut image = tempfile::NamedTempFile::new().unwrap();
        for i in 0..pages {
            image.write_all(&image_page(i)).unwrap();
        }
        let uffd = Uffd::new(UffdFlags {
            nonblocking: true,
            ..Default::default()
        })
        .unwrap();
        uffd.api(Features::EVENT_REMOVE | Features::THREAD_ID)
            .unwrap();
        let mut maps = Vec::new();
        let mut regions = Vec::new();
        let mut offset = 0;
        for &n in region_pages {
            let map = MmapMut::map_anon(n * PAGE).unwrap();
            let addr = map.as_ptr() as u64;
            uffd.register(addr, (n * PAGE) as u64, mode).unwrap();
            regions.push(GuestRegionUffdMapping {
                base_host_virt_addr: addr,
                size: n * PAGE,
                offset,
                page_size: PAGE,
                page_size_kib: 0,
            });
            offset += (n * PAGE) as u64;
            maps.push(map);
        }
        let layout = GuestLayout::from_mappings(&regions).unwrap();
        let map = maps.remove(0);
        let vm = Arc::new(Vm::new("t".into(), uffd, layout, None, PeerInfo::default()));
        let source = ImageFileSource::open(image.path(), PAGE, pages as u64).unwrap();
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
        let fl = FaultLoop::new(
            vm.clone(),
            Box::new(source),
            prefetch::by_name(policy, pages as u64).unwrap(),
            FaultLoopConfig::default(),
            stop.clone(),
            None,
        )
        .unwrap();
        let thread = Some(std::thread::spawn(move || fl.run()));
        Self {
            map,
            extra: maps,
            vm,
            stop,
            thread,
            _image: image,
        }
    }

    fn stop(&mut self) -> LoopExit {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

#[test]
fn serves_pages_from_the_source_with_zero_detection() {
    let pages = 32;
    let mut h = Harness::start(pages, "none");
    for i in (0..pages).rev() {
        assert_eq!(
            &h.map[i * PAGE..(i + 1) * PAGE],
            &image_page(i)[..],
            "page {i}"
        );
    }
    assert_eq!(h.stop(), LoopExit::Stopped);
    let m = h.vm.metrics.snapshot();
    assert_eq!(m.faults, pages as u64);
    assert_eq!(m.faults_to_source, pages as u64);
    assert_eq!(m.pages_zeroed, (pages / 4) as u64);
    assert_eq!(m.pages_copied, (pages - pages / 4) as u64);
    assert_eq!(m.fault_latency.count(), pages as u64);
    assert!(m.blocktime_ns > 0);
    assert_eq!(h.vm.states.count(PageState::Present), pages);
}

#[test]
fn prefetch_fetches_ahead_of_a_sequential_scan() {
    let pages = 256;
    let mut h = Harness::start(pages, "stride");
    for i in 0..pages {
        assert_eq!(h.map[i * PAGE + 5], image_page(i)[5], "page {i}");
    }
    h.stop();
    let m = h.vm.metrics.snapshot();
    assert!(m.pages_prefetched > 0, "{m:?}");
    assert!(m.faults_to_source < pages as u64, "{m:?}");
    assert_eq!(m.pages_copied + m.pages_zeroed, pages as u64);
}

#[test]
fn removed_pages_read_as_zero_not_stale_content() {
    let pages = 8;
    let mut h = Harness::start(pages, "none");
    assert_eq!(h.map[PAGE + 1], image_page(1)[1]);
    assert_eq!(h.map[2 * PAGE + 1], image_page(2)[1]);
    // The madvise blocks until the fault loop has read the REMOVE message.
    // SAFETY: discarding pages of this test's own mapping; nothing borrows them.
    unsafe {
        h.map
            .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, PAGE, 2 * PAGE)
            .unwrap()
    };
    assert!(h.map[PAGE..3 * PAGE].iter().all(|&b| b == 0));
    assert_eq!(h.map[4 * PAGE + 1], image_page(4)[1]);
    h.stop();
    let m = h.vm.metrics.snapshot();
    assert_eq!(m.remove_events, 1);
    assert_eq!(m.pages_removed, 2);
    assert_eq!(m.pages_zeroed, 2);
    let _ = h.vm.uffd.as_raw_fd();
}

#[test]
fn runs_are_not_coalesced_across_regions() {
    // Three regions whose file offsets are contiguous; a sequential scan with stride
    // prefetch makes completions for pages on both sides of each region boundary arrive
    // together.
    let mut h = Harness::start_regions(&[5, 7, 20], "stride", RegisterMode::MISSING);
    let mut page = 0;
    for map in std::iter::once(&h.map).chain(h.extra.iter()) {
        for i in 0..map.len() / PAGE {
            assert_eq!(
                &map[i * PAGE..(i + 1) * PAGE],
                &image_page(page)[..],
                "page {page}"
            );
            page += 1;
        }
    }
    h.stop();
    let m = h.vm.metrics.snapshot();
    assert_eq!(m.pages_copied + m.pages_zeroed, 32);
}

#[test]
fn write_to_a_reprotected_present_page_marks_it_dirty_and_proceeds() {
    let mut h = Harness::start_regions(&[8], "none", RegisterMode::MISSING | RegisterMode::WP);
    assert_eq!(h.map[3 * PAGE], image_page(3)[0]);
    let addr = h.map.as_ptr() as u64 + 3 * PAGE as u64;
    let writes = h.vm.dirty.subscribe(Default::default()).unwrap();
    // Write tracking re-protects a present page; the next write must fault to the loop.
    h.vm.uffd
        .write_protect(addr, PAGE as u64, true, false)
        .unwrap();
    let writer = std::thread::spawn(move || {
        // SAFETY: `addr` is inside the harness mapping, alive until the test ends.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 0xee) }
    });
    writer.join().unwrap();
    assert_eq!(h.map[3 * PAGE], 0xee);
    assert!(writes.is_dirty(3));
    assert_eq!(writes.count(), 1);
    // The loop holds the page InFlight around the un-protect (see dirty::resolve_write_fault)
    // and stores Present right after the writer was woken.
    let since = std::time::Instant::now();
    while h.vm.states.get(3) != PageState::Present {
        assert!(since.elapsed() < std::time::Duration::from_secs(5));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    h.stop();
    assert_eq!(h.vm.metrics.snapshot().wp_faults, 1);
}

#[test]
fn background_prefetch_leaves_evicted_pages_alone_but_faults_fetch_them() {
    let pages = 64;
    let mut h = Harness::start(pages, "bubble");
    h.vm.states.set_range(40..64, PageState::Evicted);
    assert_eq!(h.map[5], image_page(0)[5]);
    // Let active push run until nothing is in flight.
    let since = std::time::Instant::now();
    while h.vm.states.count(PageState::InFlight) > 0 || h.vm.states.count(PageState::Missing) > 0 {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(5),
            "active push did not finish the missing pages: {:?} {:?}",
            h.vm.states.census(),
            h.vm.metrics.snapshot()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(h.vm.states.count(PageState::Evicted), 24);
    assert_eq!(h.vm.states.count(PageState::Present), 40);
    // A demand fault still fetches an evicted page.
    assert_eq!(&h.map[50 * PAGE..51 * PAGE], &image_page(50)[..]);
    h.stop();
}

/// A 2 MiB-page guest on hugetlbfs (memfd MFD_HUGETLB): hugetlbfs has no UFFDIO_ZEROPAGE,
/// so zero pages must be placed by copying a zeroed huge page. Reserves huge pages for the
/// test if the machine has too few, and gives them back afterwards.
#[test]
fn hugetlbfs_guest_gets_data_and_zero_huge_pages() {
    const HUGE: usize = 2 << 20;
    let pages = 4usize;
    let nr_path = "/proc/sys/vm/nr_hugepages";
    let before: usize = std::fs::read_to_string(nr_path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let free = |path: &str| -> usize {
        std::fs::read_to_string(path)
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0)
    };
    let free_path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    let raised = free(free_path) < pages;
    if raised {
        std::fs::write(nr_path, (before + pages).to_string())
            .expect("reserving 2 MiB huge pages (needs root)");
    }
    assert!(
        free(free_path) >= pages,
        "could not reserve {pages} free 2 MiB huge pages (see {nr_path})"
    );

    // Image: huge pages 0 and 2 hold data, 1 and 3 are zero.
    let huge_page = |i: usize| -> Vec<u8> {
        if i % 2 == 1 {
            vec![0; HUGE]
        } else {
            (0..HUGE).map(|j| ((i * 13 + j) % 241) as u8).collect()
        }
    };
    let mut image = tempfile::NamedTempFile::new().unwrap();
    for i in 0..pages {
        image.write_all(&huge_page(i)).unwrap();
    }
    let memfd = nix::sys::memfd::memfd_create(
        c"pw-hugetlb-test",
        nix::sys::memfd::MFdFlags::MFD_HUGETLB | nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    nix::unistd::ftruncate(&memfd, (pages * HUGE) as i64).unwrap();
    let file = std::fs::File::from(memfd);
    // SAFETY: a fresh shared mapping of our own memfd; nothing else maps it.
    let map = unsafe { memmap2::MmapOptions::new().len(pages * HUGE).map_mut(&file) }.unwrap();
    let uffd = Uffd::new(UffdFlags {
        nonblocking: true,
        ..Default::default()
    })
    .unwrap();
    uffd.api(Features::EVENT_REMOVE | Features::MISSING_HUGETLBFS)
        .unwrap();
    let addr = map.as_ptr() as u64;
    uffd.register(addr, (pages * HUGE) as u64, RegisterMode::MISSING)
        .unwrap();
    let layout = GuestLayout::from_mappings(&[GuestRegionUffdMapping {
        base_host_virt_addr: addr,
        size: pages * HUGE,
        offset: 0,
        page_size: HUGE,
        page_size_kib: 0,
    }])
    .unwrap();
    let vm = Arc::new(Vm::new(
        "huge".into(),
        uffd,
        layout,
        None,
        PeerInfo::default(),
    ));
    let source = ImageFileSource::open(image.path(), HUGE, pages as u64).unwrap();
    let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
    let fl = FaultLoop::new(
        vm.clone(),
        Box::new(source),
        prefetch::by_name("none", pages as u64).unwrap(),
        FaultLoopConfig::default(),
        stop.clone(),
        None,
    )
    .unwrap();
    let thread = std::thread::spawn(move || fl.run());
    // Touch from another thread: if the loop fails, that thread stays blocked in its fault,
    // and the test reports the loop's error instead of hanging.
    let map = Arc::new(map);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let toucher = {
        let map = map.clone();
        std::thread::spawn(move || {
            let wrong: Vec<usize> = (0..pages)
                .filter(|&i| map[i * HUGE..(i + 1) * HUGE] != huge_page(i)[..])
                .collect();
            done_tx.send(wrong).unwrap();
        })
    };
    let touched = done_rx.recv_timeout(std::time::Duration::from_secs(20));
    stop.write(1).unwrap();
    let exit = thread.join().unwrap();
    if raised {
        std::fs::write(nr_path, before.to_string()).unwrap();
    }
    let wrong = touched.unwrap_or_else(|_| panic!("faults not served within 20 s; loop: {exit:?}"));
    toucher.join().unwrap();
    assert!(wrong.is_empty(), "huge pages with wrong content: {wrong:?}");
    drop(map);
    drop(file);
    assert_eq!(exit.unwrap(), LoopExit::Stopped);
    let m = vm.metrics.snapshot();
    assert_eq!(m.pages_zeroed, 2);
    assert_eq!(m.pages_copied, 2);
}
