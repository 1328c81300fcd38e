//! `pagewise bench restore`: QEMU's own restore of a saved guest against pagewise's lazy
//! restore of the same guest, both measured in one run.
//!
//! One memverify guest (plain QEMU, RAM in a /dev/shm file with share=on, a heartbeat on
//! the serial console) runs until its hot-set passes are steady; their median is its
//! pre-save speed. Then it is saved twice from the same run:
//! - QEMU's own save: `stop`, `migrate exec:cat > FILE` (QEMU 7.2 has no `file:` URI), RAM
//!   and devices in one stream; then `cont`;
//! - `pagewise vm save`: `stop`, device state only (`x-ignore-shared`), RAM file -> raw image.
//!
//! Both files sit in the work directory (on disk by default) and are dropped from the page
//! cache before their restore. Each row starts a new QEMU with an empty RAM file:
//! - **qemu**: `-incoming defer`, `migrate-incoming exec:cat FILE`: every RAM page is loaded
//!   before the guest runs; then `cont`;
//! - **pagewise**: `pagewise vm restore` against `pagewise serve` (defaults: adaptive
//!   prefetch + background push): device state loaded, RAM served lazily from the image.
//!
//! Per row, timed from the moment the restore command starts (QEMU's start included): when
//! the guest answers (its first heartbeat on the console), when its hot pass is back within
//! 1.5x of the pre-save median (the first pass that started after the guest answered), and
//! the bytes read from the saved file by then. Each restored guest runs to memverify's end
//! and must report 0 bad pages.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

mod report;
mod rows;

use crate::bench::guest::guest_image_in;
use crate::bench::guest::procs::{remove_stale_shm_files, run_checked, ChildGuard, ShmFile};
use crate::bench::guest::serial::{done_of, GuestLine, SerialLog};
use crate::bench::migrate::qmp::Qmp;
use report::{print_table, Row};

/// A hot pass counts as recovered within this factor of the pre-save median.
pub const RECOVERED_FACTOR: f64 = 1.5;

#[derive(clap::Args, Debug)]
pub struct RestoreBenchArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(256..=16384))]
    ram_mib: u64,
    /// memverify.mib: memory the guest fills and verifies, in MiB.
    #[arg(long, default_value_t = 768, value_parser = clap::value_parser!(u64).range(16..=16000))]
    mib: u64,
    /// memverify.hot_mib: the hot set, rewritten continuously, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16000))]
    hot_mib: u64,
    /// memverify.hot_rate_mibs: hot-set rewrite rate in MiB/s.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    hot_rate_mibs: u64,
    /// memverify.heartbeat_ms: the heartbeat the restore waits for.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    heartbeat_ms: u64,
    /// memverify.duration_secs: guest seconds memverify runs in all (before the save and
    /// after each restore).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(20..=3600))]
    duration_secs: u64,
    /// Hot passes the original guest runs after its first full pass before the save.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=100))]
    passes_before: u64,
    /// The daemon's prefetch policy of each pagewise row (comma separated; `adaptive` is
    /// the default of `pagewise serve`: stride or bubbling + background push).
    #[arg(long, value_delimiter = ',', default_value = "adaptive")]
    prefetch: Vec<String>,
    /// Directory holding vmlinuz and initrd.gz [default: built with tools/guest/build.sh].
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Where the work directory (the saved files, logs) is created: a disk by default.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the work directory.
    #[arg(long)]
    keep: bool,
}

pub(crate) struct Setup {
    pub work: tempfile::TempDir,
    pub pagewise: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub args: RestoreBenchArgs,
}

impl Setup {
    /// The guest's QEMU command line (after `qemu-system-x86_64`), RAM in `mem`.
    pub fn qemu_args(&self, mem: &Path, serial: &Path) -> Vec<String> {
        let a = &self.args;
        let append = format!(
            "console=ttyS0 quiet panic=-1 memverify.mib={} memverify.hot_mib={} \
             memverify.hot_rate_mibs={} memverify.verify_secs={} memverify.duration_secs={} \
             memverify.heartbeat_ms={}",
            a.mib, a.hot_mib, a.hot_rate_mibs, a.duration_secs, a.duration_secs, a.heartbeat_ms
        );
        let ram = a.ram_mib;
        [
            "-accel",
            "tcg",
            "-m",
            &format!("{ram}M"),
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={ram}M,mem-path={},share=on",
                mem.display()
            ),
            "-machine",
            "q35,memory-backend=mem",
            "-kernel",
            &self.kernel.display().to_string(),
            "-initrd",
            &self.initrd.display().to_string(),
            "-append",
            &append,
            "-display",
            "none",
            "-serial",
            &format!("file:{}", serial.display()),
            "-no-reboot",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }
}

/// What the save left: the pre-save hot-pass median and the two saved forms of the guest.
pub(crate) struct Saved {
    pub hot_ms_before: f64,
    pub qemu_file: PathBuf,
    pub image: PathBuf,
    pub state: PathBuf,
}

