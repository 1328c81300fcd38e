//! `pagewise bench pager`: the pager against baselines measured in the same run.
//!
//! 1. Fault latency (p50/p99, seen by the faulting thread) of `pagewise serve` vs a null
//!    handler (an in-process handler answering every fault with one static page).
//! 2. First touch ([`first_touch`]): a verifiable image (1 GiB by default) imported into a
//!    swap device on disk and on tmpfs, restored by memhog sequentially, uniformly at random
//!    and with Zipf accesses into Firecracker-style anonymous memory and QEMU-style shared
//!    memory, under the simplest correct handler (one pread + one UFFDIO_COPY per fault),
//!    `pagewise serve`'s defaults and each prefetch policy; next to pwrite-ing the whole
//!    image into a memfd and the device file's own sequential and random read rates.
//! 3. Demand faults as a share of pages touched (Hines et al. report 17% for bubbling).
//!
//! The daemon is the real `pagewise serve` (a child process, restarted per policy); memhog
//! runs in this process (its threads fault, the daemon serves them over its socket).
//!
//! Like with like: the null handler does no I/O (one static page, in-process), so the
//! pager is also measured with the device on tmpfs (its own software cost), and the swap
//! device file's own O_DIRECT read latency and streaming rate on its disk are measured
//! ([`device_floor`]) and printed next to the disk rows.

mod device_floor;
mod first_touch;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::daemon::{self, Daemon};
use crate::image::{self, ImageSpec, PAGE_SIZE};
use crate::memhog::attach::{self, HandshakeKind};
use crate::memhog::memory::{Backing, GuestMemory};
use crate::memhog::pages::PageTable;
use crate::memhog::run::{self as memrun, Report, RunConfig};
use crate::minipager::{MiniPager, MiniSource};
use crate::pattern::Pattern;
use anyhow::{bail, Context};
use pager::server::ControlClient;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct PagerBenchArgs {
    /// Image size (bytes; K, M, G suffixes).
    #[arg(long, default_value = "1G")]
    size: String,
    /// Where the image and swap device go (a disk, not tmpfs); a second copy goes to
    /// /dev/shm.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Prefetch policies to compare with the defaults and the simple handler.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,bubble,stride,bubble+stride"
    )]
    policies: Vec<String>,
    /// Pages faulted for the latency comparison.
    #[arg(long, default_value_t = 8192)]
    latency_pages: u64,
    /// Zipf accesses as a multiple of the page count.
    #[arg(long, default_value_t = 1.0)]
    zipf_accesses: f64,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
    /// Keep the work directory (image, device, daemon logs).
    #[arg(long)]
    keep: bool,
}

const IMAGE_SEED: u64 = 0x5eed;
const ZERO_EVERY: u64 = 64;
const SPAWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Parse `1G`, `256M`, `64K` or a byte count into whole pages.
fn parse_size_pages(s: &str) -> anyhow::Result<u64> {
    let bytes = pager::conventions::parse_size(s)?;
    if bytes < 64 * PAGE_SIZE as u64 || bytes % PAGE_SIZE as u64 != 0 {
        bail!("size {s:?} must be a multiple of 4 KiB and at least 256 KiB");
    }
    Ok(bytes / PAGE_SIZE as u64)
}

#[derive(Debug, Serialize)]
struct LatencyRow {
    handler: String,
    faults: u64,
    p50_us: f64,
    p99_us: f64,
    /// The daemon's own p50 (uffd message read to page placed).
    pager_side_p50_us: Option<f64>,
}

#[derive(Debug, Serialize)]
struct BenchResult {
    image_pages: u64,
    pwrite_mib_per_s: f64,
    /// memhog's sequential verify rate over memory prefilled from the image (no faults):
    /// the ceiling of any scan row.
    memhog_prefilled_mib_per_s: f64,
    /// The swap device file read directly on its disk (no pager), and on tmpfs.
    device_floor: device_floor::DeviceFloor,
    device_floor_tmpfs: device_floor::DeviceFloor,
    latency: Vec<LatencyRow>,
    first_touch: Vec<first_touch::Row>,
}

