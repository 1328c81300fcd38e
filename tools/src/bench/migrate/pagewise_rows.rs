//! The pagewise rows: the real daemons on both lab hosts and `pagewise migrate`; QEMU moves
//! only device state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use super::lab::{
    in_ns, shared_device, Daemon, DaemonSpec, PidGuard, DST_IP, PAGEWISE_PORT, SRC_IP,
};
use super::observe::{heartbeat_gap_ms, hot_passes, poll_for, wait_health, POLL_EVERY};
use super::report::Row;
use super::{Ctx, VM_NAME};
use crate::bench::guest::procs::{run_checked, tail, ChildGuard, ShmFile};
use crate::bench::guest::serial::SerialLog;

fn u(v: &Value, path: &str) -> Option<u64> {
    v.pointer(path).and_then(Value::as_u64)
}

/// Run `cmd` to its end (at most `limit`), polling the serial consoles meanwhile so their
/// lines keep the host time they appeared at. Returns (success, stdout, stderr).
fn run_polling(
    cmd: &mut Command,
    out_path: &Path,
    serials: &mut [&mut SerialLog],
    limit: Duration,
) -> anyhow::Result<(bool, String, String)> {
    let err_path = out_path.with_extension("err");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        poll_for(serials, POLL_EVERY);
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not end within {limit:?}: {}", tail(&err_path));
        }
    };
    Ok((
        status.success(),
        std::fs::read_to_string(out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    ))
}

fn agile_rss(ctx: &Ctx) -> String {
    ctx.a
        .agile_rss
        .clone()
        .unwrap_or_else(|| format!("{}M", ctx.a.hot_mib + 24))
}

