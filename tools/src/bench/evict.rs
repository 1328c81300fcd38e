//! `pagewise bench evict`: what eviction and write tracking cost, against baselines measured
//! in the same run on the same files.
//!
//! - Eviction throughput: `VmEviction` (claim, write-protect, read, store + fdatasync, punch,
//!   wake) vs a raw loop doing only the I/O (pread from the memory file, pwrite + fdatasync
//!   to the store, punch), same batch size, same files.
//! - Refault: reading the evicted pages back through the pager's fault loop (µs per page).
//! - Write tracking: a writer's throughput on a hot set with the working-set sampler off and
//!   at two intervals (every interval re-protects the guest; each first write then takes a
//!   synchronous WP fault).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::evict::{EvictConfig, EvictGoal, ImageFileStore, SwapdevStore, VmEviction};
use pager::fault_loop::{FaultLoop, FaultLoopConfig};
use pager::page_state::PageState;
use pager::source::ImageFileSource;
use pager::uffd::Features;
use pager::vm::Vm;
use rand::Rng;

const PAGE: usize = 4096;

#[derive(clap::Args, Debug)]
pub struct EvictBenchArgs {
    /// Directory for the memory image the pages are evicted to.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Guest size in MiB.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Pages per eviction batch.
    #[arg(long, default_value_t = 256)]
    batch_pages: usize,
    /// Seconds per write-tracking run.
    #[arg(long, default_value_t = 1.5)]
    secs: f64,
    /// Hot-set size of the write-tracking runs, in pages.
    #[arg(long, default_value_t = 4096)]
    hot_pages: u64,
}

struct Guest {
    memfd: File,
    map: memmap2::MmapRaw,
    vm: Arc<Vm>,
    image: tempfile::NamedTempFile,
    stop: Arc<EventFd>,
    fault_loop: Option<std::thread::JoinHandle<()>>,
    pages: u64,
}

impl Guest {
    fn new(args: &EvictBenchArgs) -> anyhow::Result<Self> {
        let pages = args.mib * (1 << 20) / PAGE as u64;
        let len = pages * PAGE as u64;
        let image = tempfile::NamedTempFile::new_in(&args.dir)
            .with_context(|| format!("creating the image in {}", args.dir.display()))?;
        image.as_file().set_len(len)?;
        let (map, memfd, vm) =
            crate::lab_vm::MemfdVm::new("bench", pages, PAGE, Features::empty())?.into_shared();
        let source = ImageFileSource::open(image.path(), PAGE, pages)?;
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
        let fl = FaultLoop::new(
            vm.clone(),
            Box::new(source),
            pager::prefetch::by_name("none", pages)?,
            FaultLoopConfig::default(),
            stop.clone(),
            None,
        )?;
        let fault_loop = Some(std::thread::spawn(move || {
            if let Err(e) = fl.run() {
                eprintln!("bench fault loop: {e}");
            }
        }));
        Ok(Self {
            memfd,
            map,
            vm,
            image,
            stop,
            fault_loop,
            pages,
        })
    }

    /// Fill every page with non-zero data through the file (no faults) and mark it Present.
    fn fill(&self) -> anyhow::Result<()> {
        let mut chunk = vec![0u8; 256 * PAGE];
        let mut rng = rand::rng();
        for first in (0..self.pages).step_by(256) {
            let n = (self.pages - first).min(256) as usize;
            rng.fill(&mut chunk[..n * PAGE]);
            self.memfd
                .write_all_at(&chunk[..n * PAGE], first * PAGE as u64)?;
        }
        self.vm.states.set_range(0..self.pages, PageState::Present);
        Ok(())
    }

    fn store(&self) -> anyhow::Result<Arc<ImageFileStore>> {
        Ok(Arc::new(
            ImageFileStore::open(self.image.path(), PAGE, self.pages)
                .map_err(|e| anyhow!("{e}"))?,
        ))
    }

    fn word(&self, page: u64) -> &AtomicU64 {
        // SAFETY: inside our live shared mapping, page aligned, only accessed atomically.
        unsafe { &*((self.map.as_ptr() as u64 + page * PAGE as u64) as *const AtomicU64) }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.fault_loop.take() {
            let _ = t.join();
        }
    }
}

/// The raw I/O of eviction without the protocol: pread, pwrite + fdatasync, punch.
fn raw_evict(g: &Guest, batch: usize) -> anyhow::Result<Duration> {
    let image = File::options().write(true).open(g.image.path())?;
    let mut buf = vec![0u8; batch * PAGE];
    let t = Instant::now();
    for first in (0..g.pages).step_by(batch) {
        let n = (g.pages - first).min(batch as u64) as usize;
        let off = first * PAGE as u64;
        g.memfd.read_exact_at(&mut buf[..n * PAGE], off)?;
        image.write_all_at(&buf[..n * PAGE], off)?;
        image.sync_data()?;
        fallocate(
            g.memfd.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            (n * PAGE) as i64,
        )?;
    }
    Ok(t.elapsed())
}