/// One in-process memhog run against the handler at `socket`. With `stats`, the daemon's
/// statistics of VM `bench` are read before memhog detaches.
fn memhog(
    socket: &Path,
    stats: Option<&Path>,
    pages: u64,
    cfg: &RunConfig,
    backing: Backing,
    handshake: &HandshakeKind,
) -> anyhow::Result<(Report, Option<serde_json::Value>)> {
    let mem = GuestMemory::new(pages, backing)?;
    // Firecracker-style: two regions, as a Firecracker VM with two memory slots describes.
    let regions = if *handshake == HandshakeKind::Firecracker {
        2
    } else {
        1
    };
    let attached = attach::attach_regions(&mem, socket, handshake, false, regions)?;
    let table = PageTable::new(pages, spec());
    let report = memrun::run(&mem, &table, cfg)?;
    let vm_stats = match stats {
        Some(path) => {
            let all = ControlClient::connect(path)
                .and_then(|mut c| c.stats(Some("bench")))
                .context("reading the daemon's stats")?;
            Some(serde_json::to_value(&all)?["vms"][0].clone())
        }
        None => None,
    };
    drop(attached);
    if report.mismatches > 0 {
        bail!("wrong pages were served: {:?}", report.mismatch_examples);
    }
    Ok((report, vm_stats))
}

/// A counter from the daemon's VM statistics.
fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["metrics"][name].as_u64().unwrap_or(0)
}

/// pwrite the whole image into a memfd: the bandwidth of filling guest memory when every
/// byte is at hand (the image file is in the page cache after it was just written).
fn pwrite_prefill(image: &Path, pages: u64) -> anyhow::Result<f64> {
    let img = std::fs::File::open(image)?;
    let memfd = GuestMemory::new(pages, Backing::Memfd)?;
    let target = std::fs::File::from(
        memfd
            .file()
            .expect("memfd backing has a file")
            .try_clone()?,
    );
    let mut buf = vec![0u8; 1 << 20];
    let total = pages * PAGE_SIZE as u64;
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        let n = (buf.len() as u64).min(total - off) as usize;
        img.read_exact_at(&mut buf[..n], off)?;
        target.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    let s = t.elapsed().as_secs_f64();
    Ok(total as f64 / (1 << 20) as f64 / s)
}

/// memhog's sequential scan over memory filled from the image beforehand (no pager).
fn prefilled_scan(image: &Path, pages: u64) -> anyhow::Result<f64> {
    let mem = GuestMemory::new(pages, Backing::Anon)?;
    crate::memhog::prefill(&mem, image)?;
    let table = PageTable::new(pages, spec());
    let r = memrun::run(&mem, &table, &RunConfig::default())?;
    if r.mismatches > 0 {
        bail!("prefilled memory did not verify: {:?}", r.mismatch_examples);
    }
    Ok(r.passes[0].mib_per_s)
}

struct Work {
    dir: tempfile::TempDir,
    pagewise: PathBuf,
    device: PathBuf,
    pages: u64,
}

impl Work {
    /// A fresh `pagewise serve` for VM `bench` from `device`; returns it with its stats
    /// socket. An empty `policy` gives no `--prefetch` (the daemon's default).
    fn serve_device(
        &self,
        device: &Path,
        policy: &str,
        tag: &str,
    ) -> anyhow::Result<(Daemon, PathBuf)> {
        let socket = self.dir.path().join(format!("{tag}.sock"));
        let main = self.dir.path().join(format!("{tag}.main.sock"));
        let stats = self.dir.path().join(format!("{tag}.stats"));
        let vm = daemon::ServedVm {
            name: "bench",
            socket: &socket,
            device,
        };
        let args = daemon::serve_args(&main, &[vm], &stats, policy);
        let d = Daemon::spawn(
            &self.pagewise,
            &args,
            &socket,
            &self.dir.path().join(format!("{tag}.log")),
            SPAWN_TIMEOUT,
        )?;
        Ok((d, stats))
    }
}

