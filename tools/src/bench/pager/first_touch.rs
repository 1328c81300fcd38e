//! The first-touch matrix of `pagewise bench pager`: every page of the image restored into
//! fresh guest memory, under each handler, for each kind of guest memory and each place of
//! the device, all in one run.
//!
//! * memory: Firecracker-style anonymous private memory (Firecracker's handshake, every page
//!   through UFFDIO_COPY) and QEMU-style shared memory (a memfd, pagewise's handshake with
//!   the memory file);
//! * device: the swap device (and the raw image the simple handler reads) on disk and on
//!   tmpfs;
//! * pattern: sequential, uniform random (one access per page, drawn with replacement) and
//!   Zipf first touch;
//! * handler: the simplest correct handler (the in-process [`MiniPager`] reading the raw
//!   image: one pread + one UFFDIO_COPY per fault), `pagewise serve` with no prefetch flag
//!   (its defaults) from the swap device and from the raw image itself (a Firecracker
//!   snapshot served as it is), and `pagewise serve --prefetch P` for each policy asked for.
//!
//! Every access verifies the page's content; a wrong page fails the run.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::{counter, memhog, Work, PAGE_SIZE};
use crate::memhog::attach::HandshakeKind;
use crate::memhog::memory::Backing;
use crate::memhog::run::RunConfig;
use crate::minipager::{MiniPager, MiniSource};
use crate::pattern::Pattern;

/// Where one copy of the image and its swap device live.
pub struct Place {
    pub label: &'static str,
    pub image: PathBuf,
    pub device: PathBuf,
    /// Drop the image from the page cache before the simple handler reads it, so it reads
    /// the disk like the daemon's O_DIRECT device reads do (no effect on tmpfs).
    pub uncached: bool,
}

/// One kind of guest memory.
struct Memory {
    label: &'static str,
    backing: Backing,
    handshake: HandshakeKind,
}

fn memories() -> [Memory; 2] {
    [
        Memory {
            label: "anon",
            backing: Backing::Anon,
            handshake: HandshakeKind::Firecracker,
        },
        Memory {
            label: "shared",
            backing: Backing::Memfd,
            handshake: HandshakeKind::Pagewise { vm: "bench".into() },
        },
    ]
}

/// Which handler served a row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handler {
    Simple,
    Defaults,
    /// The defaults serving the raw image itself (a Firecracker snapshot as it is).
    RawDefaults,
    Policy(String),
}