fn mbps(pages: u64, d: Duration) -> f64 {
    (pages * PAGE as u64) as f64 / 1e6 / d.as_secs_f64()
}

/// Writes per second of one writer on the hot set, with the sampler at `interval` (None: off).
fn tracked_writes(
    g: &Guest,
    args: &EvictBenchArgs,
    interval: Option<Duration>,
) -> anyhow::Result<(f64, f64)> {
    let svc = VmEviction::new(
        g.vm.clone(),
        g.store()?,
        EvictConfig {
            sample_interval: interval.unwrap_or(Duration::from_secs(3600)),
            ..Default::default()
        },
    )?;
    if interval.is_some() {
        svc.start_sampler()?;
    }
    let wp_before = g.vm.metrics.snapshot().wp_faults;
    let hot = args.hot_pages.min(g.pages).max(1);
    let stop = AtomicBool::new(false);
    let run = Duration::from_secs_f64(args.secs);
    let writes = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut rng = rand::rng();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    g.word(rng.random_range(0..hot))
                        .fetch_add(1, Ordering::Relaxed);
                }
                n += 256;
            }
            n
        });
        std::thread::sleep(run);
        stop.store(true, Ordering::Relaxed);
        h.join().expect("writer thread")
    });
    svc.stop_sampler();
    let wp = g.vm.metrics.snapshot().wp_faults - wp_before;
    Ok((
        writes as f64 / run.as_secs_f64(),
        wp as f64 / run.as_secs_f64(),
    ))
}

