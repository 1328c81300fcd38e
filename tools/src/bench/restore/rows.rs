//! The two rows of `bench restore`: QEMU's own restore and pagewise's lazy restore, each a
//! new QEMU started from the saved guest and watched on its console until memverify ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::report::Row;
use super::{drop_cache, watch, Saved, Setup, RECOVERED_FACTOR};
use crate::bench::guest::procs::{tail, ChildGuard, ShmFile};
use crate::bench::guest::serial::{done_of, GuestLine, SerialLog};
use crate::bench::migrate::qmp::Qmp;

/// VM name of the lazily restored guest in the daemon.
const VM: &str = "restored";

/// Poll `query-migrate` until `completed` (a failure, or `limit`, is an error).
pub(crate) fn wait_migration(qmp: &mut Qmp, limit: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => return Ok(info),
            s @ ("failed" | "cancelled") => bail!("QEMU's migration {s}: {info}"),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("QEMU's migration did not complete within {limit:?}: {info}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the console showed after a restore started at `t0`.
struct Watched {
    answer_ms: f64,
    bytes_at_answer: Option<u64>,
    hot_back: Option<(f64, f64)>,
    bytes_at_hot: Option<u64>,
    bytes_total: Option<u64>,
    bad_pages: u64,
    passed: bool,
}

/// Watch a restored guest: its first heartbeat, the first hot pass that started after it
/// and is within [`RECOVERED_FACTOR`] of `hot_ms_before`, then memverify's DONE. `bytes`
/// reads the bytes taken from the saved file so far.
fn observe(
    serial: &mut SerialLog,
    proc: &mut ChildGuard,
    log: &Path,
    t0: Instant,
    hot_ms_before: f64,
    limit: Duration,
    mut bytes: impl FnMut() -> Option<u64>,
) -> anyhow::Result<Watched> {
    let answered = watch(serial, proc, log, "the first heartbeat", limit, |lines| {
        lines.iter().find_map(|(seen, l)| match l {
            GuestLine::Heartbeat { .. } => Some(*seen),
            _ => None,
        })
    })?;
    let bytes_at_answer = bytes();
    let goal = hot_ms_before * RECOVERED_FACTOR;
    let hot = watch(serial, proc, log, "a recovered hot pass", limit, |lines| {
        let recovered = lines.iter().find_map(|(seen, l)| match l {
            GuestLine::HotPass {
                busy_ms, wall_ms, ..
            } if *busy_ms <= goal
                && seen
                    .checked_sub(Duration::from_secs_f64(wall_ms / 1e3))
                    .is_some_and(|start| start >= answered) =>
            {
                Some(Some((
                    seen.duration_since(t0).as_secs_f64() * 1e3,
                    *busy_ms,
                )))
            }
            _ => None,
        });
        recovered.or_else(|| done_of(lines).map(|_| None))
    })?;
    let bytes_at_hot = hot.and_then(|_| bytes());
    let mut bytes_total = None;
    let (bad_pages, passed) = watch(serial, proc, log, "memverify: DONE", limit, |lines| {
        let done = done_of(lines);
        if done.is_some() {
            bytes_total = bytes();
        }
        done
    })?;
    Ok(Watched {
        answer_ms: answered.duration_since(t0).as_secs_f64() * 1e3,
        bytes_at_answer,
        hot_back: hot,
        bytes_at_hot,
        bytes_total,
        bad_pages,
        passed,
    })
}

fn row(name: String, how: &'static str, loaded_ms: Option<f64>, w: Watched) -> Row {
    Row {
        name,
        how,
        loaded_ms,
        answer_ms: w.answer_ms,
        hot_back: w.hot_back,
        bytes_at_answer: w.bytes_at_answer,
        bytes_at_hot: w.bytes_at_hot,
        bytes_total: w.bytes_total,
        bad_pages: w.bad_pages,
        passed: w.passed,
    }
}

fn limit(s: &Setup) -> Duration {
    Duration::from_secs(s.args.duration_secs + 180)
}

/// QEMU's own restore: every RAM page loaded from its stream before the guest runs.
pub(crate) fn qemu_row(s: &Setup, saved: &Saved) -> anyhow::Result<Row> {
    drop_cache(&saved.qemu_file)?;
    let file_bytes = std::fs::metadata(&saved.qemu_file)?.len();
    let mem = ShmFile::new("restore-qemu");
    let serial_path = s.path("qemu.serial");
    let log = s.path("qemu.qemu.log");
    let qmp_path = s.path("qemu.qmp");
    eprintln!(
        "(qemu) QEMU's own restore from {}",
        saved.qemu_file.display()
    );
    let t0 = Instant::now();
    let mut qemu = ChildGuard::spawn(
        "qemu (QEMU's restore)",
        Command::new("qemu-system-x86_64")
            .args(s.qemu_args(&mem.0, &serial_path))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-incoming", "defer"]),
        &log,
    )?;
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(30))?;
    qmp.execute(
        "migrate-incoming",
        json!({ "uri": format!("exec:cat {}", saved.qemu_file.display()) }),
    )?;
    wait_migration(&mut qmp, limit(s)).context("QEMU loading its saved stream")?;
    let loaded_ms = t0.elapsed().as_secs_f64() * 1e3;
    if qmp.execute("query-status", json!({}))?["status"].as_str() != Some("running") {
        qmp.execute("cont", json!({}))?;
    }
    drop(qmp);
    let mut serial = SerialLog::new(serial_path);
    let w = observe(
        &mut serial,
        &mut qemu,
        &log,
        t0,
        saved.hot_ms_before,
        limit(s),
        || Some(file_bytes),
    )?;
    qemu.wait_exit(Duration::from_secs(30))?;
    Ok(row(
        "qemu".to_string(),
        "-incoming exec:cat FILE (all RAM first)",
        Some(loaded_ms),
        w,
    ))
}

/// Bytes the daemon has read from the image for the restored VM (demand + prefetch + push).
fn bytes_read(control: &Path) -> Option<u64> {
    let stats = pager::server::ControlClient::connect(control)
        .and_then(|mut c| c.stats(Some(VM)))
        .ok()?;
    let vm = stats.vms.into_iter().find(|v| v.vm == VM)?;
    let m = &vm.metrics;
    Some((m.faults_to_source + m.pages_prefetched) * vm.page_size)
}

/// pagewise's lazy restore: `pagewise vm restore` against a fresh `pagewise serve`.
pub(crate) fn pagewise_row(s: &Setup, saved: &Saved, prefetch: &str) -> anyhow::Result<Row> {
    drop_cache(&saved.image)?;
    // Files of their own per row: a console file left by an earlier row would be read
    // before the new QEMU truncates it.
    let tag = prefetch.replace('+', "-");
    let socket = s.path(&format!("pager-{tag}.sock"));
    let serve_log = s.path(&format!("serve-{tag}.log"));
    let mut serve = ChildGuard::spawn(
        "pagewise serve",
        Command::new(&s.pagewise)
            .args(["serve", "--prefetch", prefetch, "--socket"])
            .arg(&socket)
            .arg("--swapdev-dir")
            .arg(s.work.path()),
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
                "pagewise serve did not listen within 15 s: {}",
                tail(&serve_log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let control = pager::conventions::default_stats_socket(&socket);
    let mem = ShmFile::new(&format!("restore-pagewise-{tag}"));
    let serial_path = s.path(&format!("pagewise-{tag}.serial"));
    let log = s.path(&format!("pagewise-{tag}.restore.log"));
    let _ = std::fs::remove_file(&serial_path);
    eprintln!(
        "(pagewise, --prefetch {prefetch}) pagewise vm restore from {}",
        saved.image.display()
    );
    let t0 = Instant::now();
    let mut restore = ChildGuard::spawn(
        "pagewise vm restore",
        Command::new(&s.pagewise)
            .args(["vm", "restore", "--json", "--socket"])
            .arg(&socket)
            .args(["--name", VM, "--ram-image"])
            .arg(&saved.image)
            .arg("--state")
            .arg(&saved.state)
            .args(["--", "qemu-system-x86_64"])
            .args(s.qemu_args(&mem.0, &serial_path)),
        &log,
    )?;
    let mut serial = SerialLog::new(serial_path);
    let w = observe(
        &mut serial,
        &mut restore,
        &log,
        t0,
        saved.hot_ms_before,
        limit(s),
        || bytes_read(&control),
    )?;
    restore.wait_exit(Duration::from_secs(120))?;
    let report: Option<Value> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| serde_json::from_str(l).ok());
    let loaded_ms = report
        .as_ref()
        .and_then(|r| Some((r["qemu_ready_ms"].as_u64()? + r["load_ms"].as_u64()?) as f64));
    drop(serve);
    let name = if prefetch == "adaptive" {
        "pagewise (defaults)".to_string()
    } else {
        format!("pagewise --prefetch {prefetch}")
    };
    Ok(row(
        name,
        "vm restore (device state, RAM lazily from the image)",
        loaded_ms,
        w,
    ))
}
