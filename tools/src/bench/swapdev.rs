//! `pagewise bench swapdev`: random 4 KiB page writes and reads through a swap device vs
//! raw io_uring (the same file backend, no swapdev layer) on the same file at the same
//! queue depth, in one run; then lz4 ratio and speed on realistic page mixes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use swapdev::backend::file::{DirectMode, FileBackend, OpenOptions as FileOpts};
use swapdev::backend::spec::{describe_spec, open_backend, SpecOptions};
use swapdev::backend::{Backend, IoCompletion, IoOp, IoRequest};
use swapdev::format::{decode_lz4, encode_page, lz4_scratch_len, Codec};
use swapdev::{
    AlignedBuf, ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, PageData, SwapDevice,
};

const PS: usize = 4096;

#[derive(clap::Args, Debug)]
pub struct SwapdevBenchArgs {
    /// Directory for the bench file (a disk; O_DIRECT is required).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Pages in the device (4 KiB each).
    #[arg(long, default_value_t = 32768)]
    pages: u64,
    /// Requests in flight (raw) / pages per write call and reads in flight (swapdev).
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Seconds per timed phase.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Codec of the swap device for the I/O phases (pages written are incompressible).
    #[arg(long, default_value = "lz4")]
    codec: CodecPolicy,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also measure a swap device on this backend spec (nfs://SERVER/EXPORT/PATH,
    /// nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH); repeatable. NFS files are
    /// created; an NBD export must hold the device (it is overwritten).
    #[arg(long = "backend", value_name = "SPEC")]
    backends: Vec<String>,
}

#[derive(Debug, Serialize)]
struct IoRow {
    /// "file (io_uring, O_DIRECT)" or the description of a `--backend` spec.
    backend: String,
    op: &'static str,
    qd: usize,
    raw_mb_s: f64,
    raw_iops: f64,
    swapdev_mb_s: f64,
    swapdev_iops: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct CodecRow {
    mix: &'static str,
    /// Page bytes / stored bytes; `None` when nothing needs storing (all zero).
    ratio: Option<f64>,
    encode_mb_s: f64,
    /// Over the lz4-coded pages only; `None` when there are none.
    decode_mb_s: Option<f64>,
    zero_pages: usize,
    lz4_pages: usize,
    raw_pages: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    pages: u64,
    io: Vec<IoRow>,
    codec: Vec<CodecRow>,
}

/// A directory of our own under `--dir`, removed when the run ends (also on errors).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(parent: &std::path::Path) -> Result<Self> {
        let p = parent.join(format!("pagewise-bench-{}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mb_s(bytes: f64, d: Duration) -> f64 {
    bytes / d.as_secs_f64() / 1e6
}

fn open_file(path: &PathBuf, qd: usize) -> Result<FileBackend> {
    let opts = FileOpts {
        create: true,
        read_only: false,
        direct: DirectMode::Always,
        queue_depth: (qd as u32).max(8) * 2,
    };
    FileBackend::open(path, opts)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))
}

pub fn run(a: SwapdevBenchArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        a.qd >= 1 && a.pages >= 1024,
        "--qd must be >= 1 and --pages >= 1024"
    );
    let dir = ScratchDir::new(&a.dir)?;
    let path = dir.0.join("bench.swap");
    let mut rng = StdRng::seed_from_u64(1);
    let pool: Vec<Vec<u8>> = (0..256)
        .map(|_| {
            let mut v = vec![0u8; PS];
            rng.fill(&mut v[..]);
            v
        })
        .collect();
    let open_local =
        |_create: bool| -> Result<Box<dyn Backend>> { Ok(Box::new(open_file(&path, a.qd)?)) };
    let mut io = measure(
        "file (io_uring, O_DIRECT)",
        &open_local,
        &a,
        &pool,
        &mut rng,
    )?;
    for spec in &a.backends {
        let open = |create: bool| -> Result<Box<dyn Backend>> {
            let opts = SpecOptions {
                create,
                ..SpecOptions::default()
            };
            open_backend(spec, &opts).with_context(|| format!("opening {spec}"))
        };
        let label = describe_spec(spec).unwrap_or_else(|_| spec.clone());
        io.extend(measure(&label, &open, &a, &pool, &mut rng)?);
    }
    let report = Report {
        file: path.display().to_string(),
        pages: a.pages,
        io,
        codec: codec_rows(&mut rng),
    };
    print_report(&report, a.json)?;
    Ok(ExitCode::SUCCESS)
}