pub fn run(args: EvictBenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let g = Guest::new(&args)?;
    println!(
        "pagewise bench evict: {} MiB guest (memfd, MISSING|WP, random page content), batch {} \
         pages, stores in {}",
        args.mib,
        args.batch_pages,
        args.dir.display()
    );

    // Alternate raw and pagewise runs (the first write into the image allocates its blocks),
    // two each; the best of each is reported.
    let mut raw = Duration::MAX;
    let mut ours = Duration::MAX;
    for _ in 0..2 {
        g.fill()?;
        raw = raw.min(raw_evict(&g, args.batch_pages)?);
        g.fill()?;
        let svc = VmEviction::new(g.vm.clone(), g.store()?, EvictConfig::default())?;
        let cancel = AtomicBool::new(false);
        let t = Instant::now();
        let report = svc.evict(
            EvictGoal::TargetResidentPages(0),
            Some(args.batch_pages),
            &cancel,
            &mut |_| {},
        )?;
        ours = ours.min(t.elapsed());
        let evicted = report.progress.evicted + report.progress.zero;
        anyhow::ensure!(
            evicted == g.pages,
            "evicted {evicted} of {} pages: {report:?}",
            g.pages
        );
    }
    // The daemon's store: a swap device (lz4 + crc32c, log-structured) on the same directory.
    g.fill()?;
    let dev_file = tempfile::NamedTempFile::new_in(&args.dir)?;
    let dev_path = dev_file
        .path()
        .to_str()
        .context("swap device path")?
        .to_string();
    let backend = swapdev::backend::spec::open_backend(
        &dev_path,
        &swapdev::backend::spec::SpecOptions {
            create: true,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening {dev_path}"))?;
    let device = swapdev::SwapDevice::create(
        backend,
        swapdev::CreateOptions {
            vm_uuid: uuid::Uuid::new_v4(),
            page_size: PAGE as u32,
            capacity_pages: g.pages,
            host_id: "bench".into(),
            codec: swapdev::CodecPolicy::Lz4,
            checksum: swapdev::ChecksumKind::Crc32c,
            force: false,
        },
    )?;
    let store = Arc::new(SwapdevStore::new(Arc::new(Mutex::new(device))));
    let svc = VmEviction::new(g.vm.clone(), store, EvictConfig::default())?;
    let cancel = AtomicBool::new(false);
    let t = Instant::now();
    let report = svc.evict(
        EvictGoal::TargetResidentPages(0),
        Some(args.batch_pages),
        &cancel,
        &mut |_| {},
    )?;
    let to_swapdev = t.elapsed();
    anyhow::ensure!(
        report.progress.evicted + report.progress.zero == g.pages,
        "swap device eviction: {report:?}"
    );
    drop(svc);
    // Put the raw image's content back for the refault measurement (the fault loop reads it).
    g.fill()?;
    let svc = VmEviction::new(g.vm.clone(), g.store()?, EvictConfig::default())?;
    svc.evict(
        EvictGoal::TargetResidentPages(0),
        Some(args.batch_pages),
        &cancel,
        &mut |_| {},
    )?;
    drop(svc);

    // Refault everything through the fault loop (one read per page).
    let t = Instant::now();
    let mut sum = 0u64;
    for p in 0..g.pages {
        sum = sum.wrapping_add(g.word(p).load(Ordering::Relaxed));
    }
    let refault = t.elapsed();
    std::hint::black_box(sum);

    println!();
    println!("{:<44} {:>12} {:>10}", "eviction", "MB/s", "vs raw");
    println!(
        "{:<44} {:>12.1} {:>10}",
        "raw: pread + pwrite + fdatasync + punch",
        mbps(g.pages, raw),
        "1.00"
    );
    println!(
        "{:<44} {:>12.1} {:>10.2}",
        "pagewise: claim+WP+read+store+punch+wake",
        mbps(g.pages, ours),
        raw.as_secs_f64() / ours.as_secs_f64()
    );
    println!(
        "{:<44} {:>12.1} {:>10.2}",
        "pagewise into a swap device (lz4, crc32c)",
        mbps(g.pages, to_swapdev),
        raw.as_secs_f64() / to_swapdev.as_secs_f64()
    );
    println!(
        "{:<44} {:>12.1} {:>10}",
        format!(
            "refault via fault loop ({:.1} us/page)",
            refault.as_secs_f64() * 1e6 / g.pages as f64
        ),
        mbps(g.pages, refault),
        "-"
    );

    let (idle, during, waits) = swapdev_faults_during_eviction(&args)?;
    println!();
    println!(
        "{:<44} {:>8} {:>10} {:>10} {:>10}",
        "demand faults on the swap device", "faults", "p50 us", "p99 us", "max us"
    );
    for (what, l) in [
        ("idle", &idle),
        ("during an eviction into it", &during),
        ("device lock wait of a reader, during it", &waits),
    ] {
        println!(
            "{:<44} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            what, l.samples, l.p50, l.p99, l.max
        );
    }

    g.fill()?;
    println!();
    println!(
        "{:<44} {:>12} {:>10} {:>12}",
        format!("write tracking ({} hot pages, 1 writer)", args.hot_pages),
        "writes/s",
        "vs off",
        "WP faults/s"
    );
    // Best of two runs each (the machine is shared; a single run is noisy).
    let best = |interval: Option<Duration>| -> anyhow::Result<(f64, f64)> {
        let a = tracked_writes(&g, &args, interval)?;
        let b = tracked_writes(&g, &args, interval)?;
        Ok(if a.0 >= b.0 { a } else { b })
    };
    let (off, _) = best(None)?;
    println!(
        "{:<44} {:>12.0} {:>10} {:>12}",
        "sampler off", off, "1.00", 0
    );
    for ms in [1000u64, 100] {
        let (w, wp) = best(Some(Duration::from_millis(ms)))?;
        println!(
            "{:<44} {:>12.0} {:>10.2} {:>12.0}",
            format!("sampler every {ms} ms (sync WP)"),
            w,
            w / off,
            wp
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Demand-fault latency percentiles (µs) of one run of first touches.
struct FaultLatency {
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn latency_of(mut us: Vec<f64>) -> FaultLatency {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| {
        us.get(((us.len() as f64 * q) as usize).min(us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    FaultLatency {
        samples: us.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: us.last().copied().unwrap_or(f64::NAN),
    }
}

/// Demand faults on a swap device while an eviction into the same device runs: a guest
/// whose fault loop reads from a `SwapdevSource`, half of it evicted into the device (lz4,
/// crc32c); then one reader touches evicted pages one at a time (each a demand fault served
/// from the device) with nothing else running ("idle"), and again while the other half is
/// being evicted into the same device ("during eviction"); meanwhile a probe thread takes
/// the device lock the way the fault loop's reads do (every 100 µs) and times how long it
/// waited for it. Returns (idle, during, lock waits during).
fn swapdev_faults_during_eviction(
    args: &EvictBenchArgs,
) -> anyhow::Result<(FaultLatency, FaultLatency, FaultLatency)> {
    let pages = args.mib * (1 << 20) / PAGE as u64;
    let (map, memfd, vm) =
        crate::lab_vm::MemfdVm::new("bench-faults", pages, PAGE, Features::empty())?.into_shared();
    let base = map.as_ptr() as u64;

    let dev_file = tempfile::NamedTempFile::new_in(&args.dir)?;
    let dev_path = dev_file.path().to_str().context("swap device path")?;
    let backend = swapdev::backend::spec::open_backend(
        dev_path,
        &swapdev::backend::spec::SpecOptions {
            create: true,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening {dev_path}"))?;
    let device = Arc::new(Mutex::new(swapdev::SwapDevice::create(
        backend,
        swapdev::CreateOptions {
            vm_uuid: uuid::Uuid::new_v4(),
            page_size: PAGE as u32,
            capacity_pages: pages,
            host_id: "bench".into(),
            codec: swapdev::CodecPolicy::Lz4,
            checksum: swapdev::ChecksumKind::Crc32c,
            force: true,
        },
    )?));
    let source = pager::source::SwapdevSource::new(device.clone(), dev_path.into())?;
    let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
    let fl = FaultLoop::new(
        vm.clone(),
        Box::new(source),
        pager::prefetch::by_name("none", pages)?,
        FaultLoopConfig::default(),
        stop.clone(),
        None,
    )?;
    let fault_loop = std::thread::spawn(move || {
        if let Err(e) = fl.run() {
            eprintln!("bench fault loop: {e}");
        }
    });
    let result = (|| -> anyhow::Result<(FaultLatency, FaultLatency, FaultLatency)> {
        // Text-like content (16 letters): lz4 compresses it, so encoding costs what it costs
        // for real guest memory rather than the quick give-up on random bytes.
        let mut chunk = vec![0u8; 256 * PAGE];
        let mut rng = rand::rng();
        for first in (0..pages).step_by(256) {
            let n = (pages - first).min(256) as usize;
            chunk[..n * PAGE]
                .iter_mut()
                .for_each(|b| *b = b'a' + rng.random_range(0..16u8));
            memfd.write_all_at(&chunk[..n * PAGE], first * PAGE as u64)?;
        }
        vm.states.set_range(0..pages, PageState::Present);
        let store = Arc::new(SwapdevStore::new(device.clone()));
        let svc = VmEviction::new(vm.clone(), store, EvictConfig::default())?;
        let cancel = AtomicBool::new(false);
        svc.evict(
            EvictGoal::TargetResidentPages(pages / 2),
            Some(args.batch_pages),
            &cancel,
            &mut |_| {},
        )?;
        let mut cold: Vec<u64> = (0..pages)
            .filter(|&p| vm.states.get(p) == PageState::Evicted)
            .collect();
        anyhow::ensure!(cold.len() >= 64, "only {} pages were evicted", cold.len());
        use rand::seq::SliceRandom;
        cold.shuffle(&mut rng);
        let word = |page: u64| -> &AtomicU64 {
            // SAFETY: inside our live shared mapping, page aligned, only accessed atomically.
            unsafe { &*((base + page * PAGE as u64) as *const AtomicU64) }
        };
        let touch = |page: u64| -> f64 {
            let t = Instant::now();
            std::hint::black_box(word(page).load(Ordering::Relaxed));
            t.elapsed().as_secs_f64() * 1e6
        };
        // Idle: a quarter of the cold pages.
        let quarter = cold.len() / 4;
        let idle: Vec<f64> = cold[..quarter].iter().map(|&p| touch(p)).collect();
        // During eviction: the other cold pages while the resident half is evicted.
        let done = AtomicBool::new(false);
        let probe_device = device.clone();
        let (during, waits) = std::thread::scope(|s| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
            let probe = s.spawn(|| {
                let mut waits = Vec::new();
                while !done.load(Ordering::Acquire) {
                    let t = Instant::now();
                    let d = probe_device.lock().unwrap_or_else(|e| e.into_inner());
                    waits.push(t.elapsed().as_secs_f64() * 1e6);
                    drop(d);
                    std::thread::sleep(Duration::from_micros(100));
                }
                waits
            });
            let evictor = s.spawn(|| {
                let r = svc.evict(
                    EvictGoal::TargetResidentPages(0),
                    Some(args.batch_pages),
                    &cancel,
                    &mut |_| {},
                );
                done.store(true, Ordering::Release);
                r
            });
            let mut us = Vec::new();
            for &p in &cold[quarter..] {
                if done.load(Ordering::Acquire) {
                    break;
                }
                us.push(touch(p));
            }
            evictor
                .join()
                .map_err(|_| anyhow!("evictor thread panicked"))??;
            let waits = probe.join().map_err(|_| anyhow!("probe thread panicked"))?;
            Ok((us, waits))
        })?;
        anyhow::ensure!(
            !during.is_empty(),
            "the eviction finished before the first fault"
        );
        Ok((latency_of(idle), latency_of(during), latency_of(waits)))
    })();
    let _ = stop.write(1);
    let _ = fault_loop.join();
    result
}