fn spec() -> ImageSpec {
    ImageSpec {
        seed: IMAGE_SEED,
        zero_every: ZERO_EVERY,
    }
}

fn latency(work: &Work, shm_device: &Path, pages: u64) -> anyhow::Result<Vec<LatencyRow>> {
    let pages = pages.min(work.pages);
    let cfg = RunConfig {
        pattern: Pattern::Random,
        verify: false,
        ..RunConfig::default()
    };
    let mut rows = Vec::new();
    let null_sock = work.dir.path().join("null.sock");
    let page = Box::new([0x5Au8; PAGE_SIZE]);
    let null = MiniPager::spawn(&null_sock, MiniSource::Static(page))?;
    let anon = HandshakeKind::Firecracker;
    let (r, _) = memhog(&null_sock, None, pages, &cfg, Backing::Anon, &anon)?;
    null.join()?;
    rows.push(LatencyRow {
        handler: "null handler (in-process, static page)".into(),
        faults: r.fault_latency.count,
        p50_us: r.fault_latency.p50_us,
        p99_us: r.fault_latency.p99_us,
        pager_side_p50_us: None,
    });
    let cfg = RunConfig {
        verify: true,
        ..cfg
    };
    let devices = [
        (
            work.device.as_path(),
            "latency",
            "pagewise serve --prefetch none, disk",
        ),
        (
            shm_device,
            "latency-shm",
            "pagewise serve --prefetch none, tmpfs",
        ),
    ];
    for (device, tag, label) in devices {
        let (d, stats) = work.serve_device(device, "none", tag)?;
        let (r, vm) = memhog(&d.socket, Some(&stats), pages, &cfg, Backing::Anon, &anon)?;
        rows.push(LatencyRow {
            handler: label.into(),
            faults: r.fault_latency.count,
            p50_us: r.fault_latency.p50_us,
            p99_us: r.fault_latency.p99_us,
            pager_side_p50_us: vm.and_then(|v| v["fault_latency_p50_us"].as_f64()),
        });
    }
    Ok(rows)
}

fn print(result: &BenchResult) {
    println!(
        "pagewise bench pager: image {} pages ({} MiB), swap device on disk",
        result.image_pages,
        (result.image_pages * PAGE_SIZE as u64) >> 20
    );
    println!();
    println!("fault latency (faulting thread, first touch of an absent page)");
    println!(
        "{:<42} {:>8} {:>9} {:>9} {:>14}",
        "handler", "faults", "p50 us", "p99 us", "pager-side p50"
    );
    for r in &result.latency {
        let side = r
            .pager_side_p50_us
            .map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:<42} {:>8} {:>9.1} {:>9.1} {:>14}",
            r.handler, r.faults, r.p50_us, r.p99_us, side
        );
    }
    let floor = &result.device_floor;
    println!(
        "device file alone on its disk ({}pread, one at a time): 4 KiB random read p50 {:.1} us, \
         p99 {:.1} us; 1 MiB sequential reads {:.0} MiB/s",
        if floor.direct {
            "O_DIRECT "
        } else {
            "buffered "
        },
        floor.read_4k_p50_us,
        floor.read_4k_p99_us,
        floor.seq_mib_per_s
    );
    if let [null, pagers @ ..] = &result.latency[..] {
        for pager in pagers {
            println!(
                "{} / null handler: p50 {:.2}x (target <= 1.3x), p99 {:.2}x",
                pager.handler,
                pager.p50_us / null.p50_us.max(1e-9),
                pager.p99_us / null.p99_us.max(1e-9)
            );
        }
        if let Some(disk) = pagers.iter().find(|p| p.handler.ends_with(", disk")) {
            let floor_p50 = null.p50_us + floor.read_4k_p50_us;
            println!(
                "{} / (null handler + one 4 KiB device read = {:.1} us): p50 {:.2}x",
                disk.handler,
                floor_p50,
                disk.p50_us / floor_p50.max(1e-9)
            );
        }
    }
    println!(
        "the null handler runs in memhog's process and answers every fault with one static \
         page: no I/O, no checksum, no content; the tmpfs row is the pager's own cost, the \
         disk row adds the disk read"
    );
    println!();
    let shm = &result.device_floor_tmpfs;
    println!(
        "device file alone on tmpfs: 4 KiB random reads {:.0} MiB/s (p50 {:.1} us); 1 MiB \
         sequential reads {:.0} MiB/s",
        shm.read_4k_mib_per_s, shm.read_4k_p50_us, shm.seq_mib_per_s
    );
    println!(
        "device file alone on its disk: 4 KiB random reads {:.0} MiB/s; pwrite prefill of the \
         image into a memfd: {:.0} MiB/s; memhog's sequential verify over prefilled memory: \
         {:.0} MiB/s",
        floor.read_4k_mib_per_s, result.pwrite_mib_per_s, result.memhog_prefilled_mib_per_s
    );
    println!();
    first_touch::print(&result.first_touch);
}

