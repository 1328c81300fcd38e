//! memhog: attach memory to a pager like a VMM, then work it with a verifiable pattern.
//!
//! `memhog gen-image --pages N --seed S --zero-every K --out FILE` writes a raw RAM image;
//! `memhog check-image` verifies one; `memhog run ...` maps memory, attaches it (or
//! prefills it from the image) and runs the access pattern. Exit status: 0 all pages
//! verified, 1 a mismatch (named on stderr), 2 any other error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use pagewise_tools::image::{self, ImageSpec, PAGE_SIZE};
use pagewise_tools::memhog::attach::{self, HandshakeKind};
use pagewise_tools::memhog::memory::{Backing, GuestMemory};
use pagewise_tools::memhog::pages::PageTable;
use pagewise_tools::memhog::run::{self, RemoveSpec, RunConfig};
use pagewise_tools::pattern::Pattern;

#[derive(Parser, Debug)]
#[command(
    name = "memhog",
    about = "Attach memory to a pager like a VMM and verify every page"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a raw RAM image whose pages memhog can verify.
    GenImage(GenImage),
    /// Verify a raw RAM image file page by page.
    CheckImage(CheckImage),
    /// Map memory, attach it to a pager (or prefill it), run an access pattern.
    Run(Box<RunArgs>),
}

#[derive(Args, Debug)]
struct ImageArgs {
    /// Seed of the page content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Every K-th page (index % K == K-1) is all zeros (0: none).
    #[arg(long, default_value_t = 0)]
    zero_every: u64,
}

impl ImageArgs {
    fn spec(&self) -> ImageSpec {
        ImageSpec {
            seed: self.seed,
            zero_every: self.zero_every,
        }
    }
}

#[derive(Args, Debug)]
struct GenImage {
    #[arg(long)]
    pages: u64,
    #[command(flatten)]
    image: ImageArgs,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct CheckImage {
    #[command(flatten)]
    image: ImageArgs,
    file: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Memory size in pages.
    #[arg(long)]
    pages: u64,
    /// anon (MAP_PRIVATE|MAP_ANONYMOUS), memfd, or file:PATH (MAP_SHARED).
    #[arg(long, default_value = "anon")]
    memory: Backing,
    /// Attach to the pager listening on this Unix socket.
    #[arg(long, conflicts_with = "prefill")]
    socket: Option<PathBuf>,
    /// No pager: copy this raw image into memory first (the all-resident baseline).
    #[arg(long)]
    prefill: Option<PathBuf>,
    /// firecracker or pagewise.
    #[arg(long, default_value = "firecracker")]
    handshake: String,
    /// VM name sent with the pagewise handshake.
    #[arg(long, default_value = "vm")]
    vm: String,
    /// Register write-protect too (MISSING|WP).
    #[arg(long)]
    wp: bool,
    /// Describe the memory to the pager as this many regions, back to back (Firecracker
    /// gives one per memory slot).
    #[arg(long, default_value_t = 1)]
    regions: u64,
    #[command(flatten)]
    image: ImageArgs,
    /// seq, random, zipf[:THETA], hotcold:HOT_PAGES[:SHARE].
    #[arg(long, default_value = "seq")]
    pattern: Pattern,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 1)]
    passes: u64,
    /// Run this many seconds instead of a number of passes.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Share of accesses that verify and then rewrite the page with a new version.
    #[arg(long, default_value_t = 0.0)]
    write_ratio: f64,
    #[arg(long, default_value_t = 1)]
    access_seed: u64,
    /// Skip content checks (touch only).
    #[arg(long)]
    no_verify: bool,
    /// Skip the mincore residency probe before first touches (no fault counting).
    #[arg(long)]
    no_fault_count: bool,
    /// Discard pages FIRST:COUNT (MADV_DONTNEED / MADV_REMOVE) after pass P (`@P`, default
    /// 1); later reads of them must see zeros.
    #[arg(long)]
    remove: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_remove(s: &str) -> anyhow::Result<RemoveSpec> {
    let (range, pass) = match s.split_once('@') {
        Some((r, p)) => (
            r,
            p.parse()
                .with_context(|| format!("pass in --remove {s:?}"))?,
        ),
        None => (s, 1),
    };
    let Some((first, count)) = range.split_once(':') else {
        bail!("--remove {s:?}: expected FIRST:COUNT[@PASS]");
    };
    Ok(RemoveSpec {
        first: first
            .parse()
            .with_context(|| format!("first page in --remove {s:?}"))?,
        count: count
            .parse()
            .with_context(|| format!("count in --remove {s:?}"))?,
        after_pass: pass,
    })
}