/// The write and read rows of one backend: raw (the backend alone) and through a swap
/// device on it, at the same queue depth. `open(create)` opens the backend afresh.
fn measure(
    label: &str,
    open: &dyn Fn(bool) -> Result<Box<dyn Backend>>,
    a: &SwapdevBenchArgs,
    pool: &[Vec<u8>],
    rng: &mut StdRng,
) -> Result<Vec<IoRow>> {
    let phase = Duration::from_secs_f64(a.secs);
    // Format first: the raw phases then use the device's data area as their region (an
    // empty device does not care what its data area holds).
    let dev = SwapDevice::create(
        open(true)?,
        CreateOptions {
            vm_uuid: swapdev::Uuid::new_v4(),
            page_size: PS as u32,
            capacity_pages: a.pages,
            host_id: "bench".into(),
            codec: a.codec,
            checksum: ChecksumKind::Crc32c,
            force: true,
        },
    )
    .with_context(|| format!("creating a swap device on {label}"))?;
    dev.close()?;
    let mut raw = open(false)?;
    // The last `pages` pages of the store lie inside the (empty) data area.
    let size = raw.size()?;
    let region_start = size.checked_sub(a.pages * PS as u64).with_context(|| {
        format!(
            "{label} holds {size} bytes, fewer than the {} pages asked for",
            a.pages
        )
    })?;
    // Fill the raw region first (untimed): random reads of never-written (sparse) blocks
    // would not touch the disk and flatter the baseline.
    prefill(raw.as_mut(), region_start, a.pages, pool)?;
    let (raw_w_bytes, raw_w_t) = raw_phase(
        raw.as_mut(),
        true,
        region_start,
        a.pages,
        a.qd,
        phase,
        pool,
        rng,
    )?;
    let (raw_r_bytes, raw_r_t) = raw_phase(
        raw.as_mut(),
        false,
        region_start,
        a.pages,
        a.qd,
        phase,
        pool,
        rng,
    )?;
    drop(raw);

    let mut dev = SwapDevice::open(open(false)?, OpenOptions::read_write("bench", true, false))?;
    // Writes: every page once, in random order, `qd` pages per call, until time is up.
    let mut order: Vec<u64> = (0..a.pages).collect();
    order.shuffle(rng);
    let t = Instant::now();
    let mut written = 0usize;
    for chunk in order.chunks(a.qd) {
        let batch: Vec<(u64, &[u8])> = chunk
            .iter()
            .map(|&p| (p, &pool[(p % 256) as usize][..]))
            .collect();
        dev.write_pages(&batch)?;
        written += chunk.len();
        if t.elapsed() >= phase {
            break;
        }
    }
    let sw_w_t = t.elapsed();
    let stored = &order[..written];
    // Reads: random stored pages, `qd` in flight.
    let t = Instant::now();
    let mut done = Vec::new();
    let mut reads = 0u64;
    let mut next = 0u64;
    for _ in 0..a.qd {
        dev.submit_read(stored[rng.random_range(0..stored.len())], next)?;
        next += 1;
    }
    while t.elapsed() < phase {
        done.clear();
        dev.poll_reads(&mut done, 1)?;
        for r in done.drain(..) {
            match r.result? {
                PageData::Data(_) => reads += 1,
                other => anyhow::bail!("page {} read back as {other:?}", r.page),
            }
            dev.submit_read(stored[rng.random_range(0..stored.len())], next)?;
            next += 1;
        }
    }
    let sw_r_t = t.elapsed();
    done.clear();
    dev.poll_reads(&mut done, usize::MAX)?;
    dev.close()?;

    let row = |op, rb: u64, rt, sb: u64, st| {
        let (r, s) = (mb_s(rb as f64, rt), mb_s(sb as f64, st));
        IoRow {
            backend: label.to_string(),
            op,
            qd: a.qd,
            raw_mb_s: r,
            raw_iops: rb as f64 / PS as f64 / rt.as_secs_f64(),
            swapdev_mb_s: s,
            swapdev_iops: sb as f64 / PS as f64 / st.as_secs_f64(),
            ratio: s / r,
        }
    };
    Ok(vec![
        row("write", raw_w_bytes, raw_w_t, (written * PS) as u64, sw_w_t),
        row("read", raw_r_bytes, raw_r_t, reads * PS as u64, sw_r_t),
    ])
}