pub fn run(a: PagerBenchArgs) -> anyhow::Result<ExitCode> {
    let pages = parse_size_pages(&a.size)?;
    if a.policies.is_empty() {
        bail!("--policies needs at least one policy");
    }
    for p in &a.policies {
        pager::prefetch::by_name(p, 1)?;
    }
    let dir = tempfile::Builder::new()
        .prefix("pagewise-bench-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a work directory in {}", a.dir.display()))?;
    let pagewise = std::env::current_exe().context("locating the pagewise binary")?;
    let image = dir.path().join("image.raw");
    let device = dir.path().join("bench.swapdev");
    eprintln!(
        "generating a {pages}-page image in {}",
        dir.path().display()
    );
    image::write_image(&image, pages, spec())?;
    let pwrite = pwrite_prefill(&image, pages)?;
    let prefilled = prefilled_scan(&image, pages)?;
    eprintln!("importing it into a swap device");
    daemon::run_checked(Command::new(&pagewise).args(daemon::import_args(&image, &device)))?;
    let work = Work {
        dir,
        pagewise,
        device,
        pages,
    };
    // The same image and device on tmpfs: the pager's own cost without the disk read.
    let shm = tempfile::Builder::new()
        .prefix("pagewise-bench-")
        .tempdir_in("/dev/shm")
        .context("creating a work directory in /dev/shm")?;
    let places = [
        first_touch::place("disk", work.dir.path(), true),
        first_touch::place("tmpfs", shm.path(), false),
    ];
    std::fs::copy(&places[0].image, &places[1].image).context("copying the image to tmpfs")?;
    daemon::run_checked(
        Command::new(&work.pagewise).args(daemon::import_args(&places[1].image, &places[1].device)),
    )?;
    eprintln!("measuring the device file's own reads");
    let floor = device_floor::measure(&work.device, 2000, 256 << 20)?;
    let floor_tmpfs = device_floor::measure(&places[1].device, 2000, 256 << 20)?;
    eprintln!("measuring fault latency");
    let latency = latency(&work, &places[1].device, a.latency_pages)?;
    eprintln!(
        "first touch under the simple handler, the defaults and {} policies",
        a.policies.len()
    );
    let first_touch = first_touch::run(&work, &places, &a.policies, a.zipf_accesses)?;
    let result = BenchResult {
        image_pages: pages,
        pwrite_mib_per_s: pwrite,
        memhog_prefilled_mib_per_s: prefilled,
        device_floor: floor,
        device_floor_tmpfs: floor_tmpfs,
        latency,
        first_touch,
    };
    print(&result);
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    }
    if a.keep {
        let kept = work.dir.keep();
        eprintln!("kept {}", kept.display());
    }
    let bad: u64 = result.first_touch.iter().map(|r| r.mismatches).sum();
    if bad > 0 {
        bail!("{bad} pages did not verify during the scans");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_pages("1G").unwrap(), 262_144);
        assert_eq!(parse_size_pages("64M").unwrap(), 16_384);
        assert_eq!(parse_size_pages("1048576").unwrap(), 256);
        assert!(parse_size_pages("100").is_err());
        assert!(parse_size_pages("1X").is_err());
        assert!(parse_size_pages("").is_err());
    }
}
