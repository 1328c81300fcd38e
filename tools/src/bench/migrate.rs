//! `pagewise bench migrate`: QEMU's own live migration (QEMU moving RAM: pre-copy, and
//! post-copy with `postcopy-ram`) against pagewise's pre-copy, post-copy and agile, in one
//! run, with the same guest recipe and the same tc-shaped link (`tools/lab/twohost.sh`) for
//! every row.
//!
//! Each row is a fresh memverify guest (a hot set rewritten continuously) migrated once from
//! the lab's source host to its destination host; `--repeat N` does it N times per mode.
//! Every guest is verified where it ends up: memverify's DONE line (bad pages), or a crash
//! (its QEMU exits without DONE, e.g. a kernel panic after the switchover).
//!
//! - QEMU rows: plain QEMU on both hosts (RAM in a /dev/shm file, share=on, no pager), the
//!   destination with `-incoming tcp:`, `max-bandwidth` very high so the link is the limit,
//!   `downtime-limit` 300 ms; pre-copy gives up after `--qemu-cap` seconds ("did not
//!   converge", the guest stays on the source and is verified there); post-copy calls
//!   `migrate-start-postcopy` after `--postcopy-after` seconds.
//! - pagewise rows: `pagewise serve` on each host with a migration endpoint, the guest under
//!   `pagewise vm run`, `pagewise migrate --json`; agile's swap device is a qemu-nbd export
//!   on the store host and the guest is evicted to about its hot set first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

mod lab;
mod observe;
mod pagewise_rows;
mod qemu_rows;
pub(crate) mod qmp;
mod report;

use crate::bench::guest::procs::{remove_stale_shm_files, ChildGuard};
use crate::bench::guest::serial::{GuestLine, SerialLog};
use lab::Lab;
use report::{table, Recipe, Row};

const ALL_MODES: [&str; 9] = [
    "qemu-precopy",
    "qemu-precopy-xbzrle",
    "qemu-postcopy",
    "precopy",
    "precopy-xbzrle",
    "precopy-microwiper",
    "precopy-lz4",
    "postcopy",
    "agile",
];

/// What `pagewise migrate` gets for a pagewise row: its --mode and extra flags.
pub fn pagewise_mode(row: &str, xbzrle_cache: &str) -> (&'static str, Vec<String>) {
    let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect();
    match row {
        "precopy-xbzrle" => (
            "precopy",
            flags(&["--xbzrle", "--xbzrle-cache", xbzrle_cache]),
        ),
        "precopy-microwiper" => ("precopy", flags(&["--order", "microwiper"])),
        "precopy-lz4" => ("precopy", flags(&["--compress"])),
        "postcopy" => ("postcopy", Vec::new()),
        "agile" => ("agile", Vec::new()),
        _ => ("precopy", Vec::new()),
    }
}
const VM_NAME: &str = "benchvm";

#[derive(clap::Args, Debug, Clone)]
pub struct MigrateBenchArgs {
    /// Rows, comma-separated: qemu-precopy, qemu-precopy-xbzrle, qemu-postcopy, precopy,
    /// precopy-xbzrle, precopy-microwiper, precopy-lz4, postcopy, agile.
    #[arg(
        long,
        default_value = "qemu-precopy,qemu-postcopy,precopy,postcopy,agile"
    )]
    modes: String,
    /// Migrations per mode (each of a fresh guest).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// The shaped link's rate, tc tbf syntax (240mbit = 30 MB/s).
    #[arg(long, default_value = "240mbit")]
    rate: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    ram_mib: u64,
    /// memverify.mib: memory the guest fills and verifies.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// memverify.hot_mib: the hot set, rewritten continuously.
    #[arg(long, default_value_t = 64)]
    hot_mib: u64,
    /// memverify.hot_rate_mibs (32 MiB/s: sustained by TCG here with ~20% of the guest's
    /// time, and faster than a 30 MB/s link).
    #[arg(long, default_value_t = 32)]
    hot_rate_mibs: u64,
    /// memverify.sparse_words: words a hot rewrite changes per page (0: whole pages; a few:
    /// the sparse-write guest XBZRLE is for).
    #[arg(long, default_value_t = 0)]
    sparse_words: u64,
    /// memverify.hot_skew: K-1 of every K hot rewrites go to the hottest eighth of the hot
    /// set (1: uniform; a skewed hot set is what microwiper ordering is for).
    #[arg(long, default_value_t = 1)]
    hot_skew: u64,
    /// The XBZRLE cache of the xbzrle rows (QEMU's xbzrle-cache-size and pagewise's
    /// --xbzrle-cache).
    #[arg(long, default_value = "256M")]
    xbzrle_cache: String,
    /// memverify.verify_secs: seconds between full verify passes.
    #[arg(long, default_value_t = 5)]
    verify_secs: u64,
    /// Seconds the guest runs (after its fill) before the migration starts.
    #[arg(long, default_value_t = 8)]
    pre_secs: u64,
    /// Seconds the guest runs after the migration's time allowance (then its DONE line).
    #[arg(long, default_value_t = 12)]
    post_secs: u64,
    /// qemu-postcopy: seconds of pre-copy before `migrate-start-postcopy`.
    #[arg(long, default_value_t = 2.0)]
    postcopy_after: f64,
    /// QEMU pre-copy gives up after this many seconds ("did not converge").
    #[arg(long, default_value_t = 150)]
    qemu_cap: u64,
    /// Downtime limit of every pre-copy, in ms.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Agile: evict the guest to this resident size before migrating [default: hot set + 24 MiB].
    #[arg(long)]
    agile_rss: Option<String>,
    /// Lab prefix (network namespace names) [default: bm + this process's id].
    #[arg(long)]
    prefix: Option<String>,
    /// Directory holding vmlinuz and initrd.gz [default: built with tools/guest/build.sh].
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Where the work directory (logs, serial consoles, swap devices) is created.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the work directory.
    #[arg(long)]
    keep: bool,
    /// Draw each pagewise row's timeline into DIR/MODE-RUN.png.
    #[arg(long, value_name = "DIR")]
    plot_dir: Option<PathBuf>,
    /// Print the raw rows as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