fn run_cmd(a: &RunArgs) -> anyhow::Result<ExitCode> {
    let handshake = match a.handshake.as_str() {
        "firecracker" => HandshakeKind::Firecracker,
        "pagewise" => HandshakeKind::Pagewise { vm: a.vm.clone() },
        other => bail!("unknown handshake {other:?}: expected firecracker or pagewise"),
    };
    let mem = GuestMemory::new(a.pages, a.memory.clone())?;
    let mut prefill_seconds = None;
    let _attached = match (&a.socket, &a.prefill) {
        (Some(sock), None) => Some(attach::attach_regions(
            &mem, sock, &handshake, a.wp, a.regions,
        )?),
        (None, Some(img)) => {
            prefill_seconds = Some(pagewise_tools::memhog::prefill(&mem, img)?);
            None
        }
        _ => bail!("give --socket (attach to a pager) or --prefill (copy an image first)"),
    };
    let cfg = RunConfig {
        pattern: a.pattern.clone(),
        threads: a.threads,
        passes: a.passes,
        duration: a.duration_secs.map(Duration::from_secs_f64),
        write_ratio: a.write_ratio,
        access_seed: a.access_seed,
        verify: !a.no_verify,
        count_faults: !a.no_fault_count,
        remove: a.remove.as_deref().map(parse_remove).transpose()?,
    };
    let table = PageTable::new(a.pages, a.image.spec());
    let report = run::run(&mem, &table, &cfg)?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["prefill_seconds"] = serde_json::json!(prefill_seconds);
        println!("{v}");
    } else {
        if let Some(s) = prefill_seconds {
            println!(
                "prefill: {:.3} s ({:.0} MiB/s)",
                s,
                mem.len() as f64 / (1 << 20) as f64 / s.max(1e-9)
            );
        }
        for (i, p) in report.passes.iter().enumerate() {
            println!(
                "pass {}: {:.3} s, {} accesses, {:.0} MiB/s",
                i + 1,
                p.seconds,
                p.accesses,
                p.mib_per_s
            );
        }
        let l = &report.fault_latency;
        println!(
            "{} accesses ({} writes), {} pages touched, {} first-touch faults \
             (p50 {:.1} us, p99 {:.1} us), {} removed, {} mismatches on {} pages",
            report.accesses,
            report.writes,
            report.pages_touched,
            report.first_touch_faults,
            l.p50_us,
            l.p99_us,
            report.removed_pages,
            report.mismatches,
            report.mismatched_pages
        );
    }
    for m in &report.mismatch_examples {
        eprintln!("memhog: MISMATCH {m}");
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::GenImage(g) => image::write_image(&g.out, g.pages, g.image.spec())
            .with_context(|| format!("writing {}", g.out.display()))
            .map(|()| {
                println!(
                    "wrote {} pages ({} bytes) to {}",
                    g.pages,
                    g.pages * PAGE_SIZE as u64,
                    g.out.display()
                );
                ExitCode::SUCCESS
            }),
        Command::CheckImage(c) => image::check_image(&c.file, c.image.spec(), 16)
            .map(|(pages, bad)| {
                for m in &bad {
                    eprintln!("memhog: MISMATCH {m}");
                }
                println!("{pages} pages checked, {} bad (first 16 shown)", bad.len());
                if bad.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            })
            .with_context(|| format!("checking {}", c.file.display())),
        Command::Run(a) => run_cmd(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memhog: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
