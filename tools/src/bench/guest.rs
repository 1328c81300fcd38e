//! `pagewise bench guest`: memverify's hot-set pass time and full verify pass time in a real
//! QEMU guest (TCG), in one run, as ratios against plain QEMU:
//!
//! - (a) plain QEMU, guest RAM in a /dev/shm file with `share=on`, no pager (the baseline);
//! - (b) the same guest under `pagewise serve` + `pagewise vm run`, nothing evicted;
//! - (c) the guest of (b) after `evict --auto` (or `--target-rss`): evicted to its working set.
//!
//! (b) and (c) are two phases of one guest: the eviction starts right after its first full
//! pass; a (c) figure only counts a pass or a hot-set sweep that started after the eviction
//! ended (its end seen on the serial console minus its own duration).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

pub(crate) mod procs;
pub(crate) mod report;
pub(crate) mod serial;

use anyhow::{anyhow, bail, Context};
use pager::server::protocol::{EvictTarget, Request};
use serde_json::Value;

use procs::{run_checked, tail, ChildGuard, ShmFile};
use report::{print_table, PagerRun, PhaseTimes};
use serial::{done_of, GuestLine, SerialLog};

const VM_NAME: &str = "benchguest";
/// Why a guest may print no `hot pass` line.
const REBUILD_HINT: &str = "a guest whose memverify predates hot-pass timing prints none: \
     rebuild it with tools/guest/build.sh";

#[derive(clap::Args, Debug)]
pub struct GuestBenchArgs {
    /// memverify.mib: memory the guest fills and verifies, in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// memverify.hot_mib: the hot set, rewritten continuously, in MiB.
    #[arg(long, default_value_t = 32)]
    hot_mib: u64,
    /// memverify.hot_rate_mibs: hot-set rewrite rate (one sweep takes hot_mib/rate s).
    #[arg(long, default_value_t = 8)]
    hot_rate_mibs: u64,
    /// memverify.verify_secs: seconds between full verify passes.
    #[arg(long, default_value_t = 10)]
    verify_secs: u64,
    /// memverify.duration_secs: seconds each guest runs after its fill.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    ram_mib: u64,
    /// Eviction goal of phase (c): `auto` (working-set estimate + 10%) or a resident size
    /// (e.g. 48M) passed as --target-rss.
    #[arg(long, default_value = "auto")]
    evict: String,
    /// Directory holding vmlinuz and initrd.gz [default: build them with
    /// tools/guest/build.sh into <repo>/lab/guest, the repo found above the current directory
    /// or the pagewise binary].
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Where the work directory (swap device, logs) is created.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the work directory (serial logs, daemon log).
    #[arg(long)]
    keep: bool,
}

struct Setup {
    work: tempfile::TempDir,
    pagewise: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    boot_limit: Duration,
    run_limit: Duration,
}

pub(crate) fn find_repo() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    [cwd, exe]
        .into_iter()
        .flatten()
        .flat_map(|start| start.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .find(|d| d.join("tools/guest/build.sh").is_file())
}

fn guest_image(args: &GuestBenchArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    guest_image_in(args.guest_dir.as_deref())
}

/// The guest's kernel and initramfs from `dir`, or built with tools/guest/build.sh.
pub(crate) fn guest_image_in(dir: Option<&Path>) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let repo = find_repo().ok_or_else(|| {
                anyhow!(
                    "cannot find tools/guest/build.sh above the current directory or the \
                     pagewise binary: run from the pagewise repository or pass --guest-dir DIR \
                     (with vmlinuz and initrd.gz from tools/guest/build.sh)"
                )
            })?;
            let out = repo.join("lab/guest");
            eprintln!(
                "building the guest (tools/guest/build.sh, cached in {})",
                out.display()
            );
            let status = Command::new("bash")
                .arg(repo.join("tools/guest/build.sh"))
                .arg(&out)
                .status()
                .context("running tools/guest/build.sh")?;
            if !status.success() {
                bail!("tools/guest/build.sh failed ({status})");
            }
            out
        }
    };
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.gz"));
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            bail!(
                "{} missing: build the guest with tools/guest/build.sh",
                f.display()
            );
        }
    }
    Ok((kernel, initrd))
}