/// Poll the console every 5 ms (the answer time is read from it) until `found` picks
/// something, the process dies or `limit` passes.
pub(crate) fn watch<T>(
    serial: &mut SerialLog,
    proc: &mut ChildGuard,
    log: &Path,
    what: &str,
    limit: Duration,
    mut found: impl FnMut(&[(Instant, GuestLine)]) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        serial.poll()?;
        if let Some(t) = found(&serial.lines) {
            return Ok(t);
        }
        proc.check_alive(log)
            .with_context(|| format!("waiting for {what}"))?;
        if Instant::now() > deadline {
            bail!("{what} did not appear within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Drop `path` from the page cache (after syncing it), so its restore reads the disk.
pub(crate) fn drop_cache(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    f.sync_all()?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .with_context(|| format!("dropping {} from the page cache", path.display()))?;
    Ok(())
}

/// Boot the original guest, wait for steady hot passes, save it both ways.
fn boot_and_save(s: &Setup) -> anyhow::Result<Saved> {
    let mem = ShmFile::new("restore-origin");
    let serial_path = s.path("origin.serial");
    let log = s.path("origin.qemu.log");
    let qmp_path = s.path("origin.qmp");
    eprintln!("booting the guest (plain QEMU, {} MiB)", s.args.ram_mib);
    let mut qemu = ChildGuard::spawn(
        "qemu (origin)",
        Command::new("qemu-system-x86_64")
            .args(s.qemu_args(&mem.0, &serial_path))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display())),
        &log,
    )?;
    let mut serial = SerialLog::new(serial_path);
    let wanted = s.args.passes_before as usize;
    let hot = watch(
        &mut serial,
        &mut qemu,
        &log,
        "steady hot passes before the save (memverify hot pass lines)",
        Duration::from_secs(300),
        |lines| {
            let hot: Vec<f64> = lines
                .iter()
                .filter_map(|(_, l)| match l {
                    GuestLine::HotPass { busy_ms, .. } => Some(*busy_ms),
                    _ => None,
                })
                .collect();
            // The first sweep runs beside the fill; skip it.
            (hot.len() > wanted).then(|| hot[1..].to_vec())
        },
    )?;
    let hot_ms_before = median(hot).context("no hot pass before the save")?;
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))?;
    qmp.execute("stop", json!({}))?;
    let qemu_file = s.path("qemu-save.bin");
    eprintln!("QEMU's own save (RAM + devices) to {}", qemu_file.display());
    qmp.set_capabilities(&[("x-ignore-shared", false)])?;
    qmp.execute(
        "migrate",
        json!({ "uri": format!("exec:cat > {}", qemu_file.display()) }),
    )?;
    rows::wait_migration(&mut qmp, Duration::from_secs(300))?;
    qmp.execute("cont", json!({}))?;
    drop(qmp);
    let (image, state) = (s.path("guest.img"), s.path("guest.state"));
    eprintln!(
        "pagewise vm save to {} + {}",
        image.display(),
        state.display()
    );
    run_checked(
        Command::new(&s.pagewise)
            .args(["vm", "save", "--qmp"])
            .arg(&qmp_path)
            .arg("--ram-file")
            .arg(&mem.0)
            .arg("--ram-image")
            .arg(&image)
            .arg("--state")
            .arg(&state),
    )?;
    qemu.wait_exit(Duration::from_secs(30))?;
    if done_of(&serial.lines).is_some() {
        bail!("the guest finished before it was saved: raise --duration-secs");
    }
    Ok(Saved {
        hot_ms_before,
        qemu_file,
        image,
        state,
    })
}

pub fn run(args: RestoreBenchArgs) -> anyhow::Result<ExitCode> {
    if args.hot_mib > args.mib || args.mib + 128 > args.ram_mib {
        bail!("need --hot-mib <= --mib and --mib + 128 <= --ram-mib (room for the guest kernel)");
    }
    for p in &args.prefetch {
        if !matches!(
            p.as_str(),
            "adaptive" | "none" | "bubble" | "stride" | "bubble+stride"
        ) {
            bail!("--prefetch {p}: one of adaptive, none, bubble, stride, bubble+stride");
        }
    }
    remove_stale_shm_files();
    let (kernel, initrd) = guest_image_in(args.guest_dir.as_deref())?;
    let work = tempfile::Builder::new()
        .prefix("pagewise-bench-restore-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work directory in {}", args.dir.display()))?;
    let setup = Setup {
        work,
        pagewise: std::env::current_exe().context("locating the pagewise binary")?,
        kernel,
        initrd,
        args,
    };
    let started = Instant::now();
    let result = (|| -> anyhow::Result<(Saved, Vec<Row>)> {
        let saved = boot_and_save(&setup)?;
        let mut out = vec![rows::qemu_row(&setup, &saved)?];
        for policy in &setup.args.prefetch {
            out.push(rows::pagewise_row(&setup, &saved, policy)?);
        }
        Ok((saved, out))
    })();
    if setup.args.keep {
        let kept = setup.work.keep();
        eprintln!("kept {}", kept.display());
    }
    let (saved, rows) = result?;
    print_table(&setup.args, &saved, &rows);
    println!("run time {:.0} s", started.elapsed().as_secs_f64());
    if rows.iter().all(Row::ok) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("a restored guest found bad pages (see the table)");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_passes() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(4.0));
    }
}