/// What every row shares.
pub struct Ctx {
    pub a: MigrateBenchArgs,
    pub pagewise: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub work: PathBuf,
    pub key: PathBuf,
    pub lab: Lab,
    /// Link rate in bytes per second.
    pub rate_bps: f64,
}

/// A tc rate ("240mbit", "1gbit", "30mbps" = bytes) in bytes per second.
pub fn parse_rate(rate: &str) -> anyhow::Result<f64> {
    let r = rate.trim().to_ascii_lowercase();
    let split = r
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(r.len());
    let (num, unit) = r.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("--rate {rate}: not a tc rate"))?;
    let bits = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => bail!("--rate {rate}: unknown unit {unit} (bit, kbit, mbit, gbit, bps, kbps, mbps)"),
    };
    Ok(n * bits / 8.0)
}

impl Ctx {
    /// How the hot set is rewritten, in words.
    fn workload_words(&self) -> String {
        let mut w = if self.a.sparse_words > 0 {
            format!("{} words per page per rewrite", self.a.sparse_words)
        } else {
            "whole pages".to_string()
        };
        if self.a.hot_skew > 1 {
            w += &format!(
                ", {}/{} of rewrites to its hottest eighth",
                self.a.hot_skew - 1,
                self.a.hot_skew
            );
        }
        w
    }

    /// Seconds a row's migration may take before the guest finishes: the guest's duration
    /// is the lead time + this + --post-secs, so its DONE line comes after the migration.
    pub fn allowance(&self, mode: &str) -> u64 {
        let whole_ram = (self.a.ram_mib << 20) as f64 / self.rate_bps;
        match mode {
            "qemu-precopy" | "qemu-precopy-xbzrle" => self.a.qemu_cap + 5,
            // pagewise pre-copy's own cap: 10 rounds or 60 s.
            m if m.starts_with("precopy") => 125,
            _ => (2.0 * whole_ram + 10.0).max(25.0) as u64,
        }
    }

    /// Extra lead time before the migration (agile's eviction).
    pub fn lead_extra(&self, mode: &str) -> u64 {
        if mode == "agile" {
            25
        } else {
            0
        }
    }

    pub fn guest_duration(&self, mode: &str) -> u64 {
        self.a.pre_secs + self.lead_extra(mode) + self.allowance(mode) + self.a.post_secs
    }

    /// The guest's QEMU command line (without -qmp / -incoming).
    pub fn qemu_args(&self, mode: &str, mem: &Path, serial: &Path) -> Vec<String> {
        let a = &self.a;
        let append = format!(
            "console=ttyS0 quiet panic=-1 memverify.mib={} memverify.hot_mib={} \
             memverify.hot_rate_mibs={} memverify.verify_secs={} memverify.duration_secs={} \
             memverify.heartbeat_ms=20 memverify.sparse_words={} memverify.hot_skew={}",
            a.mib,
            a.hot_mib,
            a.hot_rate_mibs,
            a.verify_secs,
            self.guest_duration(mode),
            a.sparse_words,
            a.hot_skew.max(1)
        );
        let ram = a.ram_mib;
        [
            "-accel".to_string(),
            "tcg".into(),
            "-m".into(),
            format!("{ram}M"),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={ram}M,mem-path={},share=on",
                mem.display()
            ),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            append,
            "-display".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-no-reboot".into(),
        ]
        .to_vec()
    }

    /// Wait until the guest has run --pre-secs after its fill (its first hot sweep's start).
    pub fn wait_lead(
        &self,
        serial: &mut SerialLog,
        qemu: &mut ChildGuard,
        log: &Path,
    ) -> anyhow::Result<()> {
        let first = serial.wait_for(
            "the first hot pass",
            Duration::from_secs(180),
            qemu,
            log,
            |lines| {
                lines.iter().find_map(|(seen, l)| match l {
                    GuestLine::HotPass { wall_ms, .. } => {
                        seen.checked_sub(Duration::from_secs_f64(wall_ms / 1e3))
                    }
                    _ => None,
                })
            },
        )?;
        let due = first + Duration::from_secs(self.a.pre_secs);
        serial.wait_for("the lead time", Duration::from_secs(300), qemu, log, |_| {
            (Instant::now() >= due).then_some(())
        })
    }
}