/// Write every page of the raw region sequentially, 1 MiB at a time, 8 in flight.
fn prefill(be: &mut dyn Backend, start: u64, pages: u64, pool: &[Vec<u8>]) -> Result<()> {
    let chunk_pages = 256u64;
    let mut chunk = AlignedBuf::new(chunk_pages as usize * PS);
    for (i, page) in chunk.chunks_mut(PS).enumerate() {
        page.copy_from_slice(&pool[i % pool.len()]);
    }
    let mut done: Vec<IoCompletion> = Vec::new();
    let mut at = 0;
    while at < pages {
        let n = chunk_pages.min(pages - at);
        be.submit(IoRequest {
            tag: at,
            offset: start + at * PS as u64,
            op: IoOp::Write {
                buf: AlignedBuf::from_slice(&chunk[..n as usize * PS]),
            },
        })?;
        at += n;
        while be.in_flight() >= 8 {
            done.clear();
            be.complete(&mut done, 1)?;
            for c in done.drain(..) {
                c.result?;
            }
        }
    }
    while be.in_flight() > 0 {
        done.clear();
        be.complete(&mut done, 1)?;
        for c in done.drain(..) {
            c.result?;
        }
    }
    Ok(())
}

/// Random 4 KiB writes or reads over `pages` pages from `start`, `qd` in flight, for `phase`.
#[allow(clippy::too_many_arguments)]
fn raw_phase(
    be: &mut dyn Backend,
    write: bool,
    start: u64,
    pages: u64,
    qd: usize,
    phase: Duration,
    pool: &[Vec<u8>],
    rng: &mut StdRng,
) -> Result<(u64, Duration)> {
    let req = |rng: &mut StdRng, tag: u64| {
        let page = rng.random_range(0..pages);
        let op = if write {
            IoOp::Write {
                buf: AlignedBuf::from_slice(&pool[(page % 256) as usize]),
            }
        } else {
            IoOp::Read {
                buf: AlignedBuf::new(PS),
            }
        };
        IoRequest {
            tag,
            offset: start + page * PS as u64,
            op,
        }
    };
    let t = Instant::now();
    for tag in 0..qd as u64 {
        be.submit(req(rng, tag))?;
    }
    let mut done: Vec<IoCompletion> = Vec::new();
    let mut n = 0u64;
    while t.elapsed() < phase {
        done.clear();
        be.complete(&mut done, 1)?;
        for c in done.drain(..) {
            c.result?;
            n += 1;
            be.submit(req(rng, n))?;
        }
    }
    let elapsed = t.elapsed();
    while be.in_flight() > 0 {
        be.complete(&mut done, 1)?;
    }
    Ok((n * PS as u64, elapsed))
}

