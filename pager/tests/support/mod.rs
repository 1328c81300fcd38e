//! Helpers shared by the pager's end-to-end tests: swap-device files with known content, an
//! anonymous guest registered with a uffd, waiting.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pager::attach::protocol::GuestRegionUffdMapping;
use pager::uffd::{Features, RegisterMode, Uffd, UffdFlags};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, SwapDevice};

pub const PAGE: usize = 4096;
pub const PAGES: usize = 512;

/// Stored content of page `i`; pages with `i % 5 == 4` are never stored (read as zero).
pub fn page_content(i: usize) -> Option<Vec<u8>> {
    (i % 5 != 4).then(|| (0..PAGE).map(|j| ((i * 31 + j * 7) % 253) as u8).collect())
}

pub fn create_swapdev(path: &Path) {
    let opts = SpecOptions {
        create: true,
        ..Default::default()
    };
    let backend = open_backend(path.to_str().unwrap(), &opts).unwrap();
    let mut dev = SwapDevice::create(
        backend,
        CreateOptions {
            vm_uuid: uuid::Uuid::new_v4(),
            page_size: PAGE as u32,
            capacity_pages: PAGES as u64,
            host_id: "e2e".into(),
            codec: CodecPolicy::Lz4,
            checksum: ChecksumKind::Crc32c,
            force: false,
        },
    )
    .unwrap();
    let contents: Vec<(u64, Vec<u8>)> = (0..PAGES)
        .filter_map(|i| page_content(i).map(|c| (i as u64, c)))
        .collect();
    let refs: Vec<(u64, &[u8])> = contents.iter().map(|(p, c)| (*p, c.as_slice())).collect();
    for chunk in refs.chunks(64) {
        dev.write_pages(chunk).unwrap();
    }
    dev.flush().unwrap();
    dev.close().unwrap();
}

pub struct Guest {
    pub map: MmapMut,
    pub uffd: Uffd,
}

impl Guest {
    pub fn new() -> Self {
        let map = MmapMut::map_anon(PAGES * PAGE).unwrap();
        let uffd = Uffd::new(UffdFlags::default()).unwrap();
        uffd.api(Features::EVENT_REMOVE).unwrap();
        uffd.register(
            map.as_ptr() as u64,
            (PAGES * PAGE) as u64,
            RegisterMode::MISSING,
        )
        .unwrap();
        Self { map, uffd }
    }

    pub fn region(&self, size: usize) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: self.map.as_ptr() as u64,
            size,
            offset: 0,
            page_size: PAGE,
            page_size_kib: PAGE,
        }
    }
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