pub fn run(ctx: &Ctx, mode: &str, run: u32) -> anyhow::Result<Row> {
    let agile = mode == "agile";
    let dir = ctx.work.join(format!("{mode}-{run}"));
    let (src_dir, dst_dir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let mut extra = Vec::new();
    let mut vm_socket = src_dir.join("pager.sock");
    let mut _nbd = None;
    if agile {
        let (nbd, spec) = shared_device(&ctx.lab, &ctx.pagewise, &dir, VM_NAME, ctx.a.ram_mib)?;
        _nbd = Some(nbd);
        vm_socket = src_dir.join(format!("{VM_NAME}.sock"));
        extra = vec![
            "--vm".into(),
            format!("{VM_NAME}={}:{spec}", vm_socket.display()),
        ];
    } else {
        run_checked(
            Command::new(&ctx.pagewise)
                .args(["swapdev", "create"])
                .arg(src_dir.join(format!("{VM_NAME}.swap")))
                .args(["--size", &format!("{}M", ctx.a.ram_mib)]),
        )?;
    }
    let daemon = |ns: &str, name, d: &Path, ip, extra| {
        Daemon::start(DaemonSpec {
            pagewise: &ctx.pagewise,
            ns: ctx.lab.ns(ns),
            name,
            dir: d,
            listen_ip: ip,
            key: &ctx.key,
            extra,
        })
    };
    let src_daemon = daemon("src", "src", &src_dir, SRC_IP, extra)?;
    let dst_daemon = daemon("dst", "dst", &dst_dir, DST_IP, Vec::new())?;

    let mem = ShmFile::new(&format!("{mode}-{run}"));
    let src_serial = src_dir.join(format!("{VM_NAME}.serial"));
    let qmp = src_dir.join(format!("{VM_NAME}.qmp"));
    let log = src_dir.join("vm-run.log");
    let mut qemu = ChildGuard::spawn(
        "qemu (pagewise vm run)",
        in_ns(&ctx.lab.ns("src"), &ctx.pagewise)
            .args(["vm", "run", "--socket"])
            .arg(&vm_socket)
            .args(["--name", VM_NAME, "--", "qemu-system-x86_64"])
            .args(ctx.qemu_args(mode, &mem.0, &src_serial))
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ]),
        &log,
    )?;
    let mut serial = SerialLog::new(src_serial.clone());
    ctx.wait_lead(&mut serial, &mut qemu, &log)?;
    let src_socket = src_daemon.socket.to_string_lossy().to_string();
    if agile {
        let rss = agile_rss(ctx);
        eprintln!("agile: evicting the guest to {rss} first");
        let (ok, out, err) = run_polling(
            Command::new(&ctx.pagewise).args([
                "evict",
                "--socket",
                &src_socket,
                "--vm",
                VM_NAME,
                "--target-rss",
                &rss,
                "--json",
            ]),
            &dir.join("evict.out"),
            &mut [&mut serial],
            Duration::from_secs(ctx.lead_extra(mode)),
        )?;
        if !ok {
            bail!("pagewise evict failed: {out}{err}");
        }
    }
    // The daemon names the destination console DIR/VM.serial in its --migrate-dir.
    let mut dst_serial = SerialLog::new(dst_daemon.incoming.join(format!("{VM_NAME}.serial")));
    let link0 = ctx.lab.link_bytes();
    let t0 = Instant::now();
    let to = format!("{DST_IP}:{PAGEWISE_PORT}");
    let limit = Duration::from_secs(ctx.allowance(mode) + 60);
    let dl = ctx.a.downtime_limit.to_string();
    let (base_mode, flags) = super::pagewise_mode(mode, &ctx.a.xbzrle_cache);
    let (ok, out, err) = run_polling(
        in_ns(&ctx.lab.ns("src"), &ctx.pagewise)
            .args([
                "migrate",
                "--socket",
                &src_socket,
                "--vm",
                VM_NAME,
                "--to",
                &to,
                "--mode",
                base_mode,
                "--downtime-limit",
                &dl,
                "--json",
            ])
            .args(&flags),
        &dir.join("migrate.out"),
        &mut [&mut serial, &mut dst_serial],
        limit,
    )?;
    let t_end = Instant::now();
    let link_bytes = ctx.lab.link_bytes().saturating_sub(link0);
    let report: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    if report.is_null() {
        bail!(
            "pagewise migrate printed no JSON report (exit ok={ok}): {out}\n{}",
            tail_text(&err)
        );
    }
    let completed = ok && report["status"] == "completed";
    if let Some(dir) = &ctx.a.plot_dir {
        let png = dir.join(format!("{mode}-{run}.png"));
        let title = format!(
            "{mode} run {run}: {} ({} link)",
            report["status"].as_str().unwrap_or("?"),
            ctx.a.rate
        );
        match crate::plot::migration_timeline(&report, &png, &title) {
            Ok(()) => eprintln!("{mode}: timeline in {}", png.display()),
            Err(e) => eprintln!("{mode}: no timeline plot: {e}"),
        }
    }
    let dest_pid = u(&report, "/dest_qemu_pid").map(|p| PidGuard::new(p as u32));
    let guest_limit = Duration::from_secs(ctx.guest_duration(mode) + 90);
    let health = if completed {
        let key = src_serial.display().to_string();
        if let Some(p) = report["dest_paths"][&key].as_str() {
            if Path::new(p) != dst_serial.path {
                eprintln!("{mode}: destination console is {p}, not where expected");
                dst_serial = SerialLog::new(PathBuf::from(p));
            }
        }
        let _ = qemu.wait_exit(Duration::from_secs(20));
        let mut alive = || dest_pid.as_ref().is_some_and(PidGuard::alive);
        wait_health(
            &mut dst_serial,
            &mut [&mut serial],
            "destination",
            &mut alive,
            guest_limit,
        )
    } else {
        drop(dest_pid);
        let mut alive = || qemu.check_alive(&log).is_ok();
        wait_health(&mut serial, &mut [], "source", &mut alive, guest_limit)
    };
    // The destination console lives in the daemon's --migrate-dir, removed with it: keep a copy.
    let _ = std::fs::copy(&dst_serial.path, dir.join("dst.serial"));
    let hot = hot_passes(&serial, completed.then_some(&dst_serial), t0, t_end);
    let guest_gap_ms = heartbeat_gap_ms(&serial, completed.then_some(&dst_serial), t0, t_end);
    let status = if completed {
        "completed".to_string()
    } else if let Some(rule) = report["stop_rule"].as_str().filter(|r| *r != "converged") {
        format!("did not converge ({rule})")
    } else {
        format!(
            "{}: {}",
            report["status"].as_str().unwrap_or("?"),
            report["error"].as_str().unwrap_or("no error")
        )
    };
    drop(src_daemon);
    drop(dst_daemon);
    Ok(Row {
        mode: mode.to_string(),
        run,
        status,
        completed,
        total_ms: u(&report, "/total-time"),
        qemu_downtime_ms: u(&report, "/qemu_downtime_ms"),
        pagewise_downtime_ms: u(&report, "/downtime"),
        guest_gap_ms,
        ram_transferred: u(&report, "/ram/transferred"),
        link_bytes,
        demand_faults: u(&report, "/destination/demand_faults"),
        fault_p50_us: u(&report, "/destination/fault_latency_p50_us"),
        fault_p99_us: u(&report, "/destination/fault_latency_p99_us"),
        source_released_ms: u(&report, "/source_released_ms"),
        resent_bytes: resent_bytes(&report),
        pages_sent: u(&report, "/ram/normal"),
        hot,
        health,
        raw: report,
    })
}

/// Bytes sent after the first round: rounds 1.. and the final set (the transfer minus
/// round 0).
fn resent_bytes(report: &Value) -> Option<u64> {
    let total = u(report, "/ram/transferred")?;
    let first = u(report, "/rounds/0/bytes").unwrap_or(0);
    Some(total.saturating_sub(first))
}

fn tail_text(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