fn qemu_args(a: &GuestBenchArgs, s: &Setup, mem: &Path, serial: &Path) -> Vec<String> {
    let append = format!(
        "console=ttyS0 quiet panic=-1 memverify.mib={} memverify.hot_mib={} \
         memverify.hot_rate_mibs={} memverify.verify_secs={} memverify.duration_secs={}",
        a.mib, a.hot_mib, a.hot_rate_mibs, a.verify_secs, a.duration_secs
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
        &s.kernel.display().to_string(),
        "-initrd",
        &s.initrd.display().to_string(),
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

/// Wait for the guest's DONE line and its exit; fail on bad pages.
fn finish_guest(
    serial: &mut SerialLog,
    qemu: &mut ChildGuard,
    qemu_log: &Path,
    limit: Duration,
    label: &str,
) -> anyhow::Result<()> {
    let (bad, pass) = serial.wait_for("memverify: DONE", limit, qemu, qemu_log, done_of)?;
    qemu.wait_exit(Duration::from_secs(30))?;
    if bad > 0 || !pass {
        bail!(
            "guest {label}: memverify found {bad} bad pages:\n{}",
            tail(&serial.path)
        );
    }
    Ok(())
}

fn phase_plain(a: &GuestBenchArgs, s: &Setup) -> anyhow::Result<PhaseTimes> {
    let mem = ShmFile::new("plain");
    let serial_path = s.work.path().join("plain.serial");
    let log = s.work.path().join("plain.qemu.log");
    eprintln!(
        "(a) plain QEMU, RAM in {} (share=on), no pager",
        mem.0.display()
    );
    let mut qemu = ChildGuard::spawn(
        "qemu (plain)",
        Command::new("qemu-system-x86_64").args(qemu_args(a, s, &mem.0, &serial_path)),
        &log,
    )?;
    let mut serial = SerialLog::new(serial_path);
    finish_guest(
        &mut serial,
        &mut qemu,
        &log,
        s.boot_limit + s.run_limit,
        "(a)",
    )?;
    Ok(PhaseTimes::from_lines(serial.lines.iter().map(|(_, l)| l)))
}

/// One control request; the answer as JSON (its fields as the typed response serializes them).
fn control(socket: &Path, req: &Request) -> anyhow::Result<Value> {
    let response = pager::server::ControlClient::connect(socket)
        .and_then(|mut c| c.call(req))
        .with_context(|| {
            format!(
                "control request {} to {}",
                req.encode().trim(),
                socket.display()
            )
        })?;
    Ok(serde_json::to_value(&response)?)
}

fn stats_request() -> Request {
    Request::Stats {
        vm: Some(VM_NAME.into()),
    }
}

fn evict_request(goal: &str) -> anyhow::Result<Request> {
    let goal = if goal == "auto" {
        EvictTarget::Auto {
            margin_percent: Some(10),
            min_margin_pages: None,
        }
    } else {
        EvictTarget::TargetRssBytes(
            pager::conventions::parse_size(goal)
                .map_err(|e| anyhow!("--evict: {e} (or use auto)"))?,
        )
    };
    Ok(Request::Evict {
        vm: VM_NAME.into(),
        goal,
        batch_pages: None,
        wait: false,
    })
}

/// Run the eviction through the daemon's control socket and wait (bounded) for its report.
fn evict(socket: &Path, goal: &str, limit: Duration) -> anyhow::Result<Value> {
    control(socket, &evict_request(goal)?)?;
    let deadline = Instant::now() + limit;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let st = control(socket, &Request::EvictStatus { vm: VM_NAME.into() })?;
        if !st.get("running").and_then(Value::as_bool).unwrap_or(false) {
            if let Some(err) = st.get("error").and_then(Value::as_str) {
                bail!("the eviction failed: {err}");
            }
            return Ok(st.get("report").cloned().unwrap_or(Value::Null));
        }
        if Instant::now() > deadline {
            let _ = control(socket, &Request::EvictCancel { vm: VM_NAME.into() });
            bail!("the eviction did not finish within {limit:?}");
        }
    }
}

fn phase_pager(a: &GuestBenchArgs, s: &Setup) -> anyhow::Result<PagerRun> {
    let dir = s.work.path();
    let socket = dir.join("pager.sock");
    let serve_log = dir.join("serve.log");
    run_checked(
        Command::new(&s.pagewise)
            .args(["swapdev", "create"])
            .arg(dir.join(format!("{VM_NAME}.swap")))
            .args(["--size", &(a.ram_mib << 20).to_string()]),
    )?;
    let mut serve = ChildGuard::spawn(
        "pagewise serve",
        Command::new(&s.pagewise)
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--swapdev-dir")
            .arg(dir),
        &serve_log,
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&serve_log)
        .unwrap_or_default()
        .contains("listening on")
    {
        serve.check_alive(&serve_log)?;
        if Instant::now() > deadline {
            bail!(
                "pagewise serve did not start listening within 15 s: {}",
                tail(&serve_log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats_socket = pager::conventions::default_stats_socket(&socket);

    let mem = ShmFile::new("pager");
    let serial_path = dir.join("pager.serial");
    let log = dir.join("pager.qemu.log");
    eprintln!(
        "(b) QEMU under pagewise serve + pagewise vm run (swap device in {})",
        dir.display()
    );
    let mut qemu = ChildGuard::spawn(
        "qemu (pagewise vm run)",
        Command::new(&s.pagewise)
            .args(["vm", "run", "--socket"])
            .arg(&socket)
            .args(["--name", VM_NAME, "--", "qemu-system-x86_64"])
            .args(qemu_args(a, s, &mem.0, &serial_path)),
        &log,
    )?;
    let mut serial = SerialLog::new(serial_path);
    serial.wait_for(
        &format!("the first full pass and hot sweep ({REBUILD_HINT})"),
        s.boot_limit + Duration::from_secs(a.verify_secs * 2 + 30),
        &mut qemu,
        &log,
        |lines| {
            let pass = lines
                .iter()
                .any(|(_, l)| matches!(l, GuestLine::Pass { .. }));
            let hot = lines
                .iter()
                .any(|(_, l)| matches!(l, GuestLine::HotPass { .. }));
            (pass && hot).then_some(())
        },
    )?;
    let split = serial.lines.len();
    let stats_before = control(&stats_socket, &stats_request())?;
    let resident_before = mem.resident_bytes();
    eprintln!("(c) evicting ({})", a.evict);
    let evict_report = evict(&stats_socket, &a.evict, Duration::from_secs(120))?;
    let evict_end = Instant::now();
    let stats_after_evict = control(&stats_socket, &stats_request())?;
    let resident_after = mem.resident_bytes();
    // Lines whose pass (or sweep) started after the eviction ended.
    let started_after = |seen: Instant, ms: f64| {
        seen.checked_sub(Duration::from_secs_f64(ms / 1e3))
            .is_some_and(|start| start > evict_end)
    };
    let first_index = |lines: &[(Instant, GuestLine)], hot: bool| {
        lines.iter().position(|(seen, l)| match l {
            GuestLine::Pass { ms, .. } if !hot => started_after(*seen, *ms),
            GuestLine::HotPass { wall_ms, .. } if hot => started_after(*seen, *wall_ms),
            _ => false,
        })
    };
    let (first_full, first_hot) = serial.wait_for(
        "a full pass and a hot sweep started after the eviction",
        Duration::from_secs(a.duration_secs + 60),
        &mut qemu,
        &log,
        |lines| Some((first_index(lines, false)?, first_index(lines, true)?)),
    )?;
    let run_limit = Duration::from_secs(a.duration_secs + 60);
    serial.wait_for("memverify: DONE", run_limit, &mut qemu, &log, done_of)?;
    // Right at DONE, before QEMU powers off (the daemon forgets a VM whose QEMU exited).
    let stats_end = control(&stats_socket, &stats_request()).unwrap_or(Value::Null);
    finish_guest(&mut serial, &mut qemu, &log, run_limit, "(b)/(c)")?;
    drop(qemu);
    drop(serve);

    let lines: Vec<&GuestLine> = serial.lines.iter().map(|(_, l)| l).collect();
    let mut first_after = PhaseTimes::default();
    let mut later_after = PhaseTimes::default();
    for (i, l) in lines.iter().enumerate() {
        match l {
            GuestLine::Pass { ms, .. } if i == first_full => first_after.full_ms.push(*ms),
            GuestLine::Pass { ms, .. } if i > first_full => later_after.full_ms.push(*ms),
            GuestLine::HotPass { busy_ms, .. } if i == first_hot => {
                first_after.hot_ms.push(*busy_ms)
            }
            GuestLine::HotPass { busy_ms, .. } if i > first_hot => {
                later_after.hot_ms.push(*busy_ms)
            }
            _ => {}
        }
    }
    Ok(PagerRun {
        nothing_evicted: PhaseTimes::from_lines(lines[..split].iter().copied()),
        first_after,
        later_after,
        stats_before,
        stats_after_evict,
        stats_end,
        evict_report,
        resident_before,
        resident_after,
    })
}

pub fn run(a: GuestBenchArgs) -> anyhow::Result<ExitCode> {
    if a.hot_mib == 0 || a.hot_rate_mibs == 0 || a.hot_mib > a.mib {
        bail!("--hot-mib must be between 1 and --mib, and --hot-rate-mibs at least 1");
    }
    if a.mib + 128 > a.ram_mib {
        bail!(
            "--ram-mib {} leaves less than 128 MiB beside --mib {} for the guest kernel",
            a.ram_mib,
            a.mib
        );
    }
    let sweep_secs = a.hot_mib.div_ceil(a.hot_rate_mibs);
    if a.duration_secs < a.verify_secs * 2 + 2 * sweep_secs {
        bail!(
            "--duration-secs {} is too short: the guest must run a full pass after the first \
             one and two hot-set sweeps ({} s each) after the eviction; use at least {}",
            a.duration_secs,
            sweep_secs,
            a.verify_secs * 2 + 2 * sweep_secs
        );
    }
    evict_request(&a.evict)?;
    procs::remove_stale_shm_files();
    let (kernel, initrd) = guest_image(&a)?;
    let work = tempfile::Builder::new()
        .prefix("pagewise-bench-guest-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a work directory in {}", a.dir.display()))?;
    let setup = Setup {
        work,
        pagewise: std::env::current_exe().context("locating the pagewise binary")?,
        kernel,
        initrd,
        boot_limit: Duration::from_secs(150),
        run_limit: Duration::from_secs(a.duration_secs + 60),
    };
    let started = Instant::now();
    let result = phase_plain(&a, &setup).and_then(|plain| Ok((plain, phase_pager(&a, &setup)?)));
    if a.keep {
        let kept = setup.work.keep();
        eprintln!("kept {}", kept.display());
    }
    let (plain, pager_run) = result?;
    if plain.hot_ms.is_empty() || plain.full_ms.is_empty() {
        bail!("the plain guest printed no 'memverify: hot pass' or 'pass' line; {REBUILD_HINT}");
    }
    print_table(&a, &plain, &pager_run);
    println!("run time {:.0} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_goal_is_checked() {
        assert!(matches!(
            evict_request("auto").unwrap(),
            Request::Evict {
                goal: EvictTarget::Auto { .. },
                ..
            }
        ));
        assert!(matches!(
            evict_request("48M").unwrap(),
            Request::Evict {
                goal: EvictTarget::TargetRssBytes(b),
                ..
            } if b == 48u64 << 20
        ));
        assert!(evict_request("lots")
            .unwrap_err()
            .to_string()
            .contains("--evict"));
    }
}
