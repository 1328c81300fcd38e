//! Serial fault round trip through the real fault loop, per page source:
//! `cargo run --release -p pager --example fault_rtt -- [PAGES] [DIR]`
//! (DIR defaults to /dev/shm, so the number is the pager's overhead, not the disk's).
//! One thread touches PAGES pages in order; each touch is one uffd fault served by the
//! fault loop from (a) a raw image through io_uring, (b) a swap device (I/O thread).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use memmap2::MmapMut;
use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::attach::protocol::GuestRegionUffdMapping;
use pager::fault_loop::{FaultLoop, FaultLoopConfig};
use pager::source::{ImageFileSource, PageSource, SwapdevSource};
use pager::uffd::{Features, RegisterMode, Uffd, UffdFlags};
use pager::vm::{GuestLayout, PeerInfo, Vm};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, SwapDevice};

const PAGE: usize = 4096;

fn page(i: usize) -> Vec<u8> {
    (0..PAGE).map(|j| (i * 13 + j) as u8 | 1).collect()
}

fn run(name: &str, pages: usize, source: Box<dyn PageSource>) {
    let map = MmapMut::map_anon(pages * PAGE).unwrap();
    let addr = map.as_ptr() as u64;
    let uffd = Uffd::new(UffdFlags {
        nonblocking: true,
        ..Default::default()
    })
    .unwrap();
    uffd.api(Features::EVENT_REMOVE).unwrap();
    uffd.register(addr, (pages * PAGE) as u64, RegisterMode::MISSING)
        .unwrap();
    let layout = GuestLayout::from_mappings(&[GuestRegionUffdMapping {
        base_host_virt_addr: addr,
        size: pages * PAGE,
        offset: 0,
        page_size: PAGE,
        page_size_kib: 0,
    }])
    .unwrap();
    let vm = Arc::new(Vm::new(
        name.into(),
        uffd,
        layout,
        None,
        PeerInfo::default(),
    ));
    let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
    let fl = FaultLoop::new(
        vm.clone(),
        source,
        pager::prefetch::by_name("none", pages as u64).unwrap(),
        FaultLoopConfig::default(),
        stop.clone(),
        None,
    )
    .expect("fault loop");
    let t = std::thread::spawn(move || fl.run());
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..pages {
        sum += map[i * PAGE] as u64;
    }
    let per_fault = start.elapsed().as_secs_f64() * 1e6 / pages as f64;
    stop.write(1).unwrap();
    t.join().unwrap().unwrap();
    let m = vm.metrics.snapshot();
    println!(
        "{name:<28} {pages} faults: {per_fault:6.1} us/fault (touch loop); pager p50 <= {} us, p99 <= {} us, mean {:.1} us [check {sum}]",
        m.fault_latency.quantile_us(0.5).unwrap_or(0),
        m.fault_latency.quantile_us(0.99).unwrap_or(0),
        m.fault_latency.mean_us().unwrap_or(0.0),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pages: usize = args.get(1).map_or(20_000, |a| a.parse().unwrap());
    let dir = args.get(2).map_or("/dev/shm", String::as_str);
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let image = tmp.path().join("image.raw");
    let mut f = std::fs::File::create(&image).unwrap();
    for i in 0..pages {
        f.write_all(&page(i)).unwrap();
    }
    drop(f);
    let dev_path = tmp.path().join("vm.swap");
    let backend = open_backend(
        dev_path.to_str().unwrap(),
        &SpecOptions {
            create: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut dev = SwapDevice::create(
        backend,
        CreateOptions {
            vm_uuid: uuid::Uuid::new_v4(),
            page_size: PAGE as u32,
            capacity_pages: pages as u64,
            host_id: "rtt".into(),
            codec: CodecPolicy::Raw,
            checksum: ChecksumKind::Crc32c,
            force: false,
        },
    )
    .unwrap();
    let data: Vec<Vec<u8>> = (0..pages).map(page).collect();
    for chunk in (0..pages).collect::<Vec<_>>().chunks(256) {
        let batch: Vec<(u64, &[u8])> = chunk.iter().map(|&i| (i as u64, &data[i][..])).collect();
        dev.write_pages(&batch).unwrap();
    }
    dev.close().unwrap();

    run(
        "image file (io_uring)",
        pages,
        Box::new(ImageFileSource::open(&image, PAGE, pages as u64).unwrap()),
    );
    let backend = open_backend(dev_path.to_str().unwrap(), &SpecOptions::default()).unwrap();
    let dev = SwapDevice::open(backend, OpenOptions::read_write("rtt", true, false)).unwrap();
    let src = SwapdevSource::new(Arc::new(Mutex::new(dev)), "swapdev".into()).unwrap();
    run("swap device (I/O thread)", pages, Box::new(src));
}