/// lz4 on page mixes: zero, text-like, random, and a mix of the three (40/40/20).
fn codec_rows(rng: &mut StdRng) -> Vec<CodecRow> {
    let n = 8192;
    let words = [
        "kernel", "page", "memory", "the", "guest", "0x7ffe", "struct", "return", "swap", "fault",
        "NULL", "{", "}", "int", "buffer", "\n", "    ",
    ];
    let text = |rng: &mut StdRng| {
        let mut s = Vec::with_capacity(PS);
        while s.len() < PS {
            s.extend_from_slice(words[rng.random_range(0..words.len())].as_bytes());
            s.push(b' ');
        }
        s.truncate(PS);
        s
    };
    let random = |rng: &mut StdRng| {
        let mut v = vec![0u8; PS];
        rng.fill(&mut v[..]);
        v
    };
    let mut rows = Vec::new();
    for mix in ["zero", "text", "random", "mixed"] {
        let pages: Vec<Vec<u8>> = (0..n)
            .map(|i| match (mix, i % 5) {
                ("zero", _) | ("mixed", 0 | 1) => vec![0u8; PS],
                ("text", _) | ("mixed", 2 | 3) => text(rng),
                _ => random(rng),
            })
            .collect();
        let mut scratch = vec![0u8; lz4_scratch_len(PS)];
        let mut stored = Vec::with_capacity(n);
        let t = Instant::now();
        for p in &pages {
            let (codec, len) = encode_page(CodecPolicy::Lz4, p, &mut scratch);
            stored.push((codec, scratch[..len].to_vec()));
        }
        let enc = t.elapsed();
        let mut out = vec![0u8; PS];
        let t = Instant::now();
        let mut decoded = 0usize;
        for (codec, bytes) in &stored {
            if *codec == Codec::Lz4 {
                decode_lz4(bytes, &mut out).expect("own lz4 output decodes");
                decoded += PS;
            }
        }
        let dec = t.elapsed();
        let stored_bytes: usize = stored.iter().map(|(_, b)| b.len()).sum();
        let count = |c| stored.iter().filter(|(x, _)| *x == c).count();
        rows.push(CodecRow {
            mix,
            ratio: (stored_bytes > 0).then(|| (n * PS) as f64 / stored_bytes as f64),
            encode_mb_s: mb_s((n * PS) as f64, enc),
            decode_mb_s: (decoded > 0).then(|| mb_s(decoded as f64, dec)),
            zero_pages: count(Codec::Zero),
            lz4_pages: count(Codec::Lz4),
            raw_pages: count(Codec::Raw),
        });
    }
    rows
}

fn print_report(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "swap device {} ({} pages of 4 KiB), random 4 KiB pages",
        r.file, r.pages
    );
    let w = r.io.iter().map(|row| row.backend.len()).max().unwrap_or(7);
    println!(
        "{:<w$} {:<6} {:>3} {:>14} {:>12} {:>14} {:>12} {:>8}",
        "backend", "op", "qd", "raw MB/s", "raw IOPS", "swapdev MB/s", "swapdev IOPS", "ratio"
    );
    for row in &r.io {
        println!(
            "{:<w$} {:<6} {:>3} {:>14.1} {:>12.0} {:>14.1} {:>12.0} {:>7.0}%",
            row.backend,
            row.op,
            row.qd,
            row.raw_mb_s,
            row.raw_iops,
            row.swapdev_mb_s,
            row.swapdev_iops,
            row.ratio * 100.0
        );
    }
    println!();
    println!(
        "{:<7} {:>7} {:>13} {:>13} {:>6} {:>6} {:>6}",
        "mix", "ratio", "encode MB/s", "decode MB/s", "zero", "lz4", "raw"
    );
    for c in &r.codec {
        let ratio = c.ratio.map_or("no data".into(), |v| format!("{v:.2}"));
        let dec = c.decode_mb_s.map_or("-".into(), |v| format!("{v:.0}"));
        println!(
            "{:<7} {:>7} {:>13.0} {:>13} {:>6} {:>6} {:>6}",
            c.mix, ratio, c.encode_mb_s, dec, c.zero_pages, c.lz4_pages, c.raw_pages
        );
    }
    println!("(encode = zero check + lz4 attempt per page; decode over the lz4 pages only)");
    Ok(())
}