impl Handler {
    fn label(&self) -> String {
        match self {
            Handler::Simple => "simple (pread+copy)".into(),
            Handler::Defaults => format!("defaults ({})", pager::prefetch::DEFAULT_POLICY),
            Handler::RawDefaults => "defaults, raw snapshot".into(),
            Handler::Policy(p) => p.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub memory: String,
    pub device: String,
    pub pattern: String,
    pub handler: String,
    pub seconds: f64,
    pub mib_per_s: f64,
    pub pages_touched: u64,
    /// First touches that found the page absent (the thread waited).
    pub waits: u64,
    /// Demand faults the daemon read from the device (`faults_to_source`); 0 for the
    /// simple handler, whose every wait is one.
    pub device_faults: u64,
    pub pages_prefetched: u64,
    /// Time of the simple handler in the same (memory, device, pattern) over this row's.
    pub speedup_vs_simple: f64,
    pub mismatches: u64,
}

fn patterns(zipf_accesses: f64, pages: u64) -> [(&'static str, Pattern, u64); 3] {
    let zipf_passes = ((pages as f64 * zipf_accesses) as u64)
        .div_ceil(pages)
        .max(1);
    [
        ("seq", Pattern::Sequential, 1),
        ("random", Pattern::Random, 1),
        ("zipf:0.99", Pattern::Zipf { theta: 0.99 }, zipf_passes),
    ]
}

/// Run the whole matrix. `policies` are the extra `--prefetch` rows after the defaults.
pub fn run(
    work: &Work,
    places: &[Place],
    policies: &[String],
    zipf_accesses: f64,
) -> anyhow::Result<Vec<Row>> {
    let mut handlers = vec![Handler::Simple, Handler::Defaults, Handler::RawDefaults];
    handlers.extend(policies.iter().cloned().map(Handler::Policy));
    let mut rows = Vec::new();
    for memory in memories() {
        for place in places {
            for (pname, pattern, passes) in patterns(zipf_accesses, work.pages) {
                let cfg = RunConfig {
                    pattern,
                    passes,
                    ..RunConfig::default()
                };
                let mut simple_seconds = None;
                for (i, handler) in handlers.iter().enumerate() {
                    eprintln!(
                        "  first touch: {} memory, device on {}, {pname}, {}",
                        memory.label,
                        place.label,
                        handler.label()
                    );
                    let tag = format!("ft-{}-{}-{pname}-{i}", memory.label, place.label)
                        .replace(':', "_");
                    let mut row = one(work, place, &memory, handler, &cfg, &tag)?;
                    row.pattern = pname.into();
                    let base = *simple_seconds.get_or_insert(row.seconds);
                    row.speedup_vs_simple = base / row.seconds.max(1e-9);
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}

fn one(
    work: &Work,
    place: &Place,
    memory: &Memory,
    handler: &Handler,
    cfg: &RunConfig,
    tag: &str,
) -> anyhow::Result<Row> {
    let (report, vm) = match handler {
        Handler::Simple => {
            let socket = work.dir.path().join(format!("{tag}.sock"));
            let image = uncached_image(place)?;
            let mini = MiniPager::spawn(&socket, MiniSource::Image(image))?;
            let (report, _) = memhog(
                &socket,
                None,
                work.pages,
                cfg,
                memory.backing.clone(),
                &memory.handshake,
            )?;
            mini.join()?;
            (report, serde_json::Value::Null)
        }
        Handler::Defaults | Handler::RawDefaults | Handler::Policy(_) => {
            let policy = match handler {
                Handler::Policy(p) => p.as_str(),
                _ => "",
            };
            let device = if *handler == Handler::RawDefaults {
                // Read buffered from the file: start from the disk like the simple handler.
                drop(uncached_image(place)?);
                std::path::PathBuf::from(format!("raw:{}", place.image.display()))
            } else {
                place.device.clone()
            };
            let (d, stats) = work.serve_device(&device, policy, tag)?;
            let (report, vm) = memhog(
                &d.socket,
                Some(&stats),
                work.pages,
                cfg,
                memory.backing.clone(),
                &memory.handshake,
            )?;
            drop(d);
            (report, vm.unwrap_or_default())
        }
    };
    let mib = report.accesses as f64 * PAGE_SIZE as f64 / (1 << 20) as f64;
    Ok(Row {
        memory: memory.label.into(),
        device: place.label.into(),
        pattern: String::new(),
        handler: handler.label(),
        seconds: report.seconds,
        mib_per_s: mib / report.seconds.max(1e-9),
        pages_touched: report.pages_touched,
        waits: report.first_touch_faults,
        device_faults: counter(&vm, "faults_to_source"),
        pages_prefetched: counter(&vm, "pages_prefetched"),
        speedup_vs_simple: 1.0,
        mismatches: report.mismatches,
    })
}

/// Open the place's raw image, dropped from the page cache first when the place says so.
fn uncached_image(place: &Place) -> anyhow::Result<std::fs::File> {
    let image = std::fs::File::open(&place.image)
        .with_context(|| format!("opening {}", place.image.display()))?;
    if place.uncached {
        nix::fcntl::posix_fadvise(
            &image,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .context("dropping the image from the page cache")?;
    }
    Ok(image)
}

/// Print the matrix, one block per (memory, device).
pub fn print(rows: &[Row]) {
    println!(
        "first touch: anon = Firecracker-style MAP_PRIVATE|MAP_ANONYMOUS memory (Firecracker's \
         handshake); shared = QEMU-style memfd MAP_SHARED (pagewise handshake with the memory \
         file); every access verifies its page"
    );
    println!(
        "{:<7} {:<6} {:<10} {:<22} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "memory",
        "device",
        "pattern",
        "handler",
        "seconds",
        "MiB/s",
        "touched",
        "waits",
        "dev-flt",
        "prefetch",
        "vs simple"
    );
    for r in rows {
        println!(
            "{:<7} {:<6} {:<10} {:<22} {:>7.2} {:>7.0} {:>8} {:>8} {:>8} {:>9} {:>8.2}x",
            r.memory,
            r.device,
            r.pattern,
            r.handler,
            r.seconds,
            r.mib_per_s,
            r.pages_touched,
            r.waits,
            r.device_faults,
            r.pages_prefetched,
            r.speedup_vs_simple
        );
    }
    println!(
        "simple: one pread of the raw image + one UFFDIO_COPY per fault (in-process, written for \
         this benchmark; on disk the image is dropped from the page cache first); waits: first touches that found the page absent; dev-flt: demand \
         faults the daemon read from the device"
    );
    println!("targets: defaults >= 3x simple on seq and random; seq >= 1 GB/s on tmpfs");
}

/// A place's paths: `image.raw` and `bench.swapdev` under `dir`.
pub fn place(label: &'static str, dir: &Path, uncached: bool) -> Place {
    Place {
        label,
        image: dir.join("image.raw"),
        device: dir.join("bench.swapdev"),
        uncached,
    }
}