fn check_args(a: &MigrateBenchArgs) -> anyhow::Result<Vec<String>> {
    let modes: Vec<String> = a
        .modes
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if let Some(m) = modes.iter().find(|m| !ALL_MODES.contains(&m.as_str())) {
        bail!("--modes: unknown row {m} (known: {})", ALL_MODES.join(", "));
    }
    if modes.is_empty() || a.repeat == 0 {
        bail!("--modes names no row, or --repeat is 0");
    }
    if a.hot_mib == 0 || a.hot_mib > a.mib || a.mib + 128 > a.ram_mib {
        bail!("need 1 <= --hot-mib <= --mib and --mib + 128 <= --ram-mib");
    }
    parse_rate(&a.rate)?;
    Ok(modes)
}

fn unique_prefix() -> String {
    format!("bm{}", std::process::id() % 100_000)
}

pub fn run(a: MigrateBenchArgs) -> anyhow::Result<ExitCode> {
    let modes = check_args(&a)?;
    if let Some(d) = &a.plot_dir {
        std::fs::create_dir_all(d).with_context(|| format!("--plot-dir {}", d.display()))?;
    }
    remove_stale_shm_files();
    let (kernel, initrd) = crate::bench::guest::guest_image_in(a.guest_dir.as_deref())?;
    let repo = crate::bench::guest::find_repo()
        .ok_or_else(|| anyhow!("cannot find the pagewise repository (tools/lab/twohost.sh)"))?;
    let work = tempfile::Builder::new()
        .prefix("pagewise-bench-migrate-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a work directory in {}", a.dir.display()))?;
    let key = work.path().join("psk");
    std::fs::write(&key, format!("bench migrate key {}", rand::random::<u64>()))?;
    let prefix = a.prefix.clone().unwrap_or_else(unique_prefix);
    eprintln!("two-host lab {prefix}: link {}", a.rate);
    let lab = Lab::up(repo.join("tools/lab/twohost.sh"), &prefix, &a.rate)?;
    let ctx = Ctx {
        rate_bps: parse_rate(&a.rate)?,
        pagewise: std::env::current_exe().context("locating the pagewise binary")?,
        kernel,
        initrd,
        work: work.path().to_path_buf(),
        key,
        lab,
        a,
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    for run in 1..=ctx.a.repeat {
        for mode in &modes {
            eprintln!("--- {mode} run {run}");
            let row = run_row(&ctx, mode, run);
            eprintln!(
                "{mode} run {run}: {}, guest {}",
                row.status,
                row.health.verdict()
            );
            ctx.lab.kill_leftovers();
            rows.push(row);
        }
    }
    let recipe = Recipe {
        title: format!(
            "pagewise bench migrate: {} MiB TCG guest, memverify {} MiB filled, hot set {} MiB \
             rewritten at {} MiB/s ({}); link {} ({:.0} MB/s, tc tbf on a veth pair); QEMU \
             downtime-limit {} ms, post-copy after {} s; {} run(s) per mode",
            ctx.a.ram_mib,
            ctx.a.mib,
            ctx.a.hot_mib,
            ctx.a.hot_rate_mibs,
            ctx.workload_words(),
            ctx.a.rate,
            ctx.rate_bps / 1e6,
            ctx.a.downtime_limit,
            ctx.a.postcopy_after,
            ctx.a.repeat
        ),
    };
    if ctx.a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    let text = format!(
        "{}run time {:.0} s",
        table(&recipe, &rows),
        started.elapsed().as_secs_f64()
    );
    if ctx.a.json {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
    let keep = ctx.a.keep;
    drop(ctx);
    if keep {
        eprintln!("kept {}", work.keep().display());
    }
    let healthy = rows.iter().all(|r| r.health.ok());
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One row; a failure of the bench itself (not of the migration) is a row too.
fn run_row(ctx: &Ctx, mode: &str, run: u32) -> Row {
    let result = if mode.starts_with("qemu-") {
        qemu_rows::run(ctx, mode, run)
    } else {
        pagewise_rows::run(ctx, mode, run)
    };
    result.unwrap_or_else(|e| Row {
        mode: mode.to_string(),
        run,
        status: format!("bench error: {e:#}"),
        ..Row::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_tc_rates() {
        assert_eq!(parse_rate("240mbit").unwrap(), 30e6);
        assert_eq!(parse_rate("1gbit").unwrap(), 125e6);
        assert_eq!(parse_rate("30mbps").unwrap(), 30e6);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10parsecs").is_err());
    }
}
